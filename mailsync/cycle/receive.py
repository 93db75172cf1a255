"""Receive: take mail from this node's mailbox, check it, buffer it.

Per message: is it mailsync's, addressed to us, from a known peer, signed
with a key we trust for it? A control message is acted on at once; a part
of a changeset is buffered, still sealed, in ``mailsync_inbox``. Each in its
own transaction, and only after that commit may the mailbox forget the
message (:meth:`Receiver.processed`). Anything that fails a check is set
aside with its reason (:meth:`Receiver.set_aside`) and the next message is
read: a bad message never stops the cycle.

Before a peer's ack is believed, it is checked against what this database
holds: a peer that applied more of ours than we have sent, or whose ack names
another changeset than ours, shows that our database went back to a backup
(:func:`_went_back`).
"""

from __future__ import annotations

from sqlalchemy import Connection, delete, select
from sqlalchemy.exc import DataError, SQLAlchemyError

from mailsync import dictionaries, faults, standing
from mailsync import inbox as inbox_mod
from mailsync import link as links_mod
from mailsync.cycle import controls
from mailsync.cycle.apply import apply_now
from mailsync.cycle.context import CycleContext
from mailsync.cycle.report import CycleReport
from mailsync.errors import MailsyncError, MessageError, first_line
from mailsync.journal import logger
from mailsync.link import Link
from mailsync.ranges import exchange
from mailsync.store.tables import inbox, outbox
from mailsync.transport import Receiver
from mailsync.wire.envelope import Header, UnknownDictionary, read_header
from mailsync.wire.limits import exceeded
from mailsync.wire.message import extract_envelope, is_mailsync


def receive(ctx: CycleContext, report: CycleReport) -> None:
    """Read every message in the mailbox once (one connection per cycle)."""
    me = ctx.me
    box = ctx.config.mailbox
    with ctx.open_mailbox() as rx:
        for msg in rx.fetch():
            where = f"message {msg.id}"
            sender: str | None = None  # named in the log once the header is read
            try:
                if not is_mailsync(msg.raw):
                    raise MessageError(f"{where}: not a mailsync message")
                blob = extract_envelope(msg.raw, where)
                header = read_header(blob, where)
                sender = header.sender
                if header.recipient != me:
                    raise MessageError(f"{where}: addressed to {header.recipient!r}, not {me!r}")
                with ctx.engine.begin() as conn:
                    link = links_mod.get(conn, header.sender)
                    if link is None:
                        raise UnknownSender(f"{where}: unknown sender {header.sender!r}")
                    keys = ctx.sender_keys(conn, header.sender)
                    header = ctx.codec.verify(blob, where, keys)
                    link = _went_back(ctx, conn, link, header)
                    try:
                        if header.seq == controls.CONTROL_SEQ:
                            controls.act_on(ctx, conn, link, header, blob, where, report)
                            duplicate = False
                        else:
                            duplicate = _buffer(ctx, conn, link, header, blob, where)
                    except (DataError, OverflowError) as exc:
                        # signed, but with a value our columns cannot hold:
                        # this message's fault, not the database's
                        raise MessageError(f"{where}: {first_line(exc)}") from exc
                    _log_received(ctx, conn, header, duplicate)
                    applied = not duplicate and _apply_at_once(ctx, conn, report, link, header)
            except MessageError as exc:
                if isinstance(exc, UnknownSender) and sender is not None:
                    first = standing.heard_from_removed(ctx.engine, sender)
                    if first is not None:
                        _set_aside_removed(ctx, report, rx, msg.id, msg.raw, sender, first)
                        continue
                if isinstance(exc, UnknownDictionary):  # asked for in this cycle's controls
                    report.dictionaries_wanted.setdefault(exc.peer, set()).add(exc.dictionary)
                if box.forward_unrecognized:
                    report.forward.append(msg.raw)
                rx.set_aside(msg.id, str(exc))
                # the claimed sender: unverified, but what an admin searches by
                ctx.journal.warning("rejected", f"set aside: {exc}", peer=sender)
                report.set_aside += 1
                continue
            except (SQLAlchemyError, MailsyncError):
                raise  # the database or the mailbox: not this message's doing
            except Exception as exc:
                # a bug met with this message: it stays in the mailbox, is
                # tried again next cycle, and holds no other message or peer
                logger.error("%s: receiving %s", me, where, exc_info=True)
                line = f"{where}: unexpected {type(exc).__name__}: {exc} (left in the mailbox)"
                report.errors.append(line)
                if sender is not None:
                    report.peer_errors.setdefault(sender, line)
                ctx.journal.error("receive-failed", line, peer=sender)
                continue
            faults.point("after-buffer")
            if applied:
                faults.point("after-apply")
            rx.processed(msg.id)  # only now: the buffer commit made it redundant
            report.received += 1
            report.received_from[header.sender] += 1
            report.duplicates += duplicate


