"""`station disable|enable S`, and a station told by mail that it was
disabled or removed (issue 18, item 4); the host on SQLite and PostgreSQL.

A disabled station gets nothing; what it sends is held on the host, not
refused, and applied in order once it is enabled again. It is told, its
`status` shows it, and its `sync` says so with exit code 2. A removed
station is told too (the notice sealed before its key was forgotten); its
later mail is set aside and said in the host's log once.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from mailsync.errors import ConfigError, MessageError, RuleError
from mailsync.store.tables import log_table
from mailsync.wire.station_controls import (
    RequestServed,
    StationStanding,
    TablesWanted,
    parse_sequenced,
    parse_unsequenced,
)
from tests.cluster import Cluster, customers


def ids(c: Cluster, node: str) -> list[int]:
    return [r[0] for r in c.rows(node, customers)]


def lines(c: Cluster, node: str, event: str) -> list[str]:
    with c.engines[node].connect() as conn:
        found = conn.execute(select(log_table.c.message).where(log_table.c.event == event))
        return [str(m) for m in found.scalars()]


def test_a_disabled_station_gets_nothing_and_what_it_sends_waits_for_enable(
    tmp_path: Path, db_url: str
) -> None:
    c = Cluster(tmp_path, db_url, ("koeln", "berlin"))
    try:
        c.host.add_rule("customers", down="IUD", up="IUD")
        c.execute("hq", customers.insert(), {"id": 1, "name": "first"})
        c.converge()
        c.host.disable_station("koeln")
        # the operator's mistakes change nothing
        with pytest.raises(RuleError, match="disabled already"):
            c.host.disable_station("koeln")
        with pytest.raises(RuleError, match="no station 'ghost'"):
            c.host.disable_station("ghost")
        with pytest.raises(RuleError, match="berlin is not disabled"):
            c.host.enable_station("berlin")
        with pytest.raises(ConfigError, match="on the host"):
            c.nodes["koeln"].disable_station("koeln")
        c.execute("hq", customers.insert(), {"id": 2, "name": "from hq"})
        c.execute("koeln", customers.insert(), {"id": 10, "name": "koeln's own"})
        c.converge()
        c.converge()
        assert ids(c, "berlin") == [1, 2]  # the others go on
        assert ids(c, "koeln") == [1, 10]  # nothing reached koeln
        assert 10 not in ids(c, "hq")  # held, not applied
        assert not lines(c, "hq", "refused")  # and not refused
        link = next(x for x in c.host.status().links if x.peer == "koeln")
        assert link.disabled_since is not None and link.buffered == 1
        shown = c.cli("hq", "status").stdout
        assert "station koeln disabled" in shown and "1 changeset(s) of its held" in shown
        listed = c.cli("hq", "station", "list").stdout
        assert "disabled since" in listed
        # koeln was told, once, and says so
        report = c.nodes["koeln"].sync()
        assert report.exit_code == 2
        assert any("hq disabled this station" in e for e in report.errors), report.errors
        told = c.nodes["koeln"].status().standing
        assert told is not None and "disabled" in told
        assert len(lines(c, "koeln", "standing")) == 1
        # enabled: what it sent is applied, what waited for it goes
        c.host.enable_station("koeln")
        c.converge()
        c.converge()
        assert ids(c, "hq") == [1, 2, 10]
        assert c.agree("customers")
        assert c.nodes["koeln"].status().standing is None
        assert c.nodes["koeln"].sync().exit_code == 0
        assert c.host.status().links[1].disabled_since is None
    finally:
        c.close()


def test_a_removed_station_is_told_and_its_later_mail_is_said_once(
    tmp_path: Path, db_url: str
) -> None:
    c = Cluster(tmp_path, db_url, ("koeln", "berlin"))
    try:
        c.host.add_rule("customers", down="IUD", up="IUD")
        c.converge()
        c.host.remove_station("berlin")  # its key goes with it: the notice is sealed now
        c.execute("berlin", customers.insert(), {"id": 20, "name": "too late"})
        c.sync("berlin")  # its mail reaches a host that forgot it
        first = c.host.sync()
        assert first.set_aside == 1
        report = c.nodes["berlin"].sync()  # the notice arrives
        assert report.exit_code == 2
        assert any("hq removed this station" in e for e in report.errors), report.errors
        c.execute("berlin", customers.insert(), {"id": 21, "name": "later still"})
        c.nodes["berlin"].sync()  # it sent what it had built in that cycle
        assert c.host.sync().set_aside == 0  # set aside quietly
        said = [m for m in lines(c, "hq", "rejected") if "removed on this host" in m]
        assert len(said) == 1, said
        assert 20 not in ids(c, "hq") and 21 not in ids(c, "hq")
        # from now on the station stops at once, and says why
        again = c.nodes["berlin"].sync()
        assert again.exit_code == 2 and again.received == 0 and again.sent == 0
        told = c.nodes["berlin"].status().standing
        assert told is not None and "removed" in told
        # koeln is untouched
        c.execute("hq", customers.insert(), {"id": 3, "name": "for koeln"})
        c.converge()
        assert 3 in ids(c, "koeln")
        # the cli: one line, exit 2, no traceback
        out = c.cli("berlin", "sync")
        assert out.returncode == 2, out
        assert "removed this station" in out.stdout + out.stderr
        assert "Traceback" not in out.stderr
        twice = c.cli("hq", "station", "disable", "koeln")
        assert twice.returncode == 0, twice
        again_out = c.cli("hq", "station", "disable", "koeln")
        assert again_out.returncode == 2 and "disabled already" in again_out.stderr
        assert "Traceback" not in again_out.stderr
    finally:
        c.close()


def test_the_notices_parse_strictly_and_only_from_the_side_that_sends_them() -> None:
    told = StationStanding("disabled", "2026-11-29T10:00:00+00:00")
    assert parse_unsequenced(told.KIND, told.payload(), from_host=True) == told
    # a station cannot tell the host anything of its standing, nor the host ask for tables
    assert parse_unsequenced(told.KIND, told.payload(), from_host=False) is None
    asked = TablesWanted("abc", ("customers",), "2026-11-01T00:00:00+00:00", "touched")
    assert parse_unsequenced(asked.KIND, asked.payload(), from_host=False) == asked
    assert parse_unsequenced(asked.KIND, asked.payload(), from_host=True) is None
    assert parse_sequenced("served", RequestServed("abc").payload()) == RequestServed("abc")
    for kind, payload, from_host in (
        ("standing", {"state": "promoted", "at": "x"}, True),
        ("standing", ["disabled"], True),
        ("tables?", {"id": "x" * 33, "tables": []}, False),
        ("tables?", {"id": "r", "tables": "customers"}, False),
        ("tables?", {"id": "r", "tables": [1]}, False),
        ("tables?", {"id": "r", "tables": ["t"] * 10_001}, False),
        ("tables?", {"id": "r", "tables": ["t"], "since": 5}, False),
    ):
        with pytest.raises(MessageError, match="malformed"):
            parse_unsequenced(kind, payload, from_host=from_host)
    with pytest.raises(MessageError, match="malformed"):
        parse_sequenced("served", 42)
