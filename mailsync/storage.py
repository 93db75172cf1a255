"""Rows in storage form: read raw, tagged per column, written raw.

Rows flow in bulk (an initial load, a changeset) without SQLAlchemy's per
value type processing, which cost more than everything else in the
pipeline (PERF-FACTS): the build reads them as the driver hands them out
(:func:`raw_select`), makes a column msgpack-native with one function where
needed (:func:`wire_functions`: PostgreSQL's Decimal and datetimes become
text) and tags it (:func:`tag_for`). The apply writes them at driver level
(:mod:`mailsync.dialects.bulk`) as they came when the sender's database is
of the receiver's kind — so SQLite text stays byte-identical — and turns
them into Python values for the receiver's own column types otherwise
(:class:`Columns`).

The checks of the apply stage (rules, conflicts, reloads) compare values
with rows SQLAlchemy reads: :meth:`Columns.typed` gives them a batch in
Python values, only when a check needs it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Date,
    DateTime,
    Float,
    Integer,
    LargeBinary,
    Numeric,
    String,
    Table,
    Text,
    Time,
    cast,
    type_coerce,
)
from sqlalchemy.engine import Dialect as SADialect
from sqlalchemy.types import NullType, TypeEngine

from mailsync.wire.changeset import RowBatch, TableDef
from mailsync.wire.values import ANY, convert, from_wire, to_wire

Fn = Callable[[Any], Any]


def tag_for(ctype: TypeEngine[Any]) -> str:
    """The wire tag of a column type (``any``: values carry their own type)."""
    checks: tuple[tuple[type, str], ...] = (
        (Boolean, "bool"),
        (Integer, "int"),
        (Float, "float"),
        (Numeric, "decimal"),
        (DateTime, "datetime"),
        (Date, "date"),
        (Time, "time"),
        (String, "text"),
        (LargeBinary, "bytes"),
    )
    impl = getattr(ctype, "impl_instance", ctype)  # a TypeDecorator: what it stores
    for kind, tag in checks:
        if isinstance(ctype, kind) or isinstance(impl, kind):
            return tag
    return ANY


#: tags whose values PostgreSQL is asked for as its own text output (ISO
#: dates, exact numerics): what its driver would make Python objects of, to
#: be made text again for the wire
_AS_TEXT = frozenset({"decimal", "datetime", "date", "time"})


def _as_text(column: Column[Any], dialect: SADialect) -> bool:
    return dialect.name != "sqlite" and tag_for(column.type) in _AS_TEXT


def raw_select_columns(table: Table, dialect: SADialect) -> list[Any]:
    """The table's columns as the driver hands their values out (no result
    processing), under their own names; on PostgreSQL, Decimal and dates as
    the server's text (:func:`mailsync.dialects.bulk.read_as_text` sets its
    date style)."""
    return [
        type_coerce(cast(c, Text) if _as_text(c, dialect) else c, NullType()).label(c.name)
        for c in table.columns
    ]


def wire_functions(table: Table, dialect: SADialect) -> list[Fn | None]:
    """Per column: the driver's value → msgpack-native storage form (None:
    nothing to do). SQLite's driver hands out native values only."""
    if dialect.name == "sqlite":
        return [None] * len(table.columns)
    return [None if _as_text(c, dialect) else to_wire(tag_for(c.type)) for c in table.columns]


def key_typers(table: Table, dialect: SADialect) -> list[Fn | None]:
    """Per key column: a raw value → the Python value SQLAlchemy reads (the
    change log's keys are compared in these)."""
    if dialect.name != "sqlite":  # psycopg types its values itself, but for texts
        return [
            from_wire(tag_for(c.type)) if _as_text(c, dialect) else None
            for c in table.primary_key.columns
        ]
    return [_result_processor(c, dialect) for c in table.primary_key.columns]


