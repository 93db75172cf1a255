"""Rules enforced on every incoming row (DESIGN §12, issue 15 item 4).

A station holds valid keys, so what it sends passes the signature check; it
may still send rows its rules do not allow. Each test forges such rows the
way a buggy or stolen station could — through its own database and change
log — beside a well-behaved station's changes, and shows that nothing
outside the rules is written on the host, that the reason is logged and
shown by ``status`` (or ``errors list``), and that the other station's
changes apply in the same cycle. The plain-use cases show the same checks
in ordinary work: an id collision no longer destroys a host row.

One test per class of issue 15 (an insert over an existing row, rows out of
the sender's scope, numbers from another station's lease) forges a few
hundred rows and measures the host's cycle with :mod:`tracemalloc`: its peak
stays under :data:`PEAK_BOUND`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, select, update

from mailsync import CycleReport, admin_queues
from mailsync.apply import ParkedRow, list_parked
from mailsync.dialects import dialect_for
from mailsync.ranges import admin as ranges_admin
from mailsync.ranges import model
from mailsync.store.tables import changes, log_table
from tests.cluster import Cluster, customers, orders
from tests.measure import MIB, cycle_under

#: what the host's cycle may allocate (tracemalloc's peak) while it parks or
#: refuses the few hundred forged rows of one station and applies another's
PEAK_BOUND = 8 * MIB
#: forged rows per test: enough that a cost per row would show in the peak
FORGED = 300


@pytest.fixture
def c(tmp_path: Path, db_url: str) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path, db_url, ("koeln", "berlin"))
    try:
        yield cluster
    finally:
        cluster.close()


def customer(i: int, name: str, city: str = "koeln") -> dict[str, object]:
    return {"id": i, "name": name, "city": city}


def names(c: Cluster, node: str) -> dict[int, tuple[str, str | None]]:
    return {r[0]: (r[1], r[2]) for r in c.rows(node, customers)}


def logged(c: Cluster, event: str, node: str = "hq") -> list[str]:
    with c.engines[node].connect() as conn:
        query = select(log_table.c.message).where(log_table.c.event == event)
        return list(conn.execute(query).scalars().all())


def refusals(c: Cluster, node: str = "hq") -> list[str]:
    return logged(c, "refused", node)


def host_cycle(c: Cluster) -> CycleReport:
    """The stations' mail is in hq's mailbox: one host cycle, its peak
    memory under :data:`PEAK_BOUND`."""
    return cycle_under(c.host, PEAK_BOUND)


def applied(report: CycleReport) -> dict[str, tuple[int, int]]:
    """Per station, the rows the host's cycle applied and parked."""
    return {a.peer: (a.rows, a.parked) for a in report.applied}


def parked(c: Cluster, node: str = "hq") -> list[ParkedRow]:
    with c.engines[node].connect() as conn:
        return list_parked(conn)


