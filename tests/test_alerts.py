"""Alerts (issue 20, item 8): a person is told, once a day per condition,
through the node's own send account; an operator's mistake is one line."""

from __future__ import annotations

import datetime as dt
import email
import json
from email.message import Message
from pathlib import Path

import pytest
from sqlalchemy import func, insert, select

from mailsync import link as links_mod
from mailsync.alerts.conditions import evaluate
from mailsync.alerts.notify import Watcher, claim, meta_key
from mailsync.alerts.settings import AlertSettings
from mailsync.config import load_config
from mailsync.errors import ConfigError, TransportError
from mailsync.ranges import admin as ranges_admin
from mailsync.ranges.model import RangeSpec
from mailsync.store.tables import conflicts_table, log_table, meta_table, now, parked, set_meta
from tests.cluster import DOMAIN, Cluster, customers
from tests.servers.mail import MailServers, password_of
from tests.test_mail import mailbox as real_mailbox
from tests.test_mail import wait_for

ADMIN = f"admin@{DOMAIN}"


def with_alerts(c: Cluster, name: str, alerts: str) -> None:
    """Append an [alerts] table to a node's config and reopen the node."""
    path = c.root / name / "mailsync.toml"
    path.write_text(path.read_text() + "\n[alerts]\n" + alerts)
    c.restart(name)


def mails(c: Cluster, address: str = ADMIN) -> list[Message]:
    assert c.office is not None
    return [email.message_from_bytes(raw) for raw in c.office.boxes.get(address, {}).values()]


def logged(c: Cluster, event: str) -> list[str]:
    """The host's log lines of ``event``."""
    with c.host.engine.connect() as conn:
        query = select(log_table.c.message).where(log_table.c.event == event)
        return list(conn.execute(query).scalars())


def body(msg: Message) -> str:
    payload = msg.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload.decode()


# ------------------------------------------------------------------ config


def config_with(tmp_path: Path, alerts: str) -> Path:
    path = tmp_path / "mailsync.toml"
    path.write_text(
        '[node]\nid = "hq"\nrole = "host"\ndatabase = "sqlite:///x.db"\n'
        '[mailbox]\naddress = "hq@x.test"\nsend = "maildir:mail"\nreceive = "maildir:mail"\n'
        "[alerts]\n" + alerts
    )
    return path


def test_alerts_defaults_and_a_list_of_addresses(tmp_path: Path) -> None:
    cfg = load_config(config_with(tmp_path, 'to = "admin@x.test"\n'))
    assert cfg.alerts == AlertSettings(to=("admin@x.test",))
    assert cfg.alerts.silent_days == 3 and cfg.alerts.range_left == 100
    cfg = load_config(
        config_with(tmp_path, 'to = ["a@x.test", "b@x.test"]\nsilent_days = 0.5\nheld = false\n')
    )
    assert cfg.alerts.to == ("a@x.test", "b@x.test") and cfg.alerts.silent_days == 0.5
    assert not cfg.alerts.held


def test_without_an_alerts_table_alerts_are_off(tmp_path: Path) -> None:
    path = config_with(tmp_path, "")
    path.write_text(path.read_text().replace("[alerts]\n", ""))
    assert not load_config(path).alerts.enabled


