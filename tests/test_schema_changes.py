"""The schema travels (issue 19, items 2–5): a host's table changes and the
stations follow, or stop that table alone.

With a PostgreSQL host and SQLite stations, and SQLite at both ends: a
station starting from an empty database converges from its load alone; a
column added on the host with a default reaches every station, with the
host's values, while other changes go on; a dropped column stops that table
alone, says so once naming table and column, holds what changes meanwhile
and delivers it after the admin's resync. Hostile and mistaken input: a
station sending a column the host lacks, forged definitions (a table
outside the rules, mailsync's own, a name that is no identifier, thousands
of columns), a resync of a table that is not synced. Changes a station
makes between ``join`` and its first sync travel with it.
"""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, inspect, select, text, update

from mailsync import admin_queues
from mailsync.definitions import changes, digest
from mailsync.errors import RuleError
from mailsync.provision import provision
from mailsync.store.engine import open_engine
from mailsync.store.tables import conflicts_table, loads, log_table
from tests.cluster import TABLES, Cluster, customers, invoices, schema
from tests.test_sync import cluster, customer  # noqa: F401  (cluster: the fixture)


@pytest.fixture
def site(cluster: Cluster) -> Cluster:  # noqa: F811  (the fixture of test_sync)
    """test_sync's cluster: customers 1–20 and invoices 1–10 on the host."""
    return cluster


def synced(c: Cluster) -> None:
    for table in ("customers", "invoices"):
        c.host.add_rule(table, down="IUD", up="IUD")
    c.sync("hq", "koeln", "berlin")


def ddl(c: Cluster, node: str, sql: str) -> None:
    with c.engines[node].begin() as conn:
        conn.exec_driver_sql(sql)


def drop_column(c: Cluster, node: str, table: str, column: str) -> None:
    """As the README says: the capture's update trigger names every column,
    so it is dropped in the column's transaction and the node's next cycle
    (run at once, before writes resume) puts it back."""
    with c.engines[node].begin() as conn:
        on = f" ON {table}" if conn.dialect.name == "postgresql" else ""
        conn.exec_driver_sql(f'DROP TRIGGER "mailsync_{table}_au"{on}')
        conn.exec_driver_sql(f"ALTER TABLE {table} DROP COLUMN {column}")
    c.sync(node)
    with c.engines[node].connect() as conn:
        found = (
            "SELECT count(*) FROM pg_trigger WHERE tgname = :t"
            if conn.dialect.name == "postgresql"
            else "SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND name = :t"
        )
        assert conn.execute(text(found), {"t": f"mailsync_{table}_au"}).scalar() == 1


def query(c: Cluster, node: str, sql: str) -> list[tuple[Any, ...]]:
    with c.engines[node].connect() as conn:
        return [tuple(r) for r in conn.execute(text(sql))]


def said(c: Cluster, node: str, event: str | None = None) -> list[str]:
    stmt = select(log_table.c.message)
    if event is not None:
        stmt = stmt.where(log_table.c.event == event)
    with c.engines[node].connect() as conn:
        return [m for (m,) in conn.execute(stmt.order_by(log_table.c.id))]


def columns(engine: Engine, table: str) -> list[str]:
    return [col["name"] for col in inspect(engine).get_columns(table)]


def table_state(c: Cluster, node: str, peer: str, table: str) -> str:
    (link,) = [x for x in c.nodes[node].status().links if x.peer == peer]
    return {t.table: t.state for t in link.tables}[table]


