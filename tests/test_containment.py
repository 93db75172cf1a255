"""One station's failing mail does not stop another station's (DESIGN §12).

"A failure in one link never stops another": when the host cannot send to
berlin — its changeset is over ``max_message_bytes``, the mail server refuses
its address, or only a bare ack for it fails — koeln's changeset still goes
out in the same host cycle, the report names berlin's failure and not
koeln's, and berlin's entry waits in the outbox until the cause is gone.

A host with stations koeln and berlin shares ``customers`` by a row filter
(``city = :station``), so each row goes to exactly one of them. The cases run
over a memory post office whose server can refuse recipients (as mailsync's
SMTP sender reports a 5xx answer to RCPT TO), and the refusal once more over
real Postfix. Only the public API is used: the node, its config, its status
and its cycle report (``peer_errors``, ``sent_to``, ``errors``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# The only mailsync modules this file names: delivery.py is being split into
# mailsync/cycle/*, so nothing of it (or of node's internals) is named here.
from mailsync import CycleReport, trust
from mailsync.errors import TransportError
from mailsync.transport.memory import MemoryPostOffice
from tests.cluster import DOMAIN, Cluster, customers
from tests.servers.mail import MailServers, password_of
from tests.test_mail import deliver_and_sync, mailbox, wait_for


def address(name: str) -> str:
    return f"{name}@{DOMAIN}"


class RefusingPostOffice(MemoryPostOffice):
    """A memory post office whose mail server refuses the addresses in
    ``refused`` the way mailsync's SMTP sender reports a 5xx answer to
    RCPT TO: a :class:`TransportError` naming the recipient."""

    def __init__(self) -> None:
        super().__init__()
        self.refused: set[str] = set()

    def deliver(self, recipient: str, raw: bytes) -> str:
        if recipient in self.refused:
            raise TransportError(
                f"smtp+starttls://hq%40{DOMAIN}@mail.{DOMAIN}:587: recipient {recipient} "
                f"refused (550 5.1.1 <{recipient}>: Recipient address rejected: "
                "User unknown in virtual mailbox table)",
                hint="check the peer's address (`mailsync station show` / the bundle)",
                scope="peer",
            )
        return super().deliver(recipient, raw)


def customer(i: int, city: str, **values: object) -> dict[str, object]:
    return {"id": i, "name": f"Kunde {i}", "city": city, **values}


def link(c: Cluster, node: str, peer: str) -> Any:
    """``node``'s view of its link to ``peer``, as ``mailsync status`` shows it."""
    return next(x for x in c.nodes[node].status().links if x.peer == peer)


def memory_box(name: str, **extra: object) -> dict[str, object]:
    return {"address": address(name), "send": "memory:", "receive": "memory:", **extra}


@pytest.fixture
def office() -> RefusingPostOffice:
    return RefusingPostOffice()


@pytest.fixture
def cluster(tmp_path: Path, office: RefusingPostOffice) -> Iterator[Cluster]:
    """hq, koeln and berlin with their rules in place and every outbox empty."""
    c = Cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}", ("koeln", "berlin"), office=office)
    try:
        c.host.add_rule("customers", down="IUD", up="IUD", row_filter="city = :station")
        c.sync("hq", "koeln", "berlin", "hq")
        for peer in ("koeln", "berlin"):
            assert (link(c, "hq", peer).unsent, link(c, "hq", peer).unacked) == (0, 0)
            assert office.pending(address(peer)) == 0
        yield c
    finally:
        c.close()


def assert_koeln_served_and_berlin_held(
    c: Cluster, office: RefusingPostOffice, report: CycleReport, koeln_row: int, berlin_error: str
) -> None:
    """After one host cycle (``report``): koeln's changeset is in koeln's
    mailbox and applies there; the report blames berlin alone; berlin got
    nothing."""
    assert office.pending(address("koeln")) == 1, (
        f"koeln's changeset was not sent in the cycle in which berlin's mail failed: "
        f"sent_to={dict(report.sent_to)}, errors={report.errors}"
    )
    assert report.sent_to["koeln"] == 1
    assert c.nodes["koeln"].sync().rows_applied == 1
    assert [r[0] for r in c.rows("koeln", customers)] == [koeln_row]
    assert set(report.peer_errors) == {"berlin"}, report.peer_errors
    assert berlin_error in report.peer_errors["berlin"]
    assert any(berlin_error in e for e in report.errors), report.errors
    assert report.sent_to["berlin"] == 0
    assert office.pending(address("berlin")) == 0


def test_a_changeset_over_the_size_limit_for_one_station_does_not_hold_up_another(
    cluster: Cluster, office: RefusingPostOffice
) -> None:
    c = cluster
    # berlin's changeset is built under the default limit while its mail
    # server is away, so it waits unsent in the outbox ...
    photo = os.urandom(60_000)  # incompressible: the message stays this big
    c.execute("hq", customers.insert(), customer(1, "berlin", photo=photo))
    office.refused.add(address("berlin"))
    assert c.host.sync().errors
    office.refused.clear()
    assert link(c, "hq", "berlin").unsent == 1
    # ... and the limit is lowered under it before it goes
    c.set_mailbox("hq", memory_box("hq", max_message_bytes=20_000))
    c.execute("hq", customers.insert(), customer(2, "koeln"))
    report = c.host.sync()

    assert_koeln_served_and_berlin_held(c, office, report, 2, "max_message_bytes")
    assert link(c, "hq", "berlin").unsent == 1  # still there, not dropped
    # the limit goes back up: berlin's changeset goes as it was built
    c.set_mailbox("hq", memory_box("hq"))
    report = c.host.sync()
    assert not report.errors and report.sent_to["berlin"] == 1
    assert c.nodes["berlin"].sync().rows_applied == 1
    assert c.rows("berlin", customers)[0][7] == photo


