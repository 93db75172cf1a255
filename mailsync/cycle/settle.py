"""Settle: everything a cycle writes after the mailbox, in one transaction.

After receive (and apply) the cycle's own work commits once: per link the
next changeset built into the outbox (each link in a savepoint of its own:
a link whose build fails is held, the others are built), the horizons a
bare ack made stale forgotten, the control messages due composed and
sealed, the parts due read and recorded as sent with their log lines, what
no peer can need any more purged, the restore witness renewed (its file
written before the commit, :mod:`mailsync.restore`), and the cycle's held
log lines. Only then does :mod:`.send` hand the mail over. A send that
fails takes its record back (:func:`mailsync.link.not_sent`); a crash
between the commit and the send looks like mail lost on the way: the part
goes again after ``resend_after_minutes`` (or when the peer asks), the ack
with the next message. Delivery stays exactly-once: an envelope counts as
delivered only when the peer's ack says it was applied.

A cycle with nothing to do (its start snapshot still fresh, and it says no
link has anything) opens no transaction here at all.

Parts whose blobs would not fit :data:`READ_AHEAD_BYTES` (a large initial
load) are not read here: :mod:`.send` reads, sends and records them one at
a time, as they go, so memory holds one part.
"""

from __future__ import annotations

from sqlalchemy import Connection, and_, delete, or_, select, tuple_

from mailsync import faults, restore, standing
from mailsync import inbox as inbox_mod
from mailsync import link as links_mod
from mailsync.cycle import build as build_stage
from mailsync.cycle import controls, purge, send
from mailsync.cycle.context import CycleContext
from mailsync.cycle.controls import OutgoingControl
from mailsync.cycle.report import CycleReport
from mailsync.cycle.send import Outgoing, Part
from mailsync.store.tables import horizons, outbox
from mailsync.store.witness import witness_path
from mailsync.wire.envelope import read_header
from mailsync.workers import mailbag

#: Bytes of outbox parts read into memory in the settling transaction; the
#: rest are read one by one as they are sent. Steady-state changesets are
#: kilobytes; a load's parts (megabytes each) go one at a time, so that the
#: peak of a load's send is one part and its message, not several parts.
READ_AHEAD_BYTES = 4 * 1024 * 1024


def settle(ctx: CycleContext, report: CycleReport) -> Outgoing:
    """Build, compose, record, purge, renew the witness: one commit (none
    for an idle cycle)."""
    snap = ctx.fresh()
    if snap is not None and not _anything(ctx, report):
        return Outgoing()
    horizon = build_stage.horizon_needed(ctx)
    with ctx.engine.begin() as conn:
        built = build_stage.build(ctx, report, conn, horizon)
        _forget_horizons(ctx, report, conn)
        # the links as the builds left them: for controls, purge, witness
        every = links_mod.all_links(conn)
        out = _record(ctx, report, conn, every)
        if ctx.coordinating:  # one worker of several does the node's chores
            purge.purge(ctx, conn, build_stage.rules_now(ctx, report), every)
            if ctx.share is not None:
                mailbag.forget_aside(conn)
        # leases granted and sequence numbers moved in this cycle
        restore.check(conn, witness_path(ctx.config.path), ctx.journal, every=every)
        ctx.journal.info("cycle", summary(report, out))
        ctx.journal.flush_into(conn)
        if out.controls or out.parts:
            send.mark(ctx, out)  # before the commit: a crash after it is undone
    if built:
        faults.point("after-build")
    return out


def _anything(ctx: CycleContext, report: CycleReport) -> bool:
    """From the fresh start snapshot: whether any part of settling has
    something to do (else the cycle is idle and writes nothing)."""
    snap = ctx.snapshot
    assert snap is not None
    pending = [r for r in snap.pending if ctx.selection.takes(r.peer)]
    if report.bare_acks or pending:
        return True
    if ctx.coordinating and (snap.forget_upto is not None or snap.farewells):
        return True
    if build_stage.wanted(ctx):
        return True
    if ctx.coordinating and purge.log_due(ctx, snap.oldest_log):
        return True
    carried = {r.peer for r in pending if r.ack >= r.in_seq}
    return controls.may_say(ctx, carried, report, snap)


def summary(report: CycleReport, out: Outgoing | None = None) -> str:
    """The cycle's line in the log: written as it settles, before the mail
    goes (``out``: what goes), or at its end where it did not settle."""
    mail = (
        f"{len(out.controls) + len(out.parts)} messages to send"
        if out is not None
        else f"{report.sent} messages sent"
    )
    return (
        f"sync cycle done: {report.received} received, {report.rows_applied} rows applied, "
        f"{report.rows_sent} rows queued, {mail}"
        + (f", {len(report.errors)} errors" if report.errors else "")
    )