@pytest.mark.parametrize(
    ("alerts", "message"),
    [
        ("silent_days = 2\n", r"\[alerts\]: missing setting 'to' \(who is told\)"),
        ('to = "admin"\n', r"to 'admin' is not an e-mail address"),
        ('to = "admin@x.test, boss@x.test"\n', r"is not an e-mail address"),
        ('to = ["admin@x.test", 5]\n', r"must be an address or a list"),
        ("to = []\n", r"must be an address or a list"),
        ("to = 5\n", r"mailsync.toml:10 \[alerts\]: to must be an address in quotes or a list"),
        ('to = "hq@x.test"\n', r"this node's own mailbox"),
        ('to = "a@x.test"\nparked_rows = -1\n', r"parked_rows must not be negative"),
        ('to = "a@x.test"\nsilent_days = "3"\n', r":11 \[alerts\]: silent_days must be a number"),
        ('to = "a@x.test"\nheld = 1\n', r"held must be true or false, not 1"),
        (
            'to = "a@x.test"\nsilent_day = 3\n',
            r":11 \[alerts\]: unknown setting 'silent_day' \(did you mean 'silent_days'\?\)",
        ),
    ],
)
def test_an_operators_mistake_is_one_line(tmp_path: Path, alerts: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(config_with(tmp_path, alerts))


def test_alerts_need_a_send_account(tmp_path: Path) -> None:
    path = config_with(tmp_path, 'to = "admin@x.test"\n')
    path.write_text(path.read_text().replace('send = "maildir:mail"\n', ""))
    with pytest.raises(ConfigError, match=r"\[mailbox\]: missing setting 'send'"):
        load_config(path)


# -------------------------------------------------------------- conditions


@pytest.fixture
def site(tmp_path: Path, db_url: str) -> Cluster:
    c = Cluster(tmp_path, db_url, ("koeln",))
    c.host.add_rule("customers", down="IUD", up="IUD")
    c.execute("hq", insert(customers), [{"id": i, "name": f"K {i}"} for i in range(1, 4)])
    c.converge()
    return c


def conditions(c: Cluster, name: str, settings: AlertSettings, at: dt.datetime | None = None):  # type: ignore[no-untyped-def]
    node = c.nodes[name]
    with node.engine.connect() as conn:
        return evaluate(conn, settings, is_host=node.is_host, now=at or now())


ON = AlertSettings(to=(ADMIN,))


def test_a_quiet_site_needs_nobody(site: Cluster) -> None:
    try:
        for name in site.names:
            assert conditions(site, name, ON) == []
    finally:
        site.close()


def test_each_condition_is_found_per_subject(site: Cluster) -> None:
    c = site
    try:
        hq = c.host.engine
        with hq.begin() as conn:
            links_mod.held(conn, links_mod.one(conn, "koeln"), "changeset #7 fails: no table x")
            row = {"peer": "koeln", "seq": 3, "op": "I", "columns": "[]", "row": b""}
            conn.execute(
                insert(parked),
                [{**row, "tbl": "customers", "error": "boom", "parked_at": now()}] * 2,
            )
            conn.execute(
                insert(conflicts_table),
                {
                    "at": now(),
                    "peer": "koeln",
                    "seq": 3,
                    "tbl": "customers",
                    "pk": "[1]",
                    "op": "U",
                    "policy": "host-wins",
                    "kept": "ours",
                    "columns": "[]",
                },
            )
            ranges_admin.add_range(conn, RangeSpec("invoice_no", 1, 90, 50))
            set_meta(
                conn,
                "restore",
                json.dumps({"at": now().isoformat(), "kind": "x", "text": "3 leases moved"}),
            )
        c.host.journal.warning("rejected", "set aside: forged signature", peer="koeln")
        found = {(a.condition, a.subject): a.text for a in conditions(c, "hq", ON)}
        assert set(found) == {
            ("held", "koeln"),
            ("parked", "koeln/customers"),
            ("conflicts", "koeln/customers"),
            ("range", "invoice_no"),
            ("restore", ""),
            ("hostile", ""),
        }, found
        assert "no table x" in found[("held", "koeln")]
        assert found[("parked", "koeln/customers")].startswith("2 row(s) of customers")
        assert "90 number(s) left" in found[("range", "invoice_no")]
        assert "1 message(s) set aside" in found[("hostile", "")]
        # a week without a word from koeln; thresholds above what is there
        later = now() + dt.timedelta(days=7)
        quiet = AlertSettings(
            to=(ADMIN,), parked_rows=3, conflicts=2, range_left=90, held=False,
            restore=False, hostile=False,
        )  # fmt: skip
        found = {(a.condition, a.subject) for a in conditions(c, "hq", quiet, later)}
        assert found == {("silent", "koeln")}
        off = AlertSettings(
            to=(ADMIN,), silent_days=0, parked_rows=0, conflicts=0, range_left=0,
            held=False, restore=False, hostile=False,
        )  # fmt: skip
        assert conditions(c, "hq", off, later) == []
    finally:
        c.close()


def test_a_station_is_told_of_its_own_numbers_running_low(tmp_path: Path) -> None:
    c = Cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}", ("koeln",))
    try:
        with c.host.engine.begin() as conn:
            ranges_admin.add_range(conn, RangeSpec("order_no", 1000, 99999, 20))
        c.converge()
        found = {(a.condition, a.subject): a.text for a in conditions(c, "koeln", ON)}
        # a block of 20 (and perhaps the next one held): under 100 left here
        assert ("range", "order_no") in found
        assert "left here" in found[("range", "order_no")]
        # the host has most of the range to lease: nothing to say
        assert ("range", "order_no") not in {
            (a.condition, a.subject) for a in conditions(c, "hq", ON)
        }
    finally:
        c.close()


