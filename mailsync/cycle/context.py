"""What a cycle needs of its node, and what differs between host and remote.

:class:`CycleContext` is the narrow door between the node and its cycle:
config, database, keys, codec, journal and the mailbox settings — nothing
else of the node reaches a stage. :class:`Role` holds every decision that
differs between the host and a remote, so no stage branches on the role.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Literal

from sqlalchemy import Connection, Engine, event, select

from mailsync import definitions, joined, trust
from mailsync import link as links_mod
from mailsync import rules as rules_mod
from mailsync.config import NodeConfig
from mailsync.cycle.selection import EVERYTHING, Selection
from mailsync.cycle.snapshot import Snapshot
from mailsync.dialects import Dialect, dialect_for
from mailsync.errors import ConfigError
from mailsync.journal import Journal
from mailsync.keys import KeyRing, PublicKey
from mailsync.link import Link
from mailsync.linkplan import LinkPlan
from mailsync.ranges import exchange
from mailsync.ranges.model import RangeDef
from mailsync.rules import Direction, Rule
from mailsync.shared_reads import Sealing
from mailsync.store.seen import SeenInDatabase
from mailsync.store.tables import loads
from mailsync.transport import Receiver, TransportContext, open_receiver
from mailsync.transport.keep import Keeper
from mailsync.wire.controls import RangeGrants, RangeReport
from mailsync.wire.envelope import Codec, Header
from mailsync.wire.limits import Limits
from mailsync.workers.claims import Share
from mailsync.workers.mailbag import SharedMailbox


@dataclass(frozen=True)
class Role:
    """Host or remote: which way changes come in, whose rules apply, what
    control traffic a link carries."""

    name: Literal["host", "remote"]

    @property
    def is_host(self) -> bool:
        return self.name == "host"

    @property
    def inbound(self) -> Direction:
        """The direction changesets we apply travelled."""
        return "up" if self.is_host else "down"

    @property
    def outbound(self) -> Direction:
        return "down" if self.is_host else "up"

    @property
    def hears_from_host(self) -> bool:
        """Our peers' mail comes from the host (we are a remote)."""
        return not self.is_host

    @property
    def accepts_rules(self) -> bool:
        """A remote takes its rules (and full loads) from the host."""
        return not self.is_host

    @property
    def can_be_reloaded(self) -> bool:
        """A remote that lost rows asks the host for a reload; the host is
        the reference copy and has nobody to ask."""
        return not self.is_host

    def rules(self, conn: Connection, peer: str) -> dict[str, Rule]:
        """The rules in force on the link with ``peer``: the station's on the
        host, the ones the host sent on a remote."""
        return rules_mod.effective_rules(conn, peer if self.is_host else None)

    def senders(
        self, conn: Connection, peers: list[str], every: list[Rule] | None = None
    ) -> set[str]:
        """Those of ``peers`` whose rules let them send us rows (one read of
        the rules for all of them; none where ``every`` holds them)."""
        if every is None:
            every = rules_mod.all_rules(conn)
        inbound = self.inbound
        out = set()
        for peer in peers:
            effective = rules_mod.effective_from(every, peer if self.is_host else None)
            if any(r.up if inbound == "up" else r.down for r in effective.values()):
                out.add(peer)
        return out

    def plans(
        self,
        conn: Connection,
        me: str,
        links: list[Link],
        mine: PublicKey,
        every: list[Rule] | None = None,
    ) -> list[LinkPlan]:
        """What may travel to each of ``links`` in this build: the rules
        (unless ``every`` holds them) and the loads already sent are read
        once for all of them."""
        if every is None:
            every = rules_mod.all_rules(conn)
        since: dict[str, dict[str, tuple[str, dt.datetime]]] = {}
        watch = None
        if self.is_host:
            # one read of the loads for every station: what goes again since
            # a date, which tables were loaded with which definition
            query = select(
                loads.c.station,
                loads.c.tbl,
                loads.c.since_column,
                loads.c.since,
                loads.c.digest,
                loads.c.stopped,
            )
            rows = conn.execute(query).all()
            for station, table, column, moment, _, _ in rows:
                if column is not None and moment is not None:
                    since.setdefault(station, {})[table] = (column, links_mod.aware(moment))
            watch = definitions.Watch(conn, [(r[0], r[1], r[4], r[5]) for r in rows])
        out = []
        for link in links:
            announce = None if link.key_announced == mine.key_id else mine
            effective = rules_mod.effective_from(every, link.peer if self.is_host else None)
            if not self.is_host:
                out.append(
                    LinkPlan(
                        me,
                        link.peer,
                        "up",
                        effective,
                        announce_key=announce,
                        resend_all=link.resend_all,
                        rebase=link.rebase,
                        verify_due=link.verify_due,
                        waits_for_rules=not effective and joined.waiting(conn),
                    )
                )
                continue
            digest = rules_mod.rules_hash(effective)
            assert watch is not None
            done = watch.loaded(link.peer)
            to_load = [t for t, r in effective.items() if "I" in r.down and t not in done]
            resend = {t: v for t, v in since.get(link.peer, {}).items() if t in effective}
            out.append(
                LinkPlan(
                    me,
                    link.peer,
                    "down",
                    effective,
                    # a reloaded station may hold the rules of its backup's day
                    send_rules=digest != link.rules_hash or link.reload_wanted,
                    rules_hash=digest,
                    initial_loads=to_load,
                    announce_key=announce,
                    reload=link.reload_wanted,
                    rebase=link.rebase,
                    address=link.address,
                    paused=link.paused_at is not None,
                    since_loads=resend,
                    served=None if link.request_told else link.table_request,
                    verify_due=link.verify_due,
                    schema=watch.standing(link.peer, effective),
                )
            )
        return out

    def ranges_out(
        self,
        conn: Connection,
        link: Link,
        resend: dt.timedelta,
        ask_again: dt.timedelta,
        ranges: list[RangeDef],
    ) -> tuple[RangeGrants | RangeReport | None, bool]:
        """The number-range control due to ``link``'s peer, and whether it
        must go now (a host's grants always must; a station's report when it
        has something to confirm or ask for). ``ranges``: read once per cycle."""
        if self.is_host:
            grants = exchange.host_outgoing(
                conn, link.peer, resend, ranges=ranges, waiting=link.report_due
            )
            return (grants or None), bool(grants)
        return exchange.station_outgoing(conn, ask_again, ranges)

    def ranges_in(
        self, conn: Connection, peer: str, control: RangeGrants | RangeReport
    ) -> list[exchange.Note]:
        """Act on a peer's number-range control; (event, line) for the log."""
        if isinstance(control, RangeReport):
            return exchange.host_incoming(conn, peer, control) if self.is_host else []
        if self.is_host:
            return []
        return [(exchange.DONE, line) for line in exchange.station_incoming(conn, control)]


