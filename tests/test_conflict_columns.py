"""Conflicts column by column, every policy, both nodes told (issue 18, item 5).

The host on SQLite and on PostgreSQL (``db_url``), a station on SQLite. Two
orders of events: the changesets cross in the mail (both sides detect the
conflict), or the station's arrives before the host builds (only the host
can detect it: the station hears of it by the host's note).
"""

from __future__ import annotations

import datetime as dt
import json
import random
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, func, select, update

from mailsync.conflicts import Conflict, list_conflicts
from mailsync.errors import RuleError
from mailsync.store.tables import changes, log_table
from mailsync.transport.memory import MemoryPostOffice
from tests.cluster import Cluster, chaos_cluster, customers
from tests.test_conflicts import HoldingOffice
from tests.test_delivery import settled

POLICIES = ["host-wins", "remote-wins", "newest-by-column", "newest-by-capture", "manual"]


def row(c: Cluster, node: str, key: int) -> dict[str, Any] | None:
    with c.engines[node].connect() as conn:
        found = conn.execute(select(customers).where(customers.c.id == key)).first()
    return None if found is None else dict(found._mapping)


def conflicts(c: Cluster, node: str) -> list[Conflict]:
    with c.engines[node].connect() as conn:
        return list_conflicts(conn)


def logged(c: Cluster, node: str, event: str) -> list[str]:
    with c.engines[node].connect() as conn:
        return list(
            conn.execute(select(log_table.c.message).where(log_table.c.event == event)).scalars()
        )


def cluster(tmp_path: Path, db_url: str, policy: str, office: MemoryPostOffice) -> Cluster:
    c = Cluster(tmp_path, db_url, ("koeln",), office=office)
    conflict = "newest-wins" if policy.startswith("newest") else policy
    by = "touched" if policy == "newest-by-column" else None
    c.host.add_rule("customers", down="IUD", up="IUD", conflict=conflict, newest_by=by)
    start = dt.datetime(2026, 1, 1, 12, 0)
    c.execute(
        "hq",
        customers.insert(),
        [
            {
                "id": i,
                "name": f"c{i}",
                "city": "Bonn",
                "credit": Decimal("100.00"),
                "touched": start,
            }
            for i in (1, 2, 3)
        ],
    )
    c.sync("hq", "koeln", "hq", "koeln")
    assert c.agree("customers")
    return c


def both_edit(c: Cluster, office: HoldingOffice, crossing: bool, host: Any, station: Any) -> None:
    """The host, then the station, edit before either hears of the other;
    then mail flows until both are quiet."""
    if crossing:
        office.holding = True
        c.execute("hq", host)
        later(c, "koeln", station)
        c.sync("hq", "koeln")  # both build and send; neither hears of the other
        office.release()
    else:
        c.execute("hq", host)
        later(c, "koeln", station)
        c.sync("koeln")  # the station's change reaches the host before it builds
    c.sync("hq", "koeln", "hq", "koeln", "hq", "koeln")


def later(c: Cluster, node: str, stmt: Any) -> None:
    """Run ``stmt`` once the clock has moved past the last capture time (ms)."""
    deadline = time.monotonic() + 5
    with c.engines["hq"].connect() as conn:
        last = conn.execute(select(func.max(changes.c.at))).scalar() or 0
    while time.time() * 1000 <= last + 2:
        assert time.monotonic() < deadline, "the clock did not move"
    c.execute(node, stmt)


