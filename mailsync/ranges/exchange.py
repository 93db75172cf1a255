"""The number-range control traffic between host and station, and retiring
leases when a station is removed or went back to a backup.

Both directions travel as unsequenced control records, checked and typed by
:mod:`mailsync.wire.controls` before they reach these functions: the host
sends :class:`RangeGrants` (grants it has not had confirmed, leases asked
back), a station sends :class:`RangeReport` (its leases' use and state, the
ranges it wants a block of). Lost records are sent again, so every
function here is idempotent against a repeated record.

What the host believes of a station's usage (the hoarding cap)
--------------------------------------------------------------
A station may hold at most ``max_blocks`` *unused* blocks of a range: active
leases of which no number is known to be used. The host grants a wanted
block only while the station holds fewer, and it counts with what it knows,
not with what the station says:

- A range bound to a column (``RangeDef.bind``) that the station sends up
  (its up rule on that table inserts or updates): a lease is used only as
  far as the host holds rows with numbers of it in that column. Leases are
  disjoint and the host draws outside them, so such a row came from the
  holder. The reported ``next`` is ignored for the cap (rows deleted since
  count as unused numbers: the error is on the station's side, which waits
  for its next block a little longer).
- A range with no bound column, or one whose table the station does not
  send up: the report is the only word there is, but a station cannot have
  drawn from a lease the host has not sent it yet (``sent_at`` unset), so
  such a lease counts as unused whatever is reported. However many reports
  arrive in one host cycle, the station ends it with at most the cap of
  unused blocks; what a lying station can gain is one cap's worth per round
  trip, and binding the range to its column closes even that.

The lease's ``next`` on the host stays the highest of what was reported and
what rows show: it decides which numbers come back to the free list when a
lease is given back, and a number anyone may have used never does.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import Connection, case, delete, func, select, update

from mailsync import link as links_mod
from mailsync.dialects import dialect_for
from mailsync.ranges.draw import block_for, grant
from mailsync.ranges.model import (
    Lease,
    RangeDef,
    as_lease,
    as_range,
    get_range,
    list_ranges,
    this_node,
)
from mailsync.store.tables import (
    ALL_STATIONS,
    get_meta,
    leases,
    meta_table,
    now,
    range_free,
    ranges_table,
    rules_table,
    set_meta,
)
from mailsync.wire.controls import Grant, LeaseState, RangeGrants, RangeReport

#: The log events of range traffic: what was done, and a block asked for and
#: refused by the hoarding cap (which ``status`` counts).
DONE, REFUSED = "range", "range-refused"
#: (log event, line): what acting on a range control did, for the log
Note = tuple[str, str]
#: ``mailsync_meta`` (station): the next report names every lease in full.
IN_FULL = "report_leases_in_full"


def _grant_of(rdef: RangeDef, lease: Lease) -> Grant:
    return Grant(
        lease_id=lease.id,
        range=rdef.name,
        start=rdef.first,
        end=rdef.last,
        block=rdef.block,
        threshold=rdef.threshold,
        max_blocks=rdef.max_blocks,
        bind=rdef.bind_text,
        format=rdef.format,
        first=lease.first,
        last=lease.last,
        next=lease.next,
    )


def _held(conn: Connection, rdef: RangeDef, station: str, *where: Any) -> int:
    """How many of ``station``'s leases of ``rdef`` match ``where``."""
    query = select(func.count()).select_from(leases)
    query = query.where(leases.c.range_name == rdef.name, leases.c.holder == station, *where)
    return int(conn.execute(query).scalar() or 0)


# ----------------------------------------------------------------- the host


def _sends_up(conn: Connection, station: str, tbl: str) -> bool:
    """Whether ``station``'s rule for ``tbl`` lets it send inserts or updates up."""
    rows = conn.execute(
        select(rules_table.c.station, rules_table.c.up_ops).where(
            rules_table.c.tbl == tbl, rules_table.c.station.in_([station, ALL_STATIONS])
        )
    ).all()
    ops = {r.station: r.up_ops for r in rows}
    up = ops.get(station, ops.get(ALL_STATIONS, ""))
    return "I" in up or "U" in up


def _seen_next(conn: Connection, rdef: RangeDef, lease: Lease) -> int:
    """The number after the highest of ``lease`` that the host holds in the
    range's bound column (``lease.first`` when it holds none)."""
    assert rdef.bind is not None
    highest = dialect_for(conn).highest_bound(
        conn, *rdef.bind, lease.first, lease.last, rdef.number_format
    )
    return lease.first if highest is None else highest + 1


