"""Throughput, wire size and capture cost, each against a floor measured in
the same run on the same machine (issue 8, sections 1-3).

1. Initial load, host → station over a ``maildir:`` post office: rows/s end
   to end (the host's build+send and the station's receive+apply, each in its
   own process), against the same rows inserted into a fresh SQLite file by
   the stdlib ``sqlite3`` ``executemany`` in one transaction (the apply-side
   floor); peak RSS of each node.
2. Steady state: changesets of 50 changed invoice lines, host → station:
   changesets/s and rows/s, against the same updates made by ``executemany``
   with one commit per changeset; and the capture triggers' cost (inserts and
   updates with triggers vs. without).
3. Wire size: bytes in the mailbox per row, against the same rows as CSV
   compressed with zstd at level 19 (ratio above 1: we send more).
4. Real mail (Postfix and Dovecot): messages/s against a raw send-and-fetch.
5. The host's database on PostgreSQL: the same load against the same rows
   moved at the databases' own speed (``COPY … TO STDOUT`` into a fresh
   SQLite file by ``executemany``, :func:`floor_copy`), and the steady state.

Every figure is the median of ``--runs`` runs with min–max.

    python bench/pipeline.py [--quick] [--runs 3] [--output docs/benchmarks.md]
                             [--invoices N] [--changesets N] [--no-mail] [--no-postgresql]

``--invoices`` and ``--changesets`` size a reduced run (side-by-side ratios
while working on a change; the published figures come from a full run).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zstandard
from sqlalchemy import select, update

sys.path.insert(0, str(Path(__file__).parent))
from streaming_memory import run_child, setup

from mailsync.capture import ensure_capture
from mailsync.node import Node
from mailsync.tools import samples

FULL = {
    "invoices": 333_334,
    "changesets": 1000,
    "capture_rows": 100_000,
    "mail_changesets": 200,
}
QUICK = {"invoices": 2_000, "changesets": 20, "capture_rows": 5_000, "mail_changesets": 5}
ROWS_PER_CHANGESET = 50


class Figure:
    """Several measurements of one quantity: median, min and max."""

    def __init__(self, values: list[float]) -> None:
        self.values = values

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def show(self, fmt: str = "{:,.0f}") -> str:
        if len(self.values) == 1:
            return fmt.format(self.median)
        return (
            f"{fmt.format(self.median)} ({fmt.format(min(self.values))}–"
            f"{fmt.format(max(self.values))})"
        )


def repeat(runs: int, measure: Callable[[], float]) -> Figure:
    return Figure([measure() for _ in range(runs)])


def mailbox_bytes(box: Path) -> tuple[int, int]:
    """Messages and bytes in a Maildir, processed ones included."""
    files = [p for p in box.rglob("*") if p.is_file() and p.parent.name in ("new", "cur")]
    return len(files), sum(p.stat().st_size for p in files)


# ------------------------------------------------------------- 1. initial load


class Site:
    """A host with the sample data and one station, restorable between runs."""

    def __init__(self, root: Path, invoices: int) -> None:
        self.root = root
        self.counts = setup(root, invoices, 10_000_000)
        # enrolled, with rules, nothing built yet: every run starts from here
        for name in ("hq", "koeln"):
            shutil.copy(root / f"{name}.db", root / f"{name}.template.db")
        self.keep_witnesses()
        self.rows = sum(self.counts.values())

    def keep_witnesses(self) -> None:
        """Each node's restore witness goes back with its database: a run
        starts from a copy, not from a database restored behind its witness."""
        for name in ("hq", "koeln"):
            witness = self.config(name).with_suffix(".witness")
            shutil.copy(witness, witness.with_suffix(".witness-template"))

    def put_witnesses_back(self) -> None:
        for name in ("hq", "koeln"):
            witness = self.config(name).with_suffix(".witness")
            shutil.copy(witness.with_suffix(".witness-template"), witness)

    def reset(self) -> None:
        for name in ("hq", "koeln"):
            shutil.copy(self.root / f"{name}.template.db", self.root / f"{name}.db")
        self.put_witnesses_back()
        shutil.rmtree(self.root / "mail", ignore_errors=True)

    def config(self, name: str) -> Path:
        return self.root / name / "mailsync.toml"


class PostgresSite(Site):
    """The same, with the host's database on PostgreSQL (reset from a template)."""

    def __init__(self, root: Path, invoices: int, server: Any) -> None:
        self.root = root
        self.server = server
        for name in ("bench_hq", "bench_hq_template"):
            server.drop_database(name)
        server.create_database("bench_hq")
        self.counts = setup(root, invoices, 10_000_000, host_url=server.url("bench_hq"))
        shutil.copy(root / "koeln.db", root / "koeln.template.db")
        server.create_database("bench_hq_template", template="bench_hq")
        self.keep_witnesses()
        self.rows = sum(self.counts.values())

    def reset(self) -> None:
        shutil.copy(self.root / "koeln.template.db", self.root / "koeln.db")
        self.put_witnesses_back()
        shutil.rmtree(self.root / "mail", ignore_errors=True)
        self.server.drop_database("bench_hq")
        self.server.create_database("bench_hq", template="bench_hq_template")


