"""Row filters that keep their scope (issue 18, item 3); the host on SQLite
and PostgreSQL.

A filter is any predicate over the table's own columns (`:station`,
`:email` optional), checked when the rule is defined; a row that leaves a
station's filter is deleted there (where the rule sends deletes); changing
the filter prunes what left and loads what entered. The way up is bounded
too (tests/test_rules_enforced.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select, update

from mailsync.errors import RuleError
from mailsync.store.tables import log_table
from tests.cluster import Cluster, customers


def ids(c: Cluster, node: str) -> list[int]:
    return [r[0] for r in c.rows(node, customers)]


def test_a_filter_is_checked_when_the_rule_is_defined(tmp_path: Path) -> None:
    c = Cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}", ("koeln",))
    try:
        for row_filter, words in (
            ("city = 'Bonn'; DROP TABLE customers", "holds ';'"),
            ("id IN (SELECT customer_id FROM invoices)", "subquery"),
            ("contry = 'DE'", "does not work: no such column: contry"),
            ("city = :region", "names :region"),
            ("   ", "is empty"),
        ):
            with pytest.raises(RuleError, match=words):
                c.host.add_rule("customers", down="IUD", up="none", row_filter=row_filter)
        assert c.host.rules() == []
        # no :station needed; quoted text may hold anything
        c.host.add_rule("customers", down="IUD", up="none", row_filter="city = 'a;b select'")
        c.host.add_rule("customers", down="IUD", up="none", row_filter="city <> 'at 10:30'")
        c.host.add_rule("customers", down="IUD", up="none", row_filter="name <> :email")
        out = c.cli("hq", "table", "add", "customers", "--filter", "nope = 1")
        assert out.returncode == 2, out
        assert "row filter for table 'customers' does not work" in out.stderr
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) <= 2
    finally:
        c.close()


def test_a_row_leaving_a_stations_filter_is_deleted_there(tmp_path: Path, db_url: str) -> None:
    c = Cluster(tmp_path, db_url, ("koeln", "berlin"))
    try:
        c.host.add_rule("customers", down="IUD", up="IUD", row_filter="city = :station")
        c.execute(
            "hq",
            customers.insert(),
            [
                {"id": 1, "name": "a", "city": "koeln"},
                {"id": 2, "name": "b", "city": "berlin"},
                {"id": 3, "name": "c", "city": "koeln"},
            ],
        )
        c.converge()
        assert (ids(c, "koeln"), ids(c, "berlin")) == ([1, 3], [2])
        c.execute("hq", update(customers).where(customers.c.id == 1).values(city="berlin"))
        c.converge()
        assert (ids(c, "koeln"), ids(c, "berlin")) == ([3], [1, 2])
        # the filter changes: what left goes, what entered comes
        notes = c.host.add_rule("customers", down="IUD", up="IUD", row_filter="id >= 2")[1]
        assert any("koeln gets customers again in full" in n for n in notes), notes
        c.converge()
        c.converge()
        assert ids(c, "koeln") == [2, 3]
        assert ids(c, "berlin") == [2, 3]
        # a station's own filter, for one station only
        c.host.add_rule("customers", station="koeln", down="IUD", up="IUD", row_filter="id = 3")
        c.converge()
        c.converge()
        assert (ids(c, "koeln"), ids(c, "berlin")) == ([3], [2, 3])
    finally:
        c.close()


def test_without_deletes_a_row_that_left_stays_and_the_log_says_so(
    tmp_path: Path, db_url: str
) -> None:
    c = Cluster(tmp_path, db_url, ("koeln",))
    try:
        c.host.add_rule("customers", down="IU", up="none", row_filter="city = :station")
        c.execute("hq", customers.insert(), {"id": 1, "name": "a", "city": "koeln"})
        c.converge()
        c.execute("hq", update(customers).where(customers.c.id == 1).values(city="bonn"))
        c.converge()
        assert ids(c, "koeln") == [1]
        with c.engines["hq"].connect() as conn:
            said = conn.execute(
                select(log_table.c.message).where(log_table.c.event == "scope")
            ).scalars()
            assert any("sends no deletes" in m for m in said)
    finally:
        c.close()
