"""Build: capture → route → pack, one changeset per link that has something.

The capture triggers of every synced table are checked (and put back if
someone dropped them); then, per link, the role decides what may travel
(:meth:`Role.plan <mailsync.cycle.context.Role.plan>`: the station's rules
and row filters, initial loads, a reload, our new key) and
:func:`mailsync.build.build_for_link` packs the changes up to one change-log
horizon, read once for all links, into sealed parts in the outbox. A link
whose build fails is held with its reason; the others are built.
"""

from __future__ import annotations

from functools import partial

from sqlalchemy import Connection

from mailsync import capture, definitions
from mailsync import link as links_mod
from mailsync.build import build_for_link
from mailsync.cycle.contain import for_peer
from mailsync.cycle.context import CycleContext
from mailsync.cycle.report import CycleReport
from mailsync.errors import MailsyncError
from mailsync.link import Link
from mailsync.linkplan import Built, LinkPlan
from mailsync.routing import Routes
from mailsync.rules import Rule
from mailsync.shared_reads import SharedReads
from mailsync.wire.message import part_bytes


def plans(
    ctx: CycleContext,
    conn: Connection,
    every: list[Link] | None = None,
    rules: list[Rule] | None = None,
) -> list[tuple[LinkPlan, int]]:
    """What may travel on each link now (routing), with the link's cursor
    (``every`` and ``rules``: the links and rules, where read already)."""
    if every is None:
        every = links_mod.all_links(conn)
    if ctx.selection.stations is not None:
        # one worker's share (or `sync --station`): the other links are
        # not built in this run, and planning them is most of an idle
        # cycle's work per link
        every = [x for x in every if ctx.selection.takes(x.peer)]
    planned = ctx.role.plans(conn, ctx.me, every, ctx.ring.current.public, rules)
    return [(plan, link.change_cursor) for plan, link in zip(planned, every, strict=True)]


def wanted(ctx: CycleContext) -> bool:
    """From the fresh start snapshot: whether any link has something to
    build (something logged past its cursor, or a control to carry)."""
    snap = ctx.snapshot
    assert snap is not None
    return any(
        (snap.logged > cursor and not p.waits_for_rules) or p.carries_controls
        for p, cursor in snap.planned
        if ctx.selection.narrow(p) is not None
    )


def rules_now(ctx: CycleContext, report: CycleReport) -> list[Rule] | None:
    """The rules as the cycle's start read them, unless a changeset applied
    since brought new ones (None: read them again)."""
    first = ctx.started
    if first is None or any(a.rules_received for a in report.applied):
        return None
    return first.rules


def horizon_needed(ctx: CycleContext) -> int | None:
    """The change-log horizon (the dialect's own transaction, before the
    settling one), or None where the start snapshot says no link needs it."""
    if ctx.fresh() is not None and not wanted(ctx):
        return None
    return ctx.dialect.change_horizon(ctx.engine)