def floor_insert(source: Path, target: Path) -> float:
    """Seconds to insert every sample row into a fresh SQLite file with
    ``executemany`` in one transaction, rows streamed from the host's file."""
    target.unlink(missing_ok=True)
    from mailsync.store.engine import open_engine

    engine = open_engine(f"sqlite:///{target}")
    samples.create_schema(engine)
    engine.dispose()
    src = sqlite3.connect(source)
    dst = sqlite3.connect(target, isolation_level=None)
    t0 = time.perf_counter()
    dst.execute("BEGIN")
    for table in samples.TABLES:
        cols = [r[1] for r in src.execute(f"PRAGMA table_info({table})")]
        marks = ", ".join("?" * len(cols))
        rows = src.execute(f"SELECT {', '.join(cols)} FROM {table}")
        dst.executemany(f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({marks})", rows)
    dst.execute("COMMIT")
    seconds = time.perf_counter() - t0
    src.close()
    dst.close()
    return seconds


def floor_copy(dsn: str, target: Path) -> float:
    """Seconds to move every sample row from the PostgreSQL host's database
    into a fresh SQLite file at the databases' own speed: ``COPY … TO
    STDOUT`` read by psycopg (text rows, no type conversion), inserted with
    ``executemany`` in one transaction — the PostgreSQL counterpart of
    :func:`floor_insert`."""
    import psycopg

    target.unlink(missing_ok=True)
    from mailsync.store.engine import open_engine

    engine = open_engine(f"sqlite:///{target}")
    samples.create_schema(engine)
    engine.dispose()
    dst = sqlite3.connect(target, isolation_level=None)
    t0 = time.perf_counter()
    with psycopg.connect(dsn) as src, src.cursor() as cur:
        dst.execute("BEGIN")
        for table in samples.TABLES:
            cols = [r[1] for r in dst.execute(f"PRAGMA table_info({table})")]
            names, marks = ", ".join(cols), ", ".join("?" * len(cols))
            with cur.copy(f"COPY {table} ({names}) TO STDOUT") as copy:
                dst.executemany(f"INSERT INTO {table} ({names}) VALUES ({marks})", copy.rows())
        dst.execute("COMMIT")
    seconds = time.perf_counter() - t0
    dst.close()
    return seconds


def initial_load(site: Site, runs: int, floor: Figure | None = None) -> dict[str, object]:
    times: list[float] = []
    host_rss: list[float] = []
    station_rss: list[float] = []
    wire: list[float] = []
    for _ in range(runs):
        site.reset()
        host = run_child(site.config("hq"))
        station = run_child(site.config("koeln"))
        if station["rows_applied"] != site.rows:
            raise SystemExit(f"applied {station['rows_applied']} of {site.rows} rows")
        times.append(float(host["seconds"]) + float(station["seconds"]))  # type: ignore[arg-type]
        host_rss.append(int(host["peak"]) / 2**20)  # type: ignore[call-overload]
        station_rss.append(int(station["peak"]) / 2**20)  # type: ignore[call-overload]
        wire.append(mailbox_bytes(site.root / "mail" / "koeln@bench.test")[1])
    if floor is None:
        seconds = repeat(
            runs, lambda: floor_insert(site.root / "hq.template.db", site.root / "floor.db")
        )
        floor = Figure([site.rows / t for t in seconds.values])
    ours = Figure([site.rows / t for t in times])
    base = floor
    return {
        "rows": site.rows,
        "counts": site.counts,
        "ours": ours,
        "floor": base,
        "ratio": ours.median / base.median,
        "host_rss": Figure(host_rss),
        "station_rss": Figure(station_rss),
        "wire": Figure(wire),
    }


# ------------------------------------------------------------- 2. steady state


def _changed_lines(engine: object, step: int) -> list[int]:
    first = 1 + (step * ROWS_PER_CHANGESET) % 900_000
    return list(range(first, first + ROWS_PER_CHANGESET))


def steady_state(site: Site, changesets: int, runs: int) -> dict[str, object]:
    lines = samples.metadata.tables["invoice_lines"]
    rates: list[float] = []
    wire_per_row: list[float] = []
    csv_per_row: list[float] = []
    site.reset()
    run_child(site.config("hq"))  # the initial load once; the runs follow one another
    run_child(site.config("koeln"))
    for run in range(runs):
        with Node.open(site.config("hq")) as hq, Node.open(site.config("koeln")) as koeln:
            hq.sync()  # the station's ack
            box = site.root / "mail" / "koeln@bench.test"
            before = mailbox_bytes(box)[1]
            csv_bytes = 0
            cctx = zstandard.ZstdCompressor(level=19)
            total = 0.0
            for step in range(run * changesets, (run + 1) * changesets):
                ids = _changed_lines(hq.engine, step)
                with hq.engine.begin() as conn:
                    conn.execute(
                        update(lines)
                        .where(lines.c.id.in_(ids))
                        .values(quantity=lines.c.quantity + 1)
                    )
                    rows = conn.execute(select(lines).where(lines.c.id.in_(ids))).all()
                buf = io.StringIO()
                csv.writer(buf).writerows(rows)
                csv_bytes += len(cctx.compress(buf.getvalue().encode()))
                t0 = time.perf_counter()
                hq.sync()
                report = koeln.sync()
                total += time.perf_counter() - t0
                if report.rows_applied != ROWS_PER_CHANGESET or report.errors:
                    _explain(koeln, step, report)
            hq.sync()
            sent = mailbox_bytes(box)[1] - before
        rates.append(changesets / total)
        wire_per_row.append(sent / (changesets * ROWS_PER_CHANGESET))
        csv_per_row.append(csv_bytes / (changesets * ROWS_PER_CHANGESET))
    floor = repeat(runs, lambda: floor_updates(site.root / "koeln.db", changesets))
    ours = Figure(rates)
    base = Figure([changesets / s for s in floor.values])
    return {
        "changesets": changesets,
        "ours": ours,
        "rows": Figure([r * ROWS_PER_CHANGESET for r in rates]),
        "floor": base,
        "ratio": ours.median / base.median,
        "wire_per_row": Figure(wire_per_row),
        "csv_per_row": Figure(csv_per_row),
        "wire_ratio": statistics.median(wire_per_row) / statistics.median(csv_per_row),
    }


def _explain(node: Node, step: int, report: Any) -> None:
    """A changeset that did not apply whole: say why (parked rows, errors)."""
    from mailsync.apply import list_parked

    with node.engine.connect() as conn:
        parked = list_parked(conn)
    print(
        f"changeset {step}: {report.rows_applied} rows applied, {report.rows_parked} parked, "
        f"errors {report.errors}; parked: {[(p.table, p.op, p.error) for p in parked[:5]]}",
        file=sys.stderr,
        flush=True,
    )
    raise SystemExit(f"changeset {step} did not apply whole (see above)")


def floor_updates(database: Path, changesets: int) -> float:
    """The same updates, ``executemany`` with a commit per changeset."""
    work = database.with_name("floor-steady.db")
    shutil.copy(database, work)
    conn = sqlite3.connect(work, isolation_level=None)
    conn.executescript(
        "DROP TRIGGER IF EXISTS mailsync_invoice_lines_ai;"
        "DROP TRIGGER IF EXISTS mailsync_invoice_lines_au;"
        "DROP TRIGGER IF EXISTS mailsync_invoice_lines_ad;"
    )
    t0 = time.perf_counter()
    for step in range(changesets):
        ids = _changed_lines(None, step)
        conn.execute("BEGIN")
        conn.executemany(
            "UPDATE invoice_lines SET quantity = quantity + 1 WHERE id = ?", [(i,) for i in ids]
        )
        conn.execute("COMMIT")
    seconds = time.perf_counter() - t0
    conn.close()
    work.unlink()
    return seconds


def capture_cost(root: Path, rows: int, runs: int) -> dict[str, Figure]:
    """Inserts and updates of invoice lines, with the capture triggers vs. without."""
    from mailsync.store.engine import open_engine
    from mailsync.store.migrations import ensure_schema

    def one(triggers: bool | None, what: str) -> float:
        """``triggers`` None: no trigger, and the application writes one
        change-log row per row itself — the floor of row-level capture."""
        path = root / "capture.db"
        path.unlink(missing_ok=True)
        engine = open_engine(f"sqlite:///{path}")
        samples.create_schema(engine)
        ensure_schema(engine)
        if triggers:
            with engine.begin() as conn:
                ensure_capture(conn, ["invoice_lines"])
        engine.dispose()
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA foreign_keys = OFF")
        data = [
            (i, 1, 1, 1, "x", "1.000", "9.99", "0.00", "9.99", None, None)
            for i in range(1, rows + 1)
        ]
        insert = "INSERT INTO invoice_lines VALUES (?,?,?,?,?,?,?,?,?,?,?)"
        if what == "update":
            conn.execute("BEGIN")
            conn.executemany(insert, data)
            conn.execute("COMMIT")
        t0 = time.perf_counter()
        conn.execute("BEGIN")
        if what == "insert":
            conn.executemany(insert, data)
        else:
            conn.executemany(
                "UPDATE invoice_lines SET quantity = quantity + 1 WHERE id = ?",
                [(i,) for i in range(1, rows + 1)],
            )
        if triggers is None:  # the log rows the triggers would write, by hand
            conn.executemany(
                "INSERT INTO mailsync_changes(tbl, pk, op, origin) VALUES (?, ?, ?, NULL)",
                [("invoice_lines", f"[{i}]", what[0].upper()) for i in range(1, rows + 1)],
            )
        conn.execute("COMMIT")
        seconds = time.perf_counter() - t0
        conn.close()
        return seconds

    out = {}
    for what in ("insert", "update"):
        with_t = repeat(runs, lambda w=what: one(True, w))  # type: ignore[misc]
        without = repeat(runs, lambda w=what: one(False, w))  # type: ignore[misc]
        by_hand = repeat(runs, lambda w=what: one(None, w))  # type: ignore[misc]
        out[what] = Figure([a / b for a, b in zip(with_t.values, without.values, strict=True)])
        out[what + " floor"] = Figure(
            [a / b for a, b in zip(by_hand.values, without.values, strict=True)]
        )
    return out


# ------------------------------------------------------------------- report


def markdown(load: dict[str, object], steady: dict[str, object], cap: dict[str, Figure]) -> str:
    f = lambda key, src: src[key]  # noqa: E731
    counts = load["counts"]
    assert isinstance(counts, dict)
    lines = [
        "### 1. Initial load, host → station over Maildir",
        "",
        f"{load['rows']:,} rows ({', '.join(f'{n:,} {t}' for t, n in counts.items())}).",
        "",
        "| figure | mailsync | floor: sqlite3 executemany, one transaction | ratio |",
        "|---|---|---|---|",
        f"| rows/s end to end | {f('ours', load).show()} | {f('floor', load).show()} | "
        f"{load['ratio']:.2f} |",
        f"| peak RSS host / station, MiB | {f('host_rss', load).show()} / "
        f"{f('station_rss', load).show()} | | |",
        f"| bytes in the mailbox | {f('wire', load).show()} | | |",
        "",
        "### 2. Steady state: changesets of 50 changed invoice lines",
        "",
        f"{steady['changesets']:,} changesets, each: update on the host, host cycle "
        "(build, seal, send), station cycle (receive, open, apply).",
        "",
        "| figure | mailsync | floor: executemany, a commit per changeset | ratio |",
        "|---|---|---|---|",
        f"| changesets/s | {f('ours', steady).show('{:,.1f}')} | "
        f"{f('floor', steady).show('{:,.1f}')} | {steady['ratio']:.4f} |",
        f"| rows/s | {f('rows', steady).show()} | | |",
        "",
        "| capture triggers (SQLite) | time with triggers ÷ without | floor: the "
        "application writes the same change-log rows itself ÷ without |",
        "|---|---|---|",
        f"| insert | {cap['insert'].show('{:.2f}')} | {cap['insert floor'].show('{:.2f}')} |",
        f"| update | {cap['update'].show('{:.2f}')} | {cap['update floor'].show('{:.2f}')} |",
        "",
        "Row-level capture writes one change-log row per row written: the floor "
        "column is that second write without any trigger, so a ratio under it "
        "would need capture that logs less than a row per row.",
        "",
        "### 3. Wire size per changed row",
        "",
        "| bytes per row | mailsync (sealed, base64, mail headers) | CSV + zstd -19 | ratio |",
        "|---|---|---|---|",
        f"| steady state, 50 rows a changeset | {f('wire_per_row', steady).show('{:,.1f}')} | "
        f"{f('csv_per_row', steady).show('{:,.1f}')} | {steady['wire_ratio']:.2f} |",
    ]
    return "\n".join(lines) + "\n"


def _mail_site(root: Path, servers: Any, receive: str) -> tuple[Node, Node]:
    """hq and koeln over the real servers: SMTP submission with STARTTLS, and
    koeln reading by ``receive`` (imaps or pop3s)."""
    import os

    from mailsync.node import init_node
    from mailsync.store.engine import open_engine
    from tests.servers.mail import DOMAIN, password_of

    nodes = {}
    for name, role in (("hq", "host"), ("koeln", "remote")):
        url = f"sqlite:///{root / (name + '.db')}"
        engine = open_engine(url)
        samples.create_schema(engine)
        if name == "hq":
            samples.generate(engine, customers=200, invoices=5000)  # ~15,000 lines
        engine.dispose()
        path = root / name / "mailsync.toml"
        init_node(
            path,
            role=role,  # type: ignore[arg-type]
            node_id=name,
            database=url,
            address=f"{name}@{DOMAIN}",
            mail="maildir:unused",
        )
        scheme = "imaps" if name == "hq" else receive
        user = f"{name}%40{DOMAIN}"
        os.environ[f"BENCH_PW_{name.upper()}"] = password_of(name)
        box = (
            "[mailbox]\n"
            f'address = "{name}@{DOMAIN}"\n'
            f'send = "smtp+starttls://{user}@localhost:{servers.ports["smtp"]}"\n'
            f'receive = "{scheme}://{user}@localhost:{servers.ports[scheme]}"\n'
            f'password_env = "BENCH_PW_{name.upper()}"\n'
            f'ca_file = "{servers.cert}"\n'
        )
        path.write_text(path.read_text().split("[mailbox]")[0] + box)
        nodes[name] = Node.open(path)
    hq, koeln = nodes["hq"], nodes["koeln"]
    _, bundle = hq.add_station("koeln", f"koeln@{DOMAIN}", key=koeln.public_key)
    koeln.join(bundle)
    for table in samples.TABLES:
        hq.add_rule(table, down="IUD", up="")
    return hq, koeln


def _until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.01)


