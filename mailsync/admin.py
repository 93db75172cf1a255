"""Every admin command as a library function: stations, table rules, number
ranges (parked rows, conflicts and the inbox buffer: :mod:`mailsync.admin_queues`).

An admin's change must show in ``mailsync log`` the way a cycle's work does,
and an application or a test must be able to make it without the CLI (the
sqlite-utils / alembic ``command.py`` shape). So each mutating function
here owns its transaction — one ``engine.begin()``, in which the change and
its log line commit together or not at all — and each read-only one a
plain connection; the CLI only turns arguments into one call and prints.

The first parameter is a :class:`Site`: what these functions need of a
node. :class:`mailsync.node.Node` satisfies it structurally; this module
does not import it (the node imports this one).

Commands that define stations, rules and ranges are the host's: on a remote
they raise :class:`~mailsync.errors.ConfigError` saying so, before any
change. An operator's mistake (an unknown station, range, parked row or
conflict id) raises before any change too, so it changes nothing.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import Connection, Engine

from mailsync import definitions, standing, table_requests, trust, verification
from mailsync import link as links_mod
from mailsync import rules as rules_mod
from mailsync.config import NodeConfig
from mailsync.enroll import Bundle
from mailsync.errors import ConfigError, RuleError
from mailsync.journal import Journal
from mailsync.keys import KeyPair, KeyRing, PublicKey
from mailsync.ranges import admin as ranges_admin
from mailsync.ranges.exchange import retire_station
from mailsync.ranges.model import Lease, RangeDef, RangeSpec, get_range, list_leases
from mailsync.ranges.model import list_ranges as read_ranges
from mailsync.store.tables import ALL_STATIONS
from mailsync.verification import Verification
from mailsync.wire.envelope import Codec, Header


class Site(Protocol):
    """What an admin command needs of a node (a :class:`~mailsync.node.Node`
    is one): its config, database, log and keys. The keys are read only:
    changing them (``Node.rotate_keys``, ``Node.join``) changes the node's
    identity, which is the node's business, not an admin command's."""

    config: NodeConfig
    engine: Engine
    journal: Journal

    @property
    def ring(self) -> KeyRing: ...

    @property
    def codec(self) -> Codec: ...

    def seal(self, conn: Connection, header: Header, body: bytes) -> bytes: ...


def _require_host(site: Site, what: str) -> None:
    if site.config.role != "host":
        raise ConfigError(
            f"{what} is defined on the host; {site.config.node_id!r} is a remote "
            "(it receives its rules from the host)"
        )


def _verifies(site: Site) -> None:
    if site.config.role != "host":
        raise ConfigError(
            f"`mailsync verify` runs on the host; {site.config.node_id!r} is a remote "
            "(the host asks it by mail)"
        )


def _scope(station: str | None) -> str:
    return station or "all stations"


# ------------------------------------------------------------------ stations


def add_station(
    site: Site,
    station_id: str,
    email: str,
    label: str = "",
    *,
    key: PublicKey | None = None,
    keep: Callable[[Bundle], None] | None = None,
) -> tuple[rules_mod.Station, Bundle]:
    """Define a station; returns it and its enrollment bundle.

    With the station's public ``key`` (it made its own keys) the bundle
    holds only public data. Without one, mailsync makes the station's
    keys and the bundle carries them: write it with a passphrase. ``keep``
    (writing the bundle) runs before the commit: should it fail, the
    station is not added — its new private keys would be nowhere else.
    """
    _require_host(site, "a station")
    pair = None
    if key is None:
        pair = KeyPair.generate()
        key = pair.public
    bundle = Bundle(
        host_id=site.config.node_id,
        host_address=site.config.mailbox.address,
        host_key=site.ring.current.public,
        station_id=station_id,
        station_address=email,
        station_keys=pair,
    )
    with site.engine.begin() as conn:
        station = rules_mod.add_station(conn, station_id, email, label, host_id=site.config.node_id)
        standing.forget_farewell(conn, station_id)  # removed once: no longer
        trust.trust_key(conn, station_id, key)
        # the bundle tells the station our current key
        links_mod.key_told(conn, station_id, site.ring.current.public.key_id)
        site.journal.info(
            "station",
            f"station {station_id} <{email}> added, key {key.key_id}",
            conn=conn,
            peer=station_id,
        )
        if keep is not None:
            keep(bundle)
    return station, bundle


def edit_station(
    site: Site, station_id: str, *, label: str | None = None, email: str | None = None
) -> rules_mod.Station:
    """Change a station's label or e-mail address (where its mail goes)."""
    _require_host(site, "a station")
    with site.engine.begin() as conn:
        before, after = rules_mod.edit_station(conn, station_id, label=label, email=email)
        changes = []
        if after.label != before.label:
            changes.append(f"label {before.label!r} -> {after.label!r}")
        if after.email != before.email:
            changes.append(f"address <{before.email}> -> <{after.email}>")
        site.journal.info(
            "station",
            f"station {station_id} edited: {', '.join(changes) or 'no change'}",
            conn=conn,
            peer=station_id,
        )
    return after


