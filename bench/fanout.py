"""One change to every station: what a host cycle costs per station when it
has something for all of them (issue 21, the routing part).

The fleet of ``bench/fleet.py`` (N real stations, each joined, loaded and
idle over an in-memory post office); then one article's price changes on
the host — every station's rules send it the table, unfiltered — and the
host runs one cycle: it builds, seals and queues a changeset per station
and hands each to the post office. Measured per run: CPU seconds
(``time.process_time()`` around ``Node.sync()``) and the statements of the
cycle (``bench/counting.py``), both also per station. Between runs nothing
is acknowledged (the stations do not run): every run is the same busy
cycle, one changeset per link, no receive.

    python bench/fanout.py [--quick] [--stations 100,1000] [--runs 3]
                           [--profile out.pstats]

``--profile`` writes cProfile's statistics of the last run of the largest
size and prints its top functions by own and cumulative time. The figures
are printed; docs/benchmarks.md gets them from the report of whoever runs
the scaling bench.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import update

sys.path.insert(0, str(Path(__file__).parent))
from counting import Counts, SqlCounter
from fleet import settled
from pipeline import Figure

from mailsync.node import Node
from mailsync.tools import samples

FULL = (100, 1000)
QUICK = (3, 10)


@dataclass
class FanoutRun:
    stations: int
    cpu: Figure  # seconds per busy host cycle
    counts: list[Counts]  # per busy host cycle


def change_one(hq: Node, step: int) -> None:
    """One article's price moves: one change every station gets."""
    articles = samples.metadata.tables["articles"]
    with hq.engine.begin() as conn:
        conn.execute(update(articles).where(articles.c.id == 1).values(unit_price=10 + step))


def fanout(stations: int, runs: int, profile: Path | None = None) -> FanoutRun:
    """``runs`` host cycles, each after one change every station gets."""
    with settled(stations) as hq:
        counter = SqlCounter(hq.engine)
        cpu: list[float] = []
        counts: list[Counts] = []
        for step in range(runs):
            change_one(hq, step)
            profiler = cProfile.Profile() if profile and step == runs - 1 else None
            counter.start()
            t1 = time.process_time()
            if profiler is not None:
                profiler.enable()
            report = hq.sync()
            if profiler is not None:
                profiler.disable()
            cpu.append(time.process_time() - t1)
            counts.append(counter.stop())
            if report.errors or len(report.built) != stations:
                raise SystemExit(f"built {len(report.built)} of {stations}: {report.errors}")
            if profiler is not None and profile is not None:
                profiler.dump_stats(profile)
    return FanoutRun(stations, Figure(cpu), counts)


def table(rows: list[FanoutRun]) -> str:
    out = [
        "| stations | CPU ms per cycle | CPU ms per station | statements per station | "
        "statements per cycle |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        n = row.stations
        out.append(
            f"| {n:,} | {Figure([c * 1000 for c in row.cpu.values]).show('{:,.0f}')} | "
            f"{Figure([c * 1000 / n for c in row.cpu.values]).show('{:.2f}')} | "
            f"{Figure([c.statements / n for c in row.counts]).show('{:.2f}')} | "
            f"{Figure([float(c.statements) for c in row.counts]).show('{:,.0f}')} |"
        )
    return "\n".join(out)


def shapes(run: FanoutRun, top: int = 25) -> str:
    """The statement shapes of the last cycle, most frequent first."""
    last = run.counts[-1]
    return "\n".join(f"{n:6d}  {s[:150]}" for s, n in last.shapes.most_common(top))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--stations", help="station counts, comma-separated")
    parser.add_argument("--runs", type=int, default=3, help="busy cycles per size")
    parser.add_argument("--profile", type=Path, help="cProfile statistics of the largest size")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    if args.stations:
        sizes = tuple(int(s) for s in args.stations.split(","))
    rows = []
    for n in sizes:
        rows.append(fanout(n, args.runs, args.profile if n == max(sizes) else None))
    print(table(rows))
    print(f"\nstatement shapes, {rows[-1].stations} stations, last cycle:")
    print(shapes(rows[-1]))
    if args.profile:
        stats = pstats.Stats(str(args.profile))
        stats.sort_stats("tottime").print_stats(30)
        stats.sort_stats("cumulative").print_stats(60)


if __name__ == "__main__":
    main()
