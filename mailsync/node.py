"""A node — one installation — and its sync cycle.

``Node.open(config).sync()`` runs one cycle (DESIGN §4)::

    receive → check → buffer → apply in sequence order → capture/route/pack
    → send → purge

Every step is idempotent and commits before the next one depends on it: a
message leaves the mailbox only after the commit that buffered it (or found
it a duplicate); an outbox entry, its sequence number and the change-log
cursor commit together; a buffered changeset, its rows and the link's
inbound sequence number commit together. A cycle killed at any instant and
run again loses nothing and applies nothing twice.
"""

from __future__ import annotations

import datetime as dt
import io
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from sqlalchemy import Connection, Engine, delete, func, or_, select, update
from sqlalchemy.exc import SQLAlchemyError

from mailsync import capture, faults, trust
from mailsync import rules as rules_mod
from mailsync.apply import Applied, apply_buffered
from mailsync.build import Built, Direction, LinkPlan, build_for_link
from mailsync.changeset import ChangesetWriter, Control, Source, read_changeset
from mailsync.config import (
    NodeConfig,
    Role,
    check_email,
    check_node_id,
    config_path,
    load_config,
    render_config,
)
from mailsync.db import check_connection, describe_db_error, open_engine, redact
from mailsync.dialects import dialect_for
from mailsync.enroll import Bundle
from mailsync.envelope import Codec, Header, read_header
from mailsync.errors import (
    ApplyError,
    ConfigError,
    DatabaseError,
    MailsyncError,
    MessageError,
    TransportError,
)
from mailsync.journal import Journal
from mailsync.keys import KeyPair, KeyRing, PublicKey, key_path, load_keyring, write_keyring
from mailsync.message import Address, build_message, extract_envelope, is_mailsync
from mailsync.schema import (
    changes,
    ensure_schema,
    get_meta,
    inbox,
    links,
    loads,
    log,
    mailbox_seen,
    now,
    outbox,
    parked,
    set_meta,
)
from mailsync.transport import TransportContext, open_receiver, open_sender

#: The sequence number of unsequenced (control) messages: acks, resend requests.
CONTROL_SEQ = 0

#: Log entries older than this are purged at the end of a cycle.
LOG_RETENTION_DAYS = 10


@dataclass
class CycleReport:
    """What one sync cycle did."""

    received: int = 0
    duplicates: int = 0
    set_aside: int = 0
    applied: list[Applied] = field(default_factory=list)
    built: list[Built] = field(default_factory=list)
    sent: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def rows_applied(self) -> int:
        return sum(a.rows for a in self.applied)

    @property
    def rows_parked(self) -> int:
        return sum(a.parked for a in self.applied)

    @property
    def rows_sent(self) -> int:
        return sum(b.rows for b in self.built)


@dataclass(frozen=True)
class LinkStatus:
    peer: str
    address: str
    last_contact: dt.datetime | None
    last_sent: dt.datetime | None
    out_seq: int
    acked_seq: int
    in_seq: int
    unsent: int
    unacked: int
    buffered: int
    pending_changes: int
    oldest_unacked: dt.datetime | None = None
    missing: tuple[int, ...] = ()


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