def test_a_column_added_with_a_default_reaches_every_station_with_its_values(
    site: Cluster,
) -> None:
    c = site
    synced(c)
    versions = {t.table: t.version for t in c.nodes["koeln"].status().links[0].tables}
    assert set(versions) == {"customers", "invoices"} and all(versions.values())
    ddl(c, "hq", "ALTER TABLE customers ADD COLUMN segment VARCHAR(20) NOT NULL DEFAULT 'retail'")
    # the host's own values, not the default: they must travel
    ddl(c, "hq", "UPDATE customers SET segment = 'key account' WHERE id <= 5")
    # other traffic goes on meanwhile, both ways
    c.execute("hq", invoices.insert(), {"id": 11, "customer_id": 1, "total": Decimal("5")})
    c.execute("koeln", invoices.insert(), {"id": 12, "customer_id": 2, "total": Decimal("7")})
    ddl(c, "hq", "UPDATE customers SET city = 'bonn' WHERE id = 7")
    c.converge()
    c.converge()
    want = query(c, "hq", "SELECT id, segment, city FROM customers ORDER BY id")
    assert want[0] == (1, "key account", "koeln") and want[6][1:] == ("retail", "bonn")
    for station in ("koeln", "berlin"):
        assert "segment" in columns(c.engines[station], "customers")
        assert query(c, station, "SELECT id, segment, city FROM customers ORDER BY id") == want
        assert any("added column(s) segment to table customers" in m for m in said(c, station))
        assert table_state(c, "hq", station, "customers") == "current"
    assert c.agree("invoices") and c.agree("customers")
    assert len(c.rows("berlin", invoices)) == 12
    # the station's own version of the table is the host's new one
    (hq_link,) = c.nodes["koeln"].status().links
    mine = {t.table: t.version for t in hq_link.tables}
    host_side = {t.table: t.version for t in c.host.status().links[0].tables}
    assert mine["customers"] == host_side["customers"] != versions["customers"]
    # and it is sent once: the next cycles are quiet
    c.converge()
    reports = c.sync("hq", "koeln", "berlin")
    assert all(r.sent == 0 for r in reports.values()), reports


def test_a_dropped_column_stops_only_that_table_until_resync(site: Cluster) -> None:
    c = site
    synced(c)
    drop_column(c, "hq", "customers", "photo")
    # changes meanwhile: held for koeln, delivered after the resync
    ddl(c, "hq", "UPDATE customers SET city = 'bonn' WHERE id = 1")
    ddl(c, "hq", "DELETE FROM customers WHERE id = 20")
    c.execute("hq", invoices.insert(), {"id": 11, "customer_id": 1, "total": Decimal("5")})
    c.sync("hq", "koeln")
    c.sync("hq", "koeln")
    stops = said(c, "hq", "schema-stopped")
    assert len([m for m in stops if "koeln" in m]) == 1, stops  # said once
    line = next(m for m in stops if "koeln" in m)
    assert "customers.photo" in line and "dropped" in line and "resync" in line
    assert table_state(c, "hq", "koeln", "customers").startswith("stopped: ")
    shown = json.loads(c.cli("hq", "status", "--json").stdout)["node"]["links"]
    koeln = {t["table"]: t for t in next(x for x in shown if x["peer"] == "koeln")["tables"]}
    assert koeln["customers"]["state"].startswith("stopped: ") and koeln["customers"]["version"]
    assert koeln["invoices"]["state"] == "current"
    assert "stopped: column customers.photo" in c.cli("hq", "status").stdout
    # the other table flows, the stopped one does not
    assert len(c.rows("koeln", invoices)) == 11
    assert query(c, "koeln", "SELECT city FROM customers WHERE id = 1") == [("koeln",)]
    assert query(c, "koeln", "SELECT count(*) FROM customers WHERE id = 20") == [(1,)]
    # the station's changes still go up; its column the host lacks is
    # ignored, and said once
    ddl(c, "koeln", "UPDATE customers SET name = 'Neu' WHERE id = 2")
    c.sync("koeln", "hq")
    ddl(c, "koeln", "UPDATE customers SET name = 'Neuer' WHERE id = 2")
    c.sync("koeln", "hq")
    assert query(c, "hq", "SELECT name FROM customers WHERE id = 2") == [("Neuer",)]
    ignored = [m for m in said(c, "hq", "schema") if "photo" in m and "ignored" in m]
    assert len(ignored) == 1, ignored
    # the admin fixes the station's table, then resyncs
    drop_column(c, "koeln", "customers", "photo")
    assert c.host.resync_table("customers", "koeln") == ["koeln"]
    assert table_state(c, "hq", "koeln", "customers") == "resync queued"
    c.sync("hq", "koeln")
    assert query(c, "koeln", "SELECT city FROM customers WHERE id = 1") == [("bonn",)]
    assert query(c, "koeln", "SELECT count(*) FROM customers WHERE id = 20") == [(0,)]
    assert c.agree("customers", nodes=("hq", "koeln"))
    assert table_state(c, "hq", "koeln", "customers") == "current"


