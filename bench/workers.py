"""Several host workers (issue 21, section 11 of docs/benchmarks.md): a host
on PostgreSQL with many stations, its idle cycle and its one-change-to-all
cycle with 1, 2 and 4 worker processes.

What is real: the host is a real node on a PostgreSQL server started for
the run (the test suite's, as in ``pipeline.py`` section 5), with the
sample data and a rule sending every table down to every station; every
station is enrolled through ``Node.add_station`` with a public key of its
own (made here), so the host holds for each what it holds for a real one
(station row, trusted key, link); the workers are separate processes,
each running :func:`mailsync.workers.pool.worker_cycle` — what ``serve
--workers N`` runs — with its own engine and :class:`Claimant` (database
session, advisory locks); mail goes to a ``maildir:`` post office (the
memory post office cannot be shared between processes), one fsync'd file
per message.

What is simulated, and why it does not change what is measured: the
stations are not nodes (10,000 of them would need 10,000 databases and
cycles of their own, and only the host's cycle is measured). The host
builds and sends every initial load in real cycles (two workers), then each
link is brought to "caught up" the way the host itself does when a
station's ack arrives: :func:`mailsync.link.acknowledged` with the link's
last sequence number, in one transaction (the outbox entries leave, the
link's ``acked_seq`` and ``last_contact`` move), and the stations'
Maildirs are emptied. A link in that state is exactly one whose station
applied everything and acked it: the idle cycle finds nothing to build,
send or resend on it; the one-change cycle builds one changeset for it
from the change log. The host's mailbox stays empty (no station writes
back), so the receiving side of a cycle is the coordinator's read of an
empty mailbox: acks in the host's mailbox cost the coordinator an IMAP
fetch and delete each (docs/sizing.md). After each one-change cycle the
links are brought back to caught up the same way (outside the timing).

How it is timed: for each worker count the processes are started, each
opens the node and registers (its ``mailsync_workers`` row and life lock)
and says it is ready; start-up is not timed. Every worker first runs one
untimed warm-up cycle (a fresh process's first cycle compiles and caches
its statements; a ``serve`` runs for days), and one untimed one-change
cycle before the timed ones (the first changeset after a link's initial
load is no steady-state one). A timed cycle then starts when
the parent tells every worker to go (``t0``, ``time.perf_counter``: the
same monotonic clock in every process on Linux); each worker reports its
own end time and the CPU seconds of its process over the cycle
(``time.process_time``: its threads, its share of the client side); the
cycle's wall time is the last worker's end minus ``t0``. The database
server's CPU over the cycle is the sum over its processes (``/proc``:
the backends of the workers' connections). Statements and commits are
counted in every worker by ``bench/counting.py``'s ``SqlCounter`` (its
listeners stay attached in every run, so every worker count carries the
same small overhead). Each cycle is checked: every link visited once (the
workers' ``links`` summed), and for the change, every link's changeset
built, marked sent and in its station's Maildir.

    python bench/workers.py [--quick] [--stations N] [--runs N] [--output docs/benchmarks.md]

``--output`` replaces this script's block in the file (between its
markers) and leaves the rest as it is.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import platform
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select, update

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from counting import SqlCounter
from cycle_cost import merge
from pipeline import Figure, _commit, machine

from mailsync import link as links_mod
from mailsync.keys import KeyPair
from mailsync.node import Node, init_node
from mailsync.store.engine import open_engine
from mailsync.store.tables import links, outbox
from mailsync.tools import samples
from mailsync.workers.claims import Claimant
from mailsync.workers.pool import worker_cycle

BEGIN, END = "<!-- bench/workers.py: begin -->", "<!-- bench/workers.py: end -->"
DOMAIN = "bench.test"
WORKERS = (1, 2, 4)
FULL_STATIONS = 10_000
QUICK_STATIONS = 100
#: a worker that says nothing for this long is taken for hung
REPLY_TIMEOUT = 3600.0


@dataclass(frozen=True)
class Done:
    """What one worker reports of one cycle."""

    ok: bool
    line: str
    cpu: float  # CPU seconds of the worker's process
    end: float  # time.perf_counter() at its end
    statements: int
    commits: int


@dataclass(frozen=True)
class Cycle:
    """One timed cycle of a group of workers."""

    wall: float
    cpu: float  # the workers' CPU seconds, summed
    server_cpu: float  # the PostgreSQL processes' CPU seconds
    statements: int
    commits: int
    links: int  # links the workers served, summed
    first: float  # wall seconds until the first worker was done
    load: float  # the machine's 1-minute load average as the cycle began


# ------------------------------------------------------------------ workers


def _worker(path: str, pipe: Pipe) -> None:
    """One worker process: register, then a cycle per ``go`` until ``None``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    node = Node.open(Path(path))
    claimant = Claimant(node.engine, path)
    counter = SqlCounter(node.engine)
    lines: list[str] = []
    pipe.send(claimant.id)
    try:
        while pipe.recv() is not None:
            counter.start()
            cpu = time.process_time()
            ok = worker_cycle(node, claimant, lines.append)
            cpu = time.process_time() - cpu
            end = time.perf_counter()
            counts = counter.stop()
            pipe.send(Done(ok, lines[-1], cpu, end, counts.statements, counts.commits))
    finally:
        claimant.close()
        node.close()