def key_to_storage(table: Table, dialect: SADialect) -> list[Fn | None]:
    """Per key column: a Python value → its storage form, as a build reads
    it raw and sends it (SQLite: the value it stores; elsewhere made
    msgpack-native). For a key no row holds any more: a keyed tombstone."""
    pk = list(table.primary_key.columns)
    if dialect.name == "sqlite":
        return [_bind_processor(c, dialect) for c in pk]
    return [to_wire(tag_for(c.type)) for c in pk]


def _result_processor(column: Column[Any], dialect: SADialect) -> Fn | None:
    return column.type._cached_result_processor(dialect, None)


def _bind_processor(column: Column[Any], dialect: SADialect) -> Fn | None:
    process: Fn | None = column.type._cached_bind_processor(dialect)
    if (
        process is not None
        and dialect.name == "sqlite"
        and _default_sqlite_datetime(column, dialect)
    ):
        return _sqlite_datetime(process)
    return process


def _default_sqlite_datetime(column: Column[Any], dialect: SADialect) -> bool:
    """Does SQLAlchemy store this column's date-times in SQLite's default
    text form (``2021-01-01 00:00:00.000000``, the offset dropped)?"""
    from sqlalchemy.dialects.sqlite import DATETIME

    impl = column.type.dialect_impl(dialect)
    default = DATETIME._storage_format
    return type(impl) is DATETIME and impl._storage_format == default and impl._reg is None


def _sqlite_datetime(process: Fn) -> Fn:
    """SQLAlchemy's SQLite DATETIME bind (``process``), ~15x faster for a
    datetime (a load from PostgreSQL turns every date-time into text)."""

    def bind(value: Any) -> Any:
        if type(value) is dt.datetime:
            return value.isoformat(" ", "microseconds")[:26]
        return process(value)

    return bind


def _then(first: Fn | None, second: Fn | None) -> Fn | None:
    if first is None:
        return second
    if second is None:
        return first
    return lambda v: second(first(v))


class Columns:
    """How a sender's declared columns are written into a local table.

    Per column: ``store`` (the wire value → what this database's driver is
    handed; None: as it is) and ``python`` (the wire value → the Python
    value SQLAlchemy would read; None: the same)."""

    def __init__(self, table: Table, tdef: TableDef, dialect: SADialect) -> None:
        self.same = tdef.form == dialect.name
        self.store: dict[str, Fn | None] = {}
        self.python: dict[str, Fn | None] = {}
        for name in tdef.column_names:
            column = table.c[name]
            tag = tdef.tag(name)
            if tag == ANY or tdef.form is None:
                # Python values already (format 1, or a type without a form)
                self.python[name] = None
                self.store[name] = _bind_processor(column, dialect)
            elif self.same:
                self.python[name] = from_wire(tag)
                self.store[name] = None
            else:
                self.python[name] = from_wire(tag)
                self.store[name] = _then(from_wire(tag), _bind_processor(column, dialect))

    def names(self, tdef: TableDef, op: str) -> Sequence[str]:
        return tdef.pk if op == "D" else tdef.column_names

    def stored(self, batch: RowBatch) -> list[tuple[Any, ...]]:
        """The batch's rows as this database's driver takes them (the
        batch's own rows when nothing is to be converted)."""
        return _converted(batch, [self.store[n] for n in self.names(batch.table, batch.op)])

    def typed(self, batch: RowBatch) -> list[tuple[Any, ...]]:
        """The batch's rows in Python values, as SQLAlchemy reads them (the
        batch's own rows when they are that already)."""
        return _converted(batch, [self.python[n] for n in self.names(batch.table, batch.op)])


def _converted(batch: RowBatch, fns: list[Fn | None]) -> list[tuple[Any, ...]]:
    """``batch``'s rows with ``fns`` applied column by column (NULL kept)."""
    if all(f is None for f in fns):
        return batch.rows
    if batch.columns is None:
        return [
            tuple(v if f is None or v is None else f(v) for f, v in zip(fns, r, strict=True))
            for r in batch.rows
        ]
    columns = [convert(c, f) for c, f in zip(batch.columns, fns, strict=True)]
    return list(zip(*columns, strict=True))
