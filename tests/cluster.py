"""A host and stations in one test: nodes, their databases and a post office."""

from __future__ import annotations

import json
import os
import random
import sqlite3
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Date,
    DateTime,
    Engine,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    String,
    Table,
    Unicode,
)

from mailsync.checksum import TableChecksum, table_checksum
from mailsync.enroll import read_bundle, write_bundle
from mailsync.node import CycleReport, Node, init_node
from mailsync.store.engine import open_engine
from mailsync.transport.memory import MemoryPostOffice
from mailsync.wire.envelope import read_header
from mailsync.wire.message import extract_envelope

DOMAIN = "example.test"

schema = MetaData()
customers = Table(
    "customers",
    schema,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("name", Unicode(200), nullable=False),
    Column("city", String(50)),
    Column("credit", Numeric(12, 2)),
    Column("since", Date),
    Column("active", Boolean),
    Column("touched", DateTime),
    Column("photo", LargeBinary),
)
invoices = Table(
    "invoices",
    schema,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("customer_id", Integer, ForeignKey("customers.id"), nullable=False),
    Column("total", Numeric(14, 2), nullable=False),
)
notes = Table(  # a composite text key
    "notes",
    schema,
    Column("owner", String(20), primary_key=True),
    Column("topic", String(40), primary_key=True),
    Column("body", Unicode(2000)),
)
orders = Table(  # a column bound to a number range in the range tests
    "orders",
    schema,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("order_no", String(20), unique=True),
    Column("customer", Unicode(100)),
)
TABLES = ("customers", "invoices", "notes", "orders")

#: the columns each schema version added (a migration test drops them and
#: sets the version back; version 4 added an index only)
SCHEMA_ADDED: dict[int, tuple[tuple[str, str], ...]] = {
    2: (("mailsync_links", "ctl_sent"), ("mailsync_links", "ctl_seen")),
    3: (
        ("mailsync_links", "held"),
        ("mailsync_links", "held_since"),
        ("mailsync_inbox", "size"),
        ("mailsync_inbox", "attempts"),
        ("mailsync_inbox", "last_error"),
        ("mailsync_inbox", "quarantined_at"),
    ),
    5: (
        ("mailsync_links", "rebase"),
        ("mailsync_links", "resend_all"),
        ("mailsync_links", "resent_seq"),
        ("mailsync_links", "report_due"),
        ("mailsync_links", "notice_sent_at"),
        ("mailsync_leases", "ceiling"),
    ),
    6: (("mailsync_ranges", "format"),),
    # no column: two new tables (mailsync_dictionaries,
    # mailsync_dictionary_samples), which ensure_schema's create_all makes
    7: (),
    8: (
        ("mailsync_changes", "cols"),
        ("mailsync_changes", "at"),
        ("mailsync_rules", "newest_by"),
        ("mailsync_conflicts", "state"),
        ("mailsync_conflicts", "source"),
        ("mailsync_conflicts", "differing"),
        ("mailsync_conflicts", "mine_from"),
        ("mailsync_conflicts", "mine_to"),
    ),
    9: (
        ("mailsync_links", "paused_at"),
        ("mailsync_links", "standing_due"),
        ("mailsync_links", "table_request"),
        ("mailsync_links", "request_told"),
        ("mailsync_loads", "since_column"),
        ("mailsync_loads", "since"),
    ),
    # and mailsync_verifications, a new table
    10: (("mailsync_links", "verify_due"),),
    # and a new table, mailsync_definitions
    11: (("mailsync_loads", "digest"), ("mailsync_loads", "stopped")),
    # 12: two new tables, mailsync_workers and mailsync_mailbag
}


def columns_since(version: int) -> list[tuple[str, str]]:
    """The columns the schema versions after ``version`` added."""
    return [c for v, cols in sorted(SCHEMA_ADDED.items()) if v > version for c in cols]


