"""What ``mailsync status`` shows: a node's links, queues and problems.

Everything is read from the node's database, so status works offline and
while a cycle runs elsewhere.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from sqlalchemy import Connection, Engine, case, distinct, func, or_, select

from mailsync import capture, standing, table_requests, verification
from mailsync import rules as rules_mod
from mailsync.config import NodeConfig, Role
from mailsync.definitions import TableVersion, versions
from mailsync.inbox import held_parts, missing_parts, missing_sequences, quarantined_counts
from mailsync.link import Link, all_links
from mailsync.ranges.admin import usage
from mailsync.ranges.exchange import REFUSED
from mailsync.ranges.model import RangeUsage
from mailsync.restore import last_finding
from mailsync.store.engine import redact
from mailsync.store.tables import (
    changes,
    conflicts_table,
    get_meta,
    log_table,
    now,
    outbox,
    parked,
)
from mailsync.verification import Verification


@dataclass(frozen=True)
class LinkStatus:
    peer: str
    address: str
    last_contact: dt.datetime | None
    last_sent: dt.datetime | None
    out_seq: int
    acked_seq: int
    in_seq: int
    #: messages (parts) never sent yet
    unsent: int
    #: changesets sent and not yet acknowledged
    unacked: int
    #: changesets buffered, waiting for a predecessor or a missing part
    buffered: int
    pending_changes: int
    oldest_unacked: dt.datetime | None = None
    missing: tuple[int, ...] = ()
    missing_parts: tuple[tuple[int, int], ...] = ()
    #: after a restored backup: what is being done about it, in words
    restore: str | None = None
    #: why the peer's changesets do not apply (a failure, a quarantine), since
    held: str | None = None
    held_since: dt.datetime | None = None
    #: buffered changesets no longer tried by themselves (`mailsync inbox`)
    quarantined: int = 0
    #: host: the station is disabled since then (nothing goes to it, what
    #: it sends is held: ``buffered``)
    disabled_since: dt.datetime | None = None
    #: the definition of each table the station has (host: against the
    #: host's table now; a station: as the host sent it)
    tables: tuple[TableVersion, ...] = ()


@dataclass(frozen=True)
class Status:
    node_id: str
    role: Role
    address: str
    database: str
    links: list[LinkStatus]
    tables: list[str]
    capture_missing: list[str]
    set_aside: int
    errors: int
    key_id: str
    parked: int = 0
    ranges: list[RangeUsage] = field(default_factory=list)
    #: conflicts recorded and not yet dropped (`mailsync conflicts list`)
    conflicts: int = 0
    #: of those, waiting for an admin's decision (manual policy)
    conflicts_waiting: int = 0
    #: log lines (one per row and changeset) about local edits a peer's
    #: version overwrote because the rules never send them
    overwritten: int = 0
    #: log lines (one per changeset, table and reason) about incoming rows
    #: the rules refused, within the log's retention
    refused: int = 0
    #: control messages ignored as not newer than the last acted on (a copy
    #: replayed from the mailbox, or one the mail delivered late)
    replayed: int = 0
    #: blocks of a number range a station asked for and was refused: it
    #: held its cap of unused blocks (the host's count, not the station's)
    blocks_refused: int = 0
    #: the last time this database was found behind its restore witness (or
    #: without one): when, what was done, and whether healing is done
    restored: str | None = None
    #: station: what the host told us of our standing (disabled, removed)
    standing: str | None = None
    #: station: our own reload request, still waiting for the host's answer
    reload_asked: str | None = None
    #: host: the last verification of each station and table (`mailsync verify`)
    verifications: list[Verification] = field(default_factory=list)


def node_status(engine: Engine, config: NodeConfig, key_id: str) -> Status:
    """Role, peers, last contact, queues and problems, read from the database."""
    is_host = config.role == "host"
    with engine.begin() as conn:
        result = []
        quarantined = quarantined_counts(conn)
        defined = versions(conn, is_host)
        for link in all_links(conn):
            routed = (
                or_(changes.c.origin.is_(None), changes.c.origin != link.peer)
                if is_host
                else changes.c.origin.is_(None)
            )
            effective = rules_mod.effective_rules(conn, link.peer if is_host else None)
            pending = conn.execute(
                select(func.count())
                .select_from(changes)
                .where(
                    changes.c.id > link.change_cursor,
                    routed,
                    changes.c.tbl.in_(list(effective)),
                )
            ).scalar()
            unsent, unacked, oldest = conn.execute(
                select(
                    func.count().filter(outbox.c.sent_at.is_(None)),
                    func.count(distinct(outbox.c.seq)).filter(outbox.c.sent_at.is_not(None)),
                    func.min(outbox.c.created_at),
                ).where(outbox.c.peer == link.peer)
            ).one()
            held = held_parts(conn, link.peer)
            result.append(
                LinkStatus(
                    peer=link.peer,
                    address=link.address,
                    last_contact=link.last_contact,
                    last_sent=link.last_sent,
                    out_seq=link.out_seq,
                    acked_seq=link.acked_seq,
                    in_seq=link.in_seq,
                    unsent=unsent,
                    unacked=unacked,
                    buffered=len(held),
                    pending_changes=int(pending or 0),
                    oldest_unacked=oldest,
                    missing=tuple(missing_sequences(link.in_seq, set(held))),
                    missing_parts=tuple(missing_parts(held)),
                    restore=_restore_state(link, is_host),
                    held=link.held,
                    held_since=link.held_since,
                    quarantined=quarantined.get(link.peer, 0),
                    disabled_since=link.paused_at,
                    tables=tuple(defined.get(link.peer, ())),
                )
            )
        tables = sorted({r.table for r in rules_mod.all_rules(conn)})
        missing = capture.check_capture(conn, tables) if tables else []
        parked_count = int(conn.execute(select(func.count()).select_from(parked)).scalar() or 0)
        conflict_count, waiting_count = conn.execute(
            select(
                func.count(),
                func.coalesce(
                    func.sum(case((conflicts_table.c.state == "waiting", 1), else_=0)), 0
                ),
            ).select_from(conflicts_table)
        ).one()
        range_usage = usage(conn)
        restored = _restored(conn, result)
        told = standing.read(get_meta(conn, standing.META_KEY))
        asked = table_requests.pending(conn)
        verified = verification.latest(conn) if is_host else []
        since = now() - dt.timedelta(days=config.log_retention_days)
        counts: dict[str, int] = dict(
            conn.execute(
                select(log_table.c.event, func.count())
                .where(
                    log_table.c.at >= since,
                    log_table.c.event.in_(
                        [
                            "rejected",
                            "apply-failed",
                            "refused",
                            "control-replayed",
                            "overwritten",
                            REFUSED,
                        ]
                    ),
                )
                .group_by(log_table.c.event)
            ).all()
        )
    return Status(
        node_id=config.node_id,
        role=config.role,
        address=config.mailbox.address,
        database=redact(engine),
        links=result,
        tables=tables,
        capture_missing=missing,
        set_aside=int(counts.get("rejected", 0)),
        errors=int(counts.get("apply-failed", 0)),
        key_id=key_id,
        parked=parked_count,
        ranges=range_usage,
        conflicts=int(conflict_count),
        conflicts_waiting=int(waiting_count),
        overwritten=int(counts.get("overwritten", 0)),
        refused=int(counts.get("refused", 0)),
        replayed=int(counts.get("control-replayed", 0)),
        blocks_refused=int(counts.get(REFUSED, 0)),
        restored=restored,
        standing=None if told is None else told.line(),
        reload_asked=None if asked is None else table_requests.waiting(asked),
        verifications=verified,
    )


def _restored(conn: Connection, links: list[LinkStatus]) -> str | None:
    """ "restored from a backup at …: 3 lease(s) moved past 100079, reload
    requested of hq … done" (or what it still waits for)."""
    found = last_finding(conn)
    if found is None:
        return None
    at, _, text = found
    pending = [x.restore for x in links if x.restore is not None]
    state = "; ".join(pending) if pending else "done"
    return f"{text} (found {at:%Y-%m-%d %H:%M} UTC) … {state}"


def _restore_state(link: Link, is_host: bool) -> str | None:
    """Say what is pending after a database went back to an older backup."""
    if is_host and link.reload_wanted:
        return f"{link.peer} went back to an older backup: a full reload is queued for it"
    if is_host and link.report_due:
        return (
            f"this database went back to an older backup: {link.peer} is asked to send again "
            "what it sent since, and its number leases (no block is granted it until then)"
        )
    if not is_host and (link.resend_all or link.acked_seq < link.resent_seq):
        return (
            f"{link.peer} went back to an older backup: every row we send up goes to it again"
            + (", then a reload is asked for" if link.reload_wanted else "")
        )
    if not is_host and link.reload_wanted:
        asked = link.reload_asked_at
        return "this database went back to an older backup: " + (
            f"waiting for the reload asked of {link.peer} at {asked:%Y-%m-%d %H:%M} UTC"
            if asked is not None
            else f"a reload from {link.peer} is asked for with the next sync"
        )
    return None
