"""`mailsync verify [--repair]` by mail (issue 18, item 1).

A host (SQLite or PostgreSQL) and SQLite stations hold the same rows —
NUMERIC amounts, dates, timestamps, booleans, bytes, non-ASCII text —
and a verification says so; rows changed, deleted and added behind
mailsync's back (capture bypassed) on either side are named by key after
rounds of digests carried in sealed changesets, and ``--repair`` sends them
again from the side that owns the direction. Hostile answers (another
station's, one never asked for, a replay, an oversized one, a station that
lies) are refused or bounded; an operator's mistakes change nothing.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select, text, update

from mailsync import verification, verify_answer
from mailsync.errors import ConfigError, MessageError, RuleError
from mailsync.store.tables import applying, log_table, verifications
from mailsync.verification import Verification
from mailsync.verify import FAN_OUT, Side, Span
from mailsync.wire.controls import parse_sequenced
from mailsync.wire.verify_controls import MAX_ASK, MAX_LEAF_ANSWER, VerifyAnswer, VerifyRequest
from tests.cluster import Cluster, chaos_cluster, customers, notes, orders

ROWS = 20_000


def behind_the_back(engine: Engine, *statements: Any, origin: str = "hq") -> None:
    """Writes mailsync does not send (a repair script, a restore of one
    table): SQLite with the apply flag set (as if from ``origin``, so never
    sent there), PostgreSQL with its triggers off for the transaction."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SET LOCAL session_replication_role = replica"))
        else:
            conn.execute(applying.insert().values(origin=origin))
        for stmt in statements:
            conn.execute(stmt)
        if engine.dialect.name != "postgresql":
            conn.execute(applying.delete())


def customer(i: int) -> dict[str, Any]:
    return {
        "id": i,
        "name": f"Kunde {i} Ärger ß 😀",
        "city": ("Köln", "Berlin", None)[i % 3],
        "credit": decimal.Decimal(f"{i % 1000}.{i % 100:02d}"),
        "since": dt.date(2020, 1, 1) + dt.timedelta(days=i % 900),
        "active": i % 2 == 0,
        "touched": dt.datetime(2024, 5, 1, 12, 0, 0) + dt.timedelta(seconds=i * 7),
        "photo": bytes([i % 256, 0, 255]) if i % 5 == 0 else None,
    }


def run_until_finished(
    c: Cluster,
    started: list[Verification],
    nodes: tuple[str, ...] = ("hq", "koeln"),
    cycles: int = 40,
) -> list[Verification]:
    """Sync until every verification has ended (a deadline in cycles)."""
    ids = [v.id for v in started]
    for _ in range(cycles):
        found = c.host.verifications_of(ids)
        if all(v.finished for v in found):
            return found
        c.sync(*nodes)
    raise AssertionError(f"not finished after {cycles} cycles: {c.host.verifications_of(ids)}")


def logged(c: Cluster, node: str = "hq") -> list[tuple[str, str]]:
    with c.engines[node].connect() as conn:
        return [tuple(r) for r in conn.execute(select(log_table.c.event, log_table.c.message))]  # type: ignore[misc]