@pytest.mark.parametrize("crossing", [True, False], ids=["crossing", "in-turn"])
def test_different_columns_are_both_kept(tmp_path: Path, db_url: str, crossing: bool) -> None:
    """The host raises the credit limit while the rep changes the city (the
    phone number of the issue): both edits survive on both nodes, and
    neither records a conflict."""
    office = HoldingOffice()
    c = cluster(tmp_path, db_url, "host-wins", office)
    try:
        both_edit(
            c,
            office,
            crossing,
            update(customers).where(customers.c.id == 1).values(credit=Decimal("5000.00")),
            update(customers).where(customers.c.id == 1).values(city="Köln"),
        )
        assert c.agree("customers"), (c.rows("hq", customers), c.rows("koeln", customers))
        one = row(c, "hq", 1)
        assert one is not None and one["credit"] == Decimal("5000.00") and one["city"] == "Köln"
        assert conflicts(c, "hq") == [] and conflicts(c, "koeln") == []
    finally:
        c.close()


def winner(policy: str) -> str:
    """Whose city stays when both change it (the station's edit is later
    and its time column says so)."""
    return "hq" if policy in ("host-wins", "manual") else "koeln"


@pytest.mark.parametrize("crossing", [True, False], ids=["crossing", "in-turn"])
@pytest.mark.parametrize("policy", POLICIES)
def test_the_same_column_on_both_sides(
    tmp_path: Path, db_url: str, policy: str, crossing: bool
) -> None:
    office = HoldingOffice()
    c = cluster(tmp_path, db_url, policy, office)
    try:
        t0 = dt.datetime(2026, 1, 2, 9, 0)
        both_edit(
            c,
            office,
            crossing,
            update(customers)
            .where(customers.c.id == 1)
            .values(city="HQ", credit=Decimal("7.00"), touched=t0),
            update(customers)
            .where(customers.c.id == 1)
            .values(city="Köln", touched=t0 + dt.timedelta(hours=1)),
        )
        won = winner(policy)
        cities = {"hq": "HQ", "koeln": "Köln"}
        for node in ("hq", "koeln"):
            got = row(c, node, 1)
            assert got is not None
            assert got["credit"] == Decimal("7.00")  # only the host changed it: kept
            if policy == "manual":  # each keeps its own until an admin decides
                assert got["city"] == cities["hq" if node == "hq" or not crossing else node]
            else:
                assert got["city"] == cities[won], (node, got)
        if policy != "manual":
            assert c.agree("customers")
        # recorded once on each node; the side that lost knows it lost
        for node, other in (("hq", "koeln"), ("koeln", "hq")):
            (found,) = conflicts(c, node)
            assert found.peer == other and found.key == [1] and found.differing
            assert "city" in found.differing and "credit" not in found.differing
            ours = dict(zip(found.columns, found.ours or [], strict=True))
            theirs = dict(zip(found.columns, found.theirs or [], strict=True))
            assert ours["city"] == cities[node] and theirs["city"] == cities[other]
            if policy == "manual":
                assert found.state == "waiting" and found.kept == "ours"
            else:
                assert found.state == "settled"
                assert found.kept == ("ours" if won == node else "theirs")
        if policy == "manual":
            assert "1 conflict(s) waiting" in c.cli("koeln", "status").stdout
    finally:
        c.close()


