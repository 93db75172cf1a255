"""Defining and managing number ranges on the host, and their use here.

These take the caller's connection and commit with its transaction:
:mod:`mailsync.admin` wraps each in one transaction with its log line.
Changing a range is the host's business (it owns every series); anywhere
else these refuse with the :class:`~mailsync.errors.ConfigError` that says
where to go.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Connection, delete, select, update

from mailsync.dialects import dialect_for
from mailsync.errors import ConfigError, RangeError
from mailsync.ranges.model import (
    MAX_NUMBER,
    NAME,
    RangeDef,
    RangeSpec,
    RangeUsage,
    get_range,
    list_leases,
    list_ranges,
    this_node,
)
from mailsync.ranges.numformat import NumberFormat, parse_format
from mailsync.store.reflection import reflect
from mailsync.store.tables import leases, now, range_blocks, range_free, ranges_table


def _host_only(conn: Connection, what: str) -> str:
    """The host's node id; anywhere else, the error that says where to go."""
    me, is_host = this_node(conn)
    if not is_host:
        raise ConfigError(f"{what} on the host", hint="run this on the host's node")
    return me


def add_range(conn: Connection, spec: RangeSpec) -> RangeDef:
    """Define a range on the host; a bound column gets its trigger at once."""
    me = _host_only(conn, "ranges are defined")
    name, first, last, block = spec.name, spec.first, spec.last, spec.block
    threshold, max_blocks, bind = spec.threshold, spec.max_blocks, spec.bind
    if not NAME.match(name):
        raise ConfigError(f"range name {name!r}: use a-z, 0-9, - and _ (at most 64)")
    if conn.execute(select(ranges_table.c.name).where(ranges_table.c.name == name)).first():
        raise ConfigError(f"range {name} exists already", hint="`mailsync range show " + name + "`")
    if last > MAX_NUMBER:
        raise ConfigError(f"range {name}: --end {last} is beyond what a BIGINT holds")
    if first < 0 or last < first:
        raise ConfigError(f"range {name}: --start {first} and --end {last} make no range")
    if not 1 <= block <= last - first + 1:
        raise ConfigError(f"range {name}: --block must be between 1 and the range's size")
    if not 0 < threshold <= 1:
        raise ConfigError(f"range {name}: --threshold must be above 0 and at most 1")
    if max_blocks < 1:
        raise ConfigError(f"range {name}: --max-blocks must be at least 1")
    fmt = parse_format(spec.format, where=f"range {name}") if spec.format is not None else None
    target = _parse_bind(conn, name, bind, fmt, last) if bind else None
    if target is not None:
        for other in list_ranges(conn):
            if other.bind == target:
                raise ConfigError(f"{bind} is bound to range {other.name} already")
    listed = sorted(set(spec.stations)) if spec.stations else None
    conn.execute(
        ranges_table.insert().values(
            name=name,
            first=first,
            last=last,
            block=block,
            threshold=threshold,
            max_blocks=max_blocks,
            bind_table=target[0] if target else None,
            bind_column=target[1] if target else None,
            stations=json.dumps(listed) if listed else None,
            next_free=first,
            created_at=now(),
            format=spec.format,
        )
    )
    rdef = get_range(conn, name)
    if target is not None:
        dialect_for(conn).install_binding(conn, rdef, me, is_host=True)
    return rdef


def _parse_bind(
    conn: Connection, name: str, bind: str, fmt: NumberFormat | None, last: int
) -> tuple[str, str]:
    table_name, _, column = bind.partition(".")
    if not table_name or not column:
        raise ConfigError(f"range {name}: --bind takes TABLE.COLUMN, not {bind!r}")
    table = reflect(conn, table_name)
    if column not in table.c:
        raise ConfigError(f"range {name}: table {table_name} has no column {column!r}")
    col = table.c[column]
    python_type: type | None
    try:
        python_type = col.type.python_type
    except NotImplementedError:
        python_type = None
    if python_type not in (int, str):
        raise ConfigError(
            f"range {name}: {bind} is {col.type}; a number range binds an integer or text column"
        )
    if fmt is not None:
        _check_room(name, bind, col, fmt, last, python_type)
    refusal = dialect_for(conn).binding_refusal(table, col)
    if refusal is None and (col.server_default is not None or col.identity is not None):
        refusal = (
            "filled by the database (a default, SERIAL or IDENTITY); a trigger cannot draw "
            "a range number for it"
        )
    if refusal is not None:
        raise ConfigError(
            f"range {name}: {bind} is {refusal}",
            hint="draw numbers with `mailsync number next` or the Python API instead",
        )
    return table_name, column


