"""A link — (this node, one peer) — and every change of its state.

One row of ``mailsync_links`` per peer holds the link's sequence numbers
(what we sent, what the peer acknowledged, what we applied), the change-log
cursor, what we told the peer (our key, its rules, our ack) and the restore
bookkeeping. :class:`Link` is that row, typed; the functions below are its
named transitions, and this module (with the cycle that calls them) is the
only writer of the table, so the link's state machine can be read in one
place:

- :func:`acknowledged` — the peer applied our changesets up to ``ack``
- :func:`outbound_went_back` / :func:`reload_wanted` / :func:`rebased` —
  a database went back to a backup; :func:`peer_to_report` / :func:`notice_sent` /
  :func:`peer_reported` / :func:`host_went_back` — the host did
- :func:`reload_requested` / :func:`reload_asked` — the reload handshake
- :func:`built` / :func:`nothing_built` — a changeset was queued (or not)
- :func:`applied` — a changeset from the peer was applied
- :func:`sent` / :func:`ack_sent` / :func:`duplicate_received` /
  :func:`gap_requested` — what the peer has heard from us
- :func:`control_numbered` / :func:`control_fresh` — numbering our control
  messages, and acting on the peer's once
- :func:`held` / :func:`released` / :func:`skipped` — the peer's changesets
  stopped applying (and why), flow again, or an admin moved past one
- :func:`paused` / :func:`resumed` / :func:`standing_told` — an admin
  disabled or enabled the station, and it was told by mail;
  :func:`table_request_taken` — its own reload request was acted on
- :func:`verify_due` — a verification waits for the next build to the peer

What is buffered from the peer is :mod:`mailsync.inbox`'s.
"""

from __future__ import annotations

import datetime as dt
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import (
    Connection,
    Row,
    bindparam,
    case,
    delete,
    func,
    insert,
    select,
    tuple_,
    update,
)

from mailsync.store.tables import inbox, links, now, outbox


def aware(value: dt.datetime) -> dt.datetime:
    """SQLite hands timestamps back without their (UTC) zone."""
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


@dataclass(frozen=True)
class Link:
    """One row of ``mailsync_links``: the state of the link with ``peer``."""

    peer: str
    address: str
    #: the last sequence number we gave a changeset for the peer
    out_seq: int
    #: the last sequence number we applied from the peer
    in_seq: int
    #: the highest of ours the peer said it applied
    acked_seq: int
    #: the change log up to here is routed (packed, or not for this peer)
    change_cursor: int
    #: the rules the peer was last sent (host), as a digest
    rules_hash: str | None
    #: the key id of ours this peer was told about, and in which changeset
    key_announced: str | None
    key_announced_seq: int
    #: the highest inbound sequence our last message to the peer acknowledged
    ack_sent: int
    gap_requested_at: dt.datetime | None
    #: the changeset id of the last changeset applied from the peer
    in_cid: str
    #: remote: we lost changesets and wait for a reload; host: one is to be built
    reload_wanted: bool
    reload_asked_at: dt.datetime | None
    reload_seq: int
    #: remote: the id of the reload request in force; host: of the last one served
    reload_request: str | None
    last_contact: dt.datetime | None
    last_sent: dt.datetime | None
    #: the number of our last control message to the peer
    ctl_sent: int
    #: the highest control number of the peer's we acted on
    ctl_seen: int
    #: why the peer's changesets do not apply now, and since when
    held: str | None
    held_since: dt.datetime | None
    #: our next changeset applies on top of whatever the peer holds (base 0)
    rebase: bool
    #: remote: the host went back; our next changeset carries every row we
    #: send up, and the reload we ask for after waits for its ack
    resend_all: bool
    resent_seq: int
    #: host: we went back; the station must report before it gets a block
    report_due: bool
    notice_sent_at: dt.datetime | None
    #: a verification has a request, an answer or a resend for the next build
    verify_due: bool = False
    #: host: the station is disabled since then (nothing goes to it, what
    #: it sends is held); the standing it is yet to be told by mail
    paused_at: dt.datetime | None = None
    standing_due: str | None = None
    #: host: the id of the station's last own reload request acted on
    table_request: str | None = None
    request_told: bool = True

    @classmethod
    def from_row(cls, row: Row[Any]) -> Link:
        m = row._mapping
        times = (
            "gap_requested_at",
            "reload_asked_at",
            "last_contact",
            "last_sent",
            "held_since",
            "notice_sent_at",
            "paused_at",
        )
        values = {f.name: m[f.name] for f in fields(cls)}
        for name in times:
            if values[name] is not None:
                values[name] = aware(values[name])
        return cls(**values)