def _unused(conn: Connection, rdef: RangeDef, station: str) -> int:
    """How many of ``station``'s active leases of ``rdef`` the host counts as
    unused (see the module's docstring)."""
    rows = conn.execute(
        select(leases).where(
            leases.c.range_name == rdef.name,
            leases.c.holder == station,
            leases.c.state == "active",
        )
    ).all()
    checked = (
        rdef.bind is not None
        and conn.dialect.has_table(conn, rdef.bind[0])
        and _sends_up(conn, station, rdef.bind[0])
    )
    unused = 0
    for row in rows:
        lease = as_lease(row)
        if checked:
            used = _seen_next(conn, rdef, lease) > lease.first
        else:
            used = row.sent_at is not None and lease.next > lease.first
        unused += not used
    return unused


def host_outgoing(
    conn: Connection,
    station: str,
    resend_after: dt.timedelta,
    *,
    ranges: list[RangeDef],
    waiting: bool,
) -> RangeGrants:
    """What the host must tell a station now: its first block of every range
    that serves it (with the initial load), grants it has not confirmed, and
    leases asked back. Marks them sent. ``ranges`` (read once per cycle for
    every station: none is the common case, and costs nothing) and
    ``waiting`` (the station owes its report: we went back to a backup) come
    from the caller."""
    if not ranges:
        return RangeGrants(grants=(), release=())
    live = leases.c.state.in_(["active", "release"])
    for rdef in ranges:
        if rdef.serves(station) and not waiting and not _held(conn, rdef, station, live):
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
    defs = {r.name: r for r in ranges}
    if due:
        conn.execute(
            update(leases).where(leases.c.id.in_([r.id for r in due])).values(sent_at=now())
        )
    return RangeGrants(
        grants=tuple(
            _grant_of(defs[r.range_name], as_lease(r)) for r in due if r.state == "active"
        ),
        release=tuple(r.id for r in due if r.state == "release"),
    )


def host_due(
    conn: Connection,
    stations: dict[str, bool],
    resend_after: dt.timedelta,
    *,
    ranges: list[RangeDef],
) -> set[str]:
    """Those of ``stations`` (each with whether it owes its report) that
    :func:`host_outgoing` would tell something now — a first block to grant,
    a grant or release to send again — read for all of them in one
    statement, writing nothing: the others cost an idle cycle nothing."""
    if not ranges or not stations:
        return set()
    stale = now() - resend_after
    unsent = case(
        (
            leases.c.confirmed.is_(False)
            & (leases.c.sent_at.is_(None) | (leases.c.sent_at <= stale)),
            1,
        ),
        else_=0,
    )
    rows = conn.execute(
        select(leases.c.holder, leases.c.range_name, func.max(unsent))
        .where(leases.c.state.in_(["active", "release"]), leases.c.range_name != "")
        .group_by(leases.c.holder, leases.c.range_name)
    ).all()
    held = {(str(h), str(r)) for h, r, _ in rows}
    due = {str(h) for h, _, u in rows if u}
    for station, waiting in stations.items():
        if station in due or waiting:
            continue
        if any(r.serves(station) and (station, r.name) not in held for r in ranges):
            due.add(station)
    return due & set(stations)


