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

The protocols live in :mod:`.base`; this module is the registry. New
transports register a factory with :func:`register`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TypeVar, cast

from mailsync.errors import ConfigError
from mailsync.transport.base import (
    Incoming,
    Receiver,
    SeenStore,
    Sender,
    Session,
    TransportContext,
)
from mailsync.transport.keep import Kept

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

#: the built-in transports, imported on first use: a node that reads a
#: Maildir never pays for the IMAP and SMTP libraries (a command's start-up
#: is most of a laptop's small sync)
_BUILTIN_SENDERS: dict[str, tuple[str, str]] = {
    "maildir": ("maildir", "MaildirSender"),
    "memory": ("memory", "MemorySender"),
    **{s: ("smtp", "SmtpSender") for s in ("smtp", "smtp+starttls", "smtps")},
}
_BUILTIN_RECEIVERS: dict[str, tuple[str, str]] = {
    "maildir": ("maildir", "MaildirReceiver"),
    "memory": ("memory", "MemoryReceiver"),
    **{s: ("imap", "ImapReceiver") for s in ("imap", "imap+starttls", "imaps")},
    **{s: ("pop3", "Pop3Receiver") for s in ("pop3", "pop3+starttls", "pop3s")},
}


def _lookup(table: dict[str, F], builtin: dict[str, tuple[str, str]], url: str, what: str) -> F:
    scheme = scheme_of(url)
    if scheme not in table and scheme in builtin:
        module, name = builtin[scheme]
        table[scheme] = getattr(importlib.import_module(f"mailsync.transport.{module}"), name)
    try:
        return table[scheme]
    except KeyError:
        known = ", ".join(sorted(set(table) | set(builtin)))
        raise ConfigError(
            f"mailbox URL {url!r}: cannot {what} with scheme {scheme!r} (known: {known})"
        ) from None


#: the schemes whose sessions may be kept between cycles (:mod:`.keep`;
#: never POP3: it sees the mailbox as it was at login)
KEEPABLE = frozenset(("imap", "imap+starttls", "imaps", "smtp", "smtp+starttls", "smtps"))


def known_schemes() -> tuple[set[str], set[str]]:
    """The URL schemes that can send, and those that can receive."""
    return set(_SENDERS) | set(_BUILTIN_SENDERS), set(_RECEIVERS) | set(_BUILTIN_RECEIVERS)


def open_sender(url: str, ctx: TransportContext) -> Sender:
    """A sender for ``url``; it connects when entered, not here."""
    factory = _lookup(_SENDERS, _BUILTIN_SENDERS, url, "send")
    if ctx.keeper is not None and scheme_of(url) in KEEPABLE:
        # entered, a Kept gives the (kept or new) sender itself
        return cast(Sender, Kept(ctx.keeper, f"send {url}", lambda: factory(url, ctx)))
    return factory(url, ctx)


def open_receiver(url: str, ctx: TransportContext) -> Receiver:
    """A receiver for ``url``; it connects when entered, not here."""
    factory = _lookup(_RECEIVERS, _BUILTIN_RECEIVERS, url, "receive")
    if ctx.keeper is not None and scheme_of(url) in KEEPABLE:
        return cast(Receiver, Kept(ctx.keeper, f"receive {url}", lambda: factory(url, ctx)))
    return factory(url, ctx)


__all__ = [
    "Incoming",
    "Receiver",
    "SeenStore",
    "Sender",
    "Session",
    "TransportContext",
    "open_receiver",
    "open_sender",
    "register",
]
