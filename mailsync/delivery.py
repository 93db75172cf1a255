"""Exactly-once delivery over lossy mail: the link protocol (DESIGN §7).

Per link, every changeset has a sequence number and travels as one or more
parts, each sealed on its own. The receiver buffers parts (still sealed) in
``mailsync_inbox`` with one commit per message, and only then lets the
mailbox forget the message; it applies a changeset once all its parts are
there and its predecessor is applied, in one transaction with the link's
inbound sequence number. Duplicates are dropped by (sequence, part).

Every message carries the sender's ack (the highest sequence it applied from
the recipient); an envelope leaves the outbox only when an ack covers it.
Control messages (sequence 0: bare acks, resend requests) are never
sequenced nor acknowledged, go out before any data, and are acted on as
soon as they arrive. Unacknowledged parts are sent again after
``resend_after_minutes``; a receiver that holds later parts while earlier
ones are missing asks for exactly the missing ones after
``gap_request_minutes``.
"""

from __future__ import annotations

import datetime as dt
import io
import secrets
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, delete, func, select, update

from mailsync import faults
from mailsync import rules as rules_mod
from mailsync.apply import apply_buffered
from mailsync.config import DEFAULT_LOG_RETENTION_DAYS
from mailsync.errors import ApplyError, MessageError, TransportError
from mailsync.ranges import exchange as range_exchange
from mailsync.store.tables import (
    changes,
    horizons,
    inbox,
    links,
    loads,
    log_table,
    mailbox_seen,
    now,
    outbox,
)
from mailsync.transport import open_receiver, open_sender
from mailsync.wire.changeset import ChangesetWriter, Control, Source, read_changeset
from mailsync.wire.controls import RangeGrants, RangeReport
from mailsync.wire.envelope import Header, read_header
from mailsync.wire.message import Address, build_message, extract_envelope, is_mailsync

if TYPE_CHECKING:
    from mailsync.node import CycleReport, Node

#: The sequence number of unsequenced (control) messages: acks, resend requests.
CONTROL_SEQ = 0

#: Log entries older than this are purged at the end of a cycle (the default
#: of ``log_retention_days``).
LOG_RETENTION_DAYS = DEFAULT_LOG_RETENTION_DAYS

#: At most this many sequence numbers or parts are asked for in one request.
MAX_RESEND_REQUEST = 10_000

#: What a resend request names: a whole changeset, or one part of one.
Wanted = int | tuple[int, int]


def missing_sequences(applied: int, held: set[int]) -> list[int]:
    """The sequence numbers between the last applied and the buffered ones."""
    return [s for s in range(applied + 1, max(held, default=0)) if s not in held]


def missing_parts(held: dict[int, tuple[int, set[int]]]) -> list[tuple[int, int]]:
    """(seq, part) of the parts absent from partly received changesets;
    ``held`` maps seq to (number of parts, parts present)."""
    return [
        (seq, part)
        for seq, (parts, present) in sorted(held.items())
        for part in range(1, parts + 1)
        if part not in present
    ]


def held_parts(conn: Connection, peer: str) -> dict[int, tuple[int, set[int]]]:
    """What the inbox buffer holds from ``peer``: seq → (parts, parts present)."""
    held: dict[int, tuple[int, set[int]]] = {}
    for seq, part, parts in conn.execute(
        select(inbox.c.seq, inbox.c.part, inbox.c.parts).where(inbox.c.peer == peer)
    ):
        held.setdefault(seq, (parts, set()))[1].add(part)
    return held


def _aware(value: dt.datetime) -> dt.datetime:
    """SQLite hands timestamps back without their (UTC) zone."""
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def _describe(wanted: list[Wanted]) -> str:
    shown = [f"#{w}" if isinstance(w, int) else f"#{w[0]} part {w[1]}" for w in wanted[:20]]
    return ", ".join(shown) + (" …" if len(wanted) > 20 else "")