def test_drift_on_either_side_is_named_and_repaired_by_mail(tmp_path: Path, db_url: str) -> None:
    c = Cluster(tmp_path, db_url, ("koeln",))
    try:
        c.host.add_rule("customers", down="IUD", up="")  # the host's
        c.host.add_rule("orders", down="", up="IUD")  # the station's
        c.host.add_rule("notes", down="IUD", up="IUD")  # both: host-wins
        c.execute("hq", customers.insert(), [customer(i) for i in range(1, ROWS + 1)])
        c.execute(
            "hq",
            notes.insert(),
            [{"owner": "hq", "topic": f"t{i}", "body": "b"} for i in range(50)],
        )
        c.sync("hq", "koeln")
        c.execute("koeln", orders.insert(), [{"id": i, "customer": f"Ö{i}"} for i in range(1, 301)])
        c.sync("koeln", "hq", "koeln", "hq")
        assert c.agree("customers", "orders", "notes", nodes=("hq", "koeln"))

        # equal tables: no false positive, whatever the value types
        equal = run_until_finished(c, c.host.verify("koeln"))
        assert [(v.table, v.state, v.differing) for v in equal] == [
            ("customers", "done", 0),
            ("notes", "done", 0),
            ("orders", "done", 0),
        ]
        assert equal[0].rows_compared == ROWS and equal[2].rows_compared == 300

        # drift behind mailsync's back
        koeln, hq = c.engines["koeln"], c.engines["hq"]
        behind_the_back(
            koeln,
            update(customers).where(customers.c.id == 12345).values(credit=decimal.Decimal("0.01")),
            customers.delete().where(customers.c.id == 777),
            customers.insert().values(id=ROWS + 5, name="only at the station"),
            update(notes).where(notes.c.topic == "t7").values(body="drifted"),
        )
        behind_the_back(
            hq,
            update(orders).where(orders.c.id == 42).values(customer="changed at the host"),
            orders.delete().where(orders.c.id == 43),
            orders.insert().values(id=999, customer="only at the host"),
            origin="koeln",
        )
        found = run_until_finished(c, c.host.verify("koeln"))
        keys = {v.table: [(f.key, f.host, f.station) for f in v.found] for v in found}
        assert keys == {
            "customers": [
                ((777,), True, False),
                ((12345,), True, True),
                ((ROWS + 5,), False, True),
            ],
            "notes": [(("hq", "t7"), True, True)],
            "orders": [((42,), True, True), ((43,), False, True), ((999,), True, False)],
        }
        assert [v.rows_compared for v in found] == [ROWS - 2, 49, 298]
        assert not c.agree("customers", nodes=("hq", "koeln"))  # verify alone changes nothing

        # --repair: each from the side that owns it; then all agree again
        repaired = run_until_finished(c, c.host.verify("koeln", repair=True))
        assert {v.state for v in repaired} == {"repaired"}
        c.sync("hq", "koeln", "hq", "koeln")
        assert c.agree("customers", "orders", "notes", nodes=("hq", "koeln"))
        again = run_until_finished(c, c.host.verify("koeln"))
        assert [(v.state, v.differing) for v in again] == [("done", 0)] * 3

        # results: status, the log
        st = c.host.status()
        assert [(v.table, v.state) for v in st.verifications] == [
            ("customers", "done"),
            ("notes", "done"),
            ("orders", "done"),
        ]
        lines = [m for e, m in logged(c) if e == "verify"]
        assert any("of customers at koeln: 19,998 rows equal, 3 differ: [777]" in m for m in lines)
        assert any("repair: koeln is asked to send them again" in m for m in lines), lines
        assert any("repair: the host sends them again" in m for m in lines)
        assert any(
            "row(s) of orders to send again to hq (repair)" in m for _, m in logged(c, "koeln")
        )
    finally:
        c.close()


def test_a_row_filter_bounds_the_hosts_side_and_extra_rows_are_deleted(tmp_path: Path) -> None:
    c = Cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}", ("koeln",))
    try:
        c.host.add_rule("customers", down="IUD", up="", row_filter="city = 'Köln'")
        c.execute("hq", customers.insert(), [customer(i) for i in range(1, 601)])
        c.sync("hq", "koeln")
        (v,) = run_until_finished(c, c.host.verify("koeln", "customers"))
        assert (v.state, v.rows_compared, v.differing) == ("done", 200, 0)
        # a row outside the filter at the station is one it should not hold
        behind_the_back(c.engines["koeln"], customers.insert().values(customer(2)))
        (v,) = run_until_finished(c, c.host.verify("koeln", "customers", repair=True))
        assert [(f.key, f.host, f.station) for f in v.found] == [((2,), False, True)]
        c.sync("hq", "koeln")
        assert 2 not in [r[0] for r in c.rows("koeln", customers)]
    finally:
        c.close()