# ------------------------------------------------------------------ reading


def get(conn: Connection, peer: str) -> Link | None:
    row = conn.execute(select(links).where(links.c.peer == peer)).first()
    return None if row is None else Link.from_row(row)


def one(conn: Connection, peer: str) -> Link:
    row = conn.execute(select(links).where(links.c.peer == peer)).one()
    return Link.from_row(row)


def all_links(conn: Connection) -> list[Link]:
    return [Link.from_row(r) for r in conn.execute(select(links).order_by(links.c.peer))]


def peers(conn: Connection) -> list[str]:
    return list(conn.execute(select(links.c.peer).order_by(links.c.peer)).scalars())


# ----------------------------------------------------------- enrol, forget


def create(conn: Connection, peer: str, address: str, *, change_cursor: int = 0) -> None:
    """A new link: a station enrolled on the host, the host joined on a remote."""
    conn.execute(insert(links).values(peer=peer, address=address, change_cursor=change_cursor))


def create_many(
    conn: Connection, entries: Sequence[tuple[str, str]], *, change_cursor: int, key_told: str
) -> None:
    """Links for a batch of stations enrolled at once (``station add --csv``):
    one executemany of (peer, address), each peer told our key ``key_told``
    by its bundle (what :func:`create` and :func:`key_told` do one by one)."""
    if entries:
        conn.execute(
            insert(links),
            [
                {"peer": p, "address": a, "change_cursor": change_cursor, "key_announced": key_told}
                for p, a in entries
            ],
        )


def readdress(conn: Connection, peer: str, address: str) -> None:
    conn.execute(update(links).where(links.c.peer == peer).values(address=address))


def forget(conn: Connection, peer: str) -> None:
    conn.execute(delete(links).where(links.c.peer == peer))


def key_told(conn: Connection, peer: str, key_id: str) -> None:
    """The peer learnt our key outside a changeset (its enrollment bundle)."""
    conn.execute(update(links).where(links.c.peer == peer).values(key_announced=key_id))


# --------------------------------------------------------------- transitions


def acknowledged(conn: Connection, link: Link, ack: int) -> None:
    """The peer applied everything of ours up to ``ack``: those envelopes are
    delivered and leave the outbox; we heard from the peer now."""
    values: dict[str, Any] = {"last_contact": now()}
    if ack > link.acked_seq:
        values["acked_seq"] = min(ack, link.out_seq)
        conn.execute(delete(outbox).where(outbox.c.peer == link.peer, outbox.c.seq <= ack))
    conn.execute(update(links).where(links.c.peer == link.peer).values(**values))


def _rewind_point(conn: Connection, peer: str, upto: int | None = None) -> int | None:
    """The change-log cursor the outbox entries (up to ``upto``) started from."""
    query = select(func.min(outbox.c.cursor_from)).where(outbox.c.peer == peer)
    if upto is not None:
        query = query.where(outbox.c.seq <= upto)
    value = conn.execute(query).scalar()
    return None if value is None else int(value)


def outbound_went_back(conn: Connection, link: Link, ack: int) -> None:
    """The peer applied changesets of ours up to ``ack`` that this database
    does not hold as it sent them (we were restored from a backup): our
    entries up to there are dropped, their changes built again under new
    numbers from the rewound cursor."""
    rewind = _rewind_point(conn, link.peer, ack)
    conn.execute(delete(outbox).where(outbox.c.peer == link.peer, outbox.c.seq <= ack))
    values: dict[str, Any] = {"out_seq": max(link.out_seq, ack), "acked_seq": ack}
    if rewind is not None:
        values["change_cursor"] = min(link.change_cursor, rewind)
    if link.acked_seq < link.key_announced_seq <= ack:
        values["key_announced"] = None  # the announcement went with them
    conn.execute(update(links).where(links.c.peer == link.peer).values(**values))


