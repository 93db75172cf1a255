"""``mailsync serve --workers N``: N worker processes on this machine.

Each worker is a process of its own (one core each: the cycle is CPU
work in Python) that opens the node, registers (:mod:`.registry`) and runs
cycles on the node's schedule, each over its share of the links
(:mod:`.claims`). The parent only starts them, starts again one that died
(after a pause that grows while they keep dying) and, on SIGTERM or
SIGINT, lets every cycle in progress finish. Other machines run their own
``serve --workers``: they share out the links through the database.

Only a PostgreSQL host: the workers coordinate through its locks. A
plain ``serve`` of the node, running, refuses the workers, and the workers
refuse a plain one (:func:`mailsync.service.claim`).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.synchronize import Event as ProcessEvent
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from mailsync.errors import ConfigError, MailsyncError, first_line
from mailsync.node import Node
from mailsync.schedule import next_run, parse_zone
from mailsync.service import backoff, outcome, service_state
from mailsync.store.tables import now
from mailsync.workers import registry
from mailsync.workers.claims import Claimant

#: Seconds between a worker's heartbeats (for ``status``; liveness is its lock).
HEARTBEAT = 30.0
#: The longest pause before a worker that keeps dying is started again.
MAX_RESTART_PAUSE = 60.0


def check(path: Path, workers: int, memory: object | None = None, *, once: bool = False) -> None:
    """Refuse what cannot run before any process starts: not a host, not
    PostgreSQL, an in-process mailbox, no schedule to keep (without
    ``once``), a plain ``serve`` already running."""
    where = str(path)
    if workers < 1:
        raise ConfigError(f"--workers {workers}: give at least 1")
    with Node.open(path, memory=memory) as node:
        if not once and not node.config.schedules:
            raise ConfigError(
                f"{where}: no [[schedule]] for the workers to keep",
                hint='add e.g. [[schedule]] every = "5m", or run `serve --workers N --once` '
                "from a timer",
            )
        if not node.is_host:
            raise ConfigError(
                f"{where}: --workers serves a host's stations; a remote has one link",
                hint="run `mailsync serve` without --workers",
            )
        registry.require_postgresql(node.engine, where)
        if node.config.mailbox.receive.startswith("memory:"):
            raise ConfigError(
                f"{where}: a memory: mailbox lives in one process; workers need a real one",
                hint="use an IMAP, POP3 or maildir: mailbox",
            )
        state = service_state(node)
        if state.running:
            raise ConfigError(
                f"{where}: mailsync serve (without --workers) runs already on {state.host} "
                f"(pid {state.pid})",
                hint="stop it first (SIGTERM lets its cycle finish)",
            )


def serve_workers(
    path: Path,
    workers: int,
    *,
    once: bool = False,
    say: Callable[[str], None] = print,
    stop: threading.Event | None = None,
) -> int:
    """Run ``workers`` worker processes for the node at ``path`` until
    ``stop`` is set; the number of worker processes that failed (``once``:
    one cycle each, now)."""
    check(path, workers, once=once)
    stop = stop or threading.Event()
    context = multiprocessing.get_context("spawn")
    halt = context.Event()
    procs: dict[int, multiprocessing.process.BaseProcess] = {}
    deaths: dict[int, int] = {}
    failed = 0

    def start(index: int) -> None:
        proc = context.Process(
            target=worker_main, args=(path, index, once, halt), name=f"mailsync-worker-{index}"
        )
        proc.start()
        procs[index] = proc
        say(f"worker {index}: started (pid {proc.pid})")

    for index in range(1, workers + 1):
        start(index)
    try:
        while procs:
            if stop.is_set():
                halt.set()
            for index, proc in list(procs.items()):
                proc.join(timeout=0.2)
                if proc.is_alive():
                    continue
                del procs[index]
                code = proc.exitcode or 0
                if code != 0:
                    failed += 1
                    say(f"worker {index}: exited with code {code}")
                if once or halt.is_set():
                    continue
                deaths[index] = deaths.get(index, 0) + 1
                pause = min(2.0 ** deaths[index], MAX_RESTART_PAUSE)
                say(f"worker {index}: starting again in {pause:.0f} s")
                if stop.wait(pause):
                    halt.set()
                    continue
                start(index)
        return failed
    finally:
        halt.set()
        for proc in procs.values():
            proc.join()


def worker_main(path: Path, index: int, once: bool, halt: ProcessEvent) -> None:
    """One worker process: cycles on the node's schedule until ``halt``."""
    # the parent decides when to stop: a Ctrl-C at the terminal reaches
    # every process of the group, and the cycle in progress must finish
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: halt.set())
    say = _say(index)
    try:
        node = Node.open(path)
    except MailsyncError as exc:
        say(f"cannot open the node: {exc}")
        raise SystemExit(1) from None
    claimant = Claimant(node.engine, str(path))
    done = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(node, claimant.id, done), daemon=True)
    beat.start()
    try:
        say(f"registered as worker {claimant.id} of {node.config.node_id}")
        run_worker(node, claimant, once=once, stopped=halt.is_set, wait=halt.wait, say=say)
    finally:
        done.set()
        with contextlib.suppress(SQLAlchemyError):
            claimant.close()
        node.close()


def run_worker(
    node: Node,
    claimant: Claimant,
    *,
    once: bool,
    stopped: Callable[[], bool],
    wait: Callable[[float], bool],
    say: Callable[[str], None],
) -> int:
    """A worker's loop (in-process: tests and the bench call it directly);
    the number of its cycles that failed."""
    zone = parse_zone(node.config.timezone, str(node.config.path))
    failed = 0
    failures = 0
    while not stopped():
        ok = worker_cycle(node, claimant, say)
        failed += not ok
        failures = 0 if ok else failures + 1
        if once:
            break
        following = next_run(node.config.schedules, now() + backoff(failures), zone)
        if following is None:
            say("no schedule has another run: stopping")
            break
        while not stopped():
            left = (following - now()).total_seconds()
            if left <= 0:
                break
            wait(min(left, HEARTBEAT))
    return failed


def worker_cycle(node: Node, claimant: Claimant, say: Callable[[str], None]) -> bool:
    """One cycle over this worker's share; a failure is reported, never raised."""
    started = time.monotonic()
    links = 0
    coordinated = False
    try:
        report = node.sync(claimant=claimant)
        line, ok = outcome(report), not report.errors
        links, coordinated = report.links_served or 0, report.coordinated
    except MailsyncError as exc:
        line, ok = f"failed: {exc}", False
    except SQLAlchemyError as exc:
        line, ok = f"failed: database: {first_line(exc)}", False
    node.remember_cycle(ok)
    stamp = now()
    values: dict[str, object] = {"last_cycle_at": stamp, "last_outcome": line, "links": links}
    if coordinated:
        values["coordinated_at"] = stamp  # the same instant: status says "read the mailbox"
    with contextlib.suppress(SQLAlchemyError):
        registry.finished_cycle(node.engine, claimant.id, **values)
    say(f"{line} ({links} links, {time.monotonic() - started:.2f} s)")
    return ok


def _heartbeat(node: Node, worker_id: int, done: threading.Event) -> None:
    while not done.wait(HEARTBEAT):
        with contextlib.suppress(SQLAlchemyError):
            registry.beat(node.engine, worker_id)


def _say(index: int) -> Callable[[str], None]:
    def say(text: str) -> None:
        print(f"worker {index}: {text}", flush=True)

    return say
