"""Confining a failure to the work it spoils: a message, a peer, a mailbox.

Every stage wraps its units of work in :func:`contained`: a per-peer guard
in apply, build, the composing of controls and send, a per-mailbox guard
around each mailbox connection. (Receive has its own per-message guard: a
message that fails a check is set aside in the mailbox, which is not an
error of the cycle.) An error whose ``scope`` (see
:mod:`mailsync.errors`) fits within the guard is recorded — in the report,
as the peer's outcome, and as one log line with its event and peer — and
the stage goes on with the next unit; a wider one passes through to the
guard that owns it. So one station's refused address or oversized message
never holds another station's mail.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from mailsync.cycle.report import CycleReport
from mailsync.errors import SCOPES, MailsyncError, Scope
from mailsync.journal import Journal


@dataclass
class Outcome:
    """What a guard caught (``error`` is None when the work went through)."""

    error: MailsyncError | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None


def describe(exc: MailsyncError) -> str:
    """The error as one line, with its hint."""
    return str(exc) + (f" (hint: {exc.hint})" if exc.hint else "")


@contextlib.contextmanager
def contained(
    report: CycleReport,
    journal: Journal,
    *,
    scope: Scope,
    event: str,
    peer: str | None = None,
    doing: str = "",
) -> Iterator[Outcome]:
    """Run a unit of work; a MailsyncError no wider than ``scope`` is
    recorded (``doing`` prefixes the line, ``event`` names the log entry,
    ``peer`` gets it as its outcome) and swallowed; a wider one propagates."""
    outcome = Outcome()
    try:
        yield outcome
    except MailsyncError as exc:
        if SCOPES.index(exc.scope) > SCOPES.index(scope):
            raise
        outcome.error = exc
        line = f"{doing}: {describe(exc)}" if doing else describe(exc)
        report.errors.append(line)
        report.exit_codes.append(exc.exit_code)
        if peer is not None:
            report.peer_errors.setdefault(peer, f"{doing}: {exc}" if doing else str(exc))
        journal.error(event, line, peer=peer)


def for_peer(
    report: CycleReport, journal: Journal, peer: str, event: str, doing: str
) -> contextlib.AbstractContextManager[Outcome]:
    """The guard around one peer's share of a stage."""
    return contained(report, journal, scope="peer", event=event, peer=peer, doing=doing)
