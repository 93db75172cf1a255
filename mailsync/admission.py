"""Admission: the rules, checked row by row, on everything a peer sends (DESIGN §12).

A peer's signature proves who sent a changeset, not that its rows keep to
the rules; so before a row is written, and (for a row filter) once it is
written in a savepoint, :class:`Gate` asks:

- **row filter, before and after** (on the host, for what a station sends
  up): the row as it is here must lie inside the station's filter for the
  station to update or delete it, and the row as the station's change leaves
  it must still lie inside. The filter is any SQL predicate over the table's
  columns, so it is evaluated by the database, on the table itself: the
  before-image with a SELECT, the after-image inside the savepoint the row
  is applied in, which is rolled back when it falls outside.
- **bound numbers**: a number the row brings into a column bound to a
  number range (a new row, or a changed number) must be the sender's to
  issue. On the host: inside one of the sending station's leases of that
  range (in whatever state: a number drawn before a lease was released or
  retired stays the station's). On a station: not inside one of its own
  leases — the host's numbers, and other stations' relayed by it, lie
  elsewhere; one of ours coming back new would clash with our next draw.
- **insert-only rules**: an insert the rules allow without updates never
  changes an existing row. The same row again is nothing to do; a different
  one is parked by the caller with :data:`CLASH`, so an admin decides.

A refused row is counted per table and reason (``refuse``) and nothing of
it is written; a full load (reload) is the host's reference copy and is not
gated here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Table, case, select
from sqlalchemy.exc import SQLAlchemyError

from mailsync.ranges.model import list_ranges
from mailsync.ranges.numformat import NumberFormat, number_in
from mailsync.rules import Direction, Rule, filter_predicate
from mailsync.store.changelog import key_filter
from mailsync.store.tables import leases, links
from mailsync.wire.changeset import TableDef

Row = tuple[Any, ...]
Key = tuple[Any, ...]
#: (table, reason, rows): count refused rows; the reason completes "refused: …"
Refuse = Callable[[str, str, int], None]
#: rows just written in a savepoint → those of them now outside the scope
Check = Callable[[list[Row]], list[Row]]

#: The error of a parked insert whose key exists here under an insert-only rule.
CLASH = (
    "insert of an existing key: the rules allow inserts only, so the row here was "
    "kept (`errors retry` overwrites it with these values, `errors drop` keeps it)"
)

#: The same, as the log says it once per changeset and table.
CLASH_REASON = "inserts of an existing key under an insert-only rule (the rows here were kept)"

#: Keys looked up at a time.
CHUNK = 500


@dataclass(frozen=True)
class _Bound:
    """A column of the table bound to a number range, and whose numbers the
    sender may bring: inside ``spans`` (host) or outside them (station)."""

    column: str
    range: str
    spans: tuple[tuple[int, int], ...]
    inside: bool
    fmt: NumberFormat | None = None

    def admits(self, value: Any) -> bool:
        number = number_in(value, self.fmt)
        if number is None:
            return not self.inside  # not a number: never one of the sender's leases
        hit = any(first <= number <= last for first, last in self.spans)
        return hit if self.inside else not hit


class Gate:
    """The per-row rule checks of one changeset from ``peer``, in its apply
    transaction. ``direction`` is the way the changeset travelled."""

    def __init__(
        self,
        conn: Connection,
        *,
        me: str,
        peer: str,
        direction: Direction,
        rules: dict[str, Rule],
        refuse: Refuse,
    ) -> None:
        self.conn = conn
        self.me = me
        self.peer = peer
        self.direction = direction
        self.rules = rules
        self.refuse = refuse
        self._bounds: dict[str, list[_Bound]] = {}
        self.address: str | None = None

    # ------------------------------------------------------------ the checks

    def before(self, table: Table, tdef: TableDef, op: str, rows: list[Row]) -> list[Row]:
        """The rows of the peer's ``op`` batch that may be applied: the row
        here inside the sender's filter, bound numbers the sender's own."""
        flag = self._flag(table.name)
        if flag is not None and rows:
            outside = set(self._keys_where(table, [self._key(tdef, op, r) for r in rows], flag))
            if outside:
                rows = self._drop(
                    table.name,
                    rows,
                    lambda r: self._key(tdef, op, r) in outside,
                    f"the row here lies outside {self.peer}'s row filter",
                )
        if op != "D":
            for bound in self._bound(table, tdef):
                rows = self._numbers(table, tdef, bound, rows)
        return rows

    def needed(self, table: Table, tdef: TableDef, op: str) -> bool:
        """Does :meth:`before` or :meth:`after` look at the rows of this
        batch at all (a row filter, a bound number)? If not, they need not
        be turned into Python values for it."""
        if self._flag(table.name) is not None:
            return True
        return op != "D" and bool(self._bound(table, tdef))

    def after(self, table: Table, tdef: TableDef, op: str) -> Check | None:
        """For a batch just written in a savepoint: its rows that the change
        leaves outside the sender's filter (None: no filter to keep)."""
        flag = self._flag(table.name)
        if flag is None or op == "D":
            return None

        def outside(rows: list[Row]) -> list[Row]:
            found = set(self._keys_where(table, [self._key(tdef, op, r) for r in rows], flag))
            return [r for r in rows if self._key(tdef, op, r) in found]

        return outside

    def refused_after(self, table: str, rows: int) -> None:
        self.refuse(table, f"the new values lie outside {self.peer}'s row filter", rows)

    def clashes(self, table: Table, tdef: TableDef, rows: list[Row]) -> tuple[list[Row], list[Row]]:
        """Under an insert-only rule: (rows to insert, rows whose key exists
        here with other values). The same row again is dropped: it changes
        nothing."""
        names = list(tdef.column_names)
        here = self._local(table, names, [self._key(tdef, "I", r) for r in rows])
        if not here:
            return rows, []
        fresh, clashing = [], []
        for row in rows:
            mine = here.get(self._key(tdef, "I", row))
            if mine is None:
                fresh.append(row)
            elif mine != tuple(row):
                clashing.append(row)
        return fresh, clashing

    # -------------------------------------------------------------- helpers

    def _flag(self, name: str) -> Any:
        """1 for a row inside the sender's row filter, else 0 (a NULL counts
        as outside, as on the way down); None when no filter bounds it."""
        rule = self.rules.get(name)
        if self.direction != "up" or rule is None or not rule.row_filter:
            return None
        email = self._address() if ":email" in rule.row_filter else ""
        return case((filter_predicate(rule.row_filter, self.peer, email), 1), else_=0)

    def _address(self) -> str:
        """The sender's mailbox address (a filter may name it as ``:email``)."""
        if self.address is None:
            found = self.conn.execute(select(links.c.address).where(links.c.peer == self.peer))
            self.address = str(found.scalar() or "")
        return self.address

    @staticmethod
    def _key(tdef: TableDef, op: str, row: Row) -> Key:
        if op == "D":  # deletes carry the key alone, in key order
            return tuple(row)
        names = tdef.column_names
        return tuple(row[names.index(k)] for k in tdef.pk)

    def _keys_where(self, table: Table, keys: list[Key], flag: Any) -> Iterator[Key]:
        """Those of ``keys`` whose row here is outside (``flag`` = 0)."""
        pk = list(table.primary_key.columns)

        def query(chunk: list[Key]) -> Any:
            return select(*pk).where(key_filter(table, chunk), flag == 0)

        # a filter that fails on its own fails the changeset, loudly: it
        # must never pass for "no row outside"
        probe = select(*pk).where(flag == 0).limit(1)
        for chunk in _chunks(keys):
            for found in self._lookup(query, chunk, probe):
                yield tuple(found)

    def _local(self, table: Table, names: list[str], keys: list[Key]) -> dict[Key, Row]:
        pk = [c.name for c in table.primary_key.columns]
        at = [names.index(k) for k in pk]

        def query(chunk: list[Key]) -> Any:
            return select(*[table.c[n] for n in names]).where(key_filter(table, chunk))

        found: dict[Key, Row] = {}
        for chunk in _chunks(keys):
            for r in self._lookup(query, chunk):
                values = tuple(r)
                found[tuple(values[i] for i in at)] = values
        return found

    def _lookup(
        self, query: Callable[[list[Key]], Any], chunk: list[Key], probe: Any = None
    ) -> list[Any]:
        """Run ``query`` for ``chunk`` in a savepoint. A key this database
        cannot hold (an integer beyond 64 bits, a value of the wrong type)
        fails the lookup: then key by key, and one that fails alone has no
        row here — applying it fails too, and parks it."""
        try:
            with self.conn.begin_nested():
                return list(self.conn.execute(query(chunk)))
        except (SQLAlchemyError, OverflowError):  # sqlite3: an int beyond 64 bits
            if probe is not None:
                self.conn.execute(probe)  # raises when the query itself is at fault
            if len(chunk) == 1:
                return []
        return [r for key in chunk for r in self._lookup(query, [key])]

    def _drop(self, table: str, rows: list[Row], bad: Callable[[Row], bool], why: str) -> list[Row]:
        kept = [r for r in rows if not bad(r)]
        if len(kept) < len(rows):
            self.refuse(table, why, len(rows) - len(kept))
        return kept

    def _bound(self, table: Table, tdef: TableDef) -> list[_Bound]:
        if table.name not in self._bounds:
            inside = self.direction == "up"  # host: the sender's leases; station: not ours
            holder = self.peer if inside else self.me
            found = []
            for rdef in list_ranges(self.conn):
                if rdef.bind is None or rdef.bind[0] != table.name:
                    continue
                if rdef.bind[1] not in tdef.column_names:
                    continue
                spans = self.conn.execute(
                    select(leases.c.first, leases.c.last).where(
                        leases.c.range_name == rdef.name, leases.c.holder == holder
                    )
                ).all()
                found.append(
                    _Bound(
                        rdef.bind[1],
                        rdef.name,
                        tuple((a, b) for a, b in spans),
                        inside,
                        rdef.number_format,
                    )
                )
            self._bounds[table.name] = found
        return self._bounds[table.name]

    def _numbers(self, table: Table, tdef: TableDef, bound: _Bound, rows: list[Row]) -> list[Row]:
        """Drop the rows that bring a number into ``bound`` the sender may
        not: a number is brought when the row here lacks it (a new row, or
        a changed number); NULL brings none."""
        at = tdef.column_names.index(bound.column)
        suspect = [r for r in rows if r[at] is not None and not bound.admits(r[at])]
        if not suspect:
            return rows
        here = self._local(
            table,
            [*tdef.pk, bound.column],
            [self._key(tdef, "I", r) for r in suspect],
        )
        width = len(tdef.pk)
        held = {k: v[width] for k, v in here.items()}
        bad = {
            id(r)
            for r in suspect
            if number_in(held.get(self._key(tdef, "I", r)), bound.fmt)
            != number_in(r[at], bound.fmt)
            or self._key(tdef, "I", r) not in held
        }
        whose = (
            f"not from {self.peer}'s leases"
            if bound.inside
            else "from this station's own leases, not the host's"
        )
        return self._drop(
            table.name,
            rows,
            lambda r: id(r) in bad,
            f"{bound.column} holds a number {whose} of range {bound.range}",
        )


def _chunks(keys: Sequence[Key]) -> Iterator[list[Key]]:
    for start in range(0, len(keys), CHUNK):
        yield list(keys[start : start + CHUNK])
