"""Verify, the cycle's part: each side acts on the rounds a changeset carried.

``mailsync verify``'s rounds travel inside sequenced changesets
(:mod:`mailsync.verification`); this stage runs in the transaction that
applies one, after its rows: on a station it answers the host's request (the
answer goes with the next build up), on the host it compares the station's
answer and asks the next round, finishes or repairs (with the next build
down). What the build then carries is :func:`mailsync.verification.due`'s.
A request that reaches the host, or an answer a station, is not acted on
and says so in the log.
"""

from __future__ import annotations

from sqlalchemy import Connection

from mailsync import verification, verify_answer
from mailsync.apply import Applied
from mailsync.cycle.context import CycleContext
from mailsync.wire.verify_controls import VerifyAnswer, VerifyRequest


def on_applied(ctx: CycleContext, conn: Connection, applied: Applied) -> None:
    """Act on the ``verify`` controls of a changeset being applied, and log
    what came of them (committed with the changeset)."""
    peer = applied.peer
    for control in applied.verify:
        notes: list[verification.Note]
        if isinstance(control, VerifyAnswer) and ctx.role.is_host:
            notes = verification.answered(conn, peer, control)
        elif isinstance(control, VerifyRequest) and not ctx.role.is_host:
            notes = verify_answer.asked(conn, peer, control)
        else:
            notes = [
                ("verify-refused", f"{peer} sent a {control.KIND!r} control: not ours to act on")
            ]
        for event, line in notes:
            level = ctx.journal.info if event == "verify" else ctx.journal.warning
            level(event, line, peer=peer, seq=applied.seq, conn=conn)
