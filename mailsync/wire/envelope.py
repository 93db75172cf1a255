"""Envelopes: a changeset sealed for one recipient, behind a small clear header.

The clear header holds only what routing needs before anything is opened:
format version, sender, recipient, link sequence, part i of n, the sender's
ack (the highest sequence it has applied from the recipient), the number of
an unsequenced (control) message, the id of the recipient key it is
encrypted for, and the ephemeral public key. Nothing in
it names a table, a column or a value.

Sealing (DESIGN §6), with the ``cryptography`` package's primitives only:

- the body is the zstd-compressed changeset — for a small changeset, with
  the link's zstd dictionary named by the header's ``dict`` (0: none; see
  :mod:`mailsync.dictionaries`): a body is never decompressed with any other;
- a fresh X25519 key pair per message agrees a secret with the recipient's
  static X25519 key; HKDF-SHA256 turns it into a ChaCha20-Poly1305 key
  (unique per message, so a fixed nonce is safe);
- the prefix and clear header are the AEAD's associated data: changing any
  byte of them fails decryption;
- the sender signs prefix, header and ciphertext with Ed25519; the signature
  is checked before anything else is trusted.

Layout (integers big-endian)::

    b"MSYE" | u8 version | u32 header length | header (msgpack) | ciphertext | signature (64)
"""

from __future__ import annotations

import hashlib
import io
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, BinaryIO

import zstandard
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mailsync.errors import MessageError
from mailsync.keys import KeyRing, PublicKey
from mailsync.wire.changeset import Source, pack, read_changeset, unpack
from mailsync.wire.limits import DEFAULT_LIMITS, Limits, exceeded