def _mail_run(root: Path, servers: Any, receive: str, changesets: int) -> tuple[float, float]:
    """Seconds of host cycles and of station cycles for ``changesets``
    changesets of 50 rows, each sent, delivered and received on its own
    (waiting for the delivery is not counted)."""
    lines = samples.metadata.tables["invoice_lines"]
    hq, koeln = _mail_site(root, servers, receive)
    try:
        hq.sync()  # the initial load
        servers.wait_delivered()
        _until(lambda: koeln.sync().rows_applied > 0, "the initial load")
        hq.sync()
        host = station = 0.0
        for step in range(changesets):
            ids = _changed_lines(None, step)
            with hq.engine.begin() as conn:
                conn.execute(
                    update(lines).where(lines.c.id.in_(ids)).values(quantity=lines.c.quantity + 1)
                )
            t0 = time.perf_counter()
            report = hq.sync()
            host += time.perf_counter() - t0
            if report.errors:
                raise SystemExit(f"host cycle: {report.errors}")
            servers.wait_delivered()
            _until(lambda: servers.count("koeln") > 0, "delivery")
            t0 = time.perf_counter()
            got = koeln.sync()
            station += time.perf_counter() - t0
            if got.errors or got.rows_applied != ROWS_PER_CHANGESET:
                _explain(koeln, step, got)
        return host, station
    finally:
        hq.close()
        koeln.close()


