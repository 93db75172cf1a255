"""Number ranges: the host leases blocks of a number series to stations.

Field staff create customers and invoices offline; their numbers must be
unique company-wide and stay in one tidy series (DESIGN §8). The host owns
each series (``mailsync_ranges``) and carves it upwards into blocks; every
block is a *lease* (``mailsync_leases``) held by one node — the host's own
included, so the host draws outside every station's lease. A node draws
numbers only from its own active leases, one transaction per number, so a
number is never issued twice, whatever crashes or resends happen.

The wire (unsequenced control records, so they never wait behind a large
changeset; lost ones are sent again):

* host → station ``ranges``: ``{"grant": [lease…], "release": [id…]}`` —
  a lease carries its range's definition and the host's view of ``next``;
  grants go again until the station confirms them.
* station → host ``ranges``: ``{"leases": [[id, next, state]…], "want":
  [name…]}`` — what it holds and uses, and the ranges whose current block's
  unused share fell under the threshold with no next block held.

A lease the station gave back (``range release``) has its unused tail
returned to the host's free list only once the station confirms it stopped
drawing from it. A station that went back to an older backup retires its
leases (their unused rest is never issued again) and gets fresh ones.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, delete, func, insert, select, update

from mailsync.dialects import dialect_for
from mailsync.errors import ConfigError, RangeError
from mailsync.store.engine import open_engine
from mailsync.store.reflection import reflect
from mailsync.store.tables import (
    get_meta,
    leases,
    links,
    now,
    range_blocks,
    range_free,
    ranges_table,
)

#: Range names: like node ids, they appear in triggers and messages.
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")

DEFAULT_THRESHOLD = 0.5
DEFAULT_MAX_BLOCKS = 2


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

    @property
    def bind_text(self) -> str | None:
        return f"{self.bind[0]}.{self.bind[1]}" if self.bind else None

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


def _def(row: Any) -> RangeDef:
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
    )


def _lease(row: Any) -> Lease:
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


def _me(conn: Connection) -> tuple[str, bool]:
    node, role = get_meta(conn, "node_id"), get_meta(conn, "role")
    if node is None:
        raise RangeError("this database belongs to no mailsync node", hint="run `mailsync init`")
    return node, role == "host"


# ------------------------------------------------------------ administration


def _host_only(conn: Connection, what: str) -> str:
    """The host's node id; anywhere else, the error that says where to go."""
    me, is_host = _me(conn)
    if not is_host:
        raise ConfigError(f"{what} on the host", hint="run this on the host's node")
    return me


def add_range(
    conn: Connection,
    name: str,
    first: int,
    last: int,
    block: int,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    max_blocks: int = DEFAULT_MAX_BLOCKS,
    bind: str | None = None,
    stations: Iterable[str] | None = None,
) -> RangeDef:
    """Define a range on the host; a bound column gets its trigger at once."""
    me = _host_only(conn, "ranges are defined")
    if not _NAME.match(name):
        raise ConfigError(f"range name {name!r}: use a-z, 0-9, - and _ (at most 64)")
    if conn.execute(select(ranges_table.c.name).where(ranges_table.c.name == name)).first():
        raise ConfigError(f"range {name} exists already", hint="`mailsync range show " + name + "`")
    if first < 0 or last < first:
        raise ConfigError(f"range {name}: --start {first} and --end {last} make no range")
    if not 1 <= block <= last - first + 1:
        raise ConfigError(f"range {name}: --block must be between 1 and the range's size")
    if not 0 < threshold <= 1:
        raise ConfigError(f"range {name}: --threshold must be above 0 and at most 1")
    if max_blocks < 1:
        raise ConfigError(f"range {name}: --max-blocks must be at least 1")
    target = _parse_bind(conn, name, bind) if bind else None
    if target is not None:
        for other in list_ranges(conn):
            if other.bind == target:
                raise ConfigError(f"{bind} is bound to range {other.name} already")
    listed = sorted(set(stations)) if stations else None
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
        )
    )
    rdef = get_range(conn, name)
    if target is not None:
        dialect_for(conn).install_binding(conn, rdef, me, is_host=True)
    return rdef


