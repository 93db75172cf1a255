"""Receiving over POP3 (stdlib poplib): UIDL identity, DELE only after commit.

POP3 has no folders: a processed message is deleted (DELE, made final by
QUIT at the end of the cycle — if the cycle dies first, the server keeps the
message and the database drops it as a duplicate next time). A message that
is not ours or not valid is left on the server and remembered by its UIDL so
it is not taken again; the node may forward it to an address for
unrecognized mail.
"""

from __future__ import annotations

import poplib
import ssl
from collections.abc import Iterator
from typing import Self

from mailsync.errors import TransportError
from mailsync.transport.account import Account, connection_error, parse_account
from mailsync.transport.base import Incoming, Session, TransportContext


def _text(exc: poplib.error_proto) -> str:
    """The server's answer in an error: poplib gives bytes, or str for its own."""
    arg = exc.args[0] if exc.args else str(exc)
    return arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)


def _capabilities(pop: poplib.POP3) -> dict[str, list[str]]:
    """CAPA's answer; none when the server does not know CAPA (RFC 2449)."""
    try:
        return pop.capa()
    except poplib.error_proto:
        return {}


class Pop3Receiver(Session):
    def __init__(self, url: str, ctx: TransportContext) -> None:
        self.account: Account = parse_account(
            url,
            "pop3",
            ctx.secret,
            ca_file=ctx.ca_file,
            insecure=ctx.insecure,
            timeout=ctx.timeout,
            warn=ctx.warn,
        )
        self._seen = ctx.seen
        self._pop: poplib.POP3 | None = None
        self._numbers: dict[str, int] = {}

    def __enter__(self) -> Self:
        acc = self.account
        acc.connecting()
        try:
            if acc.security == "tls":
                pop: poplib.POP3 = poplib.POP3_SSL(
                    acc.host, acc.port, timeout=acc.timeout, context=acc.tls_context()
                )
            else:
                pop = poplib.POP3(acc.host, acc.port, timeout=acc.timeout)
        except (OSError, ssl.SSLError, poplib.error_proto) as exc:
            raise connection_error(acc, exc, "connect") from exc
        self._pop = pop
        try:
            if acc.security == "starttls":
                if "STLS" not in _capabilities(pop):
                    raise acc.no_starttls()
                pop.stls(acc.tls_context())
            pop.user(acc.user or "")
            pop.pass_(acc.password() or "")
        except poplib.error_proto as exc:
            self.close(commit=False)
            text = _text(exc)
            if "AUTH" in text.upper() or "PASS" in text.upper() or "LOGIN" in text.upper():
                raise TransportError(
                    f"{acc.display}: login failed for {acc.user} ({text})",
                    hint="check the user in the URL and the password source in [mailbox]",
                ) from exc
            raise TransportError(f"{acc.display}: login: {text}") from exc
        except (OSError, ssl.SSLError) as exc:
            self.close(commit=False)
            raise connection_error(acc, exc, "login") from exc
        except BaseException:  # e.g. the password source failed: close, then report
            self.close(commit=False)
            raise
        return self

    def fetch(self) -> Iterator[Incoming]:
        pop = self._pop
        assert pop is not None
        try:
            _, listing, _ = pop.uidl()
        except (OSError, poplib.error_proto) as exc:
            raise connection_error(self.account, exc, "UIDL") from exc
        entries: list[tuple[int, str]] = []
        for line in listing:
            num, _, uidl = line.decode("ascii", "replace").partition(" ")
            entries.append((int(num), uidl.strip()))
        if self._seen is not None:
            self._seen.keep_only({u for _, u in entries})
        for number, uidl in entries:
            if self._seen is not None and self._seen.seen(uidl):
                continue
            try:
                _, lines, _ = pop.retr(number)
            except (OSError, poplib.error_proto) as exc:
                raise connection_error(self.account, exc, f"RETR {number}") from exc
            self._numbers[uidl] = number
            yield Incoming(uidl, b"\r\n".join(lines) + b"\r\n")

    def processed(self, message_id: str) -> None:
        assert self._pop is not None
        try:
            self._pop.dele(self._numbers.pop(message_id))
        except (OSError, poplib.error_proto) as exc:
            raise connection_error(self.account, exc, "DELE") from exc

    def set_aside(self, message_id: str, reason: str) -> None:
        self._numbers.pop(message_id, None)
        if self._seen is not None:
            self._seen.remember(message_id)

    def close(self, commit: bool = True) -> None:
        pop, self._pop = self._pop, None
        if pop is None:
            return
        try:
            if commit:
                pop.quit()  # makes the DELEs final
            else:
                pop.close()
        except (OSError, poplib.error_proto):
            pop.close()


__all__ = ["Pop3Receiver", "TransportError"]
