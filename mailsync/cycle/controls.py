"""Control traffic: acting on a peer's unsequenced message, and composing ours.

An unsequenced message (sequence 0) carries the sender's ack and perhaps a
resend request, a reload request or number-range traffic
(:mod:`mailsync.wire.controls`). It is acted on as soon as it arrives, in
the transaction that takes it out of the mailbox, and never acknowledged;
its signed header carries a number that grows with every control message
on the link, and one not above the last acted on is ignored (applied once).
Ours go out ahead of any data: a bare ack where the peer has not heard what
we applied (and no data message carries it), a resend request where a gap
in what it sent us is old enough, a reload request after a restore, and
the number-range report or grants.
"""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain, islice

from sqlalchemy import Connection

from mailsync import dictionaries, inbox, standing, table_requests
from mailsync import link as links_mod
from mailsync.cycle.contain import for_peer
from mailsync.cycle.context import CycleContext
from mailsync.cycle.report import CycleReport
from mailsync.cycle.snapshot import Snapshot
from mailsync.link import Link
from mailsync.ranges import exchange
from mailsync.ranges.model import RangeDef, list_ranges
from mailsync.store.tables import loads, now, outbox
from mailsync.wire.changeset import ChangesetWriter, Control, read_changeset
from mailsync.wire.controls import (
    MAX_RESEND_REQUEST,
    Dictionary,
    DictionaryWanted,
    HostRestored,
    RangeGrants,
    RangeReport,
    ReloadRequest,
    Resend,
    UnsequencedControl,
    Wanted,
    parse_unsequenced,
)
from mailsync.wire.envelope import Header
from mailsync.wire.station_controls import StationStanding, TablesWanted
from mailsync.wire.station_controls import parse_unsequenced as parse_station_control

#: The sequence number of unsequenced (control) messages: acks, resend requests.
CONTROL_SEQ = 0

#: Controls a message may carry besides resends, ranges and reloads.
Extra = DictionaryWanted | Dictionary | StationStanding | TablesWanted


# ------------------------------------------------------------------- inbound


def act_on(
    ctx: CycleContext,
    conn: Connection,
    link: Link,
    header: Header,
    blob: bytes,
    where: str,
    report: CycleReport,
) -> None:
    """An unsequenced message from ``link.peer`` (``header``: as its verified
    signature vouches for it): its ack, then its controls.

    Every record is parsed before any is acted on: a malformed one sets the
    whole message aside (MessageError) and its transaction rolls back.

    One numbered no higher than the last we acted on (its signed header's
    ``ctl``) is a copy replayed from the mailbox, or an older message the
    mail delivered late: it is logged and ignored, ack included. Nothing is
    lost by that: acks only grow, and every control is sent again while it
    still matters (a gap is asked for again, a range report goes until the
    host confirms, a reload request until the reload comes)."""
    peer = link.peer
    stream = ctx.codec.stream([ctx.codec.unseal(header, blob, where, ctx.ring)], where)
    ack = header.ack
    if not links_mod.control_fresh(conn, link, header.ctl):
        ctx.journal.warning(
            "control-replayed",
            f"{where}: control message #{header.ctl} from {peer} is not newer than "
            f"#{link.ctl_seen}, the last acted on (a replay, or delivered late): ignored",
            peer=peer,
            conn=conn,
        )
        return
    links_mod.acknowledged(conn, link, ack)
    report.bare_acks[peer] = max(ack, report.bare_acks.get(peer, 0))
    if link.paused_at is not None:
        return  # disabled: its ack only (it sends again what still matters)
    controls: list[UnsequencedControl | StationStanding | TablesWanted] = []
    for record in read_changeset(stream, origin=where):
        if not isinstance(record, Control):
            continue
        from_host = ctx.role.hears_from_host
        control = parse_unsequenced(
            record.kind, record.payload, from_host=from_host
        ) or parse_station_control(record.kind, record.payload, from_host=from_host)
        if control is None:
            ctx.journal.info(
                "control-ignored",
                f"{where}: control {record.kind[:40]!r} from {peer} is not one this node "
                "acts on; ignored",
                peer=peer,
                conn=conn,
            )
        else:
            controls.append(control)
    for control in controls:
        if isinstance(control, StationStanding):
            report.standing = standing.record(conn, ctx.journal, peer, control)
        elif isinstance(control, TablesWanted):
            table_requests.honour(ctx.journal, conn, links_mod.one(conn, peer), control)
        elif isinstance(control, ReloadRequest):
            _reload_requested(ctx, conn, links_mod.one(conn, peer), control)
        elif isinstance(control, HostRestored):
            _host_restored(ctx, conn, links_mod.one(conn, peer), control)
        elif isinstance(control, Dictionary):
            dictionaries.received(conn, peer, control, ctx.limits, link.in_seq)
        elif isinstance(control, DictionaryWanted):
            found = dictionaries.asked_for(conn, peer, control.ids)
            report.dictionaries_due.setdefault(peer, []).extend(found)
            ctx.journal.info(
                "dictionary-request",
                f"{peer} asks again for {len(control.ids)} dictionary(ies) of ours "
                f"({len(found)} still held: sent, and our unacknowledged changesets after them)",
                peer=peer,
                conn=conn,
            )
        elif isinstance(control, RangeGrants | RangeReport):
            for event, line in ctx.role.ranges_in(conn, peer, control):
                level = "warning" if event == exchange.REFUSED else "info"
                ctx.journal.write(level, event, line, peer=peer, conn=conn)
        else:
            _resend(conn, peer, control)
            ctx.journal.info(
                "resend-request",
                f"{peer} asks again for {control.describe()}",
                peer=peer,
                conn=conn,
            )


