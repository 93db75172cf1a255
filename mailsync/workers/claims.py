"""Which links a worker serves in one cycle: its share, claimed with
advisory locks (:mod:`mailsync.dialects.pg_locks`).

Each cycle a worker counts the live workers, takes its share of the links
(``ceil(links / workers)``), starting at its own place in the peer order
(the k-th live worker at the k-th share, so that workers whose cycles
overlap seldom try the same links), skipping every link another worker
holds; and tries the intake lock: whoever holds it reads the mailbox and
does the node's own chores this cycle (:class:`Share.coordinator`). At
the cycle's end it lets go of everything but its life lock. A worker that
dies lets go of everything at once (the database ends its session).

Exactly once does not depend on any of this: a link's state is a row and
its outbox, inbox and cursor move in transactions; the lock only keeps
two workers from building, applying or sending on one link at the same
time — which would be wasted work and doubled mail, not lost work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, select

from mailsync.dialects import pg_locks
from mailsync.store.tables import links
from mailsync.workers import registry


@dataclass(frozen=True)
class Share:
    """What one worker's cycle serves."""

    #: the links it holds for this cycle
    peers: frozenset[str]
    #: it holds the intake: reads the mailbox, purges, says farewells
    coordinator: bool
    #: every link of the node when claimed (mail for one of them that this
    #: worker does not hold is bagged for its holder)
    known: frozenset[str]


class Claimant:
    """A worker's own session: its life lock, and each cycle's claims."""

    def __init__(self, engine: Engine, where: str) -> None:
        registry.require_postgresql(engine, where)
        self.engine = engine
        self.session: Connection = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        self.id = registry.register(self.session)

    def claim(self) -> Share:
        """This cycle's share: two or three statements whatever the number
        of links (the peers, the live workers, one claiming statement, the
        intake)."""
        conn = self.session
        peers = list(conn.execute(select(links.c.peer).order_by(links.c.peer)).scalars())
        alive = registry.live_ids(conn)
        count = max(1, len(alive))
        rank = alive.index(self.id) if self.id in alive else 0
        share = math.ceil(len(peers) / count) if peers else 0
        start = (rank * share) % len(peers) if peers else 0
        got = pg_locks.claim_links(conn, peers[start:] + peers[:start], share)
        coordinator = pg_locks.try_lock(conn, pg_locks.INTAKE, 0)
        return Share(frozenset(got), coordinator, frozenset(peers))

    def release(self, share: Share) -> None:
        """The cycle is over: its links and the intake go back."""
        pg_locks.release_links(self.session, sorted(share.peers))
        if share.coordinator:
            pg_locks.unlock(self.session, pg_locks.INTAKE, 0)

    def close(self) -> None:
        """Stop: the row says so, the session (and its life lock) ends."""
        try:
            registry.stopped(self.engine, self.id)
        finally:
            try:
                # the connection goes back to the pool, which would keep
                # session locks: every one of them goes first
                pg_locks.unlock_all(self.session)
            finally:
                self.session.close()