def _check_room(
    name: str, bind: str, col: Any, fmt: NumberFormat, last: int, python_type: type | None
) -> None:
    """A formatted range binds a text column long enough for its last number."""
    if python_type is not str:
        raise ConfigError(
            f"range {name}: {bind} is {col.type}; a formatted number needs a text column",
            hint="bind an integer column without --format",
        )
    longest = len(fmt.render(last, 2000))
    length = getattr(col.type, "length", None)
    if length is not None and length < longest:
        raise ConfigError(
            f"range {name}: {bind} is {col.type}, too short for {fmt.render(last, 2000)!r} "
            f"({longest} characters)"
        )


def set_block(conn: Connection, name: str, block: int, station: str | None = None) -> None:
    """The block size of a range, or of one station's leases of it."""
    _host_only(conn, "block sizes are set")
    rdef = get_range(conn, name)
    if not 1 <= block <= rdef.last - rdef.first + 1:
        raise ConfigError(f"range {name}: the block must be between 1 and the range's size")
    if station is None:
        conn.execute(update(ranges_table).where(ranges_table.c.name == name).values(block=block))
        return
    conn.execute(
        delete(range_blocks).where(
            range_blocks.c.range_name == name, range_blocks.c.station == station
        )
    )
    conn.execute(range_blocks.insert().values(range_name=name, station=station, block=block))


def remove_range(conn: Connection, name: str) -> None:
    """Forget a range; refused while a station still holds numbers of it."""
    me = _host_only(conn, "ranges are removed")
    rdef = get_range(conn, name)
    live = [
        lease
        for lease in list_leases(conn, name)
        if lease.holder != me and lease.state in ("active", "release") and lease.next <= lease.last
    ]
    if live:
        holders = ", ".join(sorted({lease.holder for lease in live}))
        raise RangeError(
            f"range {name}: {len(live)} lease(s) still live at {holders}",
            hint=f"`mailsync range release {name} --station S`, then sync, then remove",
        )
    if rdef.bind is not None:
        dialect_for(conn).drop_binding(conn, rdef.bind[0], rdef.bind[1])
    for table in (leases, range_free, range_blocks):
        conn.execute(delete(table).where(table.c.range_name == name))
    conn.execute(delete(ranges_table).where(ranges_table.c.name == name))


def release(conn: Connection, name: str, station: str | None = None) -> int:
    """Ask a station (or, with None, every station) to give back the unused
    numbers of its leases of a range; they are free again once it confirms.
    A station may ask for a new block when it needs one; releasing every
    station also closes the range to new grants, so that it can be removed.
    Returns the number of leases asked back."""
    me = _host_only(conn, "numbers are asked back")
    get_range(conn, name)
    query = update(leases).where(
        leases.c.range_name == name, leases.c.holder != me, leases.c.state == "active"
    )
    if station is not None:
        query = query.where(leases.c.holder == station)
    else:
        conn.execute(update(ranges_table).where(ranges_table.c.name == name).values(stations="[]"))
    result = conn.execute(query.values(state="release", confirmed=False, sent_at=None))
    return int(result.rowcount)


def usage(conn: Connection) -> list[RangeUsage]:
    """Per range known here: this node's current block, whether the next one
    is held, and the numbers left."""
    me, _ = this_node(conn)
    out = []
    for rdef in list_ranges(conn):
        mine = [
            lease for lease in list_leases(conn, rdef.name) if lease.holder == me and lease.left > 0
        ]
        asked = conn.execute(
            select(ranges_table.c.asked_at).where(ranges_table.c.name == rdef.name)
        ).scalar()
        out.append(
            RangeUsage(
                rdef.name,
                mine[0] if mine else None,
                len(mine) > 1,
                sum(lease.left for lease in mine),
                asked,
            )
        )
    return out
