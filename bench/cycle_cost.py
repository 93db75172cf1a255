"""What a cycle asks of the database, and what a process costs before it
starts (issue 17: sections 6-8 of docs/benchmarks.md; 9 is in
``bench/pg_capture.py``).

6. Statements and transactions per node per cycle, counted by SQLAlchemy
   event listeners on the node's engine (``bench/counting.py``), never
   estimated: an idle cycle of a host and of its station (nothing to do),
   and steady state with one changeset of 50 changed invoice lines per
   cycle (the host cycle builds and sends it and takes the previous one's
   ack; the station cycle receives and applies it and acks). Sample data
   over a ``maildir:`` post office, in this process. Counts are the median
   over ``--cycles`` cycles (min–max when they differ); CPU is
   ``time.process_time()`` around ``Node.sync()``. The statement shapes of
   the median steady cycle are listed, most frequent first.
7. An idle ``mailsync -c … sync`` process, host and station of the same
   site: wall time, best of ``--process-runs`` runs, against ``python -c
   "import sqlalchemy"`` with the same interpreter, runs interleaved.
8. An idle host cycle with many stations (``bench/fleet.py``): CPU and
   statements per station at each size.

    python bench/cycle_cost.py [--quick] [--output docs/benchmarks.md]

``--output`` replaces this script's block in the file (between its markers)
and leaves everything else — ``bench/pipeline.py``'s sections — as it is.
"""

from __future__ import annotations

import argparse
import platform
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import update

sys.path.insert(0, str(Path(__file__).parent))
from counting import Counts, SqlCounter
from fleet import FleetRun, idle_fleet
from pg_capture import pg_capture
from pipeline import KEPT_BEGIN as BEGIN
from pipeline import KEPT_END as END
from pipeline import ROWS_PER_CHANGESET, Figure, _changed_lines, _commit, machine
from streaming_memory import setup

from mailsync.node import Node
from mailsync.tools import samples


@dataclass(frozen=True)
class Sizes:
    cycles: int  # section 6: cycles counted per case
    process_runs: int  # section 7
    stations: tuple[int, ...]  # section 8: fleet sizes
    idle_runs: int  # section 8: idle host cycles per size
    capture_rows: int  # section 9: rows inserted / updated
    capture_runs: int  # section 9


FULL = Sizes(
    cycles=20,
    process_runs=10,
    stations=(100, 1000),
    idle_runs=5,
    capture_rows=100_000,
    capture_runs=5,
)
QUICK = Sizes(
    cycles=3, process_runs=1, stations=(3, 10), idle_runs=2, capture_rows=2_000, capture_runs=1
)
INVOICES = 2_000


def until_idle(*nodes: Node, rounds: int = 8) -> None:
    """Cycles of every node until a round in which no node received or sent."""
    for _ in range(rounds):
        reports = [n.sync() for n in nodes]
        if all(r.received == 0 and r.sent == 0 and not r.errors for r in reports):
            return
    raise SystemExit(f"not idle after {rounds} rounds: {[r.errors for r in reports]}")


def counted(counter: SqlCounter, node: Node, rows: int | None = None) -> tuple[Counts, float]:
    """One cycle of ``node``: its counts and CPU seconds (it applied
    ``rows`` rows when given)."""
    counter.start()
    t0 = time.process_time()
    report = node.sync()
    cpu = time.process_time() - t0
    counts = counter.stop()
    if report.errors or (rows is not None and report.rows_applied != rows):
        raise SystemExit(f"{node.config.node_id}: {report.rows_applied} rows, {report.errors}")
    return counts, cpu


