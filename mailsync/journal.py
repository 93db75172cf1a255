"""The node's log: what happened, kept in the database and mirrored to logging.

Every cycle, message sent/applied/rejected and error is one row in
``mailsync_log`` (read by ``mailsync status`` and, later, ``mailsync log``)
and one record on the ``mailsync`` logger, which has only a NullHandler until
an application or the CLI configures it.
"""

from __future__ import annotations

import logging

from sqlalchemy import Connection, Engine

from mailsync.schema import log, now

logger = logging.getLogger("mailsync")
logger.addHandler(logging.NullHandler())

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class Journal:
    """Writes log rows for one node (``node`` prefixes the logging records)."""

    def __init__(self, engine: Engine, node: str) -> None:
        self._engine = engine
        self._node = node

    def write(
        self,
        level: str,
        event: str,
        message: str,
        *,
        peer: str | None = None,
        conn: Connection | None = None,
    ) -> None:
        """Record an entry, in ``conn``'s transaction when given (so it commits
        or rolls back with the work it describes), else on its own."""
        logger.log(_LEVELS[level], "%s: %s", self._node, message)
        values = {"at": now(), "level": level, "event": event, "peer": peer, "message": message}
        if conn is not None:
            conn.execute(log.insert().values(**values))
        else:
            with self._engine.begin() as own:
                own.execute(log.insert().values(**values))

    def info(self, event: str, message: str, **kw: object) -> None:
        self.write("info", event, message, **kw)  # type: ignore[arg-type]

    def warning(self, event: str, message: str, **kw: object) -> None:
        self.write("warning", event, message, **kw)  # type: ignore[arg-type]

    def error(self, event: str, message: str, **kw: object) -> None:
        self.write("error", event, message, **kw)  # type: ignore[arg-type]
