"""Apply: buffered changesets, per peer, strictly in sequence order.

A changeset is applied once all its parts are buffered and its predecessor
is applied, in one transaction with the link's inbound sequence number
(:func:`mailsync.apply.apply_buffered` does the rows; this stage picks what
is next and reads the parts). A changeset that cannot be applied holds its
own link only: the peer guard records it and the next peer's changesets
apply.
"""

from __future__ import annotations

from collections.abc import Iterator

from sqlalchemy import Connection
from sqlalchemy.exc import OperationalError

from mailsync import definitions, dictionaries, faults, inbox
from mailsync import link as links_mod
from mailsync.apply import Applied, Deferred, Opener, apply_buffered
from mailsync.cycle import verify
from mailsync.cycle.contain import contained, describe
from mailsync.cycle.context import CycleContext
from mailsync.cycle.report import CycleReport
from mailsync.errors import SCOPES, ApplyError, MailsyncError, MessageError
from mailsync.journal import logger
from mailsync.link import Link
from mailsync.wire.changeset import Source
from mailsync.wire.envelope import Header


def apply(ctx: CycleContext, report: CycleReport) -> None:
    """Apply what is complete and next, for every peer; settle which links
    are held, and why."""
    snap, first = ctx.fresh(), ctx.started
    if (
        snap is None
        and first is not None
        and not (first.waiting or report.left_buffered or report.peer_errors)
        and not any(x.held for x in first.links)
    ):
        # nothing was buffered at the start, receive applied all it took
        # (:func:`apply_now`), no link is held or to be: nothing to read
        return
    if snap is not None:
        peers, waiting = snap.links, snap.waiting
    else:
        with ctx.engine.connect() as conn:
            peers = links_mod.all_links(conn)
            waiting = inbox.peers_waiting(conn)
    for link in peers:
        peer = link.peer
        if link.report_due:
            continue  # we went back to a backup: its leases first (its report), then its rows
        if link.paused_at is not None or not ctx.selection.takes(peer):
            continue  # disabled (held until enabled), or not in this run
        # a message of the peer's that receive could not take (a bug met
        # with it) holds the link as much as a changeset that fails here
        reason = report.peer_errors.get(peer)
        with contained(report, ctx.journal, scope="peer", event="apply-failed", peer=peer) as out:
            # a peer with nothing buffered costs no statement (an idle host
            # with a thousand stations)
            quarantined = _apply_peer(ctx, report, peer, link.in_seq) if peer in waiting else None
            if quarantined is not None:
                # said in the log when it was quarantined; here only in the
                # cycle's outcome (and exit code) and the link's hold
                report.errors.append(quarantined)
                report.peer_errors.setdefault(peer, quarantined)
                reason = reason or quarantined
        if out.error is not None:
            reason = reason or describe(out.error)
        _settle_hold(ctx, link, reason)


def _settle_hold(ctx: CycleContext, link: Link, reason: str | None) -> None:
    """Mark the link held with ``reason``, or release it (a write only when
    that changes)."""
    if reason == link.held:
        return
    with ctx.engine.begin() as conn:
        if reason is not None:
            links_mod.held(conn, link, reason)
        else:
            links_mod.released(conn, link.peer)
            ctx.journal.info(
                "released",
                f"changesets from {link.peer} apply again (held since "
                f"{link.held_since:%Y-%m-%d %H:%M} UTC: {link.held})"
                if link.held_since is not None
                else f"changesets from {link.peer} apply again",
                peer=link.peer,
                conn=conn,
            )


