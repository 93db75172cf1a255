"""Several host workers on one PostgreSQL database (issue 21).

Workers here are Node objects of the same host config, each with its own
engine and :class:`Claimant` (its own database session and locks), as
separate processes have; ``serve --workers`` itself runs as a process at
the end. Every test runs the host on PostgreSQL: the workers coordinate
through its advisory locks.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.exc import SQLAlchemyError

from mailsync.errors import ConfigError
from mailsync.node import Node
from mailsync.store.tables import inbox, mailbag, outbox, workers_table
from mailsync.transport.base import Incoming
from mailsync.transport.memory import MemoryPostOffice
from mailsync.workers import registry
from mailsync.workers.claims import Claimant, Share
from mailsync.workers.mailbag import SharedMailbox, sender_of
from tests.cluster import ChaosPostOffice, Cluster, customers
from tests.test_delivery import SHARED, applied_once, workload

STATIONS = ("s1", "s2", "s3", "s4", "s5")


class SafeOffice(ChaosPostOffice):
    """The chaos post office, safe to deliver to from two threads at once."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.lock = threading.Lock()

    def deliver(self, recipient: str, raw: bytes) -> str:
        with self.lock:
            return super().deliver(recipient, raw)


class Workers:
    """Two workers of the cluster's host: its own node and a second one."""

    def __init__(self, c: Cluster) -> None:
        self.c = c
        path = c.root / "hq" / "mailsync.toml"
        self.nodes = [c.host, Node.open(path, memory=c.office)]
        self.claimants = [Claimant(n.engine, str(path)) for n in self.nodes]

    def cycle(self, *which: int) -> list[object]:
        """One cycle of each worker named, at the same time (threads)."""
        results: list[object] = [None] * len(which)

        def run(slot: int, index: int) -> None:
            try:
                results[slot] = self.nodes[index].sync(claimant=self.claimants[index])
            except BaseException as exc:  # handed to the test below
                results[slot] = exc

        threads = [threading.Thread(target=run, args=(s, i)) for s, i in enumerate(which)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        for result in results:
            if isinstance(result, BaseException):
                raise result
            assert result is not None and not result.errors, result.errors  # type: ignore[attr-defined]
        return results

    def close(self) -> None:
        for claimant in self.claimants:
            claimant.close()
        self.nodes[1].close()


@pytest.fixture
def cluster(pg_url: str, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, pg_url, STATIONS)
    try:
        c.execute("hq", customers.insert(), [{"id": i, "name": f"c{i}"} for i in range(1, 11)])
        c.host.add_rule("customers", down="IUD", up="IUD")
        yield c
    finally:
        c.close()


def _bagged(c: Cluster, *, aside: bool = False, peer: str | None = None) -> int:
    with c.engines["hq"].connect() as conn:
        where = mailbag.c.aside.is_not(None) if aside else mailbag.c.aside.is_(None)
        if peer is not None:
            where = where & (mailbag.c.peer == peer)
        return int(conn.execute(select(func.count()).select_from(mailbag).where(where)).scalar())


def test_claims_share_the_links_and_one_worker_takes_the_intake(cluster: Cluster) -> None:
    w = Workers(cluster)
    try:
        a, b = w.claimants
        first = a.claim()
        second = b.claim()
        # two live workers: the first takes its half from the start of the
        # peer order, the second the rest; nobody holds a link twice
        assert first.peers == frozenset(STATIONS[:3])
        assert second.peers == frozenset(STATIONS[3:])
        assert first.known == second.known == frozenset(STATIONS)
        assert first.coordinator and not second.coordinator
        a.release(first)
        b.release(second)
        # both released: the second's share again (from its own place in
        # the peer order, wrapping round), and the intake now free
        again = b.claim()
        assert again.peers == frozenset({"s4", "s5", "s1"}) and again.coordinator
        # the first, meanwhile, skips what the second holds
        other = a.claim()
        assert other.peers == frozenset({"s2", "s3"}) and not other.coordinator
    finally:
        w.close()


def test_two_stations_never_share_a_lock(cluster: Cluster) -> None:
    """s05246 and s53995 have the same 32-bit hashtext: on one lock, the
    second would wait for a worker that does not serve it."""
    from mailsync.dialects import pg_locks

    engine = cluster.engines["hq"]
    with engine.connect() as a, engine.connect() as b:
        clash = a.execute(text("SELECT hashtext('s05246') = hashtext('s53995')")).scalar()
        assert clash  # the pair the bench found
        assert pg_locks.claim_links(a, ["s05246"], 1) == ["s05246"]
        assert pg_locks.claim_links(b, ["s53995"], 1) == ["s53995"]
        assert pg_locks.claim_links(b, ["s05246"], 1) == []  # that one is held
        pg_locks.release_links(a, ["s05246"])
        pg_locks.release_links(b, ["s53995"])
        a.commit()
        b.commit()


def test_a_dead_worker_lets_go_of_its_links_at_once(cluster: Cluster) -> None:
    w = Workers(cluster)
    try:
        a, b = w.claimants
        held = a.claim()
        assert held.peers and held.coordinator
        assert [x.alive for x in registry.listing(cluster.engines["hq"])] == [True, True]
        # the process dies: the server ends its session, no release said
        pid = a.session.execute(text("SELECT pg_backend_pid()")).scalar()
        with cluster.engines["hq"].connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        deadline = time.monotonic() + 30
        while [x.alive for x in registry.listing(cluster.engines["hq"])] != [False, True]:
            assert time.monotonic() < deadline, "the dead worker still holds its lock"
            time.sleep(0.05)
        raw = a.session.connection.dbapi_connection
        with contextlib.suppress(SQLAlchemyError):
            a.session.invalidate()
        assert raw is not None
        raw.close()
        taken = b.claim()  # the only live worker: every link, and the intake
        assert taken.peers == frozenset(STATIONS) and taken.coordinator
        b.release(taken)
    finally:
        w.claimants[1].close()
        w.nodes[1].close()


def test_mail_for_another_workers_link_waits_in_the_bag_for_it(cluster: Cluster) -> None:
    c = cluster
    w = Workers(c)
    try:
        for _ in range(2):  # every station gets its load (and acks it)
            c.sync(*STATIONS)
            w.cycle(0, 1)
        c.sync(*STATIONS)
        assert all(len(c.rows(s, customers)) == 10 for s in STATIONS)
        c.execute("s4", customers.insert(), {"id": 400, "name": "from s4"})
        c.execute("s5", customers.insert(), {"id": 500, "name": "from s5"})
        c.sync("s4", "s5")
        w.cycle(0)  # the first alone: s1-s3, and the mailbox
        assert _bagged(c) >= 2  # s4's and s5's changesets, for the second
        w.cycle(1)  # which takes its bag
        assert _bagged(c) == 0
        assert {400, 500} <= {r[0] for r in c.rows("hq", customers)}
        c.sync(*STATIONS)
        w.cycle(0, 1)
        c.sync(*STATIONS)
        assert c.agree("customers")
        assert {r[0] for r in c.rows("s1", customers)} >= {400, 500}
    finally:
        w.close()


def test_a_forged_message_is_set_aside_at_the_intake_not_bagged(cluster: Cluster) -> None:
    c = cluster
    office = c.office
    assert isinstance(office, MemoryPostOffice)
    w = Workers(c)
    try:
        for _ in range(2):
            c.sync(*STATIONS)
            w.cycle(0, 1)
        c.execute("s5", customers.insert(), {"id": 501, "name": "real"})
        c.sync("s5")
        box = office.boxes["hq@example.test"]
        raw = next(r for r in box.values() if sender_of(r, "hq") == "s5")
        # a byte flipped near the end of the signed envelope (its base64)
        cut = raw.rstrip().rfind(b"\r\n", 0, len(raw) - 10)
        flip = b"A" if raw[cut - 5 : cut - 4] != b"A" else b"B"
        office.deliver("hq@example.test", raw[: cut - 5] + flip + raw[cut - 4 :])
        aside = len(office.aside.get("hq@example.test", []))
        before = _bagged(c, peer="s5")
        w.cycle(0)  # the coordinator: s5 is not its link
        # the real one bagged for s5's holder, the forged one set aside at once
        assert _bagged(c, peer="s5") == before + 1
        assert len(office.aside["hq@example.test"]) == aside + 1
        w.cycle(1)  # the holder applies it
        assert _bagged(c, peer="s5") == 0 and _bagged(c, aside=True) == 0
        assert 501 in {r[0] for r in c.rows("hq", customers)}
    finally:
        w.close()


class _Box:
    """A mailbox of a few messages, remembering what was taken out."""

    def __init__(self, messages: list[tuple[str, bytes]]) -> None:
        self.messages = dict(messages)
        self.gone: list[str] = []

    def __enter__(self) -> _Box:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def fetch(self) -> Iterator[Incoming]:
        for key, raw in list(self.messages.items()):
            yield Incoming(key, raw)

    def processed(self, message_id: str) -> None:
        self.gone.append(message_id)
        del self.messages[message_id]

    def set_aside(self, message_id: str, reason: str) -> None:
        raise AssertionError(reason)


def test_a_flood_from_one_station_fills_its_bag_only_to_its_cap(cluster: Cluster) -> None:
    """A station (or its stolen key) sending more than its inbox may hold:
    the rest waits in the mailbox, the database does not fill up."""
    c = cluster
    office = c.office
    assert isinstance(office, MemoryPostOffice)
    c.sync("hq", "s5")  # its load, and its ack back
    raw = next(r for r in office.boxes["hq@example.test"].values() if sender_of(r, "hq") == "s5")
    box = _Box([(f"m{i}", raw) for i in range(10)])
    share = Share(frozenset({"s1"}), True, frozenset(STATIONS))
    signed: list[str] = []
    mailbox = SharedMailbox(
        c.engines["hq"],
        "hq",
        share,
        lambda: box,  # type: ignore[arg-type,return-value]
        lambda blob, where, peer: signed.append(peer),
        cap=3 * len(raw) + 10,
    )
    with mailbox as rx:
        assert list(rx.fetch()) == []  # nothing of its own
    assert signed == ["s5"] * 10  # every one checked before it is kept
    assert _bagged(c, peer="s5") == 3 and len(box.gone) == 3
    assert len(box.messages) == 7  # the rest waits in the mailbox


def test_a_plain_cycle_gives_way_to_the_workers(cluster: Cluster, tmp_path: Path) -> None:
    w = Workers(cluster)
    try:
        with pytest.raises(ConfigError, match="workers serve this node"):
            cluster.host.sync()
        from mailsync.service import claim

        with pytest.raises(ConfigError, match="workers serve this node already"):
            claim(cluster.engines["hq"], "hq.toml")
        out = cluster.cli("hq", "sync")
        assert out.returncode != 0 and "workers serve this node" in out.stderr
        assert "Traceback" not in out.stderr
    finally:
        w.close()
    assert not cluster.host.sync().errors  # gone: a plain cycle runs again


def test_serve_workers_refuses_what_cannot_work(tmp_path: Path, pg_url: str) -> None:
    lite = Cluster(tmp_path / "lite", f"sqlite:///{tmp_path / 'lite-hq.db'}", ("s1",))
    try:
        out = lite.cli("hq", "serve", "--workers", "2", "--once")
        assert out.returncode == 2, out.stderr
        assert "need the host's database on PostgreSQL" in out.stderr
        out = lite.cli("s1", "serve", "--workers", "2", "--once")
        assert out.returncode == 2 and "a remote has one link" in out.stderr
    finally:
        lite.close()
    pg = Cluster(tmp_path / "pg", pg_url, ("s1",))
    try:
        out = pg.cli("hq", "serve", "--workers", "2", "--once")
        assert out.returncode == 2 and "memory: mailbox lives in one process" in out.stderr
        out = pg.cli("hq", "serve", "--workers", "0", "--once")
        assert out.returncode == 2 and "--workers 0" in out.stderr
        pg.set_mailbox(
            "hq", {"address": "hq@example.test", "send": "maildir:/x", "receive": "maildir:/x"}
        )
        out = pg.cli("hq", "serve", "--workers", "2")  # no [[schedule]], no --once
        assert out.returncode == 2 and "no [[schedule]] for the workers" in out.stderr
        assert all("Traceback" not in x for x in (out.stderr, out.stdout))
    finally:
        pg.close()


def test_serve_workers_runs_worker_processes(pg_url: str, tmp_path: Path) -> None:
    """`serve --workers 2 --once` over Maildir: two processes, every station
    served, both listed by `status`."""
    c = Cluster(tmp_path, pg_url, STATIONS, transport="maildir")
    try:
        c.execute("hq", customers.insert(), [{"id": i, "name": f"c{i}"} for i in range(1, 6)])
        c.host.add_rule("customers", down="IUD", up="IUD")
        c.host.close()
        out = c.cli("hq", "serve", "--workers", "2", "--once")
        assert out.returncode == 0, out.stdout + out.stderr
        c.sync(*STATIONS)
        assert all(len(c.rows(s, customers)) == 5 for s in STATIONS)
        status = c.cli("hq", "status")
        assert status.returncode == 0, status.stderr
        assert status.stdout.count("worker") >= 2
        with c.engines["hq"].connect() as conn:
            served = conn.execute(select(func.count()).select_from(outbox)).scalar()
        assert served == len(STATIONS)  # one initial load each, not two
    finally:
        c.close()


@pytest.mark.parametrize("seed", [21, 22])
def test_chaos_with_two_workers_converges_exactly_once(
    pg_url: str, tmp_path: Path, seed: int
) -> None:
    office = SafeOffice(seed)
    c = Cluster(
        tmp_path,
        pg_url,
        ("koeln", "berlin", "muenchen"),
        office=office,
        node_settings={"resend_after_minutes": 0, "gap_request_minutes": 0},
    )
    w = Workers(c)
    try:
        owned: dict[str, list[int]] = {name: [] for name in c.names}
        c.execute("hq", customers.insert(), [{"id": i, "name": f"shared {i}"} for i in SHARED])
        c.host.add_rule("customers", down="IUD", up="IUD")
        office.chaotic = False
        host_round: Callable[[], object] = lambda: w.cycle(0, 1)  # noqa: E731
        stations = c.names[1:]
        c.sync(*stations)
        host_round()
        c.sync(*stations)
        host_round()
        office.chaotic = True
        rng = random.Random(seed)
        written: set[str] = set()
        for step in range(12):
            workload(c, rng, owned, step, written)
            for name in rng.sample(stations, len(stations)):
                assert not c.nodes[name].sync().errors
            host_round()
        assert office.dropped and office.duplicated and office.delayed
        office.calm()
        for _ in range(14):
            if _settled(c):
                break
            c.sync(*stations)
            host_round()
        assert _settled(c), "did not converge"
        applied_once(c, owned)
    finally:
        w.close()
        c.close()


def _settled(c: Cluster) -> bool:
    for engine in c.engines.values():
        with engine.connect() as conn:
            for table in (outbox, inbox, mailbag):
                if conn.execute(select(func.count()).select_from(table)).scalar():
                    return False
    return c.agree("customers")


def test_a_machine_without_the_shared_witness_is_refused(cluster: Cluster) -> None:
    """Workers on another machine write the witness; a machine that does not
    see it (a missing file would end every lease) refuses to act."""
    c = cluster
    path = c.root / "hq" / "mailsync.toml"
    elsewhere = Claimant(c.engines["hq"], str(path))
    try:
        c.execute("hq", update(workers_table).values(host="other-machine"))
        c.host.close()
        witness = path.with_suffix(".witness")
        assert witness.exists()
        witness.rename(witness.with_suffix(".moved"))
        with pytest.raises(ConfigError, match="workers of the node run on other-machine"):
            Node.open(path, memory=c.office)
        out = c.cli("hq", "status")
        assert out.returncode == 2 and "share its directory" in out.stderr
        assert "Traceback" not in out.stderr
    finally:
        elsewhere.close()
    # that machine's workers gone: the witness is lost as before (healed)
    c.nodes["hq"] = Node.open(path, memory=c.office)


def test_a_dead_mailbox_still_lets_a_worker_take_its_bag(cluster: Cluster) -> None:
    """The intake's mailbox cannot be reached: this worker's bagged mail is
    taken first, then the mailbox's failure ends the stage."""
    from mailsync.errors import TransportError
    from mailsync.store.tables import now

    with cluster.engines["hq"].begin() as conn:
        conn.execute(mailbag.insert().values(peer="s1", raw=b"bagged", taken_at=now()))

    def down() -> _Box:
        raise TransportError("imap://hq@localhost: connection refused")

    share = Share(frozenset({"s1"}), True, frozenset(STATIONS))
    mailbox = SharedMailbox(
        cluster.engines["hq"],
        "hq",
        share,
        down,
        lambda *a: None,
        cap=1 << 20,  # type: ignore[arg-type]
    )
    seen = []
    with pytest.raises(TransportError), mailbox as rx:
        for msg in rx.fetch():
            seen.append(msg.raw)
            rx.processed(msg.id)
    assert seen == [b"bagged"] and _bagged(cluster) == 0