def test_lost_duplicated_reordered_mail_and_a_host_restart(tmp_path: Path) -> None:
    c, office = chaos_cluster(tmp_path, seed=18)
    try:
        c.host.add_rule("customers", down="IUD", up="")
        c.execute("hq", customers.insert(), [customer(i) for i in range(1, 3001)])
        for _ in range(6):
            c.converge()
        office.calm()
        c.converge()
        c.converge()
        behind_the_back(c.engines["berlin"], customers.delete().where(customers.c.id == 1500))
        office.chaotic = True
        started = c.host.verify(table="customers", repair=True)
        c.sync("hq")
        c.restart("hq")  # the verification lives in the database
        done = run_until_finished(
            c, started, nodes=("hq", "koeln", "berlin", "muenchen"), cycles=80
        )
        by_station = {v.station: (v.state, [f.key for f in v.found]) for v in done}
        assert by_station == {
            "berlin": ("repaired", [(1500,)]),
            "koeln": ("done", []),
            "muenchen": ("done", []),
        }
        assert office.dropped and office.duplicated and office.delayed
        office.calm()
        for _ in range(4):
            c.converge()
        assert c.agree("customers")
    finally:
        c.close()


def _started(c: Cluster) -> tuple[Verification, dict[str, Any]]:
    (v,) = c.host.verify("koeln", "customers")
    c.sync("hq")  # the first round goes
    with c.engines["hq"].connect() as conn:
        row = conn.execute(select(verifications).where(verifications.c.id == v.id)).one()
    return v, dict(row._mapping)


def _answer(c: Cluster, peer: str, answer: VerifyAnswer) -> list[verification.Note]:
    with c.engines["hq"].begin() as conn:
        return verification.answered(conn, peer, answer)


def test_answers_that_were_not_asked_for_are_refused(tmp_path: Path) -> None:
    c = Cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}", ("koeln", "berlin"))
    try:
        c.host.add_rule("customers", down="IUD", up="")
        c.execute("hq", customers.insert(), [customer(i) for i in range(1, 2001)])
        c.converge()

        def honest(row: dict[str, Any]) -> VerifyAnswer:
            asked = json.loads(row["expect"])
            return VerifyAnswer(row["vid"], "customers", 1, tuple(("d", *e) for *_, e in asked))

        v, row = _started(c)
        # another station answers koeln's verification
        (note,) = _answer(c, "berlin", honest(row))
        assert note[0] == "verify-refused" and "not its own" in note[1]
        # a verification never asked for
        (note,) = _answer(c, "koeln", VerifyAnswer("feedfacecafebeef", "customers", 1, ()))
        assert note[0] == "verify-refused" and "never asked" in note[1]
        # a round not in progress (one ahead, or a replay of an older one)
        (note,) = _answer(c, "koeln", VerifyAnswer(row["vid"], "customers", 7, ()))
        assert "stale or replayed" in note[1]
        assert c.host.verifications_of([v.id])[0].state == "running"  # none of it counted
        # a second verify supersedes the first: the first's answers are refused
        w, row2 = _started(c)
        assert [x.state for x in c.host.verifications_of([v.id, w.id])] == [
            "superseded",
            "running",
        ]
        (note,) = _answer(c, "koeln", honest(row))
        assert "which is superseded" in note[1]
        # the honest answer ends it; the same answer again is a replay
        (note,) = _answer(c, "koeln", honest(row2))
        assert note[1].endswith("2,000 rows equal, 0 differ"), note
        (note,) = _answer(c, "koeln", honest(row2))
        assert "stale or replayed" in note[1]
        # an answer that does not fit what was asked fails the verification
        x, row3 = _started(c)
        (note,) = _answer(
            c, "koeln", VerifyAnswer(row3["vid"], "customers", 1, honest(row3).items[:3])
        )
        assert note[0] == "verify-failed" and "3 item(s) answer 16 asked" in note[1]
        assert c.host.verifications_of([x.id])[0].state == "failed"
    finally:
        c.close()


