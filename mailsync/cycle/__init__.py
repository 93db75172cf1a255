"""The sync cycle (DESIGN §4), one module per stage.

::

    start     witness check + every stage's reads, one transaction  (start, snapshot)
    receive   mail → verify → act on controls / buffer parts          (receive, controls)
              (a one-part changeset next in line applied right there)  (apply.apply_now)
    apply     what is still buffered, in sequence order, one transaction each (apply)
    settle    one transaction: build per link (capture → route → pack → seal → outbox),
              controls composed, parts due recorded as sent, purge, witness, log
                                                         (settle, build, controls, purge)
    send      controls first, then every part due, per peer; no transaction (send)

An idle cycle is the start's read transaction alone; a busy one commits
once per message received and once to settle.

:func:`mailsync.cycle.run.run_cycle` is the spine; every stage takes the
narrow :class:`~mailsync.cycle.context.CycleContext` and writes what it hands
on into the :class:`~mailsync.cycle.report.CycleReport`. A failure is
confined to its message, its peer or its mailbox by
:func:`~mailsync.cycle.contain.contained`. Nothing here imports
:mod:`mailsync.node`: the node is a façade that builds the context.
"""
