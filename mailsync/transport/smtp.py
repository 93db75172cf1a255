"""Sending over SMTP with aiosmtplib: one connection per cycle, retries on 4xx.

The connection opens when the sender is entered and is reused for every
message of the cycle (a new connection + STARTTLS + AUTH per message is
several times slower). Transient failures — a 4xx answer, a dropped
connection — are retried a bounded number of times with backoff on a fresh
connection; permanent ones (5xx, failed login) raise at once. Either way the
outbox is untouched until a message is accepted, so nothing is lost: it goes
out next cycle.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any, Self

import aiosmtplib
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from mailsync.errors import Scope, TransportError
from mailsync.transport.account import Account, connection_error, parse_account
from mailsync.transport.base import Session, TransportContext

#: Attempts per message before a transient failure is reported.
SEND_ATTEMPTS = 3


class _Transient(Exception):
    """A failure worth another try on a new connection; ``recipient`` when
    the server put off this one recipient (452 mailbox full, greylisting),
    not the connection."""

    def __init__(self, text: str, *, recipient: bool = False) -> None:
        super().__init__(text)
        self.recipient = recipient


#: How long a closing connection may take to finish its TLS shutdown
#: before the loop goes away regardless.
CLOSE_WAIT = 0.5


async def _closed(protocols: list[Any]) -> None:
    """Wait until a closing connection is gone (its ``connection_lost`` ran,
    TLS shutdown included); without it the loop closes under the transport
    and leaks the socket. Waiting for the event, not a fixed time: a fixed
    50 ms was a third of a small cycle's wall time over real mail."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CLOSE_WAIT
    while loop.time() < deadline and any(
        getattr(p, "transport", None) is not None for p in protocols
    ):
        await asyncio.sleep(0.001)
    for _ in range(3):  # the close callbacks scheduled by connection_lost
        await asyncio.sleep(0)