def _parse_bind(conn: Connection, name: str, bind: str) -> tuple[str, str]:
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
    rowid_alias = (
        conn.dialect.name == "sqlite"
        and col.primary_key
        and len(table.primary_key.columns) == 1
        and str(col.type).upper() == "INTEGER"
    )
    if rowid_alias or col.server_default is not None or col.identity is not None:
        what = (
            "the table's INTEGER PRIMARY KEY (SQLite's rowid)"
            if rowid_alias
            else "filled by the database (a default, SERIAL or IDENTITY)"
        )
        raise ConfigError(
            f"range {name}: {bind} is {what}; a trigger cannot draw a range number for it",
            hint="draw numbers with `mailsync number next` or the Python API instead",
        )
    if conn.dialect.name == "sqlite" and not col.nullable:
        raise ConfigError(
            f"range {name}: {bind} is NOT NULL; on SQLite a bound column must allow NULL "
            "(the number is filled in just after the insert)",
            hint="draw numbers with `mailsync number next` or the Python API instead",
        )
    return table_name, column


def get_range(conn: Connection, name: str) -> RangeDef:
    row = conn.execute(select(ranges_table).where(ranges_table.c.name == name)).first()
    if row is None:
        raise RangeError(f"no number range {name!r} here", hint="`mailsync range list`")
    return _def(row)


def list_ranges(conn: Connection) -> list[RangeDef]:
    return [_def(r) for r in conn.execute(select(ranges_table).order_by(ranges_table.c.name))]


def list_leases(conn: Connection, name: str | None = None) -> list[Lease]:
    query = select(leases).order_by(leases.c.range_name, leases.c.holder, leases.c.first)
    if name is not None:
        query = query.where(leases.c.range_name == name)
    return [_lease(r) for r in conn.execute(query)]


def block_for(conn: Connection, rdef: RangeDef, station: str) -> int:
    own = conn.execute(
        select(range_blocks.c.block).where(
            range_blocks.c.range_name == rdef.name, range_blocks.c.station == station
        )
    ).scalar()
    return int(own) if own is not None else rdef.block


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


# ---------------------------------------------------------------- allocation


def _allocate(conn: Connection, rdef: RangeDef, size: int) -> tuple[int, int] | None:
    """A block of up to ``size`` numbers no lease covers: given-back numbers
    first (the series stays tidy), then the untouched rest of the range."""
    free = conn.execute(
        select(range_free)
        .where(range_free.c.range_name == rdef.name)
        .order_by(range_free.c.first)
        .limit(1)
        .with_for_update()
    ).first()
    if free is not None:
        last = min(free.last, free.first + size - 1)
        conn.execute(
            delete(range_free).where(
                range_free.c.range_name == rdef.name, range_free.c.first == free.first
            )
        )
        if last < free.last:
            conn.execute(
                range_free.insert().values(range_name=rdef.name, first=last + 1, last=free.last)
            )
        return free.first, last
    start = conn.execute(
        select(ranges_table.c.next_free).where(ranges_table.c.name == rdef.name).with_for_update()
    ).scalar_one()
    if start > rdef.last:
        return None
    last = min(rdef.last, start + size - 1)
    conn.execute(
        update(ranges_table).where(ranges_table.c.name == rdef.name).values(next_free=last + 1)
    )
    return int(start), int(last)


def grant(
    conn: Connection, rdef: RangeDef, holder: str, *, confirmed: bool = False
) -> Lease | None:
    """Lease the next block of ``rdef`` to ``holder``; None when the range is used up."""
    span = _allocate(conn, rdef, block_for(conn, rdef, holder))
    if span is None:
        return None
    result = conn.execute(
        insert(leases).values(
            range_name=rdef.name,
            holder=holder,
            first=span[0],
            last=span[1],
            next=span[0],
            state="active",
            granted_at=now(),
            confirmed=confirmed,
        )
    )
    lease_id = result.inserted_primary_key[0] if result.inserted_primary_key else None
    row = conn.execute(select(leases).where(leases.c.id == lease_id)).one()
    return _lease(row)


# ------------------------------------------------------------------- drawing


