"""Send: control messages first, then every part due, peer by peer.

A part is due when it was never sent, or is unacknowledged for longer than
``resend_after_minutes``. No transaction is held while the mail system
works: a crash between handing a part over and recording it only sends it
twice, and the peer drops the duplicate.

Each peer's mail goes under its own guard: a recipient the server refuses,
or a part over ``max_message_bytes``, holds that peer's mail (it stays in
the outbox, the peer's outcome says why) while every other peer's goes out
in the same cycle. A failure of the mailbox itself (server down, login)
ends the stage.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from itertools import groupby
from typing import Any

from sqlalchemy import Connection, select

from mailsync import faults
from mailsync import link as links_mod
from mailsync.cycle import controls
from mailsync.cycle.contain import contained, for_peer
from mailsync.cycle.context import CycleContext
from mailsync.cycle.report import CycleReport
from mailsync.errors import TransportError
from mailsync.store.tables import links, now, outbox
from mailsync.transport import Sender, open_sender
from mailsync.wire.envelope import read_header
from mailsync.wire.message import Address, build_message


def due_parts(ctx: CycleContext, conn: Connection) -> list[Any]:
    """The outbox parts due now (never sent, or unacknowledged for longer
    than ``resend_after_minutes``), peer by peer, oldest first."""
    stale = now() - dt.timedelta(minutes=ctx.config.resend_after_minutes)
    due = (outbox.c.sent_at.is_(None)) | (outbox.c.sent_at <= stale)
    return list(
        conn.execute(
            select(
                outbox.c.peer,
                outbox.c.seq,
                outbox.c.part,
                links.c.address,
                outbox.c.sent_at,
                outbox.c.ack,
                links.c.in_seq,
            )
            .join(links, links.c.peer == outbox.c.peer)
            .where(due)
            .order_by(outbox.c.peer, outbox.c.seq, outbox.c.part)
        ).all()
    )


def send(ctx: CycleContext, report: CycleReport) -> None:
    """Hand every due message to the mail system (one connection per cycle)."""
    snap = ctx.fresh()
    if snap is not None:
        pending = snap.pending
        # a peer that gets a data message sealed with our current ack
        # learns it from that (a resent one carries the ack of its day)
        carried = {r.peer for r in pending if r.ack >= r.in_seq}
        outgoing = controls.due(ctx, carried, report, snap)
    else:
        with ctx.engine.begin() as conn:
            pending = due_parts(ctx, conn)
            carried = {r.peer for r in pending if r.ack >= r.in_seq}
            outgoing = controls.compose_all(ctx, conn, carried, report)
    forward, report.forward = report.forward, []
    if not pending and not forward and not outgoing:
        return
    me = Address(ctx.me, ctx.config.mailbox.address)
    with open_sender(ctx.config.mailbox.send, ctx.transport_context()) as tx:
        target = ctx.config.mailbox.forward_unrecognized
        for raw in forward:
            assert target is not None
            with contained(
                report,
                ctx.journal,
                scope="peer",
                event="forward-failed",
                doing=f"forwarding unrecognized mail to {target}",
            ):
                tx.send(me.email, target, raw)
                ctx.journal.info("forwarded", f"unrecognized message forwarded to {target}")
        held: set[str] = set()
        for control in outgoing:
            peer = control.peer
            with for_peer(
                report, ctx.journal, peer, "send-failed", f"sending to {peer}"
            ) as outcome:
                _send_control(ctx, report, tx, me, control)
            if outcome.failed:
                held.add(control.peer)  # its data would fail the same way
        for peer, parts in groupby(pending, key=lambda r: r.peer):
            if peer in held:
                continue
            with for_peer(report, ctx.journal, peer, "send-failed", f"sending to {peer}"):
                _send_parts(ctx, report, tx, me, peer, parts)


def _send_control(
    ctx: CycleContext,
    report: CycleReport,
    tx: Sender,
    me: Address,
    control: controls.OutgoingControl,
) -> None:
    header = read_header(control.blob, f"ack for {control.peer}")
    to = Address(control.peer, control.address)
    tx.send(me.email, control.address, build_message(header, me, to, control.blob))
    with ctx.engine.begin() as conn:
        links_mod.ack_sent(conn, control.peer, control.ack)
    report.sent += 1
    report.sent_to[control.peer] += 1


def _send_parts(
    ctx: CycleContext,
    report: CycleReport,
    tx: Sender,
    me: Address,
    peer: str,
    parts: Iterable[Any],
) -> None:
    """One peer's due parts, oldest first; the first failure holds the rest."""
    limit = ctx.config.mailbox.max_message_bytes
    for _, seq, part, address, sent_at, *_ in parts:
        with ctx.engine.connect() as conn:
            stored: bytes | None = conn.execute(
                select(outbox.c.blob).where(
                    outbox.c.peer == peer, outbox.c.seq == seq, outbox.c.part == part
                )
            ).scalar()
        if stored is None:
            continue  # acknowledged meanwhile
        header = read_header(stored, f"outbox #{seq} for {peer}")
        name = f"#{seq}" + (f" part {part}/{header.parts}" if header.parts > 1 else "")
        raw = build_message(header, me, Address(peer, address), stored)
        if len(raw) > limit:
            raise TransportError(
                f"changeset {name} for {peer} makes a {len(raw):,}-byte message, over "
                f"max_message_bytes ({limit:,}); it stays in the outbox",
                hint="it was cut into parts under a larger limit: raise "
                "max_message_bytes back, or let the peer re-enroll",
                scope="peer",
            )
        tx.send(me.email, address, raw)
        faults.point("after-send")
        again = "sent again" if sent_at is not None else "sent"
        with ctx.engine.begin() as conn:
            links_mod.sent(conn, peer, seq, part, header.ack)
            ctx.journal.info(
                "sent",
                f"changeset {name} {again} to {peer} <{address}>",
                peer=peer,
                seq=seq,
                conn=conn,
            )
        report.sent += 1
        report.sent_to[peer] += 1
