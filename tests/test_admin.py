"""Admin commands: each one shows in ``mailsync log``, and an operator's
mistake is one line, a non-zero exit and no change at all.

The cluster (memory post office) makes the parked row and the conflict an
admin deals with; the admin commands then run as a user runs them, through
the ``mailsync`` command against each node's config file.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select, update

from mailsync import admin, admin_queues
from mailsync.errors import SchemaError
from mailsync.keys import KeyPair
from mailsync.ranges.model import RangeSpec
from mailsync.store.tables import conflicts_table, parked
from tests.cluster import Cluster, customers


def run(node: str, c: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return c.cli(node, *args)


def ok(node: str, c: Cluster, *args: str) -> str:
    done = run(node, c, *args)
    assert done.returncode == 0, done.stderr + done.stdout
    return done.stdout


def logged(node: str, c: Cluster) -> list[str]:
    """The node's log as `mailsync log` shows it (every entry, JSON)."""
    entries = json.loads(ok(node, c, "log", "--json", "--level", "debug", "--limit", "100000"))
    return [e["message"] for e in entries]


def refused(done: subprocess.CompletedProcess[str], needle: str) -> None:
    """Non-zero exit, one error line that says what, no traceback."""
    assert done.returncode != 0, (done.args, done.stdout)
    assert "Traceback" not in done.stderr + done.stdout
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], (done.args, done.stderr)


@pytest.fixture(name="c")
def work_to_do(tmp_path: Path) -> Iterator[Cluster]:
    """A host with a parked row (koeln sent a second customer of a city the
    host's own index allows once) and a station with a conflict (row 1
    changed on both sides before either heard of the other)."""
    c = Cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}", ("koeln",))
    try:
        with c.engines["hq"].begin() as conn:
            conn.exec_driver_sql("CREATE UNIQUE INDEX one_per_city ON customers (city)")
        c.host.add_rule("customers", down="IUD", up="IUD")
        c.execute("hq", customers.insert(), {"id": 1, "name": "a", "city": "Bonn"})
        c.sync("hq", "koeln", "hq")
        c.execute("koeln", customers.insert(), {"id": 2, "name": "b", "city": "Bonn"})
        c.sync("koeln", "hq")
        c.execute("hq", update(customers).where(customers.c.id == 1).values(name="HQ"))
        c.execute("koeln", update(customers).where(customers.c.id == 1).values(name="Köln"))
        c.sync("hq", "koeln")
        assert c.host.status().parked == 1
        with c.engines["koeln"].connect() as conn:
            assert len(conn.execute(select(conflicts_table)).all()) == 1
        admin.add_range(c.host, RangeSpec("spare_no", 1, 999, 10))
        yield c
    finally:
        c.close()


def parked_id(c: Cluster) -> int:
    (row,) = admin_queues.parked_rows(c.host)
    return row.id


def conflict_id(c: Cluster) -> int:
    (found,) = json.loads(ok("koeln", c, "conflicts", "list", "--json"))
    return int(found["id"])


def test_every_admin_command_writes_its_log_line(c: Cluster, tmp_path: Path) -> None:
    key = KeyPair.generate().public.token()
    bundle = str(tmp_path / "berlin.bundle")
    ok("hq", c, "station", "add", "berlin", "--email", "b@x.test", "--key", key, "--bundle", bundle)
    ok("hq", c, "table", "add", "orders", "--station", "koeln", "--up", "insert")
    ok("hq", c, "table", "remove", "orders", "--station", "koeln")
    ok("hq", c, "range", "add", "order_no", "--start", "1", "--end", "99", "--block", "5")
    ok("hq", c, "range", "set-block", "order_no", "10", "--station", "koeln")
    ok("hq", c, "range", "release", "order_no")
    ok("hq", c, "range", "remove", "order_no")
    clash = run("hq", c, "station", "edit", "koeln", "--email", "b@x.test")
    refused(clash, "address b@x.test already belongs to station 'berlin'")
    ok("hq", c, "station", "edit", "berlin", "--label", "Berlin Mitte")
    ok("hq", c, "station", "edit", "berlin", "--email", "mitte@x.test")
    shown = ok("hq", c, "station", "show", "berlin")
    assert "Berlin Mitte" in shown and "mitte@x.test" in shown
    ok("hq", c, "station", "remove", "berlin", "--yes")
    assert "sent again in full to koeln" in ok("hq", c, "reload", "--station", "koeln")
    row = parked_id(c)
    assert run("hq", c, "errors", "retry", str(row)).returncode == 5  # the cause is still there
    with c.engines["hq"].begin() as conn:
        conn.exec_driver_sql("DROP INDEX one_per_city")
    ok("hq", c, "errors", "retry", "--all")
    ok("hq", c, "errors", "drop", "--all")
    gone = conflict_id(c)
    ok("koeln", c, "conflicts", "drop", str(gone))
    ok("koeln", c, "keys", "rotate")

    at_hq = logged("hq", c)
    for line in (
        "station berlin <b@x.test> added, key",
        "rule for orders (koeln): down insert,update,delete, up insert",
        "rule for orders (koeln) removed",
        "range order_no 1-99 added, blocks of 5",
        "range order_no: blocks of 10 for koeln from the next lease on",
        "range order_no: 0 lease(s) asked back from every station (the range closes)",
        "range order_no removed",
        "station berlin edited: label '' -> 'Berlin Mitte'",
        "station berlin edited: address <b@x.test> -> <mitte@x.test>",
        "station berlin removed",
        "koeln: customers to be sent again in full (asked by the admin)",
        f"parked row {row} (customers, from koeln #",
        "applied on retry",
        "0 parked row(s) dropped",
    ):
        assert any(line in m for m in at_hq), (line, at_hq)
    assert any(m.startswith(f"parked row {row}") and "still fails" in m for m in at_hq)
    at_koeln = logged("koeln", c)
    assert f"1 conflict record(s) dropped ({gone})" in at_koeln
    assert any(m.startswith("keys rotated: new key") for m in at_koeln)
    # a station's admin lines are found under its name
    about_koeln = json.loads(ok("hq", c, "log", "--json", "--peer", "koeln"))
    assert any("blocks of 10 for koeln" in e["message"] for e in about_koeln)