@pytest.mark.parametrize("keep", ["host", "station"])
@pytest.mark.parametrize("crossing", [True, False], ids=["crossing", "in-turn"])
def test_manual_waits_then_the_admin_decides(
    tmp_path: Path, db_url: str, crossing: bool, keep: str
) -> None:
    office = HoldingOffice()
    c = cluster(tmp_path, db_url, "manual", office)
    try:
        both_edit(
            c,
            office,
            crossing,
            update(customers).where(customers.c.id == 1).values(city="HQ"),
            update(customers).where(customers.c.id == 1).values(city="Köln", name="Rep's name"),
        )
        # the column only the station changed is in already; the city waits
        assert row(c, "hq", 1)["name"] == "Rep's name"  # type: ignore[index]
        listed = json.loads(c.cli("hq", "conflicts", "list", "--waiting", "--json").stdout)
        (waiting,) = listed
        assert "1 conflict(s) waiting" in c.cli("hq", "status").stdout

        done = c.cli("hq", "conflicts", "resolve", str(waiting["id"]), "--keep", keep)
        assert done.returncode == 0, done.stderr
        c.sync("hq", "koeln", "hq", "koeln")
        assert c.agree("customers"), (c.rows("hq", customers), c.rows("koeln", customers))
        expected = "HQ" if keep == "host" else "Köln"
        assert row(c, "koeln", 1)["city"] == expected  # type: ignore[index]
        assert row(c, "hq", 1)["name"] == "Rep's name"  # type: ignore[index]
        for node in ("hq", "koeln"):
            (found,) = conflicts(c, node)
            assert found.state == "resolved"
            assert found.kept == ("ours" if (keep == "host") == (node == "hq") else "theirs")
            assert "waiting" not in c.cli(node, "status").stdout

        if not crossing or keep != "host":
            return
        # the operator's mistakes: twice, an unknown id, on the station, a bad --keep
        again = c.cli("hq", "conflicts", "resolve", str(waiting["id"]), "--keep", keep)
        assert again.returncode == 2 and "not waiting" in again.stderr
        assert "Traceback" not in again.stderr
        unknown = c.cli("hq", "conflicts", "resolve", "999", "--keep", "host")
        assert unknown.returncode == 2 and "no conflict 999" in unknown.stderr
        (at_station,) = conflicts(c, "koeln")
        wrong = c.cli("koeln", "conflicts", "resolve", str(at_station.id), "--keep", "station")
        assert wrong.returncode == 2 and "decided on the host" in wrong.stderr
        bad = c.cli("hq", "conflicts", "resolve", str(waiting["id"]), "--keep", "both")
        assert bad.returncode == 2 and "Traceback" not in bad.stderr
        assert c.agree("customers")
    finally:
        c.close()


@pytest.mark.parametrize("policy", ["host-wins", "remote-wins", "manual"])
def test_a_delete_against_an_update(tmp_path: Path, db_url: str, policy: str) -> None:
    office = HoldingOffice()
    c = cluster(tmp_path, db_url, policy, office)
    try:
        both_edit(
            c,
            office,
            True,
            delete(customers).where(customers.c.id == 2),
            update(customers).where(customers.c.id == 2).values(city="Köln"),
        )
        for node in ("hq", "koeln"):
            (found,) = conflicts(c, node)
            assert (found.ours is None) == (node == "hq")
            assert (found.theirs is None) == (node == "koeln")
        if policy == "manual":
            assert row(c, "hq", 2) is None and row(c, "koeln", 2) is not None
            (waiting,) = conflicts(c, "hq")
            done = c.cli("hq", "conflicts", "resolve", str(waiting.id), "--keep", "station")
            assert done.returncode == 0, done.stderr
            c.sync("hq", "koeln", "hq", "koeln")
        assert c.agree("customers")
        kept = policy != "host-wins"
        assert (row(c, "hq", 2) is not None) == kept
    finally:
        c.close()


def test_newest_wins_trusts_the_time_column(tmp_path: Path, db_url: str) -> None:
    """A station that writes a time far in the future wins every conflict on
    that row, by design: the column is the rule. The host's version is kept
    in the record, so nothing is lost and the admin sees it."""
    office = HoldingOffice()
    c = cluster(tmp_path, db_url, "newest-by-column", office)
    try:
        both_edit(
            c,
            office,
            False,
            update(customers)
            .where(customers.c.id == 3)
            .values(city="HQ", touched=dt.datetime(2026, 6, 1)),
            update(customers)
            .where(customers.c.id == 3)
            .values(city="forged", touched=dt.datetime(2099, 1, 1)),
        )
        assert c.agree("customers") and row(c, "hq", 3)["city"] == "forged"  # type: ignore[index]
        (found,) = conflicts(c, "hq")
        assert found.kept == "theirs" and found.policy == "newest-wins"
        assert dict(zip(found.columns, found.ours or [], strict=True))["city"] == "HQ"
    finally:
        c.close()


