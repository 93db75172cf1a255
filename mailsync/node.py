"""A node — one installation — as a program sees it: the façade.

``Node.open(config)`` opens the config, keys and database; ``.sync()`` runs
one cycle (:mod:`mailsync.cycle`), ``.status()`` reads the state,
``.join()`` / ``.rotate_keys()`` change the node's identity, and the admin
methods (stations, rules) hand over to :mod:`mailsync.admin`. The cycle
never sees the node: it gets a :class:`~mailsync.cycle.context.CycleContext`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Self

from sqlalchemy import Connection, Engine, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from mailsync import admin, admin_stations, joined, restore, standing, trust
from mailsync import link as links_mod
from mailsync import rules as rules_mod
from mailsync.alerts.notify import Watcher, send_test
from mailsync.config import (
    NodeConfig,
    Role,
    check_email,
    check_node_id,
    config_path,
    load_config,
    render_config,
)
from mailsync.cycle import selection
from mailsync.cycle.context import CycleContext
from mailsync.cycle.report import CycleReport
from mailsync.cycle.run import run_cycle
from mailsync.enroll import Bundle
from mailsync.errors import ConfigError, DatabaseError
from mailsync.journal import Journal
from mailsync.keys import KeyPair, KeyRing, PublicKey, key_path, load_keyring, write_keyring
from mailsync.metrics import record_cycle
from mailsync.ranges.draw import next_number
from mailsync.shared_reads import Sealing
from mailsync.status import LinkStatus, Status, node_status
from mailsync.store.engine import check_connection, describe_db_error, open_engine, redact
from mailsync.store.migrations import ensure_schema
from mailsync.store.tables import get_meta, now, set_meta
from mailsync.store.witness import witness_path
from mailsync.transport import TransportContext
from mailsync.wire.envelope import Codec, DictionarySettings, Header
from mailsync.workers.claims import Claimant
from mailsync.workers.registry import any_alive as workers_alive


class Node:
    """One mailsync installation: its config, database and mailbox."""

    def __init__(
        self, config: NodeConfig, engine: Engine, ring: KeyRing, *, memory: object | None = None
    ) -> None:
        self.config = config
        self.engine = engine
        self.journal = Journal(engine, config.node_id)
        codec = Codec(
            config.compression_level,
            config.limits,
            config.dictionary_level,
            DictionarySettings(
                config.dictionary_bytes, config.dictionary_samples, config.dictionary_rotate
            ),
        )
        self.cycle = CycleContext(config, engine, ring, codec, self.journal, memory=memory)
        #: the [alerts] check after each cycle (nothing without [alerts])
        self.watch = Watcher(config, engine, self.journal, self.cycle.transport_context)
        #: seconds the last cycle of this process took (metrics)
        self.last_cycle_seconds: float | None = None

    @property
    def ring(self) -> KeyRing:
        return self.cycle.ring

    @property
    def codec(self) -> Codec:
        return self.cycle.codec

    @property
    def memory(self) -> object | None:
        return self.cycle.memory

    @property
    def retry_backoff(self) -> float:
        """Seconds; the SMTP retry backoff base (tests make it small)."""
        return self.cycle.retry_backoff

    @retry_backoff.setter
    def retry_backoff(self, value: float) -> None:
        self.cycle.retry_backoff = value

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
        _refuse_missing_file(cfg)
        engine = open_engine(cfg.database_url())
        try:
            check_connection(engine)
            _refuse_foreign(engine, cfg)
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
        node = cls(cfg, engine, ring, memory=memory)
        if owner is not None:
            try:
                # the first thing any mailsync action does: a database that
                # went back to a backup is caught before it issues a number
                node.confirm_witness()
            except BaseException:
                engine.dispose()
                raise
        return node

    def confirm_witness(self) -> restore.Finding:
        """Compare the database with its restore witness, heal what went
        back, renew the witness (:mod:`mailsync.restore`)."""
        try:
            found = restore.confirm(self.engine, witness_path(self.config.path), self.journal)
        except SQLAlchemyError as exc:
            raise describe_db_error(self.engine, exc, "cannot check the restore witness") from exc
        # the next cycle need not confirm again at its start (a commit
        # before it, by anyone on this engine, says otherwise)
        self.cycle.witness_confirmed = True
        return found

    def next_number(self, name: str) -> int | str:
        """Draw one number of range ``name`` from this node's leases (after the
        witness check, like every mailsync action), committed at once: an
        ``int``, or the text of a range with a format."""
        return next_number(self.engine, name)

    def close(self) -> None:
        try:
            self.cycle.keeper.close()  # the mail sessions kept between cycles
        finally:
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

    def transport_context(self) -> TransportContext:
        return self.cycle.transport_context()

    def seal(
        self, conn: Connection, header: Header, body: bytes, /, known: Sealing | None = None
    ) -> bytes:
        """Seal a changeset for its recipient (see :meth:`CycleContext.seal`)."""
        return self.cycle.seal(conn, header, body, known)

    # --------------------------------------------------------------- the cycle

    def sync(
        self,
        stations: Iterable[str] = (),
        tables: Iterable[str] = (),
        *,
        claimant: Claimant | None = None,
    ) -> CycleReport:
        """Run one cycle: receive, apply, build, send, purge — for every link
        and table, or limited to some (:mod:`mailsync.cycle.selection`;
        ConfigError for one that is not there, before anything runs); then,
        with ``[alerts]``, tell a person what needs one
        (:mod:`mailsync.alerts`: never fails the cycle, costs nothing
        without it). ``claimant``: this process is one of several workers
        of the node, and the cycle serves the links it can claim
        (:mod:`mailsync.workers`)."""
        started = time.monotonic()
        try:
            if claimant is not None:
                report = self._share_cycle(claimant)
            else:
                report = self._cycle(stations, tables)
        finally:
            self.last_cycle_seconds = time.monotonic() - started
        self.watch.after_cycle()
        return report

    def _cycle(self, stations: Iterable[str], tables: Iterable[str]) -> CycleReport:
        if self.is_host and workers_alive(self.engine):
            # they hold the links between them: a cycle of its own here
            # would build, apply and send beside them on the same links
            raise ConfigError(
                f"{self.config.path}: workers serve this node (`mailsync serve --workers`): "
                "they sync it",
                hint="`mailsync status` lists them; stop them to sync by hand",
            )
        if not stations and not tables:
            return run_cycle(self.cycle)
        with self.engine.connect() as conn:
            chosen = selection.choose(conn, is_host=self.is_host, stations=stations, tables=tables)
        self.cycle.selection = chosen
        try:
            return run_cycle(self.cycle)
        finally:
            self.cycle.selection = selection.EVERYTHING

    def _share_cycle(self, claimant: Claimant) -> CycleReport:
        """One worker's cycle: its share of the links, claimed for the cycle."""
        share = claimant.claim()
        self.cycle.share = share
        self.cycle.selection = selection.Selection(stations=share.peers)
        try:
            report = run_cycle(self.cycle)
            report.links_served, report.coordinated = len(share.peers), share.coordinator
            return report
        finally:
            self.cycle.share = None
            self.cycle.selection = selection.EVERYTHING
            claimant.release(share)

    def remember_cycle(self, ok: bool) -> None:
        """Record when the last cycle ended, how long it took and whether it
        succeeded, for ``status --format openmetrics``: ``sync`` and ``serve``
        call it after each cycle (one small commit, outside the cycle; a
        database that fails here fails nothing)."""
        if self.last_cycle_seconds is None:
            return
        with contextlib.suppress(SQLAlchemyError):
            record_cycle(self.engine, now(), self.last_cycle_seconds, ok)

    def test_alerts(self) -> list[str]:
        """Send a test alert to every ``[alerts] to`` address through the
        node's own send account; the addresses it went to (TransportError
        when none, ConfigError without ``[alerts]``)."""
        return send_test(self.config, self.cycle.transport_context)

    def status(self) -> Status:
        """Role, peers, last contact, queues and problems, read from the database."""
        return node_status(self.engine, self.config, self.ring.current.public.key_id)

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
            self.cycle.ring = ring
        with self.engine.begin() as conn:
            others = [p for p in links_mod.peers(conn) if p != bundle.host_id]
            if others:
                raise ConfigError(f"this node already belongs to host {others[0]!r}")
            if links_mod.get(conn, bundle.host_id) is None:
                links_mod.create(conn, bundle.host_id, bundle.host_address)
            else:
                links_mod.readdress(conn, bundle.host_id, bundle.host_address)
            # the bundle told the host our key
            links_mod.key_told(conn, bundle.host_id, self.ring.current.public.key_id)
            trust.trust_key(conn, bundle.host_id, bundle.host_key)
            standing.forget(conn)  # removed or disabled once: joined again now
            # what this station changes before its rules come is not lost
            captured = [] if rules_mod.all_rules(conn) else joined.capture_all(conn)
            self.journal.info(
                "join",
                f"joined host {bundle.host_id} <{bundle.host_address}>, "
                f"host key {bundle.host_key.key_id}"
                + (
                    f"; changes to {len(captured)} table(s) captured until the rules come"
                    if captured
                    else ""
                ),
                conn=conn,
            )

    def rotate_keys(self) -> PublicKey:
        """New keys for this node; peers learn them with the next message,
        signed with the old key, which keeps opening mail for the grace period."""
        ring = self.ring.rotated(self.config.key_grace_days)
        write_keyring(key_path(self.config.path), ring)
        self.cycle.ring = ring
        self.journal.info("keys", f"keys rotated: new key {ring.current.public.key_id}")
        return ring.current.public

    @property
    def public_key(self) -> PublicKey:
        return self.ring.current.public

    remove_station = admin.remove_station
    edit_station = admin.edit_station
    reload_station = admin.reload_station
    request_reload = admin_stations.request_reload
    disable_station = admin_stations.disable_station
    enable_station = admin_stations.enable_station
    verify = admin.verify
    verifications = admin.verifications
    verifications_of = admin.verifications_of
    resync_table = admin.resync_table
    stations = admin.list_stations
    station = admin.show_station
    add_rule = admin.add_rule
    remove_rule = admin.remove_rule
    rules = admin.list_rules


