"""mailsync: keep database tables in step between a host and remote stations
by mailing compressed changesets through ordinary mailboxes.

The library is the product; the ``mailsync`` command is a thin layer over it::

    from mailsync import Node
    with Node.open("mailsync.toml") as node:
        report = node.sync()
"""

from mailsync.errors import MailsyncError
from mailsync.node import CycleReport, Node, Status, init_node

__version__ = "0.1.0"

__all__ = ["CycleReport", "MailsyncError", "Node", "Status", "__version__", "init_node"]
