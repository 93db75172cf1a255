"""A node restored from a backup never issues a number twice, and heals.

Issue 16: a station's database put back to last night's backup is caught by
its restore witness at the first mailsync action — with an idle link, or
offline — and a host put back to a backup is noticed by its stations,
which send again what it lost and report their leases before it grants
again. Every scenario ends with the nodes equal row for row, every number
unique and nothing parked; the host runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from mailsync.errors import ConfigError
from mailsync.node import Node
from mailsync.ranges import admin, model
from mailsync.ranges.draw import next_number
from mailsync.store.engine import open_engine
from mailsync.store.tables import inbox, leases, log_table, outbox, parked
from mailsync.store.witness import witness_path
from tests.cluster import Cluster, customers, orders


def cluster(
    tmp_path: Path,
    host_url: str,
    stations: tuple[str, ...] = ("koeln",),
    fmt: str | None = None,
) -> Cluster:
    c = Cluster(
        tmp_path,
        host_url,
        stations,
        node_settings={"resend_after_minutes": 0, "gap_request_minutes": 0},
    )
    c.host.add_rule("orders", down="IUD", up="IUD")
    c.host.add_rule("customers", down="IUD", up="IUD")
    with c.engines["hq"].begin() as conn:
        spec = model.RangeSpec("order_no", 1000, 99_999, 10, bind="orders.order_no", format=fmt)
        admin.add_range(conn, spec)
    c.sync("hq", *stations, "hq", *stations)
    return c


def add_orders(c: Cluster, node: str, ids: range, who: str = "", *, syncing: bool = True) -> None:
    """Orders numbered by the trigger, five at a time; a station at work
    syncs between (its witness reserves half a spare block ahead)."""
    chunks = [list(ids)[i : i + 5] for i in range(0, len(ids), 5)]
    for n, chunk in enumerate(chunks):
        c.execute(node, orders.insert(), [{"id": i, "customer": who or node} for i in chunk])
        if syncing and n < len(chunks) - 1:
            c.sync(node, "hq", node)


def count(c: Cluster, node: str, table: object) -> int:
    with c.engines[node].connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar() or 0)  # type: ignore[arg-type]


def settle(c: Cluster, rounds: int = 8) -> None:
    """Sync until nothing waits anywhere and every node holds the same rows."""
    for _ in range(rounds):
        c.converge()
        if all(count(c, n, outbox) == 0 and count(c, n, inbox) == 0 for n in c.names) and c.agree(
            "orders", "customers"
        ):
            return
    raise AssertionError("no convergence")


def assert_whole(c: Cluster) -> None:
    """Every node equal row for row, every number unique, nothing parked."""
    for table in (orders, customers):
        reference = c.rows("hq", table)
        for name in c.names:
            assert c.rows(name, table) == reference, (name, table.name)
    numbers = [r[1] for r in c.rows("hq", orders)]
    assert None not in numbers and len(numbers) == len(set(numbers))
    for name in c.names:
        assert count(c, name, parked) == 0, name


def events(c: Cluster, node: str) -> list[str]:
    with c.engines[node].connect() as conn:
        return [
            f"{e}: {m}" for e, m in conn.execute(select(log_table.c.event, log_table.c.message))
        ]


#: formatted numbers (issue 16, item 4) carry the same guarantee
FORMATS = pytest.mark.parametrize("fmt", [None, "R-{year}-{n:06}"], ids=["plain", "formatted"])


@FORMATS
def test_a_station_restored_with_an_idle_link_never_issues_a_number_again(
    tmp_path: Path, db_url: str, fmt: str | None
) -> None:
    """The issue's story: koeln's backup is from before it drew 10 numbers
    and synced them; restored, it syncs, the host syncs (with nothing to
    send), koeln syncs — and its next 10 inserts get new numbers."""
    c = cluster(tmp_path, db_url, fmt=fmt)
    try:
        add_orders(c, "koeln", range(1, 3))
        settle(c)
        copy = c.backup("koeln")
        add_orders(c, "koeln", range(3, 13))
        settle(c)
        issued = {r[1] for r in c.rows("hq", orders)}
        c.restore("koeln", copy)  # opening it is the first mailsync action
        c.sync("koeln", "hq", "koeln")  # an idle link: no message waits for koeln
        add_orders(c, "koeln", range(13, 23), "after the restore")
        fresh = {r[1] for r in c.rows("koeln", orders) if r[0] >= 13}
        assert len(fresh) == 10 and not fresh & issued
        settle(c)
        assert_whole(c)
        assert {r[0] for r in c.rows("koeln", orders)} == set(range(1, 23))
        said = events(c, "koeln")
        assert any("behind its restore witness" in s and "restored" in s for s in said)
        assert any(s.startswith("range: ") and "moved past" in s for s in said)
        assert any("a reload is asked of hq" in s for s in said)
        status = c.nodes["koeln"].status()
        assert status.restored is not None and "restored from a backup" in status.restored
        assert status.restored.endswith("done")
    finally:
        c.close()


def test_a_station_restored_while_offline_draws_new_numbers_at_once(
    tmp_path: Path, db_url: str
) -> None:
    """No mailbox, no sync: the numbers drawn right after the restore — by
    `next_number` and by the bound column's trigger — are still new."""
    c = cluster(tmp_path, db_url)
    try:
        add_orders(c, "koeln", range(1, 4))
        settle(c)
        copy = c.backup("koeln")
        drawn = [next_number(c.engines["koeln"], "order_no") for _ in range(2)]
        add_orders(c, "koeln", range(4, 8))  # 1003.. by trigger, after the backup
        settle(c)
        issued = {int(r[1]) for r in c.rows("hq", orders)} | set(drawn)
        c.restore("koeln", copy)
        after = [c.nodes["koeln"].next_number("order_no") for _ in range(2)]
        add_orders(c, "koeln", range(8, 11), "offline")
        after += [int(r[1]) for r in c.rows("koeln", orders) if r[0] >= 8]
        assert len(set(after)) == 5 and not set(after) & issued, (after, issued)
        settle(c)
        assert_whole(c)
    finally:
        c.close()


