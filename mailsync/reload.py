"""A station's copy replaced by a full load, after it went back to a backup.

A station restored from an older backup has lost rows the host sent it
since, and the host's change log no longer holds those changes (the station
had acknowledged them). The host then sends its tables in full, marked
``reload``; applying it must leave the station's tables equal to the load —
rows the host deleted meanwhile included — without losing what the station
changed itself and has not yet delivered.

So while the load is applied, the keys it brings are recorded in a
temporary table per reloaded table (on the database, not in memory), next
to the keys of the station's own undelivered changes, which the load must
not overwrite. At the end, every local row whose key is in neither is
deleted, children first (a row that cannot be, because of a local foreign
key say, is parked like any row that does not apply).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    MetaData,
    Table,
    and_,
    exists,
    func,
    select,
    type_coerce,
)
from sqlalchemy.types import NullType

from mailsync.dialects.bulk import mark
from mailsync.store.changelog import logged_key, stored_key
from mailsync.store.reflection import dependency_order, reflect
from mailsync.store.tables import changes, links, outbox
from mailsync.wire.changeset import TableDef


class Reload:
    """The bookkeeping of one reload changeset, inside its apply transaction."""

    def __init__(self, conn: Connection, peer: str, tables: list[str], batch: int) -> None:
        self.conn = conn
        self.batch = batch
        present = {n for n in tables if conn.dialect.has_table(conn, n)}
        self.order = dependency_order(conn, [n for n in tables if n in present])
        self.tables: dict[str, Table] = {n: reflect(conn, n) for n in self.order}
        meta = MetaData()
        self.seen: dict[str, Table] = {}
        for i, (name, table) in enumerate(self.tables.items()):
            cols = [Column(c.name, c.type, primary_key=True) for c in table.primary_key.columns]
            seen = Table(f"mailsync_reload_{i}", meta, *cols, prefixes=["TEMPORARY"])
            seen.drop(conn, checkfirst=True)
            seen.create(conn)
            self.seen[name] = seen
        self._stored: dict[str, list[tuple[Any, ...]]] = {}
        self.pending = self._pending(peer)
        for name, keys in self._stored.items():
            self._remember(name, keys)

    def _pending(self, peer: str) -> dict[str, set[tuple[Any, ...]]]:
        """Keys of this station's own changes the host has not acknowledged:
        logged after the oldest unacknowledged outbox entry began (or after
        the cursor, when nothing is waiting)."""
        conn = self.conn
        cursor = conn.execute(select(links.c.change_cursor).where(links.c.peer == peer)).scalar()
        oldest = conn.execute(
            select(func.min(outbox.c.cursor_from)).where(outbox.c.peer == peer)
        ).scalar()
        start = int(cursor or 0) if oldest is None else min(int(cursor or 0), int(oldest))
        pending: dict[str, set[tuple[Any, ...]]] = {}
        rows = conn.execute(
            select(changes.c.tbl, changes.c.pk)
            .where(
                changes.c.id > start,
                changes.c.origin.is_(None),
                changes.c.tbl.in_(list(self.tables)),
            )
            .distinct()
        )
        for name, pk in rows:
            columns = list(self.tables[name].primary_key.columns)
            pending.setdefault(name, set()).add(logged_key(pk, columns))
            self._stored.setdefault(name, []).append(stored_key(conn, pk, columns))
        return pending

    def _remember(self, name: str, keys: list[tuple[Any, ...]]) -> None:
        """Keys as stored (bound as they are, so that SQLite's own text of a
        date-time key is the text compared)."""
        if keys:
            seen = self.seen[name]
            quote = self.conn.dialect.identifier_preparer.quote
            names = ", ".join(quote(c.name) for c in seen.columns)
            marks = ", ".join([mark(self.conn)] * len(seen.columns))
            sql = f"INSERT INTO {quote(seen.name)} ({names}) VALUES ({marks})"
            self.conn.exec_driver_sql(sql, list(keys))

    def loaded(
        self,
        tdef: TableDef,
        rows: list[tuple[Any, ...]],
        stored: list[tuple[Any, ...]] | None = None,
    ) -> list[tuple[Any, ...]]:
        """Record the keys of loaded rows; returns the rows to upsert (not
        those the station changed itself and has not delivered yet).
        ``rows`` in Python values; ``stored``: the same rows as they are
        written (default: ``rows``)."""
        if tdef.name not in self.seen:
            return rows
        positions = [tdef.column_names.index(k) for k in tdef.pk]
        pending = self.pending.get(tdef.name, set())
        keep, keys = [], []
        for row, as_stored in zip(rows, rows if stored is None else stored, strict=True):
            if tuple(row[i] for i in positions) not in pending:
                keep.append(row)
                keys.append(tuple(as_stored[i] for i in positions))
        self._remember(tdef.name, keys)
        return keep

    def doomed(
        self, mirrored: Callable[[str], bool]
    ) -> Iterator[tuple[Table, TableDef, list[tuple[Any, ...]]]]:
        """Batches of local rows the load did not bring (keys as stored),
        children first, to be deleted by the caller; each batch must be
        :meth:`settled` (deleted or parked) before the next is looked for.

        Only tables that ``mirrored`` says follow the host's deletes (a row
        missing from the load of a filtered table lies outside the station's
        scope, which bounds it both ways, so it leaves too); a table whose
        deletes do not travel down keeps what the host deleted anyway."""
        for name in reversed(self.order):
            if not mirrored(name):
                continue
            table, seen = self.tables[name], self.seen[name]
            pk = list(table.primary_key.columns)
            tdef = TableDef(0, name, tuple((c.name, "") for c in pk), tuple(c.name for c in pk))
            unseen = ~exists().where(and_(*[seen.c[c.name] == c for c in pk]))
            raw = [type_coerce(c, NullType()) for c in pk]
            while keys := [
                tuple(r) for r in self.conn.execute(select(*raw).where(unseen).limit(self.batch))
            ]:
                yield table, tdef, keys

    def settled(self, table: Table, keys: list[tuple[Any, ...]]) -> None:
        """These keys were deleted or parked: not to be looked at again."""
        self._remember(table.name, keys)

    def close(self) -> None:
        for seen in self.seen.values():
            seen.drop(self.conn)
