"""Enrollment bundles: how a station learns its host, and the host its station.

A bundle is a small JSON file the admin hands to a station out of band:

- *public* — the station made its own keys (``mailsync init remote`` printed
  its public key, the admin passed it to ``station add --key``): the bundle
  holds only public data (host id, address and public key; station id and
  address) and needs no protection beyond comparing key ids;
- *sealed* — the admin let the host make the station's keys: the bundle also
  holds the station's private keys, encrypted with a key derived from a
  passphrase by scrypt (ChaCha20-Poly1305). Without the passphrase the file
  is useless; give the passphrase by another channel than the file.

``mailsync join BUNDLE`` on the station takes either kind.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from mailsync.errors import ConfigError
from mailsync.keys import KeyPair, PublicKey

FORMAT = "mailsync-bundle"
VERSION = 1
#: scrypt cost: 2**17 × 8 × 128 B = 128 MiB and ~0.3 s here — costly to guess.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**17, 8, 1
#: scrypt cost for a passphrase mailsync made up (~148 random bits: nothing
#: to stretch): the least scrypt takes, 2**4 × 8 × 128 B = 16 KiB, ~50 µs.
MADE_UP_SCRYPT_N = 2**4
PASSPHRASE_ENV = "MAILSYNC_PASSPHRASE"


@dataclass(frozen=True)
class Bundle:
    host_id: str
    host_address: str
    host_key: PublicKey
    station_id: str
    station_address: str
    station_keys: KeyPair | None = None  # only in a sealed bundle

    def _public_json(self) -> dict[str, Any]:
        return {
            "host": {
                "id": self.host_id,
                "address": self.host_address,
                "key": self.host_key.token(),
            },
            "station": {"id": self.station_id, "address": self.station_address},
        }


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclass(frozen=True)
class Sealer:
    """A passphrase's key, derived once by scrypt, and the salt and cost that
    derive it again (written into every bundle it seals).

    One admin's passphrase for a whole batch of bundles is stretched once,
    not once per bundle: at ~0.3 s a derivation, 10,000 bundles would take
    most of an hour. Each bundle still has its own random nonce (96 bits:
    no collision to fear among millions). A passphrase mailsync made itself
    (:func:`new_passphrase`, ~148 random bits) needs no stretching at all:
    ``n=MADE_UP_SCRYPT_N`` keeps it cheap.
    """

    salt: bytes
    key: bytes
    n: int = SCRYPT_N

    @classmethod
    def derive(cls, passphrase: str, *, n: int = SCRYPT_N) -> Sealer:
        salt = os.urandom(16)
        key = Scrypt(salt=salt, length=32, n=n, r=SCRYPT_R, p=SCRYPT_P).derive(
            passphrase.encode("utf-8")
        )
        return cls(salt, key, n)

    def seal(self, plain: bytes) -> dict[str, Any]:
        nonce = os.urandom(12)
        return {
            "kdf": "scrypt",
            "n": self.n,
            "r": SCRYPT_R,
            "p": SCRYPT_P,
            "salt": _b64(self.salt),
            "nonce": _b64(nonce),
            "data": _b64(ChaCha20Poly1305(self.key).encrypt(nonce, plain, FORMAT.encode())),
        }


def new_passphrase() -> str:
    """Six groups of five letters/digits (~150 bits), easy to read out."""
    alphabet = "abcdefghjkmnpqrstuvwxyz23456789"
    return "-".join("".join(secrets.choice(alphabet) for _ in range(5)) for _ in range(6))


def _write(path: Path, data: dict[str, Any], durable: bool) -> None:
    """Owner-only (a sealed bundle is guessable offline, given time): a file
    that was there keeps its mode through O_TRUNC, so it is set on the open
    descriptor; a symbolic link at ``path`` is not followed. ``durable``:
    fsync'ed before it returns (a batch syncs once for all its files)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1)
        fh.write("\n")
        if durable:
            fh.flush()
            os.fsync(fh.fileno())


def write_bundle(
    path: Path, bundle: Bundle, passphrase: str | Sealer | None = None, *, durable: bool = True
) -> None:
    """Write a public bundle, or a sealed one when it carries station keys
    (with a passphrase, or a :class:`Sealer` derived from one for a batch).
    A bundle may hold the only copy of a station's private keys: it is on
    the disk when this returns, unless the caller syncs (``durable=False``)."""
    body: dict[str, Any] = {"format": FORMAT, "version": VERSION}
    if bundle.station_keys is None:
        body.update(bundle._public_json())
    else:
        if not passphrase:
            raise ConfigError("a bundle with the station's private keys needs a passphrase")
        sealer = Sealer.derive(passphrase) if isinstance(passphrase, str) else passphrase
        secret = {**bundle._public_json(), "station_keys": bundle.station_keys.to_json()}
        body["sealed"] = sealer.seal(json.dumps(secret).encode())
    _write(path, body, durable)


def read_bundle(path: Path, passphrase: Callable[[], str]) -> Bundle:
    """Read a bundle; ``passphrase`` is asked only for a sealed one."""
    where = f"bundle {path}"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"no bundle at {path}") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where} is not a mailsync bundle") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(f"{where} is not a mailsync bundle")
    if data.get("version") != VERSION:
        raise ConfigError(
            f"{where} has version {data.get('version')}; this mailsync reads {VERSION}"
        )
    try:
        if "sealed" in data:
            sealed = data["sealed"]
            key = Scrypt(
                salt=base64.b64decode(sealed["salt"]),
                length=32,
                n=int(sealed["n"]),
                r=int(sealed["r"]),
                p=int(sealed["p"]),
            ).derive(passphrase().encode("utf-8"))
            try:
                plain = ChaCha20Poly1305(key).decrypt(
                    base64.b64decode(sealed["nonce"]),
                    base64.b64decode(sealed["data"]),
                    FORMAT.encode(),
                )
            except InvalidTag:
                raise ConfigError(f"{where}: wrong passphrase (or the file was altered)") from None
            data = json.loads(plain)
        host, station = data["host"], data["station"]
        keys = data.get("station_keys")
        return Bundle(
            host_id=str(host["id"]),
            host_address=str(host["address"]),
            host_key=PublicKey.parse(str(host["key"]), f"{where}: host key"),
            station_id=str(station["id"]),
            station_address=str(station["address"]),
            station_keys=KeyPair.from_json(keys) if keys else None,
        )
    except ConfigError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where} is damaged ({exc})") from exc


def passphrase_from(file: Path | None) -> str | None:
    """A passphrase from ``--passphrase-file`` or ``$MAILSYNC_PASSPHRASE``, if given."""
    if file is not None:
        try:
            text = file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"cannot read passphrase file {file}: {exc.strerror}") from exc
        if not text:
            raise ConfigError(f"passphrase file {file} is empty")
        return text
    return os.environ.get(PASSPHRASE_ENV) or None