def test_a_witness_one_write_ahead_skips_numbers_but_asks_no_reload(tmp_path: Path) -> None:
    """The last witness write reached the disk and its transaction did not
    commit (a crash, a rollback): numbers are skipped, the links are left
    alone."""
    c = cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}")
    try:
        add_orders(c, "koeln", range(1, 3))
        settle(c)
        with c.engines["koeln"].begin() as conn:
            conn.exec_driver_sql(
                "UPDATE mailsync_meta SET value = CAST(value AS INTEGER) - 1 "
                "WHERE key = 'witness_generation'"
            )
        c.restart("koeln")
        said = events(c, "koeln")
        assert any("interrupted" in s for s in said)
        assert not any("reload" in s for s in said)
        c.sync("koeln", "hq", "koeln")  # the skipped block's successor
        add_orders(c, "koeln", range(3, 5))
        settle(c)
        assert_whole(c)
    finally:
        c.close()


# ------------------------------------------------------- the witness itself


def test_a_witness_that_is_not_the_owners_or_not_this_nodes_is_refused(tmp_path: Path) -> None:
    c = cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}")
    config = tmp_path / "koeln" / "mailsync.toml"
    path = witness_path(config)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        c.nodes["koeln"].close()
        good = path.read_bytes()
        path.chmod(0o644)
        with pytest.raises(ConfigError, match="can be read by others"):
            Node.open(config, memory=c.office)
        path.chmod(0o600)
        path.write_bytes(witness_path(tmp_path / "hq" / "mailsync.toml").read_bytes())
        with pytest.raises(ConfigError, match="belongs to node 'hq'"):
            Node.open(config, memory=c.office)
        path.write_bytes(good.replace(b'"database":"', b'"database":"x'))
        with pytest.raises(ConfigError, match="another database"):
            Node.open(config, memory=c.office)
        path.unlink()
        path.symlink_to(tmp_path / "elsewhere")
        with pytest.raises(ConfigError, match="symbolic link"):
            Node.open(config, memory=c.office)
        path.unlink()
        path.write_bytes(good)  # the umask's mode: 0644
        refused = c.cli("koeln", "status")
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        assert "can be read by others" in refused.stderr and "hint: chmod 600" in refused.stderr
        path.chmod(0o600)
        if os.geteuid() == 0:
            os.chown(path, 1, 1)
            with pytest.raises(ConfigError, match="owned by uid 1"):
                Node.open(config, memory=c.office)
            os.chown(path, 0, 0)
        result = c.cli("koeln", "status")
        assert result.returncode == 0, result.stderr
    finally:
        c.close()