def remove_station(site: Site, station_id: str) -> None:
    """Forget a station, its own rules, its link and outbox; its number
    leases end (their unused numbers are never leased again). It is told
    by mail with the next cycle: the notice is sealed now, while its key is
    known (:mod:`mailsync.standing`)."""
    _require_host(site, "a station")
    with site.engine.begin() as conn:
        rules_mod.get_station(conn, station_id)
        why = standing.farewell(conn, site.codec, site.seal, site.config.node_id, station_id)
        if why is not None:
            site.journal.warning(
                "station", f"station {station_id} cannot be told it is removed: {why}", conn=conn
            )
        rules_mod.remove_station(conn, station_id)
        retired = retire_station(conn, station_id)
        leases = f"; {retired} number lease(s) retired" if retired else ""
        site.journal.info(
            "station", f"station {station_id} removed{leases}", conn=conn, peer=station_id
        )


def reload_station(
    site: Site,
    station_id: str,
    tables: Iterable[str] = (),
    *,
    since: dt.datetime | None = None,
    column: str | None = None,
) -> list[str]:
    """Send ``tables`` (default: every table the station gets inserts of)
    to a station again with the next sync: in full, replacing its copy —
    rows changed, deleted or added behind mailsync's back come back to the
    host's; what the station changed itself and has not delivered yet is
    kept (:mod:`mailsync.reload`) — or, with ``since``, only the rows
    changed since then by a timestamp column (:mod:`mailsync.since`).
    Returns the tables (see :mod:`mailsync.table_requests`)."""
    _require_host(site, "a reload")
    with site.engine.begin() as conn:
        wanted = table_requests.tables_for(conn, station_id, tables)
        queued = table_requests.queue(conn, station_id, wanted, since=since, column=column)
        site.journal.info(
            "reload",
            table_requests.describe(station_id, queued, since) + " (asked by the admin)",
            conn=conn,
            peer=station_id,
        )
    return wanted


def verify(
    site: Site, station: str | None = None, table: str | None = None, *, repair: bool = False
) -> list[Verification]:
    """Start verifying ``table`` (default: every table that travels) at
    ``station`` (default: every station): the rounds go by mail with the
    following syncs (:mod:`mailsync.verification`); ``repair`` sends the
    differing rows again once they are named. Nothing starts if any pair
    is a mistake: an unknown station or table, a table that does not travel
    to or from the station, a station whose link is held (its answers would
    not apply)."""
    _verifies(site)
    with site.engine.begin() as conn:
        names = [station] if station is not None else [s.id for s in rules_mod.list_stations(conn)]
        if not names:
            raise RuleError("no station is defined: nothing to verify")
        pairs: list[tuple[str, str]] = []
        for name in names:
            rules_mod.get_station(conn, name)
            effective = {
                t: r for t, r in rules_mod.effective_rules(conn, name).items() if r.down or r.up
            }
            if table is not None and table not in effective:
                raise RuleError(
                    f"table {table!r} does not travel to or from {name}: nothing to verify",
                    hint=f"`mailsync station show {name}` lists its tables",
                )
            link = links_mod.get(conn, name)
            if link is not None and link.held is not None:
                raise RuleError(
                    f"station {name}'s link is held ({link.held}): its answers would not apply",
                    hint="`mailsync status` says why; fix that first, then verify",
                )
            pairs += [(name, t) for t in sorted(effective) if table is None or t == table]
        if not pairs:
            raise RuleError(f"no table travels to or from {_scope(station)}: nothing to verify")
        started = [verification.start(conn, s, t, repair=repair) for s, t in pairs]
        for v in started:
            site.journal.info(
                "verify",
                f"verification #{v.id} of {v.table} at {v.station} started"
                + (" (with repair)" if repair else ""),
                conn=conn,
                peer=v.station,
            )
    return started


