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

import hashlib
import json
import sys
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine

from mailsync.dialects import dialect_for
from mailsync.errors import SchemaError
from mailsync.store.reflection import fingerprint, reflect
from mailsync.store.tables import changes, get_meta, set_meta

__all__ = [
    "changes",
    "check_capture",
    "drop_capture",
    "ensure_capture",
    "known_whole",
    "store_marks",
]

#: ``mailsync_meta`` key: per table, the fingerprint at which its triggers
#: were last found whole (so that a new process trusts it too)
MARKS_KEY = "capture_whole"


def ensure_capture(conn: Connection, tables: Iterable[str]) -> list[str]:
    """Install or repair the triggers of ``tables``; returns those (re)installed.

    A table whose schema fingerprint (which covers its triggers) is what it
    was at the last check on this engine that found them whole is not read
    again: every cycle checks, and reading the triggers' text back cost a
    statement per table."""
    dialect = dialect_for(conn)
    checked = _marks(conn)
    done = []
    for name in tables:
        mark = _plain(fingerprint(conn, name))
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
    checked = _marks(conn)
    for name in tables:
        mark = _plain(fingerprint(conn, name))
        if mark is None or checked.get(name) != mark:
            return False
    return True


def store_marks(conn: Connection) -> bool:
    """Keep this engine's marks in the database where they moved since they
    were read or stored (one write, in the caller's transaction): a process
    started later — every ``mailsync sync`` from a laptop's timer — then
    trusts them instead of reading every table's triggers back (tens of
    milliseconds each start). Whether it wrote."""
    checked = _marks(conn)
    if checked == _stored.get(conn.engine):
        return False
    record = {"by": _writer(conn), "marks": checked}
    set_meta(conn, MARKS_KEY, json.dumps(record, sort_keys=True))
    _stored[conn.engine] = dict(checked)
    return True


def _marks(conn: Connection) -> dict[str, Any]:
    """The engine's marks, read from the database the first time (one
    statement per process and engine)."""
    checked = _checked.get(conn.engine)
    if checked is None:
        try:
            record = json.loads(get_meta(conn, MARKS_KEY) or "{}")
        except ValueError:
            record = {}  # damaged: every table is checked again
        marks = record.get("marks") if isinstance(record, dict) else None
        # marks another mailsync left (an upgrade may word its triggers
        # otherwise) or a damaged record: every table is checked again
        ours = isinstance(marks, dict) and record.get("by") == _writer(conn)
        checked = marks if ours and isinstance(marks, dict) else {}
        _checked[conn.engine] = checked
        _stored[conn.engine] = dict(checked)
    return checked


def _writer(conn: Connection) -> str:
    """Who writes the triggers the marks vouch for: a digest of the code
    that words them (the dialect's module and the shared base), so that a
    mailsync whose triggers read differently — an upgrade, with no schema
    change to move the fingerprint — checks every table again."""
    module = type(dialect_for(conn)).__module__
    token = _writers.get(module)
    if token is None:
        digest = hashlib.sha256()
        for name in (module, "mailsync.dialects.base"):
            source = getattr(sys.modules.get(name), "__file__", None)
            digest.update(Path(source).read_bytes() if source else name.encode())
        token = _writers[module] = digest.hexdigest()[:16]
    return token


def _plain(mark: Any) -> Any:
    """A fingerprint as it reads back from JSON (PostgreSQL's is a tuple)."""
    return list(mark) if isinstance(mark, tuple) else mark


#: per engine, per table: the fingerprint at the last check that found the
#: capture triggers whole, and what of it the database holds
_checked: weakref.WeakKeyDictionary[Engine, dict[str, Any]] = weakref.WeakKeyDictionary()
_stored: weakref.WeakKeyDictionary[Engine, dict[str, Any]] = weakref.WeakKeyDictionary()
#: per dialect module, the digest :func:`_writer` computed
_writers: dict[str, str] = {}


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