def build(ctx: CycleContext, report: CycleReport, conn: Connection, horizon: int | None) -> bool:
    """Queue the next changeset for every link that has something to carry,
    each in a savepoint of ``conn``'s transaction; whether any was built."""
    snap = ctx.fresh()
    if snap is not None:
        # nothing committed since the cycle's start: its reads hold
        planned, repaired, broken = snap.planned, snap.repaired, snap.broken
    else:
        planned = plans(ctx, conn, None, rules_now(ctx, report))
        tables = sorted({t for p, _ in planned for t in p.rules})
        repaired, broken = [], {}
        if tables and not capture.known_whole(conn, tables):
            repaired, broken = ensure_capture(conn, tables)
    for name in repaired:
        ctx.journal.warning("capture", f"capture triggers of table {name} (re)installed", conn=conn)
    if horizon is None:
        return False
    part_size = part_bytes(ctx.config.mailbox.max_message_bytes)
    done = False
    due = _due(ctx, planned, horizon)
    # the change log and changed rows read once for the links that share them
    routes = Routes.for_links(horizon, ctx.config.batch_rows, [cursor for _, cursor in due])
    # and what each build would read of its own link, once for all
    reads = SharedReads.read(conn, [plan.peer for plan, _ in due])
    for plan, _ in due:
        peer = plan.peer
        for table, why in sorted(plan.schema.stopping.items()):
            definitions.stop(conn, peer, table, why)
            ctx.journal.warning(
                "schema-stopped",
                f"table {table} stopped for {peer}: {why}; its rows wait until {peer}'s "
                f"table matches, then `mailsync table resync {table} --station {peer}`",
                peer=peer,
                conn=conn,
            )
        with for_peer(report, ctx.journal, peer, "build-failed", f"building for {peer}"):
            for table in plan.rules:
                # its capture cannot be trusted: hold the link, if it sends the table
                if table in broken and plan.ops(table):
                    raise broken[table]
            built = build_for_link(
                ctx.engine,
                ctx.codec,
                plan,
                horizon,
                ctx.config.batch_rows,
                ctx.seal,
                part_size,
                on_built=lambda conn, built: _log_built(ctx, conn, built),
                within=conn,
                on_left=partial(_log_left, ctx, peer),
                routes=routes,
                reads=reads,
            )
            if built is None:
                continue
            done = True
            report.built.append(built)
    return done


def _due(
    ctx: CycleContext, planned: list[tuple[LinkPlan, int]], horizon: int
) -> list[tuple[LinkPlan, int]]:
    """The links this run builds for, with their cursors: a link with
    nothing logged since its last build and nothing else to tell it is left
    out (an idle link costs no statement)."""
    out = []
    for whole, cursor in planned:
        plan = ctx.selection.narrow(whole)  # None: disabled, or not in this run
        if plan is None:
            continue
        if (horizon <= cursor or plan.waits_for_rules) and not plan.carries_controls:
            continue
        out.append((plan, cursor))
    return out


def _log_built(ctx: CycleContext, conn: Connection, built: Built) -> None:
    ctx.journal.info(
        "queued",
        f"changeset #{built.seq} for {built.peer}: {built.rows} rows, "
        f"{built.raw_size} bytes raw, {built.size} bytes packed"
        + (f" in {built.parts} parts" if built.parts > 1 else ""),
        peer=built.peer,
        seq=built.seq,
        conn=conn,
    )
    for table, why in sorted(built.undescribed.items()):
        ctx.journal.warning(
            "schema",
            f"changeset #{built.seq} for {built.peer} loads table {table} without its "
            f"definition: {why}; the station must create the table itself",
            peer=built.peer,
            seq=built.seq,
            conn=conn,
        )


def _log_left(ctx: CycleContext, peer: str, conn: Connection, left: dict[str, int]) -> None:
    for table, count in sorted(left.items()):
        ctx.journal.info(
            "scope",
            f"{count} changed row(s) of table {table} lie outside {peer}'s row filter; its "
            "rule sends no deletes, so any it holds stay there",
            peer=peer,
            conn=conn,
        )


def ensure_capture(
    conn: Connection, tables: list[str]
) -> tuple[list[str], dict[str, MailsyncError]]:
    """Check (and repair) the capture triggers of ``tables``: the tables
    repaired, and the ones that failed with their error (a table dropped
    under a station's rule), so that only the links carrying those are
    held. All at once in one savepoint; table by table only after a failure."""
    if not tables:
        return [], {}
    try:
        with conn.begin_nested():
            return capture.ensure_capture(conn, tables), {}
    except MailsyncError as exc:
        if exc.scope not in ("message", "peer"):
            raise
    repaired: list[str] = []
    broken: dict[str, MailsyncError] = {}
    for table in tables:
        try:
            with conn.begin_nested():
                repaired += capture.ensure_capture(conn, [table])
        except MailsyncError as exc:
            if exc.scope not in ("message", "peer"):
                raise
            broken[table] = exc
    return repaired, broken