def draw(conn: Connection, name: str) -> int:
    """Issue the next number of range ``name`` on this node (in ``conn``'s
    transaction). The host leases itself a new block when it has none left;
    a station that has none left gets a :class:`RangeError` saying why."""
    me, is_host = _me(conn)
    rdef = get_range(conn, name)
    for _ in range(3):
        usable = (
            select(leases.c.id)
            .where(
                leases.c.range_name == name,
                leases.c.holder == me,
                leases.c.state == "active",
                leases.c.next <= leases.c.last,
            )
            .order_by(leases.c.first)
            .limit(1)
            .scalar_subquery()
        )
        issued = conn.execute(
            update(leases)
            .where(
                leases.c.id == usable, leases.c.state == "active", leases.c.next <= leases.c.last
            )
            .values(next=leases.c.next + 1)
            .returning(leases.c.next)
        ).scalar()
        if issued is not None:
            return int(issued) - 1
        # another session took the lease's last number, or retired it: try
        # the next usable lease; only the host can make a new one
        if conn.execute(select(usable)).scalar() is not None:
            continue
        if not is_host or grant(conn, rdef, me, confirmed=True) is None:
            break
    raise _dry(conn, rdef, me, is_host)


def _dry(conn: Connection, rdef: RangeDef, me: str, is_host: bool) -> RangeError:
    if is_host:
        return RangeError(
            f"number range {rdef.name} ({rdef.first}-{rdef.last}) is used up",
            hint=f"define a new range, or widen it: `mailsync range show {rdef.name}`",
        )
    contact = conn.execute(select(links.c.peer, links.c.last_contact)).first()
    if contact is None or contact.last_contact is None:
        when = "it has not heard from the host yet"
    else:
        seen = contact.last_contact
        seen = seen if seen.tzinfo is not None else seen.replace(tzinfo=dt.UTC)
        days = (now() - seen).days
        ago = "today" if days == 0 else f"{days} day(s) ago"
        when = f"it last heard from {contact.peer} at {seen:%Y-%m-%d %H:%M} UTC, {ago}"
    return RangeError(
        f"number range {rdef.name}: no numbers left on {me} ({when})",
        hint="run `mailsync sync` when you are online: the next block is asked for and "
        "granted with it; if this happens often, ask for a larger block "
        f"(`mailsync range set-block {rdef.name} N --station {me}` on the host)",
    )


def next_number(database: Engine | str, name: str) -> int:
    """Draw one number of range ``name`` for an application, committed at once.

    ``database`` is the node's database (an engine or a SQLAlchemy URL).
    """
    engine = open_engine(database) if isinstance(database, str) else database
    try:
        with engine.begin() as conn:
            return draw(conn, name)
    finally:
        if isinstance(database, str):
            engine.dispose()


def usage(conn: Connection) -> list[RangeUsage]:
    """Per range known here: this node's current block, whether the next one
    is held, and the numbers left."""
    me, _ = _me(conn)
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


# --------------------------------------------------------------- the wire


def _lease_wire(rdef: RangeDef, lease: Lease) -> dict[str, Any]:
    return {
        "id": lease.id,
        "range": rdef.name,
        "start": rdef.first,
        "end": rdef.last,
        "block": rdef.block,
        "threshold": rdef.threshold,
        "max_blocks": rdef.max_blocks,
        "bind": rdef.bind_text,
        "first": lease.first,
        "last": lease.last,
        "next": lease.next,
    }


def host_outgoing(conn: Connection, station: str, resend_after: dt.timedelta) -> dict[str, Any]:
    """What the host must tell a station now: its first block of every range
    that serves it (with the initial load), grants it has not confirmed, and
    leases asked back. Marks them sent."""
    for rdef in list_ranges(conn):
        if rdef.serves(station):
            held = conn.execute(
                select(func.count())
                .select_from(leases)
                .where(
                    leases.c.range_name == rdef.name,
                    leases.c.holder == station,
                    leases.c.state.in_(["active", "release"]),
                )
            ).scalar()
            if not held:
                grant(conn, rdef, station)
    stale = now() - resend_after
    due = conn.execute(
        select(leases).where(
            leases.c.holder == station,
            leases.c.confirmed.is_(False),
            leases.c.state.in_(["active", "release"]),
            (leases.c.sent_at.is_(None)) | (leases.c.sent_at <= stale),
        )
    ).all()
    defs = {r.name: r for r in list_ranges(conn)}
    out: dict[str, Any] = {}
    grants = [_lease_wire(defs[r.range_name], _lease(r)) for r in due if r.state == "active"]
    released = [r.id for r in due if r.state == "release"]
    if grants:
        out["grant"] = grants
    if released:
        out["release"] = released
    if due:
        conn.execute(
            update(leases).where(leases.c.id.in_([r.id for r in due])).values(sent_at=now())
        )
    return out


