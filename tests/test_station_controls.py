"""What a station says in its controls is checked, and acted on once (DESIGN §12).

A station's keys sign whatever it sends, so a stolen laptop, a buggy
station or anyone who can copy mail in the host's mailbox can send the host
validly signed controls. Two rules hold against them:

- The hoarding cap is the host's count, not the station's: a lease counts
  as used only as far as the host holds rows with its numbers (a range bound
  to a column), or, unbound, only once the host has sent it. Thirty false
  range reports in one host cycle leave the station at the cap of unused
  blocks.
- Control messages are numbered in their signed header; one not above the
  last acted on (a copy replayed from the mailbox) is logged
  ("control-replayed") and ignored: a range report does not lease again, a
  resend request does not send again, a reload request does not reload.

The messages are forged here as koeln's mailsync seals them: with the wire
codecs, signed with koeln's own key for hq's. A replay is the very bytes of
a message hq already took, delivered again.

Issue 15's two classes here (false range reports, control replay) each have
a test in which berlin's order arrives in the same host cycle as koeln's
hostile controls: berlin's order applies, nothing beyond the cap (or
nothing at all) is leased, ``status`` and the log say why, and the host's
cycle stays under :data:`PEAK_BOUND` (tracemalloc's peak).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError

from mailsync import link as links_mod
from mailsync.ranges import admin, model
from mailsync.ranges.draw import next_number
from mailsync.store.engine import open_engine
from mailsync.store.migrations import MIGRATIONS, ensure_schema
from mailsync.store.tables import (
    SCHEMA_VERSION,
    leases,
    links,
    log_table,
    outbox,
)
from mailsync.wire.changeset import ChangesetWriter
from mailsync.wire.controls import LeaseState, RangeReport, ReloadRequest, Resend
from mailsync.wire.envelope import Codec, Header
from mailsync.wire.message import Address, build_message
from tests.cluster import DOMAIN, Cluster, columns_since, orders
from tests.measure import MIB, cycle_under

HQ, KOELN = f"hq@{DOMAIN}", f"koeln@{DOMAIN}"

#: what the host's cycle may allocate (tracemalloc's peak) while it reads
#: thirty-odd of koeln's controls and applies berlin's order
PEAK_BOUND = 8 * MIB


def cluster(
    tmp_path: Path, host_url: str, stations: tuple[str, ...] = ("koeln",), **settings: object
) -> Cluster:
    c = Cluster(tmp_path, host_url, stations, node_settings=settings or None)
    c.host.add_rule("orders", down="IUD", up="IUD")
    return c


def add_range(c: Cluster, **kw: Any) -> None:
    args: dict[str, Any] = {"first": 1000, "last": 9999, "block": 10, "max_blocks": 2, **kw}
    with c.engines["hq"].begin() as conn:
        admin.add_range(conn, model.RangeSpec("order_no", **args))


def from_koeln(c: Cluster, *controls: Any, ctl: int | None = None) -> bytes:
    """Put into hq's mailbox an unsequenced message sealed as koeln's
    mailsync seals one, numbered above any koeln sent unless ``ctl`` is
    given (it takes the next number of koeln's own counter, as koeln's
    next control would); returns the mail, to be replayed."""
    if ctl is None:
        with c.engines["koeln"].begin() as conn:
            ctl = links_mod.control_numbered(conn, links_mod.one(conn, "hq"))
    header = Header("koeln", "hq", 0, ack=0, ctl=ctl)
    codec = Codec()
    buffer = io.BytesIO()
    body = codec.body_writer(buffer)
    writer = ChangesetWriter(body, {"from": "koeln", "to": "hq"})
    for control in controls:
        writer.control(control.KIND, control.payload())
    writer.close()
    body.close()  # type: ignore[no-untyped-call]
    sealed = codec.seal(
        header, buffer.getvalue(), c.host.ring.current.public, c.nodes["koeln"].ring.current.sign
    )
    raw = build_message(header, Address("koeln", KOELN), Address("hq", HQ), sealed)
    assert c.office is not None
    c.office.deliver(HQ, raw)
    return raw


def replay(c: Cluster, raw: bytes) -> None:
    assert c.office is not None
    c.office.deliver(HQ, raw)


def logged(c: Cluster, event: str) -> list[str]:
    with c.engines["hq"].connect() as conn:
        query = select(log_table.c.message).where(log_table.c.event == event)
        return list(conn.execute(query).scalars())


def koeln_leases(c: Cluster, holder: str = "koeln") -> list[model.Lease]:
    """``holder``'s active leases, as hq holds them."""
    with c.engines["hq"].connect() as conn:
        return [
            x
            for x in model.list_leases(conn, "order_no")
            if x.holder == holder and x.state == "active"
        ]


