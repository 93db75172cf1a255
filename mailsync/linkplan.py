"""What may travel on one link in one build (:class:`LinkPlan`, made by
:meth:`mailsync.cycle.context.Role.plans`), and what a build made
(:class:`Built`): the values :mod:`mailsync.build` works from and returns,
apart from it so that the cycle's snapshot and selection can name them
without the builder.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from mailsync.definitions import Standing
from mailsync.keys import PublicKey
from mailsync.rules import Direction, Rule


@dataclass
class LinkPlan:
    """What may travel on one link in this build."""

    me: str
    peer: str
    direction: Direction
    rules: dict[str, Rule]
    send_rules: bool = False
    rules_hash: str | None = None
    initial_loads: list[str] = field(default_factory=list)
    #: our new public key, when this peer has not been told about it yet
    announce_key: PublicKey | None = None
    #: the peer lost what it had applied (a restored backup): this build is a
    #: full load of ``initial_loads`` that replaces its copy, applied on top
    #: of whatever it has (header base 0)
    reload: bool = False
    #: remote, after the host went back to a backup: every row we send up
    #: goes again (the host lost some), applied on top of whatever it has
    resend_all: bool = False
    #: our database went back: the peer may miss changesets we no longer
    #: hold, so this one applies on top of whatever it has (header base 0)
    rebase: bool = False
    #: the peer's mailbox address (a row filter may name it as ``:email``)
    address: str = ""
    #: host: the station is disabled: nothing is built for it
    paused: bool = False
    #: per table, (timestamp column, since): its rows changed since then go
    #: again (``reload --since``, :mod:`mailsync.since`)
    since_loads: dict[str, tuple[str, dt.datetime]] = field(default_factory=dict)
    #: host: the station's own reload request to tell it is acted on
    served: str | None = None
    #: this run builds only these tables (``sync --table``); None: every one
    only_tables: frozenset[str] | None = None
    #: a verification has a round, an answer or a keyed resend for the peer
    #: (:mod:`mailsync.verification`)
    verify_due: bool = False
    #: host: the station's tables against the host's definitions now
    #: (columns added, breaking changes, resyncs: :mod:`mailsync.definitions`)
    schema: Standing = field(default_factory=Standing)
    #: a station that joined and has no rules yet (the host's first
    #: changeset has not come): what it logs waits for them, its cursor
    #: does not move (:mod:`mailsync.joined`)
    waits_for_rules: bool = False

    @property
    def carries_controls(self) -> bool:
        """Something goes even with no change to send: our key, the rules,
        a table's initial load, a full reload, every row again (the host
        went back)."""
        return bool(
            self.announce_key is not None
            or self.send_rules
            or self.initial_loads
            or self.reload
            or self.resend_all
            or self.since_loads
            or self.served
            or self.verify_due
            or self.schema.anything
        )

    def ops(self, table: str) -> str:
        rule = self.rules.get(table)
        if rule is None or table in self.schema.stopped or table in self.schema.stopping:
            return ""  # a table a breaking change stopped sends nothing
        return rule.down if self.direction == "down" else rule.up

    def builds(self, table: str) -> bool:
        """Whether this run builds ``table`` (its rule sends something, and
        the run is not limited to other tables)."""
        return bool(self.ops(table)) and (self.only_tables is None or table in self.only_tables)

    def row_filter(self, table: str) -> str | None:
        rule = self.rules.get(table)
        return rule.row_filter if rule is not None and self.direction == "down" else None


@dataclass(frozen=True)
class Built:
    """An outbox entry that was just created."""

    peer: str
    seq: int
    rows: int
    raw_size: int
    size: int
    parts: int = 1
    #: loaded tables whose definition could not travel, and why (the
    #: station must create them itself)
    undescribed: dict[str, str] = field(default_factory=dict)
