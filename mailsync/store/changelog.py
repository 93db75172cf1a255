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
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from sqlalchemy import Column, Date, DateTime, Table, Time, tuple_


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