def test_a_station_address_the_mail_server_refuses_does_not_hold_up_another(
    cluster: Cluster, office: RefusingPostOffice
) -> None:
    c = cluster
    office.refused.add(address("berlin"))
    c.execute("hq", customers.insert(), [customer(1, "berlin"), customer(2, "koeln")])
    report = c.host.sync()

    assert_koeln_served_and_berlin_held(
        c, office, report, 2, f"recipient {address('berlin')} refused"
    )
    assert link(c, "hq", "berlin").unsent == 1
    # the address is fixed at the provider: the changeset waiting goes
    office.refused.clear()
    report = c.host.sync()
    assert not report.errors and report.sent_to["berlin"] == 1
    assert c.nodes["berlin"].sync().rows_applied == 1
    assert [r[0] for r in c.rows("berlin", customers)] == [1]


def test_a_bare_ack_that_cannot_reach_one_station_does_not_hold_up_another(
    cluster: Cluster, office: RefusingPostOffice
) -> None:
    c = cluster
    # berlin sends a row up; the host owes it an ack and has no data for it
    # (the row is berlin's own), so the ack goes alone, as a control message
    c.execute("berlin", customers.insert(), customer(3, "berlin"))
    assert c.nodes["berlin"].sync().sent == 1
    office.refused.add(address("berlin"))
    c.execute("hq", customers.insert(), customer(2, "koeln"))
    report = c.host.sync()

    assert report.rows_applied == 1  # berlin's row arrived
    assert link(c, "hq", "berlin").unsent == 0  # nothing but the ack was due for berlin
    assert_koeln_served_and_berlin_held(
        c, office, report, 2, f"recipient {address('berlin')} refused"
    )
    # the ack is due until it is sent: next cycle it goes, and berlin's
    # changeset leaves berlin's outbox
    office.refused.clear()
    report = c.host.sync()
    assert not report.errors and report.sent_to["berlin"] == 1
    c.nodes["berlin"].sync()
    berlin = link(c, "berlin", "hq")
    assert berlin.acked_seq == berlin.out_seq == 1 and berlin.unacked == berlin.unsent == 0


def test_a_station_the_host_cannot_seal_for_does_not_hold_up_another(
    cluster: Cluster, office: RefusingPostOffice
) -> None:
    """berlin's key is gone from the host (an admin's slip): neither its
    changeset nor the ack it is owed can be sealed; koeln is served all the
    same."""
    c = cluster
    c.execute("berlin", customers.insert(), customer(3, "berlin"))
    assert c.nodes["berlin"].sync().sent == 1
    office.refused.add(address("berlin"))
    assert c.host.sync().rows_applied == 1  # berlin's row arrived; its ack did not go
    office.refused.clear()
    with c.engines["hq"].begin() as conn:
        trust.forget_peer(conn, "berlin")
    c.execute("hq", customers.insert(), [customer(1, "berlin"), customer(2, "koeln")])
    report = c.host.sync()

    assert_koeln_served_and_berlin_held(c, office, report, 2, "no public key for 'berlin'")
    assert any(e.startswith("controls for berlin: no public key") for e in report.errors)
    assert link(c, "hq", "berlin").unsent == 0  # nothing was built for it ...
    # ... and its cursor stayed: both new rows still wait (status counts before the filter)
    assert link(c, "hq", "berlin").pending_changes == 2


def test_a_station_address_postfix_refuses_does_not_hold_up_another(
    tmp_path: Path, mail_servers: MailServers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refusal of the memory case, from a real SMTP server: berlin's
    mailbox is deleted at the provider, and RCPT TO gets a 550."""
    c = Cluster(
        tmp_path, f"sqlite:///{tmp_path / 'hq.db'}", ("koeln", "berlin"), transport="maildir"
    )
    try:
        for name in c.names:
            monkeypatch.setenv(f"TEST_PW_{name.upper()}", password_of(name))
            c.set_mailbox(name, mailbox(mail_servers, name))
        c.host.add_rule("customers", down="IUD", up="IUD", row_filter="city = :station")
        deliver_and_sync(c, mail_servers, "hq", "koeln", "berlin")  # the rules
        for station in ("koeln", "berlin"):
            deliver_and_sync(c, mail_servers, station, "hq")  # their acks
        mail_servers.wait_delivered()
        assert mail_servers.count("koeln") == mail_servers.count("berlin") == 0

        mail_servers.set_unknown("berlin")
        c.execute("hq", customers.insert(), [customer(1, "berlin"), customer(2, "koeln")])
        report = c.host.sync()
        mail_servers.set_unknown()

        assert report.sent_to["koeln"] == 1, (
            f"koeln's changeset was not sent in the cycle in which berlin's mail failed: "
            f"sent_to={dict(report.sent_to)}, errors={report.errors}"
        )
        wait_for(lambda: mail_servers.count("koeln") == 1, "koeln's changeset delivered")
        assert c.nodes["koeln"].sync().rows_applied == 1
        assert [r[0] for r in c.rows("koeln", customers)] == [2]
        assert set(report.peer_errors) == {"berlin"}, report.peer_errors
        assert f"recipient {address('berlin')} refused (550" in report.peer_errors["berlin"]
        assert report.sent_to["berlin"] == 0
        assert link(c, "hq", "berlin").unsent == 1
        # the mailbox is back: what waited goes
        report = c.host.sync()
        assert not report.errors and report.sent_to["berlin"] == 1
        wait_for(lambda: mail_servers.count("berlin") == 1, "berlin's changeset delivered")
        assert c.nodes["berlin"].sync().rows_applied == 1
        assert [r[0] for r in c.rows("berlin", customers)] == [1]
    finally:
        c.close()
