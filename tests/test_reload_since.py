"""`mailsync reload --station S [--table T] [--since DATE | --full]` and a
station's own request (issue 18, item 2); the host on SQLite and PostgreSQL.

`--since` resends the rows in scope whose timestamp column is at or after
DATE (the change log keeps no time); a station asks for a reload itself,
and the host acts on each request once, only for tables the station's rules
send it — a request or a reload that arrives twice changes nothing more.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from sqlalchemy import Engine, select, update

from mailsync.errors import ConfigError, RuleError
from mailsync.link import one
from mailsync.since import parse_since
from mailsync.store.tables import applying, log_table
from mailsync.table_requests import check_options, honour
from mailsync.wire.station_controls import TablesWanted
from tests.cluster import DOMAIN, Cluster, customers, notes

OLD = dt.datetime(2026, 1, 5, 9, 0)
NEW = dt.datetime(2026, 6, 1, 12, 0)


def logged(c: Cluster, node: str, event: str) -> list[str]:
    with c.engines[node].connect() as conn:
        found = conn.execute(select(log_table.c.message).where(log_table.c.event == event))
        return [str(m) for m in found.scalars()]


def drift(engine: Engine, *keys: int) -> None:
    """Edits behind mailsync's back on a station (capture bypassed)."""
    with engine.begin() as conn:
        conn.execute(applying.insert().values(origin="hq"))
        for key in keys:
            conn.execute(update(customers).where(customers.c.id == key).values(name="drifted"))
        conn.execute(applying.delete())


def names(c: Cluster, node: str) -> dict[int, str]:
    return {r[0]: r[1] for r in c.rows(node, customers)}


def seeded(tmp_path: Path, db_url: str) -> Cluster:
    c = Cluster(tmp_path, db_url, ("koeln", "berlin"))
    c.host.add_rule("customers", down="IUD", up="IUD")
    c.host.add_rule("notes", down="IUD", up="none")
    rows = [{"id": i, "name": f"c{i}", "touched": OLD if i <= 3 else NEW} for i in range(1, 6)]
    c.execute("hq", customers.insert(), rows)
    c.execute("hq", notes.insert(), {"owner": "hq", "topic": "t", "body": "b"})
    c.converge()
    return c


def test_since_resends_only_rows_changed_since_the_date(tmp_path: Path, db_url: str) -> None:
    c = seeded(tmp_path, db_url)
    try:
        drift(c.engines["koeln"], 1, 4)
        since = parse_since("2026-03-01")
        assert c.host.reload_station("koeln", ["customers"], since=since) == ["customers"]
        c.converge()
        got = names(c, "koeln")
        assert got[4] == "c4"  # changed since: sent again, the host's
        assert got[1] == "drifted"  # older: not sent (that is what --full is for)
        assert any("changed since 2026-03-01" in m for m in logged(c, "hq", "reload"))
        # once served, nothing more goes: the next cycles are quiet for it
        drift(c.engines["koeln"], 4)
        c.converge()
        assert names(c, "koeln")[4] == "drifted"
        c.host.reload_station("koeln", ["customers"])  # in full
        c.converge()
        c.converge()
        assert c.agree("customers")
    finally:
        c.close()