def send_counts(c: Cluster, peer: str) -> dict[int, int]:
    """How often hq sent each of its changesets for ``peer`` in its outbox."""
    with c.engines["hq"].connect() as conn:
        query = select(outbox.c.seq, outbox.c.send_count).where(outbox.c.peer == peer)
        return {seq: count for seq, count in conn.execute(query).all()}


def cli(c: Cluster, *args: str) -> str:
    """What ``mailsync ARGS`` prints for hq, run as a user runs it."""
    done = c.cli("hq", *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


# ------------------------------------------------------------ range reports


@pytest.mark.parametrize("bound", [True, False], ids=["bound", "unbound"])
def test_thirty_false_range_reports_in_one_host_cycle_leave_the_station_at_the_cap(
    tmp_path: Path, db_url: str, bound: bool
) -> None:
    """Every report claims every lease used to its end (berlin's too) and
    asks for a block: the host used to believe each and lease again (3
    leases became 183). Now it counts what it can see: koeln holds its real
    block and ``max_blocks`` (2) blocks of which the host has seen nothing
    used; the 28 requests beyond are refused, logged and counted by
    ``status``. berlin's order, in the same host cycle, applies."""
    c = cluster(tmp_path, db_url, ("koeln", "berlin"))
    try:
        add_range(c, bind="orders.order_no" if bound else None)
        c.sync("hq", "koeln", "berlin")
        if bound:  # numbered by the trigger: the host will hold the row
            c.execute("koeln", orders.insert(), {"id": 1, "customer": "a"})
        else:
            next_number(c.engines["koeln"], "order_no")
        c.sync("koeln", "hq")  # the row and koeln's true report reach hq
        (real,) = koeln_leases(c)
        (berlins,) = koeln_leases(c, "berlin")
        lie = RangeReport(
            leases=tuple(LeaseState(n, 10**9, "active") for n in range(1, 100)),
            want=("order_no",),
        )
        for _ in range(30):
            from_koeln(c, lie)
        c.execute("berlin", orders.insert(), {"id": 2, "customer": "berlin"})
        c.sync("berlin")
        report = cycle_under(c.host, PEAK_BOUND)

        assert not report.errors, report.errors
        assert [(a.peer, a.rows) for a in report.applied] == [("berlin", 1)]
        berlins_order = (2, str(berlins.first) if bound else None, "berlin")
        koelns_order = (1, str(real.first), "a")  # bound: its one true row
        assert c.rows("hq", orders) == ([koelns_order] if bound else []) + [berlins_order]
        held = koeln_leases(c)
        assert len(held) == 1 + 2, [(x.first, x.last) for x in held]
        assert held[0].id == real.id and held[0].next == real.last + 1
        with_rows = {int(r[1]) for r in c.rows("hq", orders) if r[1] is not None}
        assert not any(x.first <= n <= x.last for x in held[1:] for n in with_rows)
        assert koeln_leases(c, "berlin") == [berlins]  # the lies about its lease changed nothing
        refused = logged(c, "range-refused")
        assert len(refused) == 28, refused
        assert set(refused) == {
            "koeln asked for another block of order_no but holds 2 unused, the cap "
            "(max_blocks = 2): refused"
        }
        assert c.host.status().blocks_refused == 28
        assert "28 request(s) for a number block refused" in cli(c, "status")
    finally:
        c.close()


def test_a_station_that_used_its_bound_block_gets_the_next_before_its_rows_arrive(
    tmp_path: Path, db_url: str
) -> None:
    """Plain use: the report asking for the next block reaches the host in
    the same cycle as the rows that used the current one, ahead of them.
    The current block, with no row seen yet, is its one unused block: the
    next is granted, and koeln draws on into it — by trigger, as far as its
    restore witness reserved (the rest of the block in use, half of the
    next) until any mailsync action reserves more."""
    c = cluster(tmp_path, db_url, resend_after_minutes=0, gap_request_minutes=0)
    try:
        add_range(c, bind="orders.order_no", threshold=0.5)
        c.sync("hq", "koeln")
        c.execute("koeln", orders.insert(), [{"id": i, "customer": "a"} for i in range(6)])
        c.sync("koeln", "hq", "koeln")
        with c.engines["koeln"].connect() as conn:
            (use,) = admin.usage(conn)
        assert use.next_held and use.left == 14
        c.execute("koeln", orders.insert(), [{"id": 10 + i, "customer": "b"} for i in range(9)])
        with pytest.raises(IntegrityError, match="no numbers left on this node"):
            c.execute("koeln", orders.insert(), {"id": 19, "customer": "b"})
        c.nodes["koeln"].confirm_witness()  # what any mailsync action does first
        c.execute("koeln", orders.insert(), [{"id": 19 + i, "customer": "b"} for i in range(5)])
        numbers = sorted(int(r[1]) for r in c.rows("koeln", orders))
        assert len(set(numbers)) == 20 and len(koeln_leases(c)) == 2
    finally:
        c.close()


def test_a_false_give_back_never_frees_numbers_the_host_holds_rows_of(
    tmp_path: Path, db_url: str
) -> None:
    """koeln says it gave its block back before using any of it, after the
    host received rows numbered from it: the used numbers stay out of the
    free list, so no other node is leased them again."""
    c = cluster(tmp_path, db_url)
    try:
        add_range(c, bind="orders.order_no")
        c.sync("hq", "koeln")
        c.execute("koeln", orders.insert(), [{"id": i, "customer": "a"} for i in range(3)])
        c.sync("koeln", "hq")
        (lease,) = koeln_leases(c)
        from_koeln(c, RangeReport(leases=(LeaseState(lease.id, lease.first, "released"),)))
        c.host.sync()
        with c.engines["hq"].connect() as conn:
            (back,) = [x for x in model.list_leases(conn, "order_no") if x.id == lease.id]
        assert (back.state, back.last) == ("released", lease.first + 2)
        hq_numbers = [next_number(c.engines["hq"], "order_no") for _ in range(10)]
        assert not {1000, 1001, 1002} & set(hq_numbers)
    finally:
        c.close()


# ---------------------------------------------------------------- replays


def test_a_replayed_range_report_does_not_lease_again(tmp_path: Path, db_url: str) -> None:
    """koeln's report asking for its next block is copied from hq's mailbox
    and delivered again once the grant went out: acted on again, it would
    lease a third block (koeln's first is used, the granted one is its only
    unused one). It is logged and ignored."""
    c = cluster(tmp_path, db_url)
    try:
        add_range(c, threshold=0.5)
        c.sync("hq", "koeln")
        for _ in range(6):
            next_number(c.engines["koeln"], "order_no")
        c.sync("koeln")
        assert c.office is not None
        copies = list(c.office.boxes[HQ].values())
        c.sync("hq")
        assert len(koeln_leases(c)) == 2
        for raw in copies:
            replay(c, raw)
        report = c.host.sync()

        assert not report.errors and report.set_aside == 0
        assert len(koeln_leases(c)) == 2
        lines = logged(c, "control-replayed")
        assert lines and all("from koeln is not newer than" in x for x in lines)
    finally:
        c.close()


def test_replayed_controls_are_logged_and_ignored_while_another_station_is_served(
    tmp_path: Path, db_url: str
) -> None:
    """Issue 15's replay class in one host cycle: koeln's range report (which
    asked for a block) and its resend request, each already acted on, are
    copied from hq's mailbox and delivered ten times more. No block is
    leased and nothing is sent again; every copy is logged and counted by
    ``status``; berlin's order, in the same cycle, applies."""
    c = cluster(tmp_path, db_url, ("koeln", "berlin"))
    try:
        add_range(c, threshold=0.5)
        c.sync("hq", "koeln", "berlin", "hq")
        c.execute("hq", orders.insert(), {"id": 1, "customer": "hq"})
        c.sync("hq")
        assert c.office is not None
        c.office.boxes[KOELN].clear()  # hq's changeset with order 1, lost in the mail
        for _ in range(6):
            next_number(c.engines["koeln"], "order_no")
        c.sync("koeln")  # its report, asking for the next block
        copies = list(c.office.boxes[HQ].values())
        assert len(copies) == 1
        (koelns,) = [x for x in c.host.status().links if x.peer == "koeln"]
        copies.append(from_koeln(c, Resend((koelns.out_seq,))))  # asks for it again
        c.sync("hq")  # acted on: a block granted, the changeset sent again
        sent = send_counts(c, "koeln")
        assert sent == {koelns.out_seq: 2}
        granted = koeln_leases(c)
        assert len(granted) == 2
        done = logged(c, "range") + logged(c, "resend-request")
        for _ in range(10):
            for raw in copies:
                replay(c, raw)
        c.execute("berlin", orders.insert(), {"id": 2, "customer": "berlin"})
        c.sync("berlin")
        report = cycle_under(c.host, PEAK_BOUND)

        assert not report.errors and report.set_aside == 0, report.errors
        assert [(a.peer, a.rows) for a in report.applied] == [("berlin", 1)]
        assert c.rows("hq", orders) == [(1, None, "hq"), (2, None, "berlin")]
        assert koeln_leases(c) == granted
        # the changeset koeln asked for is not sent again; berlin's order is relayed to it
        assert send_counts(c, "koeln") == {**sent, koelns.out_seq + 1: 1}
        assert logged(c, "range") + logged(c, "resend-request") == done
        replayed = logged(c, "control-replayed")
        assert len(replayed) == 20
        assert all("from koeln is not newer than" in line for line in replayed), replayed
        assert c.host.status().replayed == 20
        assert "20 control message(s) ignored as replayed or late" in cli(c, "status")
    finally:
        c.close()


def test_a_replayed_resend_request_sends_nothing_again(tmp_path: Path, db_url: str) -> None:
    """hq's changeset #1 for koeln was lost; koeln asks for it again and
    gets it. The request replayed afterwards sends nothing."""
    c = cluster(tmp_path, db_url)
    try:
        c.execute("hq", orders.insert(), {"id": 1, "customer": "a"})
        c.sync("hq")
        assert c.office is not None
        c.office.boxes[KOELN].clear()  # lost in the mail
        raw = from_koeln(c, Resend((1,)))
        c.sync("hq")
        assert c.office.pending(KOELN) == 1  # sent again, as asked
        c.office.boxes[KOELN].clear()
        replay(c, raw)
        report = c.host.sync()

        assert not report.errors and c.office.pending(KOELN) == 0
        assert len(logged(c, "control-replayed")) == 1
        assert len(logged(c, "resend-request")) == 1
        with c.engines["hq"].connect() as conn:
            (count,) = conn.execute(select(outbox.c.send_count)).scalars()
        assert count == 2
    finally:
        c.close()


def test_a_replayed_reload_request_does_not_reload_again(tmp_path: Path, db_url: str) -> None:
    """A reload request is acted on once; its copy, replayed after the
    reload reached koeln, is logged and ignored."""
    c = cluster(tmp_path, db_url)
    try:
        c.execute("hq", orders.insert(), {"id": 1, "customer": "a"})
        c.sync("hq", "koeln", "hq")
        raw = from_koeln(c, ReloadRequest(1, "r1"))
        c.sync("hq", "koeln", "hq")  # the full load goes, is applied, acknowledged
        assert len(logged(c, "reload")) == 1
        with c.engines["hq"].connect() as conn:
            before = conn.execute(select(links.c.out_seq, links.c.reload_wanted)).one()
        replay(c, raw)
        report = c.host.sync()

        assert not report.errors
        with c.engines["hq"].connect() as conn:
            after = conn.execute(select(links.c.out_seq, links.c.reload_wanted)).one()
        assert tuple(after) == tuple(before) and not after.reload_wanted
        assert len(logged(c, "reload")) == 1
        assert len(logged(c, "control-replayed")) == 1
    finally:
        c.close()


def test_an_unnumbered_control_counts_only_until_the_station_numbers_its_own(
    tmp_path: Path,
) -> None:
    """A station on an older version numbers nothing (0): its controls are
    acted on. Once koeln has sent a numbered one, an unnumbered one is an
    old message replayed, and ignored."""
    c = cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}")
    try:
        c.execute("hq", orders.insert(), {"id": 1, "customer": "a"})
        c.sync("hq")
        from_koeln(c, Resend((1,)), ctl=0)
        c.sync("hq")
        assert len(logged(c, "resend-request")) == 1
        c.sync("koeln", "hq")  # koeln's own ack, numbered
        from_koeln(c, Resend((1,)), ctl=0)
        c.sync("hq")
        assert len(logged(c, "resend-request")) == 1
        assert len(logged(c, "control-replayed")) == 1
    finally:
        c.close()