@pytest.mark.parametrize("harm", ["deleted", "damaged"])
def test_a_lost_or_damaged_witness_ends_every_lease(tmp_path: Path, harm: str) -> None:
    """Whether the database went back cannot be told: no lease is drawn from
    again, new blocks come with the next sync, and nothing repeats."""
    c = cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}")
    path = witness_path(tmp_path / "koeln" / "mailsync.toml")
    try:
        add_orders(c, "koeln", range(1, 4))
        settle(c)
        c.nodes["koeln"].close()
        if harm == "deleted":
            path.unlink()
        else:
            path.write_text("{ not json")
        c.restart("koeln")
        assert (path.with_name(path.name + ".damaged").exists()) == (harm == "damaged")
        with c.engines["koeln"].connect() as conn:
            states = {x.state for x in model.list_leases(conn)}
        assert states == {"retired"}
        c.sync("koeln", "hq", "koeln")
        add_orders(c, "koeln", range(4, 7))
        settle(c)
        assert_whole(c)
        assert any(
            f"witness {path} is {'missing' if harm == 'deleted' else 'damaged'}" in s
            for s in events(c, "koeln")
        )
    finally:
        c.close()


def test_a_database_restored_with_its_witness_is_caught_by_the_host(tmp_path: Path) -> None:
    """Both put back from one backup: nothing local can tell. The host's
    next message does (the pre-witness safety net), and leases retire."""
    c = cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}")
    path = witness_path(tmp_path / "koeln" / "mailsync.toml")
    try:
        add_orders(c, "koeln", range(1, 3))
        settle(c)
        copy, saved = c.backup("koeln"), path.read_bytes()
        add_orders(c, "koeln", range(3, 6))
        settle(c)
        c.nodes["koeln"].close()
        path.write_bytes(saved)
        c.restore("koeln", copy)
        c.execute("hq", customers.insert(), {"id": 1, "name": "from the host"})
        c.sync("hq", "koeln")  # the host's message: koeln's leases retire
        assert any("number lease(s) retired" in s for s in events(c, "koeln"))
        c.sync("koeln", "hq", "koeln")  # new blocks
        issued = {r[1] for r in c.rows("hq", orders)}
        add_orders(c, "koeln", range(6, 8))
        assert not {r[1] for r in c.rows("koeln", orders) if r[0] >= 6} & issued
        settle(c)
        assert_whole(c)
    finally:
        c.close()


# ----------------------------------------------------------- a host restored


def _copy_sqlite(source: Path, target: Path) -> None:
    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)
    src.close()
    dst.close()


def host_backup(c: Cluster, request: pytest.FixtureRequest, backend: str) -> Callable[[], None]:
    """Back the host's database up now; the function returned restores it."""
    config = c.root / "hq" / "mailsync.toml"
    url = str(c.engines["hq"].url.render_as_string(hide_password=False))
    name = make_url(url).database
    assert name is not None

    def reopen() -> None:
        c.engines["hq"] = open_engine(url)
        c.nodes["hq"] = Node.open(config, memory=c.office)

    if backend == "sqlite":
        copy = c.root / "hq.backup.db"
        _copy_sqlite(Path(name), copy)

        def restore_sqlite() -> None:
            c.nodes["hq"].close()
            c.engines["hq"].dispose()
            _copy_sqlite(copy, Path(name))
            reopen()

        return restore_sqlite
    server = request.getfixturevalue("pg_server")
    c.nodes["hq"].close()
    c.engines["hq"].dispose()
    server.create_database(f"{name}_bk", template=name)
    reopen()

    def restore_pg() -> None:
        c.nodes["hq"].close()
        c.engines["hq"].dispose()
        server.drop_database(name)
        server.create_database(name, template=f"{name}_bk")
        reopen()

    return restore_pg


