"""Verify's comparison (issue 18, item 1, the part that names the keys).

A host (SQLite or PostgreSQL) and a SQLite station hold the same rows after
syncing — integer keys, a composite text key with upper and lower case and
non-ASCII text, NUMERIC amounts — and digests over key spans say so; rows
changed, deleted and added at the station behind mailsync's back are named
by key, and only those, through several rounds of narrowing.
"""

from __future__ import annotations

import decimal
from pathlib import Path

from sqlalchemy import Engine, update

from mailsync.rules import filter_predicate
from mailsync.store.tables import applying
from mailsync.verify import Difference, Side, Span, canonical, compare
from tests.cluster import Cluster, customers, notes

OWNERS = ("hq", "Hq", "ö", "A")
TOPICS = ["a", "B", "Z", "ä", "Ärger", "z", "é", "10", "9", "", " x"] + [
    f"{w}{i}" for i in range(30) for w in ("Thema ", "thema-", "Über")
]


def behind_the_back(engine: Engine, *statements: object) -> None:
    with engine.begin() as conn:
        conn.execute(applying.insert().values(origin="hq"))
        for stmt in statements:
            conn.execute(stmt)  # type: ignore[call-overload]
        conn.execute(applying.delete())


def test_the_same_rows_compare_equal_and_drift_is_named_by_key(tmp_path: Path, db_url: str) -> None:
    c = Cluster(tmp_path, db_url, ("koeln",))
    try:
        c.host.add_rule("customers", down="IUD", up="IUD")
        c.host.add_rule("notes", down="IUD", up="IUD")
        c.execute(
            "hq",
            customers.insert(),
            [
                {"id": i, "name": f"Kunde {i}", "city": "Köln", "credit": decimal.Decimal("1.50")}
                for i in range(1, 3001)
            ],
        )
        c.execute(
            "hq",
            notes.insert(),
            [{"owner": o, "topic": t, "body": o + t} for o in OWNERS for t in TOPICS],
        )
        c.sync("hq", "koeln")
        for name in ("customers", "notes"):
            with c.engines["hq"].connect() as h, c.engines["koeln"].connect() as k:
                assert compare(Side(h, name), Side(k, name)) == [], name
        behind_the_back(
            c.engines["koeln"],
            update(customers).where(customers.c.id == 1234).values(credit=decimal.Decimal("2")),
            customers.delete().where(customers.c.id == 2999),
            customers.insert().values(id=5000, name="only here"),
            update(notes).where(notes.c.owner == "ö", notes.c.topic == "ä").values(body="x"),
        )
        with c.engines["hq"].connect() as h, c.engines["koeln"].connect() as k:
            found = compare(Side(h, "customers"), Side(k, "customers"))
            assert found == [
                Difference((1234,), True, True),
                Difference((2999,), True, False),
                Difference((5000,), False, True),
            ]
            assert compare(Side(h, "notes"), Side(k, "notes")) == [
                Difference(("ö", "ä"), True, True)
            ]
            # a row filter bounds both sides to the rows in scope
            scope = filter_predicate("id <= 1000 OR city = :station", "Bonn")
            assert compare(Side(h, "customers", scope), Side(k, "customers", scope)) == []
            # 1.5 and 1.50 are one amount on either side
            assert canonical(decimal.Decimal("1.50")) == canonical(decimal.Decimal("1.5"))
    finally:
        c.close()


def test_many_more_rows_on_one_side_are_cut_by_that_side(tmp_path: Path) -> None:
    """The station holds 2,000 rows the host never had: the host cannot cut
    a span it holds nothing of, so the station's side does."""
    c = Cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}", ("koeln",))
    try:
        c.execute("koeln", customers.insert(), [{"id": i, "name": "x"} for i in range(2000)])
        with c.engines["hq"].connect() as h, c.engines["koeln"].connect() as k:
            found = compare(Side(h, "customers"), Side(k, "customers"))
            assert [d.key for d in found] == [(i,) for i in range(2000)]
            assert not any(d.here for d in found)
            here = Side(h, "customers")
            assert here.plan(Span()) and here.digests([Span()])[0].rows == 0
    finally:
        c.close()
