"""End to end over real Postfix (SMTP) and Dovecot (IMAP, POP3), and its faults.

hq reads IMAPS, koeln IMAP with STARTTLS, berlin POP3S; all send by SMTP
submission with STARTTLS and AUTH. No mock stands in for the mail system.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from mailsync.store.tables import outbox
from tests.cluster import Cluster, customers
from tests.servers.mail import DOMAIN, MailServers, password_of

RECEIVE = {"hq": "imaps", "koeln": "imap+starttls", "berlin": "pop3s"}


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def mailbox(servers: MailServers, name: str, **extra: object) -> dict[str, object]:
    user = f"{name}%40{DOMAIN}"
    scheme = RECEIVE[name]
    port = servers.ports[scheme.replace("+starttls", "")]
    settings: dict[str, object] = {
        "address": f"{name}@{DOMAIN}",
        "send": f"smtp+starttls://{user}@localhost:{servers.ports['smtp']}",
        "receive": f"{scheme}://{user}@localhost:{port}",
        "password_env": f"TEST_PW_{name.upper()}",
        "ca_file": str(servers.cert),
        "timeout": 10,
    }
    settings.update(extra)
    return settings


@pytest.fixture
def cluster(
    tmp_path: Path, db_url: str, mail_servers: MailServers, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Cluster]:
    c = Cluster(tmp_path, db_url, transport="maildir")
    for name in c.names:
        monkeypatch.setenv(f"TEST_PW_{name.upper()}", password_of(name))
        c.set_mailbox(name, mailbox(mail_servers, name))
    c.host.add_rule("customers", down="IUD", up="IUD")
    c.execute("hq", customers.insert(), [{"id": i, "name": f"Kunde {i}"} for i in range(1, 11)])
    yield c
    c.close()


def deliver_and_sync(c: Cluster, servers: MailServers, sender: str, *receivers: str) -> None:
    """Sync ``sender``, wait until its mail is delivered, sync the receivers."""
    before = {r: servers.count(r) for r in receivers}
    built = c.nodes[sender].sync()
    assert not built.errors, built.errors
    for r in receivers:
        # every message that went to r this cycle — parts built now, parts
        # sent again (a send that failed last cycle), control messages
        sent = built.sent_to.get(r, 0)
        if sent:
            wait_for(lambda r=r, n=sent: servers.count(r) >= before[r] + n, f"mail for {r}")
        report = c.nodes[r].sync()
        assert not report.errors, report.errors


def converge(c: Cluster, servers: MailServers) -> None:
    for station in ("koeln", "berlin"):
        deliver_and_sync(c, servers, station, "hq")
    deliver_and_sync(c, servers, "hq", "koeln", "berlin")


def test_host_and_two_stations_over_imap_and_pop3(
    cluster: Cluster, mail_servers: MailServers
) -> None:
    deliver_and_sync(cluster, mail_servers, "hq", "koeln", "berlin")
    assert len(cluster.rows("koeln", customers)) == 10 == len(cluster.rows("berlin", customers))
    cluster.execute("koeln", customers.insert(), {"id": 100, "name": "Köln neu"})
    cluster.execute("berlin", customers.insert(), {"id": 200, "name": "Berlin neu"})
    cluster.execute("hq", update(customers).where(customers.c.id == 1).values(name="Geändert"))
    converge(cluster, mail_servers)
    assert cluster.agree("customers")
    # IMAP: processed mail moved to Processed; POP3: deleted after the commit
    applied = cluster.nodes["koeln"].status().links[0].in_seq
    assert mail_servers.count("koeln") == 0
    assert mail_servers.count("koeln", "Processed") == applied >= 2
    assert mail_servers.count("berlin") == 0


def test_smtp_down_mid_cycle_loses_nothing(cluster: Cluster, mail_servers: MailServers) -> None:
    mail_servers.stop_postfix()
    report = cluster.host.sync()
    assert report.errors and "connect" in report.errors[0]
    with cluster.engines["hq"].connect() as conn:
        unsent = conn.execute(
            select(func.count()).select_from(outbox).where(outbox.c.sent_at.is_(None))
        ).scalar()
    assert unsent == 2  # both changesets wait in the outbox
    mail_servers.start_postfix()
    deliver_and_sync(cluster, mail_servers, "hq", "koeln", "berlin")
    assert cluster.agree("customers")


def test_imap_and_pop3_down_then_recovery(cluster: Cluster, mail_servers: MailServers) -> None:
    cluster.host.sync()
    wait_for(lambda: mail_servers.count("koeln") == 1 and mail_servers.count("berlin") == 1, "mail")
    mail_servers.stop_dovecot()
    for name in ("koeln", "berlin"):
        report = cluster.nodes[name].sync()
        assert report.errors and "connection refused" in report.errors[0], report.errors
        assert cluster.rows(name, customers) == []
    mail_servers.start_dovecot()
    for name in ("koeln", "berlin"):
        assert not cluster.nodes[name].sync().errors
    assert cluster.agree("customers")


def test_wrong_password(
    cluster: Cluster, mail_servers: MailServers, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_PW_KOELN", "wrong")
    monkeypatch.setenv("TEST_PW_BERLIN", "wrong")
    cluster.host.sync()
    wait_for(lambda: mail_servers.count("koeln") == 1, "mail for koeln")
    for name in ("koeln", "berlin"):
        report = cluster.nodes[name].sync()
        assert any(f"login failed for {name}@{DOMAIN}" in e for e in report.errors), report.errors
        assert report.exit_code == 4  # the mailbox's, as the README's table says
    monkeypatch.setenv("TEST_PW_KOELN", password_of("koeln"))
    monkeypatch.setenv("TEST_PW_BERLIN", password_of("berlin"))
    for name in ("koeln", "berlin"):
        assert not cluster.nodes[name].sync().errors
    assert cluster.agree("customers")


def test_tls_name_mismatch(cluster: Cluster, mail_servers: MailServers) -> None:
    from mailsync.tools.mailcheck import check_mailbox

    deliver_and_sync(cluster, mail_servers, "hq", "koeln")
    settings = mailbox(mail_servers, "koeln")
    settings["receive"] = str(settings["receive"]).replace("localhost", "127.0.0.1")
    settings["send"] = str(settings["send"]).replace("localhost", "127.0.0.1")
    cluster.set_mailbox("koeln", settings)
    cluster.execute("koeln", customers.insert(), {"id": 300, "name": "x"})
    report = cluster.nodes["koeln"].sync()
    assert len(report.errors) == 2, report.errors  # receiving and sending
    assert all("TLS certificate not accepted" in e for e in report.errors), report.errors
    checks = check_mailbox(cluster.nodes["koeln"], wait_s=1)
    assert [c.ok for c in checks] == [False, False]
    assert "certificate is not valid for '127.0.0.1'" in checks[0].detail
    cluster.set_mailbox("koeln", mailbox(mail_servers, "koeln"))
    deliver_and_sync(cluster, mail_servers, "koeln", "hq")
    assert cluster.agree("customers", nodes=("hq", "koeln"))


def test_a_changeset_over_the_size_limit_travels_in_parts(
    cluster: Cluster, mail_servers: MailServers
) -> None:
    # our own limit: the changeset is cut into parts that each fit
    cluster.set_mailbox("hq", mailbox(mail_servers, "hq", max_message_bytes=40_000))
    cluster.execute(
        "hq", customers.insert(), {"id": 400, "name": "x", "photo": os.urandom(150_000)}
    )
    before = {r: mail_servers.count(r) for r in ("koeln", "berlin")}
    deliver_and_sync(cluster, mail_servers, "hq", "koeln", "berlin")
    for r in ("koeln", "berlin"):
        assert mail_servers.count(r) == before[r] == 0  # all parts taken, none left behind
    assert cluster.agree("customers")
    (link,) = cluster.nodes["berlin"].status().links
    assert link.in_seq == 1 and link.buffered == 0
    # the server's limit (10,240,000 bytes): its 552 answer names the setting to change
    cluster.set_mailbox("hq", mailbox(mail_servers, "hq", max_message_bytes=50_000_000))
    cluster.execute(
        "hq", update(customers).where(customers.c.id == 400).values(photo=os.urandom(8_000_000))
    )
    report = cluster.host.sync()
    assert any("refused" in e and "too large" in e for e in report.errors), report.errors
    assert any("max_message_bytes" in e for e in report.errors)


def test_mailbox_test_command(cluster: Cluster, mail_servers: MailServers) -> None:
    from mailsync.tools.mailcheck import check_mailbox

    for name in ("hq", "berlin"):
        results = check_mailbox(cluster.nodes[name], wait_s=20)
        assert [c.ok for c in results] == [True] * 4, results
        said = " ".join(c.detail for c in results)
        # POP3 has no folders: it does not claim to have made them
        assert ("folders ready" in said) == (name == "hq"), said
        assert ("POP3: mail is deleted once applied" in said) == (name == "berlin"), said
    cluster.set_mailbox("koeln", mailbox(mail_servers, "koeln", password_env="TEST_PW_NOPE"))
    results = check_mailbox(cluster.nodes["koeln"], wait_s=5)
    assert not results[0].ok and "TEST_PW_NOPE is not set" in results[0].detail


def test_a_mailbox_with_thousands_of_messages(cluster: Cluster, mail_servers: MailServers) -> None:
    """Fetched in batches: 1,200 stray mails are set aside and the real one applies."""
    import smtplib
    import ssl

    many = 1200
    context = ssl.create_default_context(cafile=str(mail_servers.cert))
    with smtplib.SMTP("localhost", mail_servers.ports["smtp"], timeout=30) as smtp:
        smtp.starttls(context=context)
        smtp.login(f"hq@{DOMAIN}", password_of("hq"))
        for i in range(many):
            smtp.sendmail(f"hq@{DOMAIN}", [f"koeln@{DOMAIN}"], f"Subject: news {i}\r\n\r\nhi\r\n")
    wait_for(lambda: mail_servers.count("koeln") == many, "stray mail delivered", 60)
    deliver_and_sync(cluster, mail_servers, "hq", "koeln")
    assert mail_servers.count("koeln", "Unrecognized") == many
    assert mail_servers.count("koeln") == 0
    assert cluster.agree("customers", nodes=("hq", "koeln"))


def test_the_same_run_with_aiosmtpd_for_developers_without_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mail_servers: MailServers
) -> None:
    """The stand-in SMTP server (aiosmtpd into Dovecot's LMTP) carries a sync too."""
    with MailServers(port_base=14000, smtp="aiosmtpd") as servers:
        c = Cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}", ("koeln",), transport="maildir")
        try:
            for name in c.names:
                monkeypatch.setenv(f"TEST_PW_{name.upper()}", password_of(name))
                c.set_mailbox(name, mailbox(servers, name))
            c.host.add_rule("customers", down="IUD", up="IUD")
            c.execute("hq", customers.insert(), {"id": 1, "name": "über aiosmtpd"})
            deliver_and_sync(c, servers, "hq", "koeln")
            c.execute("koeln", customers.insert(), {"id": 2, "name": "zurück"})
            deliver_and_sync(c, servers, "koeln", "hq")
            assert c.agree("customers")
        finally:
            c.close()