def test_keys_outside_the_span_and_a_cut_that_does_not_cover_it_are_refused(
    tmp_path: Path,
) -> None:
    c = Cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}", ("koeln",))
    try:
        c.host.add_rule("customers", down="IUD", up="")
        c.execute("hq", customers.insert(), [customer(i) for i in range(1, 31)])
        c.converge()
        _, row = _started(c)
        ((kind, lo, hi, _),) = json.loads(row["expect"])
        assert (kind, lo, hi) == ("r", None, None)  # few rows: hashes at once
        with c.engines["koeln"].connect() as conn:
            theirs = Side(conn, "customers").row_hashes(Span())
        forged = dict(theirs)
        forged[(-5, "x")] = "0" * 32  # a key of the wrong shape
        items = (("r", tuple(forged.items())),)
        (note,) = _answer(c, "koeln", VerifyAnswer(row["vid"], "customers", 1, items))
        assert note[0] == "verify-failed" and "outside the span" in note[1]
        _, row = _started(c)
        gap = (("p", (((None), (10,), 9, "0" * 32), ((11,), None, 20, "0" * 32))),)
        (note,) = _answer(c, "koeln", VerifyAnswer(row["vid"], "customers", 1, gap))
        assert "do not follow each other" in note[1]
    finally:
        c.close()


def test_oversized_or_malformed_controls_do_not_parse() -> None:
    key = [1]
    too_many = {"id": "ab", "table": "t", "round": 1, "items": [["d", 1, "0" * 32]] * (MAX_ASK + 1)}
    many_rows = {
        "id": "ab",
        "table": "t",
        "round": 1,
        "items": [["r", [[[i], "0" * 32] for i in range(MAX_LEAF_ANSWER + 1)]]],
    }
    long_text = {"id": "ab", "table": "t", "round": 1, "items": [["r", [[["x" * 5000], "0" * 32]]]]}
    for payload, words in (
        (too_many, f"items has {MAX_ASK + 1} items"),
        (many_rows, f"row hashes has {MAX_LEAF_ANSWER + 1} items"),
        (long_text, "more than 4,096 characters"),
        ({"id": "ab", "table": "t", "round": 1, "items": [["d", 1, "xyz"]]}, "32 hex digits"),
        ({"id": "ab", "table": "t", "round": True, "items": []}, "round is not a count"),
        ({"id": "ab" * 20, "table": "t", "round": 1}, "id is not a text"),
        ({"id": "ab", "table": "t", "round": 1, "items": [["r", [[{"x": 1}, "0" * 32]]]]}, "a key"),
        ([1, 2], "not a map"),
    ):
        with pytest.raises(MessageError, match=words):
            parse_sequenced("verify", payload)
    with pytest.raises(MessageError, match="ask has"):
        parse_sequenced(
            "verify?", {"id": "ab", "table": "t", "round": 1, "ask": [["d", key, None]] * 300}
        )
    with pytest.raises(MessageError, match=r"\[d\|r, lo, hi\]"):
        parse_sequenced(
            "verify?", {"id": "ab", "table": "t", "round": 1, "ask": [["x", None, None]]}
        )
    request = VerifyRequest("ab", "t", 2, (("d", (1, ("n", "1.5")), None),), ((3,),))
    assert parse_sequenced("verify?", request.payload()) == request


def _liar(seed: int) -> Callable[[Side, VerifyRequest], list[Any]]:
    rng = random.Random(seed)

    def lie(side: Side, request: VerifyRequest) -> list[Any]:
        out: list[Any] = []
        for kind, lo, hi in request.ask:
            if kind == "d":
                out.append(("d", rng.randrange(10**6), f"{rng.getrandbits(128):032x}"))
            else:  # cut every span again, forever
                mid = (rng.randrange(10**9),)
                out.append(("p", ((lo, mid, 1000, "0" * 32), (mid, hi, 1000, "1" * 32))))
        return out

    return lie


