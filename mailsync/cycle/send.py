"""Send: control messages first, then every part due, peer by peer.

A part is due when it was never sent, or is unacknowledged for longer than
``resend_after_minutes``. What goes was composed, read and recorded as sent
in the cycle's settling transaction (:mod:`.settle`); this stage only hands
it to the mail system, holding no transaction while the mail system works.
What fails to go has its record taken back (:func:`mailsync.link.not_sent`),
so it is due again next cycle; a crash between that commit and the mail
system looks like mail lost on the way (sent again after
``resend_after_minutes``, or when the peer asks for it). Parts too large to
read ahead are read, sent and recorded one at a time here.

Each peer's mail goes under its own guard: a recipient the server refuses,
or a part over ``max_message_bytes``, holds that peer's mail (it stays in
the outbox, the peer's outcome says why) while every other peer's goes out
in the same cycle. A failure of the mailbox itself (server down, login)
ends the stage.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, func, select

from mailsync import faults
from mailsync import link as links_mod
from mailsync.cycle.contain import contained, for_peer
from mailsync.cycle.context import CycleContext
from mailsync.cycle.controls import OutgoingControl
from mailsync.cycle.report import CycleReport
from mailsync.errors import TransportError
from mailsync.store.tables import links, now, outbox
from mailsync.transport import Sender, open_sender
from mailsync.wire.envelope import read_header
from mailsync.wire.message import Address, build_message


@dataclass(frozen=True)
class Part:
    """A part due to go; its blob when it was read (and recorded as sent)
    in the settling transaction."""

    peer: str
    seq: int
    part: int
    address: str
    again: bool
    ack: int
    blob: bytes | None


@dataclass
class Outgoing:
    """What the settling transaction recorded to go."""

    controls: list[OutgoingControl] = field(default_factory=list)
    parts: list[Part] = field(default_factory=list)
    #: per peer recorded: the ack it had heard before (taken back to on failure)
    ack_before: dict[str, int] = field(default_factory=dict)
    #: the settling transaction ran (and wrote the cycle's log lines)
    settled: bool = False


# ------------------------------------------------- recorded, not yet handed over


def marker_path(ctx: CycleContext) -> Path:
    """Beside the config: what the last settling commit recorded as sent,
    while it is being handed to the mail system."""
    return ctx.config.path.with_suffix(".sending")


def mark(ctx: CycleContext, out: Outgoing) -> None:
    """Before the settling commit: name what it records as sent, so that a
    crash before the mail system has it is undone by the next cycle's
    start (:func:`recover`), not left to ``resend_after_minutes``. Not
    fsynced: a process killed keeps the file; a power cut that loses it
    leaves only the slower way."""
    parts: dict[str, list[tuple[int, int]]] = {}
    for item in out.parts:
        if item.blob is not None:
            parts.setdefault(item.peer, []).append((item.seq, item.part))
    text = json.dumps({"parts": parts, "acks": out.ack_before})
    path = marker_path(ctx)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)


def unmark(ctx: CycleContext) -> None:
    """Everything recorded went, or had its record taken back."""
    marker_path(ctx).unlink(missing_ok=True)


def recover(ctx: CycleContext, conn: Connection) -> bool:
    """At a cycle's start, in its transaction: the last cycle died between
    recording mail as sent and handing it over; take the record back (the
    parts are due now, the acks go again). Whether it wrote (the marker
    goes once that commits: :func:`unmark`)."""
    path = marker_path(ctx)
    try:
        held = json.loads(path.read_text(encoding="utf-8"))
        parts = {str(k): [(int(s), int(p)) for s, p in v] for k, v in held["parts"].items()}
        acks = {str(k): int(v) for k, v in held["acks"].items()}
    except FileNotFoundError:
        return False
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        path.unlink(missing_ok=True)  # unreadable: the slower way it is
        return False
    for peer in sorted(set(parts) | set(acks)):
        links_mod.not_sent(conn, peer, parts.get(peer, []), acks.get(peer, 0))
    ctx.journal.warning(
        "not-sent",
        "the last cycle stopped before its mail reached the mail system: it goes again",
        conn=conn,
    )
    return True


def due_parts(ctx: CycleContext, conn: Connection) -> list[Any]:
    """The outbox parts due now (never sent, or unacknowledged for longer
    than ``resend_after_minutes``), peer by peer, oldest first, with their
    sizes."""
    stale = now() - dt.timedelta(minutes=ctx.config.resend_after_minutes)
    due = (outbox.c.sent_at.is_(None)) | (outbox.c.sent_at <= stale)
    chosen = ctx.selection.stations  # `sync --station`: theirs only
    if chosen is not None:
        due = due & outbox.c.peer.in_(sorted(chosen))
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
                func.length(outbox.c.blob).label("size"),
            )
            .join(links, links.c.peer == outbox.c.peer)
            .where(due, links.c.paused_at.is_(None))  # disabled: nothing goes
            .order_by(outbox.c.peer, outbox.c.seq, outbox.c.part)
        ).all()
    )


def send(ctx: CycleContext, report: CycleReport, out: Outgoing) -> None:
    """Hand every message recorded to go to the mail system (one connection
    per cycle); take back the record of what did not go."""
    forward, report.forward = report.forward, []
    if not out.parts and not forward and not out.controls:
        unmark(ctx)
        return
    went: set[tuple[str, int, int]] = set()  # (peer, seq, part); part 0: the control
    try:
        _send_all(ctx, report, out, forward, went)
    finally:
        _take_back(ctx, out, went)
        unmark(ctx)


def _send_all(
    ctx: CycleContext,
    report: CycleReport,
    out: Outgoing,
    forward: list[bytes],
    went: set[tuple[str, int, int]],
) -> None:
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
        for control in out.controls:
            peer = control.peer
            with for_peer(
                report, ctx.journal, peer, "send-failed", f"sending to {peer}"
            ) as outcome:
                header = read_header(control.blob, f"ack for {peer}")
                to = Address(peer, control.address)
                tx.send(me.email, control.address, build_message(header, me, to, control.blob))
                went.add((peer, 0, 0))
                report.sent += 1
                report.sent_to[peer] += 1
            if outcome.failed:
                held.add(peer)  # its data would fail the same way
        for peer, parts in groupby(out.parts, key=lambda p: p.peer):
            if peer in held:
                continue
            with for_peer(report, ctx.journal, peer, "send-failed", f"sending to {peer}"):
                _send_parts(ctx, report, tx, me, parts, went)


def _send_parts(
    ctx: CycleContext,
    report: CycleReport,
    tx: Sender,
    me: Address,
    parts: Iterable[Part],
    went: set[tuple[str, int, int]],
) -> None:
    """One peer's due parts, oldest first; the first failure holds the rest."""
    limit = ctx.config.mailbox.max_message_bytes
    for item in parts:
        peer, seq, part = item.peer, item.seq, item.part
        stored = item.blob
        if stored is None:  # not read ahead: read (and recorded below) on its own
            with ctx.engine.connect() as conn:
                stored = conn.execute(
                    select(outbox.c.blob).where(
                        outbox.c.peer == peer, outbox.c.seq == seq, outbox.c.part == part
                    )
                ).scalar()
            if stored is None:
                continue  # acknowledged meanwhile
        header = read_header(stored, f"outbox #{seq} for {peer}")
        name = f"#{seq}" + (f" part {part}/{header.parts}" if header.parts > 1 else "")
        raw = build_message(header, me, Address(peer, item.address), stored)
        if len(raw) > limit:
            raise TransportError(
                f"changeset {name} for {peer} makes a {len(raw):,}-byte message, over "
                f"max_message_bytes ({limit:,}); it stays in the outbox",
                hint="it was cut into parts under a larger limit: raise "
                "max_message_bytes back, or let the peer re-enroll",
                scope="peer",
            )
        tx.send(me.email, item.address, raw)
        del raw, stored  # a load's part and its message: not kept while the next is read
        went.add((peer, seq, part))
        faults.point("after-send")
        if item.blob is None:
            with ctx.engine.begin() as conn:
                links_mod.sent(conn, peer, seq, part, header.ack)
                ctx.journal.info(
                    "sent",
                    f"changeset {name} {'sent again' if item.again else 'sent'} to {peer} "
                    f"<{item.address}>",
                    peer=peer,
                    seq=seq,
                    conn=conn,
                )
        report.sent += 1
        report.sent_to[peer] += 1


def _take_back(ctx: CycleContext, out: Outgoing, went: set[tuple[str, int, int]]) -> None:
    """The record of what was recorded as sent but did not go: one
    transaction, only when something failed."""
    missed: dict[str, list[tuple[int, int]]] = {}
    for control in out.controls:
        if (control.peer, 0, 0) not in went:
            missed.setdefault(control.peer, [])
    for item in out.parts:
        if item.blob is not None and (item.peer, item.seq, item.part) not in went:
            missed.setdefault(item.peer, []).append((item.seq, item.part))
    if not missed:
        return
    with ctx.engine.begin() as conn:
        for peer, parts in sorted(missed.items()):
            links_mod.not_sent(conn, peer, parts, out.ack_before.get(peer, 0))
            ctx.journal.warning(
                "not-sent",
                f"{len(parts)} part(s) and our ack for {peer} did not reach the mail system: "
                "they go again next cycle",
                peer=peer,
                conn=conn,
            )