def rebased(conn: Connection, peer: str) -> None:
    """Our database went back: the peer may miss changesets we no longer
    hold, so our next one applies on top of whatever it has (base 0)."""
    conn.execute(update(links).where(links.c.peer == peer).values(rebase=True))


def peer_to_report(conn: Connection, peer: str) -> None:
    """Host: we went back to a backup; the station is told, sends again what
    we lost and its leases, and gets no block until it has reported."""
    conn.execute(
        update(links).where(links.c.peer == peer).values(report_due=True, notice_sent_at=None)
    )


def notice_sent(conn: Connection, peer: str) -> None:
    """Host: the station was told (again) that we went back."""
    conn.execute(update(links).where(links.c.peer == peer).values(notice_sent_at=now()))


def peer_reported(conn: Connection, peer: str) -> None:
    """Host: the station reported its leases after we went back."""
    conn.execute(
        update(links).where(links.c.peer == peer).values(report_due=False, notice_sent_at=None)
    )


def host_went_back(conn: Connection, link: Link, host_in_seq: int) -> None:
    """Remote: the host lost our changesets after ``host_in_seq``. What
    waits in the outbox is superseded: our next changeset carries every row
    we send up, applied on top of whatever the host holds; the reload we
    then ask for (to lose what the host lost, and get back what it kept)
    waits until the host has acknowledged it."""
    rewind = _rewind_point(conn, link.peer)
    conn.execute(delete(outbox).where(outbox.c.peer == link.peer))
    values: dict[str, Any] = {
        "acked_seq": min(link.acked_seq, host_in_seq),
        "resend_all": True,
        "rebase": True,
        "reload_wanted": True,
        "reload_asked_at": None,
        "reload_request": secrets.token_hex(8),
    }
    if rewind is not None:
        values["change_cursor"] = min(link.change_cursor, rewind)
    if link.key_announced_seq > host_in_seq:
        values["key_announced"] = None
    conn.execute(update(links).where(links.c.peer == link.peer).values(**values))


def reload_wanted(conn: Connection, peer: str) -> None:
    """Remote: we lost what the host sent; ask it for a reload (new request id)."""
    conn.execute(
        update(links)
        .where(links.c.peer == peer)
        .values(reload_wanted=True, reload_asked_at=None, reload_request=secrets.token_hex(8))
    )


def reload_asked(conn: Connection, peer: str) -> None:
    """Remote: the reload request went out in this cycle's controls."""
    conn.execute(update(links).where(links.c.peer == peer).values(reload_asked_at=now()))


def reload_requested(conn: Connection, link: Link, request: str | None) -> None:
    """Host: a station asked for a reload; the next build for it is a full
    load, which supersedes what waits in its outbox (the changes those
    entries carried are built again, our key announced again)."""
    rewind = _rewind_point(conn, link.peer)
    conn.execute(delete(outbox).where(outbox.c.peer == link.peer))
    values: dict[str, Any] = {"reload_wanted": True, "reload_request": request}
    if rewind is not None:
        values["change_cursor"] = min(link.change_cursor, rewind)
    if link.key_announced_seq > link.acked_seq:
        values["key_announced"] = None
    conn.execute(update(links).where(links.c.peer == link.peer).values(**values))


def nothing_built(conn: Connection, peer: str, cursor: int, rules_hash: str | None) -> None:
    """Routing found nothing for the peer up to ``cursor`` (not even rows to
    send again after the host went back: there are none)."""
    values: dict[str, Any] = {"change_cursor": cursor, "resend_all": False}
    if rules_hash is not None:
        values["rules_hash"] = rules_hash
    conn.execute(update(links).where(links.c.peer == peer).values(**values))


def built(
    conn: Connection,
    peer: str,
    seq: int,
    cursor: int,
    *,
    rules_hash: str | None = None,
    announced_key: str | None = None,
    reload: bool = False,
    resent_all: bool = False,
) -> None:
    """Changeset ``seq`` for the peer was queued, covering the change log up
    to ``cursor``; it carries the rules, our key, a full reload or (remote,
    after the host went back) every row we send up, if said."""
    values: dict[str, Any] = {"change_cursor": cursor, "out_seq": seq}
    if rules_hash is not None:
        values["rules_hash"] = rules_hash
    if announced_key is not None:
        values["key_announced"] = announced_key
        values["key_announced_seq"] = seq
    if reload:
        values["reload_wanted"] = False
        values["reload_seq"] = seq
    values["rebase"] = False
    if resent_all:
        values.update(resend_all=False, resent_seq=seq)
    conn.execute(update(links).where(links.c.peer == peer).values(**values))