def test_the_operators_mistakes_are_refused_and_change_nothing(tmp_path: Path) -> None:
    c = seeded(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}")
    try:
        since = parse_since("2026-03-01")
        with pytest.raises(ConfigError, match="'yesterday' is not a date"):
            parse_since("yesterday")
        with pytest.raises(ConfigError, match="in the future"):
            parse_since("2999-01-01")
        with pytest.raises(ConfigError, match="exclude each other"):
            check_options("2026-03-01", True)
        with pytest.raises(RuleError, match="no timestamp column"):
            c.host.reload_station("koeln", ["notes"], since=since)
        with pytest.raises(RuleError, match="has no column 'nope'"):
            c.host.reload_station("koeln", ["customers"], since=since, column="nope")
        with pytest.raises(RuleError, match="not a date or time"):
            c.host.reload_station("koeln", ["customers"], since=since, column="name")
        with pytest.raises(RuleError, match="no station 'ghost'"):
            c.host.reload_station("ghost", ["customers"], since=since)
        assert not logged(c, "hq", "reload")
        for args, words in (
            (("--station", "koeln", "--since", "yesterday"), "'yesterday' is not a date"),
            (("--station", "koeln", "--since", "2026-01-01", "--full"), "exclude each other"),
            (("--station", "koeln", "--column", "touched"), "--column goes with --since"),
            (("--table", "customers"), "name the station"),
        ):
            out = c.cli("hq", "reload", *args)
            assert out.returncode == 2, (args, out)
            assert words in out.stderr, (args, out.stderr)
            assert "Traceback" not in out.stderr
        ok = c.cli(
            "hq", "reload", "--station", "koeln", "--table", "customers", "--since", "2026-03-01"
        )
        assert ok.returncode == 0, ok
        assert "changed since 2026-03-01" in ok.stdout
        # a station asks for rows changed since a date: the host acts on it
        c.nodes["koeln"].request_reload(["customers"], since=since)
        c.sync("koeln", "hq")
        acted = [m for m in logged(c, "hq", "reload") if "asked by the station" in m]
        assert len(acted) == 1 and "changed since 2026-03-01" in acted[0], acted
        # a station asks only for what its rules bring it
        with pytest.raises(RuleError, match="does not come from host hq"):
            c.nodes["koeln"].request_reload(["invoices"])
        out = c.cli("koeln", "reload", "--table", "customers", "--since", "nonsense")
        assert out.returncode == 2 and "is not a date" in out.stderr
    finally:
        c.close()


def test_a_station_asks_for_a_reload_and_the_host_acts_once(tmp_path: Path, db_url: str) -> None:
    c = seeded(tmp_path, db_url)
    office = c.office
    assert office is not None
    try:
        drift(c.engines["koeln"], 1, 2)
        host, tables = c.nodes["koeln"].request_reload(["customers"])
        assert (host, tables) == ("hq", ["customers"])
        assert "customers" in (c.nodes["koeln"].status().reload_asked or "")
        c.sync("koeln")  # the request goes
        box = office.boxes[f"hq@{DOMAIN}"]
        first = list(box.values())
        box.clear()
        c.execute("hq", customers.insert(), {"id": 7, "name": "new", "touched": NEW})
        c.sync("hq")
        for raw in first:  # the request arrives late, after ...
            office.deliver(f"hq@{DOMAIN}", raw)
        c.sync("koeln")  # ... koeln acked #7: the same request again, in a new message
        for raw in first:  # and a plain copy of the first
            office.deliver(f"hq@{DOMAIN}", raw)
        c.sync("hq")
        acted = [m for m in logged(c, "hq", "reload") if "asked by the station" in m]
        assert len(acted) == 1, acted
        assert any("acted on already" in m for m in logged(c, "hq", "reload-request"))
        # the reload, delivered twice, applies once
        koeln_box = office.boxes[f"koeln@{DOMAIN}"]
        for raw in list(koeln_box.values()):
            office.deliver(f"koeln@{DOMAIN}", raw)
        c.sync("koeln")
        c.converge()
        assert c.agree("customers")
        assert names(c, "koeln")[1] == "c1"
        assert c.nodes["koeln"].status().reload_asked is None
        assert any("was acted on" in m for m in logged(c, "koeln", "reload"))
    finally:
        c.close()


def test_the_host_refuses_a_request_for_tables_the_rules_do_not_send(tmp_path: Path) -> None:
    c = seeded(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}")
    try:
        c.host.add_rule("notes", station="koeln", down="none", up="none")
        with c.engines["hq"].begin() as conn:
            link = one(conn, "koeln")
            honour(c.host.journal, conn, link, TablesWanted("r1", ("notes", "invoices")))
        refused = logged(c, "hq", "reload-refused")
        assert len(refused) == 1 and "notes" in refused[0] and "invoices" in refused[0]
        assert not [m for m in logged(c, "hq", "reload") if "asked by the station" in m]
    finally:
        c.close()
