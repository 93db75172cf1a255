"""How much a received message may make this node decode (DESIGN §12).

A signature proves who sent a message, not that it is sane: a station's
keys may be in an attacker's hands. Every size and count the decoders accept
is bounded here, so a few kilobytes of validly signed mail can never make a
node decompress or build more than these limits allow. A violation is a
:class:`~mailsync.errors.MessageError` whose text names the limit (its key in
the config's ``[limits]`` table) and the value that broke it.

The defaults admit, with a wide margin, everything mailsync itself produces
with its own defaults (batches of 5,000 rows, messages of 10 MB).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

#: msgpack extension values (Decimal, date, time, datetime, big integers)
#: are short texts; a longer one is not a value mailsync wrote.
MAX_EXT_BYTES = 64 * KIB


@dataclass(frozen=True)
class Limits:
    """The bounds on decoding one received changeset and on what one peer
    may keep waiting in the inbox (the ``[limits]`` table)."""

    #: bytes one part may decompress into (checked at receive for the first
    #: part, before it is buffered, and at apply for every part)
    max_part_bytes: int = 256 * MIB
    #: bytes a whole changeset may decompress into
    max_changeset_bytes: int = 16 * GIB
    #: bytes of one record (a batch of rows, a table definition, a control)
    #: as encoded: bounds what one batch can make this node build in memory
    #: (up to ~20 times this, for a record of the tiniest values; 5,000 rows
    #: of 3 kB each fit)
    max_record_bytes: int = 16 * MIB
    #: rows in one batch (mailsync writes ``batch_rows``, default 5,000)
    max_batch_rows: int = 100_000
    #: columns in one table definition (PostgreSQL allows 1,600)
    max_columns: int = 1_600
    #: table definitions in one changeset
    max_tables: int = 10_000
    #: bytes of one text or binary value (a value lies inside a record: raise
    #: both for tables of large documents)
    max_value_bytes: int = 16 * MIB
    #: bytes of one zstd dictionary a peer sends (mailsync trains 8 KiB ones)
    max_dictionary_bytes: int = 64 * KIB
    #: how far ahead of the last changeset applied from its sender one may be
    #: numbered (a month of five-minute cycles is under 9,000)
    max_ahead: int = 100_000
    #: parts of one changeset (at the default message size, about a terabyte)
    max_parts: int = 100_000
    #: changesets one peer may have waiting in the inbox beyond the one next
    #: in line (early, or behind a gap); more are set aside and sent again
    max_buffered_changesets: int = 1_000
    #: bytes (sealed) those changesets may take, per peer
    max_buffered_bytes: int = 1 * GIB
    #: a changeset whose parts stopped arriving this many hours ago is
    #: dropped from the inbox and asked for again whole
    incomplete_expiry_hours: int = 72
    #: failed attempts to apply a changeset before it is quarantined: no
    #: longer tried by itself, its link held until `mailsync inbox retry`
    quarantine_after: int = 5

    @property
    def max_container_len(self) -> int:
        """Elements of one msgpack array or map: a column of a batch holds
        one value per row; a record lists columns or tables."""
        return max(self.max_batch_rows, self.max_columns, self.max_tables, 16)

    def unpacker_options(self) -> dict[str, int]:
        """The msgpack ``Unpacker`` bounds these limits imply."""
        container = self.max_container_len
        return {
            # the unparsed rest of the buffer: one value at most (msgpack
            # drops what it has parsed, so this does not bound a record)
            "max_buffer_size": max(self.max_value_bytes, MAX_EXT_BYTES) + 64 * KIB,
            "max_str_len": self.max_value_bytes,
            "max_bin_len": self.max_value_bytes,
            "max_array_len": container,
            "max_map_len": container,
            "max_ext_len": MAX_EXT_BYTES,
        }


DEFAULT_LIMITS = Limits()

#: the settings of the ``[limits]`` table, in order
LIMIT_KEYS: tuple[str, ...] = tuple(f.name for f in fields(Limits))


def exceeded(what: str, key: str, limit: int) -> str:
    """The reason text for a broken limit: what, and which setting allows how much."""
    return f"{what} exceeds limits.{key} = {limit:,}"
