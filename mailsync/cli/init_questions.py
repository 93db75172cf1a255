"""``mailsync init`` on a terminal without ``--mail/--send/--receive``: ask.

A real provider means two URLs and a password; an admin's first hour should
not be spent editing TOML by hand to find that out. Asked: where mail is
sent, where it is read, and where the password comes from — an environment
variable, or a file (typed now, never echoed, written owner-only, when it
does not exist yet). The password itself never reaches the config.
A URL whose scheme cannot do its job is asked again. Runs that are not on a
terminal (a script, CI, a pipe) keep the old behaviour: ``maildir:mail``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import typer

from mailsync.errors import ConfigError
from mailsync.transport import known_schemes, scheme_of

#: schemes that log in to a server (need a password)
_LOCAL = ("maildir", "memory")


@dataclass(frozen=True)
class Mailbox:
    """The answers: both URLs and the password's source."""

    send: str
    receive: str
    password_env: str | None = None
    password_file: str | None = None


def interactive() -> bool:
    """Questions need a person at a terminal, on both ends."""
    return sys.stdin.isatty() and sys.stdout.isatty()


def _url(job: str) -> Callable[[str], str]:
    senders, receivers = known_schemes()
    known = senders if job == "send" else receivers

    def check(value: str) -> str:
        value = value.strip()
        try:
            scheme = scheme_of(value)
        except ConfigError as exc:
            raise typer.BadParameter(str(exc)) from None
        if scheme not in known:
            raise typer.BadParameter(
                f"{scheme!r} cannot {job}: use {', '.join(f'{s}:' for s in sorted(known))}"
            )
        return value

    return check


def _source(value: str) -> str:
    value = value.strip().lower()
    if value not in ("env", "file"):
        raise typer.BadParameter("answer env or file")
    return value


def ask_mailbox(address: str, config_dir: Path) -> Mailbox:
    """Ask for the send and receive URLs and the password's source."""
    user = address.replace("@", "%40")
    domain = address.rpartition("@")[2]
    typer.echo(
        f"The mailbox of {address}: a provider's SMTP and IMAP (or POP3) account, "
        "or maildir:PATH for a local post office. The login user goes in the URL "
        "(@ written %40); the password never does."
    )
    send = typer.prompt(
        f"send URL (e.g. smtp+starttls://{user}@smtp.{domain}:587)",
        default="maildir:mail",
        value_proc=_url("send"),
    )
    local = scheme_of(send) in _LOCAL
    receive = typer.prompt(
        f"receive URL (e.g. imaps://{user}@imap.{domain})",
        default=send if local else None,
        value_proc=_url("receive"),
    )
    if local and scheme_of(receive) in _LOCAL:
        return Mailbox(send, receive)
    source = typer.prompt(
        "where does the password come from? env (a variable) or file",
        default="env",
        value_proc=_source,
    )
    if source == "env":
        name = typer.prompt("the environment variable's name", default="MAILSYNC_PASSWORD")
        return Mailbox(send, receive, password_env=name)
    name = typer.prompt("the password file", default="mail-password")
    path = Path(name).expanduser()
    path = path if path.is_absolute() else config_dir / path
    if not path.exists() and typer.confirm(f"{path} does not exist: type the password now?"):
        secret = typer.prompt("password", hide_input=True, confirmation_prompt=True)
        write_secret(path, secret)
        typer.echo(f"written to {path} (readable by you alone)")
    return Mailbox(send, receive, password_file=name)


def write_secret(path: Path, secret: str) -> None:
    """A new owner-only file holding ``secret`` (never one that exists)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} exists already: not overwritten") from None
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(secret + "\n")
