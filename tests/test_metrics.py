"""``status --format openmetrics`` (issue 20, item 9): valid OpenMetrics,
read back by the Prometheus client's own parser, labels escaped."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from sqlalchemy import insert

from mailsync.metrics import escape
from mailsync.store.tables import now
from tests.cluster import Cluster, customers
from tests.test_alerts import park_one

#: a label an admin may well type: quotes, a backslash, a line break, umlauts
LABEL = 'Köln "Süd" \\ Lager\nHalle 2'


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample as (name, sorted labels) → value, through the parser
    (which refuses anything that is not OpenMetrics, ``# EOF`` included)."""
    out = {}
    for family in text_string_to_metric_families(text):
        assert family.type == "gauge", family
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_escape() -> None:
    assert escape('a"b\\c\nd') == 'a\\"b\\\\c\\nd'


def test_openmetrics_of_a_host_and_a_station(tmp_path: Path, db_url: str) -> None:
    c = Cluster(tmp_path, db_url, ("koeln", "berlin"), transport="maildir")
    try:
        c.host.add_rule("customers", down="IUD", up="IUD")
        c.host.edit_station("koeln", label=LABEL)
        c.execute("hq", insert(customers), [{"id": i, "name": f"K {i}"} for i in range(1, 6)])
        done = c.cli("koeln", "status", "--format", "openmetrics")
        assert done.returncode == 0, done.stderr
        before = samples(done.stdout)  # nothing happened yet: no last cycle
        assert not any(name.startswith("mailsync_last_cycle") for name, _ in before)
        for node in ("hq", "koeln", "hq"):
            done = c.cli(node, "sync")
            assert done.returncode == 0, done.stderr
        park_one(c)
        done = c.cli("hq", "status", "--format", "openmetrics")
        assert done.returncode == 0, done.stderr
        text = done.stdout
        assert text.endswith("# EOF\n") and text.count("# EOF") == 1
        for line in text.splitlines():
            if not line.startswith("#"):
                assert re.match(r"mailsync_[a-z_]+\{", line), line
        got = samples(text)
        hq = ("node", "hq")
        assert got[("mailsync_info", (hq, ("role", "host")))] == 1
        koeln = (hq, ("peer", "koeln"))
        info = (("address", "koeln@example.test"), ("label", LABEL), hq, ("peer", "koeln"))
        assert got[("mailsync_station_info", info)] == 1  # the label read back whole
        assert got[("mailsync_link_parked_rows", koeln)] == 1
        assert got[("mailsync_link_parked_rows", (hq, ("peer", "berlin")))] == 0
        assert got[("mailsync_link_held", koeln)] == 0
        assert got[("mailsync_link_conflicts", koeln)] == 0
        contact = got[("mailsync_link_last_contact_timestamp_seconds", koeln)]
        assert abs(contact - now().timestamp()) < 600
        # berlin never wrote: no made-up zero for its last contact
        assert ("mailsync_link_last_contact_timestamp_seconds", (hq, ("peer", "berlin"))) not in got
        assert got[("mailsync_last_cycle_success", (hq,))] == 1
        assert 0 < got[("mailsync_last_cycle_duration_seconds", (hq,))] < 120
        assert abs(got[("mailsync_last_cycle_timestamp_seconds", (hq,))] - now().timestamp()) < 600
        assert got[("mailsync_service_running", (hq,))] == 0
        # the backlog: an edit on the host waits for the next cycle
        c.execute("hq", customers.update().where(customers.c.id == 1).values(name="neu"))
        got = samples(c.cli("hq", "status", "--format", "openmetrics").stdout)
        assert got[("mailsync_link_pending_changes", koeln)] == 1
    finally:
        c.close()


def test_a_failed_cycle_is_recorded_as_such(tmp_path: Path) -> None:
    c = Cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}", ("koeln",), transport="maildir")
    try:
        path = tmp_path / "koeln" / "mailsync.toml"
        # a mailbox that cannot be reached: the cycle fails with exit code 4
        text = re.sub(
            r"(?m)^receive = .*$", 'receive = "imap://koeln@127.0.0.1:1"', path.read_text()
        )
        path.write_text(text.replace("[mailbox]", "[mailbox]\ntimeout = 2", 1))
        done = c.cli("koeln", "sync")
        assert done.returncode == 4, done.stderr
        got = samples(c.cli("koeln", "status", "--format", "openmetrics").stdout)
        assert got[("mailsync_last_cycle_success", (("node", "koeln"),))] == 0
    finally:
        c.close()


@pytest.mark.parametrize("fmt", ["yaml", ""])
def test_an_unknown_format_is_a_usage_error(tmp_path: Path, fmt: str) -> None:
    c = Cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}", (), transport="maildir")
    try:
        done = c.cli("hq", "status", "--format", fmt)
        assert done.returncode == 2 and "Traceback" not in done.stderr
    finally:
        c.close()