class ChaosPostOffice(MemoryPostOffice):
    """Delivers with faults while ``chaotic``: loss, duplicates, delay/reorder."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.rng = random.Random(seed)
        self.chaotic = True
        self.held: list[tuple[str, bytes]] = []
        self.dropped = self.duplicated = self.delayed = 0
        self.parts = 0  # changesets (first parts) in more than one part
        self.dictionaries = 0  # messages whose body names a zstd dictionary

    def deliver(self, recipient: str, raw: bytes) -> str:
        if b"X-Mailsync-Part: 1/" in raw and b"X-Mailsync-Part: 1/1\r\n" not in raw:
            self.parts += 1
        self.dictionaries += bool(read_header(extract_envelope(raw, "chaos"), "chaos").dictionary)
        if not self.chaotic:
            return super().deliver(recipient, raw)
        roll = self.rng.random()
        if roll < 0.15:
            self.dropped += 1
            return "dropped"
        if roll < 0.30:
            self.delayed += 1
            self.held.append((recipient, raw))
            return "held"
        message_id = super().deliver(recipient, raw)
        if roll < 0.40:
            self.duplicated += 1
            super().deliver(recipient, raw)
        if self.held and self.rng.random() < 0.5:  # release a delayed one, out of order
            late = self.held.pop(self.rng.randrange(len(self.held)))
            super().deliver(*late)
        return message_id

    def calm(self) -> None:
        self.chaotic = False
        for recipient, raw in self.held:
            super().deliver(recipient, raw)
        self.held = []


class Cluster:
    """A host (on ``host_url``) and SQLite stations, joined by a post office."""

    def __init__(
        self,
        root: Path,
        host_url: str,
        stations: Iterable[str] = ("koeln", "berlin"),
        *,
        transport: str = "memory",
        office: MemoryPostOffice | None = None,
        node_settings: dict[str, object] | None = None,
    ) -> None:
        self.root = root
        self.office = (office or MemoryPostOffice()) if transport == "memory" else None
        mail = "memory:" if transport == "memory" else f"maildir:{root / 'mail'}"
        self.names = ["hq", *stations]
        self.nodes: dict[str, Node] = {}
        self.engines: dict[str, Engine] = {}
        for name in self.names:
            url = host_url if name == "hq" else f"sqlite:///{root / (name + '.db')}"
            engine = open_engine(url)
            schema.create_all(engine)
            self.engines[name] = engine
            path = root / name / "mailsync.toml"
            init_node(
                path,
                role="host" if name == "hq" else "remote",
                node_id=name,
                database=url,
                address=f"{name}@{DOMAIN}",
                mail=mail,
            )
            if node_settings:
                text = path.read_text()
                extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in node_settings.items())
                for key in node_settings:
                    text = "\n".join(
                        line for line in text.splitlines() if not line.startswith(f"{key} =")
                    )
                path.write_text(text.replace("[node]\n", "[node]\n" + extra, 1) + "\n")
            self.nodes[name] = Node.open(path, memory=self.office)
        for name in self.names[1:]:
            self.enroll(name)

    def enroll(self, name: str, *, host_makes_keys: bool = False) -> None:
        """Enroll a station, by its own public key (default) or by a sealed bundle."""
        key = None if host_makes_keys else self.nodes[name].public_key
        _, bundle = self.host.add_station(name, f"{name}@{DOMAIN}", key=key)
        if host_makes_keys:
            path = self.root / f"{name}.bundle"
            write_bundle(path, bundle, "correct horse battery staple")
            bundle = read_bundle(path, lambda: "correct horse battery staple")
        self.nodes[name].join(bundle)

    def set_mailbox(self, name: str, settings: dict[str, object]) -> None:
        """Replace a node's [mailbox] section and reopen the node."""
        path = self.root / name / "mailsync.toml"
        text = path.read_text().split("[mailbox]")[0]
        lines = [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
        path.write_text(text + "[mailbox]\n" + "\n".join(lines) + "\n")
        self.nodes[name].close()
        self.nodes[name] = Node.open(path, memory=self.office)
        self.nodes[name].retry_backoff = 0.01

    @property
    def host(self) -> Node:
        return self.nodes["hq"]

    def sync(self, *names: str) -> dict[str, CycleReport]:
        return {name: self.nodes[name].sync() for name in names}

    def converge(self) -> None:
        """Stations up, host relays, stations down: enough for any one edit."""
        stations = self.names[1:]
        self.sync(*stations, "hq", *stations)

    def execute(self, name: str, stmt: Any, params: Any = None) -> None:
        with self.engines[name].begin() as conn:
            conn.execute(stmt, params) if params is not None else conn.execute(stmt)

    def rows(self, name: str, table: Table) -> list[tuple[Any, ...]]:
        with self.engines[name].connect() as conn:
            return [tuple(r) for r in conn.execute(table.select().order_by(*table.primary_key))]

    def checksums(self, table: str, nodes: Iterable[str] | None = None) -> dict[str, TableChecksum]:
        out = {}
        for name in nodes or self.names:
            with self.nodes[name].engine.connect() as conn:
                out[name] = table_checksum(conn, table)
        return out

    def agree(self, *tables: str, nodes: Iterable[str] | None = None) -> bool:
        """Do ``nodes`` (default: all) hold the same rows in ``tables`` (default: all)?"""
        for table in tables or TABLES:
            sums = list(self.checksums(table, nodes).values())
            if any(s != sums[0] for s in sums[1:]):
                return False
        return True

    def restart(self, name: str) -> None:
        """Close a node and open it again, as a new process would."""
        self.nodes[name].close()
        self.nodes[name] = Node.open(self.root / name / "mailsync.toml", memory=self.office)

    def backup(self, name: str) -> Path:
        """A copy of a station's SQLite database, as a nightly backup takes it."""
        copy = self.root / f"{name}.backup.db"
        with sqlite3.connect(self.root / f"{name}.db") as src, sqlite3.connect(copy) as dst:
            src.backup(dst)
        src.close()
        dst.close()
        return copy

    def restore(self, name: str, copy: Path) -> None:
        """Put a station's database back to ``copy`` (its disk died) and reopen it."""
        path = self.root / name / "mailsync.toml"
        self.nodes[name].close()
        self.engines[name].dispose()
        with sqlite3.connect(copy) as src, sqlite3.connect(self.root / f"{name}.db") as dst:
            src.backup(dst)
        src.close()
        dst.close()
        self.engines[name] = open_engine(f"sqlite:///{self.root / (name + '.db')}")
        self.nodes[name] = Node.open(path, memory=self.office)

    def cli(self, node: str, *args: str) -> subprocess.CompletedProcess[str]:
        """``mailsync ARGS`` for ``node``, run as a user runs it (any exit)."""
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "mailsync",
                "-c",
                str(self.root / node / "mailsync.toml"),
                *args,
            ],
            capture_output=True,
            text=True,
            check=False,
            cwd=self.root,
            env={**os.environ, "COLUMNS": "250"},
        )

    def close(self) -> None:
        for node in self.nodes.values():
            node.close()
        for engine in self.engines.values():
            engine.dispose()


def chaos_cluster(root: Path, seed: int) -> tuple[Cluster, ChaosPostOffice]:
    """A host and three stations over a chaotic post office; resends and
    gap requests go at once."""
    office = ChaosPostOffice(seed)
    c = Cluster(
        root,
        f"sqlite:///{root / 'hq.db'}",
        ("koeln", "berlin", "muenchen"),
        office=office,
        # dictionaries trained after a few changesets and rotated often:
        # carried, acknowledged, used and replaced under loss and reordering
        node_settings={
            "resend_after_minutes": 0,
            "gap_request_minutes": 0,
            "dictionary_samples": 4,
            "dictionary_rotate": 5,
        },
    )
    return c, office
