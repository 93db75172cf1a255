"""What one cycle did, and what its stages hand each other."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from mailsync.apply import Applied
from mailsync.linkplan import Built
from mailsync.standing import Told
from mailsync.wire.controls import Dictionary


@dataclass
class CycleReport:
    """What one sync cycle did (returned by ``Node.sync()``), plus the
    hand-offs between stages: nothing passes between them in hidden state."""

    received: int = 0
    duplicates: int = 0
    #: station: what the host told us of our standing (disabled, removed),
    #: read at the start or received in this cycle (None: in good standing)
    standing: Told | None = None
    set_aside: int = 0
    applied: list[Applied] = field(default_factory=list)
    built: list[Built] = field(default_factory=list)
    sent: int = 0
    errors: list[str] = field(default_factory=list)
    #: the exit codes of the errors caught (:mod:`mailsync.errors`' table)
    exit_codes: list[int] = field(default_factory=list)
    #: per peer: messages received from it, sent to it, and its first error
    received_from: Counter[str] = field(default_factory=Counter)
    sent_to: Counter[str] = field(default_factory=Counter)
    peer_errors: dict[str, str] = field(default_factory=dict)
    #: receive → send: unrecognized mail to forward (``forward_unrecognized``)
    forward: list[bytes] = field(default_factory=list)
    #: receive → apply: per peer, the highest ack its bare acks carried
    bare_acks: dict[str, int] = field(default_factory=dict)
    #: receive → apply: peers something was buffered from and not applied
    #: at once (a later part, an early changeset, one that failed)
    left_buffered: set[str] = field(default_factory=set)
    #: apply → controls: per peer, incomplete changesets dropped from the
    #: inbox (limits.incomplete_expiry_hours), to be asked for again whole
    expired: dict[str, list[int]] = field(default_factory=dict)
    #: receive → controls: per peer, dictionaries a body of its named that we
    #: do not hold (asked for), and ours it asked for (sent again)
    dictionaries_wanted: dict[str, set[int]] = field(default_factory=dict)
    dictionaries_due: dict[str, list[Dictionary]] = field(default_factory=dict)
    #: one of several workers: the links its cycle held, and whether it
    #: read the mailbox (None: the only process serving the node)
    links_served: int | None = None
    coordinated: bool = False

    def peer_outcomes(self) -> dict[str, str]:
        """One line per peer something happened with in this cycle."""
        peers = set(self.received_from) | set(self.sent_to) | set(self.peer_errors)
        peers |= {a.peer for a in self.applied} | {b.peer for b in self.built}
        out = {}
        for peer in sorted(peers):
            rows = sum(a.rows for a in self.applied if a.peer == peer)
            text = (
                f"{self.received_from[peer]} received, {rows} rows applied, "
                f"{self.sent_to[peer]} sent"
            )
            error = self.peer_errors.get(peer)
            out[peer] = f"failed: {error}" if error else f"ok: {text}"
        return out

    @property
    def quiet(self) -> bool:
        """Nothing received, applied, built or sent, nothing failed or set
        aside: the cycle moved no sequence number and granted no lease."""
        return not (
            self.received
            or self.applied
            or self.built
            or self.sent
            or self.errors
            or self.set_aside
        )

    @property
    def exit_code(self) -> int:
        """0, or the exit code the command line gives this cycle: of its
        errors, the one deepest in the table (config 2 < database 3 <
        mailbox 4 < a changeset 5); 5 for an error with no class (a bug met
        with a message, a quarantined changeset)."""
        if not self.errors:
            return 0
        return (
            min(self.exit_codes)
            if len(self.exit_codes) == len(self.errors)
            else min([*self.exit_codes, 5])
        )

    @property
    def rows_applied(self) -> int:
        return sum(a.rows for a in self.applied)

    @property
    def rows_parked(self) -> int:
        return sum(a.parked for a in self.applied)

    @property
    def rows_sent(self) -> int:
        return sum(b.rows for b in self.built)
