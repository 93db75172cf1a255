"""SQLite: row triggers, a one-row table as the origin flag, ON CONFLICT upsert.

SQLite has no session variables, and a trigger in the main schema cannot see
a TEMP table, so the origin flag is the one row of ``mailsync_applying``,
written at the start of an apply transaction and deleted before it commits.
SQLite serialises writers, so no other connection ever sees the row.
"""

from __future__ import annotations

import decimal
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import Column, Connection, Engine, Float, Numeric, Table, TypeDecorator, text
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Dialect as SADialect

from mailsync.dialects.base import (
    binding_messages,
    column_bits,
    pk_json,
    quote_ident,
    sql_text,
    trigger_name,
    upsert_with,
)
from mailsync.ranges.numformat import MAX_DIGITS, PLAIN, NumberFormat, Piece
from mailsync.store.tables import applying

if TYPE_CHECKING:
    from mailsync.ranges.model import RangeDef


def _piece_sql(piece: Piece, text_sql: str) -> str:
    if piece.literal is None:
        return f"{text_sql} GLOB '[0-9][0-9][0-9][0-9]'"
    return f"{text_sql} = {sql_text(piece.literal)} COLLATE BINARY"


def number_sql(fmt: NumberFormat, value: str) -> str:
    """SQL for ``n`` of ``value`` when it is a number of the format in its
    canonical form, else NULL (SQLite has no regular expressions: every piece
    but ``n`` has a fixed width, so ``n`` is a ``substr``)."""
    t = f"CAST({value} AS TEXT)"
    head, tail = fmt.head, fmt.tail
    slot = f"substr({t}, {head + 1}, length({t}) - {head + tail})"
    checks = [f"length({t}) BETWEEN {head + 1} AND {head + tail + MAX_DIGITS}"]
    at = 0
    for piece in fmt.before:
        checks.append(_piece_sql(piece, f"substr({t}, {at + 1}, {piece.width})"))
        at += piece.width
    at = 0
    for piece in fmt.after:
        start = f"length({t}) - {tail - at - 1}"
        checks.append(_piece_sql(piece, f"substr({t}, {start}, {piece.width})"))
        at += piece.width
    checks.append(f"{slot} NOT GLOB '*[^0-9]*'")
    checks.append(f"printf('%0{fmt.width}d', CAST({slot} AS INTEGER)) = {slot}")
    return f"(CASE WHEN {' AND '.join(checks)} THEN CAST({slot} AS INTEGER) END)"


def render_sql(fmt: NumberFormat | None, n: str) -> str:
    """SQL for the value a bound column gets for number ``n``: the number
    itself, or its text (the year in the machine's local time)."""
    if fmt is None:
        return n
    digits = f"printf('%0{fmt.width}d', {n})"
    year = "strftime('%Y', 'now', 'localtime')"

    def pieces(of: tuple[Piece, ...]) -> list[str]:
        return [year if p.literal is None else sql_text(p.literal) for p in of]

    return "(" + " || ".join([*pieces(fmt.before), digits, *pieces(fmt.after)]) + ")"


