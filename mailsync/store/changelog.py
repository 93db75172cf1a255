"""The change log: reading the keys the capture triggers wrote.

The triggers (per dialect, :mod:`mailsync.dialects`) append (table, key,
operation, origin) to ``mailsync_changes``, the key as a JSON array. Build,
reload and conflict detection read those keys back in the columns' Python
types and turn them into ``WHERE key IN (...)`` filters; this is the one
place that knows how.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator, Sequence
from decimal import Decimal
from typing import Any

from sqlalchemy import Column, Connection, Date, DateTime, Table, Time, tuple_, type_coerce
from sqlalchemy.types import NullType

from mailsync.dialects.base import SHARED_BIT
from mailsync.dialects.bulk import mark


def coerce_key(values: Sequence[Any], columns: Sequence[Column[Any]]) -> tuple[Any, ...]:
    """Key values from the change log's JSON back to the column's Python type."""
    out = []
    for value, column in zip(values, columns, strict=True):
        if isinstance(value, str):
            ctype = column.type
            if isinstance(ctype, DateTime):
                value = dt.datetime.fromisoformat(value.replace(" ", "T"))
            elif isinstance(ctype, Date):
                value = dt.date.fromisoformat(value)
            elif isinstance(ctype, Time):
                value = dt.time.fromisoformat(value)
        out.append(value)
    return tuple(out)


def logged_key(pk: str, columns: Sequence[Column[Any]]) -> tuple[Any, ...]:
    """A key as the change log holds it (JSON written by the capture
    triggers), in the columns' Python types."""
    return coerce_key(json.loads(pk, parse_float=Decimal), columns)


def key_filter(table: Table, keys: Sequence[tuple[Any, ...]]) -> Any:
    pk = list(table.primary_key.columns)
    if len(pk) == 1:
        return pk[0].in_([k[0] for k in keys])
    return tuple_(*pk).in_(keys)


def stored_key(conn: Connection, pk: str, columns: Sequence[Column[Any]]) -> tuple[Any, ...]:
    """A logged key as the database stores it: SQLite's change log holds
    the stored values; elsewhere the Python values, which the driver binds
    exactly."""
    if conn.dialect.name == "sqlite":
        return tuple(json.loads(pk))
    return logged_key(pk, columns)


def stored_key_filter(table: Table, keys: Sequence[tuple[Any, ...]]) -> Any:
    """``key IN keys`` for keys as the database stores them (bound as they
    are: SQLite's change log holds them so, and a date-time key kept as
    ``2021-01-01 00:00:00`` is found by that text)."""
    pk = [type_coerce(c, NullType()) for c in table.primary_key.columns]
    if len(pk) == 1:
        return pk[0].in_([k[0] for k in keys])
    return tuple_(*pk).in_(keys)


def first_changes(
    conn: Connection,
    table: str,
    after: int,
    upto: int,
    *,
    not_from: str | None,
    batch: int,
    width: int = 0,
) -> Iterator[tuple[str, str, int | None, int | None]]:
    """(key as logged, first operation, changed columns, capture time) per
    key of ``table`` changed in the log after id ``after`` up to ``upto``,
    in log order: local changes, and (``not_from`` given) changes from any
    peer but that one. The changed columns are the union of the key's
    updates' bits over the table's ``width`` columns (None: every column —
    an insert, a delete, a row touched, a change logged before columns
    were); the time is the latest. One statement at driver level, its text
    built once per engine, routing and width."""
    bits = min(width, SHARED_BIT + 1)
    sql = _FIRST_SQL.get((conn.engine.url.drivername, not_from is None, bits))
    if sql is None:
        m = mark(conn)
        routed = "origin IS NULL" if not_from is None else f"(origin IS NULL OR origin <> {m})"
        union = " | ".join(f"max(cols & {1 << i})" for i in range(bits)) or "0"
        sql = (
            "SELECT c.pk, c.op, f.cols, f.at FROM mailsync_changes c JOIN (SELECT min(id) AS "
            f"first, CASE WHEN count(*) > count(NULLIF(cols, 0)) THEN NULL ELSE {union} END "
            f"AS cols, max(at) AS at FROM mailsync_changes WHERE tbl = {m} AND id > {m} "
            f"AND id <= {m} AND {routed} GROUP BY pk) f ON c.id = f.first ORDER BY c.id"
        )
        _FIRST_SQL[conn.engine.url.drivername, not_from is None, bits] = sql
    params: tuple[Any, ...] = (table, after, upto)
    if not_from is not None:
        params += (not_from,)
    result = conn.exec_driver_sql(sql, params, execution_options={"yield_per": batch})
    for pk, op, cols, at in result:
        yield str(pk), str(op), None if cols is None else int(cols), None if at is None else int(at)


#: the text of :func:`first_changes` per driver, routing and width
_FIRST_SQL: dict[tuple[str, bool, int], str] = {}