def _raw_messages(servers: Any, count: int) -> list[bytes]:
    """What hq sent koeln (kept in its Processed folder), for the baseline."""
    import ssl

    import imapclient

    from tests.servers.mail import DOMAIN, password_of

    context = ssl.create_default_context(cafile=str(servers.cert))
    with imapclient.IMAPClient(
        "localhost", port=servers.ports["imaps"], ssl=True, ssl_context=context
    ) as client:
        client.login(f"koeln@{DOMAIN}", password_of("koeln"))
        client.select_folder("Processed", readonly=True)
        uids = client.search(["FROM", f"hq@{DOMAIN}"])[-count:]
        fetched = client.fetch(uids, ["RFC822"])
        return [fetched[u][b"RFC822"] for u in uids]


def _baseline(servers: Any, raws: list[bytes], receive: str) -> float:
    """Seconds to send each message with aiosmtplib (a connection each, as a
    cycle does) and fetch and delete it with imapclient or poplib."""
    import asyncio
    import poplib
    import ssl

    import aiosmtplib
    import imapclient

    from tests.servers.mail import DOMAIN, password_of

    context = ssl.create_default_context(cafile=str(servers.cert))
    user, password = f"koeln@{DOMAIN}", password_of("koeln")

    async def send(raw: bytes) -> None:
        smtp = aiosmtplib.SMTP(
            hostname="localhost", port=servers.ports["smtp"], start_tls=True, tls_context=context
        )
        await smtp.connect()
        await smtp.login(f"hq@{DOMAIN}", password_of("hq"))
        await smtp.sendmail(f"hq@{DOMAIN}", [user], raw)
        await smtp.quit()

    def fetch() -> None:
        if receive == "imaps":
            with imapclient.IMAPClient(
                "localhost", port=servers.ports["imaps"], ssl=True, ssl_context=context
            ) as client:
                client.login(user, password)
                client.select_folder("INBOX")
                uids = client.search(["ALL"])
                client.fetch(uids, ["RFC822"])
                client.delete_messages(uids)
                client.uid_expunge(uids)
        else:
            pop = poplib.POP3_SSL("localhost", servers.ports["pop3s"], context=context)
            pop.user(user)
            pop.pass_(password)
            for number in range(1, len(pop.list()[1]) + 1):
                pop.uidl(number)
                pop.retr(number)
                pop.dele(number)
            pop.quit()

    total = 0.0
    for raw in raws:
        t0 = time.perf_counter()
        asyncio.run(send(raw))
        total += time.perf_counter() - t0
        servers.wait_delivered()
        _until(lambda: servers.count("koeln") > 0, "delivery")
        t0 = time.perf_counter()
        fetch()
        total += time.perf_counter() - t0
    return total