@pytest.mark.parametrize(
    "point",
    [
        "after-buffer",
        "in-apply",
        "after-apply",
        "after-build",
        "after-send",
        "witness-ahead",  # the restore witness written, the database not committed
        "witness-behind",  # the cycle's work committed, the witness not renewed
    ],
)
def test_sigkill_at_any_point_loses_nothing_and_applies_nothing_twice(
    cluster: Cluster, mail_servers: MailServers, point: str
) -> None:
    """`mailsync sync` killed with SIGKILL at a crash point, then run again."""
    import subprocess
    import sys

    from mailsync.faults import ENV

    def cli_sync(name: str, fault: str | None) -> int:
        env = {k: v for k, v in os.environ.items() if k != ENV}
        if fault:
            env[ENV] = fault
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "mailsync",
                "--config",
                str(cluster.root / name / "mailsync.toml"),
                "sync",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc.returncode

    deliver_and_sync(cluster, mail_servers, "hq", "koeln", "berlin")  # stations get their rules
    expected = {r[0] for r in cluster.rows("hq", customers)}
    killed = 0
    for step, name in enumerate(["hq", "koeln", "berlin", "hq", "koeln", "berlin"]):
        new = 1000 * (step + 1)
        cluster.execute(name, customers.insert(), {"id": new, "name": f"{name} {step}"})
        expected.add(new)
        rc = cli_sync(name, point)
        killed += rc == -9
        assert rc in (0, -9), rc
        assert cli_sync(name, None) == 0
        mail_servers.wait_delivered()
    assert killed, f"the crash point {point} was never reached"
    for _ in range(6):
        for name in cluster.names:
            assert cli_sync(name, None) == 0
        mail_servers.wait_delivered()
        if all({r[0] for r in cluster.rows(n, customers)} == expected for n in cluster.names):
            break
    for name in cluster.names:
        assert {r[0] for r in cluster.rows(name, customers)} == expected, name
    assert cluster.agree("customers")


