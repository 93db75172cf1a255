"""The changeset body: a versioned, self-describing, streamable record format.

A changeset is a sequence of msgpack objects, written and read one at a time
so that a million-row initial load never has to sit in memory whole::

    ["mailsync-changeset", VERSION, {meta}]          header, always first
    ["T", idx, name, [[column, type, tag], ...], [pk]]  declares a table
    ["R", idx, op, [[values of column 0], ...]]      a batch of rows, columnar
    ["C", kind, payload]                             control (rules, ...)
    ["E", {"rows": n, "records": m}]                 trailer: detects truncation

Rows are stored column by column (columnar batches compress ~20 % better than
row-wise ones under zstd, see PERF-FACTS). ``op`` is ``"I"`` (insert),
``"U"`` (update) or ``"D"`` (delete); insert and update batches carry every
declared column, delete batches (tombstones) only the primary-key columns.

Format 2 (this one) declares a type *tag* per column and carries the values
of a tagged column in the storage form of the sender's database, named by
``meta["dialect"]`` (:mod:`mailsync.wire.values`): msgpack-native, converted
by one function per column where they are not — never by a hook per value.
A batch whose values do not fit their tags is refused with the table, the
column and what is wrong. A sender whose batch does not fit declares the
table again (a new index) with the misfit columns tagged ``any``.

Values of an ``any`` column, of control records and of every column of a
format-1 changeset (still read: nodes upgrade at different times, and a
format-1 changeset may wait in an inbox or outbox) carry their own type:
msgpack's native types hold NULL, bool, 64-bit integers, float64, text and
bytes; extension types hold the rest losslessly — Decimal (with its scale,
and NaN/Infinity), integers beyond 64 bits, date, time and datetime (naive
or with a UTC offset). A zone-aware value keeps its offset, not its zone
name, as every SQL database does.

This module does no I/O of its own: it writes to any object with
``write(bytes)`` and reads from any object with ``read(n)``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal, Protocol, TypeVar

import msgpack

from mailsync.errors import MessageError
from mailsync.wire.limits import DEFAULT_LIMITS, MAX_EXT_BYTES, Limits, exceeded
from mailsync.wire.values import ANY, TAGS, wrong_values

T = TypeVar("T")

MAGIC = "mailsync-changeset"
VERSION = 2
#: formats this mailsync reads: 1 (values typed one by one) and 2 (tagged columns)
READABLE = (1, 2)

Op = Literal["I", "U", "D"]
OPS: tuple[Op, ...] = ("I", "U", "D")

_EXT_DECIMAL = 1
_EXT_DATE = 2
_EXT_TIME = 3
_EXT_DATETIME = 4
_EXT_BIGINT = 5

#: Bound on one decoded msgpack object of a node's own spool.
_MAX_BUFFER = 256 * 1024 * 1024


class Source(Protocol):
    """Anything a changeset can be read from (a file, a decompressor, BytesIO)."""

    def read(self, size: int = -1, /) -> bytes: ...


def batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """``items`` in lists of ``size`` (the last one shorter): rows flow in batches."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


class Sink(Protocol):
    """Anything a changeset can be written to (a file, a compressor, BytesIO)."""

    def write(self, data: bytes, /) -> int: ...


def _encode_value(value: Any) -> msgpack.ExtType | bytes:
    """msgpack ``default`` hook: the types msgpack does not carry natively."""
    if isinstance(value, Decimal):
        return msgpack.ExtType(_EXT_DECIMAL, str(value).encode("ascii"))
    if isinstance(value, dt.datetime):
        return msgpack.ExtType(_EXT_DATETIME, value.isoformat().encode("ascii"))
    if isinstance(value, dt.date):
        return msgpack.ExtType(_EXT_DATE, value.isoformat().encode("ascii"))
    if isinstance(value, dt.time):
        return msgpack.ExtType(_EXT_TIME, value.isoformat().encode("ascii"))
    if isinstance(value, int):  # beyond 64 bits: msgpack overflowed and asks us
        return msgpack.ExtType(_EXT_BIGINT, str(value).encode("ascii"))
    if isinstance(value, memoryview | bytearray):
        return bytes(value)
    raise TypeError(f"a value of type {type(value).__name__} cannot travel in a changeset")


