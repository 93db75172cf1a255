"""Messages: readable subject, routing headers, one attachment; spam is not ours."""

from __future__ import annotations

import base64
import email
import email.header
import email.policy

import pytest

from mailsync.errors import MessageError
from mailsync.keys import KeyPair
from mailsync.wire.envelope import Codec, Header, read_header
from mailsync.wire.message import Address, build_message, extract_envelope, is_mailsync

HQ, KOELN = KeyPair.generate(), KeyPair.generate()


def make(seq: int = 42, body: bytes = b"\x00" * 5000) -> tuple[bytes, bytes]:
    header = Header(sender="koeln", recipient="hq", seq=seq, ack=7)
    blob = Codec().seal(header, body, HQ.public, KOELN.sign)
    raw = build_message(header, Address("koeln", "koeln@x.test"), Address("hq", "hq@x.test"), blob)
    return raw, blob


def test_message_round_trip_and_readable_headers() -> None:
    raw, blob = make()
    assert is_mailsync(raw)
    assert extract_envelope(raw, "m") == blob
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["Subject"] == "[mailsync] koeln → hq #42"
    assert msg["X-Mailsync-From"] == "koeln" and msg["X-Mailsync-Seq"] == "42"
    # the message is its one attachment: no text part, no boundaries
    assert not msg.is_multipart()
    assert msg.get_content_type() == "application/octet-stream"
    assert msg.get_content_disposition() == "attachment"
    assert msg.get_content() == blob
    clear = read_header(blob, "m")
    assert (clear.sender, clear.recipient, clear.seq, clear.ack) == ("koeln", "hq", 42, 7)
    assert clear.key_id == HQ.public.key_id and len(clear.eph) == 32
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))


def test_clear_text_names_no_table_or_value() -> None:
    raw, _ = make(body=b"customers Mueller secret")
    assert b"customers" not in raw and b"Mueller" not in raw


def test_multipart_messages_of_earlier_versions_are_still_read() -> None:
    """Until the single-part shape, a message was multipart/mixed with a
    text part before the attachment; those still in a mailbox are read."""
    _, blob = make()
    body = base64.encodebytes(blob).replace(b"\n", b"\r\n")
    raw = (
        b"From: koeln@x.test\r\nX-Mailsync-Version: 2\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="=_b"\r\n\r\npreamble\r\n'
        b"--=_b\r\nContent-Type: text/plain\r\n\r\nhello\r\n"
        b'--=_b\r\nContent-Type: application/octet-stream; name="x.msync"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n" + body + b"\r\n--=_b--\r\n"
    )
    assert extract_envelope(raw, "m") == blob


def test_a_small_message_is_mostly_its_envelope() -> None:
    """What a message adds around its envelope: base64 and the headers
    (issue 17: the fixed bytes weigh on every small changeset)."""
    raw, blob = make(body=b"")
    headers = len(raw) - len(base64.encodebytes(blob).replace(b"\n", b"\r\n"))
    assert headers < 600


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"From: a@b\r\nSubject: buy now\r\n\r\nhello", "not a mailsync message"),
        (
            b"X-Mailsync-Version: 1\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
            b"Content-Type: application/octet-stream\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n\r\n--b--\r\n",
            "attachment is empty",
        ),
        (b"X-Mailsync-Version: 1\r\nContent-Type: text/plain\r\n\r\nhi", "no mailsync attachment"),
    ],
)
def test_messages_that_are_not_ours(raw: bytes, message: str) -> None:
    with pytest.raises(MessageError, match=message):
        extract_envelope(raw, "m")


@pytest.mark.parametrize("cut", [0, 3, 9, 20])
def test_truncated_envelopes(cut: int) -> None:
    _, blob = make()
    with pytest.raises(MessageError):
        read_header(blob[:cut], "m")
