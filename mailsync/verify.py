"""Do two nodes hold the same rows? Digests over key spans, narrowed to keys.

``mailsync verify`` (issue 18, item 1) compares a table's rows in scope of a
station's rules on the host and on the station without moving the table:
each side hashes its rows over the same key spans, and only spans whose
digests differ are looked at again, split finer, until a span is small
enough to compare row by row and the differing keys are named. This module
is that comparison, for one side at a time — what one side computes from
what the other sent — so that it can travel in sealed messages (one round
per message) or run between two connections (:func:`compare`).

Agreement across dialects rests on three choices:

- **Order.** Rows are read in key order, text keys in byte order
  (PostgreSQL ``COLLATE "C"``; SQLite's default BINARY is the same), so a
  PostgreSQL host and a SQLite station cut their rows at the same keys.
- **Values.** A row is hashed from the values its side's SQLAlchemy types
  give, in a canonical form (:func:`canonical`): ``1.50`` and ``1.5`` are
  one amount, a time zone-aware time is taken in UTC, ``True`` is ``1``.
  What a receiver of the other dialect would store compares equal.
- **Spans.** The side that plans (the host) cuts a span at keys it holds,
  each boundary travelling as canonical values; the other side reads the
  same ``[lo, hi)`` ranges with SQL row-value comparisons.

Memory is bounded by the number of spans of one round, never by the table:
rows stream through ``yield_per``.
"""

from __future__ import annotations

import datetime as dt
import decimal
import hashlib
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    String,
    Table,
    and_,
    func,
    literal,
    select,
    tuple_,
)
from sqlalchemy.sql.elements import TextClause

from mailsync.errors import SchemaError
from mailsync.store.reflection import reflect

#: a span this small (rows on the planning side) is compared row by row
LEAF_ROWS = 64
#: how many spans a differing span is cut into in the next round
FAN_OUT = 16
BATCH = 2000

Key = tuple[Any, ...]


def _decimal(value: decimal.Decimal) -> str:
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "0") else text


def _datetime(value: dt.datetime) -> str:
    if value.tzinfo is not None:
        value = value.astimezone(dt.UTC).replace(tzinfo=None)
    return value.isoformat(sep=" ")


#: per type, its canonical ``{tag: text}``: the tag and how the text is made
_TAGGED: dict[type, tuple[str, Any]] = {
    float: ("f", repr),
    dt.datetime: ("t", _datetime),
    dt.date: ("d", dt.date.isoformat),
    dt.time: ("h", lambda v: v.replace(tzinfo=None).isoformat()),
    bytes: ("b", bytes.hex),
}


def canonical(value: Any) -> Any:
    """A value as both dialects' types agree on it (JSON-able)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, decimal.Decimal):
        return {"n": _decimal(value)} if value.is_finite() else str(value)
    for kind, (tag, text) in _TAGGED.items():
        if isinstance(value, kind):
            return {tag: text(value)}
    if isinstance(value, bytearray | memoryview):
        return {"b": bytes(value).hex()}
    if isinstance(value, uuid.UUID):
        return str(value)
    return {"s": str(value)}


def key_value(value: Any) -> Any:
    """A canonical value as a key holds it: hashable (a ``{tag: text}``
    map becomes a ``(tag, text)`` pair; a key travels so)."""
    if isinstance(value, dict):
        ((tag, text),) = value.items()
        return (tag, text)
    return value


def _text(value: str) -> str:
    return f"s{len(value)}:{value}"


def _number(value: int) -> str:
    return f"i{int(value)}"


def _amount(value: decimal.Decimal) -> str:
    if not value.is_finite():
        return _text(str(value))
    text = _decimal(value)
    return f"n{len(text)}:{text}"


def _tagger(tag: str, make: Any) -> Any:
    def encode(value: Any) -> str:
        text = make(value)
        return f"{tag}{len(text)}:{text}"

    return encode


#: the encodings of the common types, looked up by type (no isinstance
#: chain per value: a verification hashes every row of a table); each is
#: :func:`canonical`'s form as text
_PLAIN: dict[type, Any] = {
    type(None): lambda _: "N",
    str: _text,
    int: _number,
    bool: _number,
    decimal.Decimal: _amount,
    **{kind: _tagger(tag, make) for kind, (tag, make) in _TAGGED.items()},
}


def _encoded(value: Any) -> str:
    """One value's canonical form as unambiguous text (lengths before texts)."""
    plain = _PLAIN.get(type(value))
    if plain is not None:
        return str(plain(value))
    form = canonical(value)
    if isinstance(form, dict):
        ((tag, text),) = form.items()
        return f"{tag}{len(text)}:{text}"
    return str(_PLAIN[type(form)](form))


