"""A bounded inbox and held links (DESIGN §12; issue 15, items 2–3).

A station with valid keys can flood the host's inbox with changesets that
are early for their turn, leave changesets forever incomplete, or send one
that can never apply (a column the host lacks). Each stays in its own link:
the flood is capped per peer and set aside (its sender still holds what was
real, and sends it again), an incomplete changeset expires and is asked for
again whole, and a changeset that keeps failing is quarantined — its link
held with the reason in ``status`` and the exit code — until an admin
retries or skips it with ``mailsync inbox``. In every case koeln is served
in the same host cycle and the host's peak memory stays bounded.

berlin's messages are forged as berlin's mailsync seals them
(:func:`tests.test_containment.from_berlin`).
"""

from __future__ import annotations

import datetime as dt
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text, update

from mailsync.store.tables import inbox
from mailsync.wire.changeset import ChangesetWriter
from mailsync.wire.limits import MIB
from tests.cluster import Cluster, columns_since, customers
from tests.test_containment import (
    RefusingPostOffice,
    Write,
    address,
    assert_koeln_served,
    berlin_rows,
    from_berlin,
    link,
    logged,
    memory_box,
    started,
)
from tests.test_limits import PEAK_BOUND, host_cycle_with_koeln, measured, set_limits


@pytest.fixture
def office() -> RefusingPostOffice:
    return RefusingPostOffice()


@pytest.fixture
def cluster(tmp_path: Path, office: RefusingPostOffice) -> Iterator[Cluster]:
    c = started(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}", office)
    yield c
    c.close()


def with_ghost(*ids: int) -> Write:
    """berlin's customers, and rows of ``ghosts``, a table berlin's rule
    names and hq has lost (a column only berlin has would just be ignored)."""

    def write(writer: ChangesetWriter) -> None:
        table = writer.table(
            "customers", [("id", "INTEGER"), ("name", "VARCHAR"), ("city", "VARCHAR")], ["id"]
        )
        writer.rows(table, "I", [(i, f"Kunde {i}", "berlin") for i in ids])
        ghosts = writer.table("ghosts", [("id", "INTEGER"), ("name", "VARCHAR")], ["id"])
        writer.rows(ghosts, "I", [(i, "boo") for i in ids])

    return write


def with_photo(i: int, photo: bytes) -> Write:
    def write(writer: ChangesetWriter) -> None:
        table = writer.table(
            "customers",
            [("id", "INTEGER"), ("name", "VARCHAR"), ("city", "VARCHAR"), ("photo", "BLOB")],
            ["id"],
        )
        writer.rows(table, "I", [(i, f"Kunde {i}", "berlin", photo)])

    return write


GHOSTS = "CREATE TABLE ghosts (id INTEGER PRIMARY KEY, name VARCHAR(20))"


def ids(c: Cluster, node: str = "hq") -> list[int]:
    return [r[0] for r in c.rows(node, customers)]


