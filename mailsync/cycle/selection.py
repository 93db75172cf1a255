"""One run limited to some stations or tables: ``mailsync sync --station S…
--table T…`` (issue 18, item 6).

What is limited, precisely:

- ``--station`` (host only): the cycle applies, builds, composes controls
  for and sends to those stations' links only. The mailbox is still read
  whole — every message is taken in and buffered (it is one connection,
  and leaving mail behind would only fetch it again) — but the other
  stations' changesets are not applied; their outbox entries, acks and
  controls wait for a run that includes them.
- ``--table`` (either side): only those tables' changes are built — a
  link's change-log cursor then advances only up to the first change of a
  table left out, so that change and everything after it goes with the
  next unlimited run (rows the limited run sent after that point go again
  then: rows are read as they are when built, so they only travel twice);
  a link that owes a full reload or a resend of everything is not built
  at all. Only changesets whose tables are all among them are applied: a
  changeset is applied whole or not at all (its rows and the link's
  sequence number commit together), so the first one that carries another
  table waits, and the ones after it with it (strict sequence order).

Nothing is lost or applied twice either way: what waits is where it waited
before (the inbox, the outbox, the change log past the cursor).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import Connection

from mailsync import link as links_mod
from mailsync import rules as rules_mod
from mailsync.errors import ConfigError
from mailsync.linkplan import LinkPlan


@dataclass(frozen=True)
class Selection:
    """The peers and tables one run is limited to (None: all of them)."""

    stations: frozenset[str] | None = None
    tables: frozenset[str] | None = None

    @property
    def limited(self) -> bool:
        return self.stations is not None or self.tables is not None

    def takes(self, peer: str) -> bool:
        """Does this run serve the link with ``peer``?"""
        return self.stations is None or peer in self.stations

    def narrow(self, plan: LinkPlan) -> LinkPlan | None:
        """The plan as this run builds it; None: not built now (a disabled
        station, a link left out, or one that owes a whole load)."""
        if plan.paused or not self.takes(plan.peer):
            return None
        if self.tables is None:
            return plan
        if plan.reload or plan.resend_all or plan.rebase:
            return None
        return dataclasses.replace(
            plan,
            only_tables=self.tables,
            initial_loads=[t for t in plan.initial_loads if t in self.tables],
            since_loads={t: v for t, v in plan.since_loads.items() if t in self.tables},
        )


#: An unlimited run.
EVERYTHING = Selection()


def choose(
    conn: Connection, *, is_host: bool, stations: Iterable[str], tables: Iterable[str]
) -> Selection:
    """The selection ``sync --station … --table …`` asks for, checked:
    ConfigError naming the first station or table that is not there
    (before anything runs)."""
    wanted_stations = sorted(set(stations))
    wanted_tables = sorted(set(tables))
    if wanted_stations:
        if not is_host:
            raise ConfigError("--station limits the host's run; a remote has one link, to its host")
        known = set(links_mod.peers(conn))
        for name in wanted_stations:
            if name not in known:
                raise ConfigError(
                    f"--station {name}: no such station", hint="`mailsync station list`"
                )
    if wanted_tables:
        synced = {r.table for r in rules_mod.all_rules(conn)}
        for name in wanted_tables:
            if name not in synced:
                raise ConfigError(
                    f"--table {name}: the table is not synced here",
                    hint="`mailsync status` lists the tables synced",
                )
    return Selection(
        frozenset(wanted_stations) if wanted_stations else None,
        frozenset(wanted_tables) if wanted_tables else None,
    )
