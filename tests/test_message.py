"""Messages: readable subject, routing headers, one attachment; spam is not ours."""

from __future__ import annotations

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
    (part,) = [p for p in msg.iter_attachments()]
    assert part.get_content_type() == "application/octet-stream"
    clear = read_header(blob, "m")
    assert (clear.sender, clear.recipient, clear.seq, clear.ack) == ("koeln", "hq", 42, 7)
    assert clear.key_id == HQ.public.key_id and len(clear.eph) == 32
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))


def test_clear_text_names_no_table_or_value() -> None:
    raw, _ = make(body=b"customers Mueller secret")
    assert b"customers" not in raw and b"Mueller" not in raw


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
