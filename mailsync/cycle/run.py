"""The spine of the cycle: the stages in order, each failure contained.

Every stage is idempotent and commits before the next one depends on it: a
message leaves the mailbox only after the commit that buffered it (or found
it a duplicate, or applied it); a buffered changeset, its rows and the
link's inbound sequence number commit together; an outbox entry, its
sequence number and the change-log cursor commit together, in the one
settling transaction that also records what is sent (:mod:`.settle`). An
idle cycle is the start's read transaction alone (:mod:`.start`). A cycle
killed at any instant and run again loses nothing and applies nothing twice.
"""

from __future__ import annotations

from sqlalchemy.exc import SQLAlchemyError

from mailsync import faults, standing
from mailsync.cycle import start
from mailsync.cycle.apply import apply
from mailsync.cycle.contain import contained
from mailsync.cycle.context import CycleContext
from mailsync.cycle.receive import receive
from mailsync.cycle.report import CycleReport
from mailsync.cycle.send import Outgoing, send
from mailsync.cycle.settle import settle, summary
from mailsync.store.engine import describe_db_error


def run_cycle(ctx: CycleContext) -> CycleReport:
    """start → receive → apply → settle → send, one cycle."""
    report = CycleReport()
    journal = ctx.journal
    try:
        with journal.deferred():
            journal.info("cycle", "sync cycle started")
            # before anything is received, drawn or built: a database that
            # went back to a backup is caught even on an idle or dead link;
            # and every stage's reads, in the same one transaction
            ctx.snapshot = ctx.started = start.begin(ctx)
            report.standing = standing.read(ctx.started.standing)
            if report.standing is not None and report.standing.state == "removed":
                # the host forgot us: nothing to receive from it or send it
                standing.say(report)
                return report
            # the mailbox steps: a mailbox that cannot be reached ends its
            # stage, and the rest of the cycle goes on without it
            with contained(report, journal, scope="mailbox", event="mailbox"):
                receive(ctx, report)
            # a peer's failure is contained inside each stage; one that
            # escapes without naming its peer still ends only its stage
            with contained(report, journal, scope="peer", event="apply-failed"):
                apply(ctx, report)
            if ctx.fresh() is None:
                # work committed (received, applied); the witness is renewed
                # with what comes next
                faults.point("witness-behind")
            out = Outgoing()
            with contained(report, journal, scope="peer", event="build-failed"):
                # build, controls, records of what goes, purge, witness, the
                # log lines held so far: one commit (none when idle)
                out = settle(ctx, report)
            with contained(report, journal, scope="mailbox", event="mailbox"):
                send(ctx, report, out)
            standing.say(report)
            if not out.settled:
                journal.info("cycle", summary(report))
            if report.quiet:
                # nothing happened: nothing to keep in the database either
                # (the logger has heard both lines)
                journal.drop_held("cycle")
    except SQLAlchemyError as exc:
        raise describe_db_error(ctx.engine, exc, "sync cycle failed") from exc
    finally:
        ctx.snapshot = ctx.started = None
    return report