def verify_due(conn: Connection, peer: str, due: bool = True) -> None:
    """A verification has something for the next build to the peer (or,
    ``due`` False, that build carried all of it: :mod:`mailsync.verification`)."""
    conn.execute(update(links).where(links.c.peer == peer).values(verify_due=due))


def applied(conn: Connection, peer: str, seq: int, cid: str, *, reloaded: bool) -> None:
    """Changeset ``seq`` from the peer is applied (in the same transaction
    as its rows); its parts and anything older leave the inbox buffer."""
    values: dict[str, Any] = {"in_seq": seq, "in_cid": cid, "last_contact": now()}
    if reloaded:
        values.update(reload_wanted=False, reload_asked_at=None)
    conn.execute(update(links).where(links.c.peer == peer).values(**values))
    conn.execute(delete(inbox).where(inbox.c.peer == peer, inbox.c.seq <= seq))


def duplicate_received(conn: Connection, peer: str, seq: int) -> None:
    """The peer sent ``seq`` again: it has not heard our ack, which goes again."""
    conn.execute(
        update(links).where(links.c.peer == peer, links.c.ack_sent >= seq).values(ack_sent=seq - 1)
    )


def ack_sent(conn: Connection, peer: str, ack: int) -> None:
    """A message carrying our ack ``ack`` went to the peer."""
    conn.execute(
        update(links).where(links.c.peer == peer, links.c.ack_sent < ack).values(ack_sent=ack)
    )


def sent(conn: Connection, peer: str, seq: int, part: int, ack: int) -> None:
    """A part of ours went to the peer (again), carrying our ack ``ack``."""
    conn.execute(
        update(outbox)
        .where(outbox.c.peer == peer, outbox.c.seq == seq, outbox.c.part == part)
        .values(sent_at=now(), send_count=outbox.c.send_count + 1)
    )
    conn.execute(update(links).where(links.c.peer == peer).values(last_sent=now()))
    ack_sent(conn, peer, ack)


def sending(conn: Connection, due: list[tuple[str, list[tuple[int, int]], int]]) -> None:
    """Per peer in ``due``, its ``parts`` of ours (and perhaps a control
    message: ``ack`` is what they carry) are handed to the mail system right
    after this commits; at most three statements for all peers (each an
    ``executemany``: a fanout to a thousand stations records them at once).
    A send that fails after the commit is taken back (:func:`not_sent`); one
    lost in a crash counts as mail lost on the way (sent again after
    ``resend_after_minutes``, or when the peer asks)."""
    at = now()
    sent = [
        {"b_peer": peer, "b_seq": seq, "b_part": part, "b_at": at}
        for peer, parts, _ in due
        for seq, part in parts
    ]
    if sent:
        conn.execute(
            update(outbox)
            .where(
                outbox.c.peer == bindparam("b_peer"),
                outbox.c.seq == bindparam("b_seq"),
                outbox.c.part == bindparam("b_part"),
            )
            .values(sent_at=bindparam("b_at"), send_count=outbox.c.send_count + 1),
            sent,
        )
    acked = case(
        (links.c.ack_sent < bindparam("b_ack"), bindparam("b_ack")), else_=links.c.ack_sent
    )
    told = update(links).where(links.c.peer == bindparam("b_peer"))
    with_parts = [{"b_peer": p, "b_ack": a, "b_at": at} for p, parts, a in due if parts]
    if with_parts:
        conn.execute(told.values(ack_sent=acked, last_sent=bindparam("b_at")), with_parts)
    only_acks = [{"b_peer": p, "b_ack": a} for p, parts, a in due if not parts]
    if only_acks:
        conn.execute(told.values(ack_sent=acked), only_acks)


def not_sent(conn: Connection, peer: str, parts: list[tuple[int, int]], ack_before: int) -> None:
    """What :func:`sending` recorded did not reach the mail system: the
    parts are due again, and the peer has heard only ``ack_before``."""
    if parts:
        conn.execute(
            update(outbox)
            .where(outbox.c.peer == peer, tuple_(outbox.c.seq, outbox.c.part).in_(parts))
            .values(sent_at=None, send_count=outbox.c.send_count - 1)
        )
    conn.execute(
        update(links)
        .where(links.c.peer == peer, links.c.ack_sent > ack_before)
        .values(ack_sent=ack_before)
    )