def test_a_local_edit_the_rules_never_send_is_logged(tmp_path: Path, db_url: str) -> None:
    """The station may not send updates up: its edit is overwritten by the
    host's next change — said in its log, once, and no conflict."""
    c = Cluster(tmp_path, db_url, ("koeln",))
    try:
        c.host.add_rule("customers", down="IUD", up="insert")
        c.execute("hq", customers.insert(), [{"id": 1, "name": "c1", "city": "Bonn"}])
        c.sync("hq", "koeln")
        c.execute("koeln", update(customers).where(customers.c.id == 1).values(city="Köln"))
        c.execute("hq", update(customers).where(customers.c.id == 1).values(city="HQ"))
        c.sync("koeln", "hq", "koeln", "hq", "koeln")
        assert row(c, "koeln", 1)["city"] == "HQ"  # type: ignore[index]
        (line,) = logged(c, "koeln", "overwritten")
        assert "customers row [1]" in line and "do not send U of customers up" in line
        assert conflicts(c, "koeln") == [] and conflicts(c, "hq") == []
        assert "1 local edit(s) overwritten" in c.cli("koeln", "status").stdout
    finally:
        c.close()


def test_an_older_peer_without_column_information(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A changeset without the per-row record (an older station) counts as
    every column changed: the columns only it changed still apply, the
    host's own edit of another column is kept (a conflict on it, by value)."""
    import mailsync.build

    office = HoldingOffice()
    c = cluster(tmp_path, db_url, "host-wins", office)
    try:
        monkeypatch.setattr(mailsync.build, "KIND", "x-not-known")  # the receiver ignores it
        both_edit(
            c,
            office,
            False,
            update(customers).where(customers.c.id == 1).values(credit=Decimal("9.00")),
            update(customers).where(customers.c.id == 1).values(city="Köln"),
        )
        assert c.agree("customers")
        one = row(c, "hq", 1)
        assert one is not None and one["credit"] == Decimal("9.00") and one["city"] == "Köln"
    finally:
        c.close()


def test_policy_options_are_checked(tmp_path: Path) -> None:
    c = Cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}", ("koeln",))
    try:
        for policy in ("newest-wins", "manual", "remote-wins"):
            c.host.add_rule("customers", down="IUD", up="IUD", conflict=policy)
        with pytest.raises(RuleError, match="is not one of"):
            c.host.add_rule("customers", down="IUD", up="IUD", conflict="coin-toss")
        with pytest.raises(RuleError, match="no column 'stamp'"):
            c.host.add_rule(
                "customers", down="IUD", up="IUD", conflict="newest-wins", newest_by="stamp"
            )
        with pytest.raises(RuleError, match="goes with the newest-wins"):
            c.host.add_rule("customers", down="IUD", up="IUD", newest_by="touched")
        shown = c.cli(
            "hq",
            "table",
            "add",
            "customers",
            "--up",
            "all",
            "--conflict",
            "newest-wins",
            "--newest-by",
            "touched",
        )
        assert shown.returncode == 0 and "newest-wins by touched" in shown.stdout
    finally:
        c.close()


