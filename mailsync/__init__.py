"""mailsync: keep database tables in step between a host and remote stations
by mailing compressed changesets through ordinary mailboxes.

The library is the product; the ``mailsync`` command is a thin layer over it::

    from mailsync import Node
    with Node.open("mailsync.toml") as node:
        report = node.sync()

The names below are imported on first use: ``import mailsync.errors`` (or
any other module) does not bring in the whole engine with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mailsync.errors import MailsyncError
    from mailsync.node import CycleReport, Node, Status, init_node

__version__ = "0.1.0"

__all__ = ["CycleReport", "MailsyncError", "Node", "Status", "__version__", "init_node"]

_LAZY = {
    "CycleReport": "mailsync.node",
    "MailsyncError": "mailsync.errors",
    "Node": "mailsync.node",
    "Status": "mailsync.node",
    "init_node": "mailsync.node",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mailsync' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
