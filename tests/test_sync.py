"""Host and stations converge; rules, relay, no echo, atomic apply."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import delete, func, select, update

from mailsync.errors import RuleError, SchemaError
from mailsync.store.tables import changes, inbox, links, log_table
from tests.cluster import Cluster, customers, invoices, notes

T0 = dt.datetime(2026, 11, 2, 8, 30, 0)


def customer(i: int, name: str = "Müller & Söhne", city: str = "koeln") -> dict[str, object]:
    return {
        "id": i,
        "name": name,
        "city": city,
        "credit": Decimal("1250.50"),
        "since": dt.date(2020, 1, 31),
        "active": True,
        "touched": T0,
        "photo": b"\x89PNG\x00\xff",
    }


@pytest.fixture
def cluster(tmp_path: Path, db_url: str) -> Iterator[Cluster]:
    c = Cluster(tmp_path, db_url)
    c.execute("hq", customers.insert(), [customer(i) for i in range(1, 21)])
    c.execute(
        "hq",
        invoices.insert(),
        [{"id": i, "customer_id": i, "total": Decimal("9.99")} for i in range(1, 11)],
    )
    yield c
    c.close()


def all_rules(c: Cluster, up: str = "IUD") -> None:
    for table in ("customers", "invoices", "notes"):
        c.host.add_rule(table, down="IUD", up=up)


def test_initial_load_reaches_every_station(cluster: Cluster) -> None:
    all_rules(cluster)
    cluster.sync("hq", "koeln", "berlin")
    assert len(cluster.rows("koeln", customers)) == 20
    assert cluster.rows("berlin", invoices) == cluster.rows("hq", invoices)
    assert cluster.agree()


def test_values_arrive_exactly(cluster: Cluster) -> None:
    all_rules(cluster)
    cluster.sync("hq", "koeln")
    row = cluster.rows("koeln", customers)[0]
    assert row == (
        1,
        "Müller & Söhne",
        "koeln",
        Decimal("1250.50"),
        dt.date(2020, 1, 31),
        True,
        T0,
        b"\x89PNG\x00\xff",
    )


def test_relay_among_three_stations_without_echo(tmp_path: Path, db_url: str) -> None:
    c = Cluster(tmp_path, db_url, ("koeln", "berlin", "muenchen"))
    try:
        all_rules(c)
        c.sync("hq", "koeln", "berlin", "muenchen")
        c.execute("koeln", customers.insert(), customer(501, "Köln neu"))
        c.execute(
            "berlin", notes.insert(), {"owner": "berlin", "topic": "Öffnungszeiten", "body": "8–18"}
        )
        c.converge()
        assert c.agree()
        assert len(c.rows("muenchen", customers)) == 1
        # quiet afterwards: nothing travels when nothing changed (no echo loop)
        for _ in range(2):
            reports = c.sync("hq", "koeln", "berlin", "muenchen")
            assert all(not r.built for r in reports.values()), reports
        with c.engines["hq"].connect() as conn:
            origins = conn.execute(select(changes.c.origin).distinct()).scalars().all()
        assert set(origins) <= {None, "koeln", "berlin"}
    finally:
        c.close()


@pytest.mark.parametrize("op", ["insert", "update", "delete"])
@pytest.mark.parametrize("direction", ["down", "up"])
@pytest.mark.parametrize("allowed", [True, False])
def test_each_rule_flag_in_each_direction(
    cluster: Cluster, op: str, direction: str, allowed: bool
) -> None:
    letter = op[0].upper()
    ops = "IUD" if allowed else "IUD".replace(letter, "")
    down, up = (ops, "IUD") if direction == "down" else ("IUD", ops)
    cluster.host.add_rule(
        "customers", down=down if letter != "I" or direction == "up" else "IUD", up=up
    )
    cluster.sync("hq", "koeln", "berlin")
    if letter == "I" and direction == "down":
        # the initial load needs down-insert; change the rule after it
        cluster.host.add_rule("customers", down=down, up=up)
        cluster.sync("hq", "koeln")
    source, target = ("hq", "koeln") if direction == "down" else ("koeln", "hq")
    if letter == "I":
        cluster.execute(source, customers.insert(), customer(700, "Neu"))
    elif letter == "U":
        cluster.execute(
            source, update(customers).where(customers.c.id == 3).values(name="Geändert")
        )
    else:
        cluster.execute(source, delete(customers).where(customers.c.id == 14))
    cluster.sync(source, target)
    rows = {r[0]: r for r in cluster.rows(target, customers)}
    arrived = {"I": 700 in rows, "U": rows.get(3, (0, ""))[1] == "Geändert", "D": 14 not in rows}[
        letter
    ]
    assert arrived == allowed


def test_remote_refuses_what_its_rules_do_not_allow(cluster: Cluster) -> None:
    """A station applies only its own copy of the rules, and logs the rest."""
    cluster.host.add_rule("customers", down="IUD", up="")
    cluster.sync("hq", "koeln")
    # the host's rule changes, but koeln has not heard yet: forge what a stale
    # host would send by building with a wider plan than koeln holds
    from mailsync.build import build_for_link
    from mailsync.linkplan import LinkPlan
    from mailsync.rules import Rule

    cluster.execute("hq", notes.insert(), {"owner": "hq", "topic": "x", "body": "y"})
    cluster.host.add_rule("notes", down="IUD", up="")
    plan = LinkPlan(
        "hq", "koeln", "down", {"notes": Rule("notes", "*", "IUD", "")}, initial_loads=["notes"]
    )
    with cluster.engines["hq"].begin() as conn:
        conn.execute(update(links).where(links.c.peer == "koeln").values(rules_hash="x"))
    built = build_for_link(
        cluster.host.engine, cluster.host.codec, plan, 10**9, 100, cluster.host.seal, 10**6
    )
    assert built is not None
    cluster.sync("hq", "koeln")
    assert cluster.rows("koeln", notes) == []
    with cluster.engines["koeln"].connect() as conn:
        refused = (
            conn.execute(select(log_table.c.message).where(log_table.c.event == "refused"))
            .scalars()
            .all()
        )
    assert any("notes" in m for m in refused)


def test_rules_reach_stations_with_next_sync(cluster: Cluster) -> None:
    cluster.host.add_rule("customers", down="IUD", up="")
    cluster.sync("hq", "koeln")
    assert cluster.rows("koeln", invoices) == []
    cluster.host.add_rule("invoices", down="IUD", up="")
    cluster.sync("hq", "koeln")
    assert len(cluster.rows("koeln", invoices)) == 10
    # a station-specific rule replaces the general one for that station only
    cluster.host.add_rule("invoices", down="", up="", station="koeln")
    cluster.execute("hq", update(invoices).values(total=Decimal("1.00")))
    cluster.sync("hq", "koeln", "berlin")
    assert {r[2] for r in cluster.rows("koeln", invoices)} == {Decimal("9.99")}
    assert {r[2] for r in cluster.rows("berlin", invoices)} == {Decimal("1.00")}


def test_row_filter_limits_what_a_station_gets(cluster: Cluster) -> None:
    cluster.execute("hq", update(customers).where(customers.c.id > 10).values(city="berlin"))
    cluster.host.add_rule("customers", down="IUD", up="", row_filter="city = :station")
    cluster.sync("hq", "koeln", "berlin")
    assert [r[0] for r in cluster.rows("koeln", customers)] == list(range(1, 11))
    assert [r[0] for r in cluster.rows("berlin", customers)] == list(range(11, 21))


def test_changes_coalesce_and_primary_key_moves(cluster: Cluster) -> None:
    all_rules(cluster)
    cluster.sync("hq", "koeln")
    for i in range(10):
        cluster.execute(
            "hq", update(customers).where(customers.c.id == 5).values(credit=Decimal(i))
        )
    cluster.execute("hq", notes.insert(), {"owner": "a", "topic": "b", "body": "c"})
    cluster.execute("hq", update(notes).values(topic="moved"))
    cluster.execute("hq", customers.insert(), customer(99))
    cluster.execute("hq", delete(customers).where(customers.c.id == 99))  # born and gone
    report = cluster.sync("hq")["hq"]
    koeln = next(b for b in report.built if b.peer == "koeln")
    assert koeln.rows == 2  # one update of customer 5, one note insert; nothing for 99
    cluster.sync("koeln")
    assert cluster.rows("koeln", notes) == [("a", "moved", "c")]
    assert cluster.agree(nodes=("hq", "koeln"))


def test_deletes_go_children_first(cluster: Cluster) -> None:
    all_rules(cluster)
    cluster.sync("hq", "koeln", "berlin")
    cluster.execute("hq", delete(invoices).where(invoices.c.customer_id == 1))
    cluster.execute("hq", delete(customers).where(customers.c.id == 1))
    cluster.execute("hq", customers.insert(), customer(300))
    cluster.execute("hq", invoices.insert(), {"id": 300, "customer_id": 300, "total": Decimal("5")})
    cluster.sync("hq", "koeln", "berlin")
    assert cluster.agree("customers", "invoices")


def test_duplicate_message_is_applied_once(tmp_path: Path, db_url: str) -> None:
    c = Cluster(tmp_path, db_url)
    try:
        c.host.add_rule("customers", down="IUD", up="IUD")
        c.sync("hq")
        assert c.office is not None
        box = c.office.boxes["koeln@example.test"]
        (raw,) = box.values()
        c.office.deliver("koeln@example.test", raw)
        report = c.sync("koeln")["koeln"]
        assert report.received == 2 and report.duplicates == 1 and len(report.applied) == 1
    finally:
        c.close()


def test_failed_apply_leaves_nothing_and_waits(cluster: Cluster) -> None:
    all_rules(cluster)
    cluster.sync("hq", "koeln")
    # koeln lost a table the rules send it (a column or key of its own only
    # parks that table's rows: tests/test_schema_changes.py)
    with cluster.engines["koeln"].begin() as conn:
        conn.exec_driver_sql("ALTER TABLE invoices RENAME TO invoices_gone")
    cluster.execute("hq", customers.insert(), customer(400))
    cluster.execute("hq", update(invoices).values(total=Decimal("2")))
    report = cluster.sync("hq", "koeln")["koeln"]
    assert report.errors and "invoices" in report.errors[0]
    assert 400 not in [r[0] for r in cluster.rows("koeln", customers)]  # all or nothing
    with cluster.engines["koeln"].connect() as conn:
        assert conn.execute(select(func.count()).select_from(inbox)).scalar() == 1
        assert conn.execute(select(links.c.in_seq)).scalar() == 1
    with cluster.engines["koeln"].begin() as conn:
        conn.exec_driver_sql("ALTER TABLE invoices_gone RENAME TO invoices")
    report = cluster.sync("koeln")["koeln"]
    assert not report.errors
    assert cluster.agree("customers", "invoices", nodes=("hq", "koeln"))


def test_unknown_table_and_keyless_table_are_refused(cluster: Cluster) -> None:
    with pytest.raises(SchemaError, match="does not exist"):
        cluster.host.add_rule("nope", down="IUD", up="")
    with cluster.engines["hq"].begin() as conn:
        conn.exec_driver_sql("CREATE TABLE keyless (a INTEGER, b TEXT)")
    with pytest.raises(SchemaError, match="no primary key"):
        cluster.host.add_rule("keyless", down="IUD", up="")
    with pytest.raises(RuleError, match="row filter"):
        cluster.host.add_rule("customers", down="IUD", up="", row_filter="no_such_col = :station")
    assert cluster.host.rules() == []


def test_over_maildir_with_stray_mail_set_aside(tmp_path: Path, db_url: str) -> None:
    from mailsync.keys import KeyPair
    from mailsync.transport.maildir import deliver
    from mailsync.wire.envelope import Codec, Header
    from mailsync.wire.message import Address, build_message

    c = Cluster(tmp_path, db_url, transport="maildir")
    try:
        all_rules(c)
        c.execute("hq", customers.insert(), customer(1))
        box = tmp_path / "mail" / "koeln@example.test"
        deliver(box, b"From: spam@x\r\nSubject: offer\r\n\r\nbuy")
        koeln_key = c.nodes["koeln"].public_key
        mallory = KeyPair.generate()
        stranger = Header("mallory", "koeln", 1)
        sealed = Codec().seal(stranger, b"", koeln_key, mallory.sign)
        deliver(
            box, build_message(stranger, Address("mallory", "m@x"), Address("koeln", "k@x"), sealed)
        )
        misrouted = Header("hq", "berlin", 1)
        sealed = Codec().seal(misrouted, b"", koeln_key, c.host.ring.current.sign)
        deliver(
            box, build_message(misrouted, Address("hq", "h@x"), Address("berlin", "b@x"), sealed)
        )
        c.sync("hq")
        report = c.sync("koeln")["koeln"]
        assert report.set_aside == 3 and len(report.applied) == 1
        assert len(list((box / ".Unrecognized" / "cur").iterdir())) == 3
        assert len(list((box / ".Processed" / "cur").iterdir())) == 1
        assert not list((box / "new").iterdir()) and not list((box / "cur").iterdir())
        with c.engines["koeln"].connect() as conn:
            reasons = (
                conn.execute(select(log_table.c.message).where(log_table.c.event == "rejected"))
                .scalars()
                .all()
            )
        assert any("not a mailsync message" in r for r in reasons)
        assert any("unknown sender 'mallory'" in r for r in reasons)
        assert any("addressed to 'berlin'" in r for r in reasons)
        assert c.agree("customers", nodes=("hq", "koeln"))
        assert "koeln" in {s.peer for s in c.host.status().links}
    finally:
        c.close()
