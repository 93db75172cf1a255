"""An admin decides a ``manual`` conflict: ``conflicts resolve ID --keep host|station``.

While a manual conflict waits, each side keeps its own values of the
columns in conflict (the other side's are kept aside in the record). The
decision is taken on the host, which holds the reference copy and talks to
every station:

- ``--keep station``: the station's values (kept aside in the record) are
  written into the host's row as a local change, which travels to every
  station like any other (the station's own is already that).
- ``--keep host``: the host's row stays; the station hears the host's
  current values of the columns in conflict with the decision and writes
  them.

Either way a ``resolved`` note goes to the station (:mod:`mailsync.conflict_notes`),
which marks its records of the row resolved: both nodes converge and both
say so. A record that is not waiting (settled by policy, resolved already),
an unknown id, or a remote are refused before anything changes.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from sqlalchemy import Connection, Table, delete, insert, select, update

from mailsync import conflict_notes
from mailsync.conflicts import Conflict, list_conflicts
from mailsync.errors import ConfigError, RuleError
from mailsync.rules import OP_NAMES, effective_rules
from mailsync.store.changelog import coerce_key, key_filter
from mailsync.store.reflection import reflect
from mailsync.store.tables import changes, conflicts_table
from mailsync.wire.changeset import pack

Keep = Literal["host", "station"]


def resolve(conn: Connection, conflict_id: int, keep: Keep) -> Conflict:
    """Carry out the admin's choice for waiting conflict ``conflict_id`` (on
    the host, in ``conn``'s transaction); returns the record as it was."""
    found = list_conflicts(conn, ids=[conflict_id])
    if not found:
        raise ConfigError(
            f"no conflict {conflict_id}: nothing was changed",
            hint="`mailsync conflicts list --waiting`",
        )
    record = found[0]
    if record.state != "waiting":
        how = "resolved already" if record.state == "resolved" else f"settled by {record.policy}"
        raise ConfigError(
            f"conflict {conflict_id} is not waiting for a decision ({how}): nothing was changed",
            hint="`mailsync conflicts list --waiting`",
        )
    table = reflect(conn, record.table)
    pk = list(table.primary_key.columns)
    key = coerce_key(record.key, pk)
    where = key_filter(table, [key])
    differing = record.differing or [c for c in record.columns if c not in {p.name for p in pk}]
    # on the host, ours is the host's version and theirs the station's
    if keep == "station":
        _allowed(conn, record)
        station = (
            None if record.theirs is None else dict(zip(record.columns, record.theirs, strict=True))
        )
        if station is None:
            conn.execute(delete(table).where(where))
        elif conn.execute(select(pk[0]).where(where)).first() is None:
            conn.execute(insert(table).values({k: v for k, v in station.items() if k in table.c}))
        else:
            conn.execute(
                update(table)
                .where(where)
                .values({c: station[c] for c in differing if c in table.c})
            )
        row = None
        names = list(record.columns)
    else:
        names = [n for n in record.columns if n in table.c]
        now_row = conn.execute(select(*[table.c[n] for n in names]).where(where)).first()
        row = None if now_row is None else pack(list(now_row))
        _send_again(conn, table, where, key, now_row is not None)
    conflict_notes.queue(
        conn,
        record.peer,
        {
            "k": "resolved",
            "tbl": record.table,
            "pk": json.dumps(record.key),
            "keep": keep,
            "columns": names,
            "differing": list(differing),
            "row": row,
        },
    )
    same_row = (
        (conflicts_table.c.peer == record.peer)
        & (conflicts_table.c.tbl == record.table)
        & (conflicts_table.c.pk == json.dumps(record.key))
        & (conflicts_table.c.state == "waiting")
    )
    conn.execute(
        update(conflicts_table)
        .where(same_row)
        .values(state="resolved", kept="ours" if keep == "host" else "theirs")
    )
    return record


def _send_again(
    conn: Connection, table: Table, where: Any, key: tuple[Any, ...], exists: bool
) -> None:
    """The host's version goes to the station again with the decision: the
    row touched (an update that changes nothing is logged as a change of
    every column), or its delete logged again. Either way the next build
    for the station has something to carry, the note with it."""
    if exists:
        first = table.primary_key.columns.values()[0]
        conn.execute(update(table).where(where).values({first.name: first}))
    else:
        conn.execute(
            insert(changes).values(tbl=table.name, pk=json.dumps(list(key), default=str), op="D")
        )


def _allowed(conn: Connection, record: Conflict) -> None:
    """The station's version is written here only where its rules let it
    write that row: what it changed must be an operation it may send up."""
    op = "D" if record.theirs is None else ("I" if record.ours is None else "U")
    rule = effective_rules(conn, record.peer).get(record.table)
    if rule is None or op not in rule.up:
        raise RuleError(
            f"conflict {record.id}: {record.peer}'s rules do not send {OP_NAMES[op]}s of "
            f"{record.table} up, so its version cannot be kept: nothing was changed",
            hint="keep the host's version (`--keep host`), or change the rule first",
        )
