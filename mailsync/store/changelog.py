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
) -> Iterator[tuple[str, str]]:
    """(key as logged, first operation) per key of ``table`` changed in the
    log after id ``after`` up to ``upto``, in log order: local changes, and
    (``not_from`` given) changes from any peer but that one. One statement
    at driver level, its text built once per engine and routing."""
    sql = _FIRST_SQL.get((conn.engine.url.drivername, not_from is None))
    if sql is None:
        m = mark(conn)
        routed = "origin IS NULL" if not_from is None else f"(origin IS NULL OR origin <> {m})"
        sql = (
            "SELECT c.pk, c.op FROM mailsync_changes c JOIN (SELECT min(id) AS first "
            f"FROM mailsync_changes WHERE tbl = {m} AND id > {m} AND id <= {m} AND {routed} "
            "GROUP BY pk) f ON c.id = f.first ORDER BY c.id"
        )
        _FIRST_SQL[conn.engine.url.drivername, not_from is None] = sql
    params: tuple[Any, ...] = (table, after, upto)
    if not_from is not None:
        params += (not_from,)
    result = conn.exec_driver_sql(sql, params, execution_options={"yield_per": batch})
    for pk, op in result:
        yield str(pk), str(op)


#: the text of :func:`first_changes` per driver and routing
_FIRST_SQL: dict[tuple[str, bool], str] = {}