def host_incoming(conn: Connection, station: str, payload: Any) -> list[str]:
    """A station's report: its leases' use and state, and the ranges it wants
    a block of. Returns what was done, for the log."""
    if not isinstance(payload, dict):
        return []
    done: list[str] = []
    reported: dict[int, tuple[int, str]] = {}
    for item in payload.get("leases", []):
        if isinstance(item, list) and len(item) == 3 and isinstance(item[0], int):
            reported[item[0]] = (int(item[1]), str(item[2]))
    for row in conn.execute(select(leases).where(leases.c.holder == station)).all():
        lease = _lease(row)
        if lease.id not in reported:
            if lease.confirmed and lease.state in ("active", "release"):
                # it held this lease and no longer knows it: it went back to
                # a backup from before the grant, and may have used any of it
                conn.execute(update(leases).where(leases.c.id == lease.id).values(state="retired"))
                done.append(f"lease {lease.first}-{lease.last} of {lease.range} retired")
            continue
        used, state = reported[lease.id]
        used = max(lease.next, min(used, lease.last + 1))
        values: dict[str, Any] = {"next": used, "confirmed": True}
        if state == "released" and lease.state in ("active", "release"):
            values.update(state="released", last=used - 1)
            if used <= lease.last:
                conn.execute(
                    range_free.insert().values(range_name=lease.range, first=used, last=lease.last)
                )
            done.append(f"{station} gave back {lease.last - used + 1} number(s) of {lease.range}")
        elif state == "retired" and lease.state != "retired":
            values["state"] = "retired"
            done.append(f"lease {lease.first}-{lease.last} of {lease.range} retired")
        elif lease.state == "release":
            values["confirmed"] = False  # still to be given back
        conn.execute(update(leases).where(leases.c.id == lease.id).values(**values))
    for name in payload.get("want", []):
        wanted = conn.execute(select(ranges_table).where(ranges_table.c.name == str(name))).first()
        if wanted is None or not _def(wanted).serves(station):
            continue
        rdef = _def(wanted)
        unused = conn.execute(
            select(func.count())
            .select_from(leases)
            .where(
                leases.c.range_name == rdef.name,
                leases.c.holder == station,
                leases.c.state == "active",
                leases.c.next == leases.c.first,
            )
        ).scalar()
        if (unused or 0) >= rdef.max_blocks:
            done.append(
                f"{station} asked for another block of {rdef.name} but holds {unused} unused: "
                "refused"
            )
            continue
        granted = grant(conn, rdef, station)
        if granted is None:
            done.append(f"{station} asked for a block of {rdef.name}, which is used up")
        else:
            done.append(f"granted {rdef.name} {granted.first}-{granted.last} to {station}")
    return done


