"""Purge: forget what no peer can still need, at the end of a cycle.

For each link, the changes up to its cursor are either not routed to the
peer or packed into outbox entries; those after the oldest unacknowledged
entry's starting cursor stay until its ack comes, so a station offline for a
month still gets its deletes. A peer that may send us rows keeps, besides,
the changes past the horizon of the last changeset it sent: its next
changeset (perhaps one still in the mail) is tested against them for
conflicts. Log entries older than ``log_retention_days`` go too.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Connection, delete, func, select

from mailsync.cycle.context import CycleContext
from mailsync.link import Link, aware
from mailsync.rules import Rule
from mailsync.store.tables import changes, horizons, links, log_table, now, outbox


def log_due(ctx: CycleContext, oldest: dt.datetime | None) -> bool:
    """Whether the log holds an entry past its retention."""
    cutoff = now() - dt.timedelta(days=ctx.config.log_retention_days)
    return oldest is not None and aware(oldest) < cutoff


def purge(
    ctx: CycleContext,
    conn: Connection,
    rules: list[Rule] | None = None,
    every: list[Link] | None = None,
) -> None:
    """In ``conn``'s transaction: a fixed handful of reads whatever the
    number of peers (an idle host with a thousand stations used to ask
    three questions per station) — none where the cycle's start snapshot
    still holds: what it found safe then is safe now — and a write only
    when there is something to forget. ``rules``, ``every`` (the links):
    where read already in this transaction."""
    cutoff = now() - dt.timedelta(days=ctx.config.log_retention_days)
    snap = ctx.fresh()
    if snap is not None:
        limit, oldest = snap.forget_upto, snap.oldest_log
    else:
        limit = safe_to_forget(ctx, conn, every, rules)
        first = conn.execute(select(func.min(changes.c.id))).scalar()
        oldest = conn.execute(select(func.min(log_table.c.at))).scalar()
        if limit is not None and (first is None or first > limit):
            limit = None
    if limit is not None:
        conn.execute(delete(changes).where(changes.c.id <= limit))
    if log_due(ctx, oldest):
        conn.execute(delete(log_table).where(log_table.c.at < cutoff))


def safe_to_forget(
    ctx: CycleContext,
    conn: Connection,
    every: list[Link] | None = None,
    rules: list[Rule] | None = None,
) -> int | None:
    """The highest change-log id no peer can still need (None: no peers).
    Only one cycle runs per node, so what it reads stays true until the
    delete: a change logged meanwhile is above every cursor. ``every`` and
    ``rules``: the links and the rules, where read already."""
    if every is None:
        query = select(links.c.peer, links.c.change_cursor)
        cursors: dict[str, int] = {peer: cursor for peer, cursor in conn.execute(query)}
    else:
        cursors = {x.peer: x.change_cursor for x in every}
    if not cursors:
        return None
    oldest: dict[str, int] = {
        peer: first
        for peer, first in conn.execute(
            select(outbox.c.peer, func.min(outbox.c.cursor_from)).group_by(outbox.c.peer)
        )
    }
    safe = [int(min(cursor, oldest.get(peer, cursor))) for peer, cursor in cursors.items()]
    senders = ctx.role.senders(conn, list(cursors), rules)
    if senders:
        first = (
            select(horizons.c.peer, func.min(horizons.c.seq).label("seq"))
            .where(horizons.c.peer.in_(senders))
            .group_by(horizons.c.peer)
            .subquery()
        )
        safe.extend(
            int(h)
            for h in conn.execute(
                select(horizons.c.horizon).join(
                    first, (horizons.c.peer == first.c.peer) & (horizons.c.seq == first.c.seq)
                )
            ).scalars()
        )
    return min(safe)
