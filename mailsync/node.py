"""A node — one installation — as a program sees it: the façade.

``Node.open(config)`` opens the config, keys and database; ``.sync()`` runs
one cycle (:mod:`mailsync.cycle`), ``.status()`` reads the state,
``.join()`` / ``.rotate_keys()`` change the node's identity, and the admin
methods (stations, rules) hand over to :mod:`mailsync.admin`. The cycle
never sees the node: it gets a :class:`~mailsync.cycle.context.CycleContext`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Self

from sqlalchemy import Connection, Engine, select, update

from mailsync import ranges, trust
from mailsync import rules as rules_mod
from mailsync.config import (
    NodeConfig,
    Role,
    check_email,
    check_node_id,
    config_path,
    load_config,
    render_config,
)
from mailsync.cycle.context import CycleContext
from mailsync.cycle.report import CycleReport
from mailsync.cycle.run import run_cycle
from mailsync.enroll import Bundle
from mailsync.errors import ConfigError, DatabaseError
from mailsync.journal import Journal
from mailsync.keys import KeyPair, KeyRing, PublicKey, key_path, load_keyring, write_keyring
from mailsync.status import LinkStatus, Status, node_status
from mailsync.store.engine import check_connection, open_engine, redact
from mailsync.store.tables import ensure_schema, get_meta, links, set_meta
from mailsync.transport import TransportContext
from mailsync.wire.envelope import Codec, Header


class Node:
    """One mailsync installation: its config, database and mailbox."""

    def __init__(
        self, config: NodeConfig, engine: Engine, ring: KeyRing, *, memory: object | None = None
    ) -> None:
        self.config = config
        self.engine = engine
        self.journal = Journal(engine, config.node_id)
        self.cycle = CycleContext(
            config, engine, ring, Codec(config.compression_level), self.journal, memory=memory
        )

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
        return self.cycle.transport_context()

    def seal(self, conn: Connection, header: Header, body: bytes) -> bytes:
        """Seal a changeset for its recipient (see :meth:`CycleContext.seal`)."""
        return self.cycle.seal(conn, header, body)

    # --------------------------------------------------------------- the cycle

    def sync(self) -> CycleReport:
        """Run one cycle: receive, apply, build, send, purge."""
        return run_cycle(self.cycle)

    def status(self) -> Status:
        """Role, peers, last contact, queues and problems, read from the database."""
        return node_status(self.engine, self.config, self.ring.current.public.key_id)

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
            self.cycle.ring = ring
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
        self.cycle.ring = ring
        self.journal.info("keys", f"keys rotated: new key {ring.current.public.key_id}")
        return ring.current.public

    @property
    def public_key(self) -> PublicKey:
        return self.ring.current.public

    def remove_station(self, station_id: str) -> None:
        self._require_host("a station")
        with self.engine.begin() as conn:
            rules_mod.remove_station(conn, station_id)
            retired = ranges.retire_station(conn, station_id)
            leases = f"; {retired} number lease(s) retired" if retired else ""
            self.journal.info("station", f"station {station_id} removed{leases}", conn=conn)

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