def _decode_ext(code: int, data: bytes) -> Any:
    """msgpack ``ext_hook``: the inverse of :func:`_encode_value`."""
    text = data.decode("ascii")
    if code == _EXT_DECIMAL:
        return Decimal(text)
    if code == _EXT_DATETIME:
        return dt.datetime.fromisoformat(text)
    if code == _EXT_DATE:
        return dt.date.fromisoformat(text)
    if code == _EXT_TIME:
        return dt.time.fromisoformat(text)
    if code == _EXT_BIGINT:
        return int(text)
    raise ValueError(f"unknown value type {code}")


def pack(obj: Any) -> bytes:
    """One msgpack object with mailsync's value types (used for control data)."""
    return msgpack.packb(obj, default=_encode_value, use_bin_type=True)  # type: ignore[no-any-return]


def unpack(data: bytes) -> Any:
    """Inverse of :func:`pack`."""
    return msgpack.unpackb(data, ext_hook=_decode_ext, raw=False, strict_map_key=False)


def unpack_stream(source: Source) -> Iterator[Any]:
    """The objects written one after another with :func:`pack`, read lazily."""
    yield from msgpack.Unpacker(
        source, ext_hook=_decode_ext, raw=False, strict_map_key=False, max_buffer_size=_MAX_BUFFER
    )


@dataclass(frozen=True)
class TableDef:
    """A table as the sender declares it: columns (name, type name), key,
    a type tag per column (empty: every column ``any``) and the storage form
    its tagged values are in (the sender's dialect; None: format 1)."""

    index: int
    name: str
    columns: tuple[tuple[str, str], ...]
    pk: tuple[str, ...]
    tags: tuple[str, ...] = ()
    form: str | None = None

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.columns)

    def tag(self, column: str) -> str:
        if not self.tags:
            return ANY
        return self.tags[self.column_names.index(column)]

    def op_tags(self, op: str) -> tuple[str, ...]:
        """The tags of a batch's columns (deletes: the key's)."""
        if op == "D":
            return tuple(self.tag(k) for k in self.pk)
        return self.tags or (ANY,) * len(self.columns)


@dataclass(frozen=True)
class RowBatch:
    """Rows of one table and one operation, as tuples in declared column order
    (primary-key order for deletes)."""

    table: TableDef
    op: Op
    rows: list[tuple[Any, ...]]
    #: the same values column by column, as they came (None: not kept)
    columns: list[list[Any]] | None = None


@dataclass(frozen=True)
class Control:
    """A non-row record: rules for a station, range grants, acks, ..."""

    kind: str
    payload: Any


Record = TableDef | RowBatch | Control


@dataclass
class Summary:
    """What a changeset holds, counted while it is written or read."""

    rows: int = 0
    records: int = 0
    #: bytes of the body written so far, before compression
    bytes: int = 0
    per_table: dict[str, dict[str, int]] = field(default_factory=dict)

    def count(self, table: str, op: str, n: int) -> None:
        ops = self.per_table.setdefault(table, {"I": 0, "U": 0, "D": 0})
        ops[op] += n
        self.rows += n


