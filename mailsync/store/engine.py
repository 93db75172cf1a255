"""Opening the application database and wording its errors.

mailsync reaches any database through SQLAlchemy; what differs per database
(trigger DDL, upsert, the "applying from peer X" flag) lives in
:mod:`mailsync.dialects`. Errors from the driver are turned into one-line
:class:`~mailsync.errors.DatabaseError` messages that name the database.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

from mailsync.errors import ConfigError, DatabaseError, first_line

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

            @event.listens_for(engine, "do_connect")
            def _owner_only(
                _dialect: Any, _record: Any, cargs: list[Any], cparams: dict[str, Any]
            ) -> None:
                _create_owner_only(cargs, cparams)

            @event.listens_for(engine, "connect")
            def _connect(dbapi_conn: Any, _record: Any) -> None:
                dbapi_conn.isolation_level = None
                _write_ahead(dbapi_conn)

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


def _write_ahead(dbapi_conn: Any) -> None:
    """WAL, with every commit synced (``synchronous = FULL``).

    A commit with a rollback journal cost 2.6 ms here (22 ms p90), in WAL
    a third of one: most of an idle cycle. FULL, not NORMAL, because the
    cycle acts on a commit outside the database at once — it deletes the
    mail it buffered, it acks what it applied — and a commit NORMAL lets a
    power cut take back would lose what the peer then forgets. The mode
    stays with the file (the application sees WAL too, which needs every
    process on one machine — as SQLite always did). A database another
    process holds locked keeps its mode; mailsync works in either."""
    # locked by another process just now: the next connection tries again
    with contextlib.suppress(sqlite3.OperationalError):
        dbapi_conn.execute("PRAGMA journal_mode = WAL")
    dbapi_conn.execute("PRAGMA synchronous = FULL")


def _create_owner_only(cargs: list[Any], cparams: dict[str, Any]) -> None:
    """Create a SQLite database file that does not exist yet 0600, just before
    the driver opens it (SQLite itself would make it 0644 minus the umask).

    SQLite gives its rollback journal and its ``-wal`` and ``-shm`` files the
    mode of the database file, so they are owner-only too. A database that
    exists is left as it is: it is the application's, and so is its mode.
    In-memory databases and ``file:`` URIs (``uri=true``) are the driver's.
    """
    name = cargs[0] if cargs else cparams.get("database")
    if not isinstance(name, str) or cparams.get("uri") or name in ("", ":memory:"):
        return
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError:
        return  # it exists, or cannot be made here: SQLite says why when it opens it
    os.close(fd)


@contextlib.contextmanager
def transaction(engine: Engine, within: Connection | None = None) -> Iterator[Connection]:
    """A transaction of its own on ``engine``, or a savepoint in ``within``'s
    (a unit of work that rides in a larger transaction, and rolls back
    alone when it fails)."""
    if within is None:
        with engine.begin() as conn:
            yield conn
    else:
        with within.begin_nested():
            yield within


def describe_db_error(engine: Engine, exc: BaseException, doing: str) -> DatabaseError:
    """A one-line DatabaseError for a driver error, naming the database."""
    return DatabaseError(f"{redact(engine)}: {doing}: {first_line(exc)}")


def check_connection(engine: Engine) -> None:
    """Open and close one connection, so a bad URL fails early and clearly."""
    try:
        with engine.connect():
            pass
    except SQLAlchemyError as exc:
        raise describe_db_error(engine, exc, "cannot open the database") from exc