class SmtpSender(Session):
    def __init__(self, url: str, ctx: TransportContext) -> None:
        self.account: Account = parse_account(
            url,
            "smtp",
            ctx.secret,
            ca_file=ctx.ca_file,
            insecure=ctx.insecure,
            timeout=ctx.timeout,
            warn=ctx.warn,
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._smtp: aiosmtplib.SMTP | None = None
        self._closing: list[Any] = []  # connections closed, to be waited for
        self._failed = False  # a send failed: not kept for another cycle
        self._backoff = ctx.retry_backoff

    def __enter__(self) -> Self:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._connect())
        except _Transient as exc:
            self.close()
            raise TransportError(f"{self.account.display}: connect: {exc}") from exc
        except BaseException:
            self.close()
            raise
        return self

    async def _connect(self) -> None:
        acc = self.account
        acc.connecting()
        smtp = aiosmtplib.SMTP(
            hostname=acc.host,
            port=acc.port,
            use_tls=acc.security == "tls",
            start_tls=False,  # for +starttls below, where a server without it is refused
            tls_context=acc.tls_context() if acc.security != "plain" else None,
            timeout=acc.timeout,
        )
        try:
            await smtp.connect()
            if acc.security == "starttls":
                await smtp.ehlo()
                if not smtp.supports_extension("starttls"):
                    raise acc.no_starttls()
                await smtp.starttls()
            if acc.user:
                await smtp.login(acc.user, acc.password() or "")
        except aiosmtplib.SMTPAuthenticationError as exc:
            self._abandon(smtp)
            raise TransportError(
                f"{acc.display}: login failed for {acc.user} ({exc.code} {exc.message})",
                hint="check the user in the URL and the password source in [mailbox]",
            ) from exc
        except aiosmtplib.SMTPResponseException as exc:
            self._abandon(smtp)
            if 400 <= exc.code < 500:
                raise _Transient(f"{exc.code} {exc.message}") from exc
            raise TransportError(f"{acc.display}: connect: {exc.code} {exc.message}") from exc
        except (aiosmtplib.SMTPConnectError, aiosmtplib.SMTPServerDisconnected) as exc:
            self._abandon(smtp)
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, ssl.SSLCertVerificationError):
                raise connection_error(acc, cause, "connect") from exc
            raise _Transient(str(exc)) from exc
        except (OSError, aiosmtplib.SMTPException) as exc:
            self._abandon(smtp)
            raise connection_error(acc, exc, "connect") from exc
        except BaseException:  # e.g. the password source failed: close, then report
            self._abandon(smtp)
            raise
        self._smtp = smtp

    def resume(self) -> bool:
        """Another cycle on this session (:mod:`.keep`): no send on it failed
        (a server's answer may depend on the session: Postfix reads its
        tables per process), still connected, answering NOOP."""
        if self._failed or self._loop is None or self._smtp is None:
            return False
        if not self._smtp.is_connected:
            return False
        try:
            self._loop.run_until_complete(self._smtp.noop())
        except (aiosmtplib.SMTPException, OSError):
            return False
        return True

    def send(self, sender: str, recipient: str, raw: bytes) -> None:
        assert self._loop is not None
        try:
            self._loop.run_until_complete(self._send_with_retries(sender, recipient, raw))
        except _Transient as exc:
            self._failed = True
            raise TransportError(
                f"{self.account.display}: sending to {recipient} failed {SEND_ATTEMPTS} times "
                f"({exc}); it stays in the outbox for the next cycle",
                # a full mailbox holds its peer; a flaky server, everyone
                scope="peer" if exc.recipient else "mailbox",
            ) from exc
        except BaseException:
            self._failed = True  # a session a send failed on is not kept
            raise

    async def _send_with_retries(self, sender: str, recipient: str, raw: bytes) -> None:
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(SEND_ATTEMPTS),
            wait=wait_exponential(multiplier=self._backoff, max=30 * self._backoff),
            retry=retry_if_exception_type(_Transient),
            reraise=True,
        ):
            with attempt:
                if self._smtp is None or not self._smtp.is_connected:
                    await self._connect()
                await self._send_once(sender, recipient, raw)

    async def _send_once(self, sender: str, recipient: str, raw: bytes) -> None:
        assert self._smtp is not None
        acc = self.account
        try:
            await self._smtp.sendmail(sender, [recipient], raw)
        except aiosmtplib.SMTPSenderRefused as exc:
            if exc.code == 552:
                raise TransportError(
                    f"{acc.display}: the server refused a {len(raw):,}-byte message as too large "
                    f"({exc.code} {exc.message})",
                    hint=f"set max_message_bytes in [mailbox] below {len(raw):,}",
                    scope="peer",
                ) from exc
            # MAIL FROM refused (auth, sender not ours): every message alike
            self._fail_or_retry(exc.code, exc.message, exc, scope="mailbox")
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [e.code for e in exc.recipients]
            if all(400 <= c < 500 for c in codes):
                raise _Transient(str(exc), recipient=True) from exc
            detail = "; ".join(f"{e.code} {e.message}" for e in exc.recipients)
            raise TransportError(
                f"{acc.display}: recipient {recipient} refused ({detail})",
                hint="check the peer's address (`mailsync station show` / the bundle)",
                scope="peer",
            ) from exc
        except aiosmtplib.SMTPResponseException as exc:
            self._fail_or_retry(exc.code, exc.message, exc)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPConnectError, OSError) as exc:
            self._drop()
            raise _Transient(str(exc) or type(exc).__name__) from exc

    def _fail_or_retry(
        self, code: int, message: str, exc: Exception, *, scope: Scope = "peer"
    ) -> None:
        """4xx: another try; 5xx: reported, by default as this message's
        peer's matter (DATA refused for policy or content: the next
        recipient may well be accepted)."""
        if 400 <= code < 500:
            self._drop()
            raise _Transient(f"{code} {message}") from exc
        raise TransportError(f"{self.account.display}: {code} {message}", scope=scope) from exc

    def _abandon(self, smtp: aiosmtplib.SMTP) -> None:
        """Close a connection at once; :meth:`close` waits for it to be gone."""
        self._closing.append(smtp.protocol)
        smtp.close()

    def _drop(self) -> None:
        if self._smtp is not None:
            self._abandon(self._smtp)
            self._smtp = None

    def close(self) -> None:
        if self._loop is None:
            return
        if self._smtp is not None:
            self._closing.append(self._smtp.protocol)
        if self._smtp is not None and self._smtp.is_connected:
            try:
                self._loop.run_until_complete(self._smtp.quit())
            except (aiosmtplib.SMTPException, OSError):
                self._smtp.close()
        self._smtp = None
        self._loop.run_until_complete(_closed(self._closing))
        self._closing = []
        self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        self._loop.close()
        self._loop = None
