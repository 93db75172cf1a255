"""Conflicts: a row changed here and at a peer before either had the other's change.

Each changeset a peer sends names the last of our changesets it had applied
(its ack); ``mailsync_horizons`` says how far into our change log that
changeset reached. A row the peer's changeset touches and that we changed
after that horizon — ourselves, or relayed from another station — was
changed on both sides.

**Column by column.** The capture triggers log which columns an update
changed; a changeset says so per row (:mod:`mailsync.wire.rowinfo`). Only
columns both sides changed, to different values, are in conflict: the
peer's other columns are applied and ours stay (the host raises a credit
limit, a rep changes the phone number: both edits survive on both nodes).
A delete against an update, an insert, or a change whose columns are not
known (a peer of an older version, a row touched) counts as every column.

The table's policy picks the same winner on both sides, for the columns in
conflict:

- ``host-wins`` (the default) and ``remote-wins``.
- ``newest-wins``: the later value of the rule's time column
  (``newest_by``), else the later capture time — each node's own clock, so
  clock skew between nodes decides close calls, and a time column is
  trusted as it is (a station that writes a time in the future wins). A
  tie, or a time missing on either side, goes to the host.
- ``manual``: nobody wins yet. The incoming values in conflict are kept
  aside, the local row stays, and an admin decides on the host
  (:mod:`mailsync.conflict_resolve`).

**Both nodes know.** The conflict is recorded in ``mailsync_conflicts``
with both versions, and a note goes to the peer with our next changeset
(:mod:`mailsync.conflict_notes`); the peer records it unless it saw the
same conflict itself (when both changesets crossed in the mail, each side
detects it). So the side that lost learns it lost.

**Not a conflict:** a local change this link never carries (the station's
rules do not send that table or operation up). The peer's version is
applied and the overwritten local edit is logged, once per row and
changeset.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Table, delete, or_, select, update

from mailsync import conflict_notes
from mailsync import link as links_mod
from mailsync.dialects.base import column_bits
from mailsync.rules import Rule
from mailsync.store.changelog import key_filter, logged_key
from mailsync.store.tables import changes, conflicts_table, horizons
from mailsync.wire.changeset import TableDef, pack, unpack
from mailsync.wire.rowinfo import RowInfo

#: Every policy (DESIGN §9).
POLICIES = ("host-wins", "remote-wins", "newest-wins", "manual")
#: Overwritten local edits named one line each per changeset, the rest counted.
OVERWRITTEN_LINES = 20

Key = tuple[Any, ...]
#: Parks one row of the batch being resolved (a partial update that failed).
RowParker = Callable[[tuple[Any, ...], str], None]


@dataclass
class Local:
    """What this node changed of one row past the peer's horizon."""

    ops: set[str]
    #: the columns changed (None: every column)
    cols: frozenset[str] | None
    #: the latest capture time, ms since the epoch (None: unknown)
    at: int | None


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
        self.ack = ack
        self.host_side = host_side
        self.rules = rules
        self.found: dict[tuple[str, str], int] = {}
        #: log lines: local edits overwritten because this link never carries them
        self.overwritten: list[str] = []
        self._overwritten = 0
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
        self._pending: dict[str, dict[Key, Local]] = {}
        self._out_seq: int | None = None

    def pending(self, table: Table) -> dict[Key, Local]:
        """Keys of ``table`` we changed past the peer's horizon (not its own
        changes coming back), with what we changed."""
        if self.horizon is None:
            return {}
        if table.name not in self._pending:
            columns = list(table.primary_key.columns)
            bits = column_bits(table)
            rows = self.conn.execute(
                select(changes.c.pk, changes.c.op, changes.c.cols, changes.c.at).where(
                    changes.c.tbl == table.name,
                    changes.c.id > self.horizon,
                    or_(changes.c.origin.is_(None), changes.c.origin != self.peer),
                )
            )
            found: dict[Key, Local] = {}
            for pk, op, mask, at in rows:
                key = logged_key(pk, columns)
                local = found.setdefault(key, Local(set(), frozenset(), None))
                local.ops.add(op)
                if op != "U" or not mask or local.cols is None:
                    local.cols = None
                else:
                    local.cols |= {c.name for c, bit in bits if mask & bit}
                if at is not None and (local.at is None or at > local.at):
                    local.at = int(at)
            self._pending[table.name] = found
        return self._pending[table.name]

    def resolve(
        self,
        table: Table,
        tdef: TableDef,
        op: str,
        rows: list[tuple[Any, ...]],
        info: RowInfo | None = None,
        park: RowParker | None = None,
    ) -> list[tuple[Any, ...]]:
        """Settle the conflicts among ``rows`` (the peer's ``op`` batch, Python
        values; ``info``: what the peer changed of each); returns the rows to
        apply whole. A row of which only some columns apply is written here
        (those columns only), one whose local version wins is left out."""
        pending = self.pending(table)
        if not pending:
            return rows
        names = list(tdef.column_names)
        if info is not None and (len(info.cols) != len(rows) or info.op != op):
            info = None  # not this batch's: every column, no time
        # deletes carry the key alone, in key order
        key_at = list(range(len(tdef.pk))) if op == "D" else [names.index(k) for k in tdef.pk]
        hits: dict[Key, tuple[int, tuple[Any, ...]]] = {}
        for i, row in enumerate(rows):
            key = tuple(row[j] for j in key_at)
            if key in pending:
                hits[key] = (i, row)
        if not hits:
            return rows
        rule = self.rules.get(table.name)
        carried = "" if rule is None else (rule.down if self.host_side else rule.up)
        ours = self._local(table, names, list(hits))
        left_out: set[int] = set()
        for key, (i, row) in hits.items():
            local = pending[key]
            if not local.ops <= set(carried):
                self._overwrote(table.name, key, local, carried)
                continue
            theirs_cols = None if info is None or op != "U" else info.changed(i, names)
            theirs_at = None if info is None else info.at[i]
            outcome = self._settle(
                table,
                tdef,
                op,
                key,
                ours.get(key),
                None if op == "D" else row,
                local,
                theirs_cols,
                theirs_at,
                rule,
            )
            if outcome is None:
                continue  # applies whole
            left_out.add(id(row))
            if outcome:  # some of its columns
                self._partial(table, key, {c: row[names.index(c)] for c in outcome}, row, park)
        if not left_out:
            return rows
        return [row for row in rows if id(row) not in left_out]

    def _settle(
        self,
        table: Table,
        tdef: TableDef,
        op: str,
        key: Key,
        mine: tuple[Any, ...] | None,
        theirs: tuple[Any, ...] | None,
        local: Local,
        theirs_cols: frozenset[str] | None,
        theirs_at: int | None,
        rule: Rule | None,
    ) -> frozenset[str] | None:
        """One row changed on both sides: record a conflict where there is
        one; returns None (apply the peer's row whole) or the columns of it
        to write (empty: none)."""
        names = list(tdef.column_names)
        everything = frozenset(names) - set(tdef.pk)
        if mine is None and theirs is None:
            return frozenset()  # both deleted it
        if mine is None or theirs is None:
            differing = sorted(everything)  # a delete against a change: the whole row
            theirs_only: frozenset[str] = frozenset()
        else:
            mine_v = dict(zip(names, mine, strict=True))
            theirs_v = dict(zip(names, theirs, strict=True))
            t_cols = everything if theirs_cols is None else theirs_cols & everything
            l_cols = everything if local.cols is None else local.cols & everything
            differing = sorted(c for c in t_cols & l_cols if mine_v[c] != theirs_v[c])
            theirs_only = t_cols - l_cols
        policy = rule.conflict if rule is not None and rule.conflict in POLICIES else "host-wins"
        if not differing:
            if mine is None or theirs is None:
                return frozenset()
            # no column in conflict: theirs where only they changed, ours elsewhere
            return _whole_or(theirs_only, everything)
        theirs_win = self._theirs_win(policy, rule, names, mine, theirs, local.at, theirs_at)
        state = "waiting" if policy == "manual" else "settled"
        self._record(table.name, tdef, op, key, mine, theirs, policy, theirs_win, differing, state)
        if mine is None or theirs is None:
            return None if theirs_win else frozenset()
        return _whole_or(theirs_only | set(differing) if theirs_win else theirs_only, everything)

    def _theirs_win(
        self,
        policy: str,
        rule: Rule | None,
        names: list[str],
        mine: tuple[Any, ...] | None,
        theirs: tuple[Any, ...] | None,
        mine_at: int | None,
        theirs_at: int | None,
    ) -> bool:
        """Does the peer's version win? The same answer on both sides."""
        if policy == "manual":
            return False
        if policy == "newest-wins":
            column = None if rule is None else rule.newest_by
            if column is not None and column in names and mine is not None and theirs is not None:
                at = names.index(column)
                newer = _later(theirs[at], mine[at])
            else:
                newer = _later(theirs_at, mine_at)
            if newer is not None:
                return newer
            policy = "host-wins"  # a tie, or a time missing: the host's
        return (policy == "host-wins") != self.host_side

    def _record(
        self,
        table: str,
        tdef: TableDef,
        op: str,
        key: Key,
        mine: tuple[Any, ...] | None,
        theirs: tuple[Any, ...] | None,
        policy: str,
        theirs_win: bool,
        differing: list[str],
        state: str,
    ) -> None:
        if self._out_seq is None:
            self._out_seq = links_mod.one(self.conn, self.peer).out_seq
        kept = "theirs" if theirs_win else "ours"
        record = conflict_notes.Record(
            table=table,
            pk=json.dumps(list(key), default=str),
            op=op,
            policy=policy,
            kept=kept,
            columns=list(tdef.column_names),
            ours=None if mine is None else pack(list(mine)),
            theirs=None if theirs is None else pack(list(theirs)),
            differing=differing,
            state=state,
        )
        conflict_notes.record_here(
            self.conn, self.peer, self.seq, record, mine_from=self.ack, mine_to=self._out_seq + 1
        )
        counted = (table, "waiting" if state == "waiting" else kept)
        self.found[counted] = self.found.get(counted, 0) + 1

    def _partial(
        self,
        table: Table,
        key: Key,
        values: dict[str, Any],
        row: tuple[Any, ...],
        park: RowParker | None,
    ) -> None:
        """Write some of the peer's columns into our row (a savepoint: a
        value the database refuses parks the row)."""
        try:
            with self.conn.begin_nested():
                self.conn.execute(update(table).where(key_filter(table, [key])).values(values))
        except Exception as exc:
            if park is None:
                raise
            park(row, str(exc).splitlines()[0])

    def _overwrote(self, table: str, key: Key, local: Local, carried: str) -> None:
        self._overwritten += 1
        if self._overwritten > OVERWRITTEN_LINES:
            return
        way = "down to stations" if self.host_side else "up to the host"
        ops = "/".join(sorted(local.ops - set(carried)))
        self.overwritten.append(
            f"table {table} row {json.dumps(list(key), default=str)}: the local edit was "
            f"overwritten by {self.peer}'s version (the rules do not send {ops} of {table} "
            f"{way})"
        )

    def summary(self) -> list[str]:
        """One line per table and outcome, for the log."""
        lines = [
            f"{n} conflict(s) in {table} with {self.peer}: "
            + {
                "theirs": "their version kept, ours saved",
                "ours": "ours kept, theirs saved",
                "waiting": "ours kept, theirs waiting for an admin (`mailsync conflicts resolve`)",
            }[kept]
            for (table, kept), n in sorted(self.found.items())
        ]
        return lines

    def overwritten_lines(self) -> list[str]:
        """The overwritten local edits, a line each (and how many more)."""
        more = self._overwritten - OVERWRITTEN_LINES
        return self.overwritten + ([f"... and {more} more local edit(s)"] if more > 0 else [])

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