def test_chaos_converges_with_conflicts_on_both_sides(tmp_path: Path) -> None:
    """Loss, duplicates, delay and reordering; every node edits shared rows,
    some columns its own, one column everyone's: all end equal, the own
    columns all survive, and every conflict a station has with the host is
    recorded on both."""
    c, office = chaos_cluster(tmp_path, 7)
    try:
        c.execute("hq", customers.insert(), [{"id": i, "name": f"s{i}"} for i in range(1, 6)])
        c.host.add_rule("customers", down="IUD", up="IUD")
        office.chaotic = False
        c.sync(*c.names, *c.names)
        office.chaotic = True
        rng = random.Random(7)
        own = {"hq": "credit", "koeln": "since", "berlin": "active", "muenchen": "photo"}
        last: dict[tuple[str, int], Any] = {}
        for step in range(10):
            for name in c.names:
                key = rng.randint(1, 5)
                value: Any = {
                    "credit": Decimal(step * 10 + 1),
                    "since": dt.date(2020, 1, 1) + dt.timedelta(days=step),
                    "active": step % 2 == 0,
                    "photo": bytes([step]),
                }[own[name]]
                c.execute(
                    name,
                    update(customers)
                    .where(customers.c.id == key)
                    .values({own[name]: value, "city": f"{name}-{step}"}),
                )
                last[own[name], key] = value
            for name in rng.sample(c.names, len(c.names)):
                assert not c.nodes[name].sync().errors
        assert office.dropped and office.duplicated and office.delayed
        office.calm()
        for _ in range(12):
            if settled(c):
                break
            c.sync(*c.names)
        assert settled(c), "did not converge"
        for (column, key), value in last.items():
            got = row(c, "hq", key)
            assert got is not None and got[column] == value, (column, key)
        for station in c.names[1:]:
            at_host = {(x.table, tuple(x.key)) for x in conflicts(c, "hq") if x.peer == station}
            at_station = {(x.table, tuple(x.key)) for x in conflicts(c, station)}
            assert at_host == at_station, station
    finally:
        c.close()


def test_capture_logs_the_changed_columns(tmp_path: Path, db_url: str) -> None:
    """Both dialects' triggers: an update's bits name the columns whose value
    changed, with a capture time; a key moved is a delete and an update of
    every column; a row touched without a change is logged as every column."""
    c = Cluster(tmp_path, db_url, ("koeln",))
    try:
        c.host.add_rule("customers", down="IUD", up="IUD")
        c.execute("hq", customers.insert(), [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}])
        with c.engines["hq"].connect() as conn:
            start = conn.execute(select(func.max(changes.c.id))).scalar()
        before = int(time.time() * 1000) - 1000
        c.execute("hq", update(customers).where(customers.c.id == 1).values(city="X"))
        c.execute("hq", update(customers).where(customers.c.id == 2).values(id=3))
        c.execute("hq", update(customers).where(customers.c.id == 1).values(city="X"))
        with c.engines["hq"].connect() as conn:
            logged = conn.execute(
                select(changes.c.pk, changes.c.op, changes.c.cols, changes.c.at)
                .where(changes.c.id > start)
                .order_by(changes.c.id)
            ).all()
        columns = [col.name for col in customers.columns]
        city = 1 << columns.index("city")
        assert [(json.loads(pk), op, cols) for pk, op, cols, _ in logged] == [
            ([1], "U", city),
            *sorted([([2], "D", None), ([3], "U", None)], key=lambda r: r[1]),
            ([1], "U", 0),
        ]
        assert all(at is not None and at >= before for *_, at in logged)
    finally:
        c.close()


def test_hostile_notes(tmp_path: Path) -> None:
    """A station cannot decide a conflict by note (only the host decides),
    and a malformed note is refused, never recorded."""
    from mailsync.conflict_notes import received
    from mailsync.errors import MessageError
    from mailsync.store.engine import open_engine
    from mailsync.store.migrations import ensure_schema
    from mailsync.store.tables import conflicts_table

    engine = open_engine(f"sqlite:///{tmp_path / 'hq.db'}")
    ensure_schema(engine)
    decision = {
        "k": "resolved",
        "tbl": "customers",
        "pk": "[1]",
        "keep": "station",
        "columns": [],
        "differing": [],
        "row": None,
    }
    with engine.begin() as conn:
        (line,) = received(conn, "koeln", 5, [decision], from_host=False)
        assert "ignored: the host decides" in line
        for bad in ([{"k": "found", "seq": "5"}], [{"k": "launch"}], {"k": "found"}):
            with pytest.raises(MessageError):
                received(conn, "koeln", 5, bad, from_host=False)
        assert conn.execute(select(func.count()).select_from(conflicts_table)).scalar() == 0
    engine.dispose()