class Node:
    """One mailsync installation: its config, database and mailbox."""

    def __init__(
        self, config: NodeConfig, engine: Engine, ring: KeyRing, *, memory: object | None = None
    ) -> None:
        self.config = config
        self.engine = engine
        self.ring = ring
        self.memory = memory
        self.codec = Codec(config.compression_level)
        self.journal = Journal(engine, config.node_id)
        self.dialect = dialect_for(engine)
        #: seconds; the SMTP retry backoff base (tests make it small)
        self.retry_backoff = 1.0
        self._forward: list[bytes] = []

    @classmethod
    def open(
        cls,
        config: NodeConfig | str | os.PathLike[str] | None = None,
        *,
        memory: object | None = None,
    ) -> Node:
        """Open a node from its config (a NodeConfig, a path, or the default)."""
        cfg = config if isinstance(config, NodeConfig) else load_config(config_path(config))
        ring = load_keyring(key_path(cfg.path), cfg.node_id)
        engine = open_engine(cfg.database)
        try:
            check_connection(engine)
            ensure_schema(engine)
            with engine.connect() as conn:
                owner, role = get_meta(conn, "node_id"), get_meta(conn, "role")
        except BaseException:
            engine.dispose()
            raise
        if owner is not None and (owner != cfg.node_id or role != cfg.role):
            engine.dispose()
            raise ConfigError(
                f"{cfg.path}: database {redact(engine)} belongs to {role} {owner!r}, "
                f"not to {cfg.role} {cfg.node_id!r}"
            )
        return cls(cfg, engine, ring, memory=memory)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ helpers

    @property
    def is_host(self) -> bool:
        return self.config.role == "host"

    def _require_host(self, what: str) -> None:
        if not self.is_host:
            raise ConfigError(
                f"{what} is defined on the host; {self.config.node_id!r} is a remote "
                "(it receives its rules from the host)"
            )

    def _transport_context(self) -> TransportContext:
        box = self.config.mailbox
        return TransportContext(
            address=box.address,
            base_dir=self.config.base_dir,
            keep_processed=box.keep_processed,
            memory=self.memory,
            secret=box.secret,
            ca_file=box.ca_file,
            insecure=box.insecure,
            timeout=box.timeout,
            processed_folder=box.processed_folder,
            unrecognized_folder=box.unrecognized_folder,
            seen=SeenInDatabase(self.engine, box.receive),
            retry_backoff=self.retry_backoff,
        )

    def _rules_for(self, peer: str) -> Any:
        station = peer if self.is_host else None
        return lambda conn: rules_mod.effective_rules(conn, station)

    def _sender_keys(self, conn: Connection, peer: str) -> list[PublicKey]:
        return trust.usable_keys(conn, peer, self.config.key_grace_days)

    def _open(self, conn: Connection, blob: bytes, origin: str) -> tuple[Header, Source]:
        """Verify and decrypt a buffered envelope (again: the buffer is just a table)."""
        header = read_header(blob, origin)
        return self.codec.open(blob, origin, self.ring, self._sender_keys(conn, header.sender))

    def _seal(self, conn: Connection, header: Header, body: bytes) -> bytes:
        """Encrypt for the peer's current key; sign with our old key until the
        peer has acknowledged the message that announced our new one."""
        peer = trust.current_key(conn, header.recipient)
        if peer is None:
            raise ConfigError(
                f"no public key for {header.recipient!r}",
                hint="enroll it again (`mailsync station add --key` / `mailsync join`)",
            )
        link = conn.execute(select(links).where(links.c.peer == header.recipient)).one()
        signer = self.ring.current.sign
        previous = self.ring.usable_previous(self.config.key_grace_days)
        if previous and link.acked_seq < link.key_announced_seq:
            signer = previous[0].sign
        return self.codec.seal(header, body, peer, signer)

    @property
    def _inbound(self) -> Direction:
        return "up" if self.is_host else "down"

    # --------------------------------------------------------------- the cycle

    def sync(self) -> CycleReport:
        """Run one cycle: receive, apply, build, send, purge."""
        report = CycleReport()
        self.journal.info("cycle", "sync cycle started")
        try:
            self._step(report, self._receive)
            self._apply(report)
            self._build(report)
            self._step(report, self._send)
            self._purge()
        except SQLAlchemyError as exc:
            raise describe_db_error(self.engine, exc, "sync cycle failed") from exc
        self.journal.info(
            "cycle",
            f"sync cycle done: {report.received} received, {report.rows_applied} rows applied, "
            f"{report.rows_sent} rows queued, {report.sent} messages sent"
            + (f", {len(report.errors)} errors" if report.errors else ""),
        )
        return report

    def _step(self, report: CycleReport, step: Any) -> None:
        """Run a mailbox step; a mailbox failure is reported and the cycle goes on."""
        try:
            step(report)
        except TransportError as exc:
            report.errors.append(str(exc) + (f" (hint: {exc.hint})" if exc.hint else ""))
            self.journal.error("mailbox", str(exc))

    def _receive(self, report: CycleReport) -> None:
        me = self.config.node_id
        with open_receiver(self.config.mailbox.receive, self._transport_context()) as rx:
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
                        keys = self._sender_keys(conn, header.sender)
                        self.codec.verify(blob, where, keys)
                        if header.seq == CONTROL_SEQ:
                            self._control(conn, link, header.ack, blob, where, keys)
                            duplicate = False
                        else:
                            duplicate = self._buffer(conn, link, header.seq, header.ack, blob)
                except MessageError as exc:
                    if self.config.mailbox.forward_unrecognized:
                        self._forward.append(msg.raw)
                    rx.set_aside(msg.id, str(exc))
                    self.journal.warning("rejected", f"set aside: {exc}")
                    report.set_aside += 1
                    continue
                faults.point("after-buffer")
                rx.processed(msg.id)  # only now: the buffer commit made it redundant
                report.received += 1
                report.duplicates += duplicate
                what = (
                    f"ack {header.ack}"
                    if header.seq == CONTROL_SEQ
                    else f"{'duplicate ' if duplicate else ''}changeset #{header.seq}"
                )
                self.journal.info("received", f"{what} from {header.sender}", peer=header.sender)

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
        _, stream = self.codec.open(blob, where, self.ring, keys)
        for record in read_changeset(stream, origin=where):
            if isinstance(record, Control) and record.kind == "resend":
                wanted = [int(s) for s in record.payload][:10_000]
                conn.execute(
                    update(outbox)
                    .where(outbox.c.peer == link.peer, outbox.c.seq.in_(wanted))
                    .values(sent_at=None)
                )
                self.journal.info(
                    "resend-request",
                    f"{link.peer} asks again for #{', #'.join(map(str, wanted[:20]))}",
                    peer=link.peer,
                    conn=conn,
                )

    def _buffer(self, conn: Connection, link: Any, seq: int, ack: int, blob: bytes) -> bool:
        """Buffer an envelope (in the caller's transaction); True if a duplicate."""
        peer = link.peer
        self._acknowledged(conn, link, ack)
        if seq <= link.in_seq:
            return True
        held = conn.execute(
            select(inbox.c.seq).where(inbox.c.peer == peer, inbox.c.seq == seq)
        ).first()
        if held:
            return True
        conn.execute(inbox.insert().values(peer=peer, seq=seq, blob=blob, received_at=now()))
        return False

    def _apply(self, report: CycleReport) -> None:
        me = self.config.node_id
        with self.engine.connect() as conn:
            peers = [(r.peer, r.in_seq) for r in conn.execute(select(links.c.peer, links.c.in_seq))]
        for peer, in_seq in peers:
            with self.engine.begin() as conn:  # stale duplicates left by a crash
                conn.execute(delete(inbox).where(inbox.c.peer == peer, inbox.c.seq <= in_seq))
            seq = in_seq + 1
            while True:
                with self.engine.connect() as conn:
                    blob = conn.execute(
                        select(inbox.c.blob).where(inbox.c.peer == peer, inbox.c.seq == seq)
                    ).scalar()
                if blob is None:
                    break
                try:
                    applied = apply_buffered(
                        self.engine,
                        self._open,
                        me=me,
                        peer=peer,
                        seq=seq,
                        blob=blob,
                        direction=self._inbound,
                        rules_for=self._rules_for(peer),
                        accept_rules=not self.is_host,
                    )
                except ApplyError as exc:
                    report.errors.append(str(exc))
                    self.journal.error("apply-failed", str(exc), peer=peer)
                    break
                faults.point("after-apply")
                report.applied.append(applied)
                self.journal.info(
                    "applied", f"changeset #{seq} from {peer}: {applied.rows} rows", peer=peer
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
                seq += 1

    def _plans(self, conn: Connection) -> list[LinkPlan]:
        me = self.config.node_id
        mine = self.ring.current.public
        plans = []
        for link in conn.execute(select(links).order_by(links.c.peer)).all():
            announce = None if link.key_announced == mine.key_id else mine
            if self.is_host:
                effective = rules_mod.effective_rules(conn, link.peer)
                digest = rules_mod.rules_hash(effective)
                loaded = {
                    r[0]
                    for r in conn.execute(select(loads.c.tbl).where(loads.c.station == link.peer))
                }
                plans.append(
                    LinkPlan(
                        me,
                        link.peer,
                        "down",
                        effective,
                        send_rules=digest != link.rules_hash,
                        rules_hash=digest,
                        initial_loads=[
                            t for t, r in effective.items() if "I" in r.down and t not in loaded
                        ],
                        announce_key=announce,
                    )
                )
            else:
                plans.append(
                    LinkPlan(
                        me,
                        link.peer,
                        "up",
                        rules_mod.effective_rules(conn, None),
                        announce_key=announce,
                    )
                )
        return plans

    def _build(self, report: CycleReport) -> None:
        with self.engine.begin() as conn:
            plans = self._plans(conn)
            tables = sorted({t for p in plans for t in p.rules})
            repaired = capture.ensure_capture(conn, tables) if tables else []
        for name in repaired:
            self.journal.warning("capture", f"capture triggers of table {name} (re)installed")
        horizon = self.dialect.change_horizon(self.engine)
        for plan in plans:
            try:
                built = build_for_link(
                    self.engine, self.codec, plan, horizon, self.config.batch_rows, self._seal
                )
            except MailsyncError as exc:
                report.errors.append(f"building for {plan.peer}: {exc}")
                self.journal.error(
                    "build-failed", f"building for {plan.peer}: {exc}", peer=plan.peer
                )
                continue
            if built is not None:
                faults.point("after-build")
                report.built.append(built)
                self.journal.info(
                    "queued",
                    f"changeset #{built.seq} for {built.peer}: {built.rows} rows, "
                    f"{built.raw_size} bytes raw, {built.size} bytes packed",
                    peer=built.peer,
                )

    def _controls(self, conn: Connection, carried: set[str]) -> list[tuple[str, str, bytes, int]]:
        """Unsequenced messages due: a bare ack where the peer has not heard of
        what we applied (and gets no data message to carry it), and a resend
        request where a gap in what it sent us is old enough."""
        due = []
        limit = now() - dt.timedelta(minutes=self.config.gap_request_minutes)
        for link in conn.execute(select(links)).all():
            held = conn.execute(
                select(inbox.c.seq, inbox.c.received_at).where(inbox.c.peer == link.peer)
            ).all()
            missing: list[int] = []
            if held:
                oldest = min(_aware(r.received_at) for r in held)
                asked = link.gap_requested_at
                if oldest <= limit and (asked is None or _aware(asked) <= limit):
                    missing = missing_sequences(link.in_seq, {r.seq for r in held})
            if not missing and (link.in_seq <= link.ack_sent or link.peer in carried):
                continue
            buffer = io.BytesIO()
            compressed = self.codec.body_writer(buffer)
            writer = ChangesetWriter(compressed, {"from": self.config.node_id, "to": link.peer})
            if missing:
                writer.control("resend", missing)
                conn.execute(
                    update(links).where(links.c.peer == link.peer).values(gap_requested_at=now())
                )
            writer.close()
            compressed.close()  # type: ignore[no-untyped-call]
            header = Header(self.config.node_id, link.peer, CONTROL_SEQ, ack=link.in_seq)
            due.append(
                (link.peer, link.address, self._seal(conn, header, buffer.getvalue()), link.in_seq)
            )
        return due

    def _send(self, report: CycleReport) -> None:
        me = Address(self.config.node_id, self.config.mailbox.address)
        stale = now() - dt.timedelta(minutes=self.config.resend_after_minutes)
        with self.engine.begin() as conn:
            pending = conn.execute(
                select(outbox.c.peer, outbox.c.seq, links.c.address, outbox.c.sent_at)
                .join(links, links.c.peer == outbox.c.peer)
                .where(or_(outbox.c.sent_at.is_(None), outbox.c.sent_at <= stale))
                .order_by(outbox.c.peer, outbox.c.seq)
            ).all()
            # a peer that gets a data message learns our ack from it
            controls = self._controls(conn, carried={p for p, *_ in pending})
        forward, self._forward = self._forward, []
        if not pending and not forward and not controls:
            return
        limit = self.config.mailbox.max_message_bytes
        with open_sender(self.config.mailbox.send, self._transport_context()) as tx:
            target = self.config.mailbox.forward_unrecognized
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
            for peer, seq, address, sent_at in pending:
                with self.engine.connect() as conn:
                    blob = conn.execute(
                        select(outbox.c.blob).where(outbox.c.peer == peer, outbox.c.seq == seq)
                    ).scalar_one()
                header = read_header(blob, f"outbox #{seq} for {peer}")
                # No transaction is held while the mail system works: sending
                # twice after a crash here is harmless (the peer drops duplicates).
                raw = build_message(header, me, Address(peer, address), blob)
                if len(raw) > limit:
                    raise TransportError(
                        f"changeset #{seq} for {peer} makes a {len(raw):,}-byte message, over "
                        f"max_message_bytes ({limit:,}); it stays in the outbox",
                        hint="raise max_message_bytes if the provider allows it "
                        "(splitting into parts comes with the delivery protocol)",
                    )
                tx.send(me.email, address, raw)
                faults.point("after-send")
                with self.engine.begin() as conn:
                    conn.execute(
                        update(outbox)
                        .where(outbox.c.peer == peer, outbox.c.seq == seq)
                        .values(sent_at=now(), send_count=outbox.c.send_count + 1)
                    )
                    conn.execute(update(links).where(links.c.peer == peer).values(last_sent=now()))
                    conn.execute(
                        update(links)
                        .where(links.c.peer == peer, links.c.ack_sent < header.ack)
                        .values(ack_sent=header.ack)
                    )
                report.sent += 1
                again = "sent again" if sent_at is not None else "sent"
                self.journal.info(
                    "sent", f"changeset #{seq} {again} to {peer} <{address}>", peer=peer
                )

    def _purge(self) -> None:
        with self.engine.begin() as conn:
            cursors = [r[0] for r in conn.execute(select(links.c.change_cursor))]
            if cursors:
                conn.execute(delete(changes).where(changes.c.id <= min(cursors)))
            cutoff = now() - dt.timedelta(days=LOG_RETENTION_DAYS)
            conn.execute(delete(log).where(log.c.at < cutoff))

    # ----------------------------------------------------------------- status

    def status(self) -> Status:
        """Role, peers, last contact, queues and problems, read from the database."""
        with self.engine.begin() as conn:
            link_rows = conn.execute(select(links).order_by(links.c.peer)).all()
            result = []
            for link in link_rows:
                routed = (
                    or_(changes.c.origin.is_(None), changes.c.origin != link.peer)
                    if self.is_host
                    else changes.c.origin.is_(None)
                )
                effective = rules_mod.effective_rules(conn, link.peer if self.is_host else None)
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
                        func.count().filter(outbox.c.sent_at.is_not(None)),
                        func.min(outbox.c.created_at),
                    ).where(outbox.c.peer == link.peer)
                ).one()
                held = set(
                    conn.execute(select(inbox.c.seq).where(inbox.c.peer == link.peer)).scalars()
                )
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
                        missing=tuple(missing_sequences(link.in_seq, held)),
                    )
                )
            tables = sorted({r.table for r in rules_mod.all_rules(conn)})
            missing = capture.check_capture(conn, tables) if tables else []
            parked_count = int(conn.execute(select(func.count()).select_from(parked)).scalar() or 0)
            since = now() - dt.timedelta(days=LOG_RETENTION_DAYS)
            counts: dict[str, int] = dict(
                conn.execute(
                    select(log.c.event, func.count())
                    .where(log.c.at >= since, log.c.event.in_(["rejected", "apply-failed"]))
                    .group_by(log.c.event)
                ).all()
            )
        return Status(
            node_id=self.config.node_id,
            role=self.config.role,
            address=self.config.mailbox.address,
            database=redact(self.engine),
            links=result,
            tables=tables,
            capture_missing=missing,
            set_aside=int(counts.get("rejected", 0)),
            errors=int(counts.get("apply-failed", 0)),
            key_id=self.ring.current.public.key_id,
            parked=parked_count,
        )

    # ------------------------------------------------------------ host admin

    def add_station(
        self, station_id: str, email: str, label: str = "", *, key: PublicKey | None = None
    ) -> tuple[rules_mod.Station, Bundle]:
        """Define a station; returns it and its enrollment bundle.

        With the station's public ``key`` (it made its own keys) the bundle
        holds only public data. Without one, mailsync makes the station's
        keys and the bundle carries them: write it with a passphrase.
        """
        self._require_host("a station")
        pair = None
        if key is None:
            pair = KeyPair.generate()
            key = pair.public
        with self.engine.begin() as conn:
            station = rules_mod.add_station(
                conn, station_id, email, label, host_id=self.config.node_id
            )
            trust.trust_key(conn, station_id, key)
            # the bundle tells the station our current key
            conn.execute(
                update(links)
                .where(links.c.peer == station_id)
                .values(key_announced=self.ring.current.public.key_id)
            )
            self.journal.info(
                "station", f"station {station_id} <{email}> added, key {key.key_id}", conn=conn
            )
        bundle = Bundle(
            host_id=self.config.node_id,
            host_address=self.config.mailbox.address,
            host_key=self.ring.current.public,
            station_id=station_id,
            station_address=email,
            station_keys=pair,
        )
        return station, bundle

    def join(self, bundle: Bundle) -> None:
        """On a remote: take the host (and perhaps our keys) from a bundle."""
        if self.is_host:
            raise ConfigError(f"{self.config.node_id!r} is the host; only a remote joins")
        me = self.config.node_id
        if bundle.station_id != me or bundle.station_address != self.config.mailbox.address:
            raise ConfigError(
                f"the bundle is for station {bundle.station_id!r} <{bundle.station_address}>, "
                f"this node is {me!r} <{self.config.mailbox.address}>"
            )
        if bundle.station_keys is not None:
            ring = KeyRing(me, bundle.station_keys)
            write_keyring(key_path(self.config.path), ring)
            self.ring = ring
        with self.engine.begin() as conn:
            others = conn.execute(select(links.c.peer).where(links.c.peer != bundle.host_id)).all()
            if others:
                raise ConfigError(f"this node already belongs to host {others[0][0]!r}")
            values = {
                "address": bundle.host_address,
                "key_announced": self.ring.current.public.key_id,
            }
            if conn.execute(select(links.c.peer).where(links.c.peer == bundle.host_id)).first():
                conn.execute(update(links).where(links.c.peer == bundle.host_id).values(**values))
            else:
                conn.execute(links.insert().values(peer=bundle.host_id, **values))
            trust.trust_key(conn, bundle.host_id, bundle.host_key)
            self.journal.info(
                "join",
                f"joined host {bundle.host_id} <{bundle.host_address}>, "
                f"host key {bundle.host_key.key_id}",
                conn=conn,
            )

    def rotate_keys(self) -> PublicKey:
        """New keys for this node; peers learn them with the next message,
        signed with the old key, which keeps opening mail for the grace period."""
        ring = self.ring.rotated(self.config.key_grace_days)
        write_keyring(key_path(self.config.path), ring)
        self.ring = ring
        self.journal.info("keys", f"keys rotated: new key {ring.current.public.key_id}")
        return ring.current.public

    @property
    def public_key(self) -> PublicKey:
        return self.ring.current.public

    def remove_station(self, station_id: str) -> None:
        self._require_host("a station")
        with self.engine.begin() as conn:
            rules_mod.remove_station(conn, station_id)
            self.journal.info("station", f"station {station_id} removed", conn=conn)

    def stations(self) -> list[rules_mod.Station]:
        with self.engine.connect() as conn:
            return rules_mod.list_stations(conn)

    def station(self, station_id: str) -> tuple[rules_mod.Station, dict[str, rules_mod.Rule]]:
        self._require_host("a station")
        with self.engine.connect() as conn:
            station = rules_mod.get_station(conn, station_id)
            return station, rules_mod.effective_rules(conn, station_id)

    def add_rule(
        self,
        table: str,
        *,
        down: str,
        up: str,
        station: str | None = None,
        row_filter: str | None = None,
        conflict: str = "host-wins",
    ) -> tuple[rules_mod.Rule, list[str]]:
        self._require_host("a table rule")
        with self.engine.begin() as conn:
            rule, warnings = rules_mod.add_rule(
                conn,
                table,
                down=down,
                up=up,
                station=station,
                row_filter=row_filter,
                conflict=conflict,
            )
            self.journal.info(
                "rule",
                f"rule for {table} ({station or 'all stations'}): "
                f"down {rules_mod.describe_ops(down)}, up {rules_mod.describe_ops(up)}",
                conn=conn,
            )
        return rule, warnings

    def remove_rule(self, table: str, station: str | None = None) -> None:
        self._require_host("a table rule")
        with self.engine.begin() as conn:
            rules_mod.remove_rule(conn, table, station)
            self.journal.info(
                "rule", f"rule for {table} ({station or 'all stations'}) removed", conn=conn
            )

    def rules(self) -> list[rules_mod.Rule]:
        with self.engine.connect() as conn:
            return rules_mod.all_rules(conn)