# ---------------------------------------------------------------- migration


def test_a_version_1_database_gains_the_control_numbers(db_url: str) -> None:
    """Schema 1 had no control numbers on mailsync_links: the migration adds
    them (0: nothing seen, nothing sent) and keeps the links."""
    engine = open_engine(db_url)
    try:
        ensure_schema(engine)
        with engine.begin() as conn:
            # back to version 1: without the columns the later versions added
            for table, name in columns_since(1):
                conn.execute(text(f"ALTER TABLE {table} DROP COLUMN {name}"))
            conn.execute(
                text(
                    "INSERT INTO mailsync_links (peer, address, out_seq, in_seq, acked_seq, "
                    "change_cursor, key_announced_seq, ack_sent, in_cid, reload_wanted, "
                    "reload_seq) VALUES ('koeln', 'k@x', 3, 2, 1, 0, 0, 0, '', false, 0)"
                )
            )
            conn.execute(
                text(
                    'INSERT INTO mailsync_leases (id, range_name, holder, "first", "last", '
                    '"next", state, granted_at, confirmed) VALUES '
                    "(7, 'order_no', 'koeln', 1000, 1009, 1003, 'active', '2026-01-01', false)"
                )
            )
            conn.execute(text("UPDATE mailsync_meta SET value = '1' WHERE key = 'schema_version'"))
        ensure_schema(engine)
        with engine.connect() as conn:
            row = conn.execute(select(links)).one()
            lease = conn.execute(select(leases)).one()
            version = conn.execute(
                text("SELECT value FROM mailsync_meta WHERE key = 'schema_version'")
            ).scalar()
        assert (row.peer, row.out_seq, row.ctl_sent, row.ctl_seen) == ("koeln", 3, 0, 0)
        assert (row.rebase, row.resend_all, row.report_due) == (False, False, False)
        # a lease of an older version may have been drawn to its end
        assert (lease.next, lease.ceiling) == (1003, 1010)
        assert version == str(SCHEMA_VERSION) == str(max(MIGRATIONS) + 1)
    finally:
        engine.dispose()
