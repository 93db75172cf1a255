"""Per-link zstd dictionaries: small changesets compressed with what the link
itself sent before (issue 17, item 5).

A 50-row changeset compresses poorly on its own (zstd has nothing to refer
back to: the table definitions, column names and values repeat *between*
changesets); a dictionary trained from the link's own recent bodies makes it
~25 % smaller. The dictionary must reach the peer before any body uses it,
through a mail system that loses, duplicates and reorders, and survive
restores on either side. So:

- **Sender** (:func:`for_build`, :func:`after_build`, in the build's
  transaction): small bodies are kept as samples
  (``mailsync_dictionary_samples``) until there are ``dictionary_samples`` of
  them; then a dictionary is trained (``zstandard.train_dictionary``; the
  samples' own bytes if training refuses them) and rides in the next
  changeset as a sequenced ``dict`` control. A build costs one read of the
  link's dictionaries; sampling and training add writes only to a build
  that made a changeset. It is used only once the peer
  has **acknowledged** that changeset — applied it, and with it stored the
  dictionary in the same transaction — so the peer certainly has it. Every
  ``dictionary_rotate`` changesets a new one is trained the same way
  (rotation = a new id); the old one is used until the new one is
  acknowledged, and kept while an unacknowledged outbox entry may use it.
- **The id** is a digest of the dictionary's bytes
  (:func:`~mailsync.wire.envelope.dictionary_id`), named in the signed clear
  header of every body compressed with it: an id names one dictionary
  forever (a sender restored from a backup cannot reuse it for another), and
  a ``dict`` control whose id is not its digest does not parse.
- **Receiver** (:func:`received` in the apply transaction, :func:`ready`
  before a body is decompressed): dictionaries are kept per peer, the newest
  ``KEEP_RECEIVED``; a size over ``[limits] max_dictionary_bytes`` fails the
  changeset that carries it (its link is held with the reason). A body naming
  a dictionary the node does not hold — its database went back to a backup,
  or an old resend outlived it — raises
  :class:`~mailsync.wire.envelope.UnknownDictionary`: it is set aside, never
  decoded with another, and the dictionary is asked for (``dict?``); the
  sender answers with the dictionary in a control message (``dict``) and
  sends its unacknowledged changesets again.
- Control messages and bulk changesets (initial loads, reloads) never use a
  dictionary: a node can always ask for what it lacks, and a load is
  compressed at the node's ``compression_level`` alone.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Any

import zstandard
from sqlalchemy import Connection, delete, func, select, update

from mailsync.errors import MessageError
from mailsync.store.tables import dictionaries, dictionary_samples, now, outbox
from mailsync.wire.changeset import Sink
from mailsync.wire.controls import Dictionary
from mailsync.wire.envelope import (
    Codec,
    UnknownDictionary,
    dictionary_contexts,
    dictionary_id,
)
from mailsync.wire.limits import Limits, exceeded

OUT, IN = "out", "in"
#: dictionaries kept per peer on the receiving side (a rotation needs two)
KEEP_RECEIVED = 4
#: a body larger than this is no sample (a load, a mass update)
SAMPLE_MAX_BYTES = 64 * 1024


@dataclass
class BuildDictionaries:
    """What one build does with the link's dictionaries."""

    peer: str
    #: the dictionary this body is compressed with (0: none)
    use: int = 0
    #: a new dictionary this changeset carries to the peer
    carry: Dictionary | None = None
    #: keep this body as a sample
    collect: bool = False
    #: ``use`` is used for the first time (its first changeset is recorded)
    first_use: bool = False
    #: a new dictionary may be trained after this build (samples enough)
    train: bool = False
    #: the link's other dictionaries of ours, as read (for pruning)
    rows: list[Any] = field(default_factory=list, repr=False)
    sample: bytearray | None = field(default=None, repr=False)

    def tap(self, sink: Sink) -> Sink:
        """``sink``, keeping what is written to it as a sample when one is
        wanted (up to ``SAMPLE_MAX_BYTES``)."""
        if not self.collect:
            return sink
        self.sample = bytearray()
        return _Tap(sink, self)


