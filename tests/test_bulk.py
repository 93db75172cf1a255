"""Loads into an empty table: a plain insert, no capture on a station, and
relaying from the host still right (issue 17, bulk paths).

A station applying the host's rows into an empty table takes its capture
triggers off for that changeset: those rows are the host's and a station
sends up only its own changes. The triggers are back before the commit, so
what the station changes next is captured. On the host the triggers stay:
what one station loads may go on to the others.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from mailsync.capture import check_capture
from mailsync.store.tables import changes
from tests.cluster import Cluster, notes
from tests.test_sync import customer, customers


@pytest.fixture
def cluster(tmp_path: Path, db_url: str) -> Iterator[Cluster]:
    c = Cluster(tmp_path, db_url)
    yield c
    c.close()


def logged(c: Cluster, node: str, table: str) -> list[tuple[str, str | None]]:
    with c.engines[node].connect() as conn:
        rows = conn.execute(
            select(changes.c.op, changes.c.origin).where(changes.c.tbl == table)
        ).all()
    return [(r[0], r[1]) for r in rows]


def test_a_station_loads_the_host_s_rows_without_capturing_them(cluster: Cluster) -> None:
    c = cluster
    c.execute("hq", customers.insert(), [customer(i) for i in range(1, 31)])
    c.host.add_rule("customers", down="IUD", up="IUD")
    c.sync("hq", "koeln")
    assert c.rows("koeln", customers) == c.rows("hq", customers)
    assert logged(c, "koeln", "customers") == []  # nothing of the load in its change log
    with c.engines["koeln"].connect() as conn:
        assert check_capture(conn, ["customers"]) == []  # the triggers are back
    # what the station changes next is captured and goes up
    c.execute("koeln", customers.insert(), customer(31, city="koeln"))
    assert logged(c, "koeln", "customers") == [("I", None)]
    c.sync("koeln", "hq")
    assert len(c.rows("hq", customers)) == 31
    # and the host's next rows into a table no longer empty are upserted
    c.execute("hq", customers.insert(), customer(32))
    c.sync("hq", "koeln")
    assert c.rows("koeln", customers) == c.rows("hq", customers)


def test_rows_one_station_loads_into_an_empty_host_table_reach_the_others(
    cluster: Cluster,
) -> None:
    c = cluster
    c.host.add_rule("notes", down="IUD", up="IUD")
    c.sync("hq", "koeln", "berlin")
    rows = [{"owner": "berlin", "topic": f"t{i}", "body": f"note {i}"} for i in range(20)]
    c.execute("berlin", notes.insert(), rows)
    c.sync("berlin", "hq")
    assert len(c.rows("hq", notes)) == 20
    # the host logged them as berlin's: relayed to koeln, never back to berlin
    assert set(logged(c, "hq", "notes")) == {("I", "berlin")}
    reports = c.sync("hq", "koeln", "berlin")
    assert reports["koeln"].rows_applied == 20
    assert reports["berlin"].rows_applied == 0  # no echo
    assert c.rows("koeln", notes) == c.rows("hq", notes) == c.rows("berlin", notes)


def test_a_load_that_fails_leaves_the_triggers_in_place(cluster: Cluster) -> None:
    """The triggers come off and back in the apply transaction: a changeset
    that fails takes neither the rows nor the change with it."""
    c = cluster
    c.execute("hq", customers.insert(), [customer(i) for i in range(1, 6)])
    c.host.add_rule("customers", down="IUD", up="IUD")
    c.sync("hq")
    with c.engines["koeln"].begin() as conn:  # the station's table refuses everything
        conn.exec_driver_sql(
            "CREATE TRIGGER refuse BEFORE INSERT ON customers BEGIN SELECT RAISE(ABORT, 'no'); END"
        )
    report = c.nodes["koeln"].sync()
    assert report.rows_parked == 5, report
    with c.engines["koeln"].connect() as conn:
        assert check_capture(conn, ["customers"]) == []


def test_a_row_with_driver_wrapped_bytes_is_parked_not_stalled() -> None:
    """A row a PostgreSQL table refuses is parked as it was going to be
    written; psycopg's ``Binary`` around bytes must not stop that (it made
    the whole changeset fail with "a value of type Binary cannot travel")."""
    import psycopg
    from sqlalchemy import create_engine, select

    from mailsync.apply import park_row
    from mailsync.store.migrations import ensure_schema
    from mailsync.store.tables import parked
    from mailsync.wire.changeset import TableDef, unpack

    engine = create_engine("sqlite://")
    ensure_schema(engine)
    tdef = TableDef(0, "files", (("id", "INTEGER"), ("body", "BLOB")), ("id",))
    with engine.begin() as conn:
        park_row(conn, "hq", 3, tdef, "I", (7, psycopg.Binary(b"\x00\xff")), "refused")
        stored = conn.execute(select(parked.c.row)).scalar_one()
    assert unpack(stored) == [7, b"\x00\xff"]
