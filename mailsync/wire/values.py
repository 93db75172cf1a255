"""Values on the wire: one type tag per column, values in storage form.

Since changeset format 2 a table declaration names, per column, a *tag*
for the kind of value it holds, and the values of a tagged column travel as
msgpack's own types in the **storage form** of the sender's database (the
changeset's header names that database, ``meta["dialect"]``): what its
driver hands out, made msgpack-native by one function per column where it
is not already (PostgreSQL's Decimal and datetimes become text; SQLite's
values are native as stored). So nothing is converted per value on the way
out, and a receiver of the same dialect writes exactly what the sender
stored (SQLite's ``2021-01-01 00:00:00`` stays that text).

A receiver of another dialect turns a column into Python values with
:func:`from_wire` (one function per column) and lets its own column type
store them. Each tag admits a fixed set of msgpack types (:data:`ADMITS`);
:func:`check_column` refuses anything else with a one-line reason, before
a value reaches a database.

``any`` is the tag of a type mailsync has no storage form for, and of
every column of a format-1 changeset: values carry their own type
(msgpack extension types, see :mod:`mailsync.wire.changeset`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any

ANY = "any"
#: tags whose text a receiver parses, and the longest such text it takes
_PARSED = frozenset({"datetime", "date", "time", "decimal"})
MAX_PARSED = 64

#: msgpack types (as decoded) a column of each tag may hold, besides None.
ADMITS: dict[str, frozenset[type]] = {
    "int": frozenset({int}),
    "float": frozenset({float, int}),
    "text": frozenset({str}),
    "bytes": frozenset({bytes}),
    "bool": frozenset({bool, int}),
    "decimal": frozenset({str, int, float}),
    "datetime": frozenset({str}),
    "date": frozenset({str}),
    "time": frozenset({str}),
}
TAGS = frozenset(ADMITS) | {ANY}


def wrong_values(tag: str, column: Sequence[Any]) -> str | None:
    """Why ``column`` (one column of a batch) does not fit ``tag``, or None."""
    if tag == ANY:
        return None
    admitted = ADMITS[tag]
    kinds = set(map(type, column))
    kinds.discard(type(None))
    if kinds <= admitted:
        if tag in _PARSED and str in kinds:
            if kinds == {str}:  # NULLs aside (filtered out with empty texts)
                longest = max(map(len, filter(None, column)), default=0)
            else:
                longest = max((len(v) for v in column if type(v) is str), default=0)
            if longest > MAX_PARSED:
                return f"a {tag} value of {longest:,} characters"
        return None
    bad = sorted(k.__name__ for k in kinds - admitted)
    return f"a value of type {', '.join(bad)} in a {tag} column"


def _decimal(value: Any) -> Decimal:
    if isinstance(value, float):
        return Decimal(repr(value))
    return Decimal(value)


def _datetime(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value)


def _date(value: str) -> dt.date:
    if len(value) > 10:  # SQLite may hold a date column's value as a date-time text
        return dt.datetime.fromisoformat(value).date()
    return dt.date.fromisoformat(value)


def _time(value: str) -> dt.time:
    return dt.time.fromisoformat(value)


#: storage form → the Python value a SQLAlchemy type takes, per tag
_PYTHON: dict[str, Callable[[Any], Any]] = {
    "bool": bool,
    "decimal": _decimal,
    "datetime": _datetime,
    "date": _date,
    "time": _time,
}


def from_wire(tag: str) -> Callable[[Any], Any] | None:
    """The function turning a non-NULL wire value of ``tag`` into the Python
    value a SQLAlchemy column type takes (None: the wire value is one)."""
    return _PYTHON.get(tag)


def _iso(value: Any) -> Any:
    return value.isoformat() if isinstance(value, dt.date | dt.time) else value


def _text(value: Any) -> Any:
    return str(value) if isinstance(value, Decimal) else value


def _bytes(value: Any) -> Any:
    return bytes(value) if isinstance(value, memoryview | bytearray) else value


#: a driver's Python value → msgpack-native storage form, per tag (where needed)
_NATIVE: dict[str, Callable[[Any], Any]] = {
    "decimal": _text,
    "datetime": _iso,
    "date": _iso,
    "time": _iso,
    "bytes": _bytes,
}


def to_wire(tag: str) -> Callable[[Any], Any] | None:
    """The function making a driver's non-NULL value of a ``tag`` column
    msgpack-native (None: it is already); it leaves a value of another
    type alone (:func:`wrong_values` tells the writer)."""
    return _NATIVE.get(tag)


def convert(column: list[Any], fn: Callable[[Any], Any] | None) -> list[Any]:
    """``fn`` over a column, NULL kept."""
    if fn is None:
        return column
    return [None if v is None else fn(v) for v in column]
