"""Is memory bounded independent of table size? Peak RSS of an initial load.

For growing sample databases, a host builds the initial load for one station
over a ``maildir:`` post office, and the station receives and applies it.
Each step runs in its own process, so its peak RSS (``VmHWM``) is that
step's alone. The baseline is the same process doing a cycle with nothing to
do (interpreter, libraries, an open node), measured in the same run; the
figure that must not grow with the table is peak minus baseline.

    python bench/streaming_memory.py [--quick] [--sizes 50000,150000,450000]
                                      [--max-message-bytes N]

Sizes are invoices (each with 1-5 lines, ~3 on average), plus customers and
articles in proportion.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mailsync import allocator
from mailsync.config import DEFAULT_MAX_MESSAGE_BYTES
from mailsync.node import Node, init_node
from mailsync.store.engine import open_engine
from mailsync.tools import samples

QUICK = (2_000, 8_000)
FULL = (50_000, 150_000, 450_000)


def setup(
    root: Path, invoices: int, max_message_bytes: int, host_url: str | None = None
) -> dict[str, int]:
    """A host with the sample data and one joined station, rules for all tables
    (the host on ``host_url`` when given, else SQLite like the station)."""
    mail = f"maildir:{root / 'mail'}"
    for name, role in (("hq", "host"), ("koeln", "remote")):
        url = f"sqlite:///{root / (name + '.db')}"
        if name == "hq" and host_url:
            url = host_url
        engine = open_engine(url)
        samples.create_schema(engine)
        if name == "hq":
            counts = samples.generate(engine, customers=max(1, invoices // 3), invoices=invoices)
        engine.dispose()
        init_node(
            root / name / "mailsync.toml",
            role=role,  # type: ignore[arg-type]
            node_id=name,
            database=url,
            address=f"{name}@bench.test",
            mail=mail,
        )
        config = root / name / "mailsync.toml"
        config.write_text(
            config.read_text().replace(
                "[mailbox]\n", f"[mailbox]\nmax_message_bytes = {max_message_bytes}\n"
            )
        )
    with (
        Node.open(root / "hq" / "mailsync.toml") as hq,
        Node.open(root / "koeln" / "mailsync.toml") as koeln,
    ):
        _, bundle = hq.add_station("koeln", "koeln@bench.test", key=koeln.public_key)
        koeln.join(bundle)
        for table in samples.TABLES:
            hq.add_rule(table, down="IUD", up="")
    return counts


def peak_rss() -> int:
    """This process's peak resident set in bytes, since its exec.

    ``ru_maxrss`` is not that: Linux carries it over fork and exec, so a
    child started by a parent that had grown to 370 MiB reports 370 MiB
    whatever it did itself. ``VmHWM`` belongs to the address space exec made.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def child(config: str) -> None:
    """One sync cycle of one node; prints what it did and its peak RSS
    (the allocator set as the ``mailsync`` command sets it)."""
    allocator.pin_mmap_threshold()
    t0 = time.perf_counter()
    with Node.open(config) as node:
        report = node.sync()
    peak = peak_rss()
    out = {
        "seconds": time.perf_counter() - t0,
        "peak": peak,
        "rows_sent": report.rows_sent,
        "rows_applied": report.rows_applied,
        "parts": sum(b.parts for b in report.built),
        "errors": report.errors,
    }
    print(json.dumps(out))


def run_child(config: Path) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, __file__, "--child", str(config)],
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    if result["errors"]:
        raise SystemExit(f"sync failed: {result['errors']}")
    return result


def mib(n: object) -> str:
    return f"{int(n) / 2**20:.0f}"  # type: ignore[call-overload]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    parser.add_argument("--sizes", help="invoice counts, comma-separated")
    parser.add_argument(
        "--max-message-bytes",
        type=int,
        default=DEFAULT_MAX_MESSAGE_BYTES,
        help="the mailbox size limit, which sets the part size",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    sizes = (
        tuple(int(s) for s in args.sizes.split(","))
        if args.sizes
        else (QUICK if args.quick else FULL)
    )
    print(f"machine: {platform.machine()}, Python {platform.python_version()}")
    print(
        "| invoices | rows | parts | host peak MiB | host − baseline | "
        "station peak MiB | station − baseline | build+send s | receive+apply s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    growth: list[tuple[int, int]] = []
    for invoices in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            counts = setup(root, invoices, args.max_message_bytes)
            host_cfg, station_cfg = root / "hq" / "mailsync.toml", root / "koeln" / "mailsync.toml"
            # the baseline: the same processes with nothing to do (the station
            # has not been told anything yet; the host's first cycle is the load)
            base_station = run_child(station_cfg)
            host = run_child(host_cfg)
            station = run_child(station_cfg)
            base_host = run_child(host_cfg)  # receives the ack; nothing to build
            rows = sum(counts.values())
            if station["rows_applied"] != rows:
                raise SystemExit(f"applied {station['rows_applied']} of {rows} rows")
            host_growth = int(host["peak"]) - int(base_host["peak"])  # type: ignore[call-overload]
            station_growth = int(station["peak"]) - int(base_station["peak"])  # type: ignore[call-overload]
            growth.append((host_growth, station_growth))
            print(
                f"| {invoices:,} | {rows:,} | {host['parts']} | {mib(host['peak'])} | "
                f"{mib(host_growth)} | {mib(station['peak'])} | {mib(station_growth)} | "
                f"{float(host['seconds']):.1f} | {float(station['seconds']):.1f} |"  # type: ignore[arg-type]
            )
    first, last = growth[0], growth[-1]
    print(
        f"\nrows ×{sizes[-1] / sizes[0]:.0f}: host growth over baseline "
        f"{mib(first[0])} → {mib(last[0])} MiB, station {mib(first[1])} → {mib(last[1])} MiB"
    )


if __name__ == "__main__":
    main()
