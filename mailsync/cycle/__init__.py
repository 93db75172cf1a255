"""The sync cycle (DESIGN §4), one module per stage.

::

    receive   mail → verify → act on controls / buffer parts     (receive, controls)
    apply     buffered changesets, in sequence order, one transaction each (apply)
    build     capture → route per link → pack → seal → outbox    (build)
    send      controls first, then every part due, per peer      (send, controls)
    purge     change log every peer has acknowledged, old log    (purge)

:func:`mailsync.cycle.run.run_cycle` is the spine; every stage takes the
narrow :class:`~mailsync.cycle.context.CycleContext` and writes what it hands
on into the :class:`~mailsync.cycle.report.CycleReport`. A failure is
confined to its message, its peer or its mailbox by
:func:`~mailsync.cycle.contain.contained`. Nothing here imports
:mod:`mailsync.node`: the node is a façade that builds the context.
"""