def host_incoming(conn: Connection, station: str, report: RangeReport) -> list[Note]:
    """A station's report: its leases' use and state, and the ranges it wants
    a block of. Returns what was done (and refused), for the log."""
    done: list[Note] = []
    defs = {r.name: r for r in list_ranges(conn)}
    waiting = _report_due(conn, station)
    if waiting and report.full:
        # we went back to a backup: learn the leases granted since, first
        done += [(DONE, line) for line in _adopt(conn, station, report, defs)]
        links_mod.peer_reported(conn, station)
        waiting = False
    reported = {item.lease_id: (item.next, item.state) for item in report.leases}
    for row in conn.execute(select(leases).where(leases.c.holder == station)).all():
        lease = as_lease(row)
        if lease.id not in reported:
            if lease.confirmed and lease.state in ("active", "release"):
                # it held this lease and no longer knows it: it went back to
                # a backup from before the grant, and may have used any of it
                conn.execute(update(leases).where(leases.c.id == lease.id).values(state="retired"))
                done.append((DONE, f"lease {lease.first}-{lease.last} of {lease.range} retired"))
            continue
        used, state = reported[lease.id]
        used = max(lease.next, min(used, lease.last + 1))
        rdef = defs.get(lease.range)
        if (
            rdef is not None
            and rdef.bind is not None
            and lease.state != "retired"
            and conn.dialect.has_table(conn, rdef.bind[0])
        ):
            # a number the host holds rows of is never given back
            used = max(used, _seen_next(conn, rdef, lease))
        values: dict[str, Any] = {"next": used, "confirmed": True}
        if state == "released" and lease.state in ("active", "release"):
            values.update(state="released", last=used - 1)
            if used <= lease.last:
                conn.execute(
                    range_free.insert().values(range_name=lease.range, first=used, last=lease.last)
                )
            gave = f"{station} gave back {lease.last - used + 1} number(s) of {lease.range}"
            done.append((DONE, gave))
        elif state == "retired" and lease.state != "retired":
            values["state"] = "retired"
            done.append((DONE, f"lease {lease.first}-{lease.last} of {lease.range} retired"))
        elif lease.state == "release":
            values["confirmed"] = False  # still to be given back
        conn.execute(update(leases).where(leases.c.id == lease.id).values(**values))
    for name in report.want:
        wanted = conn.execute(select(ranges_table).where(ranges_table.c.name == name)).first()
        if wanted is None or not as_range(wanted).serves(station):
            continue
        rdef = as_range(wanted)
        if waiting:
            done.append(
                (
                    DONE,
                    f"{station} asked for a block of {rdef.name}: it waits until {station} has "
                    "reported every lease it holds (this database went back to a backup)",
                )
            )
            continue
        unused = _unused(conn, rdef, station)
        if unused >= rdef.max_blocks:
            done.append(
                (
                    REFUSED,
                    f"{station} asked for another block of {rdef.name} but holds {unused} "
                    f"unused, the cap (max_blocks = {rdef.max_blocks}): refused",
                )
            )
            continue
        granted = grant(conn, rdef, station)
        if granted is None:
            done.append((DONE, f"{station} asked for a block of {rdef.name}, which is used up"))
        else:
            done.append((DONE, f"granted {rdef.name} {granted.first}-{granted.last} to {station}"))
    return done


def _report_due(conn: Connection, station: str) -> bool:
    link = links_mod.get(conn, station)
    return link is not None and link.report_due


def _adopt(
    conn: Connection, station: str, report: RangeReport, defs: dict[str, RangeDef]
) -> list[str]:
    """Host, back on a backup: a station's leases this database does not
    know (granted after the backup) are taken from its report where they
    are plausible — a range that serves it, inside the range, at most a
    block's size, overlapping no lease held here — and no block is carved
    from their numbers again. What is not plausible is refused and said."""
    done = []
    rows = conn.execute(select(leases.c.id, leases.c.range_name)).all()
    known = {int(r.id) for r in rows if r.range_name != ""}
    floor = max((int(r.id) for r in rows), default=0)  # the id floor's row included
    for item in report.leases:
        if item.range is None or item.lease_id in known:
            continue
        rdef = defs.get(item.range)
        size = item.last - item.first + 1
        overlap = conn.execute(
            select(func.count())
            .select_from(leases)
            .where(
                leases.c.range_name == item.range,
                leases.c.first <= item.last,
                leases.c.last >= item.first,
            )
        ).scalar()
        if (
            rdef is None
            or not rdef.serves(station)
            or not rdef.first <= item.first <= item.last <= rdef.last
            or size > max(rdef.block, block_for(conn, rdef, station))
            or overlap
        ):
            done.append(
                f"{station} reports lease {item.first}-{item.last} of {item.range} that this "
                "database does not know and cannot take: refused"
            )
            continue
        # the id floor a restored host set may sit on this very id
        conn.execute(delete(leases).where(leases.c.id == item.lease_id, leases.c.range_name == ""))
        conn.execute(
            leases.insert().values(
                id=item.lease_id,
                range_name=item.range,
                holder=station,
                first=item.first,
                last=item.last,
                next=max(item.first, min(item.next, item.last + 1)),
                state=item.state if item.state in ("active", "released", "retired") else "active",
                granted_at=now(),
                confirmed=True,
                sent_at=now(),
            )
        )
        conn.execute(
            delete(range_free).where(
                range_free.c.range_name == item.range,
                range_free.c.first <= item.last,
                range_free.c.last >= item.first,
            )
        )
        conn.execute(
            update(ranges_table)
            .where(ranges_table.c.name == item.range, ranges_table.c.next_free <= item.last)
            .values(next_free=item.last + 1)
        )
        known.add(item.lease_id)
        done.append(
            f"lease {item.first}-{item.last} of {item.range}, granted to {station} before this "
            "database went back, is known again"
        )
    dialect_for(conn).lease_ids_above(conn, max([floor, *known]))
    return done


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