MAGIC = b"MSYE"
ENVELOPE_VERSION = 2
_PREFIX = struct.Struct(">4sBI")
_MAX_HEADER = 64 * 1024
_SIG = 64
_TAG = 16  # Poly1305
_NONCE = bytes(12)  # the key is unique per message
_INFO = b"mailsync envelope v2"
DEFAULT_LEVEL = 3
#: small changesets with a dictionary: ~0.2 ms for 5 kB, 6 % smaller than at 3
DEFAULT_DICTIONARY_LEVEL = 9
#: compressors with a dictionary kept ready (a new one costs ~170 µs)
_DICTS_KEPT = 64
#: decompressed bytes per read when a part is measured
_MEASURE_CHUNK = 1 << 17


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
    key_id: str = ""
    eph: bytes = b""
    length: int = 0  # of the ciphertext: a cut envelope is told from an altered one
    #: the changeset id, shared by all parts of one changeset
    cid: str = ""
    #: the sequence number this changeset applies on top of (normally seq - 1;
    #: lower after a station restored from a backup is brought up to date)
    base: int = -1
    #: the changeset id of ``ack`` (the last one the sender applied from the
    #: recipient), and the highest sequence the recipient told the sender it
    #: applied: a recipient whose database went back to a backup sees that
    #: they do not match what it has
    ack_cid: str = ""
    acked: int = 0
    #: unsequenced messages: the sender's control number for this link,
    #: higher with every one it sends (0: none, from an older version); the
    #: receiver acts only on one above the highest it has seen, so a copy
    #: replayed from the mailbox is ignored. Signed with the rest.
    ctl: int = 0
    #: the id of the zstd dictionary the body was compressed with (0: none):
    #: a digest of the dictionary's content (:func:`dictionary_id`), so an id
    #: names one dictionary forever, whoever trained it and whenever
    dictionary: int = 0

    @property
    def after(self) -> int:
        return self.seq - 1 if self.base < 0 else self.base

    def to_wire(self) -> dict[str, Any]:
        return {
            "v": self.version,
            "from": self.sender,
            "to": self.recipient,
            "seq": self.seq,
            "ack": self.ack,
            "part": self.part,
            "parts": self.parts,
            "kid": self.key_id,
            "eph": self.eph,
            "len": self.length,
            "cid": self.cid,
            "base": self.after,
            "ack_cid": self.ack_cid,
            "acked": self.acked,
            "ctl": self.ctl,
            **({"dict": self.dictionary} if self.dictionary else {}),
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
                key_id=str(data["kid"]),
                eph=data["eph"],
                length=int(data["len"]),
                cid=str(data.get("cid", "")),
                base=int(data.get("base", -1)),
                ack_cid=str(data.get("ack_cid", "")),
                acked=int(data.get("acked", 0)),
                ctl=int(data.get("ctl", 0)),
                dictionary=int(data.get("dict", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MessageError(f"{origin}: envelope header is malformed") from exc
        if not isinstance(header.eph, bytes):
            raise MessageError(f"{origin}: envelope header is malformed")
        numbers = (
            header.seq,
            header.ack,
            header.parts,
            header.length,
            header.acked,
            header.after,
            header.ctl,
            header.dictionary,
        )
        if any(n > MAX_WIRE_INT for n in numbers) or (
            header.seq < 0
            or header.ack < 0
            or not 1 <= header.part <= header.parts
            or (header.seq > 0 and not 0 <= header.after < header.seq)
            or len(header.cid) > 32
            or len(header.ack_cid) > 32
            or header.acked < 0
            or header.ctl < 0
            or header.dictionary < 0
        ):
            raise MessageError(f"{origin}: envelope header has impossible numbers")
        return header


#: The largest number a header may carry: what a signed 64-bit column holds
#: (mailsync's sequence numbers are BIGINT on every database).
MAX_WIRE_INT = 2**63 - 1


@dataclass(frozen=True)
class DictionarySettings:
    """How a node trains the dictionaries of its links (config ``[node]``
    ``dictionary_*``; see :mod:`mailsync.dictionaries`)."""

    #: bytes of one dictionary (0: no dictionaries)
    size: int = 8 * 1024
    #: small bodies a dictionary is trained from
    samples: int = 24
    #: changesets compressed with one dictionary before a new one is trained
    rotate_every: int = 1000

    @property
    def enabled(self) -> bool:
        return self.size > 0


class UnknownDictionary(MessageError):
    """A body names a dictionary this node does not hold (lost with a
    restored database, pruned, or an id the sender made up): it cannot be
    decoded, and is never decoded with another one."""

    def __init__(self, origin: str, peer: str, dictionary: int) -> None:
        super().__init__(
            f"{origin}: compressed with dictionary {dictionary:x} of {peer}, which this node "
            "does not hold (it is asked for; the changeset comes again)"
        )
        self.peer = peer
        self.dictionary = dictionary


def dictionary_contexts(
    data: bytes, level: int, origin: str = "dictionary"
) -> tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor]:
    """A compressor and a decompressor with the dictionary ``data``, tried
    on a few bytes first: zstd loads a dictionary lazily, and one that is
    not (its header malformed) fails only then — MessageError here."""
    try:
        zdict = zstandard.ZstdCompressionDict(data)
        compressor = zstandard.ZstdCompressor(level=level, dict_data=zdict)
        decompressor = zstandard.ZstdDecompressor(dict_data=zdict)
        probe = compressor.compress(b"mailsync")
        decompressor.decompress(probe)
    except zstandard.ZstdError as exc:
        raise MessageError(f"{origin}: not a usable zstd dictionary ({exc})") from exc
    return compressor, decompressor


def dictionary_id(data: bytes) -> int:
    """The id of a dictionary: the first 63 bits of its SHA-256 (never 0)."""
    return (int.from_bytes(hashlib.sha256(data).digest()[:8], "big") >> 1) or 1


class Codec:
    """Seals and opens envelopes; holds the reusable zstd contexts.

    One compressor per node, not per message: a fresh ``ZstdCompressor`` costs
    several times the compression of a small changeset (PERF-FACTS). Bodies
    are compressed and decompressed as streams, so a changeset is never held
    uncompressed in memory; what they decompress into is bounded by
    ``limits`` (per part and per changeset), and so is what the changeset
    reader built on :meth:`stream` accepts.

    Dictionaries are learnt per peer (:meth:`learn`, by whoever read them
    from the database) and kept with their compressor and decompressor, a
    few per peer: a body names its dictionary by id, and one this codec has
    not learnt from that peer raises :class:`UnknownDictionary`.
    """

    def __init__(
        self,
        level: int = DEFAULT_LEVEL,
        limits: Limits = DEFAULT_LIMITS,
        dictionary_level: int = DEFAULT_DICTIONARY_LEVEL,
        dictionaries: DictionarySettings | None = None,
    ) -> None:
        self._compressor = zstandard.ZstdCompressor(level=level)
        self._decompressor = zstandard.ZstdDecompressor()
        self.limits = limits
        self.dictionary_level = dictionary_level
        self.dictionaries = dictionaries or DictionarySettings()
        #: (peer, id) → (compressor, decompressor), most recently learnt last
        self._dicts: dict[
            tuple[str, int], tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor]
        ] = {}

    def learn(self, peer: str, data: bytes) -> int:
        """Keep a dictionary of the link with ``peer`` ready; its id.
        MessageError if zstd cannot use it."""
        key = (peer, dictionary_id(data))
        if key not in self._dicts:
            self._dicts[key] = dictionary_contexts(data, self.dictionary_level)
            if len(self._dicts) > _DICTS_KEPT:
                del self._dicts[next(iter(self._dicts))]
        return key[1]

    def knows(self, peer: str, dictionary: int) -> bool:
        return dictionary == 0 or (peer, dictionary) in self._dicts

    def _contexts(
        self, peer: str, dictionary: int, origin: str
    ) -> tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor]:
        if not dictionary:
            return self._compressor, self._decompressor
        found = self._dicts.get((peer, dictionary))
        if found is None:
            raise UnknownDictionary(origin, peer, dictionary)
        return found

    def body_writer(
        self, sink: BinaryIO, peer: str = "", dictionary: int = 0
    ) -> zstandard.ZstdCompressionWriter:
        """A stream that compresses what is written to it into ``sink`` (with
        the dictionary ``dictionary`` learnt for ``peer``, if not 0)."""
        compressor = self._contexts(peer, dictionary, "compressing")[0]
        return compressor.stream_writer(sink, closefd=False)

    def seal(
        self, header: Header, body: bytes, recipient: PublicKey, signer: Ed25519PrivateKey
    ) -> bytes:
        """An envelope for ``recipient`` from a body made by :meth:`body_writer`."""
        eph = X25519PrivateKey.generate()
        eph_pub = eph.public_key().public_bytes_raw()
        sealed = replace(
            header,
            key_id=recipient.key_id,
            eph=eph_pub,
            version=ENVELOPE_VERSION,
            length=len(body) + _TAG,
        )
        head = pack(sealed.to_wire())
        clear = _PREFIX.pack(MAGIC, ENVELOPE_VERSION, len(head)) + head
        key = _derive(eph.exchange(recipient.encryption_key()), eph_pub, recipient.enc)
        # one buffer grows into the envelope, its value taken without a copy:
        # a load's part is megabytes, and each copy adds to the peak
        out = io.BytesIO()
        out.write(clear)
        out.write(ChaCha20Poly1305(key).encrypt(_NONCE, body, clear))
        with out.getbuffer() as signed:
            signature = signer.sign(signed)
        out.write(signature)
        return out.getvalue()

    def verify(self, blob: bytes, origin: str, sender_keys: Sequence[PublicKey]) -> Header:
        """The header, once the signature checks out with one of ``sender_keys``."""
        header = read_header(blob, origin)
        expected = _clear_length(blob) + header.length + _SIG
        if len(blob) < expected:
            raise MessageError(f"{origin}: envelope is truncated")
        if len(blob) > expected:
            raise MessageError(f"{origin}: envelope has extra bytes")
        if not sender_keys:
            raise MessageError(f"{origin}: no key known for sender {header.sender!r}")
        # a view, not a copy of a part of megabytes
        signed, signature = memoryview(blob)[:-_SIG], blob[-_SIG:]
        for key in sender_keys:
            try:
                key.verification_key().verify(signature, signed)
                return header
            except InvalidSignature:
                continue
        raise MessageError(f"{origin}: bad signature (not from {header.sender}, or altered)")

    def open(
        self, blob: bytes, origin: str, ring: KeyRing, sender_keys: Sequence[PublicKey]
    ) -> tuple[Header, Source]:
        """Verify, decrypt and return the header and a stream of the changeset
        (of a changeset in one part; see :meth:`stream` for several)."""
        header, body = self.decrypt(blob, origin, ring, sender_keys)
        return header, self.stream([body], origin, header)

    def stream(self, bodies: Iterable[bytes], origin: str, header: Header | None = None) -> Source:
        """The changeset from its decrypted parts, in order, decompressed as it
        is read: only one part is held at a time. ``header`` (of its first
        part) names the dictionary, if any."""
        return self._reader(bodies, origin, header)

    def _reader(
        self, bodies: Iterable[bytes], origin: str, header: Header | None
    ) -> _CheckedReader:
        decompressor = self._decompressor
        if header is not None:
            decompressor = self._contexts(header.sender, header.dictionary, origin)[1]
        raw = _Chained(iter(bodies))
        reader = decompressor.stream_reader(io.BufferedReader(raw), closefd=False)
        return _CheckedReader(reader, origin, self.limits, raw)

    def check_first_part(
        self, body: bytes, origin: str, *, whole: bool, header: Header | None = None
    ) -> int:
        """What a receiver can know of a changeset before it buffers it:
        its first part (decrypted ``body``), the only one that decodes on its
        own, is decompressed and read through, keeping nothing, with every
        bound of ``limits`` (sizes, lengths, rows, columns, tables) but
        without converting values; returns its decompressed size.
        MessageError if it breaks one. ``whole``: the part is the whole
        changeset (else it may end anywhere)."""
        reader = self._reader([body], origin, header)
        for _ in read_changeset(
            reader, origin=origin, limits=self.limits, partial=not whole, typed=False
        ):
            pass
        while reader.read(_MEASURE_CHUNK):  # a part of several may end mid-record
            pass
        return reader.total

    def decrypt(
        self, blob: bytes, origin: str, ring: KeyRing, sender_keys: Sequence[PublicKey]
    ) -> tuple[Header, bytes]:
        """Verify and decrypt one envelope: its header and its (compressed) body."""
        header = self.verify(blob, origin, sender_keys)
        return header, self.unseal(header, blob, origin, ring)

    def unseal(self, header: Header, blob: bytes, origin: str, ring: KeyRing) -> bytes:
        """Decrypt an envelope whose signature :meth:`verify` has checked
        (``header`` is what it returned): its (compressed) body. The receive
        step verifies every message before it looks further; this spares the
        signature a second check."""
        pair = ring.by_id(header.key_id)
        if pair is None:
            raise MessageError(
                f"{origin}: sealed for key {header.key_id}, which this node does not hold "
                "(an old key past its grace period, or another node's)"
            )
        clear = blob[: _clear_length(blob)]
        try:
            eph = X25519PublicKey.from_public_bytes(header.eph)
            key = _derive(pair.enc.exchange(eph), header.eph, pair.public.enc)
            sealed_body = memoryview(blob)[len(clear) : -_SIG]
            body = ChaCha20Poly1305(key).decrypt(_NONCE, sealed_body, clear)
        except (InvalidTag, ValueError) as exc:
            raise MessageError(f"{origin}: envelope does not decrypt") from exc
        return body