def cli_json(c: Cluster, *args: str) -> Any:
    done = c.cli("hq", *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# --------------------------------------------------- quarantine, held links


def quarantined_ghost(c: Cluster, office: RefusingPostOffice) -> None:
    """berlin's changeset #1 brings rows of a table hq has lost: it fails,
    holds berlin's link (koeln served, memory bounded) and, at the second
    failure, is quarantined — said once in the log."""
    set_limits(c, quarantine_after=2)
    with c.engines["hq"].begin() as conn:
        conn.exec_driver_sql(GHOSTS)
    c.host.add_rule("ghosts", down="", up="IUD", station="berlin")
    with c.engines["hq"].begin() as conn:
        conn.exec_driver_sql("DROP TABLE ghosts")
    from_berlin(c, office, with_ghost(5), seq=1)
    report, peak = host_cycle_with_koeln(c)

    assert peak < PEAK_BOUND, f"peak {peak / MIB:.1f} MiB"
    assert_koeln_served(c, office, report, 2)
    assert set(report.peer_errors) == {"berlin"}, report.peer_errors
    assert "ghosts" in report.peer_errors["berlin"]
    berlin = link(c, "hq", "berlin")
    assert berlin.held is not None and "ghosts" in berlin.held
    assert (berlin.in_seq, berlin.buffered, berlin.quarantined) == (0, 1, 0)
    assert ids(c) == [2]  # nothing of berlin's written

    report = c.host.sync()  # the second failure: quarantined
    assert "ghosts" in report.peer_errors["berlin"]
    (line,) = logged(c, "quarantined")
    assert "changeset #1 from berlin quarantined after 2 failed attempts" in line
    assert "ghosts" in line
    failures = len(logged(c, "apply-failed"))

    report = c.host.sync()  # no longer tried, still reported, not logged again
    assert report.peer_errors["berlin"].startswith("changeset #1 from berlin is quarantined")
    assert len(logged(c, "apply-failed")) == failures and len(logged(c, "quarantined")) == 1
    berlin = link(c, "hq", "berlin")
    assert berlin.quarantined == 1 and "quarantined" in (berlin.held or "")


def test_a_changeset_that_keeps_failing_is_quarantined_and_retried_once_fixed(
    cluster: Cluster, office: RefusingPostOffice
) -> None:
    c = cluster
    quarantined_ghost(c, office)
    # what the admin sees: the CLI's exit code, status and inbox list (a
    # mailbox a separate process can open: the post office is this one's)
    maildir = f"maildir:{c.root / 'mail'}"
    c.set_mailbox("hq", memory_box("hq", send=maildir, receive=maildir))
    done = c.cli("hq", "sync")
    assert done.returncode == 5 and "quarantined" in done.stdout, done.stdout
    status = c.cli("hq", "status").stdout
    assert "changesets from berlin held since" in status
    assert "1 changeset(s) from berlin quarantined" in status
    (listed,) = cli_json(c, "inbox", "list")
    assert listed["seq"] == 1 and listed["attempts"] == 2 and listed["next_in_line"]
    assert listed["state"] == "quarantined after 2 failed attempt(s)"
    assert "ghosts" in listed["last_error"]
    shown = c.cli("hq", "inbox", "show", "berlin", "1").stdout
    assert "inbox retry berlin 1" in shown and "--skip" in shown

    # the admin makes the table again, then retries: it applies, the link is released
    with c.engines["hq"].begin() as conn:
        conn.exec_driver_sql(GHOSTS)
    done = c.cli("hq", "inbox", "retry", "berlin")
    assert done.returncode == 0 and "1 changeset(s) from berlin" in done.stdout
    report = c.host.sync()
    assert not report.errors, report.errors
    assert ids(c) == [2, 5]
    berlin = link(c, "hq", "berlin")
    assert (berlin.in_seq, berlin.buffered, berlin.held, berlin.quarantined) == (1, 0, None, 0)
    assert any("changesets from berlin apply again" in m for m in logged(c, "released"))


def test_a_quarantined_changeset_is_skipped_only_when_the_admin_says_so(
    cluster: Cluster, office: RefusingPostOffice
) -> None:
    c = cluster
    quarantined_ghost(c, office)
    # an operator's mistakes: each a one-line error, exit 2, nothing changed
    for args, said in [
        (("drop", "berlin", "1"), "next in line from berlin"),
        (("drop", "paris", "1"), "unknown peer 'paris'"),
        (("drop", "berlin", "7"), "changeset #7 from berlin is not in the inbox"),
        (("retry", "koeln"), "nothing from koeln is in the inbox"),
        (("drop", "berlin", "0"), "Invalid value"),
    ]:
        done = c.cli("hq", "inbox", *args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert said in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert link(c, "hq", "berlin").buffered == 1

    done = c.cli("hq", "inbox", "drop", "berlin", "1", "--skip")
    assert done.returncode == 0 and "skipped" in done.stdout, done.stderr
    assert any("skipped by an admin" in m for m in logged(c, "inbox"))
    berlin = link(c, "hq", "berlin")
    assert (berlin.in_seq, berlin.buffered, berlin.held) == (1, 0, None)
    # berlin's next changeset applies; the skipped one never did (its table back)
    with c.engines["hq"].begin() as conn:
        conn.exec_driver_sql(GHOSTS)
    from_berlin(c, office, berlin_rows((6, "Kunde 6", "berlin"), (7, "Kunde 7", "berlin")), seq=2)
    report = c.host.sync()
    assert not report.errors, report.errors
    assert ids(c) == [2, 6, 7]


def test_a_version_2_database_gains_the_hold_and_inbox_columns(
    cluster: Cluster, office: RefusingPostOffice
) -> None:
    """A changeset buffered under schema 2 keeps its place and its size is
    filled in by the migration."""
    c = cluster
    from_berlin(c, office, berlin_rows((5, "Kunde 5", "berlin")), seq=2)  # early: waits
    c.host.sync()
    with c.engines["hq"].begin() as conn:
        for table, column in columns_since(2):
            conn.execute(text(f"ALTER TABLE {table} DROP COLUMN {column}"))
        conn.execute(text("UPDATE mailsync_meta SET value = '2' WHERE key = 'schema_version'"))
    c.restart("hq")
    (waiting,) = cli_json(c, "inbox", "list")
    assert waiting["seq"] == 2 and waiting["bytes"] > 100 and waiting["attempts"] == 0
    from_berlin(c, office, berlin_rows((4, "Kunde 4", "berlin")), seq=1)
    assert not c.host.sync().errors
    assert ids(c) == [4, 5]


# --------------------------------------------------------------- the caps


def test_a_flood_of_early_changesets_is_capped_and_the_link_still_moves(
    cluster: Cluster, office: RefusingPostOffice
) -> None:
    """Changesets #3–#10 wait for #1 and #2: three are buffered, the rest set
    aside naming the limit. The one next in line is always admitted, and a
    lower number evicts the highest buffered one: the link moves, and what
    was set aside or evicted applies when its sender sends it again."""
    c = cluster
    set_limits(c, max_buffered_changesets=3)
    sent: dict[int, bytes] = {}

    def berlin_sends(seq: int, *rows: tuple[object, ...]) -> None:
        from_berlin(c, office, berlin_rows(*rows), seq=seq)
        sent[seq] = list(office.boxes[address("hq")].values())[-1]

    for seq in range(3, 11):
        berlin_sends(seq, (100 + seq, f"K{seq}", "berlin"))
    report, peak = host_cycle_with_koeln(c)

    assert peak < PEAK_BOUND, f"peak {peak / MIB:.1f} MiB"
    assert (report.received_from["berlin"], report.set_aside) == (3, 5), report
    assert_koeln_served(c, office, report, 2)
    reasons = [why for _, why in office.aside.pop(address("hq"))]
    assert all(
        "3 changesets from berlin already exceeds limits.max_buffered_changesets = 3" in r
        for r in reasons
    ), reasons
    assert len([m for m in logged(c, "rejected") if "max_buffered_changesets" in m]) == 5
    assert c.host.status().set_aside == 5
    assert link(c, "hq", "berlin").buffered == 3 and ids(c) == [2]

    # the inbox is full: #2 (it comes first) evicts #5; #1 is next in line
    # (and, in one part, applied as it is taken)
    berlin_sends(2, (102, "K2", "berlin"), (99, "K99", "berlin"))
    berlin_sends(1, (101, "K1", "berlin"))
    report = c.host.sync()
    assert not report.errors and report.set_aside == 0, report
    assert ids(c) == [2, 99, 101, 102, 103, 104]
    (line,) = logged(c, "evicted")
    assert "#5 from berlin left the full inbox to make room for #2" in line
    # berlin sends again what hq has not acknowledged, until all applied
    for _ in range(3):
        applied = link(c, "hq", "berlin").in_seq
        for seq in range(applied + 1, 11):
            office.deliver(address("hq"), sent[seq])
        assert not c.host.sync().errors
    assert ids(c) == [2, 99, *range(101, 111)]
    assert link(c, "hq", "berlin").in_seq == 10


def test_the_inbox_bytes_of_one_peer_are_capped(
    cluster: Cluster, office: RefusingPostOffice
) -> None:
    c = cluster
    set_limits(c, max_buffered_bytes=40_000)
    photo = random.Random(15).randbytes(25_600)  # incompressible
    for seq in (2, 3):
        from_berlin(c, office, with_photo(seq, photo), seq=seq)
    report, peak = measured(c.host.sync)

    assert peak < PEAK_BOUND
    assert (report.received_from["berlin"], report.set_aside) == (1, 1)
    ((_, why),) = office.aside[address("hq")]
    assert "bytes from berlin exceeds limits.max_buffered_bytes = 40,000" in why, why
    assert link(c, "hq", "berlin").buffered == 1


def test_an_incomplete_changeset_expires_and_is_asked_for_again_whole(
    cluster: Cluster, office: RefusingPostOffice
) -> None:
    """berlin's changeset goes in parts and one is lost in the mail: the
    rest wait; when none has come for incomplete_expiry_hours, they are
    dropped and the whole changeset asked for in the same cycle — berlin
    sends it again and it applies."""
    c = cluster
    c.set_mailbox("berlin", memory_box("berlin", max_message_bytes=20_000))
    photo = random.Random(16).randbytes(60_000)  # incompressible: three parts or more
    c.execute(
        "berlin", customers.insert(), {"id": 9, "name": "K9", "city": "berlin", "photo": photo}
    )
    c.nodes["berlin"].sync()
    box = office.boxes[address("hq")]
    assert len(box) >= 3
    box.pop(next(iter(box)))  # lost in the mail
    c.host.sync()
    berlin = link(c, "hq", "berlin")
    assert berlin.buffered == 1 and berlin.missing_parts
    # no part for three days
    with c.engines["hq"].begin() as conn:
        conn.execute(
            update(inbox).values(received_at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=73))
        )
    report = c.host.sync()
    assert not report.errors, report.errors
    (line,) = logged(c, "expired")
    assert "#1 from berlin never completed in 72 h" in line
    assert link(c, "hq", "berlin").buffered == 0
    assert report.sent_to["berlin"] == 1  # the request, at once
    c.nodes["berlin"].sync()  # sends #1 again, every part
    report = c.host.sync()
    assert not report.errors and ids(c) == [9]
    assert c.rows("hq", customers)[0][7] == photo