class _Tap:
    def __init__(self, inner: Sink, owner: BuildDictionaries) -> None:
        self.inner = inner
        self.owner = owner

    def write(self, data: bytes, /) -> int:
        sample = self.owner.sample
        if sample is not None:
            if len(sample) + len(data) > SAMPLE_MAX_BYTES:
                self.owner.sample = None
            else:
                sample += data
        return self.inner.write(data)


def for_build(
    conn: Connection,
    codec: Codec,
    peer: str,
    *,
    acked: int,
    out_seq: int,
    bulk: bool,
    known: list[Any] | None = None,
) -> BuildDictionaries:
    """Decide, in the build's transaction, which dictionary the next body of
    the link to ``peer`` uses (the newest the peer has acknowledged), whether
    it carries a new one, and whether the body is kept as a sample — one
    read (none where ``known`` holds the link's rows: id, seq, first_seq,
    read for every link at once); a build that makes nothing costs no more.
    ``bulk``: a load or reload (no dictionary, no sample)."""
    settings = codec.dictionaries
    plan = BuildDictionaries(peer)
    if not settings.enabled:
        return plan
    d = dictionaries.c
    rows = (
        known
        if known is not None
        else conn.execute(
            select(d.id, d.seq, d.first_seq).where(d.peer == peer, d.way == OUT)
        ).all()
    )
    unsent = [r for r in rows if r.seq is None]
    pending = [r for r in rows if r.seq is not None and r.seq > acked]
    active = max((r for r in rows if r.seq is not None and r.seq <= acked), key=_seq, default=None)
    if active is not None and not bulk:
        _learn(conn, codec, peer, OUT, active.id)
        plan.use = active.id
        plan.first_use = active.first_seq is None
    if unsent:
        plan.carry = _load(conn, peer, OUT, unsent[0].id)
        return plan
    if pending or bulk:
        return plan
    age = 0 if active is None or active.first_seq is None else out_seq + 1 - active.first_seq
    if active is None or age >= settings.rotate_every - settings.samples:
        plan.collect = True
        plan.train = active is None or age >= settings.rotate_every
        plan.rows = [r for r in rows if active is None or r.id != active.id]
    return plan


def after_build(
    conn: Connection, codec: Codec, plan: BuildDictionaries, seq: int, samples: int | None = None
) -> None:
    """Record, in the build's transaction, what changeset ``seq`` did: the
    dictionary it carried or used first, its body as a sample; and once
    there are samples enough, train the next dictionary (the next build
    carries it). ``samples``: how many the link held before, where read
    for every link at once."""
    d = dictionaries.c
    mine = (d.peer == plan.peer, d.way == OUT)
    if plan.carry is not None:
        conn.execute(update(dictionaries).where(*mine, d.id == plan.carry.id).values(seq=seq))
    if plan.use and plan.first_use:
        conn.execute(update(dictionaries).where(*mine, d.id == plan.use).values(first_seq=seq))
    if not (plan.collect and plan.sample):
        return
    s = dictionary_samples.c
    conn.execute(dictionary_samples.insert().values(peer=plan.peer, body=bytes(plan.sample)))
    settings = codec.dictionaries
    if not plan.train:
        return
    if samples is not None:
        count = samples + 1  # and the one just kept
    else:
        count = conn.execute(select(func.count()).where(s.peer == plan.peer)).scalar() or 0
    if count < settings.samples:
        return
    bodies = [
        bytes(b)
        for (b,) in conn.execute(select(s.body).where(s.peer == plan.peer).order_by(s.id.desc()))
    ]
    data = train(bodies, settings.size)
    ident = dictionary_id(data)
    conn.execute(delete(dictionary_samples).where(s.peer == plan.peer))
    if ident not in {r.id for r in plan.rows} and ident != plan.use:
        conn.execute(
            dictionaries.insert().values(
                peer=plan.peer, way=OUT, id=ident, data=data, seq=None, created_at=now()
            )
        )
        _prune_sent(conn, plan.peer, plan.rows)


def train(bodies: list[bytes], size: int) -> bytes:
    """A dictionary of at most ``size`` bytes from ``bodies`` (newest first):
    trained by zstd, or — when zstd finds too little to train on — the
    newest bodies' own bytes, which zstd uses as a raw-content dictionary."""
    with contextlib.suppress(zstandard.ZstdError):
        return zstandard.train_dictionary(size, list[Any](bodies)).as_bytes()
    return b"".join(reversed(bodies))[-size:]


