"""Number ranges: leases travel, numbers are drawn, never twice, never dry.

The host (SQLite or PostgreSQL) leases blocks to SQLite stations over a
memory post office; the property test adds loss, duplicates, delays and
restarts.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError

from mailsync.errors import ConfigError, RangeError
from mailsync.ranges import admin, exchange, model
from mailsync.ranges.draw import next_number
from mailsync.store.tables import leases, log_table, range_free
from mailsync.wire.controls import LeaseState, RangeReport
from tests.cluster import Cluster, chaos_cluster, orders

SOAK = int(os.environ.get("MAILSYNC_SOAK", "0"))


def cluster(tmp_path: Path, host_url: str, stations: tuple[str, ...] = ("koeln",)) -> Cluster:
    c = Cluster(
        tmp_path,
        host_url,
        stations,
        node_settings={"resend_after_minutes": 0, "gap_request_minutes": 0},
    )
    c.host.add_rule("orders", down="IUD", up="IUD")
    return c


def add(c: Cluster, **kw: object) -> model.RangeDef:
    args: dict[str, object] = {"first": 1000, "last": 9999, "block": 10, **kw}
    with c.engines["hq"].begin() as conn:
        return admin.add_range(conn, model.RangeSpec("order_no", **args))  # type: ignore[arg-type]


def draw(engine: Engine, n: int = 1) -> list[int]:
    return [next_number(engine, "order_no") for _ in range(n)]


def my_leases(engine: Engine) -> list[model.Lease]:
    with engine.connect() as conn:
        return model.list_leases(conn, "order_no")


def test_range_definitions_are_checked(tmp_path: Path, db_url: str) -> None:
    c = cluster(tmp_path, db_url)
    try:
        bad = [
            ({"first": 10, "last": 5}, "make no range"),
            ({"block": 0}, "--block"),
            ({"threshold": 0.0}, "--threshold"),
            ({"bind": "orders"}, "TABLE.COLUMN"),
            ({"bind": "orders.nope"}, "no column"),
        ]
        with c.engines["hq"].begin() as conn:
            conn.exec_driver_sql(
                "CREATE TABLE tickets (id INTEGER PRIMARY KEY, seq INTEGER DEFAULT 0)"
            )
        bad.append(({"bind": "tickets.seq"}, "filled by the database"))
        if db_url.startswith("sqlite"):
            bad.append(({"bind": "orders.id"}, "INTEGER PRIMARY KEY"))
        for kw, words in bad:
            with pytest.raises(ConfigError, match=words):
                add(c, **kw)
        with pytest.raises(ConfigError, match="a-z"), c.engines["hq"].begin() as conn:
            admin.add_range(conn, model.RangeSpec("Order No", 1, 10, 5))
        with pytest.raises(ConfigError, match="on the host"), c.engines["koeln"].begin() as conn:
            admin.add_range(conn, model.RangeSpec("order_no", 1, 10, 5))
        for step in (
            lambda conn: admin.set_block(conn, "order_no", 5),
            lambda conn: admin.release(conn, "order_no"),
            lambda conn: admin.remove_range(conn, "order_no"),
        ):
            with (
                pytest.raises(ConfigError, match="on the host"),
                c.engines["koeln"].begin() as conn,
            ):
                step(conn)
        rdef = add(c, bind="orders.order_no", threshold=0.3)
        assert rdef.bind == ("orders", "order_no") and rdef.next_free == 1000
        with pytest.raises(ConfigError, match="exists already"):
            add(c)
        with pytest.raises(RangeError, match="no number range 'nope'"):
            next_number(c.engines["hq"], "nope")
    finally:
        c.close()


def test_the_first_block_travels_with_the_load_and_the_next_comes_in_time(
    tmp_path: Path, db_url: str
) -> None:
    c = cluster(tmp_path, db_url)
    try:
        add(c, threshold=0.5)
        c.sync("hq", "koeln")
        (lease,) = [x for x in my_leases(c.engines["koeln"])]
        assert (lease.first, lease.last, lease.holder) == (1000, 1009, "koeln")
        with c.engines["koeln"].connect() as conn:
            (use,) = admin.usage(conn)
        assert use.left == 10 and not use.next_held
        got = draw(c.engines["koeln"], 6)  # 4 left: under half the block
        assert got == list(range(1000, 1006))
        c.sync("koeln", "hq", "koeln")  # asks; the host grants; it arrives
        with c.engines["koeln"].connect() as conn:
            (use,) = admin.usage(conn)
        assert use.next_held and use.left == 14
        got += draw(c.engines["koeln"], 14)
        assert got == list(range(1000, 1010)) + list(range(1010, 1020))
        # the host draws outside every station's lease
        host = draw(c.engines["hq"], 3)
        assert not set(host) & set(got) and all(1000 <= n <= 9999 for n in host)
        c.sync("koeln", "hq")
        with c.engines["hq"].connect() as conn:
            held = {(x.holder, x.first): x for x in model.list_leases(conn, "order_no")}
        assert held[("koeln", 1000)].used == 10  # the station's report reached the host
    finally:
        c.close()


def test_a_bound_column_is_filled_and_guarded_by_the_database(tmp_path: Path, db_url: str) -> None:
    c = cluster(tmp_path, db_url)
    try:
        add(c, bind="orders.order_no")
        c.sync("hq", "koeln")
        c.execute(
            "koeln", orders.insert(), [{"id": 1, "customer": "a"}, {"id": 2, "customer": None}]
        )
        c.execute("hq", orders.insert(), {"id": 3, "customer": "b"})
        numbers = {r[0]: r[1] for r in c.rows("koeln", orders)}
        assert numbers == {1: "1000", 2: "1001"}
        (host_no,) = [r[1] for r in c.rows("hq", orders)]
        assert int(host_no) >= 1010  # the host's own block, after koeln's
        # a number drawn first (by the API or `mailsync number next`) may be given
        assert draw(c.engines["koeln"]) == [1002]
        c.execute("koeln", orders.insert(), {"id": 10, "order_no": "1002"})
        # one not drawn yet may not, even inside the lease: the trigger would
        # hand it out again; nor one of another node's, nor a non-number
        refused = (("koeln", "1005"), ("koeln", "5000"), ("hq", "1002"), ("hq", "x"))
        for name, number in refused:
            with pytest.raises(IntegrityError, match="was not drawn on this node from number"):
                c.execute(name, orders.insert(), {"id": 11, "order_no": number})
        c.execute("koeln", orders.insert(), {"id": 12, "customer": "c"})
        assert {r[0]: r[1] for r in c.rows("koeln", orders)}[12] == "1003"
        # rows applied from a peer carry the peer's numbers: not refused
        c.sync("koeln", "hq", "koeln")
        assert c.rows("hq", orders) == c.rows("koeln", orders)
        assert len(c.rows("hq", orders)) == 5
    finally:
        c.close()


def test_a_station_with_no_numbers_left_is_told_why(tmp_path: Path) -> None:
    c = cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}")
    try:
        with pytest.raises(RangeError, match="no number range"):
            draw(c.engines["koeln"])
        add(c, block=3, threshold=0.1, bind="orders.order_no")
        c.sync("hq", "koeln")
        assert draw(c.engines["koeln"], 3) == [1000, 1001, 1002]
        with pytest.raises(RangeError, match=r"no numbers left on koeln .*last heard from hq") as e:
            draw(c.engines["koeln"])
        assert e.value.hint and "mailsync sync" in e.value.hint
        with pytest.raises(IntegrityError, match="no numbers left on this node"):
            c.execute("koeln", orders.insert(), {"id": 1})
        c.sync("koeln", "hq", "koeln")
        assert draw(c.engines["koeln"]) == [1003]
    finally:
        c.close()


def test_a_station_cannot_hoard_blocks(tmp_path: Path) -> None:
    c = cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}")
    try:
        add(c, max_blocks=2)
        c.sync("hq", "koeln")
        with c.engines["hq"].begin() as conn:
            for _ in range(5):  # a station that asks and asks
                exchange.host_incoming(conn, "koeln", RangeReport(want=("order_no",)))
            held = [x for x in model.list_leases(conn, "order_no") if x.holder == "koeln"]
        assert len(held) == 2
    finally:
        c.close()


def test_given_back_numbers_are_leased_again_only_after_the_station_confirms(
    tmp_path: Path,
) -> None:
    c = cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}", ("koeln", "berlin"))
    try:
        add(c)
        c.sync("hq", "koeln")  # a block each, in peer order: berlin's waits for it
        (first,) = draw(c.engines["koeln"], 1)
        draw(c.engines["koeln"], 1)
        with c.engines["hq"].begin() as conn:
            with pytest.raises(RangeError, match="still live at berlin, koeln"):
                admin.remove_range(conn, "order_no")
            assert admin.release(conn, "order_no", "koeln") == 1
        c.sync("hq")
        with c.engines["hq"].connect() as conn:  # not confirmed yet: nothing is free
            assert conn.execute(select(range_free)).all() == []
        assert draw(c.engines["hq"]) == [1020]  # so the host's block is a new one
        c.sync("koeln", "hq", "koeln")
        # koeln stopped at 1002 and, holding nothing, asked again: the numbers
        # it gave back are the next block leased
        active = [x for x in my_leases(c.engines["koeln"]) if x.state == "active"]
        assert [(x.first, x.last) for x in active] == [(first + 2, first + 9)]
        assert draw(c.engines["koeln"]) == [first + 2]
        with c.engines["hq"].begin() as conn:  # every station: the range closes
            assert admin.release(conn, "order_no") == 2
        c.sync("hq", "koeln", "berlin", "hq")
        with c.engines["hq"].begin() as conn:
            admin.remove_range(conn, "order_no")  # no live lease left
            assert model.list_ranges(conn) == []
    finally:
        c.close()


def test_five_days_offline_with_the_next_block_held_never_run_dry(tmp_path: Path) -> None:
    """40 invoices a day, a block of 200 for this station: once it holds its
    next block, a working week offline is covered."""
    c = cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}")
    try:
        add(c, block=50, threshold=0.5)
        with c.engines["hq"].begin() as conn:
            admin.set_block(conn, "order_no", 200, station="koeln")
        c.sync("hq", "koeln")
        drawn = draw(c.engines["koeln"], 120)  # three days online, syncing each evening
        c.sync("koeln", "hq", "koeln")
        with c.engines["koeln"].connect() as conn:
            (use,) = admin.usage(conn)
        assert use.next_held
        for _day in range(5):  # offline: no sync
            drawn += draw(c.engines["koeln"], 40)
        assert len(set(drawn)) == len(drawn) == 320
    finally:
        c.close()


@pytest.mark.parametrize("seed", list(range(1, 1 + max(SOAK, 2))))
def test_no_number_is_ever_issued_twice(tmp_path: Path, seed: int) -> None:
    """Host and three stations draw in random order while mail is lost,
    duplicated and delayed and nodes restart; no number is issued twice and
    each lies in a lease its node held."""
    c, office = chaos_cluster(tmp_path, seed)
    try:
        c.host.add_rule("orders", down="IUD", up="IUD")
        add(c, first=1, last=100_000, block=7, threshold=0.6)
        rng = random.Random(seed)
        issued: dict[int, str] = {}
        for _step in range(60 if SOAK else 25):
            for name in rng.sample(c.names, len(c.names)):
                for _ in range(rng.randrange(4)):
                    try:
                        number = next_number(c.engines[name], "order_no")
                    except RangeError:
                        continue  # ran dry offline: an error, never a duplicate
                    assert number not in issued, f"{number} issued twice"
                    issued[number] = name
                if rng.random() < 0.1:
                    c.restart(name)
                c.nodes[name].sync()
        office.calm()
        for _ in range(4):
            c.sync(*c.names)
        with c.engines["hq"].connect() as conn:
            held = model.list_leases(conn, "order_no")
        for number, name in issued.items():
            assert any(x.holder == name and x.first <= number <= x.last for x in held), (
                f"{number} of {name} outside its leases"
            )
        assert len(issued) > 100
        with c.engines["koeln"].connect() as conn:
            assert conn.execute(select(leases.c.id)).all()
    finally:
        c.close()


def test_a_range_limited_to_some_stations_leases_only_to_them(tmp_path: Path) -> None:
    c = cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}", ("koeln", "berlin"))
    try:
        add(c, stations=("koeln",))
        c.sync("hq", "koeln", "berlin")
        assert [x.holder for x in my_leases(c.engines["hq"])] == ["koeln"]
        with pytest.raises(RangeError, match="no number range"):
            draw(c.engines["berlin"])
    finally:
        c.close()


def test_a_station_back_on_an_old_backup_retires_its_leases(tmp_path: Path) -> None:
    """Numbers koeln issued after its backup (on orders the host has) are
    never issued again once the restore is noticed."""
    c = cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}")
    try:
        add(c, block=10, bind="orders.order_no")
        c.sync("hq", "koeln")
        c.execute("koeln", orders.insert(), {"id": 1, "customer": "before"})
        c.sync("koeln", "hq", "koeln")
        copy = c.backup("koeln")
        c.execute("koeln", orders.insert(), [{"id": i, "customer": "after"} for i in (2, 3, 4)])
        c.sync("koeln", "hq", "koeln")
        issued = {r[1] for r in c.rows("hq", orders)}
        assert issued == {"1000", "1001", "1002", "1003"}
        c.restore("koeln", copy)
        c.execute("hq", orders.insert(), {"id": 50, "customer": "from the host"})
        for _ in range(4):  # its witness tells koeln it went back, before any mail
            c.sync("hq", "koeln")
        assert all(x.left == 0 or x.next > 1009 for x in my_leases(c.engines["koeln"]))
        c.execute("koeln", orders.insert(), {"id": 5, "customer": "after the restore"})
        c.sync("koeln", "hq", "koeln")
        numbers = [r[1] for r in c.rows("hq", orders)]
        assert len(numbers) == len(set(numbers)) == 6
        assert c.rows("koeln", orders) == c.rows("hq", orders)
    finally:
        c.close()


def test_a_malformed_range_report_is_set_aside_not_crashed_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A station's report the host cannot read (another version, a bug) is
    set aside with a message naming it; the host's cycle goes on."""
    c = cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}")
    try:
        add(c)
        c.sync("hq", "koeln")
        real = exchange.station_outgoing

        def garbled(
            conn: object, ask_again: object, ranges: object = None
        ) -> tuple[RangeReport, bool]:
            report, _ = real(conn, ask_again, ranges)  # type: ignore[arg-type]
            assert report is not None
            bad = LeaseState(1, "many", "active")  # type: ignore[arg-type]
            return RangeReport((bad,), report.want), True

        monkeypatch.setattr(exchange, "station_outgoing", garbled)
        c.sync("koeln")
        report = c.sync("hq")["hq"]
        assert report.set_aside == 1 and not report.errors
        with c.engines["hq"].connect() as conn:
            said = " ".join(conn.execute(select(log_table.c.message)).scalars())
        assert "malformed 'ranges' control: next is not an integer" in said
    finally:
        c.close()
