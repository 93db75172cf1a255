"""Every admin command as a library function: stations, table rules, number
ranges, parked rows, conflicts and the inbox buffer.

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

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import Connection, Engine

from mailsync import inbox, trust
from mailsync import link as links_mod
from mailsync import rules as rules_mod
from mailsync.apply import ParkedRow, list_parked, retry_parked_row
from mailsync.apply import drop_parked as drop_parked_rows
from mailsync.config import NodeConfig
from mailsync.conflicts import Conflict
from mailsync.conflicts import drop_conflicts as drop_conflict_records
from mailsync.conflicts import list_conflicts as read_conflicts
from mailsync.enroll import Bundle
from mailsync.errors import ConfigError, RuleError
from mailsync.inbox import Buffered
from mailsync.journal import Journal
from mailsync.keys import KeyPair, KeyRing, PublicKey
from mailsync.ranges import admin as ranges_admin
from mailsync.ranges.exchange import retire_station
from mailsync.ranges.model import Lease, RangeDef, RangeSpec, get_range, list_leases
from mailsync.ranges.model import list_ranges as read_ranges
from mailsync.store.tables import ALL_STATIONS, loads


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


def _require_host(site: Site, what: str) -> None:
    if site.config.role != "host":
        raise ConfigError(
            f"{what} is defined on the host; {site.config.node_id!r} is a remote "
            "(it receives its rules from the host)"
        )


def _scope(station: str | None) -> str:
    return station or "all stations"


# ------------------------------------------------------------------ stations


def add_station(
    site: Site, station_id: str, email: str, label: str = "", *, key: PublicKey | None = None
) -> tuple[rules_mod.Station, Bundle]:
    """Define a station; returns it and its enrollment bundle.

    With the station's public ``key`` (it made its own keys) the bundle
    holds only public data. Without one, mailsync makes the station's
    keys and the bundle carries them: write it with a passphrase.
    """
    _require_host(site, "a station")
    pair = None
    if key is None:
        pair = KeyPair.generate()
        key = pair.public
    with site.engine.begin() as conn:
        station = rules_mod.add_station(conn, station_id, email, label, host_id=site.config.node_id)
        trust.trust_key(conn, station_id, key)
        # the bundle tells the station our current key
        links_mod.key_told(conn, station_id, site.ring.current.public.key_id)
        site.journal.info(
            "station",
            f"station {station_id} <{email}> added, key {key.key_id}",
            conn=conn,
            peer=station_id,
        )
    bundle = Bundle(
        host_id=site.config.node_id,
        host_address=site.config.mailbox.address,
        host_key=site.ring.current.public,
        station_id=station_id,
        station_address=email,
        station_keys=pair,
    )
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
    leases end (their unused numbers are never leased again)."""
    _require_host(site, "a station")
    with site.engine.begin() as conn:
        rules_mod.remove_station(conn, station_id)
        retired = retire_station(conn, station_id)
        leases = f"; {retired} number lease(s) retired" if retired else ""
        site.journal.info(
            "station", f"station {station_id} removed{leases}", conn=conn, peer=station_id
        )


def reload_station(site: Site, station_id: str, tables: Iterable[str] = ()) -> list[str]:
    """Send ``tables`` (default: every table the station gets inserts of)
    to a station again in full, replacing its copy of them — rows changed,
    deleted or added behind mailsync's back come back to the host's; what
    the station changed itself and has not delivered yet is kept (the
    reload machinery of :mod:`mailsync.reload`). Returns the tables."""
    _require_host(site, "a reload")
    with site.engine.begin() as conn:
        rules_mod.get_station(conn, station_id)
        effective = rules_mod.effective_rules(conn, station_id)
        sent = sorted(t for t, r in effective.items() if "I" in r.down)
        wanted = sorted(set(tables)) or sent
        for name in wanted:
            if name not in effective:
                raise RuleError(
                    f"table {name!r} does not travel to {station_id}",
                    hint=f"`mailsync station show {station_id}` lists its tables",
                )
            if name not in sent:
                raise RuleError(
                    f"table {name!r}: the rule for {station_id} sends no inserts down, "
                    "so it cannot be sent again in full"
                )
        if not wanted:
            raise RuleError(f"no table travels to {station_id}: nothing to reload")
        link = links_mod.one(conn, station_id)
        conn.execute(loads.delete().where(loads.c.station == station_id, loads.c.tbl.in_(wanted)))
        if not link.reload_wanted:
            links_mod.reload_requested(conn, link, None)
        site.journal.info(
            "reload",
            f"{station_id}: {', '.join(wanted)} to be sent again in full (asked by the admin)",
            conn=conn,
            peer=station_id,
        )
    return wanted


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
) -> tuple[rules_mod.Rule, list[str]]:
    """Sync a table (for all stations or one), or change its rule; returns
    the rule and warnings for the admin. Capture triggers go in at once."""
    _require_host(site, "a table rule")
    down, up = _ops(down, "down"), _ops(up, "up")
    rule = rules_mod.Rule(table, station or ALL_STATIONS, down, up, row_filter or None, conflict)
    with site.engine.begin() as conn:
        warnings = rules_mod.add_rule(conn, rule)
        site.journal.info(
            "rule",
            f"rule for {table} ({_scope(station)}): "
            f"down {rules_mod.describe_ops(down)}, up {rules_mod.describe_ops(up)}",
            conn=conn,
            peer=station,
        )
    return rule, warnings


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