class ChangesetWriter:
    """Writes a changeset record by record to a sink.

    Declare a table once with :meth:`table`, then hand it batches of rows with
    :meth:`rows`; :meth:`close` writes the trailer. Nothing but the current
    batch is held in memory.
    """

    def __init__(self, sink: Sink, meta: dict[str, Any] | None = None) -> None:
        self._sink = sink
        # the hook only sees values msgpack cannot hold: those of ``any``
        # columns and of control records
        self._packer = msgpack.Packer(default=_encode_value, use_bin_type=True)
        self._tables: list[TableDef] = []
        self.summary = Summary()
        self._closed = False
        self._form = (meta or {}).get("dialect")
        self._write([MAGIC, VERSION, meta or {}])

    def _write(self, obj: Any) -> None:
        data = self._packer.pack(obj)
        self._sink.write(data)
        self.summary.records += 1
        self.summary.bytes += len(data)

    def table(
        self,
        name: str,
        columns: Sequence[tuple[str, str]],
        pk: Sequence[str],
        tags: Sequence[str] | None = None,
    ) -> TableDef:
        """Declare a table; the returned definition is passed to :meth:`rows`.
        ``tags``: one per column (default: every column ``any``)."""
        tagged = tuple(tags) if tags is not None else (ANY,) * len(columns)
        if len(tagged) != len(columns) or not set(tagged) <= TAGS:
            raise ValueError(f"{name}: bad type tags {tagged!r}")
        tdef = TableDef(len(self._tables), name, tuple(columns), tuple(pk), tagged, self._form)
        self._tables.append(tdef)
        declared = [[c, t, tag] for (c, t), tag in zip(tdef.columns, tagged, strict=True)]
        self._write(["T", tdef.index, name, declared, list(tdef.pk)])
        return tdef

    def rows(self, table: TableDef, op: Op, rows: Sequence[Sequence[Any]]) -> None:
        """Write one batch; rows hold all columns (I, U) or the key (D)."""
        if not rows:
            return
        width = len(table.pk) if op == "D" else len(table.columns)
        for row in rows:
            if len(row) != width:
                raise ValueError(f"{table.name}: a {op} row needs {width} values, got {len(row)}")
        self.columns(table, op, [list(col) for col in zip(*rows, strict=True)])

    def columns(self, table: TableDef, op: Op, columns: list[list[Any]]) -> None:
        """Write one batch given column by column (each a list of values).

        A column whose values do not fit its tag (SQLite holds any value in
        any column) goes as ``any``: the table is declared again for this
        batch with that column's tag ``any``."""
        if not columns or not columns[0]:
            return
        tags = table.op_tags(op)
        misfit = {
            i
            for i, (tag, col) in enumerate(zip(tags, columns, strict=True))
            if wrong_values(tag, col)
        }
        target = table
        if misfit:
            names = table.pk if op == "D" else table.column_names
            bad = {names[i] for i in misfit}
            target = self.table(
                table.name,
                table.columns,
                table.pk,
                [ANY if c in bad else table.tag(c) for c in table.column_names],
            )
        self._write(["R", target.index, op, columns])
        self.summary.count(table.name, op, len(columns[0]))

    def control(self, kind: str, payload: Any) -> None:
        """Write a control record (applied before the rows that follow it)."""
        self._write(["C", kind, payload])

    def close(self) -> Summary:
        """Write the trailer; a reader treats a changeset without one as truncated."""
        if not self._closed:
            self._closed = True
            self._sink.write(
                self._packer.pack(
                    ["E", {"rows": self.summary.rows, "records": self.summary.records}]
                )
            )
        return self.summary


