"""A node's keys: X25519 to receive encrypted changesets, Ed25519 to sign them.

The private keys live in a key file beside the config (``mailsync.key``),
readable by the owner only: mailsync creates it 0600 and refuses to use one
that group or others can read, that another user owns, or that is a symbolic
link. The file holds the current key pair and, after
``mailsync keys rotate``, the previous ones until their grace period ends,
so that messages already on their way under an old key still open.

A public key travels as one copyable token, ``msk1:`` followed by the
base64url of the 32-byte X25519 and 32-byte Ed25519 public keys; its
fingerprint (``key id``) is the first 16 hex digits of their SHA-256.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from mailsync.errors import ConfigError
from mailsync.private import read_private

PUBLIC_PREFIX = "msk1:"
#: How long a replaced key still opens and verifies messages.
DEFAULT_GRACE_DAYS = 14


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _raw_public(key: X25519PublicKey | Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


@dataclass(frozen=True)
class PublicKey:
    """A node's public half: encrypt to ``enc``, verify with ``sign``."""

    enc: bytes
    sign: bytes

    @property
    def key_id(self) -> str:
        return hashlib.sha256(self.enc + self.sign).hexdigest()[:16]

    def token(self) -> str:
        return PUBLIC_PREFIX + _b64(self.enc + self.sign)

    @classmethod
    def parse(cls, token: str, what: str = "public key") -> PublicKey:
        token = token.strip()
        if not token.startswith(PUBLIC_PREFIX):
            raise ConfigError(f"{what} {token[:20]!r} is not a mailsync public key (msk1:...)")
        try:
            raw = _unb64(token[len(PUBLIC_PREFIX) :])
        except ValueError:
            raw = b""
        if len(raw) != 64:
            raise ConfigError(f"{what} is damaged: it must hold 64 bytes")
        return cls(raw[:32], raw[32:])

    def encryption_key(self) -> X25519PublicKey:
        return X25519PublicKey.from_public_bytes(self.enc)

    def verification_key(self) -> Ed25519PublicKey:
        return Ed25519PublicKey.from_public_bytes(self.sign)


@dataclass(frozen=True)
class KeyPair:
    """A node's private keys, with when they were made and retired."""

    enc: X25519PrivateKey
    sign: Ed25519PrivateKey
    created: dt.datetime
    retired: dt.datetime | None = None

    @classmethod
    def generate(cls) -> KeyPair:
        return cls(X25519PrivateKey.generate(), Ed25519PrivateKey.generate(), _now())

    @property
    def public(self) -> PublicKey:
        return PublicKey(_raw_public(self.enc.public_key()), _raw_public(self.sign.public_key()))

    def to_json(self) -> dict[str, str | None]:
        return {
            "x25519": _b64(self.enc.private_bytes_raw()),
            "ed25519": _b64(self.sign.private_bytes_raw()),
            "created": self.created.isoformat(),
            "retired": self.retired.isoformat() if self.retired else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, str | None]) -> KeyPair:
        enc, sign, created = data["x25519"], data["ed25519"], data["created"]
        if not (enc and sign and created):
            raise ValueError("incomplete key")
        retired = data.get("retired")
        return cls(
            X25519PrivateKey.from_private_bytes(_unb64(enc)),
            Ed25519PrivateKey.from_private_bytes(_unb64(sign)),
            dt.datetime.fromisoformat(created),
            dt.datetime.fromisoformat(retired) if retired else None,
        )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class KeyRing:
    """The current key pair and the retired ones still within their grace."""

    node: str
    current: KeyPair
    previous: list[KeyPair] = field(default_factory=list)

    def by_id(self, key_id: str, grace_days: int = DEFAULT_GRACE_DAYS) -> KeyPair | None:
        """The private keys for a public key id, if still usable."""
        for pair in [self.current, *self.usable_previous(grace_days)]:
            if pair.public.key_id == key_id:
                return pair
        return None

    def usable_previous(self, grace_days: int = DEFAULT_GRACE_DAYS) -> list[KeyPair]:
        limit = _now() - dt.timedelta(days=grace_days)
        return [p for p in self.previous if p.retired is None or p.retired > limit]

    def rotated(self, grace_days: int = DEFAULT_GRACE_DAYS) -> KeyRing:
        """A ring with a fresh current pair; the old one retires now."""
        old = KeyPair(self.current.enc, self.current.sign, self.current.created, _now())
        return KeyRing(self.node, KeyPair.generate(), [old, *self.usable_previous(grace_days)])


def key_path(config_path: Path) -> Path:
    """The key file that belongs to a config file: same folder, ``.key``."""
    return config_path.with_suffix(".key")


def write_keyring(path: Path, ring: KeyRing) -> None:
    """Write the key file 0600, atomically (never a moment readable by others)."""
    data = {
        "mailsync_keys": 1,
        "node": ring.node,
        "current": ring.current.to_json(),
        "previous": [p.to_json() for p in ring.previous],
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)  # a leftover of a killed run; O_EXCL then refuses any link
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_keyring(path: Path, node: str) -> KeyRing:
    """Read the key file; refuse one that others can read, that another user
    owns, or that is a symbolic link.

    How, and why a link is refused rather than followed:
    :mod:`mailsync.private`.
    """
    text = read_private(path, "key file")
    if text is None:
        raise ConfigError(
            f"no key file at {path}",
            hint="`mailsync init` makes one; restore it from the node's backup if lost",
        )
    try:
        data = json.loads(text)
        ring = KeyRing(
            str(data["node"]),
            KeyPair.from_json(data["current"]),
            [KeyPair.from_json(p) for p in data.get("previous", [])],
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"key file {path} is damaged or not a mailsync key file") from exc
    if ring.node != node:
        raise ConfigError(f"key file {path} belongs to node {ring.node!r}, not {node!r}")
    return ring
