"""``mailsync serve``: cycles on the node's schedule until stopped.

One service per node, recorded in the node's own database
(``mailsync_service``): a second start — on this machine or another one
sharing the database — is refused with where, which process and since when
the first one runs. A service on this machine counts as running while its
process lives; one elsewhere while its heartbeat (written every
:data:`HEARTBEAT` seconds, from a thread, also during a long cycle) is
younger than :data:`STALE`.

SIGTERM and SIGINT let the cycle in progress finish, then the service exits
cleanly. A cycle that overruns the next start is not doubled: the next run
is the first slot after it ends. A failing cycle is logged and retried at
the next slot; after repeated failures, slots are skipped with a growing
backoff (up to an hour) so a dead mailbox is not hammered.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import socket
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from sqlalchemy import Engine, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from mailsync.errors import ConfigError, MailsyncError, first_line
from mailsync.node import CycleReport, Node
from mailsync.schedule import next_run, parse_zone
from mailsync.store.tables import now, service_table
from mailsync.workers.registry import any_alive

#: Seconds between heartbeats of a running service.
HEARTBEAT = 30.0
#: A service on another machine whose heartbeat is older than this is dead.
STALE = dt.timedelta(minutes=10)
#: The longest pause backoff adds after repeated failures.
MAX_BACKOFF = dt.timedelta(hours=1)


@dataclass(frozen=True)
class ServiceState:
    """What ``status`` says about the service of a node."""

    configured: bool
    running: bool
    host: str | None = None
    pid: int | None = None
    started_at: dt.datetime | None = None
    stopped_at: dt.datetime | None = None
    next_run_at: dt.datetime | None = None
    last_cycle_at: dt.datetime | None = None
    last_outcome: str | None = None
    #: per peer, the outcome of the last cycle that had to do with it
    last_peers: dict[str, str] = field(default_factory=dict)
    #: the last heartbeat of the service that claimed the node
    heartbeat_at: dt.datetime | None = None

    @property
    def crashed(self) -> bool:
        """A service claimed the node, never said it stopped, and is gone
        (killed, crashed, its machine down): not the same as "stopped"."""
        return self.host is not None and self.stopped_at is None and not self.running


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    if value is None:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def _alive(row: Any) -> bool:
    if row is None or row.stopped_at is not None:
        return False
    beat = _aware(row.heartbeat_at)
    fresh = beat is not None and now() - beat < STALE
    if row.host == socket.gethostname():
        try:
            os.kill(row.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        # the pid may have been reused since by something else: a process
        # whose command line does not name mailsync must also have beaten
        return fresh or _names_mailsync(row.pid)
    return fresh


def _names_mailsync(pid: int) -> bool:
    try:
        return b"mailsync" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc: trust the pid


def service_state(node: Node) -> ServiceState:
    with node.engine.connect() as conn:
        row = conn.execute(select(service_table).where(service_table.c.id == 1)).first()
    configured = bool(node.config.schedules)
    if row is None:
        return ServiceState(configured, False)
    return ServiceState(
        configured,
        _alive(row),
        row.host,
        row.pid,
        _aware(row.started_at),
        _aware(row.stopped_at),
        _aware(row.next_run_at),
        _aware(row.last_cycle_at),
        row.last_outcome,
        json.loads(row.last_peers) if row.last_peers else {},
        _aware(row.heartbeat_at),
    )


def claim(engine: Engine, where: str) -> None:
    """Record this process as the node's service, or refuse: one runs already."""
    host, pid = socket.gethostname(), os.getpid()
    if any_alive(engine):
        raise ConfigError(
            f"{where}: workers serve this node already (`mailsync serve --workers`)",
            hint="`mailsync status` lists them; add workers rather than a second service",
        )
    with engine.begin() as conn:
        # a write first: it takes SQLite's write lock (a row lock on
        # PostgreSQL), so two services starting at once cannot both pass
        conn.execute(update(service_table).where(service_table.c.id == 1).values(id=1))
        row = conn.execute(select(service_table).where(service_table.c.id == 1)).first()
        if row is not None and _alive(row) and not (row.host == host and row.pid == pid):
            since = _aware(row.started_at)
            raise ConfigError(
                f"{where}: mailsync serve runs already on {row.host} (pid {row.pid}) since "
                + (f"{since:%Y-%m-%d %H:%M} UTC" if since else "a moment ago"),
                hint="stop that one first (SIGTERM lets its cycle finish)",
            )
        values = {
            "host": host,
            "pid": pid,
            "started_at": now(),
            "heartbeat_at": now(),
            "stopped_at": None,
            "next_run_at": None,
        }
        if row is None:
            try:
                conn.execute(service_table.insert().values(id=1, **values))
            except IntegrityError:
                # another one made the row first, at the same moment
                raise ConfigError(
                    f"{where}: mailsync serve was started twice at the same moment; "
                    "this one gives way",
                    hint="`mailsync status` says where the other runs",
                ) from None
        else:
            conn.execute(update(service_table).where(service_table.c.id == 1).values(**values))


def _mine() -> Any:
    return (
        (service_table.c.id == 1)
        & (service_table.c.host == socket.gethostname())
        & (service_table.c.pid == os.getpid())
    )


def record(engine: Engine, **values: Any) -> None:
    """Update this service's row (heartbeat, next run, last outcome, stop)."""
    with engine.begin() as conn:
        conn.execute(update(service_table).where(_mine()).values(heartbeat_at=now(), **values))


def outcome(report: CycleReport) -> str:
    """One line for the last cycle, per peer where something happened."""
    text = f"{report.received} received, {report.rows_applied} rows applied, {report.sent} sent"
    if report.errors:
        return f"failed: {report.errors[0]}" + (
            f" (+{len(report.errors) - 1} more)" if len(report.errors) > 1 else ""
        )
    return "ok: " + text


