"""A cycle killed after it committed work still says so in the log (issue 17).

The cycle's log lines used to be held and written at its end: a process
killed after a commit left that work without a line. The lines about a
message taken, a changeset applied, queued or sent now commit in the
transaction of that work (a message handed to the mail server is marked
sent only after it, so a kill between the two has no line, and sends it
again). Each crash point of :mod:`mailsync.faults` below
kills ``mailsync sync`` (SIGKILL) right after such a commit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from mailsync.faults import ENV
from mailsync.store.tables import log_table
from tests.cluster import Cluster, customers


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}", ("koeln",), transport="maildir")
    c.host.add_rule("customers", down="IUD", up="IUD")
    c.sync("hq", "koeln", "hq", "koeln")
    yield c
    c.close()


def killed_sync(c: Cluster, node: str, point: str) -> None:
    """``mailsync sync`` for ``node``, SIGKILLed at ``point``."""
    c.nodes[node].close()  # as another process would find it
    done = subprocess.run(
        [sys.executable, "-m", "mailsync", "-c", str(c.root / node / "mailsync.toml"), "sync"],
        env={**os.environ, ENV: point},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == -9, (done.returncode, done.stderr)
    c.restart(node)


def lines(c: Cluster, node: str, event: str) -> list[str]:
    with c.engines[node].connect() as conn:
        query = select(log_table.c.message).where(log_table.c.event == event)
        return list(conn.execute(query).scalars())


@pytest.mark.parametrize(
    ("node", "point", "event", "says"),
    [
        ("hq", "after-build", "queued", "changeset #2 for koeln: 1 rows"),
        ("koeln", "after-buffer", "received", "changeset #2 from hq"),
        ("koeln", "after-apply", "applied", "changeset #2 from hq: 1 rows"),
    ],
)
def test_a_cycle_killed_after_a_commit_keeps_its_line(
    cluster: Cluster, node: str, point: str, event: str, says: str
) -> None:
    c = cluster
    c.execute("hq", customers.insert(), {"id": 7, "name": "Kunde 7"})
    if node == "koeln":
        c.host.sync()
    assert not [m for m in lines(c, node, event) if says in m]
    killed_sync(c, node, point)
    assert len([m for m in lines(c, node, event) if says in m]) == 1, lines(c, node, event)
