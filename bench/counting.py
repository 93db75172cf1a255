"""Counting what a node asks of its database, by SQLAlchemy's own events.

:class:`SqlCounter` listens on an engine: every cursor execute
(``before_cursor_execute``, so ``exec_driver_sql`` and ``executemany``
count once each) and every transaction begin, commit and rollback. On
SQLite it also traces the driver (``set_trace_callback``) for the
``COMMIT`` / ``ROLLBACK`` SQLite actually ran, so a commit made past
SQLAlchemy would still be seen. Nothing is estimated.
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, event

_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE")
_BEGIN = re.compile(r"^\s*BEGIN\b", re.IGNORECASE)


def shape(sql: str) -> str:
    """A statement's text with its parameters and IN-lists folded."""
    s = re.sub(r"\s+", " ", sql).strip()
    s = re.sub(r"%\(\w+\)s|\$\d+|:\w+", "?", s)
    s = re.sub(r"\bsa_savepoint_\d+", "sa_savepoint_N", s)
    s = re.sub(r"\(\?(?:, \?)+\)", "(?, …)", s)
    s = re.sub(r"\b\d+\b", "N", s)
    return s


@dataclass
class Counts:
    """What one stretch of work (a cycle) asked of the database."""

    statements: int = 0
    writes: int = 0
    transactions: int = 0
    commits: int = 0
    rollbacks: int = 0
    driver_commits: int = 0
    shapes: collections.Counter[str] = field(default_factory=collections.Counter)

    def __add__(self, other: Counts) -> Counts:
        return Counts(
            self.statements + other.statements,
            self.writes + other.writes,
            self.transactions + other.transactions,
            self.commits + other.commits,
            self.rollbacks + other.rollbacks,
            self.driver_commits + other.driver_commits,
            self.shapes + other.shapes,
        )


class SqlCounter:
    """Counts on ``engine`` while :meth:`counting` is open.

    A statement is a cursor execute other than the ``BEGIN`` that opens a
    SQLite transaction (PostgreSQL's driver begins without one): those are
    counted as transactions.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.now: Counts | None = None
        event.listen(engine, "before_cursor_execute", self._statement)
        event.listen(engine, "begin", self._begin)
        event.listen(engine, "commit", self._commit)
        event.listen(engine, "rollback", self._rollback)
        if engine.dialect.name == "sqlite":
            event.listen(engine.pool, "checkout", self._trace)

    def _statement(self, _conn: Any, _cursor: Any, sql: str, *_args: Any) -> None:
        if self.now is None or _BEGIN.match(sql):
            return
        self.now.statements += 1
        self.now.shapes[shape(sql)] += 1
        if sql.lstrip().upper().startswith(_WRITES):
            self.now.writes += 1

    def _begin(self, _conn: Any) -> None:
        if self.now is not None:
            self.now.transactions += 1

    def _commit(self, _conn: Any) -> None:
        if self.now is not None:
            self.now.commits += 1

    def _rollback(self, _conn: Any) -> None:
        if self.now is not None:
            self.now.rollbacks += 1

    def _trace(self, dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
        dbapi_conn.set_trace_callback(self._driver)

    def _driver(self, sql: str) -> None:
        if self.now is not None and sql.strip().upper() == "COMMIT":
            self.now.driver_commits += 1

    def start(self) -> None:
        self.now = Counts()

    def stop(self) -> Counts:
        done, self.now = self.now, None
        assert done is not None
        return done
