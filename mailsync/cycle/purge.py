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

from sqlalchemy import delete, func, select

from mailsync.cycle.context import CycleContext
from mailsync.store.tables import changes, horizons, links, log_table, now, outbox


def purge(ctx: CycleContext) -> None:
    with ctx.engine.begin() as conn:
        safe = []
        for peer, cursor in conn.execute(select(links.c.peer, links.c.change_cursor)).all():
            oldest = conn.execute(
                select(func.min(outbox.c.cursor_from)).where(outbox.c.peer == peer)
            ).scalar()
            safe.append(int(cursor if oldest is None else min(cursor, oldest)))
            rules = ctx.role.rules(conn, peer)
            inbound = ctx.role.inbound
            if any(r.up if inbound == "up" else r.down for r in rules.values()):
                seen = conn.execute(
                    select(horizons.c.horizon)
                    .where(horizons.c.peer == peer)
                    .order_by(horizons.c.seq)
                    .limit(1)
                ).scalar()
                if seen is not None:
                    safe.append(int(seen))
        if safe:
            conn.execute(delete(changes).where(changes.c.id <= min(safe)))
        cutoff = now() - dt.timedelta(days=ctx.config.log_retention_days)
        conn.execute(delete(log_table).where(log_table.c.at < cutoff))
