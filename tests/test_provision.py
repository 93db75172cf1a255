"""Table definitions that travel (issue 19, item 1, its core).

A host's tables — a composite key, a self-referencing foreign key, NUMERIC
prices, a timestamp, booleans, a unique constraint, plain
and current-time defaults — are described on PostgreSQL or SQLite and
created from the description in the other dialect (and the same one): the
created table matches its definition, takes the host's rows, and keeps the
constraints. A type or default with no portable form is refused naming the
column; a hostile description is refused, not executed; an existing table
that differs is described in words.
"""

from __future__ import annotations

import decimal
from pathlib import Path

import pytest
from sqlalchemy import Engine, MetaData, Table, inspect, select, text
from sqlalchemy.exc import IntegrityError

from mailsync.errors import SchemaError
from mailsync.provision import create_missing, describe, differences
from mailsync.store.engine import open_engine

ERP = [
    "CREATE TABLE category (id INTEGER PRIMARY KEY, parent_id INTEGER REFERENCES category(id), "
    "name VARCHAR(80) NOT NULL UNIQUE)",
    "CREATE TABLE article (sku VARCHAR(20) PRIMARY KEY, category_id INTEGER NOT NULL "
    "REFERENCES category(id), price NUMERIC(12, 2) NOT NULL DEFAULT 0, active BOOLEAN NOT NULL "
    "DEFAULT true, created TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP, note TEXT)",
    "CREATE TABLE price_list (list VARCHAR(10) NOT NULL, sku VARCHAR(20) NOT NULL REFERENCES "
    "article(sku), valid_from DATE NOT NULL, price NUMERIC(12, 4), PRIMARY KEY (list, sku, "
    "valid_from))",
]
TABLES = ["price_list", "article", "category"]  # children first: describe orders them


def erp(engine: Engine) -> None:
    with engine.begin() as conn:
        for ddl in ERP:
            sql = ddl if engine.dialect.name == "postgresql" else ddl.replace("true", "1")
            conn.exec_driver_sql(sql)
        conn.execute(text("INSERT INTO category VALUES (1, NULL, 'all'), (2, 1, 'tools')"))
        conn.execute(
            text(
                "INSERT INTO article (sku, category_id, price, note) VALUES "
                "('A-1', 2, 9.99, 'Hammer'), ('A-2', 2, 1250.5, NULL)"
            )
        )
        conn.execute(text("INSERT INTO price_list VALUES ('retail', 'A-1', '2026-01-01', 10.1234)"))


def carry(host: Engine, station: Engine) -> list[str]:
    with host.connect() as conn:
        definitions = describe(conn, TABLES)
    assert [d["table"] for d in definitions] == ["category", "article", "price_list"]
    with station.begin() as conn:
        made = create_missing(conn, definitions)
    with station.connect() as conn:
        for d in definitions:
            assert differences(conn, d) == [], d["table"]
    return made


def copy_rows(host: Engine, station: Engine) -> None:
    meta = MetaData()
    meta.reflect(host, only=["category", "article", "price_list"])
    with host.connect() as src, station.begin() as dst:
        for name in ("category", "article", "price_list"):
            table = meta.tables[name]
            rows = [dict(r._mapping) for r in src.execute(select(table))]
            dst.execute(table.insert(), rows)


def check_station(station: Engine) -> None:
    with station.connect() as conn:
        price = conn.execute(text("SELECT price FROM article WHERE sku = 'A-2'")).scalar()
        assert decimal.Decimal(str(price)) == decimal.Decimal("1250.50")
        cols = {c["name"]: c for c in inspect(conn).get_columns("article")}
        assert not cols["price"]["nullable"] and cols["note"]["nullable"]
        fks = inspect(conn).get_foreign_keys("category")
        assert [(f["referred_table"], f["constrained_columns"]) for f in fks] == [
            ("category", ["parent_id"])
        ]
    with station.begin() as conn:  # the defaults are there
        conn.execute(text("INSERT INTO article (sku, category_id) VALUES ('A-3', 1)"))
        row = conn.execute(text("SELECT price, created FROM article WHERE sku = 'A-3'")).one()
        assert decimal.Decimal(str(row[0])) == 0 and row[1] is not None
    with pytest.raises(IntegrityError), station.begin() as conn:  # the unique constraint
        conn.execute(text("INSERT INTO category VALUES (3, 1, 'tools')"))


