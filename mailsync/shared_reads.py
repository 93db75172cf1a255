"""What each build of one settling transaction would read about its own
link, read once for all of them (issue 21).

A host cycle that builds for a thousand stations used to ask, per link: the
link's row (twice: to build, and to pick the signing key when sealing),
the station's current public key, whether conflict notes wait for it, its
outgoing zstd dictionaries and the samples kept for its next one, and
whether a horizon row already holds the new changeset's number (only after
a restore). :class:`SharedReads` asks each
of these once, for every link, at the start of the build stage, in the
settling transaction; a build uses its peer's entry.

Why that is safe: in this transaction only a link's own build writes its
row, its dictionaries and samples, its notes and its horizons (each build in its
savepoint, for its peer alone), so what was read at the start is what the
build would have read itself; a peer with no entry (a link enrolled since)
reads for itself. The per-link reads stay the fallback of every caller that
has no shared reads (a one-off build, ``reload``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from sqlalchemy import Connection, func, select

from mailsync import link as links_mod
from mailsync.dictionaries import OUT
from mailsync.keys import PublicKey
from mailsync.link import Link
from mailsync.store.tables import (
    conflict_notes,
    dictionaries,
    dictionary_samples,
    horizons,
    peer_keys,
)
from mailsync.wire.envelope import Header

#: Below this many links to build, each reads for itself (for one link the
#: shared reads would cost as many statements as they save).
AT_LEAST = 2


@dataclass(frozen=True)
class Sealing:
    """What sealing a part reads of its link, where already known: the link
    as the build left it, the peer's current key (None: none on record)."""

    link: Link
    key: PublicKey | None


class Sealer(Protocol):
    """Seals a part for its recipient (:meth:`mailsync.cycle.context.CycleContext.seal`),
    with what is :class:`Sealing` where it was read already."""

    def __call__(
        self, conn: Connection, header: Header, body: bytes, /, known: Sealing | None = None
    ) -> bytes: ...


@dataclass
class SharedReads:
    """Per peer: its link, current key, outgoing dictionaries, samples; which peers
    have conflict notes queued; the highest changeset number per peer in
    ``mailsync_horizons``."""

    links: dict[str, Link] = field(default_factory=dict)
    keys: dict[str, PublicKey] = field(default_factory=dict)
    noted: set[str] = field(default_factory=set)
    dictionaries: dict[str, list[Any]] = field(default_factory=dict)
    #: per peer: the bodies kept as samples for its next dictionary
    samples: dict[str, int] = field(default_factory=dict)
    top: dict[str, int] = field(default_factory=dict)

    @staticmethod
    def read(conn: Connection, peers: Sequence[str]) -> SharedReads | None:
        """The shared reads for building to ``peers`` (None: too few to
        be worth it, each build reads for itself)."""
        if len(peers) < AT_LEAST:
            return None
        wanted = set(peers)
        out = SharedReads()
        out.links = {x.peer: x for x in links_mod.all_links(conn) if x.peer in wanted}
        current = select(peer_keys.c.peer, peer_keys.c.public).where(
            peer_keys.c.replaced_at.is_(None)
        )
        out.keys = {p: PublicKey.parse(t) for p, t in conn.execute(current) if p in wanted}
        out.noted = set(conn.execute(select(conflict_notes.c.peer).distinct()).scalars())
        d = dictionaries.c
        for row in conn.execute(select(d.peer, d.id, d.seq, d.first_seq).where(d.way == OUT)):
            if row.peer in wanted:
                out.dictionaries.setdefault(row.peer, []).append(row)
        s = dictionary_samples.c
        kept = select(s.peer, func.count()).group_by(s.peer)
        out.samples = {p: int(n) for p, n in conn.execute(kept) if p in wanted}
        h = horizons.c
        top = select(h.peer, func.max(h.seq)).group_by(h.peer)
        out.top = {p: int(s) for p, s in conn.execute(top) if p in wanted}
        return out

    def link(self, peer: str) -> Link | None:
        return self.links.get(peer)

    def after_built(self, peer: str, seq: int, announced: bool) -> Sealing | None:
        """What sealing changeset ``seq`` reads: the link as its build just
        left it (our key announced with it, where it was), the peer's key."""
        found = self.links.get(peer)
        if found is None:
            return None
        if announced:
            found = replace(found, out_seq=seq, key_announced_seq=seq)
        else:
            found = replace(found, out_seq=seq)
        return Sealing(found, self.keys.get(peer))

    def may_hold_horizon(self, peer: str, seq: int) -> bool:
        """Whether a horizon row of ``peer`` may already have number
        ``seq`` or a later one (a database gone back: the old row goes)."""
        return peer not in self.links or self.top.get(peer, 0) >= seq
