"""The restore witness: a node's high-water marks, kept outside its database.

A database restored from a backup looks, from the inside, like any other:
its number leases say which numbers are still free, its links which
sequence numbers come next — as they were on the backup's day. So a node
keeps a small file beside its key file (``mailsync.witness``) that the
backup of the database does not carry: per lease the *ceiling* (every
number below it may have been issued), per link the sequence numbers, on
the host the first number no lease covered yet per range and the highest
lease id. Both the file and the database carry a *generation*, raised with
every write of the file; a database whose generation is below its
witness's went back (see :mod:`mailsync.restore`).

Write-ahead, never behind, for numbers: the file is written and fsynced
before the transaction that raises a lease's ceiling in the database
commits, and nothing draws a number at or above the ceiling the database
holds. Sequence numbers are read from the database in the transaction
that writes the file, so they are never ahead of what was committed.

The file is the owner's: created 0600, replaced atomically (a temporary
file, fsync, rename, fsync of the folder), opened without following a
link, refused when another user owns it, others can read or write it, it
names another node or was written for another database.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mailsync.errors import ConfigError
from mailsync.private import read_private

#: The witness file's format version.
VERSION = 1


class DamagedWitness(ConfigError):
    """The witness file is there but cannot be read as one: it is treated
    as lost (every lease ends), not trusted."""


@dataclass(frozen=True)
class Witness:
    """What the witness file holds."""

    node: str
    #: the id of the database it was written for (``mailsync_meta.db_id``)
    database: str
    generation: int
    #: lease id → every number of the lease below this may have been issued
    ceilings: dict[int, int] = field(default_factory=dict)
    #: leases that ended (retired, released): never drawn from again
    closed: frozenset[int] = frozenset()
    #: lease id → (range, first, last) of every active lease: a database
    #: restored from before a grant gets the lease back (past its ceiling)
    spans: dict[int, tuple[str, int, int]] = field(default_factory=dict)
    #: peer → our last outbound / inbound sequence number
    out_seq: dict[str, int] = field(default_factory=dict)
    in_seq: dict[str, int] = field(default_factory=dict)
    #: host: range → the first number no lease has covered
    next_free: dict[str, int] = field(default_factory=dict)
    #: host: the highest lease id granted
    lease_id: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "mailsync_witness": VERSION,
            "node": self.node,
            "database": self.database,
            "generation": self.generation,
            "ceilings": {str(k): v for k, v in sorted(self.ceilings.items())},
            "closed": sorted(self.closed),
            "spans": {str(k): list(v) for k, v in sorted(self.spans.items())},
            "out_seq": self.out_seq,
            "in_seq": self.in_seq,
            "next_free": self.next_free,
            "lease_id": self.lease_id,
        }

    @classmethod
    def from_json(cls, data: Any) -> Witness:
        """Raises ValueError, KeyError or TypeError for anything malformed."""
        if not isinstance(data, dict) or data.get("mailsync_witness") != VERSION:
            raise ValueError("not a mailsync witness of this version")

        def ints(value: Any) -> dict[str, int]:
            if not isinstance(value, dict):
                raise TypeError("not a map")
            out = {}
            for key, number in value.items():
                if not isinstance(key, str) or type(number) is not int:
                    raise TypeError("not a map of numbers")
                out[key] = number
            return out

        generation, lease_id = data["generation"], data.get("lease_id", 0)
        if type(generation) is not int or type(lease_id) is not int:
            raise TypeError("generation")
        spans: dict[int, tuple[str, int, int]] = {}
        raw = data.get("spans", {})
        if not isinstance(raw, dict):
            raise TypeError("spans")
        for key, value in raw.items():
            if not isinstance(value, list) or len(value) != 3:
                raise TypeError("a span")
            name, first, last = value
            if not isinstance(name, str) or type(first) is not int or type(last) is not int:
                raise TypeError("a span")
            spans[int(key)] = (name, first, last)
        closed = data.get("closed", [])
        if not isinstance(closed, list) or any(type(x) is not int for x in closed):
            raise TypeError("closed")
        return cls(
            node=str(data["node"]),
            database=str(data["database"]),
            generation=generation,
            ceilings={int(k): v for k, v in ints(data.get("ceilings", {})).items()},
            closed=frozenset(closed),
            spans=spans,
            out_seq=ints(data.get("out_seq", {})),
            in_seq=ints(data.get("in_seq", {})),
            next_free=ints(data.get("next_free", {})),
            lease_id=lease_id,
        )


def witness_path(config_path: Path) -> Path:
    """The witness that belongs to a config file: beside it (and its key
    file), ``.witness``."""
    return config_path.with_suffix(".witness")


def read_witness(path: Path, node: str, database: str) -> Witness | None:
    """The witness at ``path``; None when there is none.

    Refused (:class:`ConfigError`): a symbolic link, a file another user
    owns or others may read or write, one of another node or written for
    another database. :class:`DamagedWitness`: not readable as a witness.
    """
    text = read_private(path, "restore witness")
    if text is None:
        return None
    try:
        witness = Witness.from_json(json.loads(text))
    except (ValueError, KeyError, TypeError) as exc:
        raise DamagedWitness(f"restore witness {path} is damaged") from exc
    if witness.node != node:
        raise ConfigError(
            f"restore witness {path} belongs to node {witness.node!r}, not {node!r}",
            hint="put this node's own witness back, or remove the file (every number "
            "lease then ends and new blocks are asked for)",
        )
    if witness.database != database:
        raise ConfigError(
            f"restore witness {path} was written for another database than this node's",
            hint="if this database replaces that one, remove the file: every number lease "
            "then ends and new blocks are asked for",
        )
    return witness


def write_witness(path: Path, witness: Witness) -> None:
    """Replace the witness atomically and durably: 0600, fsynced, renamed
    into place, and the folder fsynced so the rename survives a power cut."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)  # a leftover of a killed run; O_EXCL then refuses any link
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(witness.to_json(), fh, separators=(",", ":"))
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def set_damaged_aside(path: Path) -> Path:
    """Keep a damaged witness for inspection (``.damaged``) and free its name."""
    aside = path.with_name(path.name + ".damaged")
    os.replace(path, aside)
    return aside
