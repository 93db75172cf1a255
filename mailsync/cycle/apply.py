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

from sqlalchemy import Connection, delete, select

from mailsync import faults
from mailsync import link as links_mod
from mailsync.apply import Applied, Opener, apply_buffered
from mailsync.cycle.contain import contained
from mailsync.cycle.context import CycleContext
from mailsync.cycle.report import CycleReport
from mailsync.errors import ApplyError, MailsyncError, MessageError
from mailsync.journal import logger
from mailsync.store.tables import horizons, inbox
from mailsync.wire.changeset import Source
from mailsync.wire.envelope import Header, read_header


def apply(ctx: CycleContext, report: CycleReport) -> None:
    """Apply what is complete and next, for every peer."""
    with ctx.engine.connect() as conn:
        peers = [(link.peer, link.in_seq) for link in links_mod.all_links(conn)]
    for peer, in_seq in peers:
        with contained(report, ctx.journal, scope="peer", event="apply-failed", peer=peer):
            _apply_peer(ctx, report, peer, in_seq)
        _forget_horizons(ctx, report, peer)


def _apply_peer(ctx: CycleContext, report: CycleReport, peer: str, in_seq: int) -> None:
    with ctx.engine.begin() as conn:
        links_mod.drop_stale(conn, peer, in_seq)  # duplicates left by a crash
    while True:
        with ctx.engine.connect() as conn:
            found = links_mod.next_complete(conn, peer, in_seq)
        if found is None:
            return
        seq, parts = found
        try:
            applied = apply_buffered(
                ctx.engine,
                _opener(ctx, peer, seq, parts),
                me=ctx.me,
                peer=peer,
                seq=seq,
                direction=ctx.role.inbound,
                rules_for=lambda conn: ctx.role.rules(conn, peer),
                accept_rules=ctx.role.accepts_rules,
            )
        except MailsyncError:
            raise
        except Exception as exc:
            # a bug, met with this peer's changeset: it holds this link only
            # (the transaction rolled back; the changeset stays buffered)
            logger.error("%s: applying #%d from %s", ctx.me, seq, peer, exc_info=True)
            raise ApplyError(
                f"changeset #{seq} from {peer}: unexpected {type(exc).__name__}: {exc}",
                hint="a bug in mailsync: the traceback is in the service's output; "
                "the changeset waits and is tried again next cycle",
            ) from exc
        faults.point("after-apply")
        report.applied.append(applied)
        _log_applied(ctx, applied)
        in_seq = seq


def _opener(ctx: CycleContext, peer: str, seq: int, parts: int) -> Opener:
    """An opener for :func:`apply_buffered`: the changeset's parts are read
    from the buffer, verified and decrypted one at a time, in order."""

    def open_stream(conn: Connection, origin: str) -> tuple[Header, Source]:
        keys = ctx.sender_keys(conn, peer)

        def part(number: int) -> tuple[Header, bytes]:
            blob = conn.execute(
                select(inbox.c.blob).where(
                    inbox.c.peer == peer, inbox.c.seq == seq, inbox.c.part == number
                )
            ).scalar_one()
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

        return first, ctx.codec.stream(bodies(), origin)

    return open_stream


def _forget_horizons(ctx: CycleContext, report: CycleReport, peer: str) -> None:
    """After the apply: the peer's changesets from now on name the ack of
    its latest bare ack or a later one — except those still buffered
    (fetched with it, or early), which keep the horizons they name. One
    built earlier and still in the mail is tested against what is left."""
    ack = report.bare_acks.pop(peer, 0)
    if not ack:
        return
    with ctx.engine.begin() as conn:
        for blob in conn.execute(
            select(inbox.c.blob).where(inbox.c.peer == peer, inbox.c.part == 1)
        ).scalars():
            ack = min(ack, read_header(blob, f"buffered changeset from {peer}").ack)
        conn.execute(delete(horizons).where(horizons.c.peer == peer, horizons.c.seq < ack))


def _log_applied(ctx: CycleContext, applied: Applied) -> None:
    peer, seq, journal = applied.peer, applied.seq, ctx.journal
    journal.info(
        "applied", f"changeset #{seq} from {peer}: {applied.rows} rows", peer=peer, seq=seq
    )
    if applied.reloaded:
        journal.warning(
            "reloaded",
            f"changeset #{seq} from {peer} replaced this database's copy of its tables "
            "(it had gone back to an older backup)",
            peer=peer,
            seq=seq,
        )
    for line in applied.conflicts:
        journal.warning(
            "conflict",
            f"changeset #{seq} from {peer}: {line} (`mailsync conflicts list`)",
            peer=peer,
            seq=seq,
        )
    if applied.parked:
        journal.error(
            "parked",
            f"changeset #{seq} from {peer}: {applied.parked} row(s) could not be "
            "applied and are parked (`mailsync errors list`)",
            peer=peer,
            seq=seq,
        )
    for (table, reason), count in sorted(applied.refused.items()):
        journal.warning(
            "refused",
            f"changeset #{seq} from {peer}: {count} row(s) of table {table} refused: {reason}; "
            "nothing of them was written",
            peer=peer,
            seq=seq,
        )