def test_pop3_leaves_stray_mail_and_forwards_it_once(
    cluster: Cluster, mail_servers: MailServers
) -> None:
    import smtplib
    import ssl

    cluster.set_mailbox(
        "berlin", mailbox(mail_servers, "berlin", forward_unrecognized=f"admin@{DOMAIN}")
    )
    context = ssl.create_default_context(cafile=str(mail_servers.cert))
    with smtplib.SMTP("localhost", mail_servers.ports["smtp"], timeout=30) as smtp:
        smtp.starttls(context=context)
        smtp.login(f"hq@{DOMAIN}", password_of("hq"))
        smtp.sendmail(f"hq@{DOMAIN}", [f"berlin@{DOMAIN}"], "Subject: Rechnung?\r\n\r\nhi\r\n")
    wait_for(lambda: mail_servers.count("berlin") == 1, "stray mail")
    deliver_and_sync(cluster, mail_servers, "hq", "berlin")
    wait_for(lambda: mail_servers.count("admin") == 1, "forwarded mail")
    assert mail_servers.count("berlin") == 1  # POP3: left on the server
    report = cluster.nodes["berlin"].sync()  # remembered by UIDL: not taken again
    assert report.set_aside == 0 and report.received == 0
    mail_servers.wait_delivered()
    assert mail_servers.count("admin") == 1


