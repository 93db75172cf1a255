"""What needs a person, read from the database: the facts ``status`` shows.

:func:`evaluate` reads a fixed handful of statements whatever the number of
links (the links, when each peer's key was learnt, parked rows and
conflicts grouped by peer and table, the ranges and leases, the restore
note, problem events in the log), so a host with thousands of stations
checks as cheaply as a laptop. Each :class:`Alert` names its condition
and, where it matters, its subject (a peer, a peer and a table, a range):
the once-a-day rule of :mod:`.notify` counts per (condition, subject).

Conditions that are *states* (a silent peer, parked rows, a held link, a
range running low) are told again every day while they last. Conditions
that are *events* (a restore found, mail set aside, rows refused, a
control replayed) are told once for what happened since the last mail
about them (or, the first time, in the last day).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy import Connection, func, select

from mailsync.alerts.settings import REPEAT_HOURS, AlertSettings
from mailsync.link import all_links
from mailsync.ranges.model import list_leases, list_ranges, this_node
from mailsync.restore import last_finding
from mailsync.store.tables import conflicts_table, log_table, parked, peer_keys, range_free

#: the conditions, in the order a mail lists them
CONDITIONS = ("held", "silent", "parked", "conflicts", "range", "restore", "hostile")
#: log events that say someone sent what a careful node refuses
HOSTILE_EVENTS = ("rejected", "refused", "control-replayed")


@dataclass(frozen=True)
class Alert:
    """One thing that needs a person: its condition, subject and words."""

    condition: str
    subject: str
    text: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.condition, self.subject)


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    if value is None:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def _utc(value: dt.datetime) -> str:
    return f"{value.astimezone(dt.UTC):%Y-%m-%d %H:%M} UTC"


def evaluate(
    conn: Connection,
    settings: AlertSettings,
    *,
    is_host: bool,
    now: dt.datetime,
    told: Mapping[tuple[str, str], dt.datetime] | None = None,
) -> list[Alert]:
    """Every condition that holds now, per subject. ``told``: when each
    (condition, subject) was last mailed (the window of the event kinds)."""
    told = told or {}
    out: list[Alert] = []
    out += _links(conn, settings, now)
    if settings.parked_rows:
        out += _grouped(conn, "parked", settings.parked_rows, now)
    if settings.conflicts:
        out += _grouped(conn, "conflicts", settings.conflicts, now)
    if settings.range_left:
        out += _ranges(conn, settings.range_left, is_host)
    first_window = now - dt.timedelta(hours=REPEAT_HOURS)
    if settings.restore:
        found = last_finding(conn)
        since = told.get(("restore", ""), first_window)
        at = _aware(found[0]) if found is not None else None
        if found is not None and at is not None and at > since:
            out.append(
                Alert(
                    "restore",
                    "",
                    f"this database was found restored from a backup at {_utc(at)}: "
                    f"{found[2]} (`mailsync status` says how far healing is)",
                )
            )
    if settings.hostile:
        since = told.get(("hostile", ""), first_window)
        counts: dict[str, int] = dict(
            conn.execute(
                select(log_table.c.event, func.count())
                .where(log_table.c.at > since, log_table.c.event.in_(HOSTILE_EVENTS))
                .group_by(log_table.c.event)
            ).all()
        )
        said = [
            f"{n} {what}"
            for event, what in (
                ("rejected", "message(s) set aside (forged, tampered, replayed or not mailsync's)"),
                ("refused", "changeset(s) with rows the rules refused"),
                ("control-replayed", "control message(s) replayed"),
            )
            if (n := int(counts.get(event, 0)))
        ]
        if said:
            out.append(
                Alert(
                    "hostile",
                    "",
                    f"since {_utc(since)}: "
                    + ", ".join(said)
                    + " (`mailsync log --level warning`)",
                )
            )
    order = {c: i for i, c in enumerate(CONDITIONS)}
    return sorted(out, key=lambda a: (order[a.condition], a.subject))


def _links(conn: Connection, settings: AlertSettings, now: dt.datetime) -> list[Alert]:
    """Held links, and peers not heard from for ``silent_days`` (one never
    heard from counts from when its key was learnt: enrolment or join)."""
    out = []
    learnt: dict[str, dt.datetime] = {
        peer: at
        for peer, at in conn.execute(
            select(peer_keys.c.peer, func.min(peer_keys.c.added_at)).group_by(peer_keys.c.peer)
        ).all()
    }
    for link in all_links(conn):
        if settings.held and link.held:
            since = _aware(link.held_since)
            out.append(
                Alert(
                    "held",
                    link.peer,
                    f"changesets from {link.peer} are held"
                    + (f" since {_utc(since)}" if since else "")
                    + f": {link.held} (`mailsync inbox list {link.peer}`)",
                )
            )
        if settings.silent_days:
            heard = _aware(link.last_contact)
            start = heard or _aware(learnt.get(link.peer))
            if start is not None and now - start >= dt.timedelta(days=settings.silent_days):
                days = (now - start).total_seconds() / 86400
                out.append(
                    Alert(
                        "silent",
                        link.peer,
                        f"nothing heard from {link.peer} <{link.address}> for {days:.1f} days"
                        + ("" if heard else " (never since it was enrolled)"),
                    )
                )
    return out


def _grouped(conn: Connection, condition: str, threshold: int, now: dt.datetime) -> list[Alert]:
    """Parked rows or recorded conflicts, per peer and table, at or above
    the threshold."""
    table = parked if condition == "parked" else conflicts_table
    rows = conn.execute(
        select(table.c.peer, table.c.tbl, func.count())
        .group_by(table.c.peer, table.c.tbl)
        .order_by(table.c.peer, table.c.tbl)
    ).all()
    out = []
    for peer, tbl, count in rows:
        if count < threshold:
            continue
        if condition == "parked":
            text = (
                f"{count} row(s) of {tbl} from {peer} could not be applied and are parked "
                "(`mailsync errors list`, then `errors retry` or `errors drop`)"
            )
        else:
            text = (
                f"{count} conflict(s) on {tbl} with {peer} are recorded: the losing "
                "versions wait for a look (`mailsync conflicts list`)"
            )
        out.append(Alert(condition, f"{peer}/{tbl}", text))
    return out


def _ranges(conn: Connection, threshold: int, is_host: bool) -> list[Alert]:
    """A range with fewer than ``threshold`` numbers left: on the host, the
    numbers no lease holds yet (the range itself runs out); on a station,
    the numbers in its hands (it runs dry when offline)."""
    ranges = list_ranges(conn)
    if not ranges:
        return []
    out = []
    if is_host:
        free = dict(
            conn.execute(
                select(
                    range_free.c.range_name,
                    func.sum(range_free.c.last - range_free.c.first + 1),
                ).group_by(range_free.c.range_name)
            ).all()
        )
        for rdef in ranges:
            left = max(0, rdef.last - rdef.next_free + 1) + int(free.get(rdef.name) or 0)
            if left < threshold:
                out.append(
                    Alert(
                        "range",
                        rdef.name,
                        f"range {rdef.name} ({rdef.first}-{rdef.last}) has {left} number(s) "
                        "left to lease (`mailsync range show`; a new range, or release unused "
                        "leases)",
                    )
                )
        return out
    me, _ = this_node(conn)
    held: dict[str, int] = {}
    for lease in list_leases(conn):
        if lease.holder == me:
            held[lease.range] = held.get(lease.range, 0) + lease.left
    for rdef in ranges:
        left = held.get(rdef.name, 0)
        if left < threshold:
            out.append(
                Alert(
                    "range",
                    rdef.name,
                    f"range {rdef.name}: {left} number(s) left here (a block is asked for "
                    "with the next sync; it comes once the host answers)",
                )
            )
    return out
