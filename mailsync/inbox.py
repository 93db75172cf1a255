"""The inbox buffer: received parts of changesets, held until they apply.

A part waits here, still sealed, from the commit that received it until its
changeset applies (then :func:`mailsync.link.applied` deletes it). Because a
peer's keys may be in an attacker's hands (DESIGN §12), the buffer is
bounded and every way a changeset can be stuck in it has a way out:

- **Admission** (:func:`admit`): per peer, at most ``max_buffered_changesets``
  changesets and ``max_buffered_bytes`` bytes wait beyond the one next in
  line; that one may grow to ``max_changeset_bytes``. A part over the cap is
  set aside, not buffered; its sender still holds it and sends it again.
- **Expiry** (:func:`expire`): a changeset whose parts stopped arriving
  ``incomplete_expiry_hours`` ago is dropped and asked for again whole.
- **Quarantine** (:func:`failed`): a changeset that failed to apply
  ``quarantine_after`` times is no longer tried by itself; its link is held
  until an admin retries or drops it (:func:`retry`, :func:`drop`, the
  ``mailsync inbox`` commands).

It also answers what both the cycle and ``status`` ask of the buffer: what
is held from a peer, what is missing, what applies next.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass

from sqlalchemy import Connection, delete, func, select, update

from mailsync import link as links_mod
from mailsync.errors import ConfigError, MessageError
from mailsync.link import Link, aware
from mailsync.store.tables import inbox, now
from mailsync.wire.envelope import Header
from mailsync.wire.limits import Limits, exceeded

# ------------------------------------------------------------------ reading


def held_parts(conn: Connection, peer: str) -> dict[int, tuple[int, set[int]]]:
    """What the buffer holds from ``peer``: seq → (parts, parts present)."""
    held: dict[int, tuple[int, set[int]]] = {}
    for seq, part, parts in conn.execute(
        select(inbox.c.seq, inbox.c.part, inbox.c.parts).where(inbox.c.peer == peer)
    ):
        held.setdefault(seq, (parts, set()))[1].add(part)
    return held


def missing_sequences(applied: int, held: set[int]) -> Iterator[int]:
    """The sequence numbers between the last applied and the buffered ones,
    lazily: a caller that asks for a few takes only those."""
    return (s for s in range(applied + 1, max(held, default=0)) if s not in held)


def missing_parts(held: dict[int, tuple[int, set[int]]]) -> Iterator[tuple[int, int]]:
    """(seq, part) of the parts absent from partly received changesets;
    ``held`` maps seq to (number of parts, parts present). Lazily, too."""
    return (
        (seq, part)
        for seq, (parts, present) in sorted(held.items())
        for part in range(1, parts + 1)
        if part not in present
    )


def peers_waiting(conn: Connection) -> set[str]:
    """The peers something is buffered from."""
    return set(conn.execute(select(inbox.c.peer).distinct()).scalars())


def oldest_buffered(conn: Connection, peer: str) -> dt.datetime | None:
    value = conn.execute(select(func.min(inbox.c.received_at)).where(inbox.c.peer == peer)).scalar()
    return None if value is None else aware(value)


@dataclass(frozen=True)
class Next:
    """The changeset next in line from a peer, all its parts here."""

    seq: int
    parts: int
    #: set once it failed ``quarantine_after`` times: not tried by itself
    quarantined: bool
    attempts: int
    last_error: str | None


def next_complete(conn: Connection, peer: str, in_seq: int) -> Next | None:
    """The changeset to apply next, once all its parts are here."""
    row = conn.execute(
        select(
            inbox.c.seq,
            inbox.c.parts,
            func.count(),
            func.max(inbox.c.attempts),
            func.max(inbox.c.quarantined_at),
            func.max(inbox.c.last_error),
        )
        .where(inbox.c.peer == peer, inbox.c.seq > in_seq, inbox.c.base <= in_seq)
        .group_by(inbox.c.seq, inbox.c.parts)
        .order_by(inbox.c.seq)
        .limit(1)
    ).first()
    if row is None or row[2] < row[1]:
        return None
    return Next(int(row[0]), int(row[1]), row[4] is not None, int(row[3] or 0), row[5])


def quarantined_counts(conn: Connection) -> dict[str, int]:
    """Per peer, how many of its buffered changesets are quarantined."""
    return {
        peer: int(n)
        for peer, n in conn.execute(
            select(inbox.c.peer, func.count(func.distinct(inbox.c.seq)))
            .where(inbox.c.quarantined_at.is_not(None))
            .group_by(inbox.c.peer)
        )
    }


def part_blob(conn: Connection, peer: str, seq: int, part: int) -> bytes:
    """One buffered part, sealed."""
    blob: bytes = conn.execute(
        select(inbox.c.blob).where(inbox.c.peer == peer, inbox.c.seq == seq, inbox.c.part == part)
    ).scalar_one()
    return blob


def first_parts(conn: Connection, peer: str) -> Iterator[bytes]:
    """The first part of each changeset buffered from ``peer``, sealed, one
    at a time (each may be a whole message's size)."""
    yield from conn.execute(
        select(inbox.c.blob).where(inbox.c.peer == peer, inbox.c.part == 1)
    ).scalars()


def drop_stale(conn: Connection, peer: str, in_seq: int) -> None:
    """Duplicates a crash left in the buffer after their changeset applied."""
    conn.execute(delete(inbox).where(inbox.c.peer == peer, inbox.c.seq <= in_seq))


@dataclass(frozen=True)
class Buffered:
    """One changeset in the buffer, as ``mailsync inbox`` shows it."""

    peer: str
    seq: int
    cid: str
    #: the sequence number it applies after (its predecessor)
    base: int
    parts: int
    present: int
    #: the bytes its buffered parts take, sealed
    size: int
    first_received: dt.datetime
    last_received: dt.datetime
    attempts: int
    last_error: str | None
    quarantined_at: dt.datetime | None
    #: the link's inbound sequence number (what was applied last)
    in_seq: int

    @property
    def complete(self) -> bool:
        return self.present == self.parts

    @property
    def next_in_line(self) -> bool:
        return self.seq > self.in_seq and self.base <= self.in_seq

    @property
    def state(self) -> str:
        """In words: why it is still here."""
        if self.quarantined_at is not None:
            return f"quarantined after {self.attempts} failed attempt(s)"
        if not self.complete:
            return f"incomplete: {self.present} of {self.parts} part(s)"
        if self.attempts:
            return f"failed {self.attempts} time(s), tried again next sync"
        if self.next_in_line:
            return "complete, applies next sync"
        return f"complete, waits for #{self.base}" if self.base > self.in_seq else "complete"


def buffered(conn: Connection, peer: str | None = None, seq: int | None = None) -> list[Buffered]:
    """The buffered changesets (of one peer, one sequence number), in order."""
    in_seqs = {link.peer: link.in_seq for link in links_mod.all_links(conn)}
    query = select(
        inbox.c.peer,
        inbox.c.seq,
        func.max(inbox.c.cid),
        func.max(inbox.c.base),
        func.max(inbox.c.parts),
        func.count(),
        func.sum(inbox.c.size),
        func.min(inbox.c.received_at),
        func.max(inbox.c.received_at),
        func.max(inbox.c.attempts),
        func.max(inbox.c.last_error),
        func.max(inbox.c.quarantined_at),
    ).group_by(inbox.c.peer, inbox.c.seq)
    if peer is not None:
        query = query.where(inbox.c.peer == peer)
    if seq is not None:
        query = query.where(inbox.c.seq == seq)
    out = []
    for r in conn.execute(query.order_by(inbox.c.peer, inbox.c.seq)):
        out.append(
            Buffered(
                peer=r[0],
                seq=int(r[1]),
                cid=r[2],
                base=int(r[3]),
                parts=int(r[4]),
                present=int(r[5]),
                size=int(r[6] or 0),
                first_received=aware(r[7]),
                last_received=aware(r[8]),
                attempts=int(r[9] or 0),
                last_error=r[10],
                quarantined_at=None if r[11] is None else aware(r[11]),
                in_seq=in_seqs.get(r[0], 0),
            )
        )
    return out


# ---------------------------------------------------------------- admission


def admit(
    conn: Connection, link: Link, header: Header, size: int, limits: Limits, where: str
) -> list[int]:
    """Make room for a part within the peer's share of the buffer, or refuse
    it (MessageError: it is set aside, not buffered). Returns the numbers
    of the changesets evicted to make room.

    The changeset next in line is always admitted up to the size a whole
    changeset may have (``max_changeset_bytes``): the link can always move.
    Everything else — changesets early for their turn — shares
    ``max_buffered_changesets`` and ``max_buffered_bytes``. When they are
    full, the lowest numbers are worth keeping (they apply first): a part
    numbered below the highest buffered changeset evicts that one, a part
    above them all is refused. Neither loses anything a real sender sent:
    it holds both until they are acknowledged and sends them again."""
    peer, seq = link.peer, header.seq
    if header.after <= link.in_seq:  # next in line
        (mine,) = conn.execute(
            select(func.coalesce(func.sum(inbox.c.size), 0)).where(
                inbox.c.peer == peer, inbox.c.seq == seq
            )
        ).one()
        if int(mine) + size > limits.max_changeset_bytes:
            raise MessageError(
                f"{where}: changeset #{seq} from {peer} would take "
                + exceeded(
                    f"{int(mine) + size:,} bytes", "max_changeset_bytes", limits.max_changeset_bytes
                )
            )
        return []
    early = (inbox.c.peer == peer, inbox.c.base > link.in_seq)
    count, total, known = conn.execute(
        select(
            func.count(func.distinct(inbox.c.seq)),
            func.coalesce(func.sum(inbox.c.size), 0),
            func.count().filter(inbox.c.seq == seq),
        ).where(*early)
    ).one()
    count, total = count + (not known), int(total) + size
    if size > limits.max_buffered_bytes:
        raise MessageError(
            f"{where}: changeset #{seq} from {peer} not buffered: "
            + exceeded(f"a part of {size:,} bytes", "max_buffered_bytes", limits.max_buffered_bytes)
        )
    evicted: list[int] = []
    if count <= limits.max_buffered_changesets and total <= limits.max_buffered_bytes:
        return evicted
    held, wanted = count - 1, total  # as they are, for the refusal
    for victim, victim_size in conn.execute(
        select(inbox.c.seq, func.sum(inbox.c.size))
        .where(*early, inbox.c.seq > seq)
        .group_by(inbox.c.seq)
        .order_by(inbox.c.seq.desc())
    ):
        evicted.append(int(victim))
        count, total = count - 1, total - int(victim_size)
        if count <= limits.max_buffered_changesets and total <= limits.max_buffered_bytes:
            conn.execute(delete(inbox).where(inbox.c.peer == peer, inbox.c.seq.in_(evicted)))
            return evicted
    if count > limits.max_buffered_changesets:
        raise MessageError(
            f"{where}: changeset #{seq} from {peer} not buffered: the inbox holds "
            + exceeded(
                f"{held:,} changesets from {peer} already",
                "max_buffered_changesets",
                limits.max_buffered_changesets,
            )
        )
    raise MessageError(
        f"{where}: changeset #{seq} from {peer} not buffered: the inbox would hold "
        + exceeded(f"{wanted:,} bytes from {peer}", "max_buffered_bytes", limits.max_buffered_bytes)
    )


def store(conn: Connection, peer: str, header: Header, blob: bytes) -> None:
    """Buffer one part (in the receiving transaction)."""
    conn.execute(
        inbox.insert().values(
            peer=peer,
            seq=header.seq,
            part=header.part,
            parts=header.parts,
            cid=header.cid,
            base=header.after,
            blob=blob,
            size=len(blob),
            received_at=now(),
        )
    )


def expire(conn: Connection, peer: str, in_seq: int, limits: Limits) -> list[int]:
    """Drop the peer's incomplete changesets no part of which arrived in the
    last ``incomplete_expiry_hours``; returns their numbers, to be asked for
    again whole (their other parts were lost in the mail, or never sent)."""
    cutoff = now() - dt.timedelta(hours=limits.incomplete_expiry_hours)
    stale = [
        int(seq)
        for seq, parts, count, last in conn.execute(
            select(inbox.c.seq, inbox.c.parts, func.count(), func.max(inbox.c.received_at))
            .where(inbox.c.peer == peer, inbox.c.seq > in_seq)
            .group_by(inbox.c.seq, inbox.c.parts)
        )
        if count < parts and aware(last) < cutoff
    ]
    if stale:
        conn.execute(delete(inbox).where(inbox.c.peer == peer, inbox.c.seq.in_(stale)))
    return stale


# --------------------------------------------------------------- quarantine


def failed(conn: Connection, peer: str, seq: int, error: str, limits: Limits) -> tuple[int, bool]:
    """Changeset ``seq`` from the peer failed to apply once more; returns
    its failures so far and whether it is now quarantined."""
    attempts = conn.execute(
        select(func.max(inbox.c.attempts)).where(inbox.c.peer == peer, inbox.c.seq == seq)
    ).scalar()
    if attempts is None:
        return 0, False  # gone meanwhile (an admin dropped it)
    attempts = int(attempts) + 1
    quarantine = attempts >= limits.quarantine_after
    values: dict[str, object] = {"attempts": attempts, "last_error": error[:2000]}
    if quarantine:
        values["quarantined_at"] = now()
    conn.execute(update(inbox).where(inbox.c.peer == peer, inbox.c.seq == seq).values(**values))
    return attempts, quarantine


def named(conn: Connection, peer: str, seq: int | None) -> list[Buffered]:
    """What an admin named (a peer's changesets, or one): an operator's
    mistake — an unknown peer, nothing buffered — is an error that changes
    nothing."""
    if links_mod.get(conn, peer) is None:
        raise ConfigError(f"unknown peer {peer!r}", hint="`mailsync status` lists the peers")
    found = buffered(conn, peer, seq)
    if not found:
        what = (
            f"changeset #{seq} from {peer} is not" if seq is not None else f"nothing from {peer} is"
        )
        raise ConfigError(
            f"{what} in the inbox", hint="`mailsync inbox list` shows what is buffered"
        )
    return found


def retry(conn: Connection, peer: str, seq: int | None = None) -> list[Buffered]:
    """Try the peer's changesets (or one) again from scratch with the next
    sync: failures forgotten, quarantine lifted, missing parts asked for at
    once. Returns what was chosen, as it was."""
    chosen = named(conn, peer, seq)
    query = update(inbox).where(inbox.c.peer == peer)
    if seq is not None:
        query = query.where(inbox.c.seq == seq)
    conn.execute(query.values(attempts=0, last_error=None, quarantined_at=None))
    if any(not b.complete for b in chosen):
        links_mod.gap_due(conn, peer)
    return chosen


def drop(conn: Connection, peer: str, seq: int, *, skip: bool = False) -> Buffered:
    """Remove a buffered changeset. One waiting for its turn, or incomplete,
    is only a copy: its sender still holds it, and it is asked for again.
    The complete one next in line is what holds the link: dropping it alone
    would bring it back as it is, so it needs ``skip`` — the link moves past
    it and it is never applied here (the sender hears it as applied).
    Returns what was dropped."""
    (chosen,) = named(conn, peer, seq)
    if chosen.next_in_line and chosen.complete and not skip:
        raise ConfigError(
            f"changeset #{seq} is next in line from {peer}: dropped alone it would be "
            "asked for and received again as it is",
            hint=f"`mailsync inbox drop {peer} {seq} --skip` moves the link past it; its rows "
            "are then never applied here (a reload brings them)",
        )
    if skip and not chosen.next_in_line:
        raise ConfigError(
            f"changeset #{seq} from {peer} is not next in line (#{chosen.in_seq + 1} is): "
            "only the changeset that holds the link can be skipped",
            hint=f"`mailsync inbox drop {peer} {seq}` without --skip drops the buffered copy",
        )
    if skip:
        links_mod.skipped(conn, peer, seq, chosen.cid)  # deletes it and older
    else:
        conn.execute(delete(inbox).where(inbox.c.peer == peer, inbox.c.seq == seq))
    return chosen