class UnknownSender(MessageError):
    """Mail signed as coming from no peer of ours."""


def _set_aside_removed(
    ctx: CycleContext,
    report: CycleReport,
    rx: Receiver,
    message: str,
    raw: bytes,
    sender: str,
    first: bool,
) -> None:
    """Mail from a station removed on this host: set aside, said in the log
    the first time only (:mod:`mailsync.standing`)."""
    reason = f"message {message}: from {sender}, a station removed on this host"
    if ctx.config.mailbox.forward_unrecognized:
        report.forward.append(raw)
    rx.set_aside(message, reason)
    if first:
        ctx.journal.warning(
            "rejected",
            f"set aside: {reason} (said once: its later mail is set aside quietly)",
            peer=sender,
        )
        report.set_aside += 1


def _apply_at_once(
    ctx: CycleContext, conn: Connection, report: CycleReport, link: Link, header: Header
) -> bool:
    """A one-part changeset next in line on a link that flows is applied
    in the transaction that buffered it (:func:`..apply.apply_now`): the
    message leaves the mailbox after the one commit that applied it.
    Anything else stays buffered for the apply stage."""
    if header.seq == controls.CONTROL_SEQ:
        return False
    peer = link.peer
    if (
        header.parts == 1
        and header.seq == link.in_seq + 1
        and link.held is None
        and not link.report_due
        and link.paused_at is None  # disabled: held until enabled
        and ctx.selection.takes(peer)
        and ctx.selection.tables is None  # a limited run: the apply stage looks
        and peer not in report.peer_errors
        and apply_now(ctx, conn, report, peer, header.seq)
    ):
        return True
    report.left_buffered.add(peer)
    return False


def _log_received(ctx: CycleContext, conn: Connection, header: Header, duplicate: bool) -> None:
    """The line saying a message was taken, in the transaction that took it."""
    if header.seq == controls.CONTROL_SEQ:
        what = f"ack {header.ack}"
    else:
        part = f" part {header.part}/{header.parts}" if header.parts > 1 else ""
        what = f"{'duplicate ' if duplicate else ''}changeset #{header.seq}{part}"
    ctx.journal.info(
        "received",
        f"{what} from {header.sender}",
        peer=header.sender,
        seq=header.seq or None,
        conn=conn,
    )


def _went_back(ctx: CycleContext, conn: Connection, link: Link, header: Header) -> Link:
    """Notice, before its ack is believed, that our database went back to
    an older backup; returns the (possibly updated) link.

    Outbound: the peer applied a sequence number we have not reached, or
    one whose changeset id is not the entry we hold under that number —
    it applied the changesets of our lost future. Our entries up to its
    ack are then not what it applied: their changes are built again
    (under new numbers, with the rows' current values). Inbound: the
    peer says we acknowledged more than we have applied — we lost rows
    it sent. Either way a station has lost rows the host holds: it asks
    for a reload (see :mod:`.controls`) and retires its number leases.
    """
    peer = link.peer
    forked = header.ack > link.out_seq
    if not forked and header.ack > link.acked_seq and header.ack_cid:
        ours = conn.execute(
            select(outbox.c.cid).where(
                outbox.c.peer == peer, outbox.c.seq == header.ack, outbox.c.part == 1
            )
        ).scalar()
        forked = ours is not None and ours != header.ack_cid
    if forked:
        links_mod.outbound_went_back(conn, link, header.ack)
        ctx.journal.error(
            "went-back",
            f"{peer} has applied changesets up to #{header.ack} from us that this "
            f"database does not hold (we were at #{link.out_seq}): it was restored from "
            "an older backup; our changes since are sent again under new numbers",
            peer=peer,
            conn=conn,
        )
    lost = header.acked > link.in_seq
    if lost and not ctx.role.can_be_reloaded and not link.report_due:
        # the host is the reference copy: nobody can reload it; the station
        # sends again what it lost, and its leases (the witness, where it
        # caught the restore first, told every station already)
        links_mod.peer_to_report(conn, peer)
        ctx.journal.error(
            "went-back",
            f"{peer} says we applied its changesets up to #{header.acked}, but this "
            f"database has only #{link.in_seq}: it was restored from an older backup; "
            f"{peer} is told to send again what it sent since, and its number leases, "
            "before it gets another block",
            peer=peer,
            conn=conn,
        )
    if (forked or lost) and ctx.role.can_be_reloaded and not link.reload_wanted:
        retired = exchange.retire_all(conn)
        if retired:
            ctx.journal.warning(
                "range",
                f"{retired} number lease(s) retired: numbers may have been issued from "
                "them after the backup was taken; new blocks are asked for",
                peer=peer,
                conn=conn,
            )
        # our own rows the peer applied are gone here too: a reload brings
        # them back along with what we lost of the peer's
        links_mod.reload_wanted(conn, peer)
        if lost:
            ctx.journal.error(
                "went-back",
                f"{peer} says we applied its changesets up to #{header.acked}, but this "
                f"database has only #{link.in_seq}: it was restored from an older backup; "
                f"asking {peer} for a reload",
                peer=peer,
                conn=conn,
            )
    if forked or lost:
        return links_mod.one(conn, peer)
    return link


