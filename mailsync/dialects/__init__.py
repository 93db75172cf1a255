"""Per-database behaviour, picked by SQLAlchemy dialect name.

Everything that differs between databases lives in this package and nowhere
else: :mod:`.base` declares what a dialect does (the :class:`Dialect`
protocol) and the SQL helpers the dialects share; :mod:`.sqlite` and
:mod:`.postgresql` do it.
"""

from __future__ import annotations

from sqlalchemy import Connection, Engine

from mailsync.dialects.base import Dialect
from mailsync.errors import DatabaseError


def dialect_for(bind: Connection | Engine) -> Dialect:
    """The dialect of a connection or engine; DatabaseError if unsupported."""
    name = bind.dialect.name
    if name == "sqlite":
        from mailsync.dialects.sqlite import SQLiteDialect

        return SQLiteDialect()
    if name == "postgresql":
        from mailsync.dialects.postgresql import PostgreSQLDialect

        return PostgreSQLDialect()
    raise DatabaseError(f"database kind {name!r} is not supported yet (SQLite and PostgreSQL are)")


__all__ = ["Dialect", "dialect_for"]