def _prune_sent(conn: Connection, peer: str, older: list[Any]) -> None:
    """Forget our dictionaries of this link that no unacknowledged changeset
    can still use: each one whose successor was first used at or before the
    oldest changeset still in the outbox (or with an empty outbox)."""
    d = dictionaries.c
    used = sorted((r for r in older if r.first_seq is not None), key=lambda r: int(r.first_seq))
    if len(used) < 2:
        return
    oldest = conn.execute(select(func.min(outbox.c.seq)).where(outbox.c.peer == peer)).scalar()
    gone = [
        r.id
        for r, successor in itertools.pairwise(used)
        if oldest is None or successor.first_seq <= oldest
    ]
    if gone:
        conn.execute(delete(dictionaries).where(d.peer == peer, d.way == OUT, d.id.in_(gone)))


# ------------------------------------------------------------------ receiving


def received(conn: Connection, peer: str, control: Dictionary, limits: Limits, seq: int) -> None:
    """Keep a dictionary ``peer`` sent (in the transaction that applies the
    changeset carrying it, or takes the control message): the newest
    ``KEEP_RECEIVED`` per peer stay. ``seq``: where it arrived (orders them)."""
    if len(control.data) > limits.max_dictionary_bytes:
        raise MessageError(
            f"dictionary {control.id:x} from {peer}: "
            + exceeded(
                f"{len(control.data):,} bytes", "max_dictionary_bytes", limits.max_dictionary_bytes
            )
        )
    dictionary_contexts(control.data, 1, f"dictionary {control.id:x} from {peer}")
    d = dictionaries.c
    mine = (d.peer == peer, d.way == IN)
    held = conn.execute(select(d.id).where(*mine, d.id == control.id)).first()
    if held is not None:
        conn.execute(update(dictionaries).where(*mine, d.id == control.id).values(seq=seq))
    else:
        conn.execute(
            dictionaries.insert().values(
                peer=peer, way=IN, id=control.id, data=control.data, seq=seq, created_at=now()
            )
        )
    keep = (
        select(d.id)
        .where(*mine)
        .order_by(d.seq.desc(), d.created_at.desc())
        .limit(KEEP_RECEIVED)
        .scalar_subquery()
    )
    conn.execute(delete(dictionaries).where(*mine, d.id.not_in(keep)))


def ready(conn: Connection, codec: Codec, peer: str, dictionary: int, origin: str) -> None:
    """Make sure ``codec`` can decompress a body from ``peer`` naming
    ``dictionary``; UnknownDictionary (a MessageError) when this node does
    not hold it."""
    if codec.knows(peer, dictionary):
        return
    data = _load(conn, peer, IN, dictionary)
    if data is None:
        raise UnknownDictionary(origin, peer, dictionary)
    codec.learn(peer, data.data)


def asked_for(conn: Connection, peer: str, ids: tuple[int, ...]) -> list[Dictionary]:
    """``peer`` lacks these of our dictionaries: the ones we still hold, to
    send again; and our unacknowledged changesets go again after them."""
    d = dictionaries.c
    found = [
        Dictionary(int(i), bytes(data))
        for i, data in conn.execute(
            select(d.id, d.data).where(d.peer == peer, d.way == OUT, d.id.in_(ids))
        )
    ]
    if found:
        conn.execute(
            update(outbox)
            .where(outbox.c.peer == peer, outbox.c.sent_at.is_not(None))
            .values(sent_at=None)
        )
    return found


# -------------------------------------------------------------------- helpers


def _seq(row: Any) -> int:
    return int(row.seq)


def _load(conn: Connection, peer: str, way: str, ident: int) -> Dictionary | None:
    d = dictionaries.c
    data = conn.execute(select(d.data).where(d.peer == peer, d.way == way, d.id == ident)).scalar()
    return None if data is None else Dictionary(ident, bytes(data))


def _learn(conn: Connection, codec: Codec, peer: str, way: str, ident: int) -> None:
    if not codec.knows(peer, ident):
        found = _load(conn, peer, way, ident)
        if found is not None:
            codec.learn(peer, found.data)