def test_a_hosts_tables_are_created_on_a_sqlite_station(tmp_path: Path, db_url: str) -> None:
    host, station = open_engine(db_url), open_engine(f"sqlite:///{tmp_path / 'station.db'}")
    try:
        erp(host)
        assert sorted(carry(host, station)) == sorted(TABLES)
        copy_rows(host, station)
        check_station(station)
        assert carry(host, station) == []  # present now: nothing created twice
    finally:
        host.dispose()
        station.dispose()


@pytest.mark.postgresql
def test_a_sqlite_hosts_tables_are_created_on_postgresql(tmp_path: Path, pg_url: str) -> None:
    host, station = open_engine(f"sqlite:///{tmp_path / 'hq.db'}"), open_engine(pg_url)
    try:
        erp(host)
        carry(host, station)
        copy_rows(host, station)
        check_station(station)
    finally:
        host.dispose()
        station.dispose()


def test_what_cannot_travel_is_refused_by_name(tmp_path: Path) -> None:
    engine = open_engine(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "CREATE TABLE odd (id INTEGER PRIMARY KEY, v INTEGER DEFAULT (random()))"
            )
        with engine.connect() as conn, pytest.raises(SchemaError, match=r"odd\.v: default"):
            describe(conn, ["odd"])
        hostile = [
            {
                "table": "t",
                "columns": [{"name": "a", "type": "Integer", "default": "0); DROP TABLE x; --"}],
                "primary_key": ["a"],
            },
            {"table": "t", "columns": [{"name": "a", "type": "os.system"}], "primary_key": ["a"]},
            {"table": "t", "columns": [{"name": "a", "type": "Integer"}], "primary_key": ["b"]},
            {"table": "t", "columns": [{"name": "a", "type": "Integer"}], "primary_key": []},
            {
                "table": "t",
                "columns": [{"name": "a", "type": "String", "length": "9; x"}],
                "primary_key": ["a"],
            },
            {"table": 7, "columns": [], "primary_key": []},
        ]
        for bad in hostile:
            with engine.begin() as conn, pytest.raises(SchemaError):
                create_missing(conn, [bad])
        assert inspect(engine).get_table_names() == ["odd"]
        # an existing table that differs is described, not altered
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE t (a INTEGER PRIMARY KEY, b TEXT)")
        wanted = {
            "table": "t",
            "columns": [
                {"name": "a", "type": "Integer", "not_null": True},
                {"name": "c", "type": "Date"},
            ],
            "primary_key": ["a"],
        }
        with engine.connect() as conn:
            assert differences(conn, wanted) == ["t.c is missing", "t.b is not on the host"]
    finally:
        engine.dispose()


def test_a_station_gets_its_tables_with_the_load(tmp_path: Path, db_url: str) -> None:
    """Issue 19's user: the host on PostgreSQL (or SQLite), the laptop's
    database has none of the synced tables. The first sync creates them,
    parents first, and fills them; a station that has a table already is
    told how it differs, not altered."""
    from sqlalchemy import select as sa_select

    from mailsync.store.tables import log_table
    from tests.cluster import Cluster

    c = Cluster(tmp_path, db_url, ("koeln",))
    try:
        erp(c.engines["hq"])
        with c.engines["koeln"].begin() as conn:  # koeln has one, with a column of its own
            conn.exec_driver_sql(
                "CREATE TABLE category (id INTEGER PRIMARY KEY, parent_id INTEGER, "
                "name VARCHAR(80) NOT NULL, note TEXT)"
            )
        for table in ("category", "article", "price_list"):
            c.host.add_rule(table, down="IUD", up="none")
        c.sync("hq", "koeln")
        for table in ("article", "price_list"):
            assert table in inspect(c.engines["koeln"]).get_table_names()
        with c.engines["koeln"].connect() as conn:
            rows = conn.execute(text("SELECT sku, price FROM article ORDER BY sku")).all()
            said = [m for (m,) in conn.execute(sa_select(log_table.c.message))]
        assert [(r[0], decimal.Decimal(str(r[1]))) for r in rows] == [
            ("A-1", decimal.Decimal("9.99")),
            ("A-2", decimal.Decimal("1250.50")),
        ]
        assert any("created table(s) article, price_list" in m for m in said), said
        assert any(
            "table category here differs" in m and "category.note is not on the host" in m
            for m in said
        ), said
        # what the station had is not altered, and took the host's rows
        cols = [col["name"] for col in inspect(c.engines["koeln"]).get_columns("category")]
        assert cols == ["id", "parent_id", "name", "note"]
        assert c.rows("koeln", Table("category", MetaData(), autoload_with=c.engines["koeln"]))
    finally:
        c.close()
