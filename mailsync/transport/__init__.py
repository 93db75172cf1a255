"""Mailbox transports: the seam between mailsync and a mail system.

A node sends through a :class:`Sender` and receives through a
:class:`Receiver`, each opened once per cycle (one connection per mailbox per
cycle) and chosen by the scheme of a URL in the node config:

===========================================  ==================================
``smtp://`` ``smtp+starttls://`` ``smtps://``  sending (:mod:`.smtp`)
``imap://`` ``imap+starttls://`` ``imaps://``  receiving (:mod:`.imap`)
``pop3://`` ``pop3+starttls://`` ``pop3s://``  receiving (:mod:`.pop3`)
``maildir:PATH``                               a local post office, both ways
``memory:``                                    in-process, for tests
===========================================  ==================================

Receivers identify messages by a stable id (a Maildir file name; later IMAP
UIDVALIDITY+UID or a POP3 UIDL) and remove a message only when told that the
commit which made it redundant has happened (:meth:`Receiver.processed`).
New transports register a factory with :func:`register`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self, TypeVar

from mailsync.errors import ConfigError
from mailsync.transport.account import Secret


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


SenderFactory = Callable[[str, TransportContext], Sender]
ReceiverFactory = Callable[[str, TransportContext], Receiver]

_SENDERS: dict[str, SenderFactory] = {}
_RECEIVERS: dict[str, ReceiverFactory] = {}


def register(
    scheme: str, *, sender: SenderFactory | None = None, receiver: ReceiverFactory | None = None
) -> None:
    """Make a transport available under a URL scheme."""
    if sender is not None:
        _SENDERS[scheme] = sender
    if receiver is not None:
        _RECEIVERS[scheme] = receiver


def scheme_of(url: str) -> str:
    scheme, sep, _ = url.partition(":")
    scheme = scheme.lower()
    if not sep:
        raise ConfigError(f"mailbox URL {url!r} has no scheme (e.g. maildir:PATH)")
    return scheme.lower()


F = TypeVar("F")


def _lookup(table: dict[str, F], url: str, what: str) -> F:
    _load_builtin()
    scheme = scheme_of(url)
    try:
        return table[scheme]
    except KeyError:
        known = ", ".join(sorted(table))
        raise ConfigError(
            f"mailbox URL {url!r}: cannot {what} with scheme {scheme!r} (known: {known})"
        ) from None


def open_sender(url: str, ctx: TransportContext) -> Sender:
    """A sender for ``url``; it connects when entered, not here."""
    return _lookup(_SENDERS, url, "send")(url, ctx)


def open_receiver(url: str, ctx: TransportContext) -> Receiver:
    """A receiver for ``url``; it connects when entered, not here."""
    return _lookup(_RECEIVERS, url, "receive")(url, ctx)


def _load_builtin() -> None:
    if _SENDERS:
        return
    from mailsync.transport import imap, maildir, memory, pop3, smtp

    register("maildir", sender=maildir.MaildirSender, receiver=maildir.MaildirReceiver)
    register("memory", sender=memory.MemorySender, receiver=memory.MemoryReceiver)
    for scheme in ("smtp", "smtp+starttls", "smtps"):
        register(scheme, sender=smtp.SmtpSender)
    for scheme in ("imap", "imap+starttls", "imaps"):
        register(scheme, receiver=imap.ImapReceiver)
    for scheme in ("pop3", "pop3+starttls", "pop3s"):
        register(scheme, receiver=pop3.Pop3Receiver)