_ORIGIN = "(SELECT origin FROM mailsync_applying LIMIT 1)"
#: The capture time, ms since the epoch (one value per statement).
_NOW = "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)"


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
    fingerprint_per_database = True

    def _ddl(self, table: Table) -> list[str]:
        q = '"'
        t = table.name
        tq = quote_ident(q, t)
        lit = "'" + t.replace("'", "''") + "'"
        pk = [c.name for c in table.primary_key.columns]
        ins = "INSERT INTO mailsync_changes(tbl, pk, op, origin)"
        timed = "INSERT INTO mailsync_changes(tbl, pk, op, origin, cols, at)"
        new_pk = pk_json(q, "NEW", pk, "json_array")
        old_pk = pk_json(q, "OLD", pk, "json_array")
        moved = " OR ".join(f"OLD.{quote_ident(q, c)} IS NOT NEW.{quote_ident(q, c)}" for c in pk)
        changed = " | ".join(
            f"(OLD.{quote_ident(q, c.name)} IS NOT NEW.{quote_ident(q, c.name)}) * {bit}"
            for c, bit in column_bits(table)
        )
        return [
            f"CREATE TRIGGER {quote_ident(q, trigger_name(t, 'ai'))} AFTER INSERT ON {tq} "
            f"BEGIN {ins} VALUES ({lit}, {new_pk}, 'I', {_ORIGIN}); END",
            f"CREATE TRIGGER {quote_ident(q, trigger_name(t, 'au'))} AFTER UPDATE ON {tq} "
            f"BEGIN {timed} SELECT {lit}, {old_pk}, 'D', {_ORIGIN}, NULL, {_NOW} WHERE {moved}; "
            f"{timed} VALUES ({lit}, {new_pk}, 'U', {_ORIGIN}, "
            f"CASE WHEN {moved} THEN NULL ELSE {changed} END, {_NOW}); END",
            f"CREATE TRIGGER {quote_ident(q, trigger_name(t, 'ad'))} AFTER DELETE ON {tq} "
            f"BEGIN {timed} VALUES ({lit}, {old_pk}, 'D', {_ORIGIN}, NULL, {_NOW}); END",
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

    def _binding_ddl(self, rdef: RangeDef, me: str, is_host: bool) -> list[str]:
        assert rdef.bind is not None
        table, column = rdef.bind
        q = '"'
        tq, cq = quote_ident(q, table), quote_ident(q, column)
        r, holder = sql_text(rdef.name), sql_text(me)
        outside, dry = (sql_text(m) for m in binding_messages(rdef))
        mine = f"range_name = {r} AND holder = {holder}"
        usable = (
            f"SELECT id FROM mailsync_leases WHERE {mine} AND state = 'active' "
            f'AND "next" <= "last" AND "next" < ceiling ORDER BY "first" LIMIT 1'
        )
        local = "NOT EXISTS (SELECT 1 FROM mailsync_applying)"
        fmt = rdef.number_format
        number = number_sql(fmt or PLAIN, f"NEW.{cq}")
        wrong = (
            f"NEW.{cq} IS NOT NULL AND {local} AND NOT EXISTS (SELECT 1 FROM mailsync_leases "
            f'WHERE {mine} AND {number} BETWEEN "first" AND "next" - 1)'
        )
        fill = []
        if is_host:  # the host leases itself the next block when it has none
            fill += [
                'INSERT INTO mailsync_leases(range_name, holder, "first", "last", "next", '
                "state, granted_at, confirmed, ceiling) SELECT name, "
                f'{holder}, next_free, min(next_free + block - 1, "last"), next_free, '
                "'active', strftime('%Y-%m-%d %H:%M:%S', 'now'), 1, "
                'min(next_free + block - 1, "last") + 1 FROM mailsync_ranges '
                f'WHERE name = {r} AND next_free <= "last" AND NOT EXISTS ({usable});',
                'UPDATE mailsync_ranges SET next_free = (SELECT max("last") + 1 FROM '
                f"mailsync_leases WHERE range_name = {r}) WHERE name = {r} AND next_free <= "
                f'(SELECT max("last") FROM mailsync_leases WHERE range_name = {r});',
            ]
        # The number is written before it counts as drawn (SQLite triggers
        # have no variables), so the guard on updates must not see this write:
        # an empty origin in the flag table marks it (its capture is not sent
        # up; the insert's, which reads the row as built, is).
        drawn = render_sql(fmt, '"next"')
        fill += [
            f"SELECT RAISE(ABORT, {dry}) WHERE NOT EXISTS ({usable});",
            "INSERT INTO mailsync_applying(origin) VALUES ('');",
            f"UPDATE {tq} SET {cq} = (SELECT {drawn} FROM mailsync_leases WHERE id = ({usable})) "
            "WHERE rowid = NEW.rowid;",
            "DELETE FROM mailsync_applying WHERE origin = '';",
            f'UPDATE mailsync_leases SET "next" = "next" + 1 WHERE id = ({usable});',
        ]
        name = f"rng_{table}_{column}"
        return [
            f"CREATE TRIGGER {quote_ident(q, trigger_name(name, 'bi'))} BEFORE INSERT ON {tq} "
            f"WHEN {wrong} BEGIN SELECT RAISE(ABORT, {outside}); END",
            f"CREATE TRIGGER {quote_ident(q, trigger_name(name, 'bu'))} BEFORE UPDATE OF {cq} "
            f"ON {tq} WHEN NEW.{cq} IS NOT OLD.{cq} AND {wrong} "
            f"BEGIN SELECT RAISE(ABORT, {outside}); END",
            f"CREATE TRIGGER {quote_ident(q, trigger_name(name, 'ai'))} AFTER INSERT ON {tq} "
            f"WHEN NEW.{cq} IS NULL AND {local} BEGIN {' '.join(fill)} END",
        ]

    def install_binding(self, conn: Connection, rdef: RangeDef, me: str, *, is_host: bool) -> None:
        assert rdef.bind is not None
        self.drop_binding(conn, *rdef.bind)
        for ddl in self._binding_ddl(rdef, me, is_host):
            conn.exec_driver_sql(ddl)

    def highest_bound(
        self,
        conn: Connection,
        table: str,
        column: str,
        first: int,
        last: int,
        fmt: NumberFormat | None = None,
    ) -> int | None:
        number = number_sql(fmt or PLAIN, quote_ident(chr(34), column))
        value = conn.execute(
            text(
                f"SELECT max(n) FROM (SELECT {number} AS n FROM {quote_ident(chr(34), table)}) "
                "WHERE n BETWEEN :first AND :last"
            ),
            {"first": first, "last": last},
        ).scalar()
        return None if value is None else int(value)

    def drop_binding(self, conn: Connection, table: str, column: str) -> None:
        for suffix in ("bi", "bu", "ai"):
            name = trigger_name(f"rng_{table}_{column}", suffix)
            conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {quote_ident(chr(34), name)}")

    def unique_constraints(self, conn: Connection, table: str) -> list[list[str]]:
        # the inspector misses a column's own UNIQUE; SQLite's index list has
        # every one (origin "u": made by a UNIQUE constraint)
        q = quote_ident(chr(34), table)
        out = []
        for row in conn.exec_driver_sql(f"PRAGMA index_list({q})").all():
            if row[3] == "u":
                info = conn.exec_driver_sql(f"PRAGMA index_info({quote_ident(chr(34), row[1])})")
                out.append([str(r[2]) for r in sorted(info.all())])
        return sorted(out)

    def current_year(self, conn: Connection) -> int:
        return int(conn.exec_driver_sql("SELECT strftime('%Y', 'now', 'localtime')").scalar_one())

    def lease_ids_above(self, conn: Connection, floor: int) -> None:
        # SQLite gives max(rowid) + 1: an ended, empty lease row at the floor
        # holds it (its range name is empty: no range has that name)
        conn.execute(
            text(
                'INSERT INTO mailsync_leases(id, range_name, holder, "first", "last", "next", '
                "state, granted_at, confirmed, ceiling) SELECT :f, '', '', 0, -1, 0, 'retired', "
                "strftime('%Y-%m-%d %H:%M:%S', 'now'), 1, 0 "
                "WHERE coalesce((SELECT max(id) FROM mailsync_leases), 0) < :f"
            ),
            {"f": floor},
        )

    def schema_fingerprint(self, conn: Connection, table: str) -> Any:
        return conn.exec_driver_sql("PRAGMA schema_version").scalar()

    def binding_refusal(self, table: Table, column: Column[Any]) -> str | None:
        if (
            column.primary_key
            and len(table.primary_key.columns) == 1
            and str(column.type).upper() == "INTEGER"
        ):
            return (
                "the table's INTEGER PRIMARY KEY (SQLite's rowid); a trigger cannot draw a "
                "range number for it"
            )
        if not column.nullable:
            return (
                "NOT NULL; on SQLite a bound column must allow NULL (the number is filled "
                "in just after the insert)"
            )
        return None

    def adapt_table(self, table: Table) -> None:
        for column in table.columns:
            ctype = column.type
            if isinstance(ctype, Numeric) and not isinstance(ctype, Float | ExactDecimal):
                column.type = ExactDecimal(ctype.scale)
