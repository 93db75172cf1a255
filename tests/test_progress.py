"""Live progress (issue 20, item 6): on a terminal the rows and bytes of a
load move while it is packed and applied; into a pipe, not a word of it."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import insert

from mailsync.cli.progress_view import size
from tests.cluster import Cluster, customers

ROWS = 6000
BATCH = 500


def on_a_terminal(c: Cluster, node: str, *args: str, timeout: float = 120) -> str:
    """``mailsync ARGS`` for ``node`` with a pseudo-terminal as its stdout
    and stderr: everything it wrote, once it exited (exit code 0)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailsync", "-c", str(c.root / node / "mailsync.toml"), *args],
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        cwd=c.root,
        env={**os.environ, "COLUMNS": "200", "TERM": "xterm-256color"},
    )
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            assert time.monotonic() < deadline, f"no end after {timeout} s: {out[-500:]!r}"
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
        code = proc.wait(timeout=30)
    text = out.decode("utf-8", "replace")
    assert code == 0, text
    return text


def counts(text: str, pattern: str) -> list[int]:
    return [int(n.replace(",", "")) for n in re.findall(pattern, text)]


def test_a_load_shows_its_rows_as_it_goes_on_a_terminal_only(tmp_path: Path) -> None:
    c = Cluster(
        tmp_path,
        f"sqlite:///{tmp_path / 'hq.db'}",
        ("koeln",),
        transport="maildir",
        node_settings={"batch_rows": BATCH},
    )
    try:
        c.host.add_rule("customers", down="IUD", up="IUD")
        rows = [{"id": i, "name": f"Kunde {i}", "city": "Köln"} for i in range(1, ROWS + 1)]
        c.execute("hq", insert(customers), rows)
        c.close()  # the CLI runs the nodes from here
        packed = on_a_terminal(c, "hq", "sync")
        seen = counts(packed, r"packing changeset for koeln: ([\d,]+) rows")
        # every batch moved the line, before the end
        assert len(set(seen)) >= ROWS // BATCH and min(seen) < ROWS and max(seen) == ROWS, seen
        assert re.search(r"packing changeset for koeln: [\d,]+ rows, [\d.]+ kB", packed)
        assert "queued 1 changeset(s) / 6000 row(s)" in packed
        applied = on_a_terminal(c, "koeln", "sync")
        seen = counts(applied, r"applying changeset #1 from hq: ([\d,]+) rows")
        assert len(set(seen)) >= ROWS // BATCH and min(seen) < ROWS, seen
        assert "applied 1 changeset(s) / 6000 row(s)" in applied
        # into a pipe (cron, a service, a log file): the summary alone
        c.execute("hq", customers.update().values(city="Bonn"))
        for node in ("hq", "koeln"):
            done = c.cli(node, "sync")
            assert done.returncode == 0, done.stderr
            assert "changeset" in done.stdout and "packing" not in done.stdout
            assert "applying" not in done.stdout and "\x1b" not in done.stdout + done.stderr
            assert done.stderr == ""
    finally:
        c.close()


def test_sizes_for_a_person() -> None:
    assert [size(n) for n in (0, 950, 12_345, 4_500_000, 1_200_000_000, 10**13)] == [
        "0 B",
        "950 B",
        "12.3 kB",
        "4.5 MB",
        "1.2 GB",
        "10000.0 GB",
    ]
