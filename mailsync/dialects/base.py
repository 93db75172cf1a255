"""What a database dialect does, and the SQL helpers the dialects share.

A dialect owns capture trigger DDL (and checking it is in place), the
connection-local "applying changes from peer X" flag that tags captured
changes with their origin, the safe horizon of the change log, upsert, type
adaptations and the triggers of columns bound to a number range.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import Column, Connection, Engine, Table

from mailsync.wire.rowinfo import SHARED_BIT as SHARED_BIT

if TYPE_CHECKING:
    from mailsync.ranges.model import RangeDef
    from mailsync.ranges.numformat import NumberFormat


class Dialect(Protocol):
    name: str
    #: :meth:`schema_fingerprint` is one value for the whole database
    #: (SQLite's schema_version), asked once per transaction for all tables
    fingerprint_per_database: bool

    def install_capture(self, conn: Connection, table: Table) -> None:
        """Create (or replace) the capture triggers of ``table``."""

    def drop_capture(self, conn: Connection, table_name: str) -> None:
        """Remove the capture triggers of a table, if present."""

    def capture_installed(self, conn: Connection, table: Table) -> bool:
        """Are the triggers present and exactly as this mailsync writes them?"""

    def begin_apply(self, conn: Connection, origin: str) -> None:
        """Tag changes made on ``conn`` in this transaction with ``origin``."""

    def end_apply(self, conn: Connection) -> None:
        """Stop tagging (must run before the transaction commits)."""

    def change_horizon(self, engine: Engine) -> int:
        """The highest change-log id below which no id can still appear."""

    def upsert(self, conn: Connection, table: Table, rows: Sequence[dict[str, Any]]) -> None:
        """Insert rows, replacing those whose primary key exists."""

    def adapt_table(self, table: Table) -> None:
        """Adjust reflected column types so values round-trip exactly."""

    def schema_fingerprint(self, conn: Connection, table: str) -> Any:
        """One cheap query's worth of something that changes whenever the
        table's definition or its triggers might have (reflection and the
        capture check are cached behind it)."""

    def binding_refusal(self, table: Table, column: Column[Any]) -> str | None:
        """Why a range-bound trigger cannot fill ``column`` on this database
        (completing "COLUMN is …"), or None."""

    def install_binding(self, conn: Connection, rdef: RangeDef, me: str, *, is_host: bool) -> None:
        """Triggers on the range's bound column: fill it from this node's
        leases when an insert leaves it NULL, and refuse a number outside
        them (changes applied from a peer are exempt)."""

    def drop_binding(self, conn: Connection, table: str, column: str) -> None:
        """Remove a bound column's triggers, if present."""

    def unique_constraints(self, conn: Connection, table: str) -> list[list[str]]:
        """The column lists of ``table``'s unique constraints (not its key)."""

    def current_year(self, conn: Connection) -> int:
        """The year now in the database's local time (a formatted number's
        ``{year}``, as the bound column's trigger writes it)."""

    def lease_ids_above(self, conn: Connection, floor: int) -> None:
        """Make every lease id given from now on higher than ``floor`` (a
        host restored from a backup must not lease under an id it used)."""

    def highest_bound(
        self,
        conn: Connection,
        table: str,
        column: str,
        first: int,
        last: int,
        fmt: NumberFormat | None = None,
    ) -> int | None:
        """The highest number from ``first`` to ``last`` that ``table`` holds
        in its bound ``column`` (a number, or a text of digits; with ``fmt``,
        the ``n`` of a text in that format), or None."""


def upsert_with(
    insert: Any, conn: Connection, table: Table, rows: Sequence[dict[str, Any]]
) -> None:
    """Upsert through a dialect's ``insert`` construct (SQLite and PostgreSQL
    share the ``ON CONFLICT (key) DO UPDATE SET col = excluded.col`` form)."""
    stmt = insert(table)
    keys = [c.name for c in table.primary_key.columns]
    others = {c.name: stmt.excluded[c.name] for c in table.columns if c.name not in keys}
    if others:
        stmt = stmt.on_conflict_do_update(index_elements=keys, set_=others)
    else:
        stmt = stmt.on_conflict_do_nothing(index_elements=keys)
    conn.execute(stmt, list(rows))


def column_bits(table: Table) -> list[tuple[Column[Any], int]]:
    """Each column of ``table`` with its bit in the change log's ``cols``
    (the capture triggers set it when the column's value changed): column
    i has bit i, the columns from ``SHARED_BIT`` on share that bit, as on
    the wire (:mod:`mailsync.wire.rowinfo`)."""
    return [(c, 1 << min(i, SHARED_BIT)) for i, c in enumerate(table.columns)]


def pk_json(quote: str, alias: str, pk: Sequence[str], func: str) -> str:
    """SQL for the JSON array of a row's key, e.g. ``json_array(NEW."id")``."""
    return f"{func}({', '.join(f'{alias}.{quote_ident(quote, c)}' for c in pk)})"


def quote_ident(quote: str, name: str) -> str:
    return quote + name.replace(quote, quote * 2) + quote


def trigger_name(table: str, suffix: str) -> str:
    return f"mailsync_{table}_{suffix}"


def sql_text(value: str) -> str:
    """A SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def binding_messages(rdef: RangeDef) -> tuple[str, str]:
    """What a bound column's triggers say: a number outside the leases, and
    none left."""
    assert rdef.bind is not None
    where = f"{rdef.bind[0]}.{rdef.bind[1]}"
    return (
        f"{where}: the number was not drawn on this node from number range {rdef.name} "
        "(leave it empty to draw one, or draw it first with `mailsync number next`)",
        f"number range {rdef.name}: no numbers left on this node for {where} "
        "(run `mailsync sync`; `mailsync status` says more)",
    )
