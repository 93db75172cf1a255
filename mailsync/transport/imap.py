"""Receiving over IMAP with imapclient: UIDs, MOVE, never a bare EXPUNGE.

A message is identified by ``UIDVALIDITY:UID``. Nothing is removed from
INBOX until the node says the commit that made it redundant has happened;
then it is moved to ``Processed`` (or deleted, per ``keep_processed``) with
MOVE where the server has it, else COPY + \\Deleted + ``UID EXPUNGE`` — so a
concurrent client's deleted-but-not-expunged mail is never expunged by us.
Mail that is not ours, or not valid, goes to ``Unrecognized``. A UIDVALIDITY
change needs nothing special: everything in INBOX is fetched again, and the
database drops what it already holds (by sender and sequence).
"""

from __future__ import annotations

import contextlib
import imaplib
import ssl
from collections.abc import Iterator
from typing import Any, Self

from imapclient import IMAPClient
from imapclient.exceptions import IMAPClientError, LoginError

from mailsync.errors import TransportError
from mailsync.transport.account import Account, connection_error, parse_account
from mailsync.transport.base import Incoming, Session, TransportContext

#: Messages fetched per round trip, at most ...
FETCH_BATCH = 100
#: ... and at most this many bytes (one message may be larger): a mailbox
#: full of 10 MB parts must not be fetched into memory a hundred at a time.
FETCH_BYTES = 32 * 1024 * 1024
_DELETED = b"\\Deleted"


class ImapReceiver(Session):
    def __init__(self, url: str, ctx: TransportContext) -> None:
        self.account: Account = parse_account(
            url,
            "imap",
            ctx.secret,
            ca_file=ctx.ca_file,
            insecure=ctx.insecure,
            timeout=ctx.timeout,
            warn=ctx.warn,
        )
        self._keep = ctx.keep_processed
        self._processed = ctx.processed_folder
        self._unrecognized = ctx.unrecognized_folder
        self._client: IMAPClient | None = None
        self._uidvalidity = 0
        self._has_move = False
        self._has_uidplus = False

    def __enter__(self) -> Self:
        acc = self.account
        acc.connecting()
        try:
            client = IMAPClient(
                acc.host,
                port=acc.port,
                ssl=acc.security == "tls",
                ssl_context=acc.tls_context() if acc.security == "tls" else None,
                timeout=acc.timeout,
            )
        except (OSError, ssl.SSLError, IMAPClientError) as exc:
            raise connection_error(acc, exc, "connect") from exc
        self._client = client
        try:
            if acc.security == "starttls":
                if not client.has_capability("STARTTLS"):
                    raise acc.no_starttls()
                client.starttls(acc.tls_context())
            client.login(acc.user or "", acc.password() or "")
            for folder in (self._processed, self._unrecognized):
                if not client.folder_exists(folder):
                    client.create_folder(folder)
            selected = client.select_folder("INBOX")
            self._uidvalidity = int(selected[b"UIDVALIDITY"])
            self._has_move = client.has_capability("MOVE")
            self._has_uidplus = client.has_capability("UIDPLUS")
        except LoginError as exc:
            self.close()
            raise TransportError(
                f"{acc.display}: login failed for {acc.user}",
                hint="check the user in the URL and the password source in [mailbox]",
            ) from exc
        except (OSError, ssl.SSLError, IMAPClientError, imaplib.IMAP4.abort) as exc:
            self.close()
            raise connection_error(acc, exc, "open INBOX") from exc
        except BaseException:  # e.g. the password source failed: close, then report
            self.close()
            raise
        return self

    def resume(self) -> bool:
        """Another cycle on this session (:mod:`.keep`): select INBOX again,
        which brings the mail that came meanwhile and UIDVALIDITY."""
        if self._client is None:
            return False
        try:
            selected = self._client.select_folder("INBOX")
        except (OSError, ssl.SSLError, IMAPClientError, imaplib.IMAP4.abort):
            return False
        self._uidvalidity = int(selected[b"UIDVALIDITY"])
        return True

    def _call(self, doing: str, fn: Any, *args: Any) -> Any:
        assert self._client is not None
        try:
            return fn(*args)
        except (TimeoutError, OSError, IMAPClientError, imaplib.IMAP4.abort) as exc:
            raise connection_error(self.account, exc, doing) from exc

    def fetch(self) -> Iterator[Incoming]:
        assert self._client is not None
        uids = sorted(self._call("search INBOX", self._client.search, ["ALL"]))
        for batch in self._batches(uids):
            found = self._call("fetch", self._client.fetch, batch, ["BODY.PEEK[]"])
            for uid in batch:
                data = found.get(uid)
                if data is not None and b"BODY[]" in data:
                    yield Incoming(f"{self._uidvalidity}:{uid}", bytes(data[b"BODY[]"]))

    def _batches(self, uids: list[int]) -> Iterator[list[int]]:
        """UIDs in fetch batches bounded by count and by total size."""
        assert self._client is not None
        for start in range(0, len(uids), 1000):
            chunk = uids[start : start + 1000]
            sizes = self._call("fetch sizes", self._client.fetch, chunk, ["RFC822.SIZE"])
            batch: list[int] = []
            total = 0
            for uid in chunk:
                size = int(sizes.get(uid, {}).get(b"RFC822.SIZE", 0))
                if batch and (len(batch) >= FETCH_BATCH or total + size > FETCH_BYTES):
                    yield batch
                    batch, total = [], 0
                batch.append(uid)
                total += size
            if batch:
                yield batch

    def _uid(self, message_id: str) -> int:
        validity, _, uid = message_id.partition(":")
        if int(validity) != self._uidvalidity:
            raise TransportError(f"{self.account.display}: mailbox changed under us (UIDVALIDITY)")
        return int(uid)

    def _remove(self, uid: int, folder: str | None) -> None:
        client = self._client
        assert client is not None
        if folder is not None and self._has_move:
            self._call("move", client.move, [uid], folder)
            return
        if folder is not None:
            self._call("copy", client.copy, [uid], folder)
        self._call("flag", client.add_flags, [uid], [_DELETED])
        if self._has_uidplus:
            self._call("expunge", client.uid_expunge, [uid])
        # without UIDPLUS the message stays flagged: never a bare EXPUNGE

    def processed(self, message_id: str) -> None:
        self._remove(self._uid(message_id), self._processed if self._keep else None)

    def set_aside(self, message_id: str, reason: str) -> None:
        self._remove(self._uid(message_id), self._unrecognized)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        try:
            client.logout()
        except (OSError, IMAPClientError, imaplib.IMAP4.abort):
            with contextlib.suppress(OSError):
                client.shutdown()
