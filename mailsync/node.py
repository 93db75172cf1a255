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

import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from sqlalchemy import Connection, Engine, select, update
from sqlalchemy.exc import SQLAlchemyError

from mailsync import admin, capture, faults, trust
from mailsync import rules as rules_mod
from mailsync.apply import Applied
from mailsync.build import Built, Direction, LinkPlan, build_for_link
from mailsync.config import (
    NodeConfig,
    Role,
    check_email,
    check_node_id,
    config_path,
    load_config,
    render_config,
)
from mailsync.delivery import Delivery, SeenInDatabase
from mailsync.dialects import dialect_for
from mailsync.enroll import Bundle
from mailsync.errors import ConfigError, DatabaseError, MailsyncError, TransportError
from mailsync.journal import Journal
from mailsync.keys import KeyPair, KeyRing, PublicKey, key_path, load_keyring, write_keyring
from mailsync.status import LinkStatus, Status, node_status
from mailsync.store.engine import check_connection, describe_db_error, open_engine, redact
from mailsync.store.tables import ensure_schema, get_meta, links, loads, set_meta
from mailsync.transport import TransportContext
from mailsync.wire.envelope import Codec, Header
from mailsync.wire.message import part_bytes


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
    #: per peer: messages received from it, sent to it, and its first error
    received_from: Counter[str] = field(default_factory=Counter)
    sent_to: Counter[str] = field(default_factory=Counter)
    peer_errors: dict[str, str] = field(default_factory=dict)

    def peer_outcomes(self) -> dict[str, str]:
        """One line per peer something happened with in this cycle."""
        peers = set(self.received_from) | set(self.sent_to) | set(self.peer_errors)
        peers |= {a.peer for a in self.applied} | {b.peer for b in self.built}
        out = {}
        for peer in sorted(peers):
            rows = sum(a.rows for a in self.applied if a.peer == peer)
            text = (
                f"{self.received_from[peer]} received, {rows} rows applied, "
                f"{self.sent_to[peer]} sent"
            )
            error = self.peer_errors.get(peer)
            out[peer] = f"failed: {error}" if error else f"ok: {text}"
        return out

    @property
    def rows_applied(self) -> int:
        return sum(a.rows for a in self.applied)

    @property
    def rows_parked(self) -> int:
        return sum(a.parked for a in self.applied)

    @property
    def rows_sent(self) -> int:
        return sum(b.rows for b in self.built)


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
        self.delivery = Delivery(self)

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

    def transport_context(self) -> TransportContext:
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

    def rules_for(self, peer: str) -> Any:
        station = peer if self.is_host else None
        return lambda conn: rules_mod.effective_rules(conn, station)

    def sender_keys(self, conn: Connection, peer: str) -> list[PublicKey]:
        return trust.usable_keys(conn, peer, self.config.key_grace_days)

    def seal(self, conn: Connection, header: Header, body: bytes) -> bytes:
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
    def inbound(self) -> Direction:
        return "up" if self.is_host else "down"

    # --------------------------------------------------------------- the cycle

    def sync(self) -> CycleReport:
        """Run one cycle: receive, apply, build, send, purge."""
        report = CycleReport()
        try:
            with self.journal.deferred():
                self.journal.info("cycle", "sync cycle started")
                self._step(report, self.delivery.receive)
                self.delivery.apply(report)
                self._build(report)
                self._step(report, self.delivery.send)
                self.delivery.purge()
                self.journal.info(
                    "cycle",
                    f"sync cycle done: {report.received} received, {report.rows_applied} rows "
                    f"applied, {report.rows_sent} rows queued, {report.sent} messages sent"
                    + (f", {len(report.errors)} errors" if report.errors else ""),
                )
        except SQLAlchemyError as exc:
            raise describe_db_error(self.engine, exc, "sync cycle failed") from exc
        return report

    def _step(self, report: CycleReport, step: Any) -> None:
        """Run a mailbox step; a mailbox failure is reported and the cycle goes on."""
        try:
            step(report)
        except TransportError as exc:
            report.errors.append(str(exc) + (f" (hint: {exc.hint})" if exc.hint else ""))
            self.journal.error("mailbox", str(exc))

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
                        # a reloaded station may hold the rules of its backup's day
                        send_rules=digest != link.rules_hash or link.reload_wanted,
                        rules_hash=digest,
                        initial_loads=[
                            t for t, r in effective.items() if "I" in r.down and t not in loaded
                        ],
                        announce_key=announce,
                        reload=bool(link.reload_wanted),
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
                    self.engine,
                    self.codec,
                    plan,
                    horizon,
                    self.config.batch_rows,
                    self.seal,
                    part_bytes(self.config.mailbox.max_message_bytes),
                )
            except MailsyncError as exc:
                report.errors.append(f"building for {plan.peer}: {exc}")
                report.peer_errors.setdefault(plan.peer, f"building: {exc}")
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
                    f"{built.raw_size} bytes raw, {built.size} bytes packed"
                    + (f" in {built.parts} parts" if built.parts > 1 else ""),
                    peer=built.peer,
                )

    def status(self) -> Status:
        """Role, peers, last contact, queues and problems, read from the database."""
        return node_status(self)

    # ------------------------------------------------------------ host admin

    # The admin commands are mailsync.admin's functions, bound to this node
    # as their site (each owns its transaction and writes its log line).
    add_station = admin.add_station

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

    remove_station = admin.remove_station
    stations = admin.list_stations
    station = admin.show_station
    add_rule = admin.add_rule
    remove_rule = admin.remove_rule
    rules = admin.list_rules


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