class Cycles:
    """Per-cycle counts and CPU of one node in one case."""

    def __init__(self) -> None:
        self.counts: list[Counts] = []
        self.cpu: list[float] = []

    def add(self, counts: Counts, cpu: float) -> None:
        self.counts.append(counts)
        self.cpu.append(cpu)

    def figure(self, what: str) -> Figure:
        return Figure([float(getattr(c, what)) for c in self.counts])

    def median_cycle(self) -> Counts:
        """The cycle with the median statement count (its shapes are listed)."""
        ranked = sorted(self.counts, key=lambda c: c.statements)
        return ranked[len(ranked) // 2]


def cycle_counts(root: Path, cycles: int) -> dict[str, Cycles]:
    """Section 6: an idle host and station, then 50-row steady state."""
    lines = samples.metadata.tables["invoice_lines"]
    setup(root, INVOICES, 10_000_000)
    out = {k: Cycles() for k in ("host idle", "station idle", "host 50", "station 50")}
    with (
        Node.open(root / "hq" / "mailsync.toml") as hq,
        Node.open(root / "koeln" / "mailsync.toml") as st,
    ):
        until_idle(hq, st)
        host, station = SqlCounter(hq.engine), SqlCounter(st.engine)
        for _ in range(cycles):
            out["host idle"].add(*counted(host, hq))
            out["station idle"].add(*counted(station, st))
        for step in range(cycles + 2):  # two to reach steady state: acks in flight
            with hq.engine.begin() as conn:
                conn.execute(
                    update(lines)
                    .where(lines.c.id.in_(_changed_lines(None, step)))
                    .values(quantity=lines.c.quantity + 1)
                )
            h, s = counted(host, hq), counted(station, st, ROWS_PER_CHANGESET)
            if step < 2:
                continue
            out["host 50"].add(*h)
            out["station 50"].add(*s)
        until_idle(hq, st)
    return out


def process_start(root: Path, runs: int) -> dict[str, Figure]:
    """Section 7: wall seconds of an idle ``mailsync sync`` and of
    ``import sqlalchemy``, runs interleaved. mailsync's modules are
    byte-compiled first, as ``pip install`` leaves them (sqlalchemy's are
    already): a checkout run with ``PYTHONDONTWRITEBYTECODE`` would
    otherwise compile some of them from source in every run."""
    package = Path(__import__("mailsync").__file__).parent
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(package)], check=True)
    exe = Path(sys.executable).parent / "mailsync"
    cli = [str(exe)] if exe.exists() else [sys.executable, "-m", "mailsync"]
    commands = {
        "import sqlalchemy": [sys.executable, "-c", "import sqlalchemy"],
        "host": [*cli, "-c", str(root / "hq" / "mailsync.toml"), "sync"],
        "station": [*cli, "-c", str(root / "koeln" / "mailsync.toml"), "sync"],
    }
    walls: dict[str, list[float]] = {k: [] for k in commands}
    for _ in range(runs):
        for name, argv in commands.items():
            t0 = time.perf_counter()
            subprocess.run(argv, check=True, capture_output=True, cwd=root)
            walls[name].append(time.perf_counter() - t0)
    return {k: Figure(v) for k, v in walls.items()}


# ------------------------------------------------------------------- report


def _n(fig: Figure) -> str:
    return fig.show("{:,.0f}") if min(fig.values) != max(fig.values) else f"{fig.median:,.0f}"


def _columns(m: re.Match[str]) -> str:
    return f"{m.group(1)}<{m.group(2).count(',') + 1} columns>{m.group(3)}"


def _shape(text: str, width: int = 110) -> str:
    """A shape for the table: long column lists counted, long text cut."""
    text = re.sub(r"^(SELECT (?:DISTINCT )?)((?:[^,]+, ){3,}[^,]+?)( FROM)", _columns, text)
    text = re.sub(r"^(INSERT INTO \S+ \()((?:[^,)]+, ){3,}[^)]+)(\))", _columns, text)
    text = text.replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def markdown(
    cycles: dict[str, Cycles],
    start: dict[str, Figure],
    fleet: list[FleetRun],
    top: int,
) -> str:
    out = [
        "### 6. Statements and transactions per node per cycle (SQLite, counted)",
        "",
        f"Sample data ({INVOICES:,} invoices), a host and one station over Maildir; "
        "each figure over the cycles of its case (min–max where they differ). A "
        "statement is a cursor execute (an `executemany` is one) other than the "
        "`BEGIN` that opens a transaction; writes are its INSERT/UPDATE/DELETE; "
        "commits as SQLAlchemy saw them (the driver's own COMMITs agreed: "
        f"{_driver_agrees(cycles)}). Goal (issue 17): idle, at most one read "
        "transaction and no writes; 50 rows, ≤ 12 statements and ≤ 2 commits.",
        "",
        "| cycle | statements | writes | transactions | commits | CPU ms |",
        "|---|---|---|---|---|---|",
    ]
    names = {
        "host idle": "host, idle",
        "station idle": "station, idle",
        "host 50": "host, builds + sends 50 rows (takes the last ack)",
        "station 50": "station, receives + applies 50 rows (acks)",
    }
    for key, label in names.items():
        c = cycles[key]
        out.append(
            f"| {label} | {_n(c.figure('statements'))} | {_n(c.figure('writes'))} | "
            f"{_n(c.figure('transactions'))} | {_n(c.figure('commits'))} | "
            f"{Figure([t * 1000 for t in c.cpu]).show('{:.1f}')} |"
        )
    for key in ("host 50", "station 50", "host idle"):
        median = cycles[key].median_cycle()
        out += [
            "",
            f"Statement shapes, {names[key].split(' (')[0]} (the median cycle, "
            f"{median.statements} statements; top {top}):",
            "",
            "| count | statement |",
            "|---|---|",
        ]
        shown = median.shapes.most_common(top)
        out += [f"| {n} | `{_shape(s)}` |" for s, n in shown]
        rest = median.statements - sum(n for _, n in shown)
        if rest:
            out.append(f"| {rest} | ({len(median.shapes) - len(shown)} other shapes) |")
    base = start["import sqlalchemy"]
    out += [
        "",
        "### 7. An idle `mailsync sync` process",
        "",
        "The same site, idle: `mailsync -c … sync` as a user runs it, against "
        '`python -c "import sqlalchemy"`, runs interleaved; best of '
        f"{len(base.values)} (median, min–max); mailsync byte-compiled first, as an "
        "install leaves it. Goal: ≤ 1.5.",
        "",
        "| process | best s | median s | ÷ import sqlalchemy (best) |",
        "|---|---|---|---|",
    ]
    for name in ("import sqlalchemy", "host", "station"):
        fig = start[name]
        label = name if name == "import sqlalchemy" else f"`mailsync sync`, {name}"
        out.append(
            f"| {label} | {min(fig.values):.3f} | {fig.show('{:.3f}')} | "
            f"{min(fig.values) / min(base.values):.2f} |"
        )
    out += [
        "",
        "### 8. An idle host cycle, per station",
        "",
        "A host with a little sample data and N stations (each a real node that "
        "took its initial load and acked it, all idle), over an in-memory post "
        "office; the host's idle cycle, median of its runs (min–max). Goal: "
        "≤ 0.5 ms CPU per station, flat.",
        "",
        "| stations | CPU ms per cycle | CPU ms per station | statements per station | "
        "commits per cycle | transactions per cycle |",
        "|---|---|---|---|---|---|",
    ]
    for row in fleet:
        n, cpu, st = row.stations, row.cpu, row.counts
        statements = Figure([c.statements / n for c in st])
        out.append(
            f"| {n:,} | {Figure([c * 1000 for c in cpu.values]).show('{:,.0f}')} | "
            f"{Figure([c * 1000 / n for c in cpu.values]).show('{:.2f}')} | "
            f"{statements.show('{:.1f}')} | {_n(Figure([c.commits for c in st]))} | "
            f"{_n(Figure([c.transactions for c in st]))} |"
        )
    if len(fleet) >= 2:
        out += ["", _growth(fleet[0], fleet[-1])]
    return "\n".join(out) + "\n"


