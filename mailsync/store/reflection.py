"""The application's tables as the database has them, reflected and cached.

Reflection costs a dozen catalog queries per table, and a cycle looks at
every synced table several times: over half a small cycle went there. So a
reflected table is kept per engine and reused while a cheap fingerprint of
the schema is unchanged (SQLite's schema_version; on PostgreSQL the catalog
rows' row versions of the table, its columns, defaults and constraints).
"""

from __future__ import annotations

import weakref
from typing import Any

from sqlalchemy import Connection, Engine, MetaData, Table, inspect
from sqlalchemy.exc import NoSuchTableError

from mailsync.dialects import dialect_for
from mailsync.errors import SchemaError
from mailsync.store.engine import redact


def table_names(conn: Connection) -> list[str]:
    """The application's tables (mailsync's own excluded)."""
    return sorted(n for n in inspect(conn).get_table_names() if not n.startswith("mailsync_"))


_reflected: weakref.WeakKeyDictionary[Engine, dict[str, tuple[Any, Table]]] = (
    weakref.WeakKeyDictionary()
)


def reflect(conn: Connection, name: str) -> Table:
    """A table as the database has it; SchemaError if missing or keyless.

    The same :class:`Table` is returned while the schema is unchanged:
    callers must not alter it. Within one transaction the fingerprint is
    asked once per table (a build asked it a dozen times): only mailsync's
    own DDL could change a table under its transaction, and it alters no
    columns."""
    tables = _memo(conn).tables
    if name in tables:
        return tables[name]
    table = _cached(conn, name)
    tables[name] = table
    return table


class _Memo:
    """What one transaction learnt of the schema: fingerprints and tables."""

    def __init__(self, tx: Any) -> None:
        self.tx = tx
        self.marks: dict[str, Any] = {}
        self.tables: dict[str, Table] = {}


#: ``Connection.info`` key of the current transaction's :class:`_Memo`
_MEMO = "mailsync.reflected"


def _memo(conn: Connection) -> _Memo:
    tx = conn.get_transaction()
    memo: _Memo | None = conn.info.get(_MEMO)
    if memo is None or tx is None or memo.tx is not tx:
        memo = _Memo(tx)
        if tx is not None:
            conn.info[_MEMO] = memo
    return memo


def forget(conn: Connection) -> None:
    """mailsync altered a table in this transaction (a column the host
    added): what the transaction learnt of the schema is asked again."""
    conn.info.pop(_MEMO, None)


def fingerprint(conn: Connection, name: str) -> Any:
    """The dialect's schema fingerprint for ``name``, asked once per
    transaction (once for all tables where it covers the whole database)."""
    dialect = dialect_for(conn)
    key = "" if dialect.fingerprint_per_database else name
    marks = _memo(conn).marks
    if key not in marks:
        marks[key] = dialect.schema_fingerprint(conn, name)
    return marks[key]


def _cached(conn: Connection, name: str) -> Table:
    mark = fingerprint(conn, name)
    if mark is not None:
        held = _reflected.get(conn.engine, {}).get(name)
        if held is not None and held[0] == mark:
            return held[1]
    table = _reflect(conn, name)
    if mark is not None:
        _reflected.setdefault(conn.engine, {})[name] = (mark, table)
    return table


def _other_case(conn: Connection, name: str) -> str | None:
    """The table whose name differs from ``name`` only in case, if any (on
    SQLite such a name half-works: columns found, key not)."""
    found = [n for n in inspect(conn).get_table_names() if n.lower() == name.lower()]
    return found[0] if found and found[0] != name else None


def _reflect(conn: Connection, name: str) -> Table:
    try:
        table = Table(name, MetaData(), autoload_with=conn)
    except NoSuchTableError:
        near = _other_case(conn, name)
        raise SchemaError(
            f"table {name!r} does not exist in {redact(conn.engine)}"
            + (f" (did you mean {near!r}?)" if near else ""),
            hint="create the application schema first, or check the name",
        ) from None
    if not table.primary_key.columns and (near := _other_case(conn, name)) is not None:
        raise SchemaError(
            f"table {name!r} is called {near!r} in {redact(conn.engine)}: give its name "
            "as the database has it"
        )
    if not table.primary_key.columns:
        raise SchemaError(
            f"table {name!r} in {redact(conn.engine)} has no primary key; "
            "mailsync needs one to tell rows apart",
            hint="add a primary key (an integer from a number range, or a UUID)",
        )
    dialect_for(conn).adapt_table(table)
    return table


def dependency_order(conn: Connection, names: list[str]) -> list[str]:
    """``names`` ordered parents before children (by foreign keys), else in
    the given order; tables in a cycle of foreign keys come last."""
    wanted = set(names)
    parents = {
        name: {fk.referred_table.name for fk in reflect(conn, name).foreign_key_constraints}
        & wanted - {name}
        for name in names
    }
    order: list[str] = []
    remaining = list(names)
    while True:
        ready = [n for n in remaining if parents[n] <= set(order)]
        if not ready:
            return order + remaining
        for name in ready:
            order.append(name)
            remaining.remove(name)