def _apply_peer(ctx: CycleContext, report: CycleReport, peer: str, in_seq: int) -> str | None:
    """Apply the peer's changesets that are next; returns why the link is
    held if the one next in line is quarantined."""
    with ctx.engine.begin() as conn:
        inbox.drop_stale(conn, peer, in_seq)  # duplicates left by a crash
        expired = inbox.expire(conn, peer, in_seq, ctx.limits)
        if expired:
            report.expired[peer] = expired
            ctx.journal.warning(
                "expired",
                f"changeset(s) {', '.join(f'#{s}' for s in expired[:10])}"
                + (" …" if len(expired) > 10 else "")
                + f" from {peer} never completed in {ctx.limits.incomplete_expiry_hours} h "
                "(limits.incomplete_expiry_hours): dropped from the inbox, asked for again",
                peer=peer,
                conn=conn,
            )
    while True:
        with ctx.engine.connect() as conn:
            found = inbox.next_complete(conn, peer, in_seq)
        if found is None:
            return None
        seq = found.seq
        if found.quarantined:
            return (
                f"changeset #{seq} from {peer} is quarantined after {found.attempts} failed "
                f"attempt(s): {found.last_error} (hint: fix the cause, then `mailsync inbox "
                f"retry {peer}`; or `mailsync inbox drop {peer} {seq} --skip`)"
            )
        try:
            applied = apply_buffered(
                ctx.engine,
                _opener(ctx, peer, seq, found.parts),
                me=ctx.me,
                peer=peer,
                seq=seq,
                direction=ctx.role.inbound,
                rules_for=lambda conn: ctx.role.rules(conn, peer),
                accept_rules=ctx.role.accepts_rules,
                # its log lines commit with its rows: a cycle killed after
                # the commit still says what it applied
                on_applied=lambda conn, applied: _log_applied(ctx, applied, conn),
                only_tables=ctx.selection.tables,
            )
        except Deferred:
            return None  # carries a table this run leaves out: it waits, in order
        except MailsyncError as exc:
            if SCOPES.index(exc.scope) <= SCOPES.index("peer"):
                _failed(ctx, peer, seq, exc)  # this changeset's fault, not the database's
            raise
        except Exception as exc:
            # a bug, met with this peer's changeset: it holds this link only
            # (the transaction rolled back; the changeset stays buffered)
            logger.error("%s: applying #%d from %s", ctx.me, seq, peer, exc_info=True)
            error = ApplyError(
                f"changeset #{seq} from {peer}: unexpected {type(exc).__name__}: {exc}",
                hint="a bug in mailsync: the traceback is in the service's output; "
                "the changeset waits and is tried again next cycle",
            )
            if not isinstance(exc, OperationalError):
                # a database that is locked or gone is nobody's changeset's
                # fault: it must not bring a changeset nearer quarantine
                _failed(ctx, peer, seq, error)
            raise error from exc
        faults.point("after-apply")
        report.applied.append(applied)
        in_seq = seq


def apply_now(
    ctx: CycleContext, conn: Connection, report: CycleReport, peer: str, seq: int
) -> bool:
    """Receive: the one-part changeset ``seq`` just buffered in ``conn``'s
    transaction is next in line: apply it there, in a savepoint, so that
    the message, its rows and the link's ``in_seq`` commit together. False
    (the savepoint rolled back, the changeset still buffered) where it
    fails: the apply stage tries it again and says why."""
    try:
        applied = apply_buffered(
            ctx.engine,
            _opener(ctx, peer, seq, 1),
            me=ctx.me,
            peer=peer,
            seq=seq,
            direction=ctx.role.inbound,
            rules_for=lambda conn: ctx.role.rules(conn, peer),
            accept_rules=ctx.role.accepts_rules,
            on_applied=lambda conn, applied: _log_applied(ctx, applied, conn),
            within=conn,
        )
    except Exception:
        logger.debug("%s: #%d from %s left for the apply stage", ctx.me, seq, peer, exc_info=True)
        return False
    report.applied.append(applied)
    return True


def _failed(ctx: CycleContext, peer: str, seq: int, exc: MailsyncError) -> None:
    """Count a failed attempt at changeset ``seq``; quarantine it at the
    limit (said once, here: from then on it is not tried by itself)."""
    with ctx.engine.begin() as conn:
        attempts, quarantined = inbox.failed(conn, peer, seq, str(exc), ctx.limits)
        if quarantined:
            ctx.journal.error(
                "quarantined",
                f"changeset #{seq} from {peer} quarantined after {attempts} failed attempts "
                f"(limits.quarantine_after): {exc}; it is not tried again by itself — fix "
                f"the cause, then `mailsync inbox retry {peer}`, or `mailsync inbox drop "
                f"{peer} {seq} --skip` to do without it",
                peer=peer,
                seq=seq,
                conn=conn,
            )