class Delivery:
    """The receive, apply, send and purge steps of a node's cycle."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.engine: Engine = node.engine
        self.journal = node.journal
        self._forward: list[bytes] = []
        #: per peer, the highest ack its bare acks carried this cycle
        self._bare_acks: dict[str, int] = {}

    # ---------------------------------------------------------------- receive

    def receive(self, report: CycleReport) -> None:
        node = self.node
        me = node.config.node_id
        with open_receiver(node.config.mailbox.receive, node.transport_context()) as rx:
            for msg in rx.fetch():
                where = f"message {msg.id}"
                try:
                    if not is_mailsync(msg.raw):
                        raise MessageError(f"{where}: not a mailsync message")
                    blob = extract_envelope(msg.raw, where)
                    header = read_header(blob, where)
                    if header.recipient != me:
                        raise MessageError(
                            f"{where}: addressed to {header.recipient!r}, not {me!r}"
                        )
                    with self.engine.begin() as conn:
                        link = conn.execute(
                            select(links).where(links.c.peer == header.sender)
                        ).first()
                        if link is None:
                            raise MessageError(f"{where}: unknown sender {header.sender!r}")
                        keys = node.sender_keys(conn, header.sender)
                        node.codec.verify(blob, where, keys)
                        link = self._went_back(conn, link, header)
                        if header.seq == CONTROL_SEQ:
                            self._control(conn, link, header.ack, blob, where, keys)
                            duplicate = False
                        else:
                            duplicate = self._buffer(conn, link, header, blob)
                except MessageError as exc:
                    if node.config.mailbox.forward_unrecognized:
                        self._forward.append(msg.raw)
                    rx.set_aside(msg.id, str(exc))
                    self.journal.warning("rejected", f"set aside: {exc}")
                    report.set_aside += 1
                    continue
                faults.point("after-buffer")
                rx.processed(msg.id)  # only now: the buffer commit made it redundant
                report.received += 1
                report.received_from[header.sender] += 1
                report.duplicates += duplicate
                if header.seq == CONTROL_SEQ:
                    what = f"ack {header.ack}"
                else:
                    part = f" part {header.part}/{header.parts}" if header.parts > 1 else ""
                    what = f"{'duplicate ' if duplicate else ''}changeset #{header.seq}{part}"
                self.journal.info("received", f"{what} from {header.sender}", peer=header.sender)

    def _went_back(self, conn: Connection, link: Any, header: Header) -> Any:
        """Notice, before its ack is believed, that our database went back to
        an older backup; returns the (possibly updated) link row.

        Outbound: the peer applied a sequence number we have not reached, or
        one whose changeset id is not the entry we hold under that number —
        it applied the changesets of our lost future. Our entries up to its
        ack are then not what it applied: their changes are built again
        (under new numbers, with the rows' current values). Inbound: the
        peer says we acknowledged more than we have applied — we lost rows
        it sent. Either way a station has lost rows the host holds: it asks
        for a reload (see ``_controls``) and retires its number leases.
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
            rewind = conn.execute(
                select(func.min(outbox.c.cursor_from)).where(
                    outbox.c.peer == peer, outbox.c.seq <= header.ack
                )
            ).scalar()
            conn.execute(delete(outbox).where(outbox.c.peer == peer, outbox.c.seq <= header.ack))
            values: dict[str, Any] = {
                "out_seq": max(link.out_seq, header.ack),
                "acked_seq": header.ack,
            }
            if rewind is not None:
                values["change_cursor"] = min(link.change_cursor, rewind)
            if link.acked_seq < link.key_announced_seq <= header.ack:
                values["key_announced"] = None  # the announcement went with them
            conn.execute(update(links).where(links.c.peer == peer).values(**values))
            self.journal.error(
                "went-back",
                f"{peer} has applied changesets up to #{header.ack} from us that this "
                f"database does not hold (we were at #{link.out_seq}): it was restored from "
                "an older backup; our changes since are sent again under new numbers",
                peer=peer,
                conn=conn,
            )
        lost = header.acked > link.in_seq
        if lost and self.node.is_host and link.reload_asked_at is None:
            # the host is the reference copy: nobody can reload it (logged once)
            conn.execute(update(links).where(links.c.peer == peer).values(reload_asked_at=now()))
            self.journal.error(
                "went-back",
                f"{peer} says we applied its changesets up to #{header.acked}, but this "
                f"database has only #{link.in_seq}: it was restored from an older backup; "
                f"the rows {peer} sent since are missing here — re-enroll the station",
                peer=peer,
                conn=conn,
            )
        if (forked or lost) and not self.node.is_host and not link.reload_wanted:
            retired = range_exchange.retire_all(conn)
            if retired:
                self.journal.warning(
                    "range",
                    f"{retired} number lease(s) retired: numbers may have been issued from "
                    "them after the backup was taken; new blocks are asked for",
                    peer=peer,
                    conn=conn,
                )
        if (forked or lost) and not self.node.is_host and not link.reload_wanted:
            # our own rows the peer applied are gone here too: a reload brings
            # them back along with what we lost of the peer's
            conn.execute(
                update(links)
                .where(links.c.peer == peer)
                .values(
                    reload_wanted=True, reload_asked_at=None, reload_request=secrets.token_hex(8)
                )
            )
            if lost:
                self.journal.error(
                    "went-back",
                    f"{peer} says we applied its changesets up to #{header.acked}, but this "
                    f"database has only #{link.in_seq}: it was restored from an older backup; "
                    f"asking {peer} for a reload",
                    peer=peer,
                    conn=conn,
                )
        if forked or lost:
            return conn.execute(select(links).where(links.c.peer == peer)).one()
        return link

    def _acknowledged(self, conn: Connection, link: Any, ack: int) -> None:
        """The peer applied everything up to ``ack``: those envelopes are delivered."""
        values: dict[str, Any] = {"last_contact": now()}
        if ack > link.acked_seq:
            values["acked_seq"] = min(ack, link.out_seq)
            conn.execute(delete(outbox).where(outbox.c.peer == link.peer, outbox.c.seq <= ack))
        conn.execute(update(links).where(links.c.peer == link.peer).values(**values))

    def _control(
        self, conn: Connection, link: Any, ack: int, blob: bytes, where: str, keys: Any
    ) -> None:
        """An unsequenced message: an ack, perhaps asking for missing envelopes."""
        self._acknowledged(conn, link, ack)
        self._bare_acks[link.peer] = max(ack, self._bare_acks.get(link.peer, 0))
        _, stream = self.node.codec.open(blob, where, self.node.ring, keys)
        for record in read_changeset(stream, origin=where):
            if isinstance(record, Control) and record.kind == "reload" and self.node.is_host:
                self._reload_requested(conn, link, record.payload)
            if isinstance(record, Control) and record.kind == "ranges":
                try:  # signed by the peer is not well-formed: parse checks it
                    done = (
                        range_exchange.host_incoming(
                            conn, link.peer, RangeReport.parse(record.payload)
                        )
                        if self.node.is_host
                        else range_exchange.station_incoming(
                            conn, RangeGrants.parse(record.payload)
                        )
                    )
                except MessageError as exc:
                    raise MessageError(f"{where}: {exc}") from exc
                for line in done:
                    self.journal.info("range", line, peer=link.peer, conn=conn)
            if isinstance(record, Control) and record.kind == "resend":
                wanted = _parse_wanted(record.payload)
                whole = [w for w in wanted if isinstance(w, int)]
                if whole:
                    conn.execute(
                        update(outbox)
                        .where(outbox.c.peer == link.peer, outbox.c.seq.in_(whole))
                        .values(sent_at=None)
                    )
                for seq, part in (w for w in wanted if isinstance(w, tuple)):
                    conn.execute(
                        update(outbox)
                        .where(
                            outbox.c.peer == link.peer, outbox.c.seq == seq, outbox.c.part == part
                        )
                        .values(sent_at=None)
                    )
                self.journal.info(
                    "resend-request",
                    f"{link.peer} asks again for {_describe(wanted)}",
                    peer=link.peer,
                    conn=conn,
                )

    def _reload_requested(self, conn: Connection, link: Any, payload: Any) -> None:
        """A station lost rows it had applied: the next build for it is a full
        load that replaces its copy. While a reload is queued or on its way
        (not yet acknowledged), a request again is answered by that one; a
        request already served (the station asked again before the reload
        reached it, and the mail was slow) is ignored."""
        if not isinstance(payload, dict):
            raise MessageError(f"reload request from {link.peer}: malformed")
        asked_at, request = payload.get("in_seq"), payload.get("id")
        if not isinstance(asked_at, int) or not isinstance(request, str | None):
            raise MessageError(f"reload request from {link.peer}: malformed")
        if link.reload_wanted or link.reload_seq > link.acked_seq:
            return
        if request is not None and request == link.reload_request:
            return
        peer = link.peer
        conn.execute(delete(loads).where(loads.c.station == peer))
        # the load supersedes what waits for the station; what those entries
        # carried is built again from the change log (and our key announced)
        rewind = conn.execute(
            select(func.min(outbox.c.cursor_from)).where(outbox.c.peer == peer)
        ).scalar()
        conn.execute(delete(outbox).where(outbox.c.peer == peer))
        values: dict[str, Any] = {"reload_wanted": True, "reload_request": request}
        if rewind is not None:
            values["change_cursor"] = min(int(link.change_cursor), int(rewind))
        if link.key_announced_seq > link.acked_seq:
            values["key_announced"] = None
        conn.execute(update(links).where(links.c.peer == peer).values(**values))
        self.journal.warning(
            "reload",
            f"{peer} went back to an older backup (it has our changesets up to #{asked_at}): "
            "its tables are sent again in full",
            peer=peer,
            conn=conn,
        )

    def _buffer(self, conn: Connection, link: Any, header: Header, blob: bytes) -> bool:
        """Buffer one part (in the caller's transaction); True if a duplicate."""
        peer, seq = link.peer, header.seq
        self._acknowledged(conn, link, header.ack)
        if seq <= link.in_seq:
            # sent again: the peer has not heard our ack, so it goes again
            conn.execute(
                update(links)
                .where(links.c.peer == peer, links.c.ack_sent >= seq)
                .values(ack_sent=seq - 1)
            )
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
        conn.execute(
            inbox.insert().values(
                peer=peer,
                seq=seq,
                part=header.part,
                parts=header.parts,
                cid=header.cid,
                base=header.after,
                blob=blob,
                received_at=now(),
            )
        )
        return False

    # ------------------------------------------------------------------ apply

    def _next_complete(self, peer: str, in_seq: int) -> tuple[int, int] | None:
        """The changeset to apply next, once all its parts are here: (seq, parts)."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(inbox.c.seq, inbox.c.parts, func.count())
                .where(inbox.c.peer == peer, inbox.c.seq > in_seq, inbox.c.base <= in_seq)
                .group_by(inbox.c.seq, inbox.c.parts)
                .order_by(inbox.c.seq)
                .limit(1)
            ).first()
        if row is None or row[2] < row[1]:
            return None
        return int(row[0]), int(row[1])

    def _stream(self, peer: str, seq: int, parts: int) -> Any:
        """An opener for :func:`apply_buffered`: the changeset's parts are read
        from the buffer, verified and decrypted one at a time, in order."""
        node = self.node

        def open_stream(conn: Connection, origin: str) -> tuple[Header, Source]:
            keys = node.sender_keys(conn, peer)

            def part(number: int) -> tuple[Header, bytes]:
                blob = conn.execute(
                    select(inbox.c.blob).where(
                        inbox.c.peer == peer, inbox.c.seq == seq, inbox.c.part == number
                    )
                ).scalar_one()
                where = f"{origin} part {number}/{parts}" if parts > 1 else origin
                header, body = node.codec.decrypt(blob, where, node.ring, keys)
                if header.part != number or header.parts != parts:
                    raise MessageError(f"{where}: part numbers do not match the buffer")
                return header, body

            first, body = part(1)
            held = [body]
            del body

            def bodies() -> Iterator[bytes]:
                yield held.pop()  # not kept alive while the later parts are read
                for number in range(2, parts + 1):
                    header, more = part(number)
                    if header.cid != first.cid or header.seq != first.seq:
                        raise MessageError(f"{origin}: part {number} is from another changeset")
                    yield more

            return first, node.codec.stream(bodies(), origin)

        return open_stream

    def apply(self, report: CycleReport) -> None:
        node = self.node
        me = node.config.node_id
        with self.engine.connect() as conn:
            peers = [(r.peer, r.in_seq) for r in conn.execute(select(links.c.peer, links.c.in_seq))]
        for peer, in_seq in peers:
            with self.engine.begin() as conn:  # stale duplicates left by a crash
                conn.execute(delete(inbox).where(inbox.c.peer == peer, inbox.c.seq <= in_seq))
            while (found := self._next_complete(peer, in_seq)) is not None:
                seq, parts = found
                try:
                    applied = apply_buffered(
                        self.engine,
                        self._stream(peer, seq, parts),
                        me=me,
                        peer=peer,
                        seq=seq,
                        direction=node.inbound,
                        rules_for=node.rules_for(peer),
                        accept_rules=not node.is_host,
                    )
                except ApplyError as exc:
                    report.errors.append(str(exc))
                    report.peer_errors.setdefault(peer, str(exc))
                    self.journal.error("apply-failed", str(exc), peer=peer)
                    break
                faults.point("after-apply")
                report.applied.append(applied)
                self._log_applied(applied, peer, seq)
                in_seq = seq
            self._forget_horizons(peer)

    def _forget_horizons(self, peer: str) -> None:
        """After the apply: the peer's changesets from now on name the ack of
        its latest bare ack or a later one — except those still buffered
        (fetched with it, or early), which keep the horizons they name. One
        built earlier and still in the mail is tested against what is left."""
        ack = self._bare_acks.pop(peer, 0)
        if not ack:
            return
        with self.engine.begin() as conn:
            for blob in conn.execute(
                select(inbox.c.blob).where(inbox.c.peer == peer, inbox.c.part == 1)
            ).scalars():
                ack = min(ack, read_header(blob, f"buffered changeset from {peer}").ack)
            conn.execute(delete(horizons).where(horizons.c.peer == peer, horizons.c.seq < ack))

    def _log_applied(self, applied: Any, peer: str, seq: int) -> None:
        self.journal.info(
            "applied", f"changeset #{seq} from {peer}: {applied.rows} rows", peer=peer
        )
        if applied.reloaded:
            self.journal.warning(
                "reloaded",
                f"changeset #{seq} from {peer} replaced this database's copy of its tables "
                "(it had gone back to an older backup)",
                peer=peer,
            )
        for line in applied.conflicts:
            self.journal.warning(
                "conflict",
                f"changeset #{seq} from {peer}: {line} (`mailsync conflicts list`)",
                peer=peer,
            )
        if applied.parked:
            self.journal.error(
                "parked",
                f"changeset #{seq} from {peer}: {applied.parked} row(s) could not be "
                "applied and are parked (`mailsync errors list`)",
                peer=peer,
            )
        for what, count in applied.refused.items():
            table, op = what.split(":")
            self.journal.warning(
                "refused",
                f"changeset #{seq} from {peer}: {count} {rules_mod.OP_NAMES[op]} row(s) "
                f"of table {table} refused: the rules do not allow them",
                peer=peer,
            )

    # ------------------------------------------------------------------- send

    def _controls(self, conn: Connection, carried: set[str]) -> list[tuple[str, str, bytes, int]]:
        """Unsequenced messages due: a bare ack where the peer has not heard of
        what we applied (and gets no data message to carry it), and a resend
        request where a gap in what it sent us is old enough."""
        node = self.node
        due = []
        limit_gap = dt.timedelta(minutes=node.config.gap_request_minutes)
        limit = now() - limit_gap
        resend = dt.timedelta(minutes=node.config.resend_after_minutes)
        for link in conn.execute(select(links)).all():
            oldest = conn.execute(
                select(func.min(inbox.c.received_at)).where(inbox.c.peer == link.peer)
            ).scalar()
            wanted: list[Wanted] = []
            asked = link.gap_requested_at
            if (
                oldest is not None
                and _aware(oldest) <= limit
                and (asked is None or _aware(asked) <= limit)
            ):
                held = held_parts(conn, link.peer)
                wanted = [*missing_sequences(link.in_seq, set(held)), *missing_parts(held)]
                wanted = wanted[:MAX_RESEND_REQUEST]
            reload = (
                not node.is_host
                and link.reload_wanted
                and (link.reload_asked_at is None or _aware(link.reload_asked_at) <= limit)
            )
            if node.is_host:
                grants = range_exchange.host_outgoing(conn, link.peer, resend)
                report: RangeGrants | RangeReport | None = grants or None
                report_due = bool(grants)
            else:
                report, report_due = range_exchange.station_outgoing(conn, limit_gap)
            if (
                not wanted
                and not reload
                and not report_due
                and (link.in_seq <= link.ack_sent or link.peer in carried)
            ):
                continue
            buffer = io.BytesIO()
            compressed = node.codec.body_writer(buffer)
            writer = ChangesetWriter(compressed, {"from": node.config.node_id, "to": link.peer})
            if wanted:
                writer.control("resend", [w if isinstance(w, int) else list(w) for w in wanted])
                conn.execute(
                    update(links).where(links.c.peer == link.peer).values(gap_requested_at=now())
                )
            if report is not None:
                writer.control("ranges", report.payload())
                if isinstance(report, RangeReport):
                    range_exchange.station_reported(conn, report)
            if reload:
                writer.control("reload", {"in_seq": int(link.in_seq), "id": link.reload_request})
                conn.execute(
                    update(links).where(links.c.peer == link.peer).values(reload_asked_at=now())
                )
            writer.close()
            compressed.close()  # type: ignore[no-untyped-call]
            header = Header(
                node.config.node_id,
                link.peer,
                CONTROL_SEQ,
                ack=link.in_seq,
                ack_cid=link.in_cid,
                acked=link.acked_seq,
            )
            due.append(
                (link.peer, link.address, node.seal(conn, header, buffer.getvalue()), link.in_seq)
            )
        return due

    def send(self, report: CycleReport) -> None:
        """Controls first, then every part due (never sent, or unacknowledged
        for longer than ``resend_after_minutes``), oldest first."""
        node = self.node
        me = Address(node.config.node_id, node.config.mailbox.address)
        stale = now() - dt.timedelta(minutes=node.config.resend_after_minutes)
        with self.engine.begin() as conn:
            due = (outbox.c.sent_at.is_(None)) | (outbox.c.sent_at <= stale)
            pending = conn.execute(
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
            # a peer that gets a data message sealed with our current ack
            # learns it from that (a resent one carries the ack of its day)
            carried = {r.peer for r in pending if r.ack >= r.in_seq}
            controls = self._controls(conn, carried=carried)
        forward, self._forward = self._forward, []
        if not pending and not forward and not controls:
            return
        limit = node.config.mailbox.max_message_bytes
        with open_sender(node.config.mailbox.send, node.transport_context()) as tx:
            target = node.config.mailbox.forward_unrecognized
            for raw in forward:
                assert target is not None
                tx.send(me.email, target, raw)
                self.journal.info("forwarded", f"unrecognized message forwarded to {target}")
            for peer, address, blob, acked in controls:
                header = read_header(blob, f"ack for {peer}")
                tx.send(me.email, address, build_message(header, me, Address(peer, address), blob))
                with self.engine.begin() as conn:
                    conn.execute(
                        update(links)
                        .where(links.c.peer == peer, links.c.ack_sent < acked)
                        .values(ack_sent=acked)
                    )
                report.sent += 1
                report.sent_to[peer] += 1
            for peer, seq, part, address, sent_at, *_ in pending:
                with self.engine.connect() as conn:
                    stored: bytes | None = conn.execute(
                        select(outbox.c.blob).where(
                            outbox.c.peer == peer, outbox.c.seq == seq, outbox.c.part == part
                        )
                    ).scalar()
                if stored is None:
                    continue  # acknowledged meanwhile
                header = read_header(stored, f"outbox #{seq} for {peer}")
                name = f"#{seq}" + (f" part {part}/{header.parts}" if header.parts > 1 else "")
                # No transaction is held while the mail system works: sending
                # twice after a crash here is harmless (the peer drops duplicates).
                raw = build_message(header, me, Address(peer, address), stored)
                if len(raw) > limit:
                    raise TransportError(
                        f"changeset {name} for {peer} makes a {len(raw):,}-byte message, over "
                        f"max_message_bytes ({limit:,}); it stays in the outbox",
                        hint="it was cut into parts under a larger limit: raise "
                        "max_message_bytes back, or let the peer re-enroll",
                    )
                tx.send(me.email, address, raw)
                faults.point("after-send")
                with self.engine.begin() as conn:
                    conn.execute(
                        update(outbox)
                        .where(outbox.c.peer == peer, outbox.c.seq == seq, outbox.c.part == part)
                        .values(sent_at=now(), send_count=outbox.c.send_count + 1)
                    )
                    conn.execute(update(links).where(links.c.peer == peer).values(last_sent=now()))
                    conn.execute(
                        update(links)
                        .where(links.c.peer == peer, links.c.ack_sent < header.ack)
                        .values(ack_sent=header.ack)
                    )
                report.sent += 1
                report.sent_to[peer] += 1
                again = "sent again" if sent_at is not None else "sent"
                self.journal.info(
                    "sent", f"changeset {name} {again} to {peer} <{address}>", peer=peer
                )

    # ------------------------------------------------------------------ purge

    def purge(self) -> None:
        """Forget changes every peer they are routed to has acknowledged.

        For each link, the changes up to its cursor are either not routed to
        the peer or packed into outbox entries; those after the oldest
        unacknowledged entry's starting cursor stay until its ack comes, so
        a station offline for a month still gets its deletes.

        A peer that may send us rows keeps, besides, the changes past the
        horizon of the last changeset it sent: its next changeset (perhaps
        one still in the mail) is tested against them for conflicts.
        """
        with self.engine.begin() as conn:
            safe = []
            for peer, cursor in conn.execute(select(links.c.peer, links.c.change_cursor)).all():
                oldest = conn.execute(
                    select(func.min(outbox.c.cursor_from)).where(outbox.c.peer == peer)
                ).scalar()
                safe.append(int(cursor if oldest is None else min(cursor, oldest)))
                rules = self.node.rules_for(peer)(conn)
                inbound = (r.up if self.node.is_host else r.down for r in rules.values())
                if any(inbound):
                    seen = conn.execute(
                        select(horizons.c.horizon)
                        .where(horizons.c.peer == peer)
                        .order_by(horizons.c.seq)
                        .limit(1)
                    ).scalar()
                    if seen is not None:
                        safe.append(int(seen))
            if safe:
                conn.execute(delete(changes).where(changes.c.id <= min(safe)))
            cutoff = now() - dt.timedelta(days=self.node.config.log_retention_days)
            conn.execute(delete(log_table).where(log_table.c.at < cutoff))


def _parse_wanted(payload: Any) -> list[Wanted]:
    """A resend request's list: sequence numbers and [seq, part] pairs."""
    wanted: list[Wanted] = []
    for item in payload if isinstance(payload, list) else []:
        if isinstance(item, int):
            wanted.append(item)
        elif isinstance(item, list) and len(item) == 2 and all(isinstance(i, int) for i in item):
            wanted.append((item[0], item[1]))
        if len(wanted) >= MAX_RESEND_REQUEST:
            break
    return wanted


class SeenInDatabase:
    """The ids a receiver left in its mailbox on purpose, kept per mailbox URL."""

    def __init__(self, engine: Engine, mailbox: str) -> None:
        self._engine = engine
        self._mailbox = mailbox

    def seen(self, message_id: str) -> bool:
        with self._engine.connect() as conn:
            return (
                conn.execute(
                    select(mailbox_seen.c.uid).where(
                        mailbox_seen.c.mailbox == self._mailbox, mailbox_seen.c.uid == message_id
                    )
                ).first()
                is not None
            )

    def remember(self, message_id: str) -> None:
        if not self.seen(message_id):
            with self._engine.begin() as conn:
                conn.execute(mailbox_seen.insert().values(mailbox=self._mailbox, uid=message_id))

    def keep_only(self, present: set[str]) -> None:
        with self._engine.begin() as conn:
            held = conn.execute(
                select(mailbox_seen.c.uid).where(mailbox_seen.c.mailbox == self._mailbox)
            ).scalars()
            gone = [uid for uid in held if uid not in present]
            if gone:
                conn.execute(
                    delete(mailbox_seen).where(
                        mailbox_seen.c.mailbox == self._mailbox, mailbox_seen.c.uid.in_(gone)
                    )
                )