def test_a_station_that_lies_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = Cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}", ("koeln",))
    try:
        c.host.add_rule("customers", down="IUD", up="")
        c.execute("hq", customers.insert(), [customer(i) for i in range(1, 3001)])
        c.converge()
        monkeypatch.setattr(verification, "MAX_ROUNDS", 6)
        monkeypatch.setattr(verify_answer, "_answer", _liar(7))
        (v,) = run_until_finished(c, c.host.verify("koeln", repair=True), cycles=30)
        assert v.state == "failed" and v.rounds <= 6
        assert v.error is not None and ("no end after 6 rounds" in v.error or "refused" in v.error)

        # a station whose digests and row hashes are all wrong: every key
        # is named, up to MAX_FOUND; the host's rows stay as they are
        def garbage(side: Side, request: VerifyRequest) -> list[Any]:
            return [
                ("r", tuple((k, "f" * 32) for k, _ in i[1])) if i[0] == "r" else ("d", 1, "f" * 32)
                for i in _honest_answer(side, request)
            ]

        monkeypatch.setattr(verify_answer, "_answer", garbage)
        monkeypatch.setattr(verification, "MAX_FOUND", 100)
        before = c.rows("hq", customers)
        (v,) = run_until_finished(c, c.host.verify("koeln", repair=True), cycles=30)
        assert v.state == "failed" and "more than 100 rows differ" in (v.error or "")
        assert "mailsync reload --station koeln --table customers" in (v.error or "")
        assert c.rows("hq", customers) == before
    finally:
        c.close()


_honest_answer = verify_answer._answer


def test_operator_mistakes_change_nothing(tmp_path: Path) -> None:
    c = Cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}", ("koeln", "berlin"))
    try:
        c.host.add_rule("customers", down="IUD", up="")
        c.host.add_rule("notes", down="IUD", up="", station="berlin")
        for args, error, words in (
            (("ghost", None), RuleError, "no station 'ghost'"),
            (("koeln", "nonesuch"), RuleError, "table 'nonesuch' does not travel to or from koeln"),
            (("koeln", "notes"), RuleError, "table 'notes' does not travel to or from koeln"),
        ):
            with pytest.raises(error, match=words):
                c.host.verify(*args)
        with pytest.raises(ConfigError, match="is a remote"):
            c.nodes["koeln"].verify()
        assert c.host.verifications() == []
        # a held link: its answers would not apply
        from mailsync import link as links_mod

        with c.engines["hq"].begin() as conn:
            links_mod.held(conn, links_mod.one(conn, "berlin"), "changeset #3 is quarantined")
        with pytest.raises(RuleError, match="berlin's link is held"):
            c.host.verify("berlin")
        assert c.host.verifications() == []
        out = c.cli("hq", "verify", "--station", "ghost")
        assert out.returncode == 2 and "no station 'ghost'" in out.stderr
        assert "Traceback" not in out.stderr
        out = c.cli("hq", "verify", "--station", "koeln")
        assert out.returncode == 0, out.stderr
        assert "verification #1 of customers at koeln started" in out.stdout
        assert "mailsync verify --show" in out.stdout
        shown = json.loads(c.cli("hq", "verify", "--show", "--json").stdout)
        assert [(v["station"], v["table"], v["state"]) for v in shown] == [
            ("koeln", "customers", "running")
        ]
        status = c.cli("hq", "status")
        assert "verify koeln customers #1" in status.stdout and "round 1" in status.stdout
    finally:
        c.close()


def test_wait_runs_cycles_until_the_end_or_the_deadline(tmp_path: Path) -> None:
    c = Cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}", ("koeln",))
    try:
        c.host.add_rule("customers", down="IUD", up="")
        c.execute("hq", customers.insert(), [customer(i) for i in range(1, 101)])
        c.converge()
        from mailsync import admin

        ids = [v.id for v in c.host.verify("koeln")]
        slept: list[float] = []
        clock = iter(range(0, 10_000, 10))
        # nobody runs the station: the deadline ends the wait
        found = admin.wait_verified(
            c.host, ids, lambda: c.sync("hq"), 35, 10, sleep=slept.append, clock=lambda: next(clock)
        )
        assert [v.state for v in found] == ["running"] and slept == [10, 10, 5]
        found = admin.wait_verified(
            c.host, ids, lambda: c.sync("koeln", "hq"), 600, 10, sleep=slept.append
        )
        assert [(v.state, v.rows_compared) for v in found] == [("done", 100)]
        assert FAN_OUT == 16  # what the rounds above were cut by
    finally:
        c.close()