def _refuse_missing_file(cfg: NodeConfig) -> None:
    """A SQLite file that is not there is a mistyped path, not a new node:
    opening it would make an empty database and report success."""
    url = make_url(cfg.database)
    if url.get_backend_name() != "sqlite":
        return
    db = url.database or ""
    if db in ("", ":memory:") or db.startswith("file:") or Path(db).exists():
        return
    raise DatabaseError(
        f"{cfg.path}: no database file at {db}",
        hint="a mistyped path in [node] database? `mailsync init` makes a new node",
    )


def _refuse_foreign(engine: Engine, cfg: NodeConfig) -> None:
    """A database without mailsync's tables is an application database no
    node was made for: say so rather than add the tables silently."""
    if inspect(engine).has_table("mailsync_meta"):
        return
    raise DatabaseError(
        f"{cfg.path}: database {redact(engine)} is not a mailsync node (it has no mailsync tables)",
        hint=f"`mailsync init {cfg.role} …` makes it one",
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
    send: str | None = None,
    receive: str | None = None,
    password_env: str | None = None,
    password_file: str | None = None,
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
    text = render_config(
        node_id=node_id,
        role=role,
        database=database,
        address=address,
        mail=mail,
        send=send,
        receive=receive,
        password_env=password_env,
        password_file=password_file,
    )
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
        engine = open_engine(cfg.database_url())
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
