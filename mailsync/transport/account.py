"""Mailbox accounts from URLs: host, port, TLS mode, user, and the password.

``smtp://``, ``smtp+starttls://``, ``smtps://``, ``imap://``,
``imap+starttls://``, ``imaps://``, ``pop3://``, ``pop3+starttls://`` and
``pop3s://`` name a server and a login (``user@`` in the URL, ``%40`` for an
``@`` inside the user name). The password is never required in the config:
it comes from an environment variable, a file, or a command that prints it.
TLS certificates are verified against the system store (or ``ca_file``);
``insecure = true`` turns that off, for tests only, and says so at every
connection (:meth:`Account.connecting`). A ``+starttls`` URL fails closed:
a server that does not offer STARTTLS (STLS in POP3) gets no login.
"""

from __future__ import annotations

import logging
import os
import shlex
import ssl
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from mailsync.errors import ConfigError, TransportError, first_line

logger = logging.getLogger("mailsync")

Security = Literal["plain", "starttls", "tls"]

DEFAULT_PORTS = {
    ("smtp", "plain"): 25,
    ("smtp", "starttls"): 587,
    ("smtp", "tls"): 465,
    ("imap", "plain"): 143,
    ("imap", "starttls"): 143,
    ("imap", "tls"): 993,
    ("pop3", "plain"): 110,
    ("pop3", "starttls"): 110,
    ("pop3", "tls"): 995,
}


@dataclass(frozen=True)
class Secret:
    """Where a password comes from (at most one of the three)."""

    env: str | None = None
    file: Path | None = None
    command: str | None = None

    def resolve(self, what: str) -> str | None:
        if self.env:
            value = os.environ.get(self.env)
            if value is None:
                raise ConfigError(f"{what}: environment variable {self.env} is not set")
            return value
        if self.file:
            try:
                return self.file.read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as exc:
                raise ConfigError(
                    f"{what}: cannot read password file {self.file}: {exc.strerror}"
                ) from exc
        if self.command:
            try:
                done = subprocess.run(
                    shlex.split(self.command),
                    capture_output=True,
                    text=True,
                    timeout=30,
                    check=False,
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise ConfigError(f"{what}: password command failed to run: {exc}") from exc
            if done.returncode != 0:
                raise ConfigError(f"{what}: password command exited with {done.returncode}")
            return done.stdout.rstrip("\r\n")
        return None


@dataclass(frozen=True)
class Account:
    """One server login, parsed from a URL."""

    url: str
    protocol: str  # smtp | imap | pop3
    security: Security
    host: str
    port: int
    user: str | None
    secret: Secret
    ca_file: Path | None = None
    insecure: bool = False
    timeout: float = 60.0
    #: where the ``insecure`` warning goes (the node's journal); else the logger
    warn: Callable[[str], None] | None = field(default=None, compare=False, repr=False)

    @property
    def display(self) -> str:
        """The URL without anything secret, for messages."""
        who = f"{self.user}@" if self.user else ""
        scheme = {
            "plain": self.protocol,
            "starttls": f"{self.protocol}+starttls",
            "tls": f"{self.protocol}s",
        }[self.security]
        return f"{scheme}://{who}{self.host}:{self.port}"

    def password(self) -> str | None:
        return self.secret.resolve(self.display)

    def connecting(self) -> None:
        """Called at every connection: warns while ``insecure = true``."""
        if not self.insecure:
            return
        text = f"{self.display}: TLS certificates are not checked (insecure = true); for tests only"
        if self.warn is not None:
            self.warn(text)
        else:
            logger.warning(text, extra={"event": "insecure"})

    def no_starttls(self) -> TransportError:
        """The one-line refusal when a ``+starttls`` server offers no STARTTLS."""
        command = "STLS" if self.protocol == "pop3" else "STARTTLS"
        return TransportError(
            f"{self.display}: the server does not offer {command}; "
            "mailsync does not log in without TLS",
            hint=f"use {self.protocol}s:// if the server has it, or ask the provider for {command}",
        )

    def tls_context(self) -> ssl.SSLContext:
        if self.insecure:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            return ctx
        try:
            return ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{self.display}: cannot load ca_file {self.ca_file}: {exc}") from exc


def parse_account(
    url: str,
    protocol: str,
    secret: Secret,
    *,
    ca_file: Path | None = None,
    insecure: bool = False,
    timeout: float = 60.0,
    warn: Callable[[str], None] | None = None,
) -> Account:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    base, _, mode = scheme.partition("+")
    security: Security
    if base == protocol and not mode:
        security = "plain"
    elif base == protocol and mode == "starttls":
        security = "starttls"
    elif base == protocol + "s" and not mode:
        security = "tls"
    else:
        raise ConfigError(f"mailbox URL {url!r}: scheme {scheme!r} is not a {protocol} scheme")
    if not parts.hostname:
        raise ConfigError(f"mailbox URL {url!r} names no server")
    try:
        port = parts.port or DEFAULT_PORTS[(protocol, security)]
    except ValueError as exc:
        raise ConfigError(f"mailbox URL {url!r}: bad port") from exc
    if parts.password:
        raise ConfigError(
            f"mailbox URL for {parts.hostname}: put no password in the URL",
            hint="use password_env, password_file or password_command in [mailbox]",
        )
    return Account(
        url=url,
        protocol=protocol,
        security=security,
        host=parts.hostname,
        port=port,
        user=unquote(parts.username) if parts.username else None,
        secret=secret,
        ca_file=ca_file,
        insecure=insecure,
        timeout=timeout,
        warn=warn,
    )


def connection_error(account: Account, exc: BaseException, doing: str) -> TransportError:
    """A one-line TransportError for a socket/TLS failure."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = f"TLS certificate not accepted ({exc.verify_message})"
        return TransportError(
            f"{account.display}: {doing}: {detail}",
            hint="check the server name; for a private CA set ca_file in [mailbox]",
        )
    if isinstance(exc, ConnectionRefusedError):
        return TransportError(
            f"{account.display}: {doing}: connection refused (server down or wrong port?)"
        )
    if isinstance(exc, TimeoutError):
        return TransportError(f"{account.display}: {doing}: timed out")
    return TransportError(f"{account.display}: {doing}: {first_line(exc)}")
