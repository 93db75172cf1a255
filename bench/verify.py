"""``mailsync verify --repair`` on a large table: time and memory, against a floor.

A host and a station (SQLite both, over a ``maildir:`` post office) hold
the same N rows (default 1,000,000) of a table of integers, text, NUMERIC
amounts and timestamps; one row at the station is changed behind
mailsync's back (before its capture triggers exist: nothing logs it).
The host verifies the table with ``--repair``: the rounds travel by mail
until the row is named, the host sends it again, and a second verification
confirms that the copies agree.

Every cycle runs in its own process, so its peak RSS (``VmHWM``) is its
own. The floor, measured in the same run and in the same way, is one
process that reads the table's rows once (``SELECT *``, the driver's rows)
and hashes each one (SHA-256 of its ``repr``): the least any checksum of
the whole table costs. The figures are the verification's time (all its
cycles, host and station, wall clock inside the processes) and its
largest peak RSS, each as a ratio to the floor.

    python bench/verify.py [--quick] [--rows N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mailsync.node import Node, init_node
from mailsync.store.tables import loads, now

ROWS = 1_000_000
QUICK = 20_000
TABLE = "items"
#: the row changed behind mailsync's back
DRIFT = 654_321

CREATE = (
    f"CREATE TABLE {TABLE} (id INTEGER PRIMARY KEY, name VARCHAR(80) NOT NULL, "
    "amount NUMERIC(12, 2), at TIMESTAMP)"
)
FILL = (
    f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
    f"INSERT INTO {TABLE} SELECT i, 'Artikel ' || i || ' Größe ' || (i % 97), "
    "(i % 100000) / 100.0, datetime(1700000000 + i * 37, 'unixepoch') FROM n"
)


def peak_rss() -> int:
    """This process's peak resident set in bytes (``VmHWM``, see
    bench/streaming_memory.py for why not ``ru_maxrss``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("no VmHWM in /proc/self/status")


def setup(root: Path, rows: int) -> None:
    """The two databases with the same rows, the nodes joined, the rule in
    force and its load recorded as done (the station's copy was made by
    SQL, as a restored backup would be), one row drifted at the station."""
    mail = f"maildir:{root / 'mail'}"
    for name, role in (("hq", "host"), ("koeln", "remote")):
        db = root / f"{name}.db"
        with sqlite3.connect(db) as conn:
            conn.execute(CREATE)
            conn.execute(FILL, (rows,))
        init_node(
            root / name / "mailsync.toml",
            role=role,  # type: ignore[arg-type]
            node_id=name,
            database=f"sqlite:///{db}",
            address=f"{name}@bench.test",
            mail=mail,
        )
    drift = min(DRIFT, rows // 2)
    with sqlite3.connect(root / "koeln.db") as conn:  # no capture trigger yet
        conn.execute(f"UPDATE {TABLE} SET amount = amount + 0.01 WHERE id = ?", (drift,))
    with (
        Node.open(root / "hq" / "mailsync.toml") as hq,
        Node.open(root / "koeln" / "mailsync.toml") as koeln,
    ):
        _, bundle = hq.add_station("koeln", "koeln@bench.test", key=koeln.public_key)
        koeln.join(bundle)
        hq.add_rule(TABLE, down="IUD", up="")
        with hq.engine.begin() as conn:
            conn.execute(loads.insert().values(station="koeln", tbl=TABLE, loaded_at=now()))
        hq.sync()
        koeln.sync()  # the rules: the station installs its capture triggers
        hq.sync()


def floor_child(db: str) -> None:
    t0 = time.perf_counter()
    with sqlite3.connect(db) as conn:
        count = 0
        for row in conn.execute(f"SELECT * FROM {TABLE}"):
            hashlib.sha256(repr(row).encode()).digest()
            count += 1
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak": peak_rss(), "rows": count}))


def cycle_child(config: str, start: str) -> None:
    """One sync cycle (``start``: first begin a verification, its id printed)."""
    t0 = time.perf_counter()
    started: list[int] = []
    with Node.open(config) as node:
        if start:
            started = [v.id for v in node.verify("koeln", TABLE, repair=start == "repair")]
        report = node.sync()
    out = {
        "seconds": time.perf_counter() - t0,
        "peak": peak_rss(),
        "errors": report.errors,
        "started": started,
    }
    print(json.dumps(out))


def child(*args: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, __file__, "--child", *args], check=True, capture_output=True, text=True
    )
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    if result.get("errors"):
        raise SystemExit(f"sync failed: {result['errors']}")
    return result


