"""PostgreSQL: statement triggers with transition tables, a GUC as origin flag.

Statement-level triggers with transition tables cost ~1.5x a plain insert
against ~2.9x for row-level plpgsql triggers (PERF-FACTS). The origin flag is
the transaction-local setting ``mailsync.origin`` (``set_config(..., true)``),
so it vanishes with the transaction whatever happens.

Sequence values can commit out of order, so a reader that takes change-log
ids up to ``max(id)`` could skip an id that a slower transaction commits
later. :meth:`change_horizon` briefly locks the change log in EXCLUSIVE mode:
that waits for every transaction that has inserted into it, after which
every id up to ``max(id)`` is final.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    Date,
    DateTime,
    Engine,
    Integer,
    Interval,
    LargeBinary,
    Numeric,
    String,
    Table,
    Time,
    Uuid,
    inspect,
    text,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert

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

if TYPE_CHECKING:
    from mailsync.ranges.model import RangeDef

_Q = '"'


def _piece_re(piece: Piece) -> str:
    if piece.literal is None:
        return "[0-9]{4}"
    return "".join("[.]" if c == "." else c for c in piece.literal)  # the rest is plain


def number_sql(fmt: NumberFormat, value: str) -> str:
    """SQL for ``n`` of the text ``value`` when it is a number of the format
    in its canonical form, else NULL. Nested CASEs: PostgreSQL may evaluate
    the operands of AND in any order, and a text that is no number must
    never reach the cast."""
    before = "".join(_piece_re(p) for p in fmt.before)
    after = "".join(_piece_re(p) for p in fmt.after)
    whole = sql_text(f"^{before}[0-9]{{1,{MAX_DIGITS}}}{after}$")
    slot = f"substring({value} from {sql_text(f'^{before}([0-9]{{1,{MAX_DIGITS}}}){after}$')})"
    return (
        f"(CASE WHEN {value} ~ {whole} THEN CASE WHEN {_digits(fmt, f'{slot}::bigint')} = {slot} "
        f"THEN {slot}::bigint END END)"
    )


def _digits(fmt: NumberFormat, n: str) -> str:
    if not fmt.width:
        return f"{n}::text"
    return f"lpad({n}::text, greatest({fmt.width}, length({n}::text)), '0')"


def render_sql(fmt: NumberFormat | None, n: str) -> str:
    """SQL for the value a bound column gets for number ``n``: the number
    itself, or its text (the year in the session's time zone)."""
    if fmt is None:
        return n
    year = "to_char(localtimestamp, 'YYYY')"

    def pieces(of: tuple[Piece, ...]) -> list[str]:
        return [year if p.literal is None else sql_text(p.literal) for p in of]

    return "(" + " || ".join([*pieces(fmt.before), _digits(fmt, n), *pieces(fmt.after)]) + ")"


#: Column types compared as they are; any other (json, xml, geometric types
#: have no equality operator) is compared as its text.
_COMPARABLE = (Integer, Numeric, String, Date, DateTime, Time, Boolean, LargeBinary, Interval, Uuid)


def _compared(column: Column[Any], alias: str) -> str:
    value = f"{alias}.{quote_ident(_Q, column.name)}"
    return value if isinstance(column.type, _COMPARABLE) else f"{value}::text"


def _function_name(table: str) -> str:
    return f"mailsync_capture_{table}"


#: The catalog rows' row versions of a table, its columns, defaults and
#: constraints: they change with any ALTER of the table.
_FINGERPRINT = """
SELECT c.oid::bigint, c.xmin::text,
  (SELECT string_agg(a.attnum::text || ':' || a.xmin::text, ',' ORDER BY a.attnum)
     FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0),
  (SELECT string_agg(d.oid::text || ':' || d.xmin::text, ',' ORDER BY d.oid)
     FROM pg_attrdef d WHERE d.adrelid = c.oid),
  (SELECT string_agg(x.oid::text || ':' || x.xmin::text, ',' ORDER BY x.oid)
     FROM pg_constraint x WHERE x.conrelid = c.oid),
  (SELECT string_agg(g.oid::text || ':' || g.xmin::text, ',' ORDER BY g.oid)
     FROM pg_trigger g WHERE g.tgrelid = c.oid)
FROM pg_class c WHERE c.oid = to_regclass(:t)
"""


class PostgreSQLDialect:
    name = "postgresql"
    fingerprint_per_database = False

    def _function_ddl(self, table: Table) -> str:
        t = table.name
        lit = "'" + t.replace("'", "''") + "'"
        pk = [c.name for c in table.primary_key.columns]
        ins = "INSERT INTO mailsync_changes(tbl, pk, op, origin)"
        timed = "INSERT INTO mailsync_changes(tbl, pk, op, origin, cols, at)"
        new_pk = pk_json(_Q, "n", pk, "json_build_array") + "::text"
        old_pk = pk_json(_Q, "o", pk, "json_build_array") + "::text"
        same = " AND ".join(f"n.{quote_ident(_Q, c)} = o.{quote_ident(_Q, c)}" for c in pk)
        # one join of the old and new rows: an old key gone is a delete, a
        # new key (a key moved) an update of every column (NULL), a key
        # kept an update of the columns whose values differ
        key = quote_ident(_Q, pk[0])
        gone, born = f"n.{key} IS NULL", f"o.{key} IS NULL"  # key columns are NOT NULL
        changed = " | ".join(
            f"(CASE WHEN {_compared(c, 'n')} IS DISTINCT FROM {_compared(c, 'o')} "
            f"THEN {bit}::int8 ELSE 0::int8 END)"
            for c, bit in column_bits(table)
        )
        return (
            f"CREATE OR REPLACE FUNCTION {quote_ident(_Q, _function_name(t))}() "
            "RETURNS trigger LANGUAGE plpgsql AS $mailsync$\n"
            "DECLARE origin text := NULLIF(current_setting('mailsync.origin', true), '');\n"
            "  at int8 := (extract(epoch FROM clock_timestamp()) * 1000)::int8;\n"
            "BEGIN\n"
            "  IF TG_OP = 'INSERT' THEN\n"
            f"    {ins} SELECT {lit}, {new_pk}, 'I', origin FROM mailsync_new n;\n"
            "  ELSIF TG_OP = 'UPDATE' THEN\n"
            f"    {timed} SELECT {lit}, CASE WHEN {gone} THEN {old_pk} ELSE {new_pk} END,\n"
            f"      CASE WHEN {gone} THEN 'D' ELSE 'U' END, origin,\n"
            f"      CASE WHEN {gone} OR {born} THEN NULL ELSE {changed} END, at\n"
            f"      FROM mailsync_old o FULL JOIN mailsync_new n ON {same};\n"
            "  ELSE\n"
            f"    {timed} SELECT {lit}, {old_pk}, 'D', origin, NULL, at FROM mailsync_old o;\n"
            "  END IF;\n"
            "  RETURN NULL;\n"
            "END $mailsync$"
        )

    def _trigger_ddl(self, table: Table) -> list[str]:
        t = table.name
        tq = quote_ident(_Q, t)
        fn = quote_ident(_Q, _function_name(t))
        spec = [
            ("ai", "INSERT", "NEW TABLE AS mailsync_new"),
            ("au", "UPDATE", "OLD TABLE AS mailsync_old NEW TABLE AS mailsync_new"),
            ("ad", "DELETE", "OLD TABLE AS mailsync_old"),
        ]
        return [
            f"CREATE TRIGGER {quote_ident(_Q, trigger_name(t, suffix))} AFTER {event} ON {tq} "
            f"REFERENCING {ref} FOR EACH STATEMENT EXECUTE FUNCTION {fn}()"
            for suffix, event, ref in spec
        ]

    def install_capture(self, conn: Connection, table: Table) -> None:
        self.drop_capture(conn, table.name)
        conn.exec_driver_sql(self._function_ddl(table))
        for ddl in self._trigger_ddl(table):
            conn.exec_driver_sql(ddl)

    def drop_capture(self, conn: Connection, table_name: str) -> None:
        exists = conn.execute(
            text("SELECT to_regclass(:t)"), {"t": quote_ident(_Q, table_name)}
        ).scalar()
        if exists is not None:
            for suffix in ("ai", "au", "ad"):
                conn.exec_driver_sql(
                    f"DROP TRIGGER IF EXISTS {quote_ident(_Q, trigger_name(table_name, suffix))} "
                    f"ON {quote_ident(_Q, table_name)}"
                )
        conn.exec_driver_sql(
            f"DROP FUNCTION IF EXISTS {quote_ident(_Q, _function_name(table_name))}()"
        )

    def capture_installed(self, conn: Connection, table: Table) -> bool:
        names = [trigger_name(table.name, s) for s in ("ai", "au", "ad")]
        found = conn.execute(
            text(
                "SELECT count(*) FROM pg_trigger WHERE tgrelid = to_regclass(:t) "
                "AND tgname = ANY(:names) AND tgenabled <> 'D'"
            ),
            {"t": quote_ident(_Q, table.name), "names": names},
        ).scalar()
        if found != 3:
            return False
        body = conn.execute(
            text("SELECT prosrc FROM pg_proc WHERE proname = :f"),
            {"f": _function_name(table.name)},
        ).scalar()
        expected = self._function_ddl(table).split("$mailsync$")[1]
        return body == expected

    def begin_apply(self, conn: Connection, origin: str) -> None:
        conn.execute(text("SELECT set_config('mailsync.origin', :o, true)"), {"o": origin})

    def end_apply(self, conn: Connection) -> None:
        conn.execute(text("SELECT set_config('mailsync.origin', '', true)"))

    def change_horizon(self, engine: Engine) -> int:
        with engine.begin() as conn:
            conn.exec_driver_sql("LOCK TABLE mailsync_changes IN EXCLUSIVE MODE")
            value = conn.exec_driver_sql("SELECT max(id) FROM mailsync_changes").scalar()
        return int(value or 0)

    def upsert(self, conn: Connection, table: Table, rows: Sequence[dict[str, Any]]) -> None:
        upsert_with(pg_insert, conn, table, rows)

    def adapt_table(self, table: Table) -> None:
        return None

    def schema_fingerprint(self, conn: Connection, table: str) -> Any:
        quoted = conn.dialect.identifier_preparer.quote(table)
        row = conn.execute(text(_FINGERPRINT), {"t": quoted}).first()
        return tuple(row) if row is not None else None

    def binding_refusal(self, table: Table, column: Column[Any]) -> str | None:
        return None

    def install_binding(self, conn: Connection, rdef: RangeDef, me: str, *, is_host: bool) -> None:
        assert rdef.bind is not None
        table, column = rdef.bind
        conn.exec_driver_sql(_DRAW_FUNCTION)
        tq, cq = quote_ident(_Q, table), quote_ident(_Q, column)
        fn = quote_ident(_Q, f"mailsync_rng_{table}_{column}")
        outside, _ = binding_messages(rdef)
        r, holder = sql_text(rdef.name), sql_text(me)
        trigger = quote_ident(_Q, trigger_name(f"rng_{table}_{column}", "b"))
        self.drop_binding(conn, table, column)
        conn.exec_driver_sql(
            f"CREATE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $mailsync$\n"
            "DECLARE\n"
            "  d bigint;\n"
            "BEGIN\n"
            "  IF coalesce(current_setting('mailsync.origin', true), '') <> '' THEN\n"
            "    RETURN NEW;\n"
            "  END IF;\n"
            f"  IF NEW.{cq} IS NULL THEN\n"
            "    IF TG_OP = 'INSERT' THEN\n"
            f"      d := mailsync_draw({r}, {holder}, {'true' if is_host else 'false'});\n"
            f"      NEW.{cq} := {render_sql(rdef.number_format, 'd')};\n"
            "    END IF;\n"
            "    RETURN NEW;\n"
            "  END IF;\n"
            f"  IF TG_OP = 'UPDATE' AND NEW.{cq}::text IS NOT DISTINCT FROM OLD.{cq}::text THEN\n"
            "    RETURN NEW;\n"
            "  END IF;\n"
            f"  d := {number_sql(rdef.number_format or PLAIN, f'NEW.{cq}::text')};\n"
            "  IF d IS NULL OR NOT EXISTS (\n"
            f"      SELECT 1 FROM mailsync_leases WHERE range_name = {r} AND holder = {holder}\n"
            '      AND d >= "first" AND d < "next") THEN\n'
            "    RAISE EXCEPTION USING ERRCODE = 'check_violation',\n"
            f"      MESSAGE = {sql_text(outside)};\n"
            "  END IF;\n"
            "  RETURN NEW;\n"
            "END $mailsync$"
        )
        conn.exec_driver_sql(
            f"CREATE TRIGGER {trigger} BEFORE INSERT OR UPDATE OF {cq} ON {tq} "
            f"FOR EACH ROW EXECUTE FUNCTION {fn}()"
        )

    def highest_bound(
        self,
        conn: Connection,
        table: str,
        column: str,
        first: int,
        last: int,
        fmt: NumberFormat | None = None,
    ) -> int | None:
        number = number_sql(fmt or PLAIN, f"{quote_ident(_Q, column)}::text")
        value = conn.execute(
            text(
                f"SELECT max(n) FROM (SELECT {number} AS n FROM {quote_ident(_Q, table)}) AS q "
                "WHERE n BETWEEN :first AND :last"
            ),
            {"first": first, "last": last},
        ).scalar()
        return None if value is None else int(value)

    def unique_constraints(self, conn: Connection, table: str) -> list[list[str]]:
        found = inspect(conn).get_unique_constraints(table)
        return sorted([str(c) for c in u["column_names"] if c] for u in found)

    def current_year(self, conn: Connection) -> int:
        return int(conn.exec_driver_sql("SELECT to_char(localtimestamp, 'YYYY')").scalar_one())

    def lease_ids_above(self, conn: Connection, floor: int) -> None:
        # never lower: the sequence may already be past the floor and every id
        conn.execute(
            text(
                "SELECT setval(s, greatest(:f, (SELECT coalesce(max(id), 1) FROM "
                "mailsync_leases), coalesce(pg_sequence_last_value(s), 1))) FROM "
                "(SELECT pg_get_serial_sequence('mailsync_leases', 'id')::regclass AS s) AS q"
            ),
            {"f": max(floor, 1)},
        )

    def drop_binding(self, conn: Connection, table: str, column: str) -> None:
        exists = conn.execute(
            text("SELECT to_regclass(:t)"), {"t": quote_ident(_Q, table)}
        ).scalar()
        if exists is not None:
            trigger = quote_ident(_Q, trigger_name(f"rng_{table}_{column}", "b"))
            conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {trigger} ON {quote_ident(_Q, table)}")
        conn.exec_driver_sql(
            f"DROP FUNCTION IF EXISTS {quote_ident(_Q, f'mailsync_rng_{table}_{column}')}()"
        )


# One number from this node's leases of a range (the host leases itself the
# next block when it has none). Two sessions that pick the same lease queue
# on its row; the second re-checks "next <= last" and takes the next number.
_DRAW_FUNCTION = """
CREATE OR REPLACE FUNCTION mailsync_draw(r text, me text, host boolean) RETURNS bigint
LANGUAGE plpgsql AS $mailsync$
DECLARE
  n bigint;
  f bigint;
  b integer;
  e bigint;
BEGIN
  FOR attempt IN 1..5 LOOP
    UPDATE mailsync_leases SET "next" = "next" + 1
      WHERE id = (SELECT id FROM mailsync_leases WHERE range_name = r AND holder = me
                  AND state = 'active' AND "next" <= "last" AND "next" < ceiling
                  ORDER BY "first" LIMIT 1)
        AND state = 'active' AND "next" <= "last" AND "next" < ceiling
      RETURNING "next" - 1 INTO n;
    IF n IS NOT NULL THEN
      RETURN n;
    END IF;
    IF EXISTS (SELECT 1 FROM mailsync_leases WHERE range_name = r AND holder = me
               AND state = 'active' AND "next" <= "last" AND "next" < ceiling) THEN
      CONTINUE;
    END IF;
    IF NOT host THEN
      EXIT;
    END IF;
    SELECT next_free, block, "last" INTO f, b, e FROM mailsync_ranges WHERE name = r FOR UPDATE;
    IF f IS NULL OR f > e THEN
      EXIT;
    END IF;
    UPDATE mailsync_ranges SET next_free = least(f + b, e + 1) WHERE name = r;
    INSERT INTO mailsync_leases(range_name, holder, "first", "last", "next", state, granted_at,
                                confirmed, ceiling)
      VALUES (r, me, f, least(f + b - 1, e), f, 'active', now(), true, least(f + b - 1, e) + 1);
  END LOOP;
  RAISE EXCEPTION USING ERRCODE = 'check_violation',
    MESSAGE = format('number range %s: no numbers left on this node '
                     '(run `mailsync sync`; `mailsync status` says more)', r);
END $mailsync$
"""
