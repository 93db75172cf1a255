"""Opening the application database and looking at its tables.

mailsync reaches any database through SQLAlchemy; what differs per database
(trigger DDL, upsert, the "applying from peer X" flag) lives in
:mod:`mailsync.dialects`. Errors from the driver are turned into one-line
:class:`~mailsync.errors.DatabaseError` messages that name the database.
"""

from __future__ import annotations

import weakref
from typing import Any

from sqlalchemy import Connection, Engine, MetaData, Table, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, NoSuchTableError, SQLAlchemyError

from mailsync.errors import ConfigError, DatabaseError, SchemaError

#: How long a SQLite connection waits for another writer before giving up.
SQLITE_BUSY_TIMEOUT_S = 30.0


def redact(engine_or_url: Engine | str) -> str:
    """The database URL with any password hidden, for messages and logs."""
    url = engine_or_url.url if isinstance(engine_or_url, Engine) else make_url(engine_or_url)
    return url.render_as_string(hide_password=True)


def open_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets real transactions (``BEGIN IMMEDIATE``).

    pysqlite's default transaction handling runs SELECTs outside any
    transaction, so a changeset built from several reads would not see one
    consistent snapshot; the driver is put in autocommit mode and mailsync
    emits ``BEGIN IMMEDIATE`` itself, which also takes the write lock up
    front instead of failing on a lock upgrade.
    """
    try:
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite":
            engine = create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})

            @event.listens_for(engine, "connect")
            def _connect(dbapi_conn: Any, _record: Any) -> None:
                dbapi_conn.isolation_level = None

            @event.listens_for(engine, "begin")
            def _begin(conn: Connection) -> None:
                conn.exec_driver_sql("BEGIN IMMEDIATE")

            return engine
        return create_engine(parsed, pool_pre_ping=True)
    except (ArgumentError, ValueError) as exc:
        raise ConfigError(f"database URL {url!r} is not valid: {exc}") from exc
    except NoSuchModuleError as exc:
        raise ConfigError(f"database URL {redact(url)}: no driver for it ({exc})") from exc
    except ImportError as exc:
        raise ConfigError(
            f"database URL {redact(url)}: its driver is not installed ({exc.name})",
            hint="for PostgreSQL: pip install 'mailsync[postgresql]'",
        ) from exc


def describe_db_error(engine: Engine, exc: BaseException, doing: str) -> DatabaseError:
    """A one-line DatabaseError for a driver error, naming the database."""
    detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    first = detail[0] if detail else type(exc).__name__
    return DatabaseError(f"{redact(engine)}: {doing}: {first}")


def check_connection(engine: Engine) -> None:
    """Open and close one connection, so a bad URL fails early and clearly."""
    try:
        with engine.connect():
            pass
    except SQLAlchemyError as exc:
        raise describe_db_error(engine, exc, "cannot open the database") from exc


def table_names(conn: Connection) -> list[str]:
    """The application's tables (mailsync's own excluded)."""
    return sorted(n for n in inspect(conn).get_table_names() if not n.startswith("mailsync_"))


# Reflection costs a dozen catalog queries per table, and a cycle looks at
# every synced table several times: over half a small cycle went there. So a
# reflected table is kept per engine and reused while a cheap fingerprint of
# the schema is unchanged (SQLite's schema_version; on PostgreSQL the catalog
# rows' row versions of the table, its columns, defaults and constraints).
_reflected: weakref.WeakKeyDictionary[Engine, dict[str, tuple[Any, Table]]] = (
    weakref.WeakKeyDictionary()
)

_PG_FINGERPRINT = """
SELECT c.oid::bigint, c.xmin::text,
  (SELECT string_agg(a.attnum::text || ':' || a.xmin::text, ',' ORDER BY a.attnum)
     FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0),
  (SELECT string_agg(d.oid::text || ':' || d.xmin::text, ',' ORDER BY d.oid)
     FROM pg_attrdef d WHERE d.adrelid = c.oid),
  (SELECT string_agg(x.oid::text || ':' || x.xmin::text, ',' ORDER BY x.oid)
     FROM pg_constraint x WHERE x.conrelid = c.oid)
FROM pg_class c WHERE c.oid = to_regclass(:t)
"""


def _fingerprint(conn: Connection, name: str) -> Any:
    """Something that changes whenever table ``name`` might have; None when
    there is no cheap way to tell (no caching then)."""
    dialect = conn.dialect.name
    if dialect == "sqlite":
        return conn.exec_driver_sql("PRAGMA schema_version").scalar()
    if dialect == "postgresql":
        quoted = conn.dialect.identifier_preparer.quote(name)
        row = conn.execute(text(_PG_FINGERPRINT), {"t": quoted}).first()
        return tuple(row) if row is not None else None
    return None


def reflect(conn: Connection, name: str) -> Table:
    """A table as the database has it; SchemaError if missing or keyless.

    The same :class:`Table` is returned while the schema is unchanged:
    callers must not alter it."""
    mark = _fingerprint(conn, name)
    if mark is not None:
        held = _reflected.get(conn.engine, {}).get(name)
        if held is not None and held[0] == mark:
            return held[1]
    table = _reflect(conn, name)
    if mark is not None:
        _reflected.setdefault(conn.engine, {})[name] = (mark, table)
    return table


def _reflect(conn: Connection, name: str) -> Table:
    from mailsync.dialects import dialect_for

    try:
        table = Table(name, MetaData(), autoload_with=conn)
    except NoSuchTableError:
        raise SchemaError(
            f"table {name!r} does not exist in {redact(conn.engine)}",
            hint="create the application schema first, or check the name",
        ) from None
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