def _all_known(wanted: set[int], found: Iterable[int], what: str, listed_by: str) -> None:
    """Refuse ids that are not there, before anything changes: an operator
    who mistyped one id must not have the others acted on."""
    missing = sorted(wanted - set(found))
    if missing:
        listed = ", ".join(map(str, missing[:10])) + (" …" if len(missing) > 10 else "")
        raise ConfigError(
            f"no {what} {listed}: nothing was changed", hint=f"`mailsync {listed_by}`"
        )


def _ids(wanted: set[int] | None) -> str:
    return f" ({', '.join(map(str, sorted(wanted)))})" if wanted else ""


def parked_rows(site: Site) -> list[ParkedRow]:
    """The rows that could not be applied, oldest first."""
    with site.engine.connect() as conn:
        return list_parked(conn)


def retry_parked(site: Site, ids: Iterable[int] | None) -> tuple[int, int]:
    """Apply parked rows (these ids, or None: all) again after their cause
    was fixed; returns (applied, still parked). Each row is tried in its own
    transaction with its log line, so one that still fails keeps none of
    the others parked."""
    wanted = None if ids is None else set(ids)
    with site.engine.connect() as conn:
        rows = list_parked(conn, wanted)
        if wanted is not None:
            _all_known(wanted, (r.id for r in rows), "parked row", "errors list")
    done = failed = 0
    for row in rows:
        what = f"parked row {row.id} ({row.table}, from {row.peer} #{row.seq})"
        with site.engine.begin() as conn:
            found, error = retry_parked_row(conn, row.id)
            if not found:  # another admin dropped or applied it meanwhile
                continue
            if error is None:
                done += 1
                site.journal.info("parked", f"{what} applied on retry", conn=conn, peer=row.peer)
            else:
                failed += 1
                site.journal.warning(
                    "parked", f"{what} still fails: {error}", conn=conn, peer=row.peer
                )
    return done, failed


def drop_parked(site: Site, ids: Iterable[int] | None) -> int:
    """Forget parked rows (these ids, or None: all); their change is given up here."""
    wanted = None if ids is None else set(ids)
    with site.engine.begin() as conn:
        if wanted is not None:
            found = [r.id for r in list_parked(conn, wanted)]
            _all_known(wanted, found, "parked row", "errors list")
        dropped = drop_parked_rows(conn, wanted)
        site.journal.info("parked", f"{dropped} parked row(s) dropped{_ids(wanted)}", conn=conn)
    return dropped


# ----------------------------------------------------------------- conflicts


def list_conflicts(
    site: Site, *, table: str | None = None, limit: int | None = None
) -> list[Conflict]:
    """Recorded conflicts, newest first (of one table, the newest ``limit``)."""
    with site.engine.connect() as conn:
        return read_conflicts(conn, table=table, limit=limit)


def drop_conflicts(site: Site, ids: Iterable[int] | None) -> int:
    """Forget conflict records (these ids, or None: all) once dealt with;
    the rows stay as they are."""
    wanted = None if ids is None else set(ids)
    with site.engine.begin() as conn:
        if wanted is not None:
            found = [c.id for c in read_conflicts(conn, ids=wanted)]
            _all_known(wanted, found, "conflict record", "conflicts list")
        gone = drop_conflict_records(conn, None if wanted is None else sorted(wanted))
        site.journal.info("conflict", f"{gone} conflict record(s) dropped{_ids(wanted)}", conn=conn)
    return gone


# -------------------------------------------------------------------- inbox


def inbox_list(site: Site, peer: str | None = None) -> list[Buffered]:
    """The changesets waiting in the inbox (of one peer), in order."""
    with site.engine.connect() as conn:
        if peer is not None and links_mod.get(conn, peer) is None:
            raise ConfigError(f"unknown peer {peer!r}", hint="`mailsync status` lists the peers")
        return inbox.buffered(conn, peer)


def inbox_show(site: Site, peer: str, seq: int) -> Buffered:
    """One buffered changeset: its parts, its failures, why it waits."""
    with site.engine.connect() as conn:
        (found,) = inbox.named(conn, peer, seq)
        return found


def inbox_retry(site: Site, peer: str, seq: int | None = None) -> list[Buffered]:
    """Try the peer's buffered changesets (or one) again with the next sync:
    their failures forgotten, a quarantine lifted, missing parts asked for."""
    with site.engine.begin() as conn:
        chosen = inbox.retry(conn, peer, seq)
        what = f"changeset #{seq}" if seq is not None else f"{len(chosen)} changeset(s)"
        site.journal.info(
            "inbox", f"{what} from {peer} to be tried again by an admin", peer=peer, conn=conn
        )
    return chosen


def inbox_drop(site: Site, peer: str, seq: int, *, skip: bool = False) -> Buffered:
    """Drop a buffered changeset; ``skip``: the one next in line, never to be
    applied here (see :func:`mailsync.inbox.drop`)."""
    with site.engine.begin() as conn:
        dropped = inbox.drop(conn, peer, seq, skip=skip)
        if skip:
            site.journal.error(
                "inbox",
                f"changeset #{seq} from {peer} skipped by an admin: never applied here, its "
                f"rows are missing on this node ({dropped.state})",
                peer=peer,
                seq=seq,
                conn=conn,
            )
        else:
            site.journal.warning(
                "inbox",
                f"buffered changeset #{seq} from {peer} dropped by an admin; it is asked "
                "for again when its turn comes",
                peer=peer,
                seq=seq,
                conn=conn,
            )
    return dropped
