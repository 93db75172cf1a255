"""Envelopes: a changeset packed for one recipient, behind a small clear header.

The clear header holds only what routing needs before the body is opened:
format version, sender, recipient, link sequence, part i of n and the
sender's ack (the highest sequence it has applied from the recipient). The
body is the zstd-compressed changeset.

Layout (all integers big-endian)::

    b"MSYE" | u8 envelope version | u32 header length | header (msgpack) | body

This version is the unsealed one: sealing (X25519 + HKDF + AEAD with the
header as associated data, Ed25519 signature) replaces the body encoding in
the next envelope version without changing the header or any caller.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

import zstandard

from mailsync.changeset import Source, pack, unpack
from mailsync.errors import MessageError

MAGIC = b"MSYE"
ENVELOPE_VERSION = 1
_PREFIX = struct.Struct(">4sBI")
_MAX_HEADER = 64 * 1024
DEFAULT_LEVEL = 3


@dataclass(frozen=True)
class Header:
    """The clear, routable part of an envelope."""

    sender: str
    recipient: str
    seq: int
    ack: int = 0
    part: int = 1
    parts: int = 1
    version: int = ENVELOPE_VERSION

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": self.version,
            "from": self.sender,
            "to": self.recipient,
            "seq": self.seq,
            "ack": self.ack,
            "part": self.part,
            "parts": self.parts,
        }

    @classmethod
    def from_wire(cls, data: Any, origin: str) -> Header:
        try:
            header = cls(
                sender=str(data["from"]),
                recipient=str(data["to"]),
                seq=int(data["seq"]),
                ack=int(data["ack"]),
                part=int(data["part"]),
                parts=int(data["parts"]),
                version=int(data["v"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MessageError(f"{origin}: envelope header is malformed") from exc
        if header.seq < 0 or header.ack < 0 or not 1 <= header.part <= header.parts:
            raise MessageError(f"{origin}: envelope header has impossible numbers")
        return header


class Codec:
    """Packs and opens envelopes; holds the reusable zstd contexts.

    One compressor per node, not per message: a fresh ``ZstdCompressor`` costs
    several times the compression of a small changeset (PERF-FACTS). Bodies
    are compressed and decompressed as streams, so a changeset is never held
    uncompressed in memory.
    """

    def __init__(self, level: int = DEFAULT_LEVEL) -> None:
        self._compressor = zstandard.ZstdCompressor(level=level)
        self._decompressor = zstandard.ZstdDecompressor()

    def body_writer(self, sink: BinaryIO) -> zstandard.ZstdCompressionWriter:
        """A stream that compresses what is written to it into ``sink``."""
        return self._compressor.stream_writer(sink, closefd=False)

    def pack(self, header: Header, body: bytes) -> bytes:
        """An envelope from a header and a body made by :meth:`body_writer`."""
        head = pack(header.to_wire())
        return _PREFIX.pack(MAGIC, ENVELOPE_VERSION, len(head)) + head + body

    def open(self, blob: bytes, origin: str) -> tuple[Header, Source]:
        """The header and a stream of the changeset, or MessageError."""
        header = read_header(blob, origin)
        body = io.BytesIO(blob[_PREFIX.size + _header_length(blob) :])
        reader = self._decompressor.stream_reader(body, closefd=False)
        return header, _CheckedReader(reader, origin)


class _CheckedReader:
    """Turns a decompression failure into MessageError for the changeset reader."""

    def __init__(self, inner: Any, origin: str) -> None:
        self._inner = inner
        self._origin = origin

    def read(self, size: int = -1) -> bytes:
        try:
            return self._inner.read(size)  # type: ignore[no-any-return]
        except zstandard.ZstdError as exc:
            raise MessageError(f"{self._origin}: envelope body is corrupt ({exc})") from exc


def _header_length(blob: bytes) -> int:
    return int(_PREFIX.unpack_from(blob)[2])


def read_header(blob: bytes, origin: str) -> Header:
    """The clear header alone: what a node may look at before opening."""
    if len(blob) < _PREFIX.size:
        raise MessageError(f"{origin}: envelope is truncated")
    magic, version, length = _PREFIX.unpack_from(blob)
    if magic != MAGIC:
        raise MessageError(f"{origin}: not a mailsync envelope")
    if version != ENVELOPE_VERSION:
        raise MessageError(
            f"{origin}: envelope version {version} is not supported "
            f"(this mailsync reads version {ENVELOPE_VERSION})",
            hint="upgrade mailsync on this node",
        )
    if length > _MAX_HEADER or _PREFIX.size + length > len(blob):
        raise MessageError(f"{origin}: envelope header is truncated")
    try:
        data = unpack(blob[_PREFIX.size : _PREFIX.size + length])
    except Exception as exc:  # msgpack raises several unrelated types
        raise MessageError(f"{origin}: envelope header is corrupt") from exc
    return Header.from_wire(data, origin)