MISTAKES = [
    ("hq", ("station", "show", "ghost"), "no station 'ghost'"),
    ("hq", ("station", "edit", "ghost", "--label", "x"), "no station 'ghost'"),
    ("hq", ("station", "edit", "koeln"), "nothing to change"),
    ("hq", ("station", "edit", "koeln", "--email", "not an address"), "e-mail"),
    ("koeln", ("station", "edit", "koeln", "--label", "x"), "is a remote"),
    ("hq", ("reload", "--station", "ghost"), "no station 'ghost'"),
    ("hq", ("reload", "--station", "koeln", "--table", "orders"), "does not travel to koeln"),
    ("koeln", ("reload", "--station", "koeln"), "is a remote"),
    ("hq", ("table", "add", "customers", "--station", "ghost"), "no station 'ghost'"),
    ("hq", ("table", "remove", "orders"), "no rule for table 'orders'"),
    ("hq", ("range", "show", "nope"), "no number range 'nope'"),
    ("hq", ("range", "set-block", "nope", "5"), "no number range 'nope'"),
    ("hq", ("range", "release", "nope"), "no number range 'nope'"),
    ("hq", ("range", "remove", "nope"), "no number range 'nope'"),
    ("koeln", ("range", "add", "x", "--start", "1", "--end", "9"), "defined on the host"),
    ("koeln", ("range", "set-block", "x", "5"), "set on the host"),
    ("koeln", ("station", "remove", "koeln", "--yes"), "is a remote"),
    ("koeln", ("table", "add", "customers"), "is a remote"),
    ("hq", ("range", "set-block", "spare_no", "5", "--station", "ghost"), "no station 'ghost'"),
    ("hq", ("range", "release", "spare_no", "--station", "ghost"), "no station 'ghost'"),
    ("hq", ("range", "add", "y", "--start", "1", "--end", "9", "--station", "ghost"), "ghost"),
    ("hq", ("range", "add", "z", "--start", "1", "--end", str(2**70)), "beyond what a BIGINT"),
    ("hq", ("errors", "retry", str(2**64)), "is not an ID of parked rows"),
    ("koeln", ("conflicts", "drop", str(2**63)), "is not an ID of conflict"),
    (
        "hq",
        ("station", "add", "x", "--email", "x@example.test", "--bundle", "/no/such/dir/x"),
        "cannot write the bundle",
    ),
    ("hq", ("errors", "retry", "999"), "no parked row 999"),
    ("hq", ("errors", "drop", "999"), "no parked row 999"),
    ("koeln", ("conflicts", "drop", "999"), "no conflict record 999"),
]


def test_an_operators_mistake_is_one_line_and_changes_nothing(c: Cluster) -> None:
    """One cluster for every case (each would cost a cluster and three runs)."""
    before = {node: logged(node, c) for node in ("hq", "koeln")}
    for node, args, needle in MISTAKES:
        refused(run(node, c, *args), needle)
    assert {node: logged(node, c) for node in ("hq", "koeln")} == before
    assert c.host.status().parked == 1


def test_one_unknown_id_among_known_ones_changes_none_of_them(c: Cluster) -> None:
    row, gone = parked_id(c), conflict_id(c)
    with c.engines["hq"].begin() as conn:
        conn.exec_driver_sql("DROP INDEX one_per_city")  # a retry would now apply it
    refused(run("hq", c, "errors", "retry", str(row), "999"), "no parked row 999")
    refused(run("hq", c, "errors", "drop", str(row), "999"), "no parked row 999")
    refused(run("koeln", c, "conflicts", "drop", str(gone), "999"), "no conflict record 999")
    with c.engines["hq"].connect() as conn:
        assert conn.execute(select(parked.c.id)).scalars().all() == [row]
    with c.engines["koeln"].connect() as conn:
        assert conn.execute(select(conflicts_table.c.id)).scalars().all() == [gone]


def test_a_table_named_in_another_case_and_a_key_of_foreign_keys(tmp_path: Path) -> None:
    """SQLite: `table add invoiceline` for InvoiceLine said "has no primary
    key"; a key made of two foreign keys drew the integer-key warning."""
    c = Cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}", ("koeln",))
    try:
        with c.engines["hq"].begin() as conn:
            conn.exec_driver_sql('CREATE TABLE "InvoiceLine" (id TEXT PRIMARY KEY)')
            conn.exec_driver_sql(
                "CREATE TABLE tagging (customer INTEGER REFERENCES customers(id), "
                "note_owner INTEGER REFERENCES customers(id), PRIMARY KEY (customer, note_owner))"
            )
        with pytest.raises(SchemaError, match="'invoiceline' is called 'InvoiceLine'"):
            c.host.add_rule("invoiceline", down="IUD", up="IUD")
        _, warned = c.host.add_rule("InvoiceLine", down="IUD", up="IUD")
        assert warned == []
        _, warned = c.host.add_rule("tagging", down="IUD", up="IUD")
        assert warned == []
        _, warned = c.host.add_rule("customers", down="IUD", up="IUD")
        assert any("integer key (id)" in w for w in warned)
    finally:
        c.close()