def verification(root: Path, mode: str) -> tuple[dict[str, object], float, int, int]:
    """Cycles (host, station, host …) until the verification ends: it, the
    seconds of all its cycles, their largest peak RSS, and the cycles."""
    hq, koeln = str(root / "hq" / "mailsync.toml"), str(root / "koeln" / "mailsync.toml")
    first = child("cycle", hq, mode)
    (ident,) = first["started"]  # type: ignore[misc]
    seconds, peak, cycles = float(first["seconds"]), int(first["peak"]), 1  # type: ignore[call-overload]
    for _ in range(100):
        for config in (koeln, hq):
            out = child("cycle", config, "")
            seconds += float(out["seconds"])  # type: ignore[arg-type]
            peak = max(peak, int(out["peak"]))  # type: ignore[call-overload]
            cycles += 1
        with Node.open(hq) as node:
            (v,) = node.verifications_of([ident])
        if v.finished:
            return v.to_json(), seconds, peak, cycles
    raise SystemExit("the verification did not end in 100 round trips")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help=f"{QUICK:,} rows: a smoke run")
    parser.add_argument("--rows", type=int, help=f"rows in the table [default: {ROWS:,}]")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "floor":
            floor_child(rest[0])
        else:
            cycle_child(rest[0], rest[1] if len(rest) > 1 else "")
        return
    rows = args.rows or (QUICK if args.quick else ROWS)
    with tempfile.TemporaryDirectory(prefix="mailsync-bench-verify-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        setup(root, rows)
        made = time.perf_counter() - t0
        floor = child("floor", str(root / "hq.db"))
        found, seconds, peak, cycles = verification(root, "repair")
        confirmed, seconds2, peak2, cycles2 = verification(root, "plain")
    f_sec, f_peak = float(floor["seconds"]), int(floor["peak"])  # type: ignore[arg-type, call-overload]
    mib = 2**20
    print(f"## verify --repair: {rows:,} rows, one changed behind mailsync's back\n")
    print(
        f"{platform.python_implementation()} {platform.python_version()}, SQLite host and "
        f"station over maildir; setup {made:.1f} s\n"
    )
    print("| run | state | rows equal | differ | cycles | time | × floor | peak RSS | × floor |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(
        f"| floor: SELECT * + SHA-256 per row | | {floor['rows']:,} | | | {f_sec:.1f} s | 1 "
        f"| {f_peak / mib:.0f} MiB | 1 |"
    )
    for name, v, sec, pk, cyc in (
        ("verify --repair", found, seconds, peak, cycles),
        ("verify (confirms)", confirmed, seconds2, peak2, cycles2),
    ):
        print(
            f"| {name} | {v['state']} | {v['rows_compared']:,} | {v['differing']} | {cyc} "
            f"| {sec:.1f} s | {sec / f_sec:.1f} | {pk / mib:.0f} MiB | {pk / f_peak:.1f} |"
        )
    keys = [k["key"] for k in found["keys"]]  # type: ignore[index]
    print(f"\nnamed: {keys}; after the repair: {confirmed['differing']} differ")
    if found["state"] != "repaired" or confirmed["differing"] != 0 or len(keys) != 1:
        raise SystemExit("verify did not find and repair the drifted row")


if __name__ == "__main__":
    main()
