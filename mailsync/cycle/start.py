"""The start of a cycle: the restore witness and every stage's reads, in
one transaction.

Before anything is received, drawn or built, the database is compared with
its restore witness (:func:`mailsync.restore.check`: a database that went
back to a backup is caught even on an idle or dead link). In the same
transaction the cycle reads, once, what each stage would otherwise ask for
itself: the links, the rules and routing plans, the capture triggers'
fingerprint, the change log's extent, the inbox's peers, the outbox parts
due, the number ranges and whose range traffic is due, and what purge may
forget. An idle cycle is decided from that :class:`Snapshot` alone: this is
its only transaction, and it writes nothing (unless the witness check or a
capture repair had to).

The change log's extent read here is ``max(id)``: it tells an idle link
(cursor at or past it) from one that has something. It is not the build's
horizon (on PostgreSQL that needs the dialect's brief lock): a link with
something to build asks the dialect for that (:mod:`.build`).
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Connection, func, select

from mailsync import capture, restore
from mailsync import inbox as inbox_mod
from mailsync import link as links_mod
from mailsync import rules as rules_mod
from mailsync.cycle import build, purge, send
from mailsync.cycle.context import CycleContext
from mailsync.cycle.snapshot import Snapshot
from mailsync.errors import MailsyncError
from mailsync.ranges import exchange
from mailsync.ranges.model import list_ranges
from mailsync.standing import META_KEY
from mailsync.store.tables import changes, farewells, log_table, meta_table
from mailsync.store.witness import witness_path


def begin(ctx: CycleContext) -> Snapshot:
    """Confirm the witness (unless the node just did) and read the
    snapshot; one transaction, committed only where it wrote."""
    with ctx.engine.connect() as conn:
        # the last cycle died with mail recorded as sent, not handed over
        recovered = wrote = send.recover(ctx, conn)
        every = links_mod.all_links(conn)
        if not ctx.witness_confirmed:
            path = witness_path(ctx.config.path)
            wrote = restore.check(conn, path, ctx.journal, every=every).wrote or wrote
        ctx.witness_confirmed = False  # once: the next cycle checks again
        snap = _read(ctx, conn, every)
        # the triggers found whole, for the next process (once per change)
        wrote = capture.store_marks(conn) or wrote
        if wrote or snap.repaired or snap.broken:
            conn.commit()
        # else a read, rolled back: nothing to commit
    if recovered:
        send.unmark(ctx)
    return snap


def _read(ctx: CycleContext, conn: Connection, every: list[links_mod.Link]) -> Snapshot:
    rules = rules_mod.all_rules(conn)
    planned = build.plans(ctx, conn, every, rules)
    tables = sorted({t for p, _ in planned for t in p.rules})
    repaired: list[str] = []
    broken: dict[str, MailsyncError] = {}
    if tables and not capture.known_whole(conn, tables):
        repaired, broken = build.ensure_capture(conn, tables)
    # two subqueries: min and max in one SELECT makes SQLite scan the log
    first, logged, farewell, told = conn.execute(
        select(
            select(func.min(changes.c.id)).scalar_subquery(),
            select(func.max(changes.c.id)).scalar_subquery(),
            # the standing of a station (issue 18): riding on this one read
            select(func.count())
            .select_from(farewells)
            .where(farewells.c.sent_at.is_(None))
            .scalar_subquery(),
            select(meta_table.c.value).where(meta_table.c.key == META_KEY).scalar_subquery(),
        )
    ).one()
    ranges = list_ranges(conn)
    cfg = ctx.config
    resend_after = dt.timedelta(minutes=cfg.resend_after_minutes)
    if ctx.role.is_host:
        stations = {x.peer: x.report_due for x in every}
        ranges_due = exchange.host_due(conn, stations, resend_after, ranges=ranges)
    else:
        gap_after = dt.timedelta(minutes=cfg.gap_request_minutes)
        _, due = exchange.station_outgoing(conn, gap_after, ranges)
        ranges_due = {x.peer for x in every} if due else set()
    limit = purge.safe_to_forget(ctx, conn, every, rules)
    oldest = conn.execute(select(func.min(log_table.c.at))).scalar()
    return Snapshot(
        links=every,
        planned=planned,
        rules=rules,
        logged=int(logged or 0),
        waiting=inbox_mod.peers_waiting(conn),
        pending=send.due_parts(ctx, conn),
        ranges=ranges,
        ranges_due=ranges_due,
        repaired=repaired,
        broken=broken,
        forget_upto=limit if limit is not None and first is not None and first <= limit else None,
        oldest_log=oldest,
        farewells=int(farewell or 0),
        standing=told,
    )