# ------------------------------------------------------------ once a day


def park_one(c: Cluster) -> None:
    with c.host.engine.begin() as conn:
        conn.execute(
            insert(parked),
            {
                "peer": "koeln",
                "seq": 1,
                "tbl": "customers",
                "op": "I",
                "columns": "[]",
                "row": b"",
                "error": "boom",
                "parked_at": now(),
            },
        )


def test_a_parked_row_is_mailed_once_a_day_after_a_cycle(site: Cluster) -> None:
    c = site
    try:
        with_alerts(c, "hq", f'to = "{ADMIN}"\n')
        park_one(c)
        report = c.host.sync()
        assert not report.errors
        got = mails(c)
        assert len(got) == 1
        msg = got[0]
        assert msg["To"] == ADMIN and msg["From"] == f"hq@{DOMAIN}"
        assert msg["Subject"] == "[mailsync alert] hq: 1 thing(s) need a person (parked)"
        assert msg["Auto-Submitted"] == "auto-generated"
        assert "1 row(s) of customers from koeln could not be applied" in body(msg)
        # the next check in this process, and another process: nothing new
        c.host.watch.checked = None
        c.host.sync()
        c.restart("hq")
        c.host.sync()
        assert len(mails(c)) == 1
        # a day later it is told again
        assert c.host.watch.check(now() + dt.timedelta(hours=25))
        assert len(mails(c)) == 2
        with c.host.engine.connect() as conn:
            keys = set(
                conn.execute(
                    select(meta_table.c.key).where(meta_table.c.key.startswith("alert:"))
                ).scalars()
            )
        assert len(logged(c, "alert")) == 2
        assert keys == {"alert:parked:koeln/customers"}
    finally:
        c.close()


def test_two_processes_claim_an_alert_once(site: Cluster) -> None:
    c = site
    try:
        from mailsync.alerts.conditions import Alert

        alert = Alert("parked", "koeln/customers", "1 row")
        at = now()
        first = claim(c.host.engine, [alert], at)
        second = claim(c.host.engine, [alert], at)
        assert len(first) == 1 and second == []
        # a subject too long for the key column is kept by its digest
        long = Alert("parked", "k" * 64 + "/" + "t" * 128, "x")
        assert len(meta_key(long.condition, long.subject)) <= 64
        assert len(claim(c.host.engine, [long], at)) == 1
    finally:
        c.close()


