"""`mailsync sync --station S… --table T…`: one run limited (issue 18,
item 6); the host on SQLite and PostgreSQL. What is left out waits, nothing
is lost, and the sequence stays exactly-once.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import update

from mailsync.errors import ConfigError
from tests.cluster import Cluster, customers, notes


def ids(c: Cluster, node: str) -> list[int]:
    return [r[0] for r in c.rows(node, customers)]


def test_a_run_limited_to_stations_and_tables(tmp_path: Path, db_url: str) -> None:
    c = Cluster(tmp_path, db_url, ("koeln", "berlin"))
    try:
        c.host.add_rule("customers", down="IUD", up="IUD")
        c.host.add_rule("notes", down="IUD", up="IUD")
        c.converge()
        # the operator's mistakes: refused before anything runs
        with pytest.raises(ConfigError, match="--station ghost: no such station"):
            c.host.sync(stations=["ghost"])
        with pytest.raises(ConfigError, match="--table invoices: the table is not synced"):
            c.host.sync(tables=["invoices"])
        with pytest.raises(ConfigError, match="a remote has one link"):
            c.nodes["koeln"].sync(stations=["hq"])
        # stations: only koeln's link this run
        c.execute("hq", customers.insert(), {"id": 1, "name": "a"})
        c.host.sync(stations=["koeln"])
        c.sync("koeln", "berlin")
        assert (ids(c, "koeln"), ids(c, "berlin")) == ([1], [])
        c.converge()
        assert ids(c, "berlin") == [1]
        # tables, down: a notes change logged first waits; customers goes
        c.execute("hq", notes.insert(), {"owner": "hq", "topic": "t", "body": "first"})
        c.execute("hq", update(customers).where(customers.c.id == 1).values(name="b"))
        c.host.sync(tables=["customers"])
        c.sync("koeln")
        assert c.rows("koeln", customers)[0][1] == "b"
        assert c.rows("koeln", notes) == []
        c.converge()
        assert c.agree("customers", "notes")
        # tables, up: a changeset carrying both waits whole, in order
        c.execute("koeln", customers.insert(), {"id": 5, "name": "koeln's"})
        c.execute("koeln", notes.insert(), {"owner": "koeln", "topic": "u", "body": "x"})
        c.sync("koeln")
        c.host.sync(tables=["customers"])
        assert 5 not in ids(c, "hq")
        c.execute("koeln", customers.insert(), {"id": 6, "name": "later"})
        c.nodes["koeln"].sync(tables=["customers"])
        c.host.sync(tables=["customers"])
        assert 5 not in ids(c, "hq") and 6 not in ids(c, "hq")  # #6 waits behind #5
        c.converge()
        c.converge()
        assert ids(c, "hq") == [1, 5, 6]
        assert c.agree("customers", "notes")
        out = c.cli("hq", "sync", "--station", "ghost")
        assert out.returncode == 2 and "no such station" in out.stderr
        assert "Traceback" not in out.stderr
    finally:
        c.close()
