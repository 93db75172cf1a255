"""A local post office: one Maildir per address under a common folder.

``maildir:PATH`` names the post office; a node reads the Maildir
``PATH/<its address>`` and delivers to ``PATH/<recipient address>``. Delivery
is the Maildir protocol (write into ``tmp/``, fsync, rename into ``new/``), so
a reader never sees half a message. Processed messages are renamed into the
``.Processed`` folder (or deleted, per setting); messages that are not ours
or not valid go to ``.Unrecognized`` — both atomic renames.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Self

from mailsync.errors import ConfigError, TransportError
from mailsync.transport.base import Incoming, Session, TransportContext

PROCESSED = ".Processed"
UNRECOGNIZED = ".Unrecognized"
_counter = itertools.count()


def post_office(url: str, ctx: TransportContext) -> Path:
    """The folder a ``maildir:`` URL names, relative paths from the config's folder."""
    path = url.partition(":")[2]
    if path.startswith("//"):
        path = path[2:]
    if not path:
        raise ConfigError(f"mailbox URL {url!r} names no folder (write maildir:PATH)")
    root = Path(path).expanduser()
    return root if root.is_absolute() else ctx.base_dir / root


def ensure_maildir(path: Path) -> Path:
    """The Maildir's folders, made owner-only (0700) where they are new, as
    mail delivery agents make them; the post office above is left alone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir(mode=0o700, exist_ok=True)
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(mode=0o700, exist_ok=True)
    return path


def _unique_name() -> str:
    return f"{time.time_ns()}.P{os.getpid()}Q{next(_counter)}.{socket.gethostname()}"


def deliver(maildir: Path, raw: bytes) -> str:
    """Deliver one message atomically; returns its file name."""
    ensure_maildir(maildir)
    name = _unique_name()
    tmp = maildir / "tmp" / name
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # owner-only, like an MDA's
    with os.fdopen(fd, "wb") as fh:
        fh.write(raw)
        fh.flush()
        os.fsync(fh.fileno())
    os.rename(tmp, maildir / "new" / name)
    return name


_WHOLE_OFFICE = {errno.ENOSPC, errno.EROFS, errno.EDQUOT}


class MaildirSender(Session):
    """Delivers into the recipient's Maildir in the post office."""

    def __init__(self, url: str, ctx: TransportContext) -> None:
        self._root = post_office(url, ctx)

    def send(self, sender: str, recipient: str, raw: bytes) -> None:
        try:
            deliver(self._root / recipient, raw)
        except OSError as exc:
            # a full or read-only disk, or a post office we may not write,
            # fails every recipient alike; anything else is this one's folder
            whole = exc.errno in _WHOLE_OFFICE or not os.access(self._root, os.W_OK)
            raise TransportError(
                f"cannot deliver to {recipient} in post office {self._root}: {exc.strerror}",
                scope="mailbox" if whole else "peer",
            ) from exc


class MaildirReceiver(Session):
    """Reads this node's own Maildir in the post office."""

    def __init__(self, url: str, ctx: TransportContext) -> None:
        self._box = post_office(url, ctx) / ctx.address
        self._keep = ctx.keep_processed
        self._paths: dict[str, Path] = {}

    def __enter__(self) -> Self:
        try:
            ensure_maildir(self._box)
        except OSError as exc:
            raise TransportError(f"cannot open mailbox {self._box}: {exc.strerror}") from exc
        return self

    def close(self) -> None:
        self._paths.clear()

    def fetch(self) -> Iterator[Incoming]:
        found: list[tuple[str, Path]] = []
        for sub in ("new", "cur"):
            for entry in os.scandir(self._box / sub):
                if entry.is_file() and not entry.name.startswith("."):
                    found.append((entry.name, Path(entry.path)))
        found.sort()  # names start with the delivery time: oldest first
        for name, path in found:
            try:
                raw = path.read_bytes()
            except FileNotFoundError:  # taken by a concurrent reader
                continue
            self._paths[name] = path
            yield Incoming(name, raw)

    def _move(self, message_id: str, folder: str) -> None:
        path = self._paths.pop(message_id)
        target = ensure_maildir(self._box / folder) / "cur" / path.name
        os.rename(path, target)

    def processed(self, message_id: str) -> None:
        if self._keep:
            self._move(message_id, PROCESSED)
        else:
            self._paths.pop(message_id).unlink(missing_ok=True)

    def set_aside(self, message_id: str, reason: str) -> None:
        self._move(message_id, UNRECOGNIZED)
