"""Capture from ``join``: a station's changes before its first sync travel.

A laptop that starts work right after ``mailsync join`` has no rules yet —
they come with the host's first changeset — so nothing would capture what it
changes meanwhile. At ``join`` every application table it has (with a
primary key) gets its capture triggers, and the tables are remembered
(``mailsync_meta``); the station sends nothing up while it has no rules (its
change-log cursor stays where it is: ``LinkPlan.waits_for_rules``, from
:func:`waiting`). When the rules arrive, capture is narrowed to the tables
they name, in the same transaction, and the changes logged since ``join``
are routed by those rules with the station's next changeset, once.

A row the station changed before its load that the load also brings is a
conflict like any other (:mod:`mailsync.conflicts`): the table's policy
decides (``host-wins`` by default: the host's row stays, the station's
version is kept in ``mailsync_conflicts``); a row only the station has
goes up as its insert.
"""

from __future__ import annotations

import json
from collections.abc import Collection

from sqlalchemy import Connection, delete

from mailsync import capture
from mailsync.errors import SchemaError
from mailsync.store.reflection import table_names
from mailsync.store.tables import get_meta, meta_table, set_meta

#: ``mailsync_meta`` key: the tables captured at ``join``, until the rules come
JOINED = "captured_at_join"


def capture_all(conn: Connection) -> list[str]:
    """At ``join``: capture every application table that can be (one
    without a primary key cannot be synced anyway); the tables captured."""
    done = []
    for name in table_names(conn):
        try:
            with conn.begin_nested():
                capture.ensure_capture(conn, [name])
        except SchemaError:
            continue
        done.append(name)
    set_meta(conn, JOINED, json.dumps(done))
    return done


def waiting(conn: Connection) -> bool:
    """Whether this station joined and its rules have not come yet (a
    station whose rules were all taken away later does not wait)."""
    return get_meta(conn, JOINED) is not None


def narrow(conn: Connection, synced: Collection[str]) -> list[str]:
    """The rules arrived: take capture off the tables captured at ``join``
    that they do not name (once); the tables released."""
    held = get_meta(conn, JOINED)
    if held is None:
        return []
    released = [t for t in json.loads(held) if t not in synced]
    for name in released:
        capture.drop_capture(conn, name)
    conn.execute(delete(meta_table).where(meta_table.c.key == JOINED))
    return released