class Group:
    """``count`` worker processes of the host, started and registered."""

    def __init__(self, config: Path, count: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.pipes: list[Pipe] = []
        self.procs: list[Any] = []
        for index in range(count):
            mine, theirs = context.Pipe()
            proc = context.Process(
                target=_worker, args=(str(config), theirs), name=f"bench-worker-{index + 1}"
            )
            proc.start()
            self.pipes.append(mine)
            self.procs.append(proc)
        for pipe in self.pipes:
            self._reply(pipe)  # registered

    def _reply(self, pipe: Pipe) -> Any:
        if not pipe.poll(REPLY_TIMEOUT):
            raise SystemExit("a worker said nothing for an hour")
        try:
            return pipe.recv()
        except EOFError:
            raise SystemExit("a worker died (its output is above)") from None

    def cycle(self, server: Any, engine: Engine) -> Cycle:
        """One cycle of every worker from a common start."""
        before = server_cpu(server)
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        for pipe in self.pipes:
            pipe.send(True)
        done: list[Done] = [self._reply(pipe) for pipe in self.pipes]
        server_s = server_cpu(server) - before
        failed = [d.line for d in done if not d.ok]
        if failed:
            raise SystemExit(f"a worker's cycle failed: {failed}")
        return Cycle(
            wall=max(d.end for d in done) - t0,
            cpu=sum(d.cpu for d in done),
            server_cpu=server_s,
            statements=sum(d.statements for d in done),
            commits=sum(d.commits for d in done),
            links=served(engine, len(self.pipes)),
            first=min(d.end for d in done) - t0,
            load=load,
        )

    def stop(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(None)
        for proc in self.procs:
            proc.join(timeout=60)
            if proc.is_alive():  # pragma: no cover - a hung worker
                proc.kill()
                proc.join()


def served(engine: Engine, count: int) -> int:
    """Links served by the last cycle of the ``count`` newest workers."""
    from mailsync.store.tables import workers_table

    with engine.connect() as conn:
        rows = conn.execute(
            select(workers_table.c.links).order_by(workers_table.c.id.desc()).limit(count)
        ).scalars()
        return sum(int(r) for r in rows)


def server_cpu(server: Any) -> float:
    """CPU seconds used so far by the PostgreSQL server's processes that
    are running now (the postmaster and its children: the backends)."""
    from tests.servers.postgres import children_of

    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in [server.proc.pid, *children_of(server.proc.pid)]:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


# ------------------------------------------------------------------- set-up


def setup(root: Path, url: str, stations: int) -> Path:
    """The host: sample data, ``stations`` stations enrolled, rules for
    every table; its config's path."""
    engine = open_engine(url)
    samples.create_schema(engine)
    samples.generate(engine, customers=10, invoices=10)
    engine.dispose()
    config = root / "hq" / "mailsync.toml"
    init_node(
        config,
        role="host",
        node_id="hq",
        database=url,
        address=f"hq@{DOMAIN}",
        mail=f"maildir:{root / 'mail'}",
    )
    with Node.open(config) as hq:
        for i in range(stations):
            name = f"s{i:05d}"
            hq.add_station(name, f"{name}@{DOMAIN}", key=KeyPair.generate().public)
        for table in samples.TABLES:
            hq.add_rule(table, down="IUD", up="")
    return config


def caught_up(engine: Engine) -> None:
    """Every link as it is once its station acked all it was sent: what
    the host does with a station's ack (:func:`mailsync.link.acknowledged`)."""
    with engine.begin() as conn:
        for link in links_mod.all_links(conn):
            links_mod.acknowledged(conn, link, link.out_seq)


def empty_mailboxes(root: Path) -> int:
    """The stations' Maildirs emptied; the number of messages they held."""
    count = 0
    for box in (root / "mail").glob(f"s*@{DOMAIN}/new"):
        for message in box.iterdir():
            message.unlink()
            count += 1
    return count


def sent_to_all(engine: Engine, root: Path, stations: int, seq: int) -> None:
    """Every link's changeset ``seq`` built, marked sent and delivered."""
    with engine.connect() as conn:
        behind = conn.execute(
            select(func.count()).select_from(links).where(links.c.out_seq != seq)
        ).scalar()
        unsent = conn.execute(
            select(func.count()).select_from(outbox).where(outbox.c.sent_at.is_(None))
        ).scalar()
    delivered = empty_mailboxes(root)
    if behind or unsent or delivered != stations:
        raise SystemExit(
            f"not sent to every station: {behind} links not at changeset {seq}, "
            f"{unsent} outbox entries unsent, {delivered} of {stations} messages delivered"
        )


def change_one_row(engine: Engine, step: int) -> None:
    """One row every station gets."""
    customers = samples.metadata.tables["customers"]
    with engine.begin() as conn:
        conn.execute(update(customers).where(customers.c.id == 1).values(name=f"changed {step}"))


# -------------------------------------------------------------------- run


@dataclass
class Figures:
    workers: int
    warm: Cycle
    idle: list[Cycle]
    change: list[Cycle]


def measure(
    server: Any, root: Path, config: Path, url: str, stations: int, runs: int
) -> tuple[list[Figures], float]:
    """The figures per worker count, the seconds to enroll and to load."""
    engine = open_engine(url)
    try:
        t0 = time.perf_counter()
        group = Group(config, 2)
        try:
            for _ in range(3):  # the initial loads, by the workers
                group.cycle(server, engine)
                with engine.connect() as conn:
                    behind = conn.execute(
                        select(func.count()).select_from(links).where(links.c.out_seq < 1)
                    ).scalar()
                if not behind:
                    break
            else:
                raise SystemExit(f"{behind} stations without their initial load")
        finally:
            group.stop()
        loaded = time.perf_counter() - t0
        caught_up(engine)
        empty_mailboxes(root)
        print(f"  initial loads built and sent in {loaded:.0f} s", flush=True)
        seq = 1
        out = []
        for count in WORKERS:
            group = Group(config, count)
            try:
                warm = group.cycle(server, engine)
                idle = [group.cycle(server, engine) for _ in range(runs)]
                for cycle in idle:
                    if cycle.links != stations:
                        raise SystemExit(f"idle cycle served {cycle.links} of {stations} links")
                change = []
                for timed in [False] + [True] * runs:
                    seq += 1
                    change_one_row(engine, seq)
                    cycle = group.cycle(server, engine)
                    sent_to_all(engine, root, stations, seq)
                    caught_up(engine)
                    if timed:  # the first is a warm-up
                        change.append(cycle)
            finally:
                group.stop()
            figures = Figures(count, warm, idle, change)
            print(f"  {count} worker(s): {_brief(figures, stations)}", flush=True)
            out.append(figures)
        return out, loaded
    finally:
        engine.dispose()


def _brief(f: Figures, stations: int) -> str:
    idle = Figure([c.wall for c in f.idle]).median
    change = Figure([c.wall for c in f.change]).median
    return f"idle {idle:.1f} s, one change {change:.1f} s ({stations} links)"


# ----------------------------------------------------------------- report


def _fig(cycles: list[Cycle], what: str, scale: float = 1.0) -> Figure:
    return Figure([getattr(c, what) * scale for c in cycles])


def markdown(
    figures: list[Figures], stations: int, runs: int, setup_s: float, load_s: float
) -> str:
    one = figures[0]
    base = {"idle": _fig(one.idle, "wall").median, "change": _fig(one.change, "wall").median}
    per = 1000.0 / stations
    out = [
        "### 11. Several host workers (PostgreSQL, Maildir)",
        "",
        f"A host on PostgreSQL with {stations:,} stations (enrolled in {setup_s:.0f} s; "
        f"initial loads built and sent by two workers in {load_s:.0f} s), every link "
        "caught up; worker processes started and registered before the clock starts, "
        "one warm-up cycle each; wall time from a common start to the last worker's "
        f"end (and to the first's); {runs} timed cycle(s) per case (median, min–max). "
        "CPU: the workers' processes (client side) and, apart, the PostgreSQL "
        "server's; load: the machine's 1-minute load average as the cycle began "
        "(other work shares it). Goal (issue 21): ≥ 1.8× with 2 workers on 2 cores.",
        "",
        "| cycle | workers | wall s | throughput ÷ 1 worker | first worker done s "
        "| workers' CPU ms per station | server CPU ms per station "
        "| statements per station | commits per cycle | load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case, label in (("idle", "idle"), ("change", "one change to all")):
        for f in figures:
            cycles: list[Cycle] = getattr(f, case)
            wall = _fig(cycles, "wall")
            out.append(
                f"| {label} | {f.workers} | {wall.show('{:,.2f}')} | "
                f"{base[case] / wall.median:.2f}× | {_fig(cycles, 'first').show('{:,.2f}')} | "
                f"{_fig(cycles, 'cpu', per).show('{:.2f}')} | "
                f"{_fig(cycles, 'server_cpu', per).show('{:.2f}')} | "
                f"{_fig(cycles, 'statements', 1 / stations).show('{:.1f}')} | "
                f"{_fig(cycles, 'commits').show('{:,.0f}')} | "
                f"{_fig(cycles, 'load').show('{:.1f}')} |"
            )
    cores = os.cpu_count() or 1
    cpu = (_fig(one.change, "cpu").median + _fig(one.change, "server_cpu").median) / stations
    alone = 1 / cpu  # one worker waits for its backend: their CPU adds up
    rate = stations / base["change"]
    flat = ", ".join(f"{_fig(f.change, 'cpu', per).median:.1f}" for f in figures)
    out += [
        "",
        f"What {cores} cores allow: one change to all costs {cpu * 1000:.1f} ms CPU per "
        "station (the worker's and its PostgreSQL backend's, which take turns), so one "
        f"worker alone on the machine reaches at most {alone:,.0f} stations/s and "
        f"{cores} cores at most {cores * alone:,.0f}: {cores:.0f}× is their ceiling. "
        f"Here 1 worker reached {rate:,.0f} stations/s ({rate / alone:.0%} of its "
        f"ceiling{': other work shared the machine, see the load' if rate < 0.8 * alone else ''}"
        "). Workers cost each other "
        f"little: the workers' CPU per station with {', '.join(str(f.workers) for f in figures)} "
        f"workers was {flat} ms. Past {cores} workers they gain only from overlapping "
        "waits (commits, the Maildir's fsyncs); more cores or machines scale further "
        "(docs/sizing.md). Commits per cycle grow past a few per worker when one "
        "worker's changesets exceed `READ_AHEAD_BYTES` (cycle/settle.py): the rest are "
        "read and recorded one commit each.",
        "",
    ]
    warm = ", ".join(f"{f.workers}: {f.warm.wall:.1f} s" for f in figures)
    out += [
        f"The warm-up cycle (idle, a fresh group's first), wall: {warm}.",
    ]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a smoke run: 100 stations")
    parser.add_argument("--stations", type=int, help="stations (default 10,000; quick 100)")
    parser.add_argument("--runs", type=int, default=1, help="timed cycles per case")
    parser.add_argument("--output", type=Path, help="merge the markdown into this file")
    args = parser.parse_args()
    stations = args.stations or (QUICK_STATIONS if args.quick else FULL_STATIONS)
    if stations < max(WORKERS) or args.runs < 1:
        parser.error(f"--stations at least {max(WORKERS)}, --runs at least 1")
    from tests.servers.postgres import PostgresServer, find_bindir

    if find_bindir() is None:
        print("bench/workers.py: skipped: no PostgreSQL here (workers need it)")
        return
    head = (
        f"Section 11 written by `bench/workers.py` at commit {_commit()}; machine: "
        f"{machine()}, Python {platform.python_version()}; "
        f"{'quick' if args.quick else 'full'} run. How each figure is taken: the "
        "docstring of `bench/workers.py`. The machine is shared with other work."
    )
    print(head, flush=True)
    with tempfile.TemporaryDirectory() as tmp, PostgresServer() as server:
        server.create_database("bench_workers")
        url = server.url("bench_workers")
        t0 = time.perf_counter()
        config = setup(Path(tmp), url, stations)
        setup_s = time.perf_counter() - t0
        print(f"  {stations:,} stations enrolled in {setup_s:.0f} s", flush=True)
        figures, load_s = measure(server, Path(tmp), config, url, stations, args.runs)
    text = head + "\n\n" + markdown(figures, stations, args.runs, setup_s, load_s)
    print(text)
    if args.output:
        merge(args.output, text, BEGIN, END)


if __name__ == "__main__":
    main()
