"""What "rows changed since a date" means on the host (``reload --since``).

mailsync's change log records *what* changed (table, key, operation,
origin), not *when*, and it forgets an entry once every station has
acknowledged it; so it cannot say which rows changed after a date. The one
source that can is the table itself: a timestamp column the application
keeps (``updated_at``, ``modified_at`` …). The rule:

- ``--since DATE`` resends the rows in the station's scope (its row filter)
  whose timestamp column is at or after DATE: the column named with
  ``--column``, else the table's one column called one of
  :data:`TIMESTAMP_NAMES`; a table with neither is refused, naming it (use
  ``--full``, or name the column).
- Rows deleted since DATE are not covered (there is no row left to read a
  time from); ``--full`` replaces the station's copy, deletes included.
- A row whose timestamp is NULL counts as not changed.

A DATE is ``YYYY-MM-DD`` (midnight UTC) or an ISO 8601 date and time
(``2026-11-02T14:30``, with or without a zone; without one, UTC).
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Column, Date, DateTime, Table

from mailsync.errors import ConfigError, RuleError

#: Column names taken as a table's "last changed" time when none is named.
TIMESTAMP_NAMES = (
    "updated_at",
    "modified_at",
    "changed_at",
    "last_modified",
    "last_changed",
    "updated",
    "modified",
    "changed",
    "touched",
    "mtime",
)


def parse_since(value: str, what: str = "--since") -> dt.datetime:
    """``2026-11-02`` or ``2026-11-02T14:30[+01:00]`` → an aware datetime
    (UTC where no zone is given). ConfigError for anything else, or a date
    in the future (nothing changed after it: surely a typo)."""
    text = value.strip()
    try:
        if len(text) == 10:
            moment = dt.datetime.combine(dt.date.fromisoformat(text), dt.time(), dt.UTC)
        else:
            moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"{what} {value!r} is not a date",
            hint="give YYYY-MM-DD or YYYY-MM-DDTHH:MM (UTC unless a zone follows)",
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    if moment > dt.datetime.now(dt.UTC):
        raise ConfigError(f"{what} {value!r} is in the future: no row changed since")
    return moment


def timestamp_column(table: Table, named: str | None = None) -> str:
    """The column that says when a row of ``table`` last changed: ``named``
    (checked: it exists and holds dates or times), else the one named as in
    :data:`TIMESTAMP_NAMES`. RuleError naming the table when there is none."""
    if named is not None:
        column = table.columns.get(named)
        if column is None:
            raise RuleError(f"table {table.name!r} has no column {named!r}")
        if not _is_time(column):
            raise RuleError(
                f"column {table.name}.{named} holds {column.type}, not a date or time: "
                "it cannot tell which rows changed since a date"
            )
        return named
    for name in TIMESTAMP_NAMES:
        column = table.columns.get(name)
        if column is not None and _is_time(column):
            return name
    raise RuleError(
        f"table {table.name!r} has no timestamp column to tell which rows changed since a date "
        "(mailsync's change log keeps no time)",
        hint="name one with --column, or send the table in full with --full",
    )


def _is_time(column: Column[object]) -> bool:
    return isinstance(column.type, DateTime | Date)


def bound(table: Table, column: str, since: dt.datetime) -> object:
    """The value compared with the column: a naive UTC time for a column
    without a zone (what applications store there), the date for a DATE."""
    kind = table.c[column].type
    if isinstance(kind, DateTime) and not kind.timezone:
        return since.astimezone(dt.UTC).replace(tzinfo=None)
    if isinstance(kind, Date) and not isinstance(kind, DateTime):
        return since.astimezone(dt.UTC).date()
    return since