def verifications(
    site: Site, station: str | None = None, table: str | None = None
) -> list[Verification]:
    """The last verification of each station and table (the host's)."""
    _verifies(site)
    with site.engine.connect() as conn:
        return verification.latest(conn, station, table)


def verifications_of(site: Site, ids: Iterable[int]) -> list[Verification]:
    with site.engine.connect() as conn:
        return [verification.get(conn, i) for i in ids]


def wait_verified(
    site: Site,
    ids: list[int],
    cycle: Callable[[], object],
    seconds: float,
    every: float,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> list[Verification]:
    """Run ``cycle`` (a sync) every ``every`` seconds until the verifications
    ``ids`` are finished or ``seconds`` have passed; their state then (some
    may still run: the station has not answered yet)."""
    deadline = clock() + seconds
    while True:
        cycle()
        found = verifications_of(site, ids)
        left = deadline - clock()
        if all(v.finished for v in found) or left <= 0:
            return found
        sleep(min(every, left))


def list_stations(site: Site) -> list[rules_mod.Station]:
    """The host's stations; a remote has none to list (its one peer is
    the host): refused like ``station add``, not "no stations yet"."""
    _require_host(site, "a station")
    with site.engine.connect() as conn:
        return rules_mod.list_stations(conn)


def show_station(
    site: Site, station_id: str
) -> tuple[rules_mod.Station, dict[str, rules_mod.Rule]]:
    """A station and, per table, the rule that governs it."""
    _require_host(site, "a station")
    with site.engine.connect() as conn:
        station = rules_mod.get_station(conn, station_id)
        return station, rules_mod.effective_rules(conn, station_id)


# --------------------------------------------------------------------- rules


def add_rule(
    site: Site,
    table: str,
    *,
    down: str,
    up: str,
    station: str | None = None,
    row_filter: str | None = None,
    conflict: str = "host-wins",
    newest_by: str | None = None,
) -> tuple[rules_mod.Rule, list[str]]:
    """Sync a table (for all stations or one), or change its rule; returns
    the rule and warnings for the admin. Capture triggers go in at once.
    ``newest_by``: newest-wins compares this time column (default: the
    capture times)."""
    _require_host(site, "a table rule")
    down, up = _ops(down, "down"), _ops(up, "up")
    rule = rules_mod.Rule(
        table, station or ALL_STATIONS, down, up, row_filter or None, conflict, newest_by
    )
    with site.engine.begin() as conn:
        before = _filters(conn, table)
        warnings = rules_mod.add_rule(conn, rule)
        site.journal.info(
            "rule",
            f"rule for {table} ({_scope(station)}): "
            f"down {rules_mod.describe_ops(down)}, up {rules_mod.describe_ops(up)}"
            + (f", filter {row_filter}" if row_filter else ""),
            conn=conn,
            peer=station,
        )
        warnings += _rescoped(site, conn, table, before)
    return rule, warnings


def _filters(conn: Connection, table: str) -> dict[str, rules_mod.Rule | None]:
    """Per station, the rule of ``table`` that governs it now."""
    every = rules_mod.all_rules(conn)
    return {
        s.id: rules_mod.effective_from(every, s.id).get(table)
        for s in rules_mod.list_stations(conn)
    }


def _rescoped(
    site: Site, conn: Connection, table: str, before: dict[str, rules_mod.Rule | None]
) -> list[str]:
    """Stations whose row filter of ``table`` changed get the table again in
    full with the next sync: what entered their scope arrives, what left it
    is deleted there (where the rule sends deletes; else it stays, and the
    admin is told). Returns notes for the admin."""
    notes = []
    for station, after in _filters(conn, table).items():
        was = before.get(station)
        if was is None or after is None or was.row_filter == after.row_filter:
            continue
        if "I" not in after.down:
            continue  # nothing can be loaded; the next changes follow the new filter
        table_requests.queue(conn, station, [table])
        kept = "" if "D" in after.down else " (the rule sends no deletes: rows that left stay)"
        site.journal.info(
            "reload",
            f"{station}: {table} to be sent again in full: its row filter changed{kept}",
            conn=conn,
            peer=station,
        )
        notes.append(f"{station} gets {table} again in full with the next sync{kept}")
    return notes


def _ops(value: str, what: str) -> str:
    """Operations as letters (``"IUD"``) or as the CLI takes them
    (``"insert,update"``, ``"all"``, ``"none"``)."""
    if value and set(value) <= set("IUD"):
        return "".join(op for op in "IUD" if op in value)
    return rules_mod.parse_ops(value, what)


def remove_rule(site: Site, table: str, station: str | None = None) -> None:
    """Stop syncing a table (for all stations), or drop one station's own rule."""
    _require_host(site, "a table rule")
    with site.engine.begin() as conn:
        rules_mod.remove_rule(conn, table, station)
        site.journal.info(
            "rule", f"rule for {table} ({_scope(station)}) removed", conn=conn, peer=station
        )


def resync_table(site: Site, table: str, station: str | None = None) -> list[str]:
    """After a breaking change to ``table`` was fixed: its definition and
    every row go again to ``station`` (or every station that has it), and
    the stop is lifted (:func:`mailsync.definitions.resync`). The stations."""
    _require_host(site, "a resync")
    with site.engine.begin() as conn:
        stations = definitions.resync(conn, table, station)
        site.journal.info(
            "resync",
            f"table {table}: definition and rows to be sent again to "
            f"{', '.join(stations) or 'no station yet'} (asked by the admin)",
            conn=conn,
            peer=station,
        )
    return stations


def list_rules(site: Site) -> list[rules_mod.Rule]:
    with site.engine.connect() as conn:
        return rules_mod.all_rules(conn)


# ------------------------------------------------------------- number ranges


@dataclass(frozen=True)
class RangeLeases:
    """A range and its leases, as ``range list`` and ``range show`` print them."""

    range: RangeDef
    leases: list[Lease]


def _known_stations(conn: Connection, names: Iterable[str]) -> None:
    """RuleError naming the first station that does not exist (a typo must
    not define a block size or a range for nobody)."""
    for name in names:
        rules_mod.get_station(conn, name)


def add_range(site: Site, spec: RangeSpec) -> RangeDef:
    """Define a number series on the host; stations get their first block
    with their next sync, a bound column its trigger at once."""
    with site.engine.begin() as conn:
        _known_stations(conn, spec.stations or ())
        rdef = ranges_admin.add_range(conn, spec)
        site.journal.info(
            "range",
            f"range {rdef.name} {rdef.first}-{rdef.last} added, blocks of {rdef.block}"
            + (f", bound to {rdef.bind_text}" if rdef.bind else "")
            + (f", for {', '.join(rdef.stations)}" if rdef.stations else ""),
            conn=conn,
        )
    return rdef


def list_ranges(site: Site) -> list[RangeLeases]:
    """Every range known here, with its leases."""
    with site.engine.connect() as conn:
        held = list_leases(conn)
        return [
            RangeLeases(rdef, [x for x in held if x.range == rdef.name])
            for rdef in read_ranges(conn)
        ]


def show_range(site: Site, name: str) -> RangeLeases:
    """One range and every lease of it."""
    with site.engine.connect() as conn:
        return RangeLeases(get_range(conn, name), list_leases(conn, name))


def set_block(site: Site, name: str, block: int, station: str | None = None) -> None:
    """The block size of a range, or of one station's leases, from the next lease on."""
    with site.engine.begin() as conn:
        _known_stations(conn, [station] if station else [])
        ranges_admin.set_block(conn, name, block, station)
        who = f" for {station}" if station else ""
        site.journal.info(
            "range",
            f"range {name}: blocks of {block}{who} from the next lease on",
            conn=conn,
            peer=station,
        )


def release_range(site: Site, name: str, station: str | None = None) -> int:
    """Ask a station (None: every station, closing the range) for the unused
    numbers of its leases back; returns the number of leases asked back."""
    with site.engine.begin() as conn:
        _known_stations(conn, [station] if station else [])
        count = ranges_admin.release(conn, name, station)
        who = station or "every station (the range closes)"
        site.journal.info(
            "range",
            f"range {name}: {count} lease(s) asked back from {who}",
            conn=conn,
            peer=station,
        )
    return count


def remove_range(site: Site, name: str) -> None:
    """Forget a range (refused while a station still holds numbers of it)."""
    with site.engine.begin() as conn:
        ranges_admin.remove_range(conn, name)
        site.journal.info("range", f"range {name} removed", conn=conn)


# --------------------------------------------------------------- parked rows