def real_mail(changesets: int, runs: int) -> str:
    """Section 4: changesets through Postfix and Dovecot, IMAP and POP3."""
    sys.path.insert(0, str(Path(__file__).parent.parent))
    from tests.servers.mail import MailServers, binaries_present

    title = "### 4. Real mail: Postfix (SMTP submission, STARTTLS) and Dovecot"
    if not binaries_present():
        return f"{title}\n\nskipped: Postfix/Dovecot not installed here\n"
    rows = [
        title,
        "",
        f"{changesets} changesets of 50 changed rows, each: host cycle (build, seal, one "
        "SMTP session), delivery (not counted), station cycle (one IMAP or POP3 session, "
        "open, apply, and its ack back by SMTP). Baseline: the same messages sent with "
        "aiosmtplib and fetched and deleted with imapclient / poplib, a session each, no "
        "database work.",
        "",
        "| station reads by | messages/s | s per host cycle | s per station cycle | "
        "baseline messages/s | ratio |",
        "|---|---|---|---|---|---|",
    ]
    with MailServers() as servers:
        raws: list[bytes] = []
        for receive in ("imaps", "pop3s"):
            host_s, station_s, base = [], [], []
            for _ in range(runs):
                servers.reset()
                with tempfile.TemporaryDirectory() as tmp:
                    h, st = _mail_run(Path(tmp), servers, receive, changesets)
                if receive == "imaps" and not raws:
                    raws = _raw_messages(servers, changesets)
                host_s.append(h)
                station_s.append(st)
                servers.reset()
                base.append(_baseline(servers, raws, receive))
            ours = Figure([changesets / (h + s) for h, s in zip(host_s, station_s, strict=True)])
            floor = Figure([len(raws) / b for b in base])
            rows.append(
                f"| {'IMAP' if receive == 'imaps' else 'POP3'} over TLS | {ours.show('{:,.1f}')} | "
                f"{Figure([h / changesets for h in host_s]).show('{:.3f}')} | "
                f"{Figure([s / changesets for s in station_s]).show('{:.3f}')} | "
                f"{floor.show('{:,.1f}')} | {ours.median / floor.median:.2f} |"
            )
    return "\n".join(rows) + "\n"