def _opener(ctx: CycleContext, peer: str, seq: int, parts: int) -> Opener:
    """An opener for :func:`apply_buffered`: the changeset's parts are read
    from the buffer, verified and decrypted one at a time, in order."""

    def open_stream(conn: Connection, origin: str) -> tuple[Header, Source]:
        keys = ctx.sender_keys(conn, peer)

        def part(number: int) -> tuple[Header, bytes]:
            blob = inbox.part_blob(conn, peer, seq, number)
            where = f"{origin} part {number}/{parts}" if parts > 1 else origin
            header, body = ctx.codec.decrypt(blob, where, ctx.ring, keys)
            if header.part != number or header.parts != parts:
                raise MessageError(f"{where}: part numbers do not match the buffer")
            return header, body

        first, body = part(1)
        held = [body]
        del body

        def bodies() -> Iterator[bytes]:
            yield held.pop()  # not kept alive while the later parts are read
            for number in range(2, parts + 1):
                header, more = part(number)
                if header.cid != first.cid or header.seq != first.seq:
                    raise MessageError(f"{origin}: part {number} is from another changeset")
                yield more
                del more  # not kept alive while the next part is read

        dictionaries.ready(conn, ctx.codec, peer, first.dictionary, origin)
        return first, ctx.codec.stream(bodies(), origin, first)

    return open_stream


def _log_applied(ctx: CycleContext, applied: Applied, conn: Connection) -> None:
    verify.on_applied(ctx, conn, applied)  # its rounds, after the rows
    peer, seq, journal = applied.peer, applied.seq, ctx.journal
    journal.info(
        "applied",
        f"changeset #{seq} from {peer}: {applied.rows} rows",
        peer=peer,
        seq=seq,
        conn=conn,
    )
    if applied.reloaded:
        journal.warning(
            "reloaded",
            f"changeset #{seq} from {peer} replaced this database's copy of its tables "
            "(it had gone back to an older backup)",
            peer=peer,
            seq=seq,
            conn=conn,
        )
    if applied.served is not None:
        journal.info(
            "reload",
            f"changeset #{seq} from {peer}: our request to send {applied.served} again "
            "was acted on",
            peer=peer,
            seq=seq,
            conn=conn,
        )
    if applied.tables_created:
        journal.info(
            "schema",
            f"changeset #{seq} from {peer}: created table(s) "
            f"{', '.join(applied.tables_created)} from the definitions it brought",
            peer=peer,
            seq=seq,
            conn=conn,
        )
    for table, how in sorted(applied.tables_differing.items()):
        journal.warning(
            "schema",
            f"changeset #{seq} from {peer}: table {table} here differs from {peer}'s: "
            f"{'; '.join(how)} (not altered)",
            peer=peer,
            seq=seq,
            conn=conn,
        )
    for level, text in definitions.applied_notes(conn, applied):
        journal.write(
            level, "schema", f"changeset #{seq} from {peer}: {text}", peer=peer, seq=seq, conn=conn
        )
    for line in applied.conflicts:
        journal.warning(
            "conflict",
            f"changeset #{seq} from {peer}: {line} (`mailsync conflicts list`)",
            peer=peer,
            seq=seq,
            conn=conn,
        )
    for line in applied.overwritten:
        journal.warning(
            "overwritten", f"changeset #{seq} from {peer}: {line}", peer=peer, seq=seq, conn=conn
        )
    if applied.parked:
        why = "".join(
            f"; {count} of table {table}: {reason}"
            for (table, reason), count in sorted(applied.parked_by_rule.items())
        )
        journal.error(
            "parked",
            f"changeset #{seq} from {peer}: {applied.parked} row(s) could not be "
            f"applied and are parked (`mailsync errors list`){why}",
            peer=peer,
            seq=seq,
            conn=conn,
        )
    for (table, reason), count in sorted(applied.refused.items()):
        journal.warning(
            "refused",
            f"changeset #{seq} from {peer}: {count} row(s) of table {table} refused: {reason}; "
            "nothing of them was written",
            peer=peer,
            seq=seq,
            conn=conn,
        )
