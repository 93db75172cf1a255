"""Issuing numbers, and leasing the blocks they come from.

A node draws only from its own active leases, one short transaction per
number, so that a number is never issued twice whatever crashes or resends
happen; the host leases itself a new block when it has none left, a
station that runs dry gets a :class:`~mailsync.errors.RangeError` that says
when it last heard from the host and what to do.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Connection, Engine, delete, insert, select, update

from mailsync import restore
from mailsync.dialects import dialect_for
from mailsync.errors import RangeError
from mailsync.ranges.model import Lease, RangeDef, as_lease, get_range, this_node
from mailsync.store.engine import open_engine
from mailsync.store.tables import leases, links, now, range_blocks, range_free, ranges_table

# ---------------------------------------------------------------- allocation


def block_for(conn: Connection, rdef: RangeDef, station: str) -> int:
    """The block size of ``station``'s leases: its own if the host set one."""
    own = conn.execute(
        select(range_blocks.c.block).where(
            range_blocks.c.range_name == rdef.name, range_blocks.c.station == station
        )
    ).scalar()
    return int(own) if own is not None else rdef.block


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
    return as_lease(row)


# ------------------------------------------------------------------- drawing


def draw(conn: Connection, name: str) -> int:
    """Issue the next number of range ``name`` on this node (in ``conn``'s
    transaction). The host leases itself a new block when it has none left;
    a station that has none left gets a :class:`RangeError` saying why.

    Only numbers below a lease's ceiling are drawn (what the restore
    witness holds, :mod:`mailsync.restore`); where the lease has more, the
    witness is renewed first and the draw tried again."""
    me, is_host = this_node(conn)
    rdef = get_range(conn, name)
    mine = (
        leases.c.range_name == name,
        leases.c.holder == me,
        leases.c.state == "active",
        leases.c.next <= leases.c.last,
    )
    for _ in range(4):
        usable = (
            select(leases.c.id)
            .where(*mine, leases.c.next < leases.c.ceiling)
            .order_by(leases.c.first)
            .limit(1)
            .scalar_subquery()
        )
        issued = conn.execute(
            update(leases)
            .where(leases.c.id == usable, *mine, leases.c.next < leases.c.ceiling)
            .values(next=leases.c.next + 1)
            .returning(leases.c.next)
        ).scalar()
        if issued is not None:
            return int(issued) - 1
        # another session took the lease's last number, or retired it: try
        # the next usable lease; numbers not yet reserved are reserved
        # first; only the host can make a new lease
        if conn.execute(select(usable)).scalar() is not None:
            continue
        if conn.execute(select(leases.c.id).where(*mine).limit(1)).first() is not None:
            if restore.reserve(conn):
                continue
            break
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


def issue(conn: Connection, name: str) -> int | str:
    """Draw one number of range ``name`` (in ``conn``'s transaction) as the
    application stores it: the number, or for a range with a format its
    text (``R-2026-000123``; the year in the database's local time, as the
    bound column's trigger writes it)."""
    n = draw(conn, name)
    rdef = get_range(conn, name)
    if rdef.format is None:
        return n
    return rdef.text_of(n, dialect_for(conn).current_year(conn))


def next_number(database: Engine | str, name: str) -> int | str:
    """Draw one number of range ``name`` for an application, committed at once:
    an ``int``, or the text of a range with a format (:func:`issue`).

    ``database`` is the node's database (an engine or a SQLAlchemy URL).
    Like every mailsync action it first compares the database with its
    restore witness (:func:`mailsync.restore.reserve`): a database restored
    from a backup never hands out a number it issued before.
    """
    engine = open_engine(database) if isinstance(database, str) else database
    try:
        with engine.begin() as conn:
            restore.reserve(conn)  # a database behind its witness is caught first
            return issue(conn, name)
    finally:
        if isinstance(database, str):
            engine.dispose()