def test_the_check_runs_at_most_every_n_minutes(site: Cluster) -> None:
    c = site
    try:
        with_alerts(c, "hq", f'to = "{ADMIN}"\nevery_minutes = 60\n')
        c.host.sync()
        assert mails(c) == []
        park_one(c)
        c.host.sync()  # within the hour: not checked
        assert mails(c) == []
        c.host.watch.checked = None  # an hour later
        c.host.sync()
        assert len(mails(c)) == 1
    finally:
        c.close()


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (TransportError("smtp server down: connection refused"), "connection refused"),
        (RuntimeError("a bug in a transport"), "unexpected RuntimeError: a bug"),
    ],
    ids=["server down", "a bug"],
)
def test_a_failed_alert_is_logged_never_fails_the_cycle_and_goes_later(
    site: Cluster, error: Exception, said: str
) -> None:
    c = site
    try:
        with_alerts(c, "hq", f'to = "{ADMIN}"\n')
        park_one(c)
        office = c.office
        assert office is not None

        def refuse(recipient: str, raw: bytes) -> str:
            raise error

        deliver = office.deliver
        office.deliver = refuse  # type: ignore[method-assign]
        try:
            report = c.host.sync()
        finally:
            office.deliver = deliver  # type: ignore[method-assign]
        assert not report.errors and mails(c) == []
        lines = logged(c, "alert-failed")
        with c.host.engine.connect() as conn:
            claims = conn.execute(
                select(func.count()).where(meta_table.c.key.startswith("alert:"))
            ).scalar()
        assert len(lines) == 1 and said in lines[0], lines
        assert claims == 0  # given back: the next check tries again
        c.host.watch.checked = None
        c.host.sync()
        assert len(mails(c)) == 1
    finally:
        c.close()


def test_a_station_tells_of_a_silent_host(tmp_path: Path) -> None:
    c = Cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}", ("koeln",))
    try:
        c.converge()
        with_alerts(c, "koeln", f'to = "{ADMIN}"\nsilent_days = 2\n')
        watch: Watcher = c.nodes["koeln"].watch
        assert watch.check(now()) == []
        told = watch.check(now() + dt.timedelta(days=3))
        assert [a.condition for a in told] == ["silent"]
        assert "nothing heard from hq" in body(mails(c)[0])
    finally:
        c.close()


# ------------------------------------------- real Postfix and Dovecot, the CLI


def test_an_alert_arrives_through_real_servers_and_alerts_test_says_where(
    tmp_path: Path, mail_servers: MailServers, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = Cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}", ("koeln",), transport="maildir")
    try:
        monkeypatch.setenv("TEST_PW_HQ", password_of("hq"))
        c.set_mailbox("hq", real_mailbox(mail_servers, "hq"))
        done = c.cli("hq", "alerts", "test")
        assert done.returncode == 2, done.stderr  # no [alerts] yet: the config's mistake
        assert "no [alerts] table" in done.stderr and "Traceback" not in done.stderr
        with_alerts(c, "hq", f'to = "{ADMIN}"\n')
        c.host.retry_backoff = 0.01
        done = c.cli("hq", "alerts", "test")
        assert done.returncode == 0, done.stderr
        assert (
            f"test alert sent to {ADMIN} from hq@{DOMAIN} through smtp+starttls://" in done.stdout
        )
        wait_for(lambda: mail_servers.count("admin") == 1, "the test alert")
        park_one(c)
        report = c.host.sync()
        assert not report.errors, report.errors
        wait_for(lambda: mail_servers.count("admin") == 2, "the parked-row alert")
        # an address the server refuses: logged, the cycle is fine, tried later
        mail_servers.set_unknown("admin")
        with c.host.engine.begin() as conn:
            conn.execute(meta_table.delete().where(meta_table.c.key.startswith("alert:")))
        c.restart("hq")  # a new SMTP session: Postfix's kept one knows the old table
        c.host.retry_backoff = 0.01
        report = c.host.sync()
        assert not report.errors, report.errors
        failed = logged(c, "alert-failed")
        assert len(failed) == 1 and ADMIN in failed[0], failed
        done = c.cli("hq", "alerts", "test")
        assert done.returncode == 4 and "reached nobody" in done.stderr, done.stderr
        # the mail server down: exit 4, one line
        mail_servers.set_unknown()
        mail_servers.stop_postfix()
        done = c.cli("hq", "alerts", "test")
        assert done.returncode == 4, done.stderr
        assert done.stderr.count("\n") <= 2 and "Traceback" not in done.stderr
    finally:
        c.close()