def _record(
    ctx: CycleContext, report: CycleReport, conn: Connection, every: list[links_mod.Link]
) -> Outgoing:
    """The controls due, composed, and the parts due, read ahead; all
    recorded as sent (with their log lines) in ``conn``'s transaction."""
    pending = send.due_parts(ctx, conn)
    carried = {r.peer for r in pending if r.ack >= r.in_seq}
    # the start's reads, unless this transaction built something (links moved)
    snap = None if report.built else ctx.fresh()
    waiting = None
    if ctx.started is not None:
        # what can be buffered now: what was, and what receive left
        waiting = ctx.started.waiting | report.left_buffered
    composed = controls.compose_all(ctx, conn, carried, report, snap, every, waiting)
    told = ctx.started is None or ctx.started.farewells
    everyone = ctx.selection.stations is None or ctx.share is not None
    if ctx.role.is_host and told and everyone and ctx.coordinating:
        # stations removed since the last cycle: told once, sealed when removed
        composed += [OutgoingControl(p, a, b, 0) for p, a, b in standing.farewells_due(conn)]
    out = Outgoing(controls=composed, settled=True)
    budget = READ_AHEAD_BYTES
    ahead = []
    for row in pending:
        if row.size > budget:
            break
        budget -= row.size
        ahead.append((row.peer, row.seq, row.part))
    blobs = _blobs(conn, ahead)
    for row in pending:
        blob = blobs.get((row.peer, row.seq, row.part))
        out.parts.append(
            Part(row.peer, row.seq, row.part, row.address, row.sent_at is not None, row.ack, blob)
        )
    peers = {c.peer for c in out.controls} | {peer for peer, _, _ in ahead}
    ack_before = {x.peer: x.ack_sent for x in every if x.peer in peers}
    out.ack_before = ack_before
    # per peer in one pass each (a worker's share may be thousands of peers)
    parts_of: dict[str, list[tuple[int, int]]] = {}
    for q, seq, number in ahead:
        parts_of.setdefault(q, []).append((seq, number))
    acks_of: dict[str, list[int]] = {}
    for c in out.controls:
        acks_of.setdefault(c.peer, []).append(c.ack)
    for x in out.parts:
        if x.blob is not None:
            acks_of.setdefault(x.peer, []).append(x.ack)
    due = [(peer, parts_of.get(peer, []), max(acks_of[peer])) for peer in sorted(peers)]
    links_mod.sending(conn, due)  # all peers at once
    for part in out.parts:
        if part.blob is not None:
            _log_sending(ctx, conn, part)
    return out


def _blobs(conn: Connection, keys: list[tuple[str, int, int]]) -> dict[tuple[str, int, int], bytes]:
    if not keys:
        return {}
    # per peer, its (seq, part) pairs: SQLite searches the outbox's key for
    # "peer = ? AND (seq, part) IN (…)", but scans it for a three-column IN
    # (tests/test_growth.py)
    # (tests/test_growth.py); at most PEERS_PER_READ peers to a statement,
    # as SQLite bounds an expression's depth (a host with 1,000 stations)
    by_peer: dict[str, list[tuple[int, int]]] = {}
    for peer, seq, part in keys:
        by_peer.setdefault(peer, []).append((seq, part))
    peers = list(by_peer.items())
    out: dict[tuple[str, int, int], bytes] = {}
    for start in range(0, len(peers), PEERS_PER_READ):
        rows = conn.execute(
            select(outbox.c.peer, outbox.c.seq, outbox.c.part, outbox.c.blob).where(
                or_(
                    *(
                        and_(outbox.c.peer == peer, tuple_(outbox.c.seq, outbox.c.part).in_(pairs))
                        for peer, pairs in peers[start : start + PEERS_PER_READ]
                    )
                )
            )
        )
        out.update({(r.peer, r.seq, r.part): r.blob for r in rows})
    return out


#: peers whose parts one statement reads (SQLite: an expression at most
#: 1,000 deep; each peer adds a level of OR)
PEERS_PER_READ = 200


def _log_sending(ctx: CycleContext, conn: Connection, part: Part) -> None:
    header = read_header(part.blob or b"", f"outbox #{part.seq} for {part.peer}")
    name = f"#{part.seq}" + (f" part {part.part}/{header.parts}" if header.parts > 1 else "")
    ctx.journal.info(
        "sent",
        f"changeset {name} {'sent again' if part.again else 'sent'} to {part.peer} "
        f"<{part.address}>",
        peer=part.peer,
        seq=part.seq,
        conn=conn,
    )


def _forget_horizons(ctx: CycleContext, report: CycleReport, conn: Connection) -> None:
    """The peer's changesets from now on name the ack of its latest bare
    ack or a later one — except those still buffered (fetched with it, or
    early), which keep the horizons they name. One built earlier and still
    in the mail is tested against what is left."""
    for peer, ack in sorted(report.bare_acks.items()):
        for blob in inbox_mod.first_parts(conn, peer):
            ack = min(ack, read_header(blob, f"buffered changeset from {peer}").ack)
        conn.execute(delete(horizons).where(horizons.c.peer == peer, horizons.c.seq < ack))
    report.bare_acks.clear()


__all__ = ["Outgoing", "Part", "settle"]