def row_hash(values: Sequence[Any]) -> bytes:
    """A row's hash from its values' canonical forms: equal values give
    equal hashes on every dialect."""
    encoded = "\x1f".join(map(_encoded, values))
    return hashlib.sha256(encoded.encode("utf-8", "surrogatepass")).digest()


@dataclass(frozen=True)
class Span:
    """Keys from ``lo`` (inclusive; None: the first) to ``hi`` (exclusive;
    None: past the last), as canonical values."""

    lo: Key | None = None
    hi: Key | None = None


@dataclass(frozen=True)
class Digest:
    """One side's rows in a span: how many, and their combined hash."""

    span: Span
    rows: int
    digest: str


@dataclass(frozen=True)
class Difference:
    """A key whose row differs: ``here`` / ``there`` say which side has it."""

    key: Key
    here: bool
    there: bool


class Side:
    """One node's rows of one table in scope, read for a comparison."""

    def __init__(self, conn: Connection, table: str, where: TextClause | None = None) -> None:
        self.conn = conn
        self.table: Table = reflect(conn, table)
        self.pk = list(self.table.primary_key.columns)
        if not self.pk:
            raise SchemaError(f"table {table} has no primary key: it cannot be verified")
        self.where = where
        pg = conn.dialect.name == "postgresql"
        self._order: list[ColumnElement[Any]] = [
            c.collate("C") if pg and isinstance(c.type, String) else c for c in self.pk
        ]
        self._key_types = [c.type.python_type if _has_python_type(c) else None for c in self.pk]

    # ---------------------------------------------------------------- reading

    def _bounded(self, span: Span) -> list[ColumnElement[bool]]:
        out: list[ColumnElement[bool]] = []
        if self.where is not None:
            out.append(self.where)  # type: ignore[arg-type]
        if span.lo is not None:
            out.append(tuple_(*self._order) >= tuple_(*self._values(span.lo)))
        if span.hi is not None:
            out.append(tuple_(*self._order) < tuple_(*self._values(span.hi)))
        return out

    def _values(self, key: Key) -> list[Any]:
        """A canonical key back in the column types' Python values."""
        out = []
        for column, kind, value in zip(self.pk, self._key_types, key, strict=True):
            out.append(literal(from_canonical(value, kind), type_=column.type))
        return out

    def python_key(self, key: Key) -> tuple[Any, ...]:
        """A canonical key in the key columns' Python values."""
        return tuple(from_canonical(v, kind) for kind, v in zip(self._key_types, key, strict=True))

    def _rows(self, span: Span) -> Iterator[tuple[Key, bytes]]:
        query = (
            select(*self.table.columns)
            .where(and_(True, *self._bounded(span)))
            .order_by(*self._order)
        )
        at = [list(self.table.columns).index(c) for c in self.pk]
        result = self.conn.execute(query, execution_options={"yield_per": BATCH})
        for row in result:
            key = tuple(key_value(canonical(row[i])) for i in at)
            yield key, row_hash(tuple(row))

    def count(self, span: Span) -> int:
        query = select(func.count()).select_from(self.table).where(and_(True, *self._bounded(span)))
        return int(self.conn.execute(query).scalar() or 0)

    # ------------------------------------------------------------- the rounds

    def plan(self, span: Span, parts: int = FAN_OUT) -> list[Digest]:
        """Cut ``span`` into up to ``parts`` spans of about equal rows, at
        keys this side holds, with this side's digest of each."""
        total = self.count(span)
        size = max(1, -(-total // parts))
        out: list[Digest] = []
        lo, rows, digest = span.lo, 0, hashlib.sha256()
        for key, hashed in self._rows(span):
            if rows == size:
                out.append(Digest(Span(lo, key), rows, digest.hexdigest()[:32]))
                lo, rows, digest = key, 0, hashlib.sha256()
            rows += 1
            digest.update(hashed)
        out.append(Digest(Span(lo, span.hi), rows, digest.hexdigest()[:32]))
        return out

    def digests(self, spans: Sequence[Span]) -> list[Digest]:
        """This side's digest of each of ``spans`` (consecutive, as
        :meth:`plan` cuts them), in one pass over their rows."""
        if not spans:
            return []
        whole = Span(spans[0].lo, spans[-1].hi)
        out: list[Digest] = []
        index, rows, digest = 0, 0, hashlib.sha256()
        for key, hashed in self._rows(whole):
            while (
                index < len(spans) - 1
                and (hi := spans[index].hi) is not None
                and not _before(key, hi)
            ):
                out.append(Digest(spans[index], rows, digest.hexdigest()[:32]))
                index, rows, digest = index + 1, 0, hashlib.sha256()
            rows += 1
            digest.update(hashed)
        out.append(Digest(spans[index], rows, digest.hexdigest()[:32]))
        for rest in spans[index + 1 :]:
            out.append(Digest(rest, 0, hashlib.sha256().hexdigest()[:32]))
        return out

    def row_hashes(self, span: Span) -> dict[Key, str]:
        """Per key in ``span``, its row's hash (a leaf span: few rows)."""
        return {key: hashed.hex()[:32] for key, hashed in self._rows(span)}


def _has_python_type(column: Any) -> bool:
    try:
        column.type.python_type  # noqa: B018 - raises where the type has none
    except NotImplementedError:
        return False
    return True


def _tagged(value: Any) -> tuple[str, str] | None:
    """A canonical ``{tag: text}`` (or a key's ``(tag, text)``) apart."""
    if isinstance(value, dict):
        ((tag, text),) = value.items()
        return str(tag), str(text)
    if isinstance(value, tuple | list):
        return str(value[0]), str(value[1])
    return None


def from_canonical(value: Any, kind: type | None) -> Any:
    """A canonical key value back in its column's Python type."""
    tagged = _tagged(value)
    if tagged is not None:
        tag, text = tagged
        if tag == "n":
            return decimal.Decimal(text)
        if tag == "f":
            return float(text)
        if tag == "t":
            return dt.datetime.fromisoformat(text)
        if tag == "d":
            return dt.date.fromisoformat(text)
        if tag == "h":
            return dt.time.fromisoformat(text)
        if tag == "b":
            return bytes.fromhex(text)
        return text
    if kind is uuid.UUID and isinstance(value, str):
        return uuid.UUID(value)
    return value


def _sort_key(value: Any) -> Any:
    """Python's order of canonical key values, as the databases order them
    (text in code-point order = UTF-8 byte order; numbers numerically)."""
    tagged = _tagged(value)
    if tagged is not None:
        tag, text = tagged
        if tag == "n":
            return decimal.Decimal(text)
        if tag == "f":
            return float(text)
        return text
    return value


def _order(key: Key) -> tuple[Any, ...]:
    return tuple(_sort_key(v) for v in key)


def key_order(key: Key) -> tuple[Any, ...]:
    """A key's place in the order both databases read rows in."""
    return _order(key)


def _before(key: Key, bound: Key) -> bool:
    return _order(key) < _order(bound)


def name_keys(mine: dict[Key, str], theirs: dict[Key, str]) -> list[Difference]:
    """The keys of a leaf span whose rows differ, and who has them."""
    out = []
    for key in sorted(set(mine) | set(theirs), key=_order):
        if mine.get(key) != theirs.get(key):
            out.append(Difference(key, key in mine, key in theirs))
    return out


def compare(here: Side, there: Side, *, leaf: int = LEAF_ROWS) -> list[Difference]:
    """Every key whose row differs between two sides, by rounds of digests,
    as the mail exchange does it: the side with more rows in a span cuts it
    (a side that holds few rows there cannot), the other answers with its
    digests of the same spans; a span with at most ``leaf`` rows on both
    sides is compared row by row."""
    differences: list[Difference] = []
    todo = [(Span(), here.count(Span()), there.count(Span()))]
    while todo:
        span, mine, theirs = todo.pop()
        if max(mine, theirs) <= leaf:
            differences += name_keys(here.row_hashes(span), there.row_hashes(span))
            continue
        planner, other = (here, there) if mine >= theirs else (there, here)
        planned = planner.plan(span)
        answered = other.digests([d.span for d in planned])
        for a, b in zip(planned, answered, strict=True):
            if (a.rows, a.digest) != (b.rows, b.digest):
                rows = (a.rows, b.rows) if planner is here else (b.rows, a.rows)
                todo.append((a.span, *rows))
    return sorted(differences, key=lambda d: _order(d.key))
