"""The transport seam: what a sender and a receiver do for the cycle.

A node sends through a :class:`Sender` and receives through a
:class:`Receiver`, each opened once per cycle (one connection per mailbox per
cycle). Receivers identify messages by a stable id (a Maildir file name, IMAP
UIDVALIDITY+UID, a POP3 UIDL) and remove a message only when told that the
commit which made it redundant has happened (:meth:`Receiver.processed`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

from mailsync.transport.account import Secret
from mailsync.transport.keep import Keeper


@dataclass(frozen=True)
class Incoming:
    """One message as a receiver found it."""

    id: str
    raw: bytes


class Sender(Protocol):
    """An open outgoing connection for one cycle."""

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def send(self, sender: str, recipient: str, raw: bytes) -> None:
        """Hand one message to the mail system (envelope from/to addresses)."""


class Receiver(Protocol):
    """An open mailbox for one cycle."""

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def fetch(self) -> Iterator[Incoming]:
        """The messages waiting in the mailbox, oldest first."""

    def processed(self, message_id: str) -> None:
        """The message is no longer needed: its content is committed."""

    def set_aside(self, message_id: str, reason: str) -> None:
        """The message is not ours or not valid: move it out of the way."""


class Session:
    """Context-manager plumbing for transports: ``with`` opens, and
    :meth:`close` (a no-op here) runs on the way out, error or not."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        return None


class SeenStore(Protocol):
    """Message ids a receiver must not take again (POP3 mail left on the server)."""

    def seen(self, message_id: str) -> bool: ...

    def remember(self, message_id: str) -> None: ...

    def keep_only(self, present: set[str]) -> None:
        """Forget ids no longer in the mailbox."""


@dataclass
class TransportContext:
    """What a transport factory may need beyond its URL."""

    address: str
    base_dir: Path
    keep_processed: bool = True
    memory: object | None = None
    secret: Secret = field(default_factory=Secret)
    ca_file: Path | None = None
    insecure: bool = False
    timeout: float = 60.0
    processed_folder: str = "Processed"
    unrecognized_folder: str = "Unrecognized"
    seen: SeenStore | None = None
    retry_backoff: float = 1.0
    #: where a transport reports a weakened connection (``insecure = true``);
    #: the ``mailsync`` logger when None
    warn: Callable[[str], None] | None = None
    #: sessions kept open between this node's cycles (:mod:`.keep`); None:
    #: every cycle opens and closes its own
    keeper: Keeper | None = None