def station_incoming(conn: Connection, payload: Any) -> list[str]:
    """The host's grants and release requests, applied on a station."""
    if not isinstance(payload, dict):
        return []
    me, _ = _me(conn)
    done = []
    for g in payload.get("grant", []):
        if not isinstance(g, dict):
            continue
        name = str(g["range"])
        bind = str(g["bind"]) if g.get("bind") else None
        table, _, column = bind.partition(".") if bind else ("", "", "")
        values = {
            "first": int(g["start"]),
            "last": int(g["end"]),
            "block": int(g["block"]),
            "threshold": float(g["threshold"]),
            "max_blocks": int(g["max_blocks"]),
            "bind_table": table or None,
            "bind_column": column or None,
        }
        if conn.execute(select(ranges_table.c.name).where(ranges_table.c.name == name)).first():
            conn.execute(update(ranges_table).where(ranges_table.c.name == name).values(**values))
        else:
            conn.execute(
                ranges_table.insert().values(name=name, next_free=0, created_at=now(), **values)
            )
        rdef = get_range(conn, name)
        if rdef.bind is not None and conn.dialect.has_table(conn, rdef.bind[0]):
            dialect_for(conn).install_binding(conn, rdef, me, is_host=False)
        row = conn.execute(select(leases).where(leases.c.id == int(g["id"]))).first()
        if row is None:
            conn.execute(
                leases.insert().values(
                    id=int(g["id"]),
                    range_name=name,
                    holder=me,
                    first=int(g["first"]),
                    last=int(g["last"]),
                    next=int(g["next"]),
                    state="active",
                    granted_at=now(),
                    confirmed=False,
                )
            )
            conn.execute(
                update(ranges_table).where(ranges_table.c.name == name).values(asked_at=None)
            )
            done.append(f"granted {name} {g['first']}-{g['last']}")
        else:
            conn.execute(
                update(leases)
                .where(leases.c.id == row.id)
                .values(next=max(row.next, int(g["next"])), confirmed=False)
            )
    for lease_id in payload.get("release", []):
        row = conn.execute(select(leases).where(leases.c.id == int(lease_id))).first()
        if row is not None and row.state == "active":
            conn.execute(
                update(leases)
                .where(leases.c.id == row.id)
                .values(state="released", last=row.next - 1, confirmed=False)
            )
            done.append(f"gave back {row.last - row.next + 1} number(s) of {row.range_name}")
        elif row is not None:
            conn.execute(update(leases).where(leases.c.id == row.id).values(confirmed=False))
    return done


def station_outgoing(
    conn: Connection, ask_again: dt.timedelta
) -> tuple[dict[str, Any] | None, bool]:
    """The station's report, and whether it must go now (a grant or release
    to confirm, or a block to ask for that was not asked for lately)."""
    me, _ = _me(conn)
    rows = conn.execute(select(leases).where(leases.c.holder == me)).all()
    if not rows and not list_ranges(conn):
        return None, False
    unconfirmed = any(not r.confirmed for r in rows)
    want = []
    stale = now() - ask_again
    for rdef in list_ranges(conn):
        mine = sorted(
            (_lease(r) for r in rows if r.range_name == rdef.name and r.state == "active"),
            key=lambda lease: lease.first,
        )
        usable = [lease for lease in mine if lease.left > 0]
        current = usable[0] if usable else None
        spare = len(usable) > 1
        low = current is None or current.left < rdef.threshold * current.size
        if low and not spare:
            asked = conn.execute(
                select(ranges_table.c.asked_at).where(ranges_table.c.name == rdef.name)
            ).scalar()
            if asked is not None and asked.tzinfo is None:
                asked = asked.replace(tzinfo=dt.UTC)
            want.append((rdef.name, asked is None or asked <= stale))
    payload = {
        "leases": [[r.id, int(r.next), str(r.state)] for r in rows],
        "want": [name for name, _ in want],
    }
    due = unconfirmed or any(fresh for _, fresh in want)
    return payload, due


def station_reported(conn: Connection, payload: dict[str, Any]) -> None:
    """The report went out: the host now knows these leases' state."""
    ids = [item[0] for item in payload.get("leases", [])]
    if ids:
        conn.execute(update(leases).where(leases.c.id.in_(ids)).values(confirmed=True))
    if payload.get("want"):
        conn.execute(
            update(ranges_table)
            .where(ranges_table.c.name.in_(payload["want"]))
            .values(asked_at=now())
        )


def retire_station(conn: Connection, station: str) -> int:
    """A station is removed: its leases end. Their unused numbers are not
    leased again (the station may have issued some before it went); if it
    is enrolled again, it gets fresh blocks."""
    result = conn.execute(
        update(leases)
        .where(leases.c.holder == station, leases.c.state != "retired")
        .values(state="retired", confirmed=True)
    )
    return int(result.rowcount)


def retire_all(conn: Connection) -> int:
    """This station went back to an older backup: numbers of its leases may
    have been issued after the backup was taken, so none is drawn again."""
    me, _ = _me(conn)
    result = conn.execute(
        update(leases)
        .where(leases.c.holder == me, leases.c.state == "active")
        .values(state="retired", confirmed=False)
    )
    return int(result.rowcount)


__all__ = [
    "Lease",
    "RangeDef",
    "RangeUsage",
    "add_range",
    "draw",
    "get_range",
    "list_leases",
    "list_ranges",
    "next_number",
    "release",
    "remove_range",
    "set_block",
    "usage",
]