def backoff(failures: int) -> dt.timedelta:
    """The pause added before the next slot after ``failures`` failed cycles
    in a row: none for one, then a minute doubling up to :data:`MAX_BACKOFF`,
    so that a dead mailbox or database is not hammered."""
    if failures <= 1:
        return dt.timedelta(0)
    pause: dt.timedelta = dt.timedelta(minutes=1) * 2 ** (failures - 2)
    return min(pause, MAX_BACKOFF)


class _Served:
    """One node under the service: its schedule, next run, failures."""

    def __init__(self, node: Node) -> None:
        self.node = node
        where = str(node.config.path)
        if not node.config.schedules:
            raise ConfigError(
                f"{where}: no [[schedule]] to serve",
                hint='add e.g. [[schedule]] every = "15m" between = "06:00-23:00", '
                "or run `mailsync sync` from cron",
            )
        self.zone = parse_zone(node.config.timezone, where)
        self.failures = 0
        self.next: dt.datetime | None = None

    def plan(self, after: dt.datetime) -> None:
        self.next = next_run(self.node.config.schedules, after + backoff(self.failures), self.zone)
        with contextlib.suppress(SQLAlchemyError):  # only shown by status: not worth a stop
            record(self.node.engine, next_run_at=self.next)


def serve(
    configs: Sequence[Path],
    *,
    once: bool = False,
    say: Callable[[str], None] = print,
    stop: threading.Event | None = None,
    memory: Any = None,
) -> int:
    """Run the nodes' cycles on their schedules until ``stop`` is set (by
    SIGTERM/SIGINT when run from the CLI). ``once``: one cycle each, now.
    Returns the number of cycles that failed."""
    stop = stop or threading.Event()
    nodes: list[Node] = []
    served: list[_Served] = []
    failed = 0
    try:
        for path in configs:
            node = Node.open(path, memory=memory)
            nodes.append(node)
            if not once:
                served.append(_Served(node))
            claim(node.engine, str(path))
        beat = threading.Thread(target=_heartbeat, args=(nodes, stop), daemon=True)
        beat.start()
        if once:
            for node in nodes:
                failed += not _cycle(node, say)
            return failed
        for item in served:
            item.plan(now())
            say(f"{item.node.config.node_id}: next sync at {_local(item.next, item.zone)}")
        while not stop.is_set():
            due = [s for s in served if s.next is not None]
            if not due:
                say("no schedule has another run: stopping")
                break
            first = min(due, key=lambda s: s.next or now())
            assert first.next is not None
            wait = (first.next - now()).total_seconds()
            if wait > 0:
                stop.wait(min(wait, HEARTBEAT))
                continue
            ok = _cycle(first.node, say)
            failed += not ok
            first.failures = 0 if ok else first.failures + 1
            first.plan(now())  # slots missed by an overrun are skipped, not doubled
            if first.next is not None:
                say(f"{first.node.config.node_id}: next sync at {_local(first.next, first.zone)}")
        return failed
    finally:
        stop.set()
        for node in nodes:
            with contextlib.suppress(SQLAlchemyError):
                record(node.engine, stopped_at=now(), next_run_at=None)
            node.close()


def _local(when: dt.datetime | None, zone: dt.tzinfo) -> str:
    return "never" if when is None else f"{when.astimezone(zone):%Y-%m-%d %H:%M:%S %Z}"


def _cycle(node: Node, say: Callable[[str], None]) -> bool:
    """One sync cycle; a failure is logged and reported, never raised."""
    name = node.config.node_id
    peers: dict[str, str] = {}
    try:
        report = node.sync()
        line = outcome(report)
        stamp = f"{now():%Y-%m-%d %H:%M} UTC"
        peers = {p: f"{text} (cycle of {stamp})" for p, text in report.peer_outcomes().items()}
        ok, raised = not report.errors, False
    except MailsyncError as exc:
        line, ok, raised = f"failed: {exc}", False, True
    except SQLAlchemyError as exc:
        line, ok, raised = f"failed: database: {first_line(exc)}", False, True
    except Exception as exc:  # a bug must not stop the service: log it, retry later
        line, ok, raised = f"failed: {type(exc).__name__}: {exc}", False, True
        say(f"{name}: unexpected error:\n{traceback.format_exc()}")
    node.remember_cycle(ok)  # for metrics: when, how long, whether it succeeded
    if raised:
        with contextlib.suppress(SQLAlchemyError):  # the database may be what failed
            node.journal.error("cycle", f"sync cycle {line}")
    with contextlib.suppress(SQLAlchemyError):
        # a peer keeps the outcome of the last cycle that had to do with it
        with node.engine.connect() as conn:
            held = conn.execute(select(service_table.c.last_peers).where(_mine())).scalar()
        merged = {**(json.loads(held) if held else {}), **peers}
        record(node.engine, last_cycle_at=now(), last_outcome=line, last_peers=json.dumps(merged))
    say(f"{name}: {line}")
    return ok


def _heartbeat(nodes: list[Node], stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT):
        for node in nodes:
            # busy with a long cycle's write: the next beat will do
            with contextlib.suppress(SQLAlchemyError):
                record(node.engine)


def stop_on_signals(stop: threading.Event, say: Callable[[str], None]) -> None:
    """SIGTERM and SIGINT set ``stop``: the cycle in progress finishes first."""

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt  # a second signal: stop now
        say(f"{signal.Signals(signum).name}: finishing the cycle in progress, then stopping")
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
