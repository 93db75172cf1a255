"""A tiny line-protocol server on 127.0.0.1, for servers the suite's Postfix
and Dovecot cannot be: one that offers no STARTTLS (STLS in POP3).

It greets, then answers each command line with what ``answer`` returns (None
ends the connection), one connection at a time, and records every command.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import BinaryIO, Self


class LineServer:
    def __init__(self, greeting: str, answer: Callable[[str], str | None]) -> None:
        self._greeting = greeting
        self._answer = answer
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.commands: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() below
        self._listener.close()
        self._thread.join(timeout=10)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with conn, conn.makefile("rwb") as stream, contextlib.suppress(OSError):
                self._talk(stream)

    def _talk(self, stream: BinaryIO) -> None:
        stream.write(self._greeting.encode())
        stream.flush()
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            self.commands.append(line)
            reply = self._answer(line)
            if reply is None:
                return
            stream.write(reply.encode())
            stream.flush()


def _pop3(line: str) -> str | None:
    verb = line.split(" ", 1)[0].upper()
    if verb == "CAPA":
        return "+OK\r\nUSER\r\nUIDL\r\n.\r\n"  # no STLS
    if verb == "UIDL":
        return "+OK\r\n.\r\n"
    if verb == "QUIT":
        return None
    return "+OK\r\n"


def _imap(line: str) -> str | None:
    tag, _, rest = line.partition(" ")
    verb = rest.split(" ", 1)[0].upper()
    if verb == "CAPABILITY":
        return f"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n{tag} OK done\r\n"  # no STARTTLS
    if verb == "LOGOUT":
        return f"* BYE\r\n{tag} OK bye\r\n"
    return f"{tag} OK done\r\n"


def _smtp(line: str) -> str | None:
    verb = line.split(" ", 1)[0].upper()
    if verb == "EHLO":
        return "250-fake\r\n250 AUTH PLAIN\r\n"  # no STARTTLS
    if verb == "QUIT":
        return None
    return "250 ok\r\n"


@contextlib.contextmanager
def plain_server(protocol: str) -> Iterator[LineServer]:
    """A POP3, IMAP or SMTP server that never offers STARTTLS / STLS."""
    greeting, answer = {
        "pop3": ("+OK fake POP3\r\n", _pop3),
        "imap": ("* OK fake IMAP\r\n", _imap),
        "smtp": ("220 fake ESMTP\r\n", _smtp),
    }[protocol]
    with LineServer(greeting, answer) as server:
        yield server
