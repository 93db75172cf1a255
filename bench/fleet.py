"""A host with many stations, all idle: what its idle cycle costs per station.

Every station is a real node (its own SQLite file and keys) that joined,
took its initial load of a little sample data and acked it, over an
in-memory post office; only the host stays open (N open engines would run
out of file handles), a station is opened for its cycle and closed again.
The host's idle cycle is then measured with the same counters as section 6.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory

from counting import Counts, SqlCounter
from pipeline import Figure

from mailsync.config import Role
from mailsync.node import Node, init_node
from mailsync.store.engine import open_engine
from mailsync.tools import samples
from mailsync.transport.memory import MemoryPostOffice

DOMAIN = "fleet.test"


def _database(path: Path, rows: bool) -> str:
    url = f"sqlite:///{path}"
    engine = open_engine(url)
    samples.create_schema(engine)
    if rows:
        samples.generate(engine, customers=10, invoices=10)
    engine.dispose()
    return url


def _node(root: Path, name: str, role: Role, url: str) -> Path:
    """A node's config and keys over the in-memory post office."""
    path, address = root / name / "mailsync.toml", f"{name}@{DOMAIN}"
    init_node(path, role=role, node_id=name, database=url, address=address, mail="memory:")
    return path


def build(root: Path, stations: int, office: MemoryPostOffice) -> tuple[Node, list[Path]]:
    """The host (open) and the stations' configs, every station enrolled."""
    hq = Node.open(_node(root, "hq", "host", _database(root / "hq.db", rows=True)), memory=office)
    template = root / "station.template.db"
    _database(template, rows=False)
    configs = []
    for i in range(stations):
        name = f"s{i:05d}"
        shutil.copy(template, root / f"{name}.db")
        config = _node(root, name, "remote", f"sqlite:///{root / (name + '.db')}")
        with Node.open(config, memory=office) as station:
            _, bundle = hq.add_station(name, f"{name}@{DOMAIN}", key=station.public_key)
            station.join(bundle)
        configs.append(config)
    for table in samples.TABLES:
        hq.add_rule(table, down="IUD", up="")
    return hq, configs


def settle(hq: Node, configs: list[Path], office: MemoryPostOffice, rounds: int = 8) -> None:
    """Host cycles, and a cycle of each station with mail, until a host
    cycle receives and sends nothing and no station has mail."""
    for _ in range(rounds):
        report = hq.sync()
        busy = report.received or report.sent
        for config in configs:
            if office.pending(f"{config.parent.name}@{DOMAIN}"):
                busy = True
                with Node.open(config, memory=office) as station:
                    got = station.sync()
                if got.errors:
                    raise SystemExit(f"{config.parent.name}: {got.errors}")
        if report.errors:
            raise SystemExit(f"host: {report.errors}")
        if not busy:
            return
    raise SystemExit(f"the fleet is not idle after {rounds} rounds")


@dataclass
class FleetRun:
    stations: int
    cpu: Figure  # seconds per idle host cycle
    counts: list[Counts]  # per idle host cycle


@contextmanager
def settled(stations: int) -> Iterator[Node]:
    """The host of a fleet of ``stations``, every station loaded and idle
    (closed when done)."""
    office = MemoryPostOffice()
    with TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        hq, configs = build(Path(tmp), stations, office)
        try:
            settle(hq, configs, office)
            print(f"  {stations} stations: set up in {time.perf_counter() - t0:.0f} s", flush=True)
            yield hq
        finally:
            hq.close()


def idle_fleet(stations: int, runs: int) -> FleetRun:
    """The host's idle cycle with ``stations`` stations: CPU seconds and counts."""
    with settled(stations) as hq:
        counter = SqlCounter(hq.engine)
        cpu: list[float] = []
        counts: list[Counts] = []
        for _ in range(runs):
            counter.start()
            t1 = time.process_time()
            report = hq.sync()
            cpu.append(time.process_time() - t1)
            counts.append(counter.stop())
            if report.received or report.sent or report.errors:
                raise SystemExit(f"the host's cycle was not idle: {report}")
    return FleetRun(stations, Figure(cpu), counts)