@dataclass
class CycleContext:
    """Everything a stage may use of its node."""

    config: NodeConfig
    engine: Engine
    ring: KeyRing
    codec: Codec
    journal: Journal
    #: the in-process post office of ``memory:`` mailboxes (tests, demo)
    memory: object | None = None
    #: seconds; the SMTP retry backoff base (tests make it small)
    retry_backoff: float = 1.0
    #: IMAP and SMTP sessions kept from one cycle to the next (``Node.close``
    #: logs them out)
    keeper: Keeper = field(default_factory=Keeper)
    dialect: Dialect = field(init=False)
    role: Role = field(init=False)
    #: what the cycle read at its start; None once anything committed since
    #: (:meth:`fresh`)
    snapshot: Snapshot | None = field(init=False, default=None)
    #: the same, kept for the cycle whatever commits (for what only the
    #: cycle's own stages change, and they say so in the report)
    started: Snapshot | None = field(init=False, default=None)
    #: the node confirmed its restore witness and nothing ran since (the
    #: first cycle after ``Node.open`` need not do it again)
    witness_confirmed: bool = field(init=False, default=False)
    #: the stations and tables this run is limited to (``sync --station``)
    selection: Selection = field(init=False, default=EVERYTHING)
    #: one of several workers (``serve --workers``): the links this cycle
    #: holds and whether it coordinates (:mod:`mailsync.workers`); None: the
    #: only process serving the node
    share: Share | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.dialect = dialect_for(self.engine)
        self.role = Role(self.config.role)
        event.listen(self.engine, "commit", self._committed)

    def _committed(self, _conn: Connection) -> None:
        self.snapshot = None
        self.witness_confirmed = False

    def fresh(self) -> Snapshot | None:
        """The cycle's start snapshot, while no commit on this engine made
        it stale (then a stage reads what it needs itself)."""
        return self.snapshot

    @property
    def me(self) -> str:
        return self.config.node_id

    @property
    def limits(self) -> Limits:
        """The bounds on decoding what peers send (the codec applies them)."""
        return self.codec.limits

    @property
    def coordinating(self) -> bool:
        """Whether this cycle does the node's own chores: reading the
        mailbox, purging, the removed stations' farewells (one worker of
        several does, each cycle: the one holding the intake)."""
        return self.share is None or self.share.coordinator

    def open_mailbox(self) -> Receiver:
        """What receive reads: the node's mailbox, or for one of several
        workers its links' share of it (:mod:`mailsync.workers.mailbag`)."""
        box = self.config.mailbox.receive
        if self.share is None:
            return open_receiver(box, self.transport_context())
        return SharedMailbox(
            self.engine,
            self.me,
            self.share,
            lambda: open_receiver(box, self.transport_context()),
            self._signed_by,
            self.limits.max_changeset_bytes + self.limits.max_buffered_bytes,
        )

    def _signed_by(self, blob: bytes, where: str, peer: str) -> object:
        """``blob``'s header, if ``peer`` signed it (MessageError if not)."""
        with self.engine.connect() as conn:
            keys = self.sender_keys(conn, peer)
        return self.codec.verify(blob, where, keys)

    def transport_context(self) -> TransportContext:
        box = self.config.mailbox
        return TransportContext(
            address=box.address,
            base_dir=self.config.base_dir,
            keep_processed=box.keep_processed,
            memory=self.memory,
            secret=box.secret,
            ca_file=box.ca_file,
            insecure=box.insecure,
            timeout=box.timeout,
            processed_folder=box.processed_folder,
            unrecognized_folder=box.unrecognized_folder,
            seen=SeenInDatabase(self.engine, box.receive),
            retry_backoff=self.retry_backoff,
            warn=self._warn_insecure,
            keeper=self.keeper,
        )

    def _warn_insecure(self, text: str) -> None:
        """``insecure = true``, at every connection: in the node's log (and so
        on the ``mailsync`` logger), where `status` and `mailsync log` show it."""
        self.journal.warning("insecure", text)

    def sender_keys(self, conn: Connection, peer: str) -> list[PublicKey]:
        """The peer's keys that may sign what it sends now."""
        return trust.usable_keys(conn, peer, self.config.key_grace_days)

    def seal(
        self, conn: Connection, header: Header, body: bytes, /, known: Sealing | None = None
    ) -> bytes:
        """Encrypt for the peer's current key; sign with our old key until the
        peer has acknowledged the message that announced our new one. The
        link and the peer's key are read unless ``known`` (a build stage
        reads them once for all links: :mod:`mailsync.shared_reads`)."""
        peer = known.key if known is not None else trust.current_key(conn, header.recipient)
        if peer is None:
            raise ConfigError(
                f"no public key for {header.recipient!r}",
                hint="enroll it again (`mailsync station add --key` / `mailsync join`)",
                scope="peer",
            )
        link = known.link if known is not None else links_mod.one(conn, header.recipient)
        signer = self.ring.current.sign
        previous = self.ring.usable_previous(self.config.key_grace_days)
        if previous and link.acked_seq < link.key_announced_seq:
            signer = previous[0].sign
        return self.codec.seal(header, body, peer, signer)
