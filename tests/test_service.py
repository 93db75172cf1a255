"""The service loop, its single-instance claim, and the node's log."""

from __future__ import annotations

import datetime as dt
import os
import socket
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import update

from mailsync.errors import ConfigError
from mailsync.journal import read_log
from mailsync.service import claim, serve, service_state
from mailsync.store.tables import log_table, now, service_table
from tests.cluster import Cluster


def add_schedule(c: Cluster, name: str, text: str) -> Path:
    path = c.root / name / "mailsync.toml"
    path.write_text(path.read_text() + "\n" + text)
    c.restart(name)
    return path


def cycles(said: list[str], name: str) -> int:
    """The cycles the service said it ran for ``name`` (an idle cycle
    leaves nothing in the database, by design)."""
    return sum(line.startswith((f"{name}: ok", f"{name}: failed")) for line in said)


def wait_for(condition: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_serve_runs_cycles_on_schedule_and_stops_between_them(tmp_path: Path) -> None:
    c = Cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}", ("koeln",))
    try:
        c.host.add_rule("customers", down="IUD", up="IUD")
        path = add_schedule(c, "hq", '[[schedule]]\nevery = "1s"\n')
        stop = threading.Event()
        said: list[str] = []
        worker = threading.Thread(
            target=serve,
            args=([path],),
            kwargs={"stop": stop, "say": said.append, "memory": c.office},
        )
        worker.start()
        try:
            wait_for(lambda: cycles(said, "hq") >= 2, "two cycles")
            state = service_state(c.nodes["hq"])
            assert state.running and state.pid == os.getpid() and state.host == socket.gethostname()
            assert state.last_outcome and state.last_outcome.startswith("ok:")
            wait_for(lambda: "koeln" in service_state(c.nodes["hq"]).last_peers, "koeln")
            assert service_state(c.nodes["hq"]).last_peers["koeln"].startswith("ok: ")
            with pytest.raises(ConfigError, match="runs already on"):  # another process's claim
                with c.engines["hq"].begin() as conn:
                    conn.execute(update(service_table).values(pid=os.getppid()))
                claim(c.engines["hq"], "second")
        finally:
            stop.set()
            worker.join(timeout=30)
        assert not worker.is_alive()
        assert any("next sync at" in line for line in said)
    finally:
        c.close()


def test_a_node_without_schedule_is_not_served_and_once_runs_one_cycle(tmp_path: Path) -> None:
    c = Cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}", ("koeln",))
    try:
        path = c.root / "hq" / "mailsync.toml"
        with pytest.raises(ConfigError, match=r"no \[\[schedule\]\] to serve"):
            serve([path], memory=c.office, say=lambda _: None)
        assert not service_state(c.nodes["hq"]).configured
        station = c.root / "koeln" / "mailsync.toml"  # two nodes, one process
        said: list[str] = []
        assert serve([path, station], once=True, memory=c.office, say=said.append) == 0
        assert cycles(said, "hq") == 1 and cycles(said, "koeln") == 1
        state = service_state(c.nodes["hq"])
        assert not state.running and state.stopped_at is not None
    finally:
        c.close()


def test_old_log_entries_are_purged_and_the_log_reads_by_filter(tmp_path: Path) -> None:
    c = Cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}", ("koeln",))
    try:
        old = now() - dt.timedelta(days=11)
        with c.engines["hq"].begin() as conn:
            conn.execute(
                log_table.insert(),
                [
                    {"at": old, "level": "error", "event": "x", "peer": "koeln", "message": "old"},
                    {
                        "at": now(),
                        "level": "warning",
                        "event": "x",
                        "peer": "koeln",
                        "message": "new",
                    },
                ],
            )
        c.sync("hq")
        engine = c.engines["hq"]
        messages = [e.message for e in read_log(engine)]
        assert "old" not in messages and "new" in messages
        assert [e.message for e in read_log(engine, level="warning")] == ["new"]
        assert read_log(engine, peer="nobody") == []
        assert read_log(engine, since=now() + dt.timedelta(hours=1)) == []
        # a longer retention keeps them
        path = add_schedule(c, "hq", "")
        path.write_text(path.read_text().replace("[node]\n", "[node]\nlog_retention_days = 30\n"))
        c.restart("hq")
        with c.engines["hq"].begin() as conn:
            conn.execute(
                log_table.insert().values(
                    at=old, level="info", event="x", peer=None, message="kept"
                )
            )
        c.sync("hq")
        assert "kept" in [e.message for e in read_log(engine)]
    finally:
        c.close()