def _resend(conn: Connection, peer: str, control: Resend) -> None:
    """Mark the parts the peer asks for as never sent: they go this cycle."""
    whole = [w for w in control.wanted if isinstance(w, int)]
    if whole:
        conn.execute(
            outbox.update()
            .where(outbox.c.peer == peer, outbox.c.seq.in_(whole))
            .values(sent_at=None)
        )
    for seq, part in (w for w in control.wanted if isinstance(w, tuple)):
        conn.execute(
            outbox.update()
            .where(outbox.c.peer == peer, outbox.c.seq == seq, outbox.c.part == part)
            .values(sent_at=None)
        )


def _reload_requested(
    ctx: CycleContext, conn: Connection, link: Link, control: ReloadRequest
) -> None:
    """A station lost rows it had applied: the next build for it is a full
    load that replaces its copy. While a reload is queued or on its way
    (not yet acknowledged), a request again is answered by that one; a
    request already served (the station asked again before the reload
    reached it, and the mail was slow) is ignored."""
    if link.reload_wanted or link.reload_seq > link.acked_seq:
        return
    if control.request is not None and control.request == link.reload_request:
        return
    conn.execute(loads.delete().where(loads.c.station == link.peer))
    links_mod.reload_requested(conn, link, control.request)
    ctx.journal.warning(
        "reload",
        f"{link.peer} went back to an older backup (it has our changesets up to "
        f"#{control.in_seq}): its tables are sent again in full",
        peer=link.peer,
        conn=conn,
    )


def _host_restored(ctx: CycleContext, conn: Connection, link: Link, control: HostRestored) -> None:
    """Remote: the host went back to a backup. Where it lost changesets of
    ours (it had acknowledged more), every row we send up goes again, and
    a reload follows once it is in; either way our next report names every
    lease in full, so the host learns what it granted us and lost."""
    exchange.report_in_full(conn)
    if control.in_seq < link.acked_seq and not link.resend_all:
        links_mod.host_went_back(conn, link, control.in_seq)
        ctx.journal.error(
            "went-back",
            f"{link.peer} went back to a backup: it holds our changesets up to "
            f"#{control.in_seq}, not #{link.acked_seq}; every row we send up goes again, "
            "then a reload is asked for",
            peer=link.peer,
            conn=conn,
        )
    else:
        ctx.journal.warning(
            "went-back",
            f"{link.peer} went back to a backup; it has every changeset of ours: our number "
            "leases are reported to it in full",
            peer=link.peer,
            conn=conn,
        )


# ------------------------------------------------------------------ outbound


@dataclass(frozen=True)
class OutgoingControl:
    """A sealed unsequenced message for one peer, and the ack it carries."""

    peer: str
    address: str
    blob: bytes
    ack: int


def may_say(ctx: CycleContext, carried: set[str], report: CycleReport, snap: Snapshot) -> bool:
    """From the cycle's start ``snap`` (nothing has committed since):
    whether any link may have a control message due — an idle cycle
    composes nothing and reads nothing."""
    return any(_may_say(ctx, link, carried, report, snap) for link in snap.links)


