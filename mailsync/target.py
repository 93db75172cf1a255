"""A local table matched against a sender's declaration of it.

The rows of one table in a changeset are written at driver level
(:mod:`mailsync.dialects.bulk`) in this database's storage form
(:class:`mailsync.storage.Columns`). A batch that fails is applied row by
row and the rows that fail are parked, so that one bad row never stalls the
link. The tables may differ: on the host, a column only a station has is
left out (said once); on a station, a table that lacks a column the host
has, or whose key differs, has its rows parked (:attr:`Target.broken`:
values are never dropped on the way down; the host's definition brings a
column it added before the rows) while the rest of the changeset applies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, Table
from sqlalchemy.exc import SQLAlchemyError

from mailsync.admission import Check
from mailsync.dialects import bulk
from mailsync.errors import first_line
from mailsync.storage import Columns
from mailsync.wire.changeset import RowBatch, TableDef


class Target:
    """A local table matched against the sender's declaration; its rows are
    written at driver level (:mod:`mailsync.dialects.bulk`) in this
    database's storage form (:class:`mailsync.storage.Columns`)."""

    def __init__(
        self, conn: Connection, table: Table, tdef: TableDef, *, lenient: bool = False
    ) -> None:
        local = {c.name for c in table.columns}
        lacking = tuple(c for c in tdef.column_names if c not in local)
        #: the sender's columns this table lacks whose values are left out:
        #: ``lenient`` (the host, for a column only a station has)
        self.ignored = lacking if lenient else ()
        self.keep = [i for i, c in enumerate(tdef.column_names) if c in local]
        pk = tuple(c.name for c in table.primary_key.columns)
        #: why this table's rows cannot be written here (they are parked)
        self.broken: str | None = None
        if pk != tdef.pk:
            self.broken = (
                f"table {tdef.name}: primary key here is ({', '.join(pk)}), "
                f"the sender's is ({', '.join(tdef.pk)}); its rows are parked until "
                "the tables match"
            )
        elif lacking and not lenient:
            # a station: the host's definition adds what it adds before the
            # rows (mailsync.definitions); without it, values would be lost
            self.broken = (
                f"table {tdef.name} here lacks column(s) {', '.join(lacking)} that the "
                "sender has; its rows are parked until the tables match"
            )
        if self.ignored and self.broken is None:
            tdef = TableDef(
                tdef.index,
                tdef.name,
                tuple(tdef.columns[i] for i in self.keep),
                tdef.pk,
                tuple(tdef.tags[i] for i in self.keep) if tdef.tags else (),
                tdef.form,
            )
        self.table = table
        self.tdef = tdef
        if self.broken is None:
            self.columns = Columns(table, tdef, conn.dialect)
            self.sql = bulk.statements(conn, table, tdef.column_names)

    def project(self, batch: RowBatch) -> RowBatch:
        """``batch`` without the columns this table lacks."""
        if not self.ignored or self.broken is not None:
            return batch
        if batch.op == "D":  # keys only: all of them are here
            return RowBatch(self.tdef, batch.op, batch.rows, batch.columns)
        keep = self.keep
        return RowBatch(
            self.tdef,
            batch.op,
            [tuple(r[i] for i in keep) for r in batch.rows],
            None if batch.columns is None else [batch.columns[i] for i in keep],
        )

    def run(self, conn: Connection, op: str, rows: list[tuple[Any, ...]]) -> None:
        """``op``: D delete, I upsert, U update only (no insert right), L
        insert into a table that holds none of the keys (a load); rows in
        storage form."""
        if op == "I":
            bulk.run(conn, self.sql.upsert, rows)
        elif op == "L":
            bulk.load(conn, self.sql, rows)
        elif op == "U":
            if self.sql.update is not None:  # else nothing but the key: nothing to change
                bulk.run(conn, self.sql.update, self.sql.update_params(rows))
        else:
            bulk.run(conn, self.sql.delete, rows)

    def guarded(
        self,
        conn: Connection,
        op: str,
        rows: list[tuple[Any, ...]],
        park: Parker,
        check: Check | None = None,
        outside: Callable[[int], None] | None = None,
        stored: dict[int, tuple[Any, ...]] | None = None,
    ) -> int:
        """Apply a batch; if it fails, row by row, parking the rows that fail
        (constraint, foreign key, type) so that they never stall the link.

        ``check`` (a row filter to keep) names the rows the batch, written
        in its savepoint, left outside; then nothing of the batch stays, those
        rows are counted by ``outside`` and the rest is applied again.
        ``stored``: ``rows`` are Python values (for the checks); what is
        written, and parked, is each one's storage form, by ``id``."""

        def run(rows: list[tuple[Any, ...]]) -> None:
            self.run(conn, op, rows if stored is None else [stored[id(r)] for r in rows])

        while rows:
            try:
                with conn.begin_nested():
                    run(rows)
                    if check is not None and (bad := check(rows)):
                        raise _Outside(bad)
                return len(rows)
            except _Outside as out:
                gone = {id(r) for r in out.rows}
                rows = [r for r in rows if id(r) not in gone]
                if outside is not None:
                    outside(len(gone))
            except (SQLAlchemyError, OverflowError):  # sqlite3: an int beyond 64 bits
                break
        done = 0
        for row in rows:
            try:
                with conn.begin_nested():
                    run([row])
                    if check is not None and check([row]):
                        raise _Outside([row])
                done += 1
            except _Outside:
                if outside is not None:
                    outside(1)
            except (SQLAlchemyError, OverflowError) as exc:
                park(self.tdef, op, row if stored is None else stored[id(row)], first_line(exc))
        return done

    def prepared(
        self, batch: RowBatch, typed: bool, park: Parker
    ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """The batch's rows (storage form, and — when ``typed`` — Python
        values, else the same list); a row with a value this database's type
        cannot take is parked."""
        try:
            stored = self.columns.stored(batch)
            return stored, (self.columns.typed(batch) if typed else stored)
        except BAD_VALUE:
            pass
        good: list[tuple[Any, ...]] = []
        good_typed: list[tuple[Any, ...]] = []
        for row in batch.rows:
            one = RowBatch(batch.table, batch.op, [row], [[v] for v in row])
            try:
                stored = self.columns.stored(one)
                good_typed += self.columns.typed(one) if typed else stored
                good += stored
            except BAD_VALUE as exc:
                park(batch.table, batch.op, row, f"a value this database cannot take: {exc}")
        return good, good_typed if typed else good


#: what converting a value to a column's type raises when it cannot be
BAD_VALUE = (ValueError, TypeError, ArithmeticError, OverflowError)


class _Outside(Exception):
    """Rows a batch left outside the sender's row filter (its savepoint is
    rolled back)."""

    def __init__(self, rows: list[tuple[Any, ...]]) -> None:
        super().__init__(f"{len(rows)} row(s) outside the row filter")
        self.rows = rows


Parker = Callable[[TableDef, str, tuple[Any, ...], str], None]