class _Chained(io.RawIOBase):
    """A readable stream over a sequence of byte strings, fetched lazily."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._current = memoryview(b"")
        #: the part being read (1 for the first; 0 before any)
        self.number = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._current:
            # an empty view still holds its part: let it go before the next
            self._current = memoryview(b"")
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self.number += 1
            self._current = memoryview(chunk)
        n = min(len(buffer), len(self._current))
        buffer[:n] = self._current[:n]
        self._current = self._current[n:]
        return n


def _derive(shared: bytes, eph_pub: bytes, recipient_pub: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=eph_pub + recipient_pub, info=_INFO
    ).derive(shared)


def _clear_length(blob: bytes) -> int:
    return _PREFIX.size + int(_PREFIX.unpack_from(blob)[2])


class _CheckedReader:
    """The decompressed changeset for its reader: a decompression failure
    becomes MessageError, and so does more output than ``limits`` allow per
    part (counted while that part's bytes are fed in) or per changeset.
    Carries ``limits`` for :func:`~mailsync.wire.changeset.read_changeset`."""

    def __init__(self, inner: Any, origin: str, limits: Limits, parts: _Chained) -> None:
        self._inner = inner
        self._origin = origin
        self.limits = limits
        self._parts = parts
        self.total = 0
        self._part = 0
        self._in_part = 0

    def read(self, size: int = -1) -> bytes:
        if size < 0:  # all of it, still counted as it comes
            return b"".join(iter(lambda: self.read(_MEASURE_CHUNK), b""))
        limits = self.limits
        try:
            data: bytes = self._inner.read(size)
        except zstandard.ZstdError as exc:
            raise MessageError(f"{self._origin}: envelope body is corrupt ({exc})") from exc
        n = len(data)
        if self._parts.number != self._part:
            self._part, self._in_part = self._parts.number, 0
        self._in_part += n
        self.total += n
        if self._in_part > limits.max_part_bytes:
            what = f"the decompressed size of part {self._part}"
            raise MessageError(
                f"{self._origin}: " + exceeded(what, "max_part_bytes", limits.max_part_bytes)
            )
        if self.total > limits.max_changeset_bytes:
            what = "the changeset's decompressed size"
            raise MessageError(
                f"{self._origin}: "
                + exceeded(what, "max_changeset_bytes", limits.max_changeset_bytes)
            )
        return data


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