def test_serve_syncs_on_its_schedule_runs_once_and_stops_on_sigterm(
    cluster: Cluster, mail_servers: MailServers
) -> None:
    """`mailsync serve` as a process: two cycles on a short interval, a
    second instance refused with where the first runs, a clean stop."""
    import signal
    import subprocess
    import sys

    from mailsync.link import aware
    from mailsync.store.tables import log_table, now, service_table

    config = cluster.root / "hq" / "mailsync.toml"
    config.write_text(config.read_text() + '\n[[schedule]]\nevery = "2s"\n')
    cli = [sys.executable, "-m", "mailsync", "--config", str(config)]

    def cycles() -> int:
        with cluster.engines["hq"].connect() as conn:
            return int(
                conn.execute(
                    select(func.count()).where(log_table.c.message.like("sync cycle done%"))
                ).scalar_one()
            )

    once = subprocess.run([*cli, "serve", "--once"], capture_output=True, text=True, timeout=120)
    assert once.returncode == 0, once.stderr
    assert cycles() == 1  # it had something to do (the initial load): an idle one says nothing
    seen: set[object] = set()
    started = now()

    def scheduled() -> int:
        """The service's cycles since it started, by its row's last cycle."""
        with cluster.engines["hq"].connect() as conn:
            at = conn.execute(select(service_table.c.last_cycle_at)).scalar()
        if at is not None and aware(at) > started:
            seen.add(at)
        return len(seen)

    proc = subprocess.Popen(
        [*cli, "serve"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for(lambda: scheduled() >= 2, "two scheduled cycles", timeout=60)
        second = subprocess.run([*cli, "serve"], capture_output=True, text=True, timeout=60)
        assert second.returncode == 2, second.stderr
        assert "runs already on" in second.stderr and f"(pid {proc.pid})" in second.stderr
        assert "Traceback" not in second.stderr
        status = subprocess.run([*cli, "status"], capture_output=True, text=True, timeout=60)
        assert "running since" in status.stdout and f"pid {proc.pid}" in status.stdout
        assert "last cycle" in status.stdout and "ok:" in status.stdout
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "Traceback" not in err and "SIGTERM" in out
    finally:
        if proc.poll() is None:
            proc.kill()
    status = subprocess.run([*cli, "status"], capture_output=True, text=True, timeout=60)
    assert "stopped since" in status.stdout


def test_mail_sessions_are_kept_between_cycles_and_renewed_when_gone(
    cluster: Cluster, mail_servers: MailServers
) -> None:
    """A node that cycles again keeps its IMAP and SMTP sessions (never
    POP3's); mail that came meanwhile is still seen on a kept session; a
    session the server dropped (both servers restarted) is replaced in the
    next cycle without an error; an idle one past ``max_idle`` is too."""
    deliver_and_sync(cluster, mail_servers, "hq", "koeln", "berlin")
    koeln, berlin = cluster.nodes["koeln"].cycle.keeper, cluster.nodes["berlin"].cycle.keeper
    kept = koeln.sessions()
    assert sorted(k.split(" ")[0] for k in kept) == ["receive", "send"], kept  # its ack went
    assert [k.split(" ")[0] for k in berlin.sessions()] == ["send"]  # POP3 never kept
    cluster.execute("hq", update(customers).where(customers.c.id == 1).values(name="eins"))
    deliver_and_sync(cluster, mail_servers, "hq", "koeln", "berlin")
    assert koeln.sessions() == kept  # the same sessions, and the new mail came through them
    assert cluster.rows("koeln", customers)[0][1] == "eins"
    mail_servers.stop_dovecot()
    mail_servers.stop_postfix()
    mail_servers.start_dovecot()
    mail_servers.start_postfix()
    cluster.execute("hq", update(customers).where(customers.c.id == 2).values(name="zwei"))
    deliver_and_sync(cluster, mail_servers, "hq", "koeln", "berlin")  # asserts no errors
    assert cluster.rows("koeln", customers)[1][1] == "zwei"
    renewed = koeln.sessions()
    assert all(renewed[k] is not kept[k] for k in kept)
    koeln.max_idle = 0.0
    cluster.execute("hq", update(customers).where(customers.c.id == 3).values(name="drei"))
    deliver_and_sync(cluster, mail_servers, "hq", "koeln", "berlin")
    assert cluster.rows("koeln", customers)[2][1] == "drei"
    assert all(koeln.sessions()[k] is not renewed[k] for k in kept)
    assert cluster.agree("customers")
    cluster.nodes["koeln"].close()
    assert koeln.sessions() == {}