def missing_sequences(applied: int, held: set[int]) -> list[int]:
    """The sequence numbers between the last applied and the buffered ones."""
    return [s for s in range(applied + 1, max(held, default=0)) if s not in held]


def _aware(value: dt.datetime) -> dt.datetime:
    """SQLite hands timestamps back without their (UTC) zone."""
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


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


def init_node(
    path: Path,
    *,
    role: Role,
    node_id: str,
    database: str,
    address: str,
    mail: str,
    force: bool = False,
) -> NodeConfig:
    """Write a node's config and key file and create the mailsync tables.

    Refuses to overwrite a config (unless ``force``) or to take over a
    database that belongs to another node. An existing key file of the same
    node is kept (a re-init never changes a node's identity). The config file
    is written last, atomically, so a failure leaves no half-made node behind.
    """
    check_node_id(node_id)
    check_email(address, "node address")
    if path.exists() and not force:
        raise ConfigError(f"{path} already exists", hint="pass --force to overwrite it")
    text = render_config(node_id=node_id, role=role, database=database, address=address, mail=mail)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = key_path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=".mailsync-", suffix=".toml", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        cfg = load_config(tmp)
        cfg = NodeConfig(**{**cfg.__dict__, "path": path})
        if keys.exists():
            load_keyring(keys, node_id)  # refuses another node's or a readable file
        engine = open_engine(cfg.database)
        try:
            check_connection(engine)
            ensure_schema(engine)
            with engine.begin() as conn:
                owner = get_meta(conn, "node_id")
                if owner is not None and (owner != node_id or get_meta(conn, "role") != role):
                    raise DatabaseError(
                        f"database {redact(engine)} already belongs to node {owner!r}",
                        hint="give this node its own database",
                    )
                set_meta(conn, "node_id", node_id)
                set_meta(conn, "role", role)
        finally:
            engine.dispose()
        if not keys.exists():
            write_keyring(keys, KeyRing(node_id, KeyPair.generate()))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return cfg


__all__ = ["CycleReport", "LinkStatus", "Node", "Status", "init_node"]
