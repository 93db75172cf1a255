"""What a cycle asks of its database, counted (issue 17): an idle cycle is
one read transaction and no write, whatever the number of links; a cycle
that carries a changeset commits at most twice per node.

Counts are deterministic (SQLAlchemy's own events, as ``bench/counting.py``
takes them for docs/benchmarks.md); no time is measured here.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event, insert, update

from tests.cluster import Cluster, customers

#: Statements of a cycle that carries 50 changed rows: the host builds for
#: two stations and takes an ack, the station applies and acks (measured
#: 77 and 73 when this was written; the bound keeps the win from rotting
#: without pinning every statement).
HOST_STATEMENTS = 80
STATION_STATEMENTS = 76
#: An idle cycle's reads: a fixed handful, whatever the number of links.
IDLE_STATEMENTS = 16


@dataclass
class Counts:
    statements: int = 0
    writes: int = 0
    transactions: int = 0
    commits: int = 0
    shapes: list[str] = field(default_factory=list)


@contextmanager
def counting(engine: Engine) -> Iterator[Counts]:
    counts = Counts()

    def statement(_c: Any, _cur: Any, sql: str, *_a: Any) -> None:
        if re.match(r"\s*BEGIN\b", sql, re.IGNORECASE):
            return
        counts.statements += 1
        counts.shapes.append(" ".join(sql.split())[:120])
        if sql.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE", "REPLACE")):
            counts.writes += 1

    def begin(_c: Any) -> None:
        counts.transactions += 1

    def commit(_c: Any) -> None:
        counts.commits += 1

    hooks = [("before_cursor_execute", statement), ("begin", begin), ("commit", commit)]
    for name, fn in hooks:
        event.listen(engine, name, fn)
    try:
        yield counts
    finally:
        for name, fn in hooks:
            event.remove(engine, name, fn)


def idle(c: Cluster) -> None:
    for _ in range(6):
        reports = c.sync(*c.names)
        if all(r.received == 0 and r.sent == 0 and not r.errors for r in reports.values()):
            return
    raise AssertionError("the site does not go idle")


def test_an_idle_cycle_is_one_read_and_a_busy_one_two_commits(tmp_path: Path) -> None:
    c = Cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}", ("koeln", "berlin"))
    try:
        c.host.add_rule("customers", down="IUD", up="IUD")
        c.execute("hq", insert(customers), [{"id": i, "name": f"K {i}"} for i in range(1, 101)])
        idle(c)
        for name in c.names:
            with counting(c.nodes[name].engine) as n:
                report = c.nodes[name].sync()
            assert report.quiet, (name, report)
            assert n.writes == 0 and n.commits == 0 and n.transactions == 1, (name, n)
            assert n.statements <= IDLE_STATEMENTS, (name, n.statements, n.shapes)
        for step in range(3):  # the second on: the previous changeset's ack rides along
            c.execute(
                "hq",
                update(customers)
                .where(customers.c.id <= 50)
                .values(name=customers.c.name + str(step)),
            )
            with counting(c.nodes["hq"].engine) as host:
                sent = c.nodes["hq"].sync()
            with counting(c.nodes["koeln"].engine) as station:
                got = c.nodes["koeln"].sync()
            assert not sent.errors and not got.errors
            assert got.rows_applied == 50
            assert host.commits <= 2 and station.commits <= 2, (host, station)
            assert host.statements <= HOST_STATEMENTS, (host.statements, host.shapes)
            assert station.statements <= STATION_STATEMENTS, (station.statements, station.shapes)
        c.sync("berlin")
        idle(c)
        assert c.agree("customers")
    finally:
        c.close()


def test_the_witness_is_checked_by_every_cycle_but_once_after_open(tmp_path: Path) -> None:
    """``Node.open`` confirmed the restore witness: its first cycle does not
    again; every later one does (a database restored under a running
    service is caught by the next cycle, idle or not)."""
    c = Cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}", ("koeln",))
    try:
        idle(c)
        c.restart("hq")
        checked = []
        for _ in range(3):
            with counting(c.nodes["hq"].engine) as n:
                c.nodes["hq"].sync()
            # the witness check's read of its generation (the capture marks'
            # one read per process asks for a single key)
            checked.append(any("FROM mailsync_meta" in s and " IN (" in s for s in n.shapes))
        assert checked == [False, True, True]
    finally:
        c.close()


def test_a_new_process_trusts_the_triggers_found_whole_but_not_a_changed_schema(
    tmp_path: Path,
) -> None:
    """The capture triggers found whole are remembered in the database with
    the schema's fingerprint: a new process (every laptop ``sync``) does
    not read every table's triggers back; a trigger dropped behind its back,
    or a damaged record, makes it check (and repair) again."""
    c = Cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}", ("koeln",))

    def first_cycle_reflects(name: str) -> bool:
        c.restart(name)
        with counting(c.nodes[name].engine) as n:
            report = c.nodes[name].sync()
        assert not report.errors, report.errors
        return any("table_info" in s or "sqlite_master" in s for s in n.shapes)

    def sql(statement: str) -> list[Any]:
        with c.engines["koeln"].begin() as conn:
            result = conn.exec_driver_sql(statement)
            return list(result) if result.returns_rows else []

    def triggers() -> list[str]:
        rows = sql("SELECT name FROM sqlite_master WHERE type = 'trigger' ORDER BY name")
        return [r[0] for r in rows if "customers" in r[0]]

    try:
        c.host.add_rule("customers", down="IUD", up="IUD")
        idle(c)
        whole = triggers()
        assert len(whole) >= 3
        assert not first_cycle_reflects("koeln")
        # hostile: a trigger dropped between two runs (schema fingerprint moves)
        sql(f'DROP TRIGGER "{whole[0]}"')
        assert triggers() != whole
        assert first_cycle_reflects("koeln")
        assert triggers() == whole
        first_cycle_reflects("koeln")  # a repair is checked once more, then trusted
        assert not first_cycle_reflects("koeln")
        # a damaged record is no record: checked again, and written anew
        sql("UPDATE mailsync_meta SET value = '{' WHERE key = 'capture_whole'")
        assert first_cycle_reflects("koeln")
        assert not first_cycle_reflects("koeln")
        # marks another mailsync left (an upgrade that words its triggers
        # otherwise, with no schema change to move the fingerprint)
        sql(
            "UPDATE mailsync_meta SET value = json_set(value, '$.by', 'an-older-one') "
            "WHERE key = 'capture_whole'"
        )
        assert first_cycle_reflects("koeln")
        assert not first_cycle_reflects("koeln")
    finally:
        c.close()
