"""Section 9: PostgreSQL capture triggers (statement-level, transition
tables), inserts and updates of invoice lines with the triggers ÷ without,
on a server started for the run (the test suite's, as in ``pipeline.py``
section 5), at the driver (psycopg), one transaction each.

Two forms, because a statement trigger fires once per statement: a row a
statement (``executemany``, how SQLAlchemy hands the driver a batch), and
one statement for the whole batch (``INSERT … SELECT`` from
``generate_series``; ``UPDATE … WHERE id BETWEEN``), where the trigger runs
once over the whole transition table. The table's foreign keys are dropped
(as ``PRAGMA foreign_keys = OFF`` in the SQLite figure), the rows are the
SQLite figure's.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from pipeline import Figure

from mailsync.capture import ensure_capture
from mailsync.store.engine import open_engine
from mailsync.store.migrations import ensure_schema
from mailsync.tools import samples

ROW = "1, 1, 1, 'x', 1.000, 9.99, 0.00, 9.99, NULL, NULL"
INSERT = "INSERT INTO invoice_lines VALUES (%s, " + ", ".join(["%s"] * 10) + ")"


def _database(server: Any, name: str, triggers: bool) -> str:
    server.drop_database(name)
    server.create_database(name)
    engine = open_engine(server.url(name))
    samples.create_schema(engine)
    ensure_schema(engine)
    with engine.begin() as conn:
        for (fk,) in conn.exec_driver_sql(
            "SELECT conname FROM pg_constraint "
            "WHERE conrelid = 'invoice_lines'::regclass AND contype = 'f'"
        ).all():
            conn.exec_driver_sql(f'ALTER TABLE invoice_lines DROP CONSTRAINT "{fk}"')
        if triggers:
            ensure_capture(conn, ["invoice_lines"])
    engine.dispose()
    return str(server.dsn(name))


def _one(dsn: str, rows: int, what: str, form: str) -> tuple[float, int]:
    """Seconds for the timed statement(s) and their commit, and the change-log
    rows they made."""
    import psycopg

    data = [(i, 1, 1, 1, "x", "1.000", "9.99", "0.00", "9.99", None, None) for i in range(rows)]
    with psycopg.connect(dsn) as conn:
        conn.execute("TRUNCATE invoice_lines, mailsync_changes")
        if what == "update":
            conn.execute(
                f"INSERT INTO invoice_lines SELECT g, {ROW} FROM generate_series(0, %s) g",
                (rows - 1,),
            )
        conn.commit()
        t0 = time.perf_counter()
        with conn.cursor() as cur:
            if what == "insert" and form == "executemany":
                cur.executemany(INSERT, data)
            elif what == "insert":
                cur.execute(
                    f"INSERT INTO invoice_lines SELECT g, {ROW} FROM generate_series(0, %s) g",
                    (rows - 1,),
                )
            elif form == "executemany":
                cur.executemany(
                    "UPDATE invoice_lines SET quantity = quantity + 1 WHERE id = %s",
                    [(i,) for i in range(rows)],
                )
            else:
                cur.execute(
                    "UPDATE invoice_lines SET quantity = quantity + 1 WHERE id BETWEEN 0 AND %s",
                    (rows - 1,),
                )
        conn.commit()
        seconds = time.perf_counter() - t0
        row = conn.execute("SELECT count(*) FROM mailsync_changes").fetchone()
        captured = row[0] if row else 0
    return seconds, captured


def pg_capture(rows: int, runs: int) -> str:
    sys.path.insert(0, str(Path(__file__).parent.parent))
    from tests.servers.postgres import PostgresServer, find_bindir

    title = "### 9. Capture triggers on PostgreSQL (statement triggers, transition tables)"
    if find_bindir() is None:
        return f"{title}\n\nskipped: no PostgreSQL here\n"
    out = [
        title,
        "",
        f"{rows:,} invoice lines inserted, then updated by primary key, one transaction, "
        "psycopg; time with the capture triggers ÷ without, runs interleaved, median of "
        f"{runs} (min–max). Goal (issue 17): ≤ 1.5.",
        "",
        "| form | insert | update |",
        "|---|---|---|",
    ]
    with PostgresServer() as server:
        dsn = {t: _database(server, f"bench_capture_{int(t)}", t) for t in (True, False)}
        for form, label in (
            ("executemany", "a statement a row (`executemany`)"),
            ("batch", "one statement for all rows"),
        ):
            cells = []
            for what in ("insert", "update"):
                ratios = []
                for _ in range(runs):
                    with_t, captured = _one(dsn[True], rows, what, form)
                    without, none = _one(dsn[False], rows, what, form)
                    if captured < rows or none:
                        raise SystemExit(f"capture: {captured} and {none} for {rows} rows")
                    ratios.append(with_t / without)
                cells.append(Figure(ratios).show("{:.2f}"))
            out.append(f"| {label} | {cells[0]} | {cells[1]} |")
        for t in (True, False):
            server.drop_database(f"bench_capture_{int(t)}")
    return "\n".join(out) + "\n"