def test_repeated_failures_back_off_and_an_overrun_is_not_doubled(tmp_path: Path) -> None:
    from mailsync.service import MAX_BACKOFF, _Served

    c = Cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}", ("koeln",))
    try:
        add_schedule(c, "hq", '[[schedule]]\nevery = "1m"\n')
        served = _Served(c.nodes["hq"])
        start = dt.datetime(2026, 11, 23, 10, 0, 30, tzinfo=dt.UTC)
        served.plan(start)
        assert served.next == dt.datetime(2026, 11, 23, 10, 1, tzinfo=dt.UTC)
        # a cycle that ran until 10:07:10 is followed by 10:08, not by the slots it missed
        served.plan(start + dt.timedelta(minutes=6, seconds=40))
        assert served.next == dt.datetime(2026, 11, 23, 10, 8, tzinfo=dt.UTC)
        served.failures = 1  # the first failure: simply the next slot
        served.plan(start)
        assert served.next == dt.datetime(2026, 11, 23, 10, 1, tzinfo=dt.UTC)
        pauses = []
        for failures in (2, 3, 4, 10, 20):
            served.failures = failures
            served.plan(start)
            assert served.next is not None
            pauses.append(served.next - start)
        assert pauses == sorted(pauses) and pauses[0] >= dt.timedelta(minutes=1)
        assert pauses[-1] <= MAX_BACKOFF + dt.timedelta(minutes=1)
    finally:
        c.close()


def test_a_reused_pid_does_not_hold_the_claim_and_a_bug_does_not_stop_serve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess

    from mailsync.node import Node

    c = Cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}", ("koeln",))
    other = subprocess.Popen(["sleep", "60"])  # alive, and not mailsync
    try:
        claim(c.engines["hq"], "first")
        stale = now() - dt.timedelta(hours=1)
        with c.engines["hq"].begin() as conn:
            conn.execute(update(service_table).values(pid=other.pid, heartbeat_at=now()))
        with pytest.raises(ConfigError, match="runs already on"):  # it beats: trusted
            claim(c.engines["hq"], "second")
        with c.engines["hq"].begin() as conn:
            conn.execute(update(service_table).values(pid=other.pid, heartbeat_at=stale))
        claim(c.engines["hq"], "second")  # a stale beat from a pid someone else has now

        def boom(self: Node) -> None:
            raise RuntimeError("boom")

        monkeypatch.setattr(Node, "sync", boom)
        said: list[str] = []
        path = c.root / "hq" / "mailsync.toml"
        assert serve([path], once=True, memory=c.office, say=said.append) == 1
        assert any("RuntimeError: boom" in line for line in said)
        logged = [e.message for e in read_log(c.engines["hq"])]
        assert "sync cycle failed: RuntimeError: boom" in logged
    finally:
        other.kill()
        other.wait()
        c.close()


def test_a_serve_that_died_is_named_as_such_not_stopped(tmp_path: Path) -> None:
    """`status` after serve was killed said "stopped", like a service never
    started; every time it prints carries its zone."""
    import subprocess

    from mailsync.cli.node_cmds import _service_line

    c = Cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}", ("koeln",))
    gone = subprocess.Popen(["true"])
    gone.wait()
    try:
        add_schedule(c, "hq", '[[schedule]]\nevery = "15m"\n')
        claim(c.engines["hq"], "serve")
        with c.engines["hq"].begin() as conn:
            conn.execute(update(service_table).values(pid=gone.pid))
        state = service_state(c.nodes["hq"])
        assert state.crashed and not state.running
        line = _service_line(state, [])
        assert "stopped unexpectedly" in line and f"pid {gone.pid}" in line
        zone = dt.datetime.now().astimezone().strftime("%Z")
        assert line.count(zone) >= 2, line
        # a serve that stopped as asked is "stopped", not crashed
        with c.engines["hq"].begin() as conn:
            conn.execute(update(service_table).values(stopped_at=now()))
        state = service_state(c.nodes["hq"])
        assert not state.crashed and "stopped[/] since" in _service_line(state, [])
    finally:
        c.close()
