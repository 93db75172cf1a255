"""Nothing a cycle does grows with history (issue 17, item 6).

Every statement the cycles of a host and two stations run — loads, steady
changes both ways, a conflict, a parked row, number ranges, resends, the
purge — is recorded with its parameters and asked of SQLite's query
planner: none may scan a table that grows with history (the change log,
the log, outbox and inbox, horizons, conflicts, parked rows, leases). A
scan there turns a cycle that costs milliseconds on a fresh node into one
that costs seconds after a year of one-minute cycles (the issue measured
the log purge at 171 ms for 720k lines before its index).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event, update

from mailsync.ranges import admin, model
from mailsync.store.tables import now
from tests.cluster import Cluster, customers, orders

#: tables that grow with time or traffic; mailsync_links, _rules, _ranges,
#: _stations, _meta, _peer_keys grow with the fleet's definition only, and
#: a cycle reads them whole by design
GROWING = (
    "mailsync_changes",
    "mailsync_log",
    "mailsync_outbox",
    "mailsync_inbox",
    "mailsync_horizons",
    "mailsync_conflicts",
    "mailsync_parked",
    "mailsync_leases",
    "mailsync_mailbox_seen",
)
_SCAN = re.compile(r"\bSCAN (\w+)(?! USING (?:COVERING )?INDEX)(?! USING INTEGER PRIMARY KEY)")


def _record(engine: Engine, into: list[tuple[str, Any]]) -> None:
    def seen(conn: Any, cursor: Any, sql: str, params: Any, context: Any, many: bool) -> None:
        if many:
            params = params[0] if params else ()
        into.append((sql, params))

    event.listen(engine, "before_cursor_execute", seen)


def _scans(engine: Engine, statements: list[tuple[str, Any]]) -> dict[str, str]:
    """Per statement that scans a growing table, the plan's line."""
    found: dict[str, str] = {}
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        for sql, params in statements:
            head = sql.lstrip().split(None, 1)[0].upper()
            if head not in ("SELECT", "UPDATE", "DELETE", "INSERT", "WITH"):
                continue
            try:
                plan = cursor.execute(f"EXPLAIN QUERY PLAN {sql}", params or ()).fetchall()
            except Exception:
                continue
            for row in plan:
                detail = str(row[-1])
                match = _SCAN.search(detail)
                if match and match.group(1) in GROWING:
                    found[re.sub(r"\s+", " ", sql)[-220:]] = detail
    finally:
        raw.close()
    return found


def test_no_cycle_statement_scans_a_table_that_grows(tmp_path: Path) -> None:
    c = Cluster(
        tmp_path,
        f"sqlite:///{tmp_path / 'hq.db'}",
        node_settings={"resend_after_minutes": 0, "gap_request_minutes": 0},
    )
    statements: dict[str, list[tuple[str, Any]]] = {name: [] for name in c.names}
    try:
        c.host.add_rule("customers", down="IUD", up="IUD")
        c.host.add_rule("orders", down="IUD", up="IUD")
        with c.engines["hq"].begin() as conn:
            spec = model.RangeSpec("order_no", 1000, 99_999, 10, bind="orders.order_no")
            admin.add_range(conn, spec)
        c.execute("hq", customers.insert(), [{"id": i, "name": f"c{i}"} for i in range(1, 40)])
        for name in c.names:
            _record(c.nodes[name].engine, statements[name])
        c.converge()
        c.converge()
        for step in range(3):
            c.execute("koeln", orders.insert(), [{"id": 10 * step + i} for i in range(3)])
            c.execute(
                "berlin", update(customers).where(customers.c.id == 1).values(name=f"b{step}")
            )
            c.execute("hq", update(customers).where(customers.c.id == 1).values(name=f"h{step}"))
            c.execute("hq", customers.delete().where(customers.c.id == 30 + step))
            c.converge()
        c.converge()
        for name in c.names:
            scans = _scans(c.nodes[name].engine, statements[name])
            assert not scans, f"{name}: " + "\n".join(f"{s}\n  -> {p}" for s, p in scans.items())
        assert len(statements["hq"]) > 100  # the cycles ran and were recorded
    finally:
        c.close()


def test_the_parts_of_a_thousand_stations_are_read_without_hitting_sqlites_depth(
    tmp_path: Path,
) -> None:
    """The bench's 1,000-station host failed its cycle: one OR per station
    went past SQLite's expression depth (1,000). The parts are read in
    chunks of stations."""
    from mailsync.cycle.settle import _blobs
    from mailsync.store.engine import open_engine
    from mailsync.store.migrations import ensure_schema
    from mailsync.store.tables import outbox

    engine = open_engine(f"sqlite:///{tmp_path / 'hq.db'}")
    try:
        ensure_schema(engine)
        keys = [(f"s{i:05}", 1, 1) for i in range(1500)]
        with engine.begin() as conn:
            conn.execute(
                outbox.insert(),
                [
                    {
                        "peer": "s01499",
                        "seq": 1,
                        "part": 1,
                        "parts": 1,
                        "blob": b"x",
                        "created_at": now(),
                    }
                ],
            )
            assert _blobs(conn, keys) == {("s01499", 1, 1): b"x"}
    finally:
        engine.dispose()