def read_changeset(
    source: Source,
    *,
    origin: str = "changeset",
    limits: Limits | None = None,
    partial: bool = False,
    typed: bool = True,
) -> Iterator[Record]:
    """Yield the records of a changeset in order, checking its structure.

    Raises :class:`MessageError` (naming ``origin``) for anything malformed:
    a wrong magic or version, an undeclared table, a batch of the wrong width,
    a missing trailer (truncation) or counts that disagree with the trailer —
    and for anything beyond ``limits`` (else the source's own ``limits``, as
    :meth:`Codec.stream <mailsync.wire.envelope.Codec.stream>` returns it, else
    the defaults): the length of every string, bytes value, array and map as
    msgpack declares it, before anything of it is built; the encoded size of
    one record; rows per batch, columns per table, tables per changeset.

    ``partial``: ``source`` holds only the beginning of a changeset (its first
    part); it may end anywhere, and what it holds is checked. ``typed=False``:
    extension values (Decimal, dates, ...) are not converted and batches
    come without their rows — a check of the structure alone, at a fraction
    of the cost.
    """
    if limits is None:
        limits = getattr(source, "limits", None) or DEFAULT_LIMITS
    metered = _Metered(source, limits.max_record_bytes, origin)
    unpacker = msgpack.Unpacker(
        metered,
        ext_hook=_decode_ext if typed else _skip_ext,
        raw=False,
        strict_map_key=False,
        **limits.unpacker_options(),
    )
    tables: dict[int, TableDef] = {}
    summary = Summary()
    ended = False
    version = VERSION
    form: str | None = None
    try:
        first = True
        for obj in unpacker:
            metered.record_done()
            if ended:
                raise MessageError(f"{origin}: data after the end of the changeset")
            if first:
                first = False
                if not (isinstance(obj, list) and len(obj) == 3 and obj[0] == MAGIC):
                    raise MessageError(f"{origin}: not a mailsync changeset")
                if obj[1] not in READABLE:
                    raise MessageError(
                        f"{origin}: changeset format version {obj[1]} is not supported "
                        f"(this mailsync reads versions {', '.join(map(str, READABLE))})",
                        hint="upgrade mailsync on this node",
                    )
                version = obj[1]
                meta = obj[2] if isinstance(obj[2], dict) else {}
                dialect = meta.get("dialect")
                form = dialect[:32] if isinstance(dialect, str) and version >= 2 else None
                summary.records += 1
                continue
            if not isinstance(obj, list) or not obj:
                raise MessageError(f"{origin}: malformed record")
            kind = obj[0]
            if kind == "E":
                trailer = obj[1] if len(obj) == 2 and isinstance(obj[1], dict) else {}
                if trailer.get("rows") != summary.rows or trailer.get("records") != summary.records:
                    raise MessageError(f"{origin}: changeset counts do not match its trailer")
                ended = True
                continue
            summary.records += 1
            yield _record(obj, tables, summary, origin, limits, typed, version, form)
            del obj  # a batch is not kept alive while the next one is read
    except MessageError:
        raise
    except msgpack.BufferFull as exc:
        what = "one value"
        raise MessageError(
            f"{origin}: {exceeded(what, 'max_value_bytes', limits.max_value_bytes)}"
        ) from exc
    except ValueError as exc:
        bound = _msgpack_bound(str(exc), limits)
        if bound is None:
            raise MessageError(f"{origin}: changeset is corrupt ({exc})") from exc
        raise MessageError(f"{origin}: {bound}") from exc
    except (TypeError, LookupError, ArithmeticError, msgpack.UnpackException) as exc:
        # ArithmeticError: decimal.InvalidOperation from a garbled Decimal;
        # LookupError: a column declared as "" or [] (a signed peer sent it)
        raise MessageError(f"{origin}: changeset is corrupt ({exc})") from exc
    if not ended and not partial:
        raise MessageError(f"{origin}: changeset is truncated (no trailer)")


def _skip_ext(code: int, data: bytes) -> None:
    return None


def _msgpack_bound(text: str, limits: Limits) -> str | None:
    """msgpack's "N exceeds max_array_len(M)" said in the words of ``[limits]``."""
    for option, what, keys in (
        ("max_str_len", "a text value of {n} bytes", "limits.max_value_bytes"),
        ("max_bin_len", "a bytes value of {n} bytes", "limits.max_value_bytes"),
        ("max_ext_len", "a typed value of {n} bytes", f"the bound {MAX_EXT_BYTES:,}"),
        (
            "max_array_len",
            "an array of {n} elements",
            "limits.max_batch_rows, max_columns and max_tables",
        ),
        ("max_map_len", "a map of {n} entries", "limits.max_batch_rows, max_columns, max_tables"),
    ):
        if f"exceeds {option}(" in text:
            n = text.split(" ", 1)[0]
            shown = f"{int(n):,}" if n.isdigit() else n
            bound = limits.unpacker_options()[option]
            return f"{what.format(n=shown)} exceeds {bound:,} (allowed by {keys})"
    return None