def _may_say(
    ctx: CycleContext, link: Link, carried: set[str], report: CycleReport, snap: Snapshot
) -> bool:
    """Whether composing for ``link`` could yield a message (a gap to ask
    for needs the inbox read: a peer with something buffered may)."""
    if not ctx.selection.takes(link.peer):
        return False
    if link.paused_at is not None or link.standing_due:
        return bool(link.standing_due)
    if link.peer in snap.waiting or link.peer in snap.ranges_due:
        return True
    return not _quiet(ctx, link, carried, report, [])


def compose_all(
    ctx: CycleContext,
    conn: Connection,
    carried: set[str],
    report: CycleReport,
    snap: Snapshot | None = None,
    every: list[Link] | None = None,
    waiting: set[str] | None = None,
) -> list[OutgoingControl]:
    """Unsequenced messages due now, one per peer at most (``carried``: the
    peers a data message sealed with our current ack goes to anyway). A
    peer whose message cannot be composed (no key to seal it for) is held
    with its reason; what composing it wrote is rolled back to its savepoint.
    ``snap``: the cycle's start reads, where they still hold; else
    ``every`` (the links) and ``waiting`` (peers that may have something
    buffered), where the caller read them in this transaction."""
    out = []
    if snap is not None:
        waiting, ranges, every = snap.waiting, snap.ranges, snap.links
    else:
        ranges = list_ranges(conn)  # once for every link
        if waiting is None:
            waiting = inbox.peers_waiting(conn)
        if every is None:
            every = links_mod.all_links(conn)
    ranges_due: set[str] | None = None
    if snap is not None:
        ranges_due = snap.ranges_due
    elif ctx.role.is_host and ranges:
        # one statement for every station, not a savepoint and reads each
        resend_after = dt.timedelta(minutes=ctx.config.resend_after_minutes)
        stations = {x.peer: x.report_due for x in every}
        ranges_due = exchange.host_due(conn, stations, resend_after, ranges=ranges)
    for link in every:
        peer = link.peer
        if not ctx.selection.takes(peer):
            continue  # not in this run (`sync --station`): its controls wait
        if link.paused_at is not None:
            # disabled: nothing goes to it but the one notice saying so
            if link.standing_due:
                with for_peer(report, ctx.journal, peer, "send-failed", f"notice for {peer}"):
                    out.append(_standing(ctx, conn, link))
            continue
        with for_peer(report, ctx.journal, peer, "send-failed", f"controls for {peer}"):
            control = _compose(
                ctx, conn, link, carried, report, peer in waiting, ranges, ranges_due
            )
            if control is not None:
                out.append(control)
    return out


def _standing(ctx: CycleContext, conn: Connection, link: Link) -> OutgoingControl:
    """The notice of a disabled station's standing, alone (it goes once)."""
    assert link.standing_due is not None
    blob = standing.notice(conn, ctx.codec, ctx.seal, ctx.me, link, link.standing_due)
    links_mod.standing_told(conn, link.peer)
    return OutgoingControl(link.peer, link.address, blob, link.in_seq)


def _quiet(
    ctx: CycleContext,
    link: Link,
    carried: set[str],
    report: CycleReport,
    wanted: list[Wanted],
) -> bool:
    """Nothing to ask for (rows or dictionaries), none to send, no reload or
    restore notice due, and the peer has heard our ack (or a data message
    carries it)."""
    limit = now() - dt.timedelta(minutes=ctx.config.gap_request_minutes)
    resend_after = dt.timedelta(minutes=ctx.config.resend_after_minutes)
    reload = _reload_due(ctx, link, limit)
    notice = (
        ctx.role.is_host
        and link.report_due
        and (link.notice_sent_at is None or link.notice_sent_at <= now() - resend_after)
    )
    return (
        not wanted
        and not report.expired.get(link.peer)
        and not report.dictionaries_wanted.get(link.peer)
        and not report.dictionaries_due.get(link.peer)
        and not reload
        and not notice
        and not link.standing_due
        and not (ctx.role.hears_from_host and table_requests.due(link))
        and (link.in_seq <= link.ack_sent or link.peer in carried)
    )


def _reload_due(ctx: CycleContext, link: Link, limit: dt.datetime) -> bool:
    return bool(
        ctx.role.can_be_reloaded
        and link.reload_wanted
        and (link.reload_asked_at is None or link.reload_asked_at <= limit)
        # after the host went back: once it holds every row we sent again
        and not link.resend_all
        and link.acked_seq >= link.resent_seq
    )