# -------------------------------------------------------------- the station


def station_incoming(conn: Connection, grants: RangeGrants) -> list[str]:
    """The host's grants and release requests, applied on a station."""
    me, _ = this_node(conn)
    done = []
    for g in grants.grants:
        name = g.range
        table, _, column = g.bind.partition(".") if g.bind else ("", "", "")
        values = {
            "first": g.start,
            "last": g.end,
            "block": g.block,
            "threshold": g.threshold,
            "max_blocks": g.max_blocks,
            "bind_table": table or None,
            "bind_column": column or None,
            "format": g.format,
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
        row = conn.execute(select(leases).where(leases.c.id == g.lease_id)).first()
        if row is None:
            conn.execute(
                leases.insert().values(
                    id=g.lease_id,
                    range_name=name,
                    holder=me,
                    first=g.first,
                    last=g.last,
                    next=g.next,
                    state="active",
                    granted_at=now(),
                    confirmed=False,
                )
            )
            conn.execute(
                update(ranges_table).where(ranges_table.c.name == name).values(asked_at=None)
            )
            done.append(f"granted {name} {g.first}-{g.last}")
        else:
            conn.execute(
                update(leases)
                .where(leases.c.id == row.id)
                .values(next=max(row.next, g.next), confirmed=False)
            )
    for lease_id in grants.release:
        row = conn.execute(select(leases).where(leases.c.id == lease_id)).first()
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
    conn: Connection, ask_again: dt.timedelta, ranges: list[RangeDef] | None = None
) -> tuple[RangeReport | None, bool]:
    """The station's report, and whether it must go now (a grant or release
    to confirm, or a block to ask for that was not asked for lately).
    Reads only. ``ranges``: read once per cycle by the caller, or here."""
    me, _ = this_node(conn)
    rows = conn.execute(select(leases).where(leases.c.holder == me)).all()
    full = get_meta(conn, IN_FULL) is not None
    if ranges is None:
        ranges = list_ranges(conn)
    if not rows and not ranges and not full:
        return None, False
    unconfirmed = any(not r.confirmed for r in rows) or full
    want = []
    stale = now() - ask_again
    for rdef in ranges:
        mine = sorted(
            (as_lease(r) for r in rows if r.range_name == rdef.name and r.state == "active"),
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
    report = RangeReport(
        leases=tuple(
            LeaseState(r.id, int(r.next), str(r.state))
            if not full
            else LeaseState(
                r.id, int(r.next), str(r.state), str(r.range_name), int(r.first), int(r.last)
            )
            for r in rows
        ),
        want=tuple(name for name, _ in want),
        full=full,
    )
    due = unconfirmed or any(fresh for _, fresh in want)
    return report, due


def report_in_full(conn: Connection) -> None:
    """Station: the host went back to a backup; our next report names every
    lease with its range and numbers (the host may not know it)."""
    set_meta(conn, IN_FULL, "1")


def station_reported(conn: Connection, report: RangeReport) -> None:
    """The report went out: the host now knows these leases' state."""
    if report.full:
        conn.execute(delete(meta_table).where(meta_table.c.key == IN_FULL))
    ids = [item.lease_id for item in report.leases]
    if ids:
        conn.execute(update(leases).where(leases.c.id.in_(ids)).values(confirmed=True))
    if report.want:
        conn.execute(
            update(ranges_table).where(ranges_table.c.name.in_(report.want)).values(asked_at=now())
        )


def retire_all(conn: Connection) -> int:
    """This station went back to an older backup: numbers of its leases may
    have been issued after the backup was taken, so none is drawn again."""
    me, _ = this_node(conn)
    result = conn.execute(
        update(leases)
        .where(leases.c.holder == me, leases.c.state == "active")
        .values(state="retired", confirmed=False)
    )
    return int(result.rowcount)
