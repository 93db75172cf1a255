"""The node's log: what happened, kept in the database and mirrored to logging.

Every cycle, message sent/applied/rejected and error is one row in
``mailsync_log`` (read by ``mailsync status`` and, later, ``mailsync log``)
and one record on the ``mailsync`` logger, which has only a NullHandler until
an application or the CLI configures it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from collections.abc import Iterator
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, select
from sqlalchemy.exc import SQLAlchemyError

from mailsync.store.tables import log_table, now

#: Levels from least to most severe: ``--level warning`` shows warnings and errors.
LEVELS = ("debug", "info", "warning", "error")

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
        self._held: list[dict[str, object]] | None = None

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Hold the entries written without a transaction and write them in
        one at the end: a commit each cost a fifth of a small sync cycle.
        (Entries that describe work commit with it all the same; a process
        killed mid-cycle loses only the held ones.) Entries keep their times,
        and the log is read in time order."""
        if self._held is not None:
            yield
            return
        self._held = []
        try:
            yield
        except BaseException:
            with contextlib.suppress(SQLAlchemyError):  # do not hide what failed
                self._flush()
            raise
        else:
            self._flush()
        finally:
            self._held = None

    def drop_held(self, event: str) -> None:
        """Forget the held entries of ``event`` (a quiet cycle's own lines:
        an idle cycle writes nothing); the logger has had them already."""
        if self._held is not None:
            self._held = [e for e in self._held if e["event"] != event]

    def flush_into(self, conn: Connection) -> None:
        """Write the held entries in ``conn``'s transaction (the cycle's
        settling one) rather than in one of their own at the end."""
        held, self._held = self._held, ([] if self._held is not None else None)
        if held:
            conn.execute(log_table.insert(), held)

    def _flush(self) -> None:
        held, self._held = self._held or [], []
        if held:
            with self._engine.begin() as conn:
                conn.execute(log_table.insert(), held)

    def write(
        self,
        level: str,
        event: str,
        message: str,
        *,
        peer: str | None = None,
        seq: int | None = None,
        conn: Connection | None = None,
    ) -> None:
        """Record an entry, in ``conn``'s transaction when given (so it commits
        or rolls back with the work it describes), else on its own.

        The logging record carries the structured fields as attributes
        (``node``, ``event``, ``peer``, ``seq``): a handler (the CLI's
        progress line, a JSON formatter) reads those, never the prose."""
        logger.log(
            _LEVELS[level],
            "%s: %s",
            self._node,
            message,
            extra={"node": self._node, "event": event, "peer": peer, "seq": seq},
        )
        values = {"at": now(), "level": level, "event": event, "peer": peer, "message": message}
        if conn is not None:
            conn.execute(log_table.insert().values(**values))
        elif self._held is not None:
            self._held.append(values)
        else:
            with self._engine.begin() as own:
                own.execute(log_table.insert().values(**values))

    def info_many(self, event: str, lines: list[tuple[str, str]], *, conn: Connection) -> None:
        """One INFO entry per (peer, message), written by one executemany in
        ``conn``'s transaction (a batch of thousands of stations enrolled)."""
        at = now()
        for peer, message in lines:
            logger.info(
                "%s: %s",
                self._node,
                message,
                extra={"node": self._node, "event": event, "peer": peer, "seq": None},
            )
        if lines:
            conn.execute(
                log_table.insert(),
                [
                    {"at": at, "level": "info", "event": event, "peer": peer, "message": message}
                    for peer, message in lines
                ],
            )

    def info(self, event: str, message: str, **kw: object) -> None:
        self.write("info", event, message, **kw)  # type: ignore[arg-type]

    def warning(self, event: str, message: str, **kw: object) -> None:
        self.write("warning", event, message, **kw)  # type: ignore[arg-type]

    def error(self, event: str, message: str, **kw: object) -> None:
        self.write("error", event, message, **kw)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Entry:
    at: dt.datetime
    level: str
    event: str
    peer: str | None
    message: str


def read_log(
    engine: Engine,
    *,
    since: dt.datetime | None = None,
    peer: str | None = None,
    level: str = "debug",
    limit: int | None = None,
) -> list[Entry]:
    """The node's log, oldest first: entries at ``level`` or above, since a
    time, about one peer; ``limit`` keeps the newest."""
    query = select(log_table).where(log_table.c.level.in_(LEVELS[LEVELS.index(level) :]))
    if since is not None:
        query = query.where(log_table.c.at >= since)
    if peer is not None:
        query = query.where(log_table.c.peer == peer)
    query = query.order_by(log_table.c.at.desc(), log_table.c.id.desc())
    if limit is not None:
        query = query.limit(limit)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return [
        Entry(
            r.at if r.at.tzinfo is not None else r.at.replace(tzinfo=dt.UTC),
            r.level,
            r.event,
            r.peer,
            r.message,
        )
        for r in reversed(rows)
    ]
