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

import weakref
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, Engine

from mailsync.dialects import dialect_for
from mailsync.errors import SchemaError
from mailsync.store.reflection import fingerprint, reflect
from mailsync.store.tables import changes

__all__ = ["changes", "check_capture", "drop_capture", "ensure_capture", "known_whole"]


def ensure_capture(conn: Connection, tables: Iterable[str]) -> list[str]:
    """Install or repair the triggers of ``tables``; returns those (re)installed.

    A table whose schema fingerprint (which covers its triggers) is what it
    was at the last check on this engine that found them whole is not read
    again: every cycle checks, and reading the triggers' text back cost a
    statement per table."""
    dialect = dialect_for(conn)
    checked = _checked.setdefault(conn.engine, {})
    done = []
    for name in tables:
        mark = fingerprint(conn, name)
        if mark is not None and checked.get(name) == mark:
            continue
        table = reflect(conn, name)
        if dialect.capture_installed(conn, table):
            checked[name] = mark
        else:
            dialect.install_capture(conn, table)
            checked.pop(name, None)  # the install changed the fingerprint
            done.append(name)
    return done


def known_whole(conn: Connection, tables: Iterable[str]) -> bool:
    """Whether every one of ``tables`` is as the last check on this engine
    found it whole (one fingerprint read, no write): then
    :func:`ensure_capture` has nothing to do."""
    checked = _checked.get(conn.engine, {})
    for name in tables:
        mark = fingerprint(conn, name)
        if mark is None or checked.get(name) != mark:
            return False
    return True


#: per engine, per table: the fingerprint at the last check that found the
#: capture triggers whole
_checked: weakref.WeakKeyDictionary[Engine, dict[str, Any]] = weakref.WeakKeyDictionary()


def check_capture(conn: Connection, tables: Iterable[str]) -> list[str]:
    """The tables whose triggers are missing or not as this mailsync writes
    them (a table that is gone, or lost its key, among them: ``status``
    says so rather than failing)."""
    dialect = dialect_for(conn)
    out = []
    for name in tables:
        try:
            whole = dialect.capture_installed(conn, reflect(conn, name))
        except SchemaError:
            whole = False
        if not whole:
            out.append(name)
    return out


def drop_capture(conn: Connection, table: str) -> None:
    dialect_for(conn).drop_capture(conn, table)