def _driver_agrees(cycles: dict[str, Cycles]) -> str:
    bad = [k for k, c in cycles.items() for n in c.counts if n.driver_commits != n.commits]
    return "yes" if not bad else f"no, in {sorted(set(bad))}"


def _growth(small: FleetRun, large: FleetRun) -> str:
    """What each added station costs, from the two sizes, and the shapes
    whose count grows with the stations."""
    a, b = small.stations, large.stations
    ca, cb = small.counts[0], large.counts[0]
    cpu_a, cpu_b = small.cpu.median, large.cpu.median
    per = (cb.statements - ca.statements) / (b - a)
    fixed = ca.statements - per * a
    commits = (cb.commits - ca.commits) / (b - a)
    transactions = (cb.transactions - ca.transactions) / (b - a)
    grow: dict[str, float] = {}
    for s in set(ca.shapes) | set(cb.shapes):
        d = (cb.shapes[s] - ca.shapes[s]) / (b - a)
        if d:
            grow[s] = d
    lines = [
        f"Each station added costs {(cpu_b - cpu_a) * 1000 / (b - a):.2f} ms CPU and "
        f"{per:.1f} statements, {transactions:g} transactions and {commits:g} commits "
        f"per idle host cycle ({fixed:.0f} statements are fixed); the statements "
        "per station, by shape:",
        "",
        "| per station | statement |",
        "|---|---|",
    ]
    lines += [f"| {d:g} | `{_shape(s)}` |" for s, d in sorted(grow.items(), key=lambda i: -i[1])]
    return "\n".join(lines)


def merge(path: Path, block: str, begin: str = BEGIN, end: str = END) -> None:
    """Put ``block`` between a script's markers (this script's unless
    given) in ``path`` (at its end the first time), leaving the rest of
    the file as it is."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    wrapped = f"{begin}\n{block}{end}\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + wrapped + rest.split(end, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + wrapped
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--output", type=Path, help="merge the markdown into this file")
    parser.add_argument("--stations", help="station counts for section 8, comma-separated")
    parser.add_argument(
        "--no-postgresql", action="store_true", help="skip section 9 (PostgreSQL triggers)"
    )
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    stations = tuple(int(s) for s in args.stations.split(",")) if args.stations else sizes.stations
    head = (
        f"Sections 6-{8 if args.no_postgresql else 9} written by `bench/cycle_cost.py` at "
        f"commit {_commit()}; machine: {machine()}, Python {platform.python_version()}, "
        f"SQLite {sqlite3.sqlite_version}; {'quick' if args.quick else 'full'} run. How "
        "each figure is taken: the docstrings of `bench/cycle_cost.py`, `bench/fleet.py` "
        "and `bench/pg_capture.py`. The "
        "machine is shared with other work: CPU and wall figures are medians or bests, "
        "as marked. Sections 1-5 above come from another run (its commit and machine "
        "at the top): compare ratios, not times, across the two."
    )
    print(head, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        cycles = cycle_counts(Path(tmp), sizes.cycles)
        start = process_start(Path(tmp), sizes.process_runs)
    fleet = [idle_fleet(n, sizes.idle_runs) for n in stations]
    text = head + "\n\n" + markdown(cycles, start, fleet, top=40)
    if not args.no_postgresql:
        text += "\n" + pg_capture(sizes.capture_rows, sizes.capture_runs)
    print(text)
    if args.output:
        merge(args.output, text)


if __name__ == "__main__":
    main()
