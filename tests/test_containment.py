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

A station's input is untrusted (DESIGN §12): berlin, with its own valid
keys, sends what a buggy or hostile station might — numbers no column holds,
an over-long id, a garbled value, a control kind from a newer version — or
the host's table under berlin's rule is dropped, or berlin's mailbox is
full. Each time one host cycle sets berlin's message aside (or holds
berlin's link) with its reason, does not raise, and serves koeln. These
forge messages with the wire codecs (``mailsync.wire``), as berlin's own
mailsync would seal them, and read the node's log table. The other way
round, what fails every recipient alike (the server refuses hq's sender
address, the post office's disk is full) is the mailbox's failure: reported
once, not as a peer error for each station in turn.
"""

from __future__ import annotations

import errno
import io
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from sqlalchemy import select

# The only mailsync modules this file names: delivery.py is being split into
# mailsync/cycle/*, so nothing of it (or of node's internals) is named here;
# the wire codecs and the log table are what a station and an admin see.
from mailsync import CycleReport, trust
from mailsync.cycle import apply as cycle_apply
from mailsync.cycle import receive as receive_stage
from mailsync.errors import TransportError
from mailsync.store.tables import changes, log_table
from mailsync.transport.memory import MemoryPostOffice
from mailsync.wire.changeset import ChangesetWriter
from mailsync.wire.envelope import Codec, Header
from mailsync.wire.message import Address, build_message
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


def started(tmp_path: Path, host_url: str, office: RefusingPostOffice) -> Cluster:
    """hq (on ``host_url``), koeln and berlin with their rules in place and
    every outbox empty."""
    c = Cluster(tmp_path, host_url, ("koeln", "berlin"), office=office)
    try:
        c.host.add_rule("customers", down="IUD", up="IUD", row_filter="city = :station")
        c.sync("hq", "koeln", "berlin", "hq")
        for peer in ("koeln", "berlin"):
            assert (link(c, "hq", peer).unsent, link(c, "hq", peer).unacked) == (0, 0)
            assert office.pending(address(peer)) == 0
    except BaseException:
        c.close()
        raise
    return c


@pytest.fixture
def cluster(tmp_path: Path, office: RefusingPostOffice) -> Iterator[Cluster]:
    """The cluster with the host on SQLite."""
    c = started(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}", office)
    yield c
    c.close()


@pytest.fixture
def db_cluster(tmp_path: Path, db_url: str, office: RefusingPostOffice) -> Iterator[Cluster]:
    """The cluster with the host on each database (what a column holds differs)."""
    c = started(tmp_path, db_url, office)
    yield c
    c.close()


def assert_koeln_served(
    c: Cluster, office: MemoryPostOffice, report: CycleReport, koeln_row: int
) -> None:
    """After one host cycle (``report``): koeln's changeset is in koeln's
    mailbox and applies there."""
    assert office.pending(address("koeln")) == 1, (
        f"koeln's changeset was not sent in the cycle in which berlin's mail failed: "
        f"sent_to={dict(report.sent_to)}, errors={report.errors}"
    )
    assert report.sent_to["koeln"] == 1
    assert c.nodes["koeln"].sync().rows_applied == 1
    assert [r[0] for r in c.rows("koeln", customers)] == [koeln_row]


def berlin_catches_up(c: Cluster, ids: list[int]) -> None:
    """The cause is gone: the next host cycle sends what waited for berlin,
    and berlin applies it."""
    report = c.host.sync()
    assert not report.errors and report.sent_to["berlin"] == 1
    assert c.nodes["berlin"].sync().rows_applied == len(ids)
    assert [r[0] for r in c.rows("berlin", customers)] == ids


def assert_koeln_served_and_berlin_held(
    c: Cluster, office: MemoryPostOffice, report: CycleReport, koeln_row: int, berlin_error: str
) -> None:
    """After one host cycle (``report``): koeln is served; the report blames
    berlin alone; berlin got nothing."""
    assert_koeln_served(c, office, report, koeln_row)
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
    berlin_catches_up(c, [1])


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
        # Postfix reads its mailbox table per smtpd process: the session hq
        # kept from its last cycle still has the old one
        c.host.cycle.keeper.close()
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


# ---------------------------------------------------- what a station sends


Write = Callable[[ChangesetWriter], None]


def from_berlin(c: Cluster, office: MemoryPostOffice, write: Write, **fields: Any) -> None:
    """Put into hq's mailbox a message sealed as berlin's mailsync seals one:
    signed with berlin's own key, for hq's. Unsequenced (controls) unless
    ``seq`` is given; it carries berlin's real ack unless ``ack`` is."""
    fields.setdefault("ack", link(c, "berlin", "hq").in_seq)
    if fields.setdefault("seq", 0):
        fields.setdefault("cid", uuid.uuid4().hex)
    else:  # numbered as berlin numbers its controls: by the clock, in µs
        fields.setdefault("ctl", time.time_ns() // 1000)
    header = Header("berlin", "hq", **fields)
    codec = Codec()
    buffer = io.BytesIO()
    body = codec.body_writer(buffer)
    writer = ChangesetWriter(body, {"from": "berlin", "to": "hq"})
    write(writer)
    writer.close()
    body.close()  # type: ignore[no-untyped-call]
    sealed = codec.seal(
        header, buffer.getvalue(), c.host.ring.current.public, c.nodes["berlin"].ring.current.sign
    )
    sender, recipient = Address("berlin", address("berlin")), Address("hq", address("hq"))
    office.deliver(address("hq"), build_message(header, sender, recipient, sealed))


def control(kind: str, payload: Any) -> Write:
    return lambda writer: writer.control(kind, payload)


def logged(c: Cluster, event: str) -> list[str]:
    """hq's log lines of ``event``."""
    with c.engines["hq"].connect() as conn:
        query = select(log_table.c.message).where(log_table.c.event == event)
        return list(conn.execute(query).scalars())


def assert_set_aside_and_koeln_served(
    c: Cluster, office: MemoryPostOffice, report: CycleReport, reason: str
) -> None:
    """berlin's message left hq's mailbox for the side, with ``reason`` in
    its rejection and in a 'rejected' log line; nobody's link is held, and
    koeln's customer 2 went out in the same cycle."""
    assert report.set_aside == 1, (report.set_aside, report.errors)
    assert office.pending(address("hq")) == 0
    ((_, why),) = office.aside[address("hq")]
    assert reason in why, why
    assert any(reason in line for line in logged(c, "rejected")), logged(c, "rejected")
    assert not report.peer_errors, report.peer_errors
    assert_koeln_served(c, office, report, 2)


@pytest.mark.parametrize("wanted", [[2**64 - 1], [[2**63, 1]]], ids=["sequence-number", "part"])
def test_a_resend_request_for_a_number_no_column_holds_is_set_aside(
    db_cluster: Cluster, office: RefusingPostOffice, wanted: list[Any]
) -> None:
    """It used to reach the outbox query: SQLite cannot bind the number, and
    the cycle failed on every run, for every station."""
    c = db_cluster
    from_berlin(c, office, control("resend", wanted))
    c.execute("hq", customers.insert(), customer(2, "koeln"))
    report = c.host.sync()

    assert_set_aside_and_koeln_served(c, office, report, "is out of range")


def test_a_reload_request_with_an_id_longer_than_its_column_is_set_aside(
    db_cluster: Cluster, office: RefusingPostOffice
) -> None:
    """mailsync_links.reload_request is String(32): PostgreSQL refused the
    40 characters and the cycle failed; SQLite stored them and reloaded."""
    c = db_cluster
    from_berlin(c, office, control("reload", {"in_seq": 0, "id": "r" * 40}))
    c.execute("hq", customers.insert(), customer(2, "koeln"))
    report = c.host.sync()

    assert_set_aside_and_koeln_served(c, office, report, "id is not a name of 1–32 characters")
    # no full load went to berlin (on SQLite, where the id fit, one did)
    assert report.sent_to["berlin"] == 0 and office.pending(address("berlin")) == 0


def test_a_header_ack_no_column_holds_is_set_aside(
    db_cluster: Cluster, office: RefusingPostOffice
) -> None:
    """An ack beyond what we sent reads as our database gone back to a
    backup: the 2**63 went into out_seq, a BIGINT, and failed the cycle."""
    c = db_cluster
    from_berlin(c, office, lambda writer: None, ack=2**63)
    c.execute("hq", customers.insert(), customer(2, "koeln"))
    report = c.host.sync()

    assert_set_aside_and_koeln_served(c, office, report, "envelope header has impossible numbers")
    berlin = link(c, "hq", "berlin")  # not taken for a restored backup of hq's
    assert (berlin.out_seq, berlin.acked_seq, berlin.restore) == (1, 1, None)


def berlin_rows(*rows: tuple[Any, ...], between: Write | None = None) -> Write:
    """A changeset of berlin's customers, ``between`` written after the first row."""

    def write(writer: ChangesetWriter) -> None:
        table = writer.table(
            "customers", [("id", "INTEGER"), ("name", "VARCHAR"), ("city", "VARCHAR")], ["id"]
        )
        first, *rest = rows
        writer.rows(table, "I", [first])
        if between is not None:
            between(writer)
        writer.rows(table, "I", rest)

    return write


def test_a_changeset_with_a_garbled_decimal_holds_only_its_station(
    db_cluster: Cluster, office: RefusingPostOffice
) -> None:
    """The Decimal's text is decoded in the apply stage: the
    decimal.InvalidOperation it raised escaped every guard and failed the
    cycle. Now the changeset is corrupt: berlin's link is held, koeln served."""
    c = db_cluster
    garbled = msgpack.ExtType(1, b"12,50 EUR")  # 1: a Decimal's extension type
    rows = berlin_rows((5, "Kunde 5", "berlin"), (6, garbled, "berlin"))
    from_berlin(c, office, rows, seq=1)
    c.execute("hq", customers.insert(), customer(2, "koeln"))
    report = c.host.sync()

    assert report.set_aside == 0 and report.received_from["berlin"] == 1
    assert_koeln_served_and_berlin_held(c, office, report, 2, "changeset is corrupt")
    assert any("changeset #1 from berlin" in line for line in logged(c, "apply-failed"))
    berlin = link(c, "hq", "berlin")
    assert (berlin.in_seq, berlin.buffered) == (0, 1)  # it waits, for an admin to see
    assert [r[0] for r in c.rows("hq", customers)] == [2]  # nothing of it applied


def test_a_control_kind_from_a_newer_version_is_ignored_and_its_ack_acted_on(
    cluster: Cluster, office: RefusingPostOffice
) -> None:
    """A rolling upgrade: berlin, one version ahead, sends its ack with a
    control this host does not know. The whole message used to be set
    aside, ack included, so hq's changeset for berlin was never taken out
    of the outbox and went again and again."""
    c = cluster
    c.execute("hq", customers.insert(), customer(1, "berlin"))
    c.host.sync()
    assert c.nodes["berlin"].sync().rows_applied == 1
    assert office.pending(address("hq")) == 1  # berlin's own bare ack ...
    office.boxes[address("hq")].clear()  # ... is replaced by the newer version's
    from_berlin(c, office, control("future-thing", {"since": "2.0"}))
    assert link(c, "hq", "berlin").unacked == 1
    c.execute("hq", customers.insert(), customer(2, "koeln"))
    report = c.host.sync()

    assert report.set_aside == 0 and not report.errors, report.errors
    assert report.received_from["berlin"] == 1
    berlin = link(c, "hq", "berlin")
    assert berlin.acked_seq == berlin.out_seq == 2 and berlin.unacked == 0  # rules, customer 1
    (line,) = logged(c, "control-ignored")
    assert "'future-thing' from berlin" in line
    assert_koeln_served(c, office, report, 2)


def test_a_control_kind_from_a_newer_version_inside_a_changeset_applies_the_rows_around_it(
    cluster: Cluster, office: RefusingPostOffice
) -> None:
    """The changeset used to fail as a whole and hold berlin's link."""
    c = cluster
    rows = berlin_rows(
        (5, "Kunde 5", "berlin"),
        (6, "Kunde 6", "berlin"),
        between=control("future-thing", {"since": "2.0"}),
    )
    from_berlin(c, office, rows, seq=1)
    c.execute("hq", customers.insert(), customer(2, "koeln"))
    report = c.host.sync()

    assert not report.errors, report.errors
    assert report.rows_applied == 2
    assert [r[0] for r in c.rows("hq", customers)] == [2, 5, 6]
    assert link(c, "hq", "berlin").in_seq == 1
    assert_koeln_served(c, office, report, 2)


def customer_changes(c: Cluster) -> list[int]:
    """The ids of hq's change-log entries for customers."""
    with c.engines["hq"].connect() as conn:
        query = select(changes.c.id).where(changes.c.tbl == "customers").order_by(changes.c.id)
        return list(conn.execute(query).scalars())


def test_a_table_dropped_under_one_station_s_rule_holds_only_that_station(
    db_cluster: Cluster, office: RefusingPostOffice
) -> None:
    """The capture check of every synced table ran before any link was
    built: a table dropped on the host failed it, and with it the build
    for every station and the purge after it — on every cycle."""
    c = db_cluster
    for name in ("hq", "berlin"):
        with c.engines[name].begin() as conn:
            conn.exec_driver_sql("CREATE TABLE berlin_only (id INTEGER PRIMARY KEY, note TEXT)")
    c.host.add_rule("berlin_only", down="IUD", up="IUD", station="berlin")
    c.sync("hq", "berlin", "hq")
    # a change koeln gets and acknowledges: its ack waits in hq's mailbox
    c.execute("hq", customers.insert(), customer(1, "koeln"))
    c.host.sync()
    assert c.nodes["koeln"].sync().rows_applied == 1
    (acknowledged,) = customer_changes(c)
    with c.engines["hq"].begin() as conn:
        conn.exec_driver_sql("DROP TABLE berlin_only")
    c.execute("hq", customers.insert(), customer(2, "koeln"))
    report = c.host.sync()

    assert set(report.peer_errors) == {"berlin"}, report.peer_errors
    assert "berlin_only" in report.peer_errors["berlin"]
    assert "does not exist" in report.peer_errors["berlin"]
    assert any("building for berlin" in line for line in logged(c, "build-failed"))
    assert report.sent_to["berlin"] == 0
    # purge ran: what koeln acknowledged is gone, what it has yet to is kept
    (waiting,) = customer_changes(c)
    assert waiting > acknowledged
    assert office.pending(address("koeln")) == 1
    assert c.nodes["koeln"].sync().rows_applied == 1
    assert [r[0] for r in c.rows("koeln", customers)] == [1, 2]


class Provider:
    """An aiosmtpd handler, as a mail provider answers: RCPT TO for an
    address in ``full`` is put off with 452 (mailbox full, try later); MAIL
    FROM is refused with 550 while ``refusing_sender``. Accepted mail goes
    into the memory post office."""

    def __init__(self, office: MemoryPostOffice) -> None:
        self.office = office
        self.full: set[str] = set()
        self.refusing_sender = False
        self.put_off = 0
        self.senders_refused = 0

    async def handle_MAIL(
        self, server: object, session: object, envelope: Any, address: str, options: object
    ) -> str:
        if self.refusing_sender:
            self.senders_refused += 1
            return f"550 5.7.1 <{address}>: Sender address rejected: not owned by user"
        envelope.mail_from = address
        return "250 OK"

    async def handle_RCPT(
        self, server: object, session: object, envelope: Any, address: str, options: object
    ) -> str:
        if address in self.full:
            self.put_off += 1
            return "452 4.2.2 Mailbox full"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: object, session: object, envelope: Any) -> str:
        for recipient in envelope.rcpt_tos:
            self.office.deliver(recipient, envelope.content)
        return "250 OK"


@pytest.fixture
def smtp(office: RefusingPostOffice) -> Iterator[tuple[int, Provider]]:
    """An SMTP server (plain, no login) on a free port, delivering into ``office``."""
    from aiosmtpd.controller import Controller

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    handler = Provider(office)
    server = Controller(handler, hostname="127.0.0.1", port=port)
    server.start()
    yield port, handler
    server.stop()


def test_a_station_whose_mailbox_stays_full_does_not_hold_up_another(
    cluster: Cluster, office: RefusingPostOffice, smtp: tuple[int, Provider]
) -> None:
    """A 4xx to RCPT TO is retried; once the retries run out it used to be
    reported as the mailbox's failure, which ended the send stage for every
    station behind berlin."""
    c = cluster
    port, server = smtp
    c.set_mailbox("hq", memory_box("hq", send=f"smtp://127.0.0.1:{port}"))
    server.full.add(address("berlin"))
    c.execute("hq", customers.insert(), [customer(1, "berlin"), customer(2, "koeln")])
    report = c.host.sync()

    assert server.put_off == 3  # every attempt
    assert_koeln_served_and_berlin_held(
        c, office, report, 2, f"sending to {address('berlin')} failed 3 times"
    )
    assert "452" in report.peer_errors["berlin"] and "Mailbox full" in report.peer_errors["berlin"]
    assert link(c, "hq", "berlin").unsent == 1
    # berlin's mailbox has room again: what waited goes
    server.full.clear()
    berlin_catches_up(c, [1])


def test_a_sender_address_the_server_refuses_ends_the_send_stage_for_everyone(
    cluster: Cluster, office: RefusingPostOffice, smtp: tuple[int, Provider]
) -> None:
    """A refused MAIL FROM (the login does not own hq's address) fails every
    message alike: it is the mailbox's failure, reported once, not a peer
    error for each station in turn, each tried again."""
    c = cluster
    port, server = smtp
    c.set_mailbox("hq", memory_box("hq", send=f"smtp://127.0.0.1:{port}"))
    server.refusing_sender = True
    c.execute("hq", customers.insert(), [customer(1, "berlin"), customer(2, "koeln")])
    report = c.host.sync()

    assert server.senders_refused == 1
    assert not report.peer_errors, report.peer_errors
    (error,) = report.errors
    assert "550 5.7.1" in error and "Sender address rejected" in error
    assert any("550 5.7.1" in line for line in logged(c, "mailbox"))
    assert report.sent == 0
    assert (link(c, "hq", "berlin").unsent, link(c, "hq", "koeln").unsent) == (1, 1)


def test_a_full_disk_under_the_post_office_is_the_mailbox_s_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Maildir post office on a full disk fails every recipient alike:
    reported once as the mailbox's, not as a peer error for each station."""
    from mailsync.transport import maildir

    c = Cluster(
        tmp_path, f"sqlite:///{tmp_path / 'hq.db'}", ("koeln", "berlin"), transport="maildir"
    )
    try:
        c.host.add_rule("customers", down="IUD", up="IUD", row_filter="city = :station")
        c.sync("hq", "koeln", "berlin", "hq")
        attempts: list[str] = []

        def full_disk(box: Path, raw: bytes) -> str:
            attempts.append(box.name)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(maildir, "deliver", full_disk)
        c.execute("hq", customers.insert(), [customer(1, "berlin"), customer(2, "koeln")])
        report = c.host.sync()

        assert attempts == [address("berlin")]
        assert not report.peer_errors, report.peer_errors
        (error,) = report.errors
        assert "No space left on device" in error
        assert report.sent == 0
    finally:
        c.close()


# ------------------------------------------- found while writing the above


def test_a_row_value_the_database_cannot_hold_is_parked_not_fatal(
    db_cluster: Cluster, office: RefusingPostOffice
) -> None:
    """DESIGN §7: a row that cannot be applied (constraint, type) is parked
    and the rest applies. PostgreSQL refuses 2**63 for an INTEGER with a
    DataError; SQLite's driver raises a bare OverflowError, which once
    escaped every guard of the apply stage."""
    c = db_cluster
    rows = berlin_rows((5, "Kunde 5", "berlin"), (2**63, "Kunde 2**63", "berlin"))
    from_berlin(c, office, rows, seq=1)
    c.execute("hq", customers.insert(), customer(2, "koeln"))
    report = c.host.sync()

    assert not report.errors, report.errors
    assert (report.rows_applied, report.rows_parked) == (1, 1)
    assert [r[0] for r in c.rows("hq", customers)] == [2, 5]
    assert link(c, "hq", "berlin").in_seq == 1
    assert_koeln_served(c, office, report, 2)


@pytest.mark.parametrize(
    "fields", [{"seq": 2**62}, {"seq": 1, "parts": 2**31 - 1}], ids=["sequence-number", "parts"]
)
def test_a_changeset_numbered_far_beyond_its_link_is_set_aside_not_buffered(
    db_cluster: Cluster, office: RefusingPostOffice, fields: dict[str, int]
) -> None:
    """DESIGN §12: header numbers have limits; what breaks them is set aside
    with a reason, never buffered. A BIGINT holds 2**62, but a link at #0
    cannot be waiting for it: every number below it would be a gap to ask
    for. (Set aside before anything reads hq's status: the buffered one
    makes status list 2**62 missing numbers.)"""
    c = db_cluster
    from_berlin(c, office, lambda writer: None, **fields)
    c.execute("hq", customers.insert(), customer(2, "koeln"))
    report = c.host.sync()

    assert report.set_aside == 1, f"buffered: {fields}"
    assert_set_aside_and_koeln_served(c, office, report, "")
    assert link(c, "hq", "berlin").buffered == 0


def test_a_bug_met_in_one_station_s_changeset_holds_only_that_station(
    cluster: Cluster, office: RefusingPostOffice, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected exception (a bug, not a MailsyncError) while applying
    berlin's changeset holds berlin's link with its reason; koeln's
    changeset applies in the same cycle, and berlin's waits for the fix."""
    c = cluster
    real = cycle_apply.apply_buffered

    def buggy(*args: Any, **kw: Any) -> Any:
        if kw["peer"] == "berlin":
            raise KeyError("a bug")
        return real(*args, **kw)

    monkeypatch.setattr(cycle_apply, "apply_buffered", buggy)
    c.execute("berlin", customers.insert(), customer(3, "berlin"))
    c.execute("koeln", customers.insert(), customer(4, "koeln"))
    c.sync("berlin", "koeln")
    report = c.host.sync()

    assert [a.peer for a in report.applied] == ["koeln"]
    assert set(report.peer_errors) == {"berlin"}
    assert "unexpected KeyError" in report.peer_errors["berlin"]
    assert link(c, "hq", "berlin").buffered == 1
    monkeypatch.setattr(cycle_apply, "apply_buffered", real)  # the fix
    assert c.host.sync().rows_applied == 1
    assert {r[0] for r in c.rows("hq", customers)} == {3, 4}


def test_a_bug_met_in_one_station_s_message_leaves_it_in_the_mailbox_and_holds_nothing_else(
    cluster: Cluster, office: RefusingPostOffice, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected exception while receiving berlin's message: it stays
    in hq's mailbox for the next cycle, koeln's message is received and
    applied in the same cycle."""
    c = cluster
    real = receive_stage._buffer

    def buggy(*args: Any, **kw: Any) -> bool:
        if any(isinstance(a, Header) and a.sender == "berlin" for a in args):
            raise KeyError("a bug")
        return real(*args, **kw)

    monkeypatch.setattr(receive_stage, "_buffer", buggy)
    c.execute("berlin", customers.insert(), customer(3, "berlin"))
    c.execute("koeln", customers.insert(), customer(4, "koeln"))
    c.sync("berlin", "koeln")
    report = c.host.sync()

    assert report.rows_applied == 1 and set(report.peer_errors) == {"berlin"}
    assert "unexpected KeyError" in report.peer_errors["berlin"]
    assert office.pending(address("hq")) == 1  # berlin's, left for the next cycle
    monkeypatch.setattr(receive_stage, "_buffer", real)  # the fix
    assert c.host.sync().rows_applied == 1
    assert {r[0] for r in c.rows("hq", customers)} == {3, 4}
