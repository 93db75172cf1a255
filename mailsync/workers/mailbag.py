"""One mailbox, several workers: the mail one worker takes from the
node's mailbox for links another worker holds waits in
``mailsync_mailbag`` for it.

The worker holding the intake (:class:`~mailsync.workers.claims.Share`)
reads the mailbox once per cycle. A message whose clear header names a
peer of ours as its sender and us as its recipient, for a link this
worker does not hold, is put in the bag under that peer — in batches,
one commit each, and taken out of the mailbox only after that commit
(:meth:`Receiver.processed`), as receive does with every message. The
rest (ours to serve, or anything that is not a peer's: mail to set aside,
strangers) goes through this worker's receive stage as usual. A worker
then receives its links' bagged mail through the same stage, before the
mailbox's: :class:`SharedMailbox` is the :class:`~mailsync.transport.
Receiver` the cycle reads from.

Only what its peer signed is bagged: the intake checks the signature
against the peer's keys (what fails goes through receive and is set
aside in the mailbox, as before), and a peer's bag holds at most what
its inbox may (``max_changeset_bytes`` + ``max_buffered_bytes``): more
waits in the mailbox for a later cycle, so a station — or its stolen key
— cannot fill the database through the bag. The owner's receive stage
still checks everything (signature, sequence, rules) as for mail from the
mailbox; a message bagged twice (a crash between the bag's commit and the
mailbox's delete) is a duplicate there, as a message delivered twice is.
What the owner sets aside stays in the bag with the reason (``aside``)
for :data:`ASIDE_DAYS`, for an admin, never fetched again; the purge
forgets it after (:func:`forget_aside`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Self

from sqlalchemy import Connection, Engine, delete, func, select, update

from mailsync.errors import MessageError
from mailsync.store.tables import mailbag, now
from mailsync.transport.base import Incoming, Receiver
from mailsync.wire.envelope import read_header
from mailsync.wire.message import extract_envelope, is_mailsync
from mailsync.workers.claims import Share

#: Messages bagged in one commit, and the bytes of one batch at most.
BATCH_MESSAGES = 200
BATCH_BYTES = 16 * 1024 * 1024

_BAG, _BOX = "bag:", "box:"

#: Days a message set aside from the bag is kept for an admin.
ASIDE_DAYS = 14


def forget_aside(conn: Connection) -> None:
    """Set-aside bag mail past :data:`ASIDE_DAYS` (the coordinator's purge)."""
    cutoff = now() - dt.timedelta(days=ASIDE_DAYS)
    conn.execute(delete(mailbag).where(mailbag.c.aside.is_not(None), mailbag.c.taken_at < cutoff))


#: Checks a message's signature for the peer it names: the envelope, or
#: MessageError (:meth:`CycleContext.open_mailbox` binds the codec and keys).
Check = Callable[[bytes, str, str], object]


def sender_of(raw: bytes, me: str) -> str | None:
    """The peer a message says it comes from, if it says it is ours and for
    us (unverified: only to route it); None for anything else."""
    if not is_mailsync(raw):
        return None
    try:
        header = read_header(extract_envelope(raw, "message"), "message")
    except MessageError:
        return None
    return header.sender if header.recipient == me else None


class SharedMailbox:
    """The cycle's receiver for a worker: its links' bagged mail, then
    (holding the intake) the mailbox, whose mail for other links is bagged."""

    def __init__(
        self,
        engine: Engine,
        me: str,
        share: Share,
        mailbox: Callable[[], Receiver],
        check: Check,
        cap: int,
    ) -> None:
        self.engine = engine
        self.me = me
        self.share = share
        self._open_mailbox = mailbox
        self._check = check
        #: bytes a peer's bag may hold; what is over waits in the mailbox
        self._cap = cap
        self._box: Receiver | None = None
        #: messages bagged for other workers this cycle
        self.bagged = 0

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._box is not None:
            box, self._box = self._box, None
            box.__exit__(exc_type, exc, tb)

    def fetch(self) -> Iterator[Incoming]:
        # the bag first: a mailbox that cannot be reached (opened only
        # now) ends the stage after this worker's bagged mail is taken
        yield from self._from_bag()
        if self.share.coordinator:
            self._box = self._open_mailbox().__enter__()
            yield from self._from_mailbox(self._box)

    def _from_bag(self) -> Iterator[Incoming]:
        """This worker's links' bagged mail, oldest first, read one by one
        (a part may be megabytes)."""
        if not self.share.peers:
            return
        with self.engine.connect() as conn:
            ids = list(
                conn.execute(
                    select(mailbag.c.id)
                    .where(mailbag.c.peer.in_(sorted(self.share.peers)), mailbag.c.aside.is_(None))
                    .order_by(mailbag.c.id)
                ).scalars()
            )
        for bag_id in ids:
            with self.engine.connect() as conn:
                raw = conn.execute(select(mailbag.c.raw).where(mailbag.c.id == bag_id)).scalar()
            if raw is not None:  # gone: another cycle took it meanwhile
                yield Incoming(f"{_BAG}{bag_id}", bytes(raw))

    def _from_mailbox(self, box: Receiver) -> Iterator[Incoming]:
        """The mailbox: what is this worker's (or nobody's) is yielded, what
        another worker's link is bagged, a batch per commit."""
        batch: list[tuple[str, str, bytes]] = []
        size = 0
        held = self._held()
        for msg in box.fetch():
            peer = sender_of(msg.raw, self.me)
            if peer is None or peer in self.share.peers or peer not in self.share.known:
                yield Incoming(f"{_BOX}{msg.id}", msg.raw)
                continue
            try:
                # only what its peer signed is kept for it: anything else is
                # set aside here, by receive, as mail from the mailbox is
                self._check(
                    extract_envelope(msg.raw, f"message {msg.id}"), f"message {msg.id}", peer
                )
            except MessageError:
                yield Incoming(f"{_BOX}{msg.id}", msg.raw)
                continue
            if held.get(peer, 0) + len(msg.raw) > self._cap:
                continue  # its holder has enough to take: this waits in the mailbox
            held[peer] = held.get(peer, 0) + len(msg.raw)
            batch.append((msg.id, peer, msg.raw))
            size += len(msg.raw)
            if len(batch) >= BATCH_MESSAGES or size >= BATCH_BYTES:
                self._bag(box, batch)
                batch, size = [], 0
        if batch:
            self._bag(box, batch)

    def _held(self) -> dict[str, int]:
        """Bytes waiting in the bag per peer (one statement)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(mailbag.c.peer, func.sum(func.length(mailbag.c.raw)))
                .where(mailbag.c.aside.is_(None))
                .group_by(mailbag.c.peer)
            )
            return {peer: int(total or 0) for peer, total in rows}

    def _bag(self, box: Receiver, batch: list[tuple[str, str, bytes]]) -> None:
        stamp = now()
        with self.engine.begin() as conn:
            conn.execute(
                mailbag.insert(),
                [{"peer": peer, "raw": raw, "taken_at": stamp} for _, peer, raw in batch],
            )
        for message_id, _, _ in batch:  # only now: the bag's commit holds them
            box.processed(message_id)
        self.bagged += len(batch)

    def processed(self, message_id: str) -> None:
        if message_id.startswith(_BAG):
            with self.engine.begin() as conn:
                conn.execute(delete(mailbag).where(mailbag.c.id == int(message_id[len(_BAG) :])))
        else:
            assert self._box is not None
            self._box.processed(message_id[len(_BOX) :])

    def set_aside(self, message_id: str, reason: str) -> None:
        if message_id.startswith(_BAG):
            with self.engine.begin() as conn:
                conn.execute(
                    update(mailbag)
                    .where(mailbag.c.id == int(message_id[len(_BAG) :]))
                    .values(aside=reason[:2000])
                )
        else:
            assert self._box is not None
            self._box.set_aside(message_id[len(_BOX) :], reason)
