"""Rows written at driver level: one statement text per table, executemany
of tuples, COPY on PostgreSQL.

SQLAlchemy Core costs ~0.4 ms per statement and more per row (a dict per
row, bind processing) than the database's own insert (PERF-FACTS); here a
batch of rows already in the driver's form (:mod:`mailsync.storage`) goes
to the DBAPI cursor as tuples. Statement texts are built once per engine
and table (:func:`statements`). Both dialects share the SQL
(``INSERT ... ON CONFLICT (key) DO UPDATE``) and differ in parameter marks
and in how an empty table is loaded: SQLite by ``executemany`` of a plain
INSERT, PostgreSQL by ``COPY``.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, Table
from sqlalchemy.exc import DBAPIError


@dataclass(frozen=True)
class Statements:
    """The driver-level SQL for one table and one list of columns."""

    dialect: str
    #: a plain insert of every column, in order
    insert: str
    #: insert, or replace the row with the same key
    upsert: str
    #: the non-key columns set by key: parameters are the row, non-key
    #: values first, then the key (see :meth:`update_params`); None when
    #: every column is in the key
    update: str | None
    #: by key, in key order
    delete: str
    #: PostgreSQL: ``COPY t (columns) FROM STDIN``
    copy: str | None
    #: positions of the non-key columns, then of the key, in a row
    order: tuple[int, ...]

    def update_params(self, rows: Sequence[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        order = self.order
        return [tuple(row[i] for i in order) for row in rows]


_cache: weakref.WeakKeyDictionary[Engine, dict[tuple[str, tuple[str, ...]], Statements]] = (
    weakref.WeakKeyDictionary()
)


def statements(conn: Connection, table: Table, names: Sequence[str]) -> Statements:
    """The statements of ``table`` for rows of ``names`` (cached per engine)."""
    per_engine = _cache.setdefault(conn.engine, {})
    key = (table.name, tuple(names))
    found = per_engine.get(key)
    if found is None:
        found = per_engine[key] = _build(conn, table, list(names))
    return found


def _build(conn: Connection, table: Table, names: list[str]) -> Statements:
    dialect = conn.dialect.name
    prep = conn.dialect.identifier_preparer

    def q(name: str) -> str:
        quoted = prep.quote(name)
        return quoted.replace("%", "%%") if dialect != "sqlite" else quoted

    m = mark(conn)
    pk = [c.name for c in table.primary_key.columns]
    others = [n for n in names if n not in pk]
    tq = q(table.name)
    cols = ", ".join(q(n) for n in names)
    marks = ", ".join([m] * len(names))
    insert = f"INSERT INTO {tq} ({cols}) VALUES ({marks})"
    if others:
        sets = ", ".join(f"{q(n)} = excluded.{q(n)}" for n in others)
        upsert = f"{insert} ON CONFLICT ({', '.join(q(k) for k in pk)}) DO UPDATE SET {sets}"
    else:
        upsert = f"{insert} ON CONFLICT ({', '.join(q(k) for k in pk)}) DO NOTHING"
    by_key = " AND ".join(f"{q(k)} = {m}" for k in pk)
    update = None
    if others and all(k in names for k in pk):
        update = f"UPDATE {tq} SET {', '.join(f'{q(n)} = {m}' for n in others)} WHERE {by_key}"
    order = tuple([names.index(n) for n in others] + [names.index(k) for k in pk if k in names])
    copy = None
    if dialect == "postgresql":
        plain = ", ".join(prep.quote(n) for n in names)
        copy = f"COPY {prep.quote(table.name)} ({plain}) FROM STDIN"
    return Statements(
        dialect=dialect,
        insert=insert,
        upsert=upsert,
        update=update,
        delete=f"DELETE FROM {tq} WHERE {by_key}",
        copy=copy,
        order=order,
    )


def mark(conn: Connection) -> str:
    """The driver's parameter mark (``?`` for sqlite3, ``%s`` for psycopg)."""
    return "?" if conn.dialect.name == "sqlite" else "%s"


def run(conn: Connection, sql: str, rows: Sequence[tuple[Any, ...]]) -> None:
    """``executemany`` of ``rows`` on the driver's cursor."""
    if rows:
        conn.exec_driver_sql(sql, list(rows))


def load(conn: Connection, stmts: Statements, rows: Sequence[tuple[Any, ...]]) -> None:
    """Insert ``rows`` into a table that holds none of their keys: COPY on
    PostgreSQL, a plain INSERT elsewhere."""
    if not rows:
        return
    if stmts.copy is None:
        run(conn, stmts.insert, rows)
        return
    dbapi = conn.dialect.loaded_dbapi
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        with cursor.copy(stmts.copy) as copy:
            for row in rows:
                copy.write_row(row)
    except dbapi.Error as exc:  # as SQLAlchemy says it for a statement it ran
        raise DBAPIError.instance(stmts.copy, None, exc, dbapi.Error, dialect=conn.dialect) from exc
    finally:
        cursor.close()


def read_as_text(conn: Connection) -> None:
    """Dates read as text (:func:`mailsync.storage.raw_select_columns`) come
    in ISO form in this transaction, whatever the server's default."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SET LOCAL datestyle TO 'ISO, YMD'")


def is_empty(conn: Connection, table: Table) -> bool:
    """Does ``table`` hold no row at all?"""
    quoted = conn.dialect.identifier_preparer.quote(table.name)
    if conn.dialect.name != "sqlite":
        quoted = quoted.replace("%", "%%")
    found = conn.exec_driver_sql(f"SELECT 1 FROM {quoted} LIMIT 1").first()
    return found is None