def control_numbered(conn: Connection, link: Link) -> int:
    """The number of a control message for the peer, higher than any before:
    the later of the last one + 1 and the clock in microseconds, so that it
    still goes up after this database went back to a backup."""
    number = max(link.ctl_sent + 1, time.time_ns() // 1000)
    conn.execute(update(links).where(links.c.peer == link.peer).values(ctl_sent=number))
    return number


def control_fresh(conn: Connection, link: Link, number: int) -> bool:
    """Whether to act on a control message numbered ``number`` from the peer:
    only if it is above every one seen (then it is the highest). A peer
    that never numbered one (0, an older version) is believed until it does."""
    if number <= link.ctl_seen and (number > 0 or link.ctl_seen > 0):
        return False
    if number > link.ctl_seen:
        conn.execute(
            update(links)
            .where(links.c.peer == link.peer, links.c.ctl_seen < number)
            .values(ctl_seen=number)
        )
    return True


def gap_requested(conn: Connection, peer: str) -> None:
    conn.execute(update(links).where(links.c.peer == peer).values(gap_requested_at=now()))


def gap_due(conn: Connection, peer: str) -> None:
    """What is missing from the peer is asked for with the next sync."""
    conn.execute(update(links).where(links.c.peer == peer).values(gap_requested_at=None))


def held(conn: Connection, link: Link, reason: str) -> None:
    """The peer's changesets stopped applying: ``reason`` says why (kept
    from the first cycle it held, so ``held_since`` is when it began)."""
    values: dict[str, Any] = {"held": reason}
    if link.held is None:
        values["held_since"] = now()
    conn.execute(update(links).where(links.c.peer == link.peer).values(**values))


def released(conn: Connection, peer: str) -> None:
    """The peer's changesets apply again."""
    conn.execute(update(links).where(links.c.peer == peer).values(held=None, held_since=None))


def skipped(conn: Connection, peer: str, seq: int, cid: str) -> None:
    """An admin moved the link past changeset ``seq`` without applying it:
    to the peer it is applied (our ack names it), and the link is free."""
    conn.execute(
        update(links)
        .where(links.c.peer == peer)
        .values(in_seq=seq, in_cid=cid, held=None, held_since=None)
    )
    conn.execute(delete(inbox).where(inbox.c.peer == peer, inbox.c.seq <= seq))


def paused(conn: Connection, peer: str) -> None:
    """Host: an admin disabled the station: nothing goes to it from now on
    (but the notice saying so), what it sends is held in the inbox."""
    conn.execute(
        update(links).where(links.c.peer == peer).values(paused_at=now(), standing_due="disabled")
    )


def resumed(conn: Connection, peer: str) -> None:
    """Host: an admin enabled the station again; it is told so, and what
    it sent meanwhile is applied with the next cycle."""
    conn.execute(
        update(links).where(links.c.peer == peer).values(paused_at=None, standing_due="enabled")
    )


def standing_told(conn: Connection, peer: str) -> None:
    """Host: the notice of the station's standing is composed (it goes once)."""
    conn.execute(update(links).where(links.c.peer == peer).values(standing_due=None))


def table_request_taken(conn: Connection, peer: str, request: str) -> None:
    """Host: the station's own reload request ``request`` was acted on (the
    same id again is a duplicate)."""
    conn.execute(
        update(links).where(links.c.peer == peer).values(table_request=request, request_told=False)
    )


def request_told(conn: Connection, peer: str) -> None:
    """Host: a changeset told the station its request was acted on."""
    conn.execute(update(links).where(links.c.peer == peer).values(request_told=True))


def table_request_pending(conn: Connection, peer: str, request: str) -> None:
    """Station: we ask the host for tables again (request ``request``): it
    goes with our next control message."""
    conn.execute(
        update(links).where(links.c.peer == peer).values(table_request=request, request_told=False)
    )


def table_request_served(conn: Connection, peer: str) -> None:
    """Station: the host acted on our request."""
    conn.execute(
        update(links).where(links.c.peer == peer).values(table_request=None, request_told=True)
    )