def _buffer(
    ctx: CycleContext,
    conn: Connection,
    link: Link,
    header: Header,
    blob: bytes,
    where: str,
) -> bool:
    """Buffer one part (in the caller's transaction); True if a duplicate.

    Set aside, never buffered (MessageError), what breaks the ``[limits]``
    a receiver can check: a changeset numbered more than ``max_ahead`` past
    the link (every number between would count as a gap to ask for) or in
    more than ``max_parts`` parts, one over the peer's share of the inbox
    (:func:`mailsync.inbox.admit`), and a first part that breaks any other
    limit (:meth:`Codec.check_first_part`: its decompressed size, and the
    lengths, rows, columns and tables its records declare). Later parts
    decode only after the first: they are checked as the changeset is
    applied, where a violation holds the link.
    """
    peer, seq = link.peer, header.seq
    limits = ctx.limits
    if seq > link.in_seq + limits.max_ahead:
        raise MessageError(
            f"{where}: changeset #{seq} from {peer} is beyond what a link at "
            f"#{link.in_seq} can be waiting for: "
            + exceeded(f"{seq - link.in_seq:,} ahead", "max_ahead", limits.max_ahead)
        )
    if header.parts > limits.max_parts:
        raise MessageError(
            f"{where}: changeset #{seq} from {peer} in "
            + exceeded(f"{header.parts:,} parts", "max_parts", limits.max_parts)
        )
    links_mod.acknowledged(conn, link, header.ack)
    if seq <= link.in_seq:
        # sent again: the peer has not heard our ack, so it goes again
        links_mod.duplicate_received(conn, peer, seq)
        return True
    held = conn.execute(
        select(inbox.c.part, inbox.c.parts, inbox.c.cid).where(
            inbox.c.peer == peer, inbox.c.seq == seq
        )
    ).all()
    if held and held[0].cid != header.cid:
        if len(held) == held[0].parts:
            return True  # a complete changeset under this number is held already
        # a partial one from an earlier build of this sequence number (its
        # sender went back to a backup): the sender's current one replaces it
        conn.execute(delete(inbox).where(inbox.c.peer == peer, inbox.c.seq == seq))
    elif any(r.part == header.part for r in held):
        return True
    evicted = inbox_mod.admit(conn, link, header, len(blob), limits, where)
    if evicted:
        ctx.journal.warning(
            "evicted",
            f"{where}: changeset(s) {', '.join(f'#{s}' for s in evicted)} from {peer} left the "
            f"full inbox to make room for #{seq}, which applies before them; they come "
            "again (their sender holds them until they are acknowledged)",
            peer=peer,
            conn=conn,
        )
    if header.part == 1:
        body = ctx.codec.unseal(header, blob, where, ctx.ring)  # verified above
        dictionaries.ready(conn, ctx.codec, peer, header.dictionary, where)
        ctx.codec.check_first_part(body, where, whole=header.parts == 1, header=header)
    inbox_mod.store(conn, peer, header, blob)
    return False
