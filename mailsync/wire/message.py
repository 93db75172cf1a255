"""RFC 5322 messages that carry one envelope as an attachment.

Built from a fixed template and parsed with the ``compat32`` policy (the
``email`` package's default; ``email.policy``, the modern API, is not even
imported: it is start-up time a command does not need): the
``EmailMessage`` API costs ~1.15 ms per message each way, which was 80 % of a
run of small changesets (PERF-FACTS); the template costs microseconds.

A message has a subject a person can read (``[mailsync] koeln → hq #42``),
``X-Mailsync-*`` headers for routing before anything is opened, and the
envelope as its one ``application/octet-stream`` attachment: the message *is*
the attachment (a single part, ``Content-Disposition: attachment``). Until
0.x (see CHANGELOG) it was ``multipart/mixed`` with a text part besides; that
text, its part and the boundaries were ~420 bytes of every message — 8 bytes
of each row of a 50-row changeset — and both shapes are still read.
"""

from __future__ import annotations

import base64
import binascii
import email
import io
import re
import secrets
import time
from dataclasses import dataclass
from email.header import Header as MimeHeader
from email.message import Message
from email.utils import formatdate

from mailsync.errors import MessageError
from mailsync.wire.envelope import Header

ATTACHMENT_TYPE = "application/octet-stream"


@dataclass(frozen=True)
class Address:
    """A node as a mail system sees it."""

    node: str
    email: str


def subject_for(header: Header) -> str:
    part = f" ({header.part}/{header.parts})" if header.parts > 1 else ""
    return f"[mailsync] {header.sender} → {header.recipient} #{header.seq}{part}"


#: Room left in a message for its headers (and, once, a text part and MIME boundaries).
_MESSAGE_OVERHEAD = 2048
#: Room left in an envelope for its clear header, tag and signature.
_ENVELOPE_OVERHEAD = 1024


def part_bytes(max_message_bytes: int) -> int:
    """The largest changeset body one message may carry under the limit.

    base64 turns 57 bytes into a 76-character line plus CRLF (78 bytes).
    """
    return (max_message_bytes - _MESSAGE_OVERHEAD) * 57 // 78 - _ENVELOPE_OVERHEAD


def build_message(header: Header, sender: Address, recipient: Address, envelope: bytes) -> bytes:
    """The complete message bytes (CRLF line ends) for one envelope: a single
    ``application/octet-stream`` part, offered as an attachment."""
    name = f"{header.sender}-{header.recipient}-{header.seq}-{header.part}.msync"
    domain = sender.email.rpartition("@")[2] or "mailsync.invalid"
    message_id = f"<{header.sender}.{header.seq}.{header.part}.{secrets.token_hex(6)}@{domain}>"
    subject = MimeHeader(subject_for(header), "utf-8").encode()
    lines = [
        f"From: {sender.email}",
        f"To: {recipient.email}",
        f"Subject: {subject}",
        f"Date: {formatdate(time.time(), localtime=False)}",
        f"Message-ID: {message_id}",
        "MIME-Version: 1.0",
        f"X-Mailsync-Version: {header.version}",
        f"X-Mailsync-From: {header.sender}",
        f"X-Mailsync-To: {header.recipient}",
        f"X-Mailsync-Seq: {header.seq}",
        f"X-Mailsync-Part: {header.part}/{header.parts}",
        f"Content-Type: {ATTACHMENT_TYPE}",
        "Content-Transfer-Encoding: base64",
        f'Content-Disposition: attachment; filename="{name}"',
        "",
    ]
    # kept as bytes throughout, base64 a slice at a time into one buffer
    # whose value is taken without a copy: a part is megabytes, and the
    # peak of a large load's send is the envelope and this message
    out = io.BytesIO()
    out.write(("\r\n".join(lines) + "\r\n").encode("ascii"))
    view = memoryview(envelope)
    for start in range(0, len(view), _BASE64_SLICE):
        out.write(base64.encodebytes(view[start : start + _BASE64_SLICE]).replace(b"\n", b"\r\n"))
    return out.getvalue()


#: Envelope bytes base64-encoded at a time: whole 57-byte lines (so slices
#: join into the same lines as one call would make), about 1 MB
_BASE64_SLICE = 57 * 16384


def is_mailsync(raw: bytes) -> bool:
    """Cheap test on the raw bytes, before any parsing: does it say it is ours?"""
    head = raw[: raw.find(b"\r\n\r\n") if b"\r\n\r\n" in raw[:65536] else 65536]
    return b"\nX-Mailsync-Version:" in head or b"\nx-mailsync-version:" in head.lower()


def extract_envelope(raw: bytes, origin: str) -> bytes:
    """The envelope bytes from a message, or MessageError if there is none.

    A message in the shape :func:`build_message` makes (whatever headers the
    mail system added) is cut apart in place and its attachment decoded
    straight from the raw bytes; anything else goes through the ``email``
    parser, which holds a part as thousands of line strings — about ten
    times the part in memory, for a part of megabytes.
    """
    fast = _envelope_in_place(raw)
    if fast is not None:
        return fast
    msg: Message = email.message_from_bytes(raw)  # compat32, email's default policy
    if msg.get("X-Mailsync-Version") is None:
        raise MessageError(f"{origin}: not a mailsync message")
    for part in msg.walk():
        if part.get_content_type() == ATTACHMENT_TYPE:
            payload = part.get_payload(decode=True)
            if not isinstance(payload, bytes) or not payload:
                raise MessageError(f"{origin}: the attachment is empty")
            return payload
    raise MessageError(f"{origin}: the message has no mailsync attachment")


_BLANK_LINE = re.compile(rb"\r?\n\r?\n")


def _envelope_in_place(raw: bytes) -> bytes | None:
    """The attachment of a mailsync message — the message itself, or the part
    of a ``multipart/mixed`` one found by its boundary — base64-decoded from
    a view of ``raw``; None when the message is in neither shape (the full
    parser then decides)."""
    end = _BLANK_LINE.search(raw, 0, 65536)
    if end is None:
        return None
    head: Message = email.message_from_bytes(raw[: end.end()])  # compat32
    if head.get("X-Mailsync-Version") is None:
        return None
    if head.get_content_type() == ATTACHMENT_TYPE:  # the message is the attachment
        return _base64_body(head, memoryview(raw)[end.end() :])
    boundary = head.get_param("boundary")
    if head.get_content_type() != "multipart/mixed" or not isinstance(boundary, str):
        return None
    delimiter = b"\n--" + boundary.encode("ascii", "replace")
    view = memoryview(raw)
    start = raw.find(delimiter, end.start())
    while start >= 0:
        nxt = raw.find(delimiter, start + len(delimiter))
        if nxt < 0:
            return None  # no closing delimiter: cut short
        part_head = _BLANK_LINE.search(raw, start + len(delimiter), nxt)
        if part_head is None:
            return None
        fields: Message = email.message_from_bytes(
            raw[start + len(delimiter) : part_head.end()].lstrip(b"\r\n")
        )
        if fields.get_content_type() == ATTACHMENT_TYPE:
            return _base64_body(fields, view[part_head.end() : nxt])
        start = nxt
    return None


def _base64_body(fields: Message, body: memoryview) -> bytes | None:
    """The decoded attachment, or None (the full parser then decides)."""
    if str(fields.get("Content-Transfer-Encoding", "")).strip().lower() != "base64":
        return None
    try:
        return binascii.a2b_base64(body) or None
    except binascii.Error:
        return None