def cli(c: Cluster, node: str, *args: str) -> str:
    """What ``mailsync ARGS`` prints for ``node``, run as a user runs it."""
    done = c.cli(node, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def forge_op(c: Cluster, node: str, keys: Iterable[int], op: str) -> None:
    """Rewrite what ``node``'s change log says happened to customers
    ``keys``: what a tampered station sends."""
    pks = [f"[{key}]" for key in keys]
    with c.engines[node].begin() as conn:
        conn.execute(delete(changes).where(changes.c.tbl == "customers", changes.c.pk.in_(pks)))
        conn.execute(changes.insert(), [{"tbl": "customers", "pk": pk, "op": op} for pk in pks])


# --------------------------------------------------------- insert-only rules


def test_an_id_collision_under_an_insert_only_rule_no_longer_destroys_the_host_row(
    c: Cluster,
) -> None:
    """Stations only send new customers up and receive none: koeln picks an
    id the host uses (long since, and one it has just taken). The host's
    rows stay, whatever the conflict policy; koeln's are parked."""
    c.execute("hq", customers.insert(), [customer(500, "HQ Kunde"), customer(503, "Gleich")])
    c.host.add_rule("customers", down="", up="I", conflict="remote-wins")
    c.sync("hq", "koeln", "berlin")
    c.execute("hq", customers.insert(), customer(504, "HQ neu"))
    c.execute("koeln", customers.insert(), customer(504, "Koeln neu"))
    c.execute("koeln", customers.insert(), [customer(500, "Koeln Kunde"), customer(501, "Neu")])
    c.execute("koeln", customers.insert(), customer(503, "Gleich"))  # the very same row
    c.execute("berlin", customers.insert(), customer(502, "Berliner", "berlin"))
    c.sync("koeln", "berlin", "hq")
    assert names(c, "hq") == {
        500: ("HQ Kunde", "koeln"),
        501: ("Neu", "koeln"),
        502: ("Berliner", "berlin"),
        503: ("Gleich", "koeln"),
        504: ("HQ neu", "koeln"),
    }
    found = parked(c)
    assert {(r.peer, r.table, r.op) for r in found} == {("koeln", "customers", "I")}
    assert sorted(r.values["name"] for r in found) == ["Koeln Kunde", "Koeln neu"]
    assert all("insert of an existing key: the rules allow inserts only" in r.error for r in found)
    assert c.host.status().parked == 2
    assert "2 row(s) could not be applied and are parked" in cli(c, "hq", "status")
    assert "insert of an existing key" in cli(c, "hq", "errors", "list")
    with c.engines["hq"].connect() as conn:
        logged = conn.execute(
            select(log_table.c.message).where(log_table.c.event == "parked")
        ).scalars()
        assert any("2 row(s)" in m for m in logged)
    # the admin decides: retry takes koeln's version, drop keeps the host's
    by_key = {r.values["id"]: r.id for r in found}
    assert admin_queues.retry_parked(c.host, [by_key[500]]) == (1, 0)
    assert admin_queues.drop_parked(c.host, [by_key[504]]) == 1
    assert names(c, "hq")[500] == ("Koeln Kunde", "koeln")
    assert names(c, "hq")[504] == ("HQ neu", "koeln")
    assert parked(c) == []


def test_a_forged_insert_over_an_existing_row_is_parked_and_writes_nothing(c: Cluster) -> None:
    """koeln holds the host's customers and may only add new ones: updates
    it passes off as inserts must not reach the host's rows. They are
    parked, the log and ``status`` say why, berlin's new customer applies in
    the same host cycle, and the host's memory stays bounded."""
    c.host.add_rule("customers", down="IUD", up="I")
    kept = {i: (f"Kunde {i}", "koeln") for i in range(1, FORGED + 1)}
    c.execute("hq", customers.insert(), [customer(i, name) for i, (name, _) in kept.items()])
    c.sync("hq", "koeln", "berlin")
    c.execute("koeln", update(customers).values(name="Gefälscht"))
    forge_op(c, "koeln", kept, "I")
    c.execute("berlin", customers.insert(), customer(700, "Berliner", "berlin"))
    c.sync("koeln", "berlin")
    report = host_cycle(c)

    assert names(c, "hq") == {**kept, 700: ("Berliner", "berlin")}
    assert applied(report) == {"koeln": (0, FORGED), "berlin": (1, 0)}
    found = parked(c)
    assert len(found) == FORGED
    assert {(r.peer, r.op, r.values["name"]) for r in found} == {("koeln", "I", "Gefälscht")}
    (line,) = logged(c, "parked")
    assert (
        f"{FORGED} row(s) could not be applied and are parked (`mailsync errors list`); "
        f"{FORGED} of table customers: inserts of an existing key under an insert-only rule"
    ) in line, line
    assert c.host.status().parked == FORGED
    assert f"{FORGED} row(s) could not be applied and are parked" in cli(c, "hq", "status")
    c.sync("hq", "koeln", "berlin")  # nothing of it was relayed
    assert names(c, "berlin") == names(c, "hq")


# ------------------------------------------------------------- row filters


def scoped(c: Cluster) -> None:
    c.host.add_rule("customers", down="IUD", up="IUD", row_filter="city = :station")
    c.execute(
        "hq",
        customers.insert(),
        [
            customer(1, "Eins"),
            customer(2, "Zwei", "berlin"),
            customer(3, "Drei"),
            customer(4, "Vier"),
        ],
    )
    c.sync("hq", "koeln", "berlin")
    assert set(names(c, "koeln")) == {1, 3, 4} and set(names(c, "berlin")) == {2}


def test_a_station_cannot_change_rows_outside_its_row_filter(c: Cluster) -> None:
    scoped(c)
    # koeln forges: berlin's row 2 as an insert (over the host's), an update
    # and a delete of it, and a few hundred new rows in berlin's scope
    c.execute("koeln", customers.insert(), customer(2, "Gefälscht", "berlin"))
    smuggled = [customer(i, "Untergeschoben", "berlin") for i in range(10, 10 + FORGED)]
    c.execute("koeln", customers.insert(), smuggled)
    # ... and in its own scope: an edit and a delete it may make
    c.execute("koeln", update(customers).where(customers.c.id == 3).values(name="Drei neu"))
    c.execute("koeln", delete(customers).where(customers.c.id == 4))
    c.execute("berlin", update(customers).where(customers.c.id == 2).values(name="Zwei neu"))
    c.sync("koeln", "berlin")
    report = host_cycle(c)
    assert names(c, "hq") == {
        1: ("Eins", "koeln"),
        2: ("Zwei neu", "berlin"),  # berlin's edit, in the same cycle
        3: ("Drei neu", "koeln"),
    }
    assert applied(report) == {"koeln": (2, 0), "berlin": (1, 0)}
    lines = refusals(c)
    assert sorted(line.split(": ", 1)[1] for line in lines) == [
        "1 row(s) of table customers refused: the row here lies outside koeln's row filter; "
        "nothing of them was written",
        f"{FORGED} row(s) of table customers refused: the new values lie outside koeln's row "
        "filter; nothing of them was written",
    ], lines
    assert c.host.status().refused == 2
    # koeln's copy of row 2 (its forgery) changed: refused; and berlin's
    # edit of row 2, outside koeln's filter, travelled to koeln as a delete
    # (issue 18: a filter bounds the scope both ways), which swept it there
    c.execute("koeln", update(customers).where(customers.c.id == 2).values(name="Nochmal"))
    c.sync("koeln", "hq")
    assert names(c, "hq")[2] == ("Zwei neu", "berlin")
    assert 2 not in names(c, "koeln")
    c.execute("koeln", delete(customers).where(customers.c.id == 2))  # nothing left to delete
    c.sync("koeln", "hq")
    assert names(c, "hq")[2] == ("Zwei neu", "berlin")
    assert len([m for m in refusals(c) if "the row here lies outside" in m]) == 2
    assert c.host.status().refused == len(refusals(c)) >= 3
    assert "rows refused by the rules in" in cli(c, "hq", "status")
    assert parked(c) == []  # refused, not parked: there is nothing to retry
    c.sync("hq", "berlin")  # nothing of it was relayed
    assert names(c, "berlin") == {2: ("Zwei neu", "berlin")}


def test_a_station_that_moves_its_own_row_out_of_scope_is_refused(c: Cluster) -> None:
    """An operator's mistake at koeln: the customer moved to Berlin is
    berlin's business now; the host keeps its row and says why."""
    scoped(c)
    c.execute("koeln", update(customers).where(customers.c.id == 1).values(city="berlin"))
    c.execute("koeln", update(customers).where(customers.c.id == 3).values(name="Drei neu"))
    reports = c.sync("koeln", "hq")
    assert names(c, "hq")[1] == ("Eins", "koeln")
    assert names(c, "hq")[3] == ("Drei neu", "koeln")
    (line,) = refusals(c)
    assert "changeset #" in line and "from koeln" in line
    assert "1 row(s) of table customers refused: the new values lie outside" in line
    (applied,) = reports["hq"].applied
    assert applied.rows == 1
    assert applied.refused == {("customers", "the new values lie outside koeln's row filter"): 1}


def test_a_row_filter_without_station_bounds_the_way_up_too(c: Cluster) -> None:
    c.host.add_rule("customers", down="IUD", up="IUD", row_filter="active")
    c.execute("hq", customers.insert(), {**customer(1, "Aktiv"), "active": True})
    c.execute("hq", customers.insert(), {**customer(2, "Ruhend"), "active": False})
    c.sync("hq", "koeln")
    assert set(names(c, "koeln")) == {1}
    c.execute("koeln", customers.insert(), {**customer(2, "Gefälscht"), "active": True})
    c.execute("koeln", customers.insert(), {**customer(5, "Neu"), "active": True})
    c.sync("koeln", "hq")
    assert names(c, "hq") == {1: ("Aktiv", "koeln"), 2: ("Ruhend", "koeln"), 5: ("Neu", "koeln")}
    assert any("the row here lies outside koeln's row filter" in m for m in refusals(c))


# ------------------------------------------------------------ bound numbers


def ranged(c: Cluster) -> dict[str, tuple[int, int]]:
    """orders.order_no bound to range order_no; each station's first lease."""
    c.host.add_rule("orders", down="IUD", up="IUD")
    with c.engines["hq"].begin() as conn:
        spec = model.RangeSpec("order_no", 1000, 9999, 10, bind="orders.order_no")
        ranges_admin.add_range(conn, spec)
    c.sync("hq", "koeln", "berlin")
    with c.engines["hq"].connect() as conn:
        return {x.holder: (x.first, x.last) for x in model.list_leases(conn, "order_no")}


def unguarded(c: Cluster, node: str) -> None:
    """Take away ``node``'s own trigger on the bound column, as a tampered
    (or hand-edited) database has it."""
    with c.engines[node].begin() as conn:
        dialect_for(conn).drop_binding(conn, "orders", "order_no")


def order_numbers(c: Cluster, node: str) -> dict[int, Any]:
    return {r[0]: r[1] for r in c.rows(node, orders)}


def test_a_station_cannot_send_numbers_from_another_stations_lease(c: Cluster) -> None:
    leased = ranged(c)
    berlins = leased["berlin"][0]
    unguarded(c, "koeln")
    c.execute(
        "koeln",
        orders.insert(),
        [
            {"id": 1, "order_no": str(berlins), "customer": "gefälscht"},
            {"id": 2, "order_no": "9990", "customer": "nicht verliehen"},
            {"id": 3, "order_no": str(leased["koeln"][0]), "customer": "eigene"},
        ],
    )
    # and a few hundred more, numbered where no lease lies yet
    forged = [{"id": i, "order_no": str(5000 + i), "customer": "x"} for i in range(10, 8 + FORGED)]
    c.execute("koeln", orders.insert(), forged)
    c.execute("berlin", orders.insert(), {"id": 4, "customer": "berlin"})  # draws berlins
    c.sync("koeln", "berlin")
    report = host_cycle(c)
    assert order_numbers(c, "hq") == {3: str(leased["koeln"][0]), 4: str(berlins)}
    assert applied(report) == {"koeln": (1, 0), "berlin": (1, 0)}
    (line,) = refusals(c)
    assert (
        f"{FORGED} row(s) of table orders refused: order_no holds a number not from koeln's "
        "leases of range order_no"
    ) in line, line
    assert c.host.status().refused == 1
    assert "rows refused by the rules in 1 changeset report(s)" in cli(c, "hq", "status")
    # a number changed by an update is checked too; an unchanged one is not
    c.execute("koeln", update(orders).where(orders.c.id == 3).values(order_no=str(berlins + 1)))
    c.sync("koeln", "hq")
    assert order_numbers(c, "hq")[3] == str(leased["koeln"][0])
    own = str(leased["koeln"][0])  # koeln puts its number back and edits the row
    c.execute("koeln", update(orders).where(orders.c.id == 3).values(order_no=own, customer="neu"))
    c.sync("koeln", "hq")
    assert next(r for r in c.rows("hq", orders) if r[0] == 3)[2] == "neu"
    c.sync("hq", "berlin")  # berlin's next draw does not clash
    c.execute("berlin", orders.insert(), {"id": 5, "customer": "zweite"})
    assert order_numbers(c, "berlin")[5] == str(berlins + 1)


def test_numbers_the_host_and_other_stations_issued_travel_as_before(c: Cluster) -> None:
    """Plain use: the host's numbers and koeln's go everywhere; an edit of a
    row numbered elsewhere keeps its number and applies."""
    leased = ranged(c)
    c.execute("hq", orders.insert(), {"id": 1, "customer": "hq"})
    c.execute("koeln", orders.insert(), {"id": 2, "customer": "koeln"})
    c.converge()
    assert c.agree("orders")
    assert order_numbers(c, "berlin")[2] == str(leased["koeln"][0])
    c.execute("berlin", update(orders).where(orders.c.id == 1).values(customer="von berlin"))
    c.execute("berlin", update(orders).where(orders.c.id == 2).values(customer="auch"))
    c.converge()
    assert c.agree("orders")
    assert refusals(c) == [] and refusals(c, "koeln") == [] and refusals(c, "berlin") == []


def test_a_station_refuses_a_new_row_numbered_from_its_own_lease(c: Cluster) -> None:
    """A hand-edited host database hands out koeln's next number: koeln
    refuses the row (its next draw would clash), berlin takes it."""
    leased = ranged(c)
    unguarded(c, "hq")
    koelns = leased["koeln"][0]
    c.execute("hq", orders.insert(), {"id": 1, "order_no": str(koelns), "customer": "hq"})
    c.sync("hq", "koeln", "berlin")
    assert order_numbers(c, "koeln") == {} and order_numbers(c, "berlin") == {1: str(koelns)}
    (line,) = refusals(c, "koeln")
    assert "order_no holds a number from this station's own leases, not the host's" in line
    assert c.nodes["koeln"].status().refused == 1
    c.execute("koeln", orders.insert(), {"id": 2, "customer": "koeln"})
    assert order_numbers(c, "koeln")[2] == str(koelns)  # no clash here