@FORMATS
def test_a_host_restored_from_a_backup_learns_from_its_stations(
    tmp_path: Path, db_url: str, backend: str, request: pytest.FixtureRequest, fmt: str | None
) -> None:
    """The host goes back to last night's backup while koeln and berlin hold
    leases it granted since and rows it no longer has (delivered, and not
    yet sent). No station is enrolled again; no block is leased twice."""
    c = cluster(tmp_path, db_url, ("koeln", "berlin"), fmt=fmt)
    try:
        add_orders(c, "koeln", range(1, 4))
        add_orders(c, "berlin", range(101, 104))
        settle(c)
        restore_host = host_backup(c, request, backend)
        # after the backup: new blocks granted, rows delivered both ways
        add_orders(c, "koeln", range(4, 16))
        add_orders(c, "berlin", range(104, 116))
        c.execute("hq", customers.insert(), {"id": 1, "name": "the host's, after the backup"})
        settle(c)
        with c.engines["hq"].connect() as conn:
            granted = {(x.holder, x.first) for x in model.list_leases(conn) if x.holder != "hq"}
        # and rows not yet sent when the host's disk dies
        add_orders(c, "koeln", range(16, 19))
        add_orders(c, "berlin", range(116, 119))
        restore_host()
        said = events(c, "hq")
        assert any("behind its restore witness" in s for s in said)
        for _ in range(3):
            c.sync("koeln", "berlin", "hq")
        with c.engines["hq"].connect() as conn:
            known = {(x.holder, x.first) for x in model.list_leases(conn) if x.holder != "hq"}
        assert granted <= known, (granted, known)  # learnt again from the stations' reports
        # everyone draws on: blocks granted after the restore are new ones
        add_orders(c, "koeln", range(19, 40))
        add_orders(c, "berlin", range(119, 140))
        c.execute("hq", orders.insert(), [{"id": 900 + i, "customer": "hq"} for i in range(5)])
        settle(c)
        assert_whole(c)
        assert len(c.rows("hq", orders)) == 39 + 39 + 5
        assert c.rows("hq", customers)[0][1] == "the host's, after the backup"
        with c.engines["hq"].connect() as conn:
            spans = sorted((x.first, x.last) for x in model.list_leases(conn, "order_no"))
            placeholder = conn.execute(select(leases).where(leases.c.range_name == "")).all()
        assert all(a[1] < b[0] for a, b in itertools.pairwise(spans)), spans
        assert len(placeholder) <= 1
        for name in ("koeln", "berlin"):
            assert any("went back to a backup" in s for s in events(c, name))
            status = c.nodes[name].status()
            assert all(link.restore is None for link in status.links)
    finally:
        c.close()


def test_a_host_restored_with_its_witness_is_noticed_by_a_station(tmp_path: Path) -> None:
    """No witness ahead of the host's database: the first station message
    that says the host applied more than it holds sets it going."""
    c = cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}")
    path = witness_path(tmp_path / "hq" / "mailsync.toml")
    try:
        add_orders(c, "koeln", range(1, 3))
        settle(c)
        copy, saved = c.backup("hq"), path.read_bytes()
        add_orders(c, "koeln", range(3, 9))
        settle(c)
        c.nodes["hq"].close()
        path.write_bytes(saved)
        c.restore("hq", copy)
        add_orders(c, "koeln", range(9, 11))
        settle(c)
        assert_whole(c)
        assert {r[0] for r in c.rows("hq", orders)} == set(range(1, 11))
    finally:
        c.close()