def _whole_or(cols: frozenset[str], everything: frozenset[str]) -> frozenset[str] | None:
    """None (the row applies whole) when ``cols`` are all its columns."""
    return None if cols >= everything else cols


def _later(theirs: Any, mine: Any) -> bool | None:
    """Is ``theirs`` later than ``mine``? None: equal, missing or not comparable."""
    if theirs is None or mine is None:
        return None
    try:
        if theirs == mine:
            return None
        return bool(theirs > mine)
    except TypeError:  # a naive and an aware time, or values of two kinds
        return None


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
    #: settled (by policy), waiting (manual: for an admin), resolved (by one)
    state: str = "settled"
    #: here (this node found it) or peer (the peer's note told us)
    source: str = "here"
    #: the columns both sides changed to different values
    differing: list[str] | None = None


def list_conflicts(
    conn: Connection,
    *,
    table: str | None = None,
    limit: int | None = None,
    ids: Collection[int] | None = None,
    waiting: bool = False,
) -> list[Conflict]:
    """Recorded conflicts, newest first (of a table, these ids, the newest
    ``limit``, those waiting for an admin)."""
    query = select(conflicts_table).order_by(conflicts_table.c.id.desc())
    if ids is not None:
        query = query.where(conflicts_table.c.id.in_(list(ids)))
    if table is not None:
        query = query.where(conflicts_table.c.tbl == table)
    if waiting:
        query = query.where(conflicts_table.c.state == "waiting")
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
            r.state,
            r.source,
            None if r.differing is None else json.loads(r.differing),
        )
        for r in conn.execute(query)
    ]


def drop_conflicts(conn: Connection, ids: Sequence[int] | None = None) -> int:
    """Forget recorded conflicts (all, or these ids) once dealt with."""
    query = delete(conflicts_table)
    if ids is not None:
        query = query.where(conflicts_table.c.id.in_(list(ids)))
    return int(conn.execute(query).rowcount)
