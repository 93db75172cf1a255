"""Exactly-once over lossy mail: acks, resends, resend requests, under chaos.

A post office that drops, duplicates, delays and reorders messages under a
fixed seed carries a random workload between the host and three stations;
after the faults stop, a bounded number of cycles brings every node to the
same content with every outbox drained. ``MAILSYNC_SOAK=N`` runs N seeds
with longer workloads.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from sqlalchemy import delete, func, select, update

from mailsync.conflicts import list_conflicts
from mailsync.cycle import controls
from mailsync.errors import MessageError
from mailsync.link import Link
from mailsync.store.tables import inbox, links, log_table, outbox
from mailsync.transport.memory import MemoryPostOffice
from mailsync.wire.controls import ReloadRequest
from tests.cluster import Cluster, chaos_cluster, customers

SOAK = int(os.environ.get("MAILSYNC_SOAK", "0"))
SEEDS = list(range(1, 1 + max(SOAK, 3)))
ROUNDS = 40 if SOAK else 12


#: Rows every node edits now and then: the conflicts of the chaos test.
SHARED = range(1, 7)


def workload(
    c: Cluster, rng: random.Random, owned: dict[str, list[int]], step: int, written: set[str]
) -> None:
    """One random edit per node of a row it created, and now and then one of
    a shared row — concurrent edits of those are conflicts."""
    for index, name in enumerate(c.names):
        if rng.random() < 0.3:
            value = f"{name} {step}"
            shared = customers.c.id == rng.choice(SHARED)
            c.execute(name, update(customers).where(shared).values(city=value))
            written.add(value)
        mine = owned[name]
        roll = rng.random()
        if roll < 0.5 or not mine:
            new = (index + 1) * 100_000 + step
            c.execute(name, customers.insert(), {"id": new, "name": f"{name} {step} ✓"})
            mine.append(new)
        elif roll < 0.8:
            row = rng.choice(mine)
            c.execute(name, update(customers).where(customers.c.id == row).values(city=f"s{step}"))
        else:
            row = mine.pop(rng.randrange(len(mine)))
            c.execute(name, delete(customers).where(customers.c.id == row))


def applied_once(c: Cluster, owned: dict[str, list[int]]) -> None:
    """Everything each node sent was applied by its peer, once, in order,
    and the host holds exactly the rows the workload left."""
    for name in c.names[1:]:
        with c.engines[name].connect() as conn:
            station = conn.execute(select(links.c.out_seq, links.c.in_seq)).one()
        with c.engines["hq"].connect() as conn:
            host = conn.execute(
                select(links.c.out_seq, links.c.in_seq).where(links.c.peer == name)
            ).one()
        assert station.in_seq == host.out_seq and host.in_seq == station.out_seq
    expected = sorted([*SHARED, *(i for rows in owned.values() for i in rows)])
    assert [r[0] for r in c.rows("hq", customers)] == expected


def settled(c: Cluster) -> bool:
    for engine in c.engines.values():
        with engine.connect() as conn:
            if conn.execute(select(func.count()).select_from(outbox)).scalar():
                return False
            if conn.execute(select(func.count()).select_from(inbox)).scalar():
                return False
    return c.agree("customers")


#: (seed, max_message_bytes): the small limit cuts changesets into parts.
CASES = [(seed, None) for seed in SEEDS] + [(100 + seed, 12_000) for seed in SEEDS[: max(SOAK, 1)]]


@pytest.mark.parametrize(("seed", "limit"), CASES)
def test_chaos_converges_exactly_once(tmp_path: Path, seed: int, limit: int | None) -> None:
    c, office = chaos_cluster(tmp_path, seed)
    try:
        owned: dict[str, list[int]] = {name: [] for name in c.names}
        if limit:
            for name in c.names:
                box = {"address": f"{name}@example.test", "send": "memory:", "receive": "memory:"}
                c.set_mailbox(name, {**box, "max_message_bytes": limit})
            letters = random.Random(seed)
            bulk = [
                {"id": 900_000 + i, "name": "".join(letters.choices("abcdefghijklmnop", k=80))}
                for i in range(600)
            ]
            c.execute("hq", customers.insert(), bulk)
            owned["hq"] = [row["id"] for row in bulk]
        c.execute("hq", customers.insert(), [{"id": i, "name": f"shared {i}"} for i in SHARED])
        c.host.add_rule("customers", down="IUD", up="IUD")
        # the stations get their rules (and capture triggers) before they edit
        office.chaotic = False
        c.sync(*c.names, *c.names)
        office.chaotic = True
        rng = random.Random(seed)
        written: set[str] = set()
        for step in range(ROUNDS):
            workload(c, rng, owned, step, written)
            for name in rng.sample(c.names, len(c.names)):
                assert not c.nodes[name].sync().errors
        assert office.dropped and office.duplicated and office.delayed
        assert office.dictionaries, "some bodies should have used a link's dictionary"
        if limit:
            assert office.parts > 1, "the small limit should have made parts"
        office.calm()
        for _ in range(12):  # a bounded number of quiet cycles
            if settled(c):
                break
            c.sync(*c.names)
        assert settled(c), "did not converge"
        applied_once(c, owned)
        # concurrent edits of the shared rows were conflicts, each kept with
        # both versions, and settled the same way everywhere (checked above)
        found = []
        for engine in c.engines.values():
            with engine.connect() as conn:
                found += list_conflicts(conn)
        assert found, "the shared rows should have been edited concurrently"
        for conflict in found:
            assert conflict.table == "customers" and conflict.key[0] in SHARED
            for version in (conflict.ours, conflict.theirs):
                assert version is not None and len(version) == len(conflict.columns)
                city = dict(zip(conflict.columns, version, strict=True))["city"]
                assert city in written
    finally:
        c.close()


def host_and_koeln(tmp_path: Path, resend_after: float) -> tuple[Cluster, MemoryPostOffice]:
    """A host and one station over a plain memory post office, gaps asked for at once."""
    office = MemoryPostOffice()
    c = Cluster(
        tmp_path,
        f"sqlite:///{tmp_path / 'hq.db'}",
        ("koeln",),
        office=office,
        node_settings={"resend_after_minutes": resend_after, "gap_request_minutes": 0},
    )
    c.host.add_rule("customers", down="IUD", up="IUD")
    return c, office


def test_a_lost_last_message_is_sent_again(tmp_path: Path) -> None:
    c, office = host_and_koeln(tmp_path, resend_after=0)
    try:
        c.execute("hq", customers.insert(), {"id": 1, "name": "eins"})
        c.sync("hq")
        office.boxes["koeln@example.test"].clear()  # the mail is lost
        assert c.sync("koeln")["koeln"].applied == []
        c.sync("hq")  # unacknowledged: sent again
        assert c.sync("koeln")["koeln"].rows_applied == 1
        c.sync("hq")  # the station's bare ack arrives; the outbox drains
        with c.engines["hq"].connect() as conn:
            assert conn.execute(select(func.count()).select_from(outbox)).scalar() == 0
    finally:
        c.close()


def test_a_gap_is_asked_for(tmp_path: Path) -> None:
    c, office = host_and_koeln(tmp_path, resend_after=10_000)
    try:
        c.sync("hq", "koeln", "hq")
        c.execute("hq", customers.insert(), {"id": 1, "name": "eins"})
        c.sync("hq")
        office.boxes["koeln@example.test"].clear()  # #2 is lost
        c.execute("hq", customers.insert(), {"id": 2, "name": "zwei"})
        c.sync("hq")  # #3 arrives, #2 does not
        assert c.sync("koeln")["koeln"].applied == []  # #3 waits in the buffer
        (link,) = c.nodes["koeln"].status().links
        assert link.buffered == 1 and link.missing == (2,)
        c.sync("hq")  # reads koeln's resend request and sends #2 again
        report = c.sync("koeln")["koeln"]
        assert [a.seq for a in report.applied] == [2, 3]
        assert c.agree("customers")
    finally:
        c.close()


def test_a_row_that_cannot_be_applied_is_parked_not_stalling(tmp_path: Path, db_url: str) -> None:
    from mailsync import admin_queues
    from mailsync.apply import list_parked

    c = Cluster(tmp_path, db_url, ("koeln",))
    try:
        with c.engines["hq"].begin() as conn:  # only the host has this constraint
            conn.exec_driver_sql("CREATE UNIQUE INDEX one_per_city ON customers (city)")
        c.host.add_rule("customers", down="IUD", up="IUD")
        c.sync("hq", "koeln", "hq")
        c.execute(
            "koeln",
            customers.insert(),
            [
                {"id": 1, "name": "a", "city": "Köln"},
                {"id": 2, "name": "b", "city": "Köln"},  # violates the host's index
                {"id": 3, "name": "c", "city": "Bonn"},
            ],
        )
        c.sync("koeln")
        report = c.sync("hq")["hq"]
        assert not report.errors and report.rows_parked == 1
        assert sorted(r[0] for r in c.rows("hq", customers)) == [1, 3]  # the rest applied
        assert c.host.status().parked == 1
        with c.engines["hq"].connect() as conn:
            (row,) = list_parked(conn)
        assert row.peer == "koeln" and row.table == "customers" and row.values["id"] == 2
        assert "one_per_city" in row.error or "UNIQUE" in row.error.upper()
        # the link goes on: later changes apply
        c.execute("koeln", customers.insert(), {"id": 4, "name": "d", "city": "Aachen"})
        c.sync("koeln", "hq")
        assert 4 in [r[0] for r in c.rows("hq", customers)]
        assert admin_queues.retry_parked(c.host, None) == (0, 1)  # cause not fixed yet
        with c.engines["hq"].begin() as conn:
            conn.exec_driver_sql("DROP INDEX one_per_city")
        assert admin_queues.retry_parked(c.host, [row.id]) == (1, 0)
        assert 2 in [r[0] for r in c.rows("hq", customers)]
        assert c.host.status().parked == 0
        c.sync("hq", "koeln")
        assert c.agree("customers")
        assert admin_queues.drop_parked(c.host, None) == 0
    finally:
        c.close()


def test_a_large_changeset_travels_in_parts_and_a_lost_part_is_asked_for(
    tmp_path: Path,
) -> None:
    from mailsync.store.tables import changes

    c, office = host_and_koeln(tmp_path, resend_after=10_000)
    try:
        c.set_mailbox(
            "hq",
            {
                "address": "hq@example.test",
                "send": "memory:",
                "receive": "memory:",
                "max_message_bytes": 20_000,
            },
        )
        c.sync("hq", "koeln", "hq")
        rng = random.Random(5)
        rows = [
            {"id": i, "name": "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(60))}
            for i in range(1, 2001)
        ]
        c.execute("hq", customers.insert(), rows)
        (built,) = c.sync("hq")["hq"].built
        assert built.parts >= 4 and built.rows == 2000
        box = office.boxes["koeln@example.test"]
        assert len(box) == built.parts
        assert all(len(raw) <= 20_000 for raw in box.values())
        with c.engines["hq"].connect() as conn:  # kept until koeln acknowledges
            assert conn.execute(select(func.count()).select_from(changes)).scalar() == 2000
        lost = next(
            k for k, raw in box.items() if f"X-Mailsync-Part: 2/{built.parts}".encode() in raw
        )
        del box[lost]
        assert c.sync("koeln")["koeln"].applied == []  # waits for part 2
        (link,) = c.nodes["koeln"].status().links
        assert link.buffered == 1 and link.missing_parts == ((built.seq, 2),)
        report = c.sync("hq")["hq"]  # reads the request: part 2 only goes again
        assert report.sent == 1
        assert c.sync("koeln")["koeln"].rows_applied == 2000
        assert c.agree("customers")
        c.sync("hq")  # the ack: the outbox drains and the change log is purged
        with c.engines["hq"].connect() as conn:
            assert conn.execute(select(func.count()).select_from(outbox)).scalar() == 0
            assert conn.execute(select(func.count()).select_from(changes)).scalar() == 0
    finally:
        c.close()


@pytest.mark.parametrize("station_first", [False, True], ids=["host-first", "station-first"])
def test_a_station_restored_from_an_old_backup_is_brought_up_to_date(
    tmp_path: Path, station_first: bool
) -> None:
    """koeln's disk dies and last week's backup comes back: what it lost (its
    own delivered rows, the host's rows and deletes) returns, what it does
    after the restore reaches the host, and nothing is applied twice."""
    c, _ = host_and_koeln(tmp_path, resend_after=0)
    try:
        c.execute("hq", customers.insert(), [{"id": i, "name": f"hq {i}"} for i in (1, 2, 3)])
        c.execute("koeln", customers.insert(), {"id": 1001, "name": "koeln 1"})
        c.sync("hq", "koeln", "hq", "koeln")
        copy = c.backup("koeln")
        # after the backup: both sides change things, and all of it is delivered
        c.execute("koeln", customers.insert(), {"id": 1002, "name": "koeln 2"})
        c.execute("koeln", update(customers).where(customers.c.id == 1001).values(city="Köln"))
        c.sync("koeln", "hq", "koeln")
        c.execute("koeln", customers.insert(), {"id": 1003, "name": "koeln 3"})
        c.execute("hq", customers.insert(), {"id": 4, "name": "hq 4"})
        c.execute("hq", delete(customers).where(customers.c.id == 2))
        c.execute("hq", update(customers).where(customers.c.id == 3).values(city="Bonn"))
        c.sync("koeln", "hq", "koeln", "hq")
        assert c.agree("customers")
        delivered = c.rows("hq", customers)

        c.restore("koeln", copy)
        assert len(c.rows("koeln", customers)) == 4  # last week's rows
        # work goes on at the station before it hears from the host
        c.execute("koeln", customers.insert(), {"id": 1004, "name": "after the restore"})
        c.execute("koeln", update(customers).where(customers.c.id == 1).values(city="Porz"))
        order = ("koeln", "hq") if station_first else ("hq", "koeln")
        said = set()
        for _ in range(6):
            c.sync(*order)
            said |= {link.restore for n in ("hq", "koeln") for link in c.nodes[n].status().links}
            if settled(c):
                break
        assert settled(c), "no convergence after the restore"
        rows = {r[0]: r for r in c.rows("hq", customers)}
        assert set(rows) == {r[0] for r in delivered} | {1004}  # 2 stays deleted
        assert rows[1001] == next(r for r in delivered if r[0] == 1001)  # city Köln kept
        assert rows[1][2] == "Porz"  # the station's own change after the restore
        assert c.rows("koeln", customers) == c.rows("hq", customers)
        with c.engines["koeln"].connect() as conn:
            events = set(conn.execute(select(log_table.c.event)).scalars())
            (link,) = conn.execute(select(links)).all()
        assert {"went-back", "reloaded"} <= events
        assert not link.reload_wanted
        assert any(s and "waiting for the reload asked of hq" in s for s in said)
        assert c.nodes["koeln"].status().links[0].restore is None
        # the request, sent again and slow in the mail, arrives once more
        # after its reload was acknowledged: no second reload
        hq = c.nodes["hq"]
        with c.engines["hq"].begin() as conn:
            served = conn.execute(select(links).where(links.c.peer == "koeln")).one()
            assert served.reload_request and served.reload_seq <= served.acked_seq
            request = ReloadRequest.parse({"in_seq": 1, "id": served.reload_request})
            controls._reload_requested(hq.cycle, conn, Link.from_row(served), request)
            again = conn.execute(select(links.c.reload_wanted).where(links.c.peer == "koeln"))
            assert again.scalar() is False
            with pytest.raises(MessageError, match="malformed 'reload' control: in_seq"):
                ReloadRequest.parse({"in_seq": "x"})
        # the same backup once more (older than the first reload): noticed
        # as soon as the host sends anything
        c.restore("koeln", copy)
        c.execute("hq", customers.insert(), {"id": 5, "name": "hq 5"})
        for _ in range(6):
            c.sync(*order)
            if settled(c):
                break
        assert settled(c) and c.rows("koeln", customers) == c.rows("hq", customers)
        assert {r[0] for r in c.rows("hq", customers)} == set(rows) | {5}
    finally:
        c.close()


def test_a_reload_replaces_the_copy_but_keeps_undelivered_changes(db_url: str) -> None:
    """The reload bookkeeping on its own, on SQLite and PostgreSQL (temporary
    tables of loaded keys): rows the load does not bring go, rows with an
    undelivered local change stay and are not overwritten."""
    from mailsync.apply import _mirrored
    from mailsync.reload import Reload
    from mailsync.rules import Rule
    from mailsync.store.engine import open_engine
    from mailsync.store.migrations import ensure_schema
    from mailsync.store.tables import changes
    from mailsync.wire.changeset import TableDef
    from tests.cluster import schema

    engine = open_engine(db_url)
    try:
        ensure_schema(engine)
        schema.create_all(engine)
        with engine.begin() as conn:
            conn.execute(customers.insert(), [{"id": i, "name": f"old {i}"} for i in range(1, 6)])
            conn.execute(links.insert().values(peer="hq", address="hq@x.test", change_cursor=0))
            conn.execute(changes.insert().values(tbl="customers", pk="[5]", op="U"))
        tdef = TableDef(0, "customers", (("id", "INTEGER"), ("name", "VARCHAR")), ("id",))
        with engine.begin() as conn:
            reload = Reload(conn, "hq", ["customers"], 2)
            rows = reload.loaded(tdef, [(1, "new 1"), (2, "new 2"), (5, "host 5"), (6, "new 6")])
            assert [r[0] for r in rows] == [1, 2, 6]  # 5 has a change of ours on its way
            for row in rows:
                conn.execute(delete(customers).where(customers.c.id == row[0]))
                conn.execute(customers.insert().values(id=row[0], name=row[1]))
            assert list(reload.doomed(lambda name: False)) == []  # deletes do not go down
            doomed = []
            for table, _pk, keys in reload.doomed(lambda name: name == "customers"):
                conn.execute(delete(table).where(table.c.id.in_([k[0] for k in keys])))
                reload.settled(table, keys)
                doomed += keys
            reload.close()
            assert sorted(doomed) == [(3,), (4,)]
            left = conn.execute(select(customers.c.id, customers.c.name).order_by("id")).all()
        assert [tuple(r) for r in left] == [(1, "new 1"), (2, "new 2"), (5, "old 5"), (6, "new 6")]
        # which tables mirror the host: deletes go down (a row filter bounds
        # the station's scope both ways, issue 18: what its load lacks leaves)
        mirrored = _mirrored(
            {
                "a": Rule("a", "*", "IUD", ""),
                "b": Rule("b", "*", "IU", "IUD"),
                "c": Rule("c", "*", "IUD", "", row_filter="region = 'west'"),
            }
        )
        assert [mirrored(t) for t in ("a", "b", "c", "d")] == [True, False, True, False]
    finally:
        with engine.begin() as conn:
            schema.drop_all(conn)
        engine.dispose()
