"""Conflicts: a row changed here and at a peer before either had the other's change.

Each changeset a peer sends names the last of our changesets it had applied
(its ack); ``mailsync_horizons`` says how far into our change log that
changeset reached. A row the peer's changeset touches and that we changed
after that horizon — ourselves, or relayed from another station — was
changed on both sides: a conflict. Both nodes see it, each from its side,
and the table's policy picks the same winner on both:

- ``host-wins`` (the default): the host keeps its version and skips the
  station's; the station takes the host's, which is on its way or already
  there.
- ``remote-wins``: the other way round.

The version that lost is kept in ``mailsync_conflicts`` with the one that
won, so nothing is silently lost; ``mailsync conflicts list`` shows them.
Without this, the two sides would each apply the other's version and stay
different until the row changed again.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Table, delete, or_, select

from mailsync.rules import Rule
from mailsync.store.changelog import key_filter, logged_key
from mailsync.store.tables import changes, conflicts_table, horizons, now
from mailsync.wire.changeset import TableDef, pack, unpack

#: The policies built so far (DESIGN §9 also names newest-wins and manual).
POLICIES = ("host-wins", "remote-wins")

Key = tuple[Any, ...]


class Detector:
    """Conflict tests for one changeset from ``peer``, in its apply transaction."""

    def __init__(
        self,
        conn: Connection,
        *,
        peer: str,
        seq: int,
        ack: int,
        host_side: bool,
        rules: dict[str, Rule],
    ) -> None:
        self.conn = conn
        self.peer = peer
        self.seq = seq
        self.host_side = host_side
        self.rules = rules
        self.found: dict[tuple[str, str], int] = {}
        if ack == 0:
            self.horizon: int | None = 0  # it had none of ours: all our changes are news
        else:
            mine = horizons.c.peer == peer
            held = conn.execute(
                select(horizons.c.horizon)
                .where(mine, horizons.c.seq <= ack)
                .order_by(horizons.c.seq.desc())
                .limit(1)
            ).scalar()
            if held is None:
                # a changeset the peer built before a later ack of its own
                # let us forget this horizon: test against what is left
                held = conn.execute(
                    select(horizons.c.horizon).where(mine).order_by(horizons.c.seq).limit(1)
                ).scalar()
            # none at all (built before horizons were recorded): no test
            self.horizon = None if held is None else int(held)
        # the peer's later changesets name this ack or a later one
        conn.execute(delete(horizons).where(horizons.c.peer == peer, horizons.c.seq < ack))
        self._pending: dict[str, set[Key]] = {}

    def pending(self, table: Table) -> set[Key]:
        """Keys of ``table`` we changed past the peer's horizon (not its own
        changes coming back)."""
        if self.horizon is None:
            return set()
        if table.name not in self._pending:
            columns = list(table.primary_key.columns)
            rows = self.conn.execute(
                select(changes.c.pk)
                .where(
                    changes.c.tbl == table.name,
                    changes.c.id > self.horizon,
                    or_(changes.c.origin.is_(None), changes.c.origin != self.peer),
                )
                .distinct()
            ).scalars()
            self._pending[table.name] = {logged_key(pk, columns) for pk in rows}
        return self._pending[table.name]

    def resolve(
        self, table: Table, tdef: TableDef, op: str, rows: list[tuple[Any, ...]]
    ) -> list[tuple[Any, ...]]:
        """Record the conflicts among ``rows`` (the peer's ``op`` batch);
        returns the rows to apply — without those whose local version wins."""
        pending = self.pending(table)
        if not pending:
            return rows
        names = list(tdef.column_names)
        # deletes carry the key alone, in key order
        key_at = list(range(len(tdef.pk))) if op == "D" else [names.index(k) for k in tdef.pk]
        hits = {tuple(row[i] for i in key_at): row for row in rows}
        hits = {k: r for k, r in hits.items() if k in pending}
        if not hits:
            return rows
        ours = self._local(table, names, list(hits))
        rule = self.rules.get(table.name)
        policy = rule.conflict if rule is not None and rule.conflict in POLICIES else "host-wins"
        theirs_win = (policy == "host-wins") != self.host_side
        lost: set[Key] = set()
        for key, row in hits.items():
            mine = ours.get(key)
            theirs = None if op == "D" else tuple(row)
            if mine == theirs:
                continue  # the same edit on both sides, or both deleted it
            self.conn.execute(
                conflicts_table.insert().values(
                    at=now(),
                    peer=self.peer,
                    seq=self.seq,
                    tbl=table.name,
                    pk=json.dumps(list(key), default=str),
                    op=op,
                    policy=policy,
                    kept="theirs" if theirs_win else "ours",
                    columns=json.dumps(names),
                    ours=None if mine is None else pack(list(mine)),
                    theirs=None if theirs is None else pack(list(theirs)),
                )
            )
            counted = (table.name, "theirs" if theirs_win else "ours")
            self.found[counted] = self.found.get(counted, 0) + 1
            if not theirs_win:
                lost.add(key)
        if not lost:
            return rows
        return [row for row in rows if tuple(row[i] for i in key_at) not in lost]

    def _local(self, table: Table, names: list[str], keys: list[Key]) -> dict[Key, Key]:
        pk = [c.name for c in table.primary_key.columns]
        found: dict[Key, Key] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            query = select(*[table.c[n] for n in names]).where(key_filter(table, chunk))
            for row in self.conn.execute(query):
                values = tuple(row)
                found[tuple(values[names.index(k)] for k in pk)] = values
        return found

    def summary(self) -> list[str]:
        """One line per table and outcome, for the log."""
        return [
            f"{n} conflict(s) in {table} with {self.peer}: "
            + ("their version kept, ours saved" if kept == "theirs" else "ours kept, theirs saved")
            for (table, kept), n in sorted(self.found.items())
        ]


@dataclass(frozen=True)
class Conflict:
    id: int
    at: Any
    peer: str
    seq: int
    table: str
    key: list[Any]
    op: str
    policy: str
    kept: str
    columns: list[str]
    ours: list[Any] | None
    theirs: list[Any] | None


def list_conflicts(
    conn: Connection,
    *,
    table: str | None = None,
    limit: int | None = None,
    ids: Collection[int] | None = None,
) -> list[Conflict]:
    """Recorded conflicts, newest first (of a table, these ids, the newest ``limit``)."""
    query = select(conflicts_table).order_by(conflicts_table.c.id.desc())
    if ids is not None:
        query = query.where(conflicts_table.c.id.in_(list(ids)))
    if table is not None:
        query = query.where(conflicts_table.c.tbl == table)
    if limit is not None:
        query = query.limit(limit)
    return [
        Conflict(
            r.id,
            r.at,
            r.peer,
            r.seq,
            r.tbl,
            json.loads(r.pk),
            r.op,
            r.policy,
            r.kept,
            json.loads(r.columns),
            None if r.ours is None else unpack(r.ours),
            None if r.theirs is None else unpack(r.theirs),
        )
        for r in conn.execute(query)
    ]


def drop_conflicts(conn: Connection, ids: Sequence[int] | None = None) -> int:
    """Forget recorded conflicts (all, or these ids) once dealt with."""
    query = delete(conflicts_table)
    if ids is not None:
        query = query.where(conflicts_table.c.id.in_(list(ids)))
    return int(conn.execute(query).rowcount)
