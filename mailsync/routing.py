"""Routing once: the change log and the changed rows read once per cycle for
every link that shares them (issue 21).

A host cycle in which one change goes to a thousand stations used to read,
per link, the change log past the link's cursor (table by table) and the
changed rows under the station's row filter. :class:`Routes` lives for one
settling transaction (:func:`mailsync.cycle.build.build`) and is handed to
every build in it (:func:`mailsync.build.build_for_link`):

- the change log of one table past one cursor up to the horizon is read
  once (:class:`Window`, raw: id, key, operation, columns, time, origin)
  and coalesced per link in Python exactly as
  :func:`mailsync.store.changelog.first_changes` does in SQL — a peer's own
  changes left out for that peer (``not_from``), only local ones on a
  remote's way up;
- the rows of the changed keys are read once per table, in storage form;
  a link without a row filter takes them all; a link whose filter is a
  plain equality of a text column with ``:station`` or ``:email``
  (:func:`equality`) takes its bucket: one read joins the changed rows with
  ``mailsync_links`` on that column, so the database's own equality (its
  collation, its affinity rules) decides, as it does for the bound
  parameter; any other filter is evaluated per link as before
  (:meth:`Routes.found` answers None).

Memory stays bounded: a window is kept only for a cursor at least two links
share, and only while every window and row set of the cycle together hold
at most ``budget`` entries (a multiple of ``batch_rows``); beyond that a
link reads for itself, as it always did. Nothing here writes.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from sqlalchemy import CHAR, Connection, String, Table, select
from sqlalchemy.exc import SQLAlchemyError

from mailsync.dialects.base import SHARED_BIT
from mailsync.dialects.bulk import mark
from mailsync.linkplan import LinkPlan
from mailsync.storage import key_typers, raw_select_columns
from mailsync.store.changelog import coerce_key, key_filter, stored_key_filter
from mailsync.store.tables import links

#: How many batches of changes and rows (``batch_rows`` each) one cycle
#: keeps for the links that share them; beyond, each link reads its own.
SHARED_BATCHES = 4

#: A first change as :func:`mailsync.store.changelog.first_changes` yields
#: it: key as logged, first operation, changed columns, capture time.
First = tuple[str, str, int | None, int | None]

_IDENT = r'(?:[A-Za-z_][A-Za-z0-9_]*|"(?:[^"]|"")+")'
_EQUALITY = re.compile(
    rf"^\s*\(?\s*(?:(?P<col>{_IDENT})\s*=\s*:(?P<p1>station|email)"
    rf"|:(?P<p2>station|email)\s*=\s*(?P<col2>{_IDENT}))\s*\)?\s*$"
)


def equality(row_filter: str, table: Table, dialect: str) -> tuple[str, str] | None:
    """(column, parameter) where ``row_filter`` is nothing but
    ``column = :station`` / ``:email`` (either way round) over a text column
    of ``table`` that is not fixed-width (whose equality with a station's
    text is the database's plain text equality); None otherwise. The
    column is named as ``dialect`` resolves the name (SQLite: any case;
    PostgreSQL: unquoted folds to lower case, quoted is exact)."""
    m = _EQUALITY.match(row_filter)
    if m is None:
        return None
    word = m.group("col") or m.group("col2")
    param = m.group("p1") or m.group("p2")
    quoted = word.startswith('"')
    name = word[1:-1].replace('""', '"') if quoted else word
    if dialect == "sqlite":
        found = [c for c in table.columns if c.name.lower() == name.lower()]
    else:
        found = [c for c in table.columns if c.name == (name if quoted else name.lower())]
    column = found[0] if len(found) == 1 else None
    if column is None or not isinstance(column.type, String) or isinstance(column.type, CHAR):
        return None
    return column.name, param


@dataclass
class _Group:
    """One key's changes in the window, in log order."""

    pk: str
    #: (id, op, cols, at, origin)
    changes: list[tuple[int, str, int | None, int | None, str | None]]
    origins: set[str | None] = field(default_factory=set)


class Window:
    """The change log of one table after one cursor up to the horizon."""

    def __init__(self, groups: list[_Group], width: int) -> None:
        self.groups = groups
        self.mask = (1 << min(width, SHARED_BIT + 1)) - 1
        self.origins = {o for g in groups for o in g.origins}
        self.size = sum(len(g.changes) for g in groups)
        self._everyone: list[First] | None = None
        #: a logged key → its parsed key (see :meth:`Routes.key`)
        self.keys: dict[str, tuple[Any, ...]] = {}

    def first_changes(self, not_from: str | None) -> list[First]:
        """What :func:`~mailsync.store.changelog.first_changes` yields for a
        link: ``not_from`` None — only local changes (a remote's way up);
        else every change but that peer's own."""
        if not_from is None:
            return self._coalesced(lambda origin: origin is None)
        if not_from not in self.origins:
            if self._everyone is None:
                self._everyone = self._coalesced(lambda origin: True)
            return self._everyone
        return self._coalesced(lambda origin: origin != not_from)

    def _coalesced(self, keep: Any) -> list[First]:
        out: list[tuple[int, First]] = []
        for group in self.groups:
            kept = [c for c in group.changes if keep(c[4])]
            if not kept:
                continue
            first = kept[0]
            cols: int | None = 0
            for c in kept:
                if not c[2]:
                    cols = None
                    break
                cols = (cols or 0) | (c[2] & self.mask)
            ats = [c[3] for c in kept if c[3] is not None]
            out.append((first[0], (group.pk, first[1], cols, max(ats) if ats else None)))
        out.sort(key=lambda item: item[0])
        return [first for _, first in out]


class Routes:
    """One settling transaction's shared reads, for every build in it."""

    def __init__(self, horizon: int, budget: int, shared: Iterable[int]) -> None:
        self.horizon = horizon
        self.budget = budget
        #: the cursors at least two links stand at
        self.shared = set(shared)
        self.windows: dict[tuple[str, int], Window | None] = {}
        #: per table: key → the row as stored (None: no row)
        self.rows: dict[str, dict[tuple[Any, ...], tuple[Any, ...] | None]] = {}
        #: per (table, column, parameter): the value → keys whose row matches
        #: (None: the database would not compare so, every link asks itself)
        self.buckets: dict[tuple[str, str, str], dict[str, set[tuple[Any, ...]]] | None] = {}
        #: per (table, column, parameter): the keys whose matches are read
        self.bucketed: dict[tuple[str, str, str], set[tuple[Any, ...]]] = {}
        self.held = 0

    @staticmethod
    def for_links(horizon: int, batch_rows: int, cursors: Sequence[int]) -> Routes:
        """The routes of one build stage: ``cursors``, the links' to build."""
        counted = Counter(cursors)
        shared = [c for c, n in counted.items() if n > 1]
        return Routes(horizon, SHARED_BATCHES * batch_rows, shared)

    def window(
        self, conn: Connection, table: str, cursor: int, horizon: int, width: int
    ) -> Window | None:
        """The change log of ``table`` past ``cursor`` up to ``horizon``,
        read once; None where this link must read for itself (a cursor it
        alone stands at, another horizon, more than the budget left)."""
        if cursor not in self.shared or horizon != self.horizon or cursor >= horizon:
            return None
        key = (table, cursor)
        if key not in self.windows:
            self.windows[key] = self._read(conn, table, cursor, width)
        return self.windows[key]

    def _read(self, conn: Connection, table: str, cursor: int, width: int) -> Window | None:
        room = self.budget - self.held
        if room <= 0:
            return None
        m = mark(conn)
        sql = (
            "SELECT id, pk, op, cols, at, origin FROM mailsync_changes WHERE tbl = "
            f"{m} AND id > {m} AND id <= {m} ORDER BY id LIMIT {room + 1}"
        )
        result = conn.exec_driver_sql(sql, (table, cursor, self.horizon)).all()
        if len(result) > room:
            return None  # too many to keep: each link streams its own
        groups: dict[str, _Group] = {}
        for id_, pk, op, cols, at, origin in result:
            pk = str(pk)
            group = groups.get(pk)
            if group is None:
                group = groups[pk] = _Group(pk, [])
            group.changes.append(
                (
                    int(id_),
                    str(op),
                    None if cols is None else int(cols),
                    None if at is None else int(at),
                    None if origin is None else str(origin),
                )
            )
            group.origins.add(None if origin is None else str(origin))
        window = Window(list(groups.values()), width)
        self.held += window.size
        return window

    def found(
        self, conn: Connection, table: Table, keys: list[tuple[Any, ...]], plan: LinkPlan
    ) -> dict[tuple[Any, ...], tuple[Any, ...]] | None:
        """The rows of ``keys`` as ``plan``'s build reads them (storage
        form, an in-scope flag last), for a link without a row filter or
        with an equality one; None where the link must query for itself."""
        row_filter = plan.row_filter(table.name)
        eq = equality(row_filter, table, conn.dialect.name) if row_filter else None
        if row_filter and eq is None:
            return None  # a filter only the database can apply, per station
        rows = self._rows(conn, table, keys)
        if rows is None:
            return None
        if eq is None:
            return {k: (*r, 1) for k in keys if (r := rows.get(k)) is not None}
        buckets = self._buckets(conn, table, eq, keys)
        if buckets is None:
            return None
        mine = buckets.get(plan.peer if eq[1] == "station" else plan.address, set())
        return {k: (*r, int(k in mine)) for k in keys if (r := rows.get(k)) is not None}

    def _typed(self, conn: Connection, table: Table) -> tuple[list[int], list[Any], Any]:
        columns = list(table.columns)
        at = [columns.index(c) for c in table.primary_key.columns]
        stored = conn.dialect.name == "sqlite"
        typers = [None] * len(at) if stored else key_typers(table, conn.dialect)
        return at, typers, stored_key_filter if stored else key_filter

    def _rows(
        self, conn: Connection, table: Table, keys: list[tuple[Any, ...]]
    ) -> dict[tuple[Any, ...], tuple[Any, ...] | None] | None:
        known = self.rows.setdefault(table.name, {})
        missing = [k for k in keys if k not in known]
        if missing:
            if self.held + len(missing) > self.budget:
                return None
            at, typers, where = self._typed(conn, table)
            query = select(*raw_select_columns(table, conn.dialect))
            for row in conn.execute(query.where(where(table, missing))):
                known[_key_of(row, at, typers)] = tuple(row)
            for k in missing:
                known.setdefault(k, None)
            self.held += len(missing)
        return known

    def _buckets(
        self, conn: Connection, table: Table, eq: tuple[str, str], keys: list[tuple[Any, ...]]
    ) -> dict[str, set[tuple[Any, ...]]] | None:
        """Which of ``keys`` each station's value of the filter's parameter
        matches: one join of the rows with ``mailsync_links`` on the
        column (the database's equality, as for a bound parameter)."""
        name = (table.name, eq[0], eq[1])
        if name in self.buckets and self.buckets[name] is None:
            return None
        have = self.buckets.setdefault(name, {})
        assert have is not None
        done = self.bucketed.setdefault(name, set())
        missing = [k for k in keys if k not in done]
        if not missing:
            return have
        _, typers, where = self._typed(conn, table)
        value = links.c.peer if eq[1] == "station" else links.c.address
        raw = {c.name: c for c in raw_select_columns(table, conn.dialect)}
        pk = [raw[c.name] for c in table.primary_key.columns]
        query = (
            select(*pk, value)
            .select_from(table.join(links, table.c[eq[0]] == value))
            .where(where(table, missing))
        )
        try:
            with conn.begin_nested():
                matched = conn.execute(query).all()
        except SQLAlchemyError:
            self.buckets[name] = None  # the database would not compare so: per link
            return None
        for row in matched:
            key = tuple(
                v if f is None or v is None else f(v) for v, f in zip(row[:-1], typers, strict=True)
            )
            have.setdefault(str(row[-1]), set()).add(key)
        done.update(missing)
        return have


def parse_key(window: Window | None, pk: str, table: Table, stored: bool) -> tuple[Any, ...]:
    """A key as the change log holds it, as the build looks it up: as stored
    (``stored``: SQLite's log holds the stored values), else in the columns'
    Python types; parsed once for every link where a ``window`` is shared."""
    parsed = window.keys.get(pk) if window is not None else None
    if parsed is None:
        values = json.loads(pk) if stored else json.loads(pk, parse_float=Decimal)
        parsed = tuple(values) if stored else coerce_key(values, list(table.primary_key.columns))
        if window is not None:
            window.keys[pk] = parsed
    return parsed


def _key_of(row: Any, at: list[int], typers: list[Any]) -> tuple[Any, ...]:
    """A raw row's key in the values the change log's keys are read in."""
    return tuple(
        row[i] if f is None or row[i] is None else f(row[i])
        for i, f in zip(at, typers, strict=True)
    )
