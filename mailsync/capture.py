"""Change capture: database triggers append every row operation to a log.

Each synced table gets three triggers (insert, update, delete) that append
(table, primary key as JSON, op, origin) to ``mailsync_changes``. The origin
is NULL for local changes and the peer's id for changes applied from that
peer, so a change is relayed to other stations but never echoed back. Row
values are not logged: they are read when the changeset is built, so ten
updates of one row travel once. Trigger DDL lives per database in
:mod:`mailsync.dialects`.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import Connection

from mailsync.dialects import dialect_for
from mailsync.store.reflection import reflect
from mailsync.store.tables import changes

__all__ = ["changes", "check_capture", "drop_capture", "ensure_capture"]


def ensure_capture(conn: Connection, tables: Iterable[str]) -> list[str]:
    """Install or repair the triggers of ``tables``; returns those (re)installed."""
    dialect = dialect_for(conn)
    done = []
    for name in tables:
        table = reflect(conn, name)
        if not dialect.capture_installed(conn, table):
            dialect.install_capture(conn, table)
            done.append(name)
    return done


def check_capture(conn: Connection, tables: Iterable[str]) -> list[str]:
    """The tables whose triggers are missing or not as this mailsync writes them."""
    dialect = dialect_for(conn)
    return [n for n in tables if not dialect.capture_installed(conn, reflect(conn, n))]


def drop_capture(conn: Connection, table: str) -> None:
    dialect_for(conn).drop_capture(conn, table)