def postgresql(sizes: dict[str, int], runs: int, sqlite_load: dict[str, object]) -> str:
    """Section 5: the initial load and the steady state again, the host's
    database on a PostgreSQL server started for the run (the test suite's)."""
    sys.path.insert(0, str(Path(__file__).parent.parent))
    from tests.servers.postgres import PostgresServer, find_bindir

    if find_bindir() is None:
        return "### 5. PostgreSQL as the host's database\n\nskipped: no PostgreSQL here\n"
    with tempfile.TemporaryDirectory() as tmp, PostgresServer() as server:
        site = PostgresSite(Path(tmp), sizes["invoices"], server)
        floor = sqlite_load["floor"]
        assert isinstance(floor, Figure)
        copied = repeat(
            runs, lambda: floor_copy(server.dsn("bench_hq"), Path(tmp) / "floor-copy.db")
        )
        copy_floor = Figure([site.rows / t for t in copied.values])
        load = initial_load(site, runs, copy_floor)
        # a PostgreSQL cycle costs several times a SQLite one: fewer changesets
        steady = steady_state(site, max(1, sizes["changesets"] * 3 // 10), runs)
        server.drop_database("bench_hq")
        server.drop_database("bench_hq_template")
    return "\n".join(
        [
            "### 5. PostgreSQL as the host's database (station on SQLite)",
            "",
            f"The same initial load; {steady['changesets']:,} steady-state changesets.",
            "",
            "| figure | mailsync | floor | ratio |",
            "|---|---|---|---|",
            f"| initial load, rows/s end to end | {load['ours'].show()} | "  # type: ignore[attr-defined]
            f"{copy_floor.show()} (COPY TO STDOUT → sqlite3 executemany) | "
            f"{load['ratio']:.2f} |",
            f"| the same ÷ the SQLite floor | | {floor.show()} (sqlite3 executemany) | "
            f"{load['ours'].median / floor.median:.2f} |",  # type: ignore[attr-defined]
            f"| peak RSS host / station, MiB | {load['host_rss'].show()} / "  # type: ignore[attr-defined]
            f"{load['station_rss'].show()} | | |",  # type: ignore[attr-defined]
            f"| steady state, changesets/s | {steady['ours'].show('{:,.1f}')} | "  # type: ignore[attr-defined]
            f"{steady['floor'].show('{:,.1f}')} (executemany, a commit each) | "  # type: ignore[attr-defined]
            f"{steady['ratio']:.4f} |",
            f"| steady state, wire bytes per row | {steady['wire_per_row'].show('{:,.1f}')} | "  # type: ignore[attr-defined]
            f"{steady['csv_per_row'].show('{:,.1f}')} (CSV + zstd -19) | "  # type: ignore[attr-defined]
            f"{steady['wire_ratio']:.2f} |",
            "",
        ]
    )


#: bench/cycle_cost.py's sections sit between these in the output; a run of
#: this script keeps them
KEPT_BEGIN, KEPT_END = "<!-- bench/cycle_cost.py: begin -->", "<!-- bench/cycle_cost.py: end -->"

PREAMBLE = """# Benchmarks

Written by `bench/pipeline.py` (`make bench`) at commit {commit}, {runs} run(s)
per figure. Each figure is the median of the runs with min–max; each ratio is
against a baseline measured in the same run on the same machine: below 1 is
slower than the floor (for wire size, above 1 is bigger). How each figure is
taken: the docstring of `bench/pipeline.py`.

"""


def _commit() -> str:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        )
    except (OSError, subprocess.CalledProcessError):
        return "(unknown)"
    return done.stdout.strip()


def machine() -> str:
    """CPU model, cores and memory: the figures are this machine's."""
    model = platform.processor() or platform.machine()
    memory = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f", {int(line.split()[1]) / 2**20:.0f} GiB RAM"
                break
    except OSError:
        pass
    return f"{model} ({platform.machine()}), {os.cpu_count()} cores{memory}, {platform.system()}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--runs", type=int, default=None, help="runs per figure")
    parser.add_argument("--output", type=Path, help="write the markdown here too")
    parser.add_argument(
        "--no-mail", action="store_true", help="skip section 4 (Postfix and Dovecot)"
    )
    parser.add_argument(
        "--no-postgresql", action="store_true", help="skip section 5 (the host on PostgreSQL)"
    )
    parser.add_argument(
        "--invoices", type=int, help="sample invoices (~4.3 rows each, all tables): a reduced run"
    )
    parser.add_argument("--changesets", type=int, help="steady-state changesets per run")
    args = parser.parse_args()
    sizes = dict(QUICK if args.quick else FULL)
    if args.invoices:
        sizes["invoices"] = args.invoices
        sizes["capture_rows"] = min(sizes["capture_rows"], args.invoices * 3)
    if args.changesets:
        sizes["changesets"] = args.changesets
    runs = args.runs or (1 if args.quick else 3)
    head = (
        f"machine: {machine()}, Python {platform.python_version()}, SQLite "
        f"{sqlite3.sqlite_version}; {'quick' if args.quick else 'full'} run, "
        f"{runs} run(s) per figure"
    )
    print(head, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        site = Site(Path(tmp), sizes["invoices"])
        load = initial_load(site, runs)
        steady = steady_state(site, sizes["changesets"], runs)
        cap = capture_cost(Path(tmp), sizes["capture_rows"], runs)
    text = head + "\n\n" + markdown(load, steady, cap)
    if not args.no_mail:
        text += "\n" + real_mail(sizes["mail_changesets"], runs)
    if not args.no_postgresql:
        text += "\n" + postgresql(sizes, runs, load)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        old = args.output.read_text() if args.output.exists() else ""
        kept = old[old.index(KEPT_BEGIN) :] if KEPT_BEGIN in old else ""
        text = PREAMBLE.format(commit=_commit(), runs=runs) + text
        args.output.write_text(text + ("\n" + kept if kept else ""))


if __name__ == "__main__":
    main()