class _Metered:
    """The changeset's source, counting the bytes each record is read from:
    a record (one batch) larger than ``max_record_bytes`` is refused while
    it is read, before the rest of it is built."""

    def __init__(self, source: Source, limit: int, origin: str) -> None:
        self._source = source
        self._limit = limit
        self._origin = origin
        self._since = 0  # bytes read since the last record was complete

    def read(self, size: int = -1, /) -> bytes:
        data = self._source.read(size)
        self._since += len(data)
        if self._since > self._limit:
            raise MessageError(
                f"{self._origin}: "
                f"{exceeded('one record (a batch of rows)', 'max_record_bytes', self._limit)}"
            )
        return data

    def record_done(self) -> None:
        self._since = 0


def _record(
    obj: list[Any],
    tables: dict[int, TableDef],
    summary: Summary,
    origin: str,
    limits: Limits,
    typed: bool = True,
    version: int = VERSION,
    form: str | None = None,
) -> Record:
    kind = obj[0]
    if kind == "T" and len(obj) == 5:
        _, index, name, columns, pk = obj
        if isinstance(columns, list) and len(columns) > limits.max_columns:
            raise MessageError(
                f"{origin}: table {str(name)[:64]!r}: "
                + exceeded(f"{len(columns):,} columns", "max_columns", limits.max_columns)
            )
        if len(tables) >= limits.max_tables and index not in tables:
            raise MessageError(
                f"{origin}: "
                + exceeded(f"{len(tables) + 1:,} tables", "max_tables", limits.max_tables)
            )
        cols = tuple((str(c[0]), str(c[1])) for c in columns)
        names = {c for c, _ in cols}
        if not isinstance(name, str) or not pk or any(p not in names for p in pk):
            raise MessageError(f"{origin}: bad table declaration for {name!r}")
        tags: tuple[str, ...] = ()
        if version >= 2:
            claimed = [c[2] if len(c) == 3 else None for c in columns]
            for (column, _), tag in zip(cols, claimed, strict=True):
                if tag not in TAGS:
                    what = "no type tag" if tag is None else f"unknown type tag {str(tag)[:20]!r}"
                    raise MessageError(
                        f"{origin}: table {name[:64]!r}, column {column[:64]!r}: {what}"
                    )
            tags = tuple(str(t) for t in claimed)
        tdef = TableDef(int(index), name, cols, tuple(str(p) for p in pk), tags, form)
        tables[tdef.index] = tdef
        return tdef
    if kind == "R" and len(obj) == 4:
        _, index, op, columns = obj
        declared = tables.get(index)
        if declared is None:
            raise MessageError(f"{origin}: rows for an undeclared table #{index}")
        tdef = declared
        if op not in OPS:
            raise MessageError(f"{origin}: unknown operation {op!r} for table {tdef.name}")
        width = len(tdef.pk) if op == "D" else len(tdef.columns)
        if not isinstance(columns, list) or len(columns) != width:
            raise MessageError(f"{origin}: {tdef.name} {op} batch has the wrong number of columns")
        lengths = {len(c) for c in columns}
        if len(lengths) != 1:
            raise MessageError(f"{origin}: {tdef.name} {op} batch has ragged columns")
        (n,) = lengths
        if n > limits.max_batch_rows:
            raise MessageError(
                f"{origin}: {tdef.name} {op} batch of "
                + exceeded(f"{n:,} rows", "max_batch_rows", limits.max_batch_rows)
            )
        for tag, column, values in zip(
            tdef.op_tags(op), tdef.pk if op == "D" else tdef.column_names, columns, strict=True
        ):
            why = wrong_values(tag, values)
            if why is not None:
                raise MessageError(
                    f"{origin}: table {tdef.name[:64]}, {op} batch, column {column[:64]!r}: {why}"
                )
        summary.count(tdef.name, op, n)
        # a check of the structure alone (not typed) needs no rows built
        if not typed:
            return RowBatch(tdef, op, [])
        return RowBatch(tdef, op, list(zip(*columns, strict=True)), columns)
    if kind == "C" and len(obj) == 3 and isinstance(obj[1], str):
        return Control(obj[1], obj[2])
    raise MessageError(f"{origin}: unknown record {str(kind)[:20]!r}")