def test_a_forged_answer_by_mail_is_refused_and_logged(tmp_path: Path) -> None:
    """berlin (buggy or stolen) sends, sealed and in sequence, an answer to
    koeln's verification: the host refuses it and says so in its log;
    koeln's own answer still counts."""
    c = Cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}", ("koeln", "berlin"))
    try:
        c.host.add_rule("customers", down="IUD", up="")
        c.execute("hq", customers.insert(), [customer(i) for i in range(1, 51)])
        c.converge()
        v, row = _started(c)
        forged = VerifyAnswer(row["vid"], "customers", 1, (("r", ()),))
        from mailsync import link as links_mod

        with c.engines["berlin"].begin() as conn:
            conn.execute(
                verifications.insert().values(
                    vid=row["vid"],
                    side="station",
                    peer="hq",
                    tbl="customers",
                    state="running",
                    started_at=dt.datetime.now(dt.UTC),
                    updated_at=dt.datetime.now(dt.UTC),
                    outgoing=json.dumps([forged.KIND, forged.payload()]),
                )
            )
            links_mod.verify_due(conn, "hq")
        c.sync("berlin", "hq")
        refused = [m for e, m in logged(c) if e == "verify-refused"]
        assert (
            len(refused) == 1
            and "berlin answered the verification of customers at koeln" in refused[0]
        )
        assert c.host.verifications_of([v.id])[0].state == "running"
        (done,) = run_until_finished(c, [v])
        assert (done.state, done.rows_compared, done.differing) == ("done", 50, 0)
    finally:
        c.close()


def test_a_station_without_the_table_says_so(tmp_path: Path) -> None:
    """A station that cannot answer (its table is gone) answers with why;
    the verification fails with it, and the host does not wait."""
    c = Cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}", ("koeln",))
    try:
        c.host.add_rule("customers", down="IUD", up="")
        c.execute("hq", customers.insert(), [customer(i) for i in range(1, 11)])
        c.converge()
        v, row = _started(c)
        request = VerifyRequest(row["vid"], "customers", 1, (("r", None, None),))
        engine = c.engines["koeln"]
        with engine.connect() as conn:
            tx = conn.begin()  # SQLite's DDL rolls back: the table is gone only here
            conn.execute(text("ALTER TABLE customers RENAME TO customers_away"))
            assert verify_answer.asked(conn, "hq", request) == []
            (outgoing,) = conn.execute(select(verifications.c.outgoing)).scalars()
            tx.rollback()
        kind, payload = json.loads(outgoing)
        answer = parse_sequenced(kind, payload)
        assert isinstance(answer, VerifyAnswer) and answer.error is not None
        assert "customers" in answer.error and "does not exist" in answer.error
        # a table the station has but does not sync is nobody's business
        private = VerifyRequest("0123456789abcdef", "orders", 1, (("r", None, None),))
        with engine.begin() as conn:
            verify_answer.asked(conn, "hq", private)
            told = conn.execute(
                select(verifications.c.outgoing).where(verifications.c.tbl == "orders")
            ).scalar_one()
        assert json.loads(told)[1]["error"] == "table 'orders' is not synced here"
        assert json.loads(told)[1]["items"] == []
        (note,) = _answer(c, "koeln", answer)
        assert note[0] == "verify-failed" and "'customers' does not exist" in note[1]
        failed = c.host.verifications_of([v.id])[0]
        assert failed.state == "failed" and (failed.error or "").startswith("koeln cannot answer")
    finally:
        c.close()


def test_who_repairs_follows_the_direction_and_the_policy() -> None:
    from mailsync.rules import Rule

    assert verification.owner(Rule("t", "*", "IUD", "")) == "host"
    assert verification.owner(Rule("t", "*", "", "IU")) == "station"
    assert verification.owner(Rule("t", "*", "IUD", "IUD")) == "host"
    assert verification.owner(Rule("t", "*", "IUD", "IUD", conflict="remote-wins")) == "station"
