"""What a number range is: a series, its leases, and how to read them.

Every other part of :mod:`mailsync.ranges` and the dialects (which write a
bound column's trigger from a :class:`RangeDef`) read these; so this module
imports nothing but the errors and the table definitions.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, select

from mailsync.errors import RangeError
from mailsync.ranges.numformat import NumberFormat, parse_format
from mailsync.store.tables import get_meta, leases, ranges_table

#: Range names: like node ids, they appear in triggers and messages.
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")

DEFAULT_THRESHOLD = 0.5
DEFAULT_MAX_BLOCKS = 2


#: The highest number a range may reach: what a BIGINT column holds.
MAX_NUMBER = 2**63 - 1


@dataclass(frozen=True)
class RangeSpec:
    """A range as the host's admin asks for it; ``add_range`` checks it.
    ``bind`` is ``TABLE.COLUMN``; ``stations`` None means every station."""

    name: str
    first: int
    last: int
    block: int
    threshold: float = DEFAULT_THRESHOLD
    max_blocks: int = DEFAULT_MAX_BLOCKS
    bind: str | None = None
    stations: tuple[str, ...] | None = None
    format: str | None = None  # e.g. 'R-{year}-{n:06}': see ranges/numformat.py


@dataclass(frozen=True)
class RangeDef:
    """A number series and how it is leased."""

    name: str
    first: int
    last: int
    block: int
    threshold: float
    max_blocks: int
    bind: tuple[str, str] | None = None
    stations: tuple[str, ...] | None = None
    next_free: int = 0
    format: str | None = None

    @property
    def bind_text(self) -> str | None:
        return f"{self.bind[0]}.{self.bind[1]}" if self.bind else None

    @property
    def number_format(self) -> NumberFormat | None:
        """The parsed format; None for plain numbers."""
        if self.format is None:
            return None
        return parse_format(self.format, where=f"number range {self.name}")

    def text_of(self, n: int, year: int) -> int | str:
        """Number ``n`` as the application stores it: itself, or its text."""
        fmt = self.number_format
        return n if fmt is None else fmt.render(n, year)

    def serves(self, station: str) -> bool:
        return self.stations is None or station in self.stations


@dataclass(frozen=True)
class Lease:
    id: int
    range: str
    holder: str
    first: int
    last: int
    next: int
    state: str
    granted_at: dt.datetime
    confirmed: bool

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    @property
    def used(self) -> int:
        return self.next - self.first

    @property
    def left(self) -> int:
        return max(0, self.last - self.next + 1) if self.state == "active" else 0


@dataclass(frozen=True)
class RangeUsage:
    """What ``status`` shows of one range on one node."""

    name: str
    current: Lease | None
    next_held: bool
    left: int
    asked_at: dt.datetime | None


def as_range(row: Any) -> RangeDef:
    """A ``mailsync_ranges`` row as a :class:`RangeDef`."""
    bind = (row.bind_table, row.bind_column) if row.bind_table else None
    stations = tuple(json.loads(row.stations)) if row.stations else None
    return RangeDef(
        row.name,
        row.first,
        row.last,
        row.block,
        row.threshold,
        row.max_blocks,
        bind,
        stations,
        row.next_free,
        row.format,
    )


def as_lease(row: Any) -> Lease:
    """A ``mailsync_leases`` row as a :class:`Lease`."""
    return Lease(
        row.id,
        row.range_name,
        row.holder,
        row.first,
        row.last,
        row.next,
        row.state,
        row.granted_at,
        bool(row.confirmed),
    )


def this_node(conn: Connection) -> tuple[str, bool]:
    """This database's node id and whether it is the host: leases are
    held by node id, and only the host may lease itself a block.

    Kept on the driver connection once known: a database's owner never
    changes (``init_node`` refuses another), and a cycle asks often."""
    known: tuple[str, bool] | None = conn.info.get(_THIS_NODE)
    if known is not None:
        return known
    node, role = get_meta(conn, "node_id"), get_meta(conn, "role")
    if node is None:
        raise RangeError("this database belongs to no mailsync node", hint="run `mailsync init`")
    conn.info[_THIS_NODE] = node, role == "host"
    return node, role == "host"


_THIS_NODE = "mailsync.this_node"


def get_range(conn: Connection, name: str) -> RangeDef:
    row = conn.execute(select(ranges_table).where(ranges_table.c.name == name)).first()
    if row is None:
        raise RangeError(f"no number range {name!r} here", hint="`mailsync range list`")
    return as_range(row)


def list_ranges(conn: Connection) -> list[RangeDef]:
    return [as_range(r) for r in conn.execute(select(ranges_table).order_by(ranges_table.c.name))]


def list_leases(conn: Connection, name: str | None = None) -> list[Lease]:
    query = (
        select(leases)
        .where(leases.c.range_name != "")  # not the id floor (dialects' lease_ids_above)
        .order_by(leases.c.range_name, leases.c.holder, leases.c.first)
    )
    if name is not None:
        query = query.where(leases.c.range_name == name)
    return [as_lease(r) for r in conn.execute(query)]