def test_a_resync_of_a_table_that_is_not_synced_is_refused(site: Cluster) -> None:
    c = site
    synced(c)
    with pytest.raises(RuleError, match="not synced"):
        c.host.resync_table("notes")
    with pytest.raises(RuleError, match="no station"):
        c.host.resync_table("customers", "nowhere")
    done = c.cli("hq", "table", "resync", "notes")
    assert done.returncode != 0
    assert "not synced" in done.stderr + done.stdout and "Traceback" not in done.stderr
    done = c.cli("koeln", "table", "resync", "customers")  # a station has no say
    assert done.returncode != 0 and "Traceback" not in done.stderr


def test_a_station_missing_a_hosts_column_parks_only_that_tables_rows(site: Cluster) -> None:
    """Without the host's definition (the station's admin renamed it),
    values are never dropped on the way down: the table's rows wait, the
    rest applies, and a resync brings the table back."""
    c = site
    synced(c)
    ddl(c, "koeln", "ALTER TABLE customers RENAME COLUMN city TO town")
    ddl(c, "hq", "UPDATE customers SET city = 'bonn' WHERE id = 3")
    c.execute("hq", invoices.insert(), {"id": 11, "customer_id": 1, "total": Decimal("5")})
    report = c.sync("hq", "koeln")["koeln"]
    assert not report.errors and len(c.rows("koeln", invoices)) == 11
    parked = admin_queues.parked_rows(c.nodes["koeln"])
    assert [p.table for p in parked] == ["customers"] and "city" in parked[0].error
    ddl(c, "koeln", "ALTER TABLE customers RENAME COLUMN town TO city")
    c.host.resync_table("customers")
    c.sync("hq", "koeln")
    assert query(c, "koeln", "SELECT city FROM customers WHERE id = 3") == [("bonn",)]
    assert admin_queues.parked_rows(c.nodes["koeln"]) == []  # the refresh brought them


def test_a_station_starts_from_an_empty_database(tmp_path: Path, db_url: str) -> None:
    c = Cluster(tmp_path, db_url, ("koeln",))
    try:
        schema.drop_all(c.engines["koeln"])
        c.execute("hq", customers.insert(), [customer(i) for i in range(1, 6)])
        c.execute(
            "hq", invoices.insert(), [{"id": i, "customer_id": i, "total": 1} for i in (1, 2)]
        )
        c.execute("hq", text("INSERT INTO notes VALUES ('ann', 'tax', 'Grüße')"))
        c.execute("hq", text("INSERT INTO orders VALUES (1, 'R-1', 'Ann')"))
        for table in TABLES:
            c.host.add_rule(table, down="IUD", up="IUD")
        c.converge()
        assert set(inspect(c.engines["koeln"]).get_table_names()) >= set(TABLES)
        assert c.agree(*TABLES)
        c.execute("koeln", customers.insert(), customer(50, "Neu"))  # and it works both ways
        c.converge()
        assert c.agree("customers")
    finally:
        c.close()


def test_changes_made_between_join_and_the_first_sync_travel(tmp_path: Path, db_url: str) -> None:
    """The station has its tables and starts work right after ``join``:
    a row of its own goes up with its first sync, once; a row the load also
    brings is a conflict the policy settles (host-wins: the host's row
    stays, the station's is kept in ``mailsync_conflicts``)."""
    c = Cluster(tmp_path, db_url, ("koeln",))
    try:
        c.execute("hq", customers.insert(), [customer(i) for i in range(1, 6)])
        c.execute("koeln", customers.insert(), customer(700, "Offline GmbH"))
        c.execute("koeln", customers.insert(), customer(5, "Koeln's own five"))
        c.sync("koeln")  # no rules yet: nothing goes, nothing is forgotten
        c.host.add_rule("customers", down="IUD", up="IUD")
        c.converge()
        c.converge()
        names = dict(query(c, "hq", "SELECT id, name FROM customers"))
        assert names[700] == "Offline GmbH" and names[5] == "Müller & Söhne"
        assert query(c, "hq", "SELECT count(*) FROM customers") == [(6,)]
        assert c.agree("customers")
        with c.engines["koeln"].connect() as conn:
            kept = conn.execute(select(conflicts_table.c.tbl)).all()
        assert kept and kept[0][0] == "customers"
        # capture was narrowed to the tables the rules name
        with c.engines["koeln"].connect() as conn:
            triggers = [
                n
                for (n,) in conn.exec_driver_sql(
                    "SELECT tbl_name FROM sqlite_master WHERE type = 'trigger'"
                )
            ]
        assert "customers" in triggers and "orders" not in triggers and "notes" not in triggers
    finally:
        c.close()


