"""Mail connections kept open from one cycle to the next (``mailsync serve``).

A cycle over real mail opened an IMAP session and an SMTP session on each
node, each with its TCP and TLS handshakes and a login: four sessions per
changeset between a host and a station, against two for a plain
send-and-fetch. A node that cycles again soon (``serve``, or a program that
calls ``Node.sync()`` in a loop) keeps them: the next cycle takes the open
session, checks it is still good (:meth:`Resumable.resume`: IMAP selects
INBOX again, which also brings the new mail and re-checks UIDVALIDITY; SMTP
says NOOP) and opens a new one only if not.

What may be kept is narrow on purpose:

- only sessions whose cycle ended without an exception (a session that
  failed, or whose cycle did, is closed as before);
- only for ``max_idle`` seconds (240: under Postfix's 300-second
  ``smtpd_timeout`` and Dovecot's 30-minute IMAP autologout, and under
  most NAT idle timeouts), so a kept session is never a half-dead one a
  cycle would wait on;
- never POP3: a POP3 session sees the mailbox as it was at login, and its
  deletions happen only at QUIT;
- a session is keyed by its URL: a changed URL opens a new one (a changed
  password alone does not: the kept session is already logged in).

:meth:`Keeper.close` (``Node.close``) logs every kept session out.
"""

from __future__ import annotations

import time
from types import TracebackType
from typing import Any, Protocol, Self


class Resumable(Protocol):
    """A session that can serve another cycle."""

    def __enter__(self) -> Self: ...

    def close(self) -> None: ...

    def resume(self) -> bool:
        """Make the session ready for another cycle; False when it is gone
        (the caller closes it and opens a new one)."""


#: seconds a session may stay idle and still be taken up again
MAX_IDLE = 240.0


class Keeper:
    """The sessions one node keeps between its cycles."""

    def __init__(self, max_idle: float = MAX_IDLE) -> None:
        self.max_idle = max_idle
        self._kept: dict[str, tuple[float, Resumable]] = {}

    def sessions(self) -> dict[str, Resumable]:
        """The kept sessions by key (``send URL`` / ``receive URL``)."""
        return {key: session for key, (_, session) in self._kept.items()}

    def take(self, key: str) -> Resumable | None:
        """The kept session for ``key``, ready for use, or None."""
        found = self._kept.pop(key, None)
        if found is None:
            return None
        since, session = found
        fresh = time.monotonic() - since <= self.max_idle
        try:
            if fresh and session.resume():
                return session
        except Exception:
            pass
        session.close()
        return None

    def give_back(self, key: str, session: Resumable) -> None:
        old = self._kept.pop(key, None)
        if old is not None:
            old[1].close()
        self._kept[key] = (time.monotonic(), session)

    def close(self) -> None:
        kept, self._kept = self._kept, {}
        for _, session in kept.values():
            session.close()


class Kept:
    """What ``open_sender`` / ``open_receiver`` return when sessions are
    kept: entered, it gives the kept session or a new one; left without an
    exception, it gives the session back to the keeper instead of closing."""

    def __init__(self, keeper: Keeper, key: str, make: Any) -> None:
        self._keeper, self._key, self._make = keeper, key, make
        self._session: Resumable | None = None

    def __enter__(self) -> Any:
        session = self._keeper.take(self._key)
        if session is None:
            session = self._make().__enter__()
        self._session = session
        return session

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        session, self._session = self._session, None
        if session is None:
            return
        if exc_type is None:
            self._keeper.give_back(self._key, session)
        else:
            session.close()
