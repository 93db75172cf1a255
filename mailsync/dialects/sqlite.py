"""SQLite: row triggers, a one-row table as the origin flag, ON CONFLICT upsert.

SQLite has no session variables, and a trigger in the main schema cannot see
a TEMP table, so the origin flag is the one row of ``mailsync_applying``,
written at the start of an apply transaction and deleted before it commits.
SQLite serialises writers, so no other connection ever sees the row.
"""

from __future__ import annotations

import decimal
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Engine, Float, Numeric, Table, TypeDecorator, text
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Dialect as SADialect

from mailsync.dialects import pk_json, quote_ident, trigger_name, upsert_with
from mailsync.schema import applying

_ORIGIN = "(SELECT origin FROM mailsync_applying LIMIT 1)"


class ExactDecimal(TypeDecorator[decimal.Decimal]):
    """NUMERIC for SQLite without the detour through float.

    SQLAlchemy's own Numeric binds a Decimal as a float on SQLite. Bound as
    text, SQLite still stores a REAL where that is lossless and keeps the
    text where it is not; read back, the value gets the column's scale.
    """

    impl = Numeric
    cache_ok = True

    def __init__(self, scale: int | None = None) -> None:
        super().__init__(asdecimal=False)
        self.scale = scale

    def process_bind_param(self, value: Any, dialect: SADialect) -> Any:
        if isinstance(value, decimal.Decimal):
            return str(value)
        return value

    def process_result_value(self, value: Any, dialect: SADialect) -> decimal.Decimal | None:
        if value is None:
            return None
        if isinstance(value, float):
            if self.scale is not None:
                return decimal.Decimal(f"{value:.{self.scale}f}")
            return decimal.Decimal(repr(value))
        return decimal.Decimal(str(value))


class SQLiteDialect:
    name = "sqlite"

    def _ddl(self, table: Table) -> list[str]:
        q = '"'
        t = table.name
        tq = quote_ident(q, t)
        lit = "'" + t.replace("'", "''") + "'"
        pk = [c.name for c in table.primary_key.columns]
        ins = "INSERT INTO mailsync_changes(tbl, pk, op, origin)"
        new_pk = pk_json(q, "NEW", pk, "json_array")
        old_pk = pk_json(q, "OLD", pk, "json_array")
        moved = " OR ".join(f"OLD.{quote_ident(q, c)} IS NOT NEW.{quote_ident(q, c)}" for c in pk)
        return [
            f"CREATE TRIGGER {quote_ident(q, trigger_name(t, 'ai'))} AFTER INSERT ON {tq} "
            f"BEGIN {ins} VALUES ({lit}, {new_pk}, 'I', {_ORIGIN}); END",
            f"CREATE TRIGGER {quote_ident(q, trigger_name(t, 'au'))} AFTER UPDATE ON {tq} "
            f"BEGIN {ins} SELECT {lit}, {old_pk}, 'D', {_ORIGIN} WHERE {moved}; "
            f"{ins} VALUES ({lit}, {new_pk}, 'U', {_ORIGIN}); END",
            f"CREATE TRIGGER {quote_ident(q, trigger_name(t, 'ad'))} AFTER DELETE ON {tq} "
            f"BEGIN {ins} VALUES ({lit}, {old_pk}, 'D', {_ORIGIN}); END",
        ]

    def install_capture(self, conn: Connection, table: Table) -> None:
        self.drop_capture(conn, table.name)
        for ddl in self._ddl(table):
            conn.exec_driver_sql(ddl)

    def drop_capture(self, conn: Connection, table_name: str) -> None:
        for suffix in ("ai", "au", "ad"):
            conn.exec_driver_sql(
                f"DROP TRIGGER IF EXISTS {quote_ident(chr(34), trigger_name(table_name, suffix))}"
            )

    def capture_installed(self, conn: Connection, table: Table) -> bool:
        rows = conn.execute(
            text("SELECT sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = :t"),
            {"t": table.name},
        ).all()
        present = {r[0] for r in rows}
        return all(ddl in present for ddl in self._ddl(table))

    def begin_apply(self, conn: Connection, origin: str) -> None:
        conn.execute(applying.delete())
        conn.execute(applying.insert().values(origin=origin))

    def end_apply(self, conn: Connection) -> None:
        conn.execute(applying.delete())

    def change_horizon(self, engine: Engine) -> int:
        # Writers are serialised: every id up to max(id) is committed.
        with engine.connect() as conn:
            value = conn.exec_driver_sql("SELECT max(id) FROM mailsync_changes").scalar()
        return int(value or 0)

    def upsert(self, conn: Connection, table: Table, rows: Sequence[dict[str, Any]]) -> None:
        upsert_with(sqlite_insert, conn, table, rows)

    def adapt_table(self, table: Table) -> None:
        for column in table.columns:
            ctype = column.type
            if isinstance(ctype, Numeric) and not isinstance(ctype, Float | ExactDecimal):
                column.type = ExactDecimal(ctype.scale)