def _compose(
    ctx: CycleContext,
    conn: Connection,
    link: Link,
    carried: set[str],
    report: CycleReport,
    buffered: bool,
    ranges: list[RangeDef],
    ranges_due: set[str] | None,
) -> OutgoingControl | None:
    cfg = ctx.config
    gap_after = dt.timedelta(minutes=cfg.gap_request_minutes)
    limit = now() - gap_after
    resend_after = dt.timedelta(minutes=cfg.resend_after_minutes)
    wanted: list[Wanted] = []
    oldest = inbox.oldest_buffered(conn, link.peer) if buffered else None
    asked = link.gap_requested_at
    # dropped from the inbox as never completed (apply's expiry): asked for
    # again at once, whole
    expired = report.expired.get(link.peer, [])
    wanted.extend(expired[:MAX_RESEND_REQUEST])
    if oldest is not None and oldest <= limit and (asked is None or asked <= limit):
        held = inbox.held_parts(conn, link.peer)
        gaps: Iterator[Wanted] = chain(
            inbox.missing_sequences(link.in_seq, set(held)), inbox.missing_parts(held)
        )
        wanted.extend(
            islice((g for g in gaps if g not in expired), MAX_RESEND_REQUEST - len(wanted))
        )
    reload = _reload_due(ctx, link, limit)
    notice = (
        ctx.role.is_host
        and link.report_due
        and (link.notice_sent_at is None or link.notice_sent_at <= now() - resend_after)
    )
    dicts_wanted = sorted(report.dictionaries_wanted.get(link.peer, ()))
    dicts_due = report.dictionaries_due.get(link.peer, [])
    quiet = _quiet(ctx, link, carried, report, wanted)
    if quiet and (
        (ctx.role.is_host and not ranges)
        or (ranges_due is not None and link.peer not in ranges_due)
    ):
        return None  # nothing to say, nothing written: no savepoint (an idle station)
    # what composing writes is rolled back to here if it fails
    with conn.begin_nested():
        extra: list[Extra] = list(dicts_due)
        if dicts_wanted:
            extra.append(DictionaryWanted(tuple(dicts_wanted)))
        if link.standing_due:  # enabled again: said with the rest
            extra.append(StationStanding(link.standing_due, now().isoformat(timespec="seconds")))
            links_mod.standing_told(conn, link.peer)
        if ctx.role.hears_from_host and link.table_request is not None:
            request = table_requests.asked(conn, link)  # until the host's answer
            if request is not None:
                extra.append(request)
        return _write(ctx, conn, link, wanted, reload, notice, quiet, ranges, extra)


def _write(
    ctx: CycleContext,
    conn: Connection,
    link: Link,
    wanted: list[Wanted],
    reload: bool,
    notice: bool,
    quiet: bool,
    ranges: list[RangeDef],
    extra: list[Extra],
) -> OutgoingControl | None:
    """The range traffic (a grant may be made here) and, if anything is
    due, the control message itself, sealed (with ``extra``: dictionaries
    asked for, or sent again)."""
    cfg = ctx.config
    resend_after = dt.timedelta(minutes=cfg.resend_after_minutes)
    gap_after = dt.timedelta(minutes=cfg.gap_request_minutes)
    ranges_control, ranges_due = ctx.role.ranges_out(conn, link, resend_after, gap_after, ranges)
    if quiet and not ranges_due:
        return None
    buffer = io.BytesIO()
    compressed = ctx.codec.body_writer(buffer)
    writer = ChangesetWriter(compressed, {"from": ctx.me, "to": link.peer})
    if wanted:
        writer.control(Resend.KIND, Resend(tuple(wanted)).payload())
        links_mod.gap_requested(conn, link.peer)
    if ranges_control is not None:
        writer.control(ranges_control.KIND, ranges_control.payload())
        if isinstance(ranges_control, RangeReport):
            exchange.station_reported(conn, ranges_control)
    if notice:
        writer.control(HostRestored.KIND, HostRestored(link.in_seq).payload())
        links_mod.notice_sent(conn, link.peer)
    for control in extra:
        writer.control(control.KIND, control.payload())
    if reload:
        request = ReloadRequest(link.in_seq, link.reload_request)
        writer.control(ReloadRequest.KIND, request.payload())
        links_mod.reload_asked(conn, link.peer)
    writer.close()
    compressed.close()  # type: ignore[no-untyped-call]
    blob = ctx.seal(conn, standing.control_header(conn, ctx.me, link), buffer.getvalue())
    return OutgoingControl(link.peer, link.address, blob, link.in_seq)
