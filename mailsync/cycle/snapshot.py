"""What a cycle reads once, at its start, for every stage.

An idle cycle — nothing in the mailbox, nothing logged, nothing due — is
decided from this alone: one read transaction (:func:`mailsync.cycle.start.
begin`) and no write. The snapshot holds only while nothing has committed
on the engine since it was read (:meth:`CycleContext.fresh
<mailsync.cycle.context.CycleContext.fresh>`); a stage that finds it gone
reads what it needs itself, as it did before there was one.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from mailsync.errors import MailsyncError
from mailsync.link import Link
from mailsync.linkplan import LinkPlan
from mailsync.ranges.model import RangeDef
from mailsync.rules import Rule


@dataclass
class Snapshot:
    """The state every stage starts from, read in one transaction."""

    #: every link, in peer order
    links: list[Link]
    #: the routing plan of each link with its change-log cursor (build)
    planned: list[tuple[LinkPlan, int]]
    #: every table rule (host: all stations'; remote: the host's)
    rules: list[Rule]
    #: the highest change-log id committed when read (0: none)
    logged: int
    #: the peers something is buffered from (apply, controls)
    waiting: set[str]
    #: outbox parts due to be sent (send)
    pending: list[Any]
    #: every number range, and the peers whose range traffic is due now
    ranges: list[RangeDef]
    ranges_due: set[str]
    #: capture triggers (re)installed at the start, and tables whose check failed
    repaired: list[str] = field(default_factory=list)
    broken: dict[str, MailsyncError] = field(default_factory=dict)
    #: purge: the change-log ids no peer can need, the oldest log entry
    forget_upto: int | None = None
    oldest_log: dt.datetime | None = None
    #: host: removal notices not sent yet; station: what the host told us
    #: of our standing (``mailsync_meta``), as stored
    farewells: int = 0
    standing: str | None = None