def test_forged_definitions_are_refused(tmp_path: Path) -> None:
    """A station creates or alters only tables its rules name, under names
    a table may have, and nothing from a definition it cannot check."""
    engine = open_engine(f"sqlite:///{tmp_path / 's.db'}")
    try:

        def table(name: Any, n: int = 2) -> dict[str, Any]:
            cols = [{"name": "id", "type": "Integer", "not_null": True}]
            cols += [{"name": f"c{i}", "type": "Text"} for i in range(1, n)]
            return {"table": name, "columns": cols, "primary_key": ["id"]}

        forged = [
            table("elsewhere"),
            table("mailsync_links"),
            table('x"; DROP TABLE y; --'),
            table("wide", 5000),
            {"table": "t", "columns": "no", "primary_key": ["id"]},
            table("mine"),
        ]
        allowed = {"mailsync_links", 'x"; DROP TABLE y; --', "wide", "t", "mine"}
        with engine.begin() as conn:
            done = provision(conn, forged, allowed=allowed)
        assert done.created == ["mine"]
        assert set(done.refused) == {
            "elsewhere",
            "mailsync_links",
            'x"; DROP TABLE y; --',
            "wide",
            "t",
        }
        assert "no rule" in done.refused["elsewhere"]
        assert "not a name" in done.refused["mailsync_links"]
        assert inspect(engine).get_table_names() == ["mine"]
        # an existing table: the columns that can be added are, the rest is told
        grown = table("mine", 3)
        grown["columns"][2] = {"name": "c2", "type": "Integer", "not_null": True, "default": "0"}
        grown["columns"].append({"name": "c3", "type": "Integer", "not_null": True})
        with engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO mine (id, c1) VALUES (1, 'a')")
            done = provision(conn, [grown], allowed={"mine"})
        assert done.added == {"mine": ["c2"]}
        assert done.differing == {"mine": ["mine.c3 is missing"]}
        assert columns(engine, "mine") == ["id", "c1", "c2"]
    finally:
        engine.dispose()


def test_what_counts_as_breaking() -> None:
    """Each kind of change, in words that name table and column."""
    old = {
        "table": "t",
        "columns": [
            {"name": "id", "type": "Integer", "not_null": True},
            {"name": "name", "type": "String", "length": 40},
            {"name": "price", "type": "Numeric", "precision": 12, "scale": 2},
        ],
        "primary_key": ["id"],
    }

    def changed(**edit: Any) -> tuple[list[str], list[str]]:
        new = json.loads(json.dumps(old))
        for name, column in edit.items():
            new["columns"] = [c for c in new["columns"] if c["name"] != name]
            if column is not None:
                new["columns"].append({"name": name, **column})
        return changes(old, new)

    assert changed() == ([], [])
    assert changed(note={"type": "Text"}) == (["note"], [])
    assert changed(n={"type": "Integer", "not_null": True, "default": "0"}) == (["n"], [])
    assert changed(n={"type": "Integer", "not_null": True})[1] == [
        "column t.n was added NOT NULL without a default"
    ]
    assert changed(name=None)[1] == ["column t.name was dropped or renamed on the host"]
    assert changed(price={"type": "Numeric", "precision": 12, "scale": 4})[1] == [
        "column t.price changed type from Numeric(precision=12, scale=2) to "
        "Numeric(precision=12, scale=4)"
    ]
    assert changed(name={"type": "String", "length": 40, "not_null": True})[1] == [
        "column t.name became NOT NULL"
    ]
    rekeyed = {**old, "primary_key": ["id", "name"]}
    assert changes(old, rekeyed)[1] == ["table t: primary key changed from (id) to (id, name)"]
    assert digest(old) != digest(rekeyed)
    assert digest(old) == digest({**old, "unique": [["name"]], "foreign_keys": []})


def test_a_load_from_before_definitions_were_kept_gets_a_baseline(site: Cluster) -> None:
    """After the upgrade (loads without a digest) nothing is sent again:
    the host's definition now is taken as the station's, once."""
    c = site
    synced(c)
    c.execute("hq", update(loads).values(digest=None))
    reports = c.sync("hq")
    assert reports["hq"].sent == 0
    with c.engines["hq"].connect() as conn:
        kept = conn.execute(select(loads.c.digest)).scalars().all()
    assert kept and all(kept)
    assert table_state(c, "hq", "koeln", "customers") == "current"
