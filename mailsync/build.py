"""Building the outgoing changeset of one link: route, coalesce, read, pack.

For a link to peer P, the changes logged since the link's cursor (up to the
dialect's safe horizon) are routed — never P's own changes back to P, on a
remote only local changes — and coalesced per primary key in SQL: only the
first operation of a key in the window matters, because the row's *current*
values are read now. A key whose row exists travels as an insert (if its
first operation was one) or an update; a key whose row is gone travels as a
tombstone, unless it was also born in this window.

Everything happens in one transaction with the outbox insert and the cursor
move, so a crash leaves either a complete outbox entry (all its parts) or
none. Upserts are
written parents first, tombstones children first, so foreign keys hold at
every step on the receiver.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Row,
    Table,
    case,
    delete,
    func,
    literal,
    select,
    update,
)

from mailsync import dictionaries as dicts_mod
from mailsync import link as links_mod
from mailsync import progress, provision
from mailsync.dialects import bulk
from mailsync.keys import PublicKey
from mailsync.rules import Direction, Rule, filter_predicate
from mailsync.storage import key_typers, raw_select_columns, tag_for, wire_functions
from mailsync.store.changelog import first_changes, key_filter, logged_key, stored_key_filter
from mailsync.store.engine import transaction
from mailsync.store.reflection import dependency_order, reflect
from mailsync.store.tables import horizons, loads, now, outbox
from mailsync.wire.changeset import ChangesetWriter, Op, TableDef, batches, pack, unpack_stream
from mailsync.wire.controls import (
    FullLoad,
    KeyAnnouncement,
    RulesUpdate,
    SequencedControl,
    TableDefinitions,
)
from mailsync.wire.envelope import Codec, Header
from mailsync.wire.values import convert


@dataclass
class LinkPlan:
    """What may travel on one link in this build."""

    me: str
    peer: str
    direction: Direction
    rules: dict[str, Rule]
    send_rules: bool = False
    rules_hash: str | None = None
    initial_loads: list[str] = field(default_factory=list)
    #: our new public key, when this peer has not been told about it yet
    announce_key: PublicKey | None = None
    #: the peer lost what it had applied (a restored backup): this build is a
    #: full load of ``initial_loads`` that replaces its copy, applied on top
    #: of whatever it has (header base 0)
    reload: bool = False
    #: remote, after the host went back to a backup: every row we send up
    #: goes again (the host lost some), applied on top of whatever it has
    resend_all: bool = False
    #: our database went back: the peer may miss changesets we no longer
    #: hold, so this one applies on top of whatever it has (header base 0)
    rebase: bool = False

    @property
    def carries_controls(self) -> bool:
        """Something goes even with no change to send: our key, the rules,
        a table's initial load, a full reload, every row again (the host
        went back)."""
        return bool(
            self.announce_key is not None
            or self.send_rules
            or self.initial_loads
            or self.reload
            or self.resend_all
        )

    def ops(self, table: str) -> str:
        rule = self.rules.get(table)
        if rule is None:
            return ""
        return rule.down if self.direction == "down" else rule.up

    def row_filter(self, table: str) -> str | None:
        rule = self.rules.get(table)
        return rule.row_filter if rule is not None and self.direction == "down" else None


@dataclass(frozen=True)
class Built:
    """An outbox entry that was just created."""

    peer: str
    seq: int
    rows: int
    raw_size: int
    size: int
    parts: int = 1
    #: loaded tables whose definition could not travel, and why (the
    #: station must create them itself)
    undescribed: dict[str, str] = field(default_factory=dict)


class _CountingSink:
    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.count = 0

    def write(self, data: bytes, /) -> int:
        self.count += len(data)
        return int(self.inner.write(data))


def type_name(column: Column[Any], engine: Engine) -> str:
    try:
        return str(column.type.compile(dialect=engine.dialect))
    except Exception:  # a type the dialect cannot render: the class name will do
        return type(column.type).__name__


class _Builder:
    def __init__(
        self,
        conn: Connection,
        engine: Engine,
        plan: LinkPlan,
        writer: ChangesetWriter,
        batch: int,
        deletes: _KeySpool,
    ) -> None:
        self.conn = conn
        self.engine = engine
        self.plan = plan
        self.writer = writer
        self.batch = batch
        self.tables: dict[str, Table] = {}
        self.defs: dict[str, TableDef] = {}
        #: per table, per column: the driver's value → the wire's (None: as is)
        self.wire: dict[str, list[Any]] = {}
        self.deletes = deletes

    def table(self, name: str) -> Table:
        if name not in self.tables:
            self.tables[name] = reflect(self.conn, name)
        return self.tables[name]

    def tdef(self, name: str) -> TableDef:
        if name not in self.defs:
            table = self.table(name)
            self.defs[name] = self.writer.table(
                name,
                [(c.name, type_name(c, self.engine)) for c in table.columns],
                [c.name for c in table.primary_key.columns],
                [tag_for(c.type) for c in table.columns],
            )
            self.wire[name] = wire_functions(table, self.engine.dialect)
        return self.defs[name]

    def scoped_select(self, table: Table, name: str) -> Any:
        """SELECT the columns as stored (no type processing) plus an
        in-scope flag from the row filter."""
        row_filter = self.plan.row_filter(name)
        flag: Any
        if row_filter:
            flag = case((filter_predicate(row_filter, self.plan.peer), 1), else_=0)
        else:
            flag = literal(1)
        columns = raw_select_columns(table, self.engine.dialect)
        return select(*columns, flag.label("mailsync_in_scope"))

    def write(self, name: str, op: Op, rows: list[Row[Any]]) -> None:
        """Rows as read (the flag last), column by column in storage form."""
        if rows:
            tdef = self.tdef(name)
            columns = list(zip(*rows, strict=True))[:-1]
            fns = self.wire[name]
            self.writer.columns(
                tdef, op, [convert(list(c), f) for c, f in zip(columns, fns, strict=True)]
            )
            summary = self.writer.summary
            progress.tick("packing", self.plan.peer, None, summary.rows, summary.bytes)

    def tombstones(self, name: str, logged: list[str], keys: list[tuple[Any, ...]]) -> None:
        """Keys of rows gone, as stored: SQLite's change log holds them so
        (JSON of the stored values), elsewhere the typed keys are made
        msgpack-native like any value of their columns."""
        if not keys:
            return
        if self.engine.dialect.name == "sqlite":
            self.deletes.add(name, [tuple(json.loads(pk)) for pk in logged])
            return
        table = self.table(name)
        at = [list(table.columns).index(c) for c in table.primary_key.columns]
        self.tdef(name)
        fns = [self.wire[name][i] for i in at]
        self.deletes.add(
            name,
            [
                tuple(v if f is None or v is None else f(v) for f, v in zip(fns, k, strict=True))
                for k in keys
            ],
        )

    def initial_load(self, name: str) -> None:
        table = self.table(name)
        order = list(table.primary_key.columns)
        query = self.scoped_select(table, name).order_by(*order)
        result = self.conn.execute(query, execution_options={"yield_per": self.batch})
        for part in result.partitions():
            self.write(name, "I", [r for r in part if r[-1]])

    def changes(self, name: str, horizon: int, cursor: int, *, loaded: bool = False) -> None:
        """Route the logged changes of one table; after an initial load in the
        same changeset (``loaded``) only its tombstones still matter."""
        table = self.table(name)
        pk_cols = list(table.primary_key.columns)
        ops = self.plan.ops(name)
        if loaded:
            ops = ops.replace("I", "").replace("U", "")
        result = first_changes(
            self.conn,
            name,
            cursor,
            horizon,
            not_from=None if self.plan.direction == "up" else self.plan.peer,
            batch=self.batch,
        )
        columns = list(table.columns)
        at = [columns.index(c) for c in pk_cols]
        # SQLite's change log holds keys as stored: they are looked up so
        stored = self.engine.dialect.name == "sqlite"
        typers = [None] * len(at) if stored else key_typers(table, self.engine.dialect)
        where = stored_key_filter if stored else key_filter
        for part in batches(result, self.batch):
            keyed = [
                (tuple(json.loads(pk)) if stored else logged_key(pk, pk_cols), op, pk)
                for pk, op in part
            ]
            rows = self.conn.execute(
                self.scoped_select(table, name).where(where(table, [k for k, _, _ in keyed]))
            ).all()
            found = {_key_of(r, at, typers): r for r in rows}
            inserts: list[Row[Any]] = []
            updates: list[Row[Any]] = []
            gone: list[tuple[Any, ...]] = []
            logged: list[str] = []
            for key, first_op, pk in keyed:
                row = found.get(key)
                if row is not None:
                    if not row[-1]:
                        continue  # outside the station's row filter
                    if first_op == "I":
                        if "I" in ops:
                            inserts.append(row)
                    elif "U" in ops:
                        updates.append(row)
                elif first_op != "I" and "D" in ops:
                    gone.append(key)
                    logged.append(pk)
            self.tombstones(name, logged, gone)
            self.write(name, "I", inserts)
            self.write(name, "U", updates)


def _key_of(row: Row[Any], at: list[int], typers: list[Any]) -> tuple[Any, ...]:
    """A raw row's key in the values the change log's keys are read in."""
    return tuple(
        row[i] if f is None or row[i] is None else f(row[i])
        for i, f in zip(at, typers, strict=True)
    )


Sealer = Callable[[Connection, Header, bytes], bytes]


class _PartSpool:
    """The compressed changeset, cut into parts as it is written.

    It is spooled to a temporary file (in memory up to one part), because a
    part's header names the number of parts, known only at the end.
    """

    def __init__(self, part_size: int) -> None:
        self.part_size = part_size
        self.size = 0
        self._file = tempfile.SpooledTemporaryFile(max_size=part_size)  # noqa: SIM115

    def write(self, data: bytes, /) -> int:
        self.size += len(data)
        return self._file.write(data)

    @property
    def parts(self) -> int:
        return max(1, -(-self.size // self.part_size))

    def chunks(self) -> Iterator[bytes]:
        self._file.seek(0)
        for _ in range(self.parts):
            yield self._file.read(self.part_size)

    def close(self) -> None:
        self._file.close()


class _KeySpool:
    """Tombstone keys of one build, kept on disk until the upserts are written
    (deletes go last, children first): a mass delete never sits in memory."""

    def __init__(self) -> None:
        self._files: dict[str, Any] = {}

    def add(self, table: str, keys: list[tuple[Any, ...]]) -> None:
        if keys:
            if table not in self._files:
                self._files[table] = tempfile.SpooledTemporaryFile(max_size=1 << 20)  # noqa: SIM115
            self._files[table].write(pack(keys))

    def read(self, table: str) -> Iterator[list[tuple[Any, ...]]]:
        spool = self._files.get(table)
        if spool is None:
            return
        spool.seek(0)
        for keys in unpack_stream(spool):
            yield [tuple(k) for k in keys]

    def close(self) -> None:
        for spool in self._files.values():
            spool.close()


def build_for_link(
    engine: Engine,
    codec: Codec,
    plan: LinkPlan,
    horizon: int,
    batch_rows: int,
    seal: Sealer,
    part_size: int,
    on_built: Callable[[Connection, Built], None] | None = None,
    within: Connection | None = None,
) -> Built | None:
    """Build, seal and queue the next changeset for ``plan.peer`` (in its
    own transaction, or in a savepoint of ``within``'s).

    Rows stream from the database through the changeset writer and zstd into
    a spool, which is cut into parts of at most ``part_size`` bytes; each part
    is sealed on its own (``seal(conn, header, body)``) and queued. Memory
    holds a batch of rows and a part, whatever the size of the tables.
    Returns None when there is nothing to send (the cursor still advances).
    """
    with (
        contextlib.closing(_PartSpool(part_size)) as spool,
        contextlib.closing(_KeySpool()) as keys,
        transaction(engine, within) as conn,
    ):
        link = links_mod.one(conn, plan.peer)
        cursor = link.change_cursor
        bulk.read_as_text(conn)
        loading = bool(plan.initial_loads or plan.reload or plan.resend_all)
        dicts = (  # no rows may go (a station without up rules): no read
            dicts_mod.for_build(
                conn, codec, plan.peer, acked=link.acked_seq, out_seq=link.out_seq, bulk=loading
            )
            if any(plan.ops(n) for n in plan.rules)
            else dicts_mod.BuildDictionaries(plan.peer)
        )
        compressed = codec.body_writer(spool, plan.peer, dicts.use)  # type: ignore[arg-type]
        counter = _CountingSink(dicts.tap(compressed))
        meta = {"from": plan.me, "to": plan.peer, "dialect": engine.dialect.name}
        writer = ChangesetWriter(counter, meta)
        builder = _Builder(conn, engine, plan, writer, batch_rows, keys)
        controls: list[SequencedControl] = []
        if plan.announce_key is not None:
            controls.append(KeyAnnouncement(plan.announce_key.token()))
        undescribed: dict[str, str] = {}
        if plan.initial_loads and plan.direction == "down":
            # first, so that a station lacking a table has it before its rule
            # (whose capture needs it) and its rows
            defined, undescribed = provision.describe_each(
                conn, plan.initial_loads, among=list(plan.rules)
            )
            if defined:
                controls.append(TableDefinitions(tuple(defined)))
        if plan.reload:
            controls.append(FullLoad(tuple(plan.initial_loads)))
        if plan.send_rules:
            controls.append(RulesUpdate(tuple(r.to_wire() for r in plan.rules.values())))
        if dicts.carry is not None:
            controls.append(dicts.carry)
        for control in controls:
            writer.control(control.KIND, control.payload())
        names = [n for n in plan.rules if plan.ops(n)]
        ordered = dependency_order(conn, names) if names else []
        for name in ordered:
            loaded = name in plan.initial_loads
            if loaded:
                builder.initial_load(name)
                conn.execute(loads.insert().values(station=plan.peer, tbl=name, loaded_at=now()))
            elif plan.resend_all and "I" in plan.ops(name):
                builder.initial_load(name)
                loaded = True
            builder.changes(name, horizon, cursor, loaded=loaded)
        for name in reversed(ordered):
            for chunk in keys.read(name):
                writer.rows(builder.tdef(name), "D", chunk)
        rules_hash = plan.rules_hash if plan.send_rules else None
        if writer.summary.records <= 1:
            links_mod.nothing_built(conn, plan.peer, max(cursor, horizon), rules_hash)
            # nothing of ours up to here goes to this peer: its changesets
            # need not be tested against it (and the purge may drop it)
            latest = (
                select(func.max(horizons.c.seq))
                .where(horizons.c.peer == plan.peer)
                .scalar_subquery()
            )
            conn.execute(
                update(horizons)
                .where(horizons.c.peer == plan.peer, horizons.c.seq == latest)
                .values(horizon=max(cursor, horizon))
            )
            return None
        summary = writer.close()
        compressed.close()  # type: ignore[no-untyped-call]  # ends the zstd frame; the spool stays open
        seq = link.out_seq + 1
        # the link row first: the sealer reads it to pick the signing key
        links_mod.built(
            conn,
            plan.peer,
            seq,
            max(cursor, horizon),
            rules_hash=rules_hash,
            announced_key=plan.announce_key.key_id if plan.announce_key is not None else None,
            reload=plan.reload,
            resent_all=plan.resend_all,
        )
        dicts_mod.after_build(conn, codec, dicts, seq)
        # what this changeset covers of our change log, for conflict tests
        # (a number reused after a restore replaces its old row)
        conn.execute(delete(horizons).where(horizons.c.peer == plan.peer, horizons.c.seq >= seq))
        conn.execute(
            horizons.insert().values(peer=plan.peer, seq=seq, horizon=max(cursor, horizon))
        )
        cid = secrets.token_hex(8)
        size = 0
        parts = spool.parts
        for number, body in enumerate(spool.chunks(), start=1):
            header = Header(
                sender=plan.me,
                recipient=plan.peer,
                seq=seq,
                ack=link.in_seq,
                part=number,
                parts=parts,
                cid=cid,
                base=0 if plan.reload or plan.rebase or plan.resend_all else -1,
                ack_cid=link.in_cid,
                acked=link.acked_seq,
                dictionary=dicts.use,
            )
            blob = seal(conn, header, body)
            size += len(blob)
            conn.execute(
                outbox.insert().values(
                    peer=plan.peer,
                    seq=seq,
                    part=number,
                    parts=parts,
                    cid=cid,
                    blob=blob,
                    rows=summary.rows if number == 1 else 0,
                    raw_size=counter.count if number == 1 else 0,
                    cursor_from=cursor,
                    ack=link.in_seq,
                    created_at=now(),
                )
            )
        built = Built(plan.peer, seq, summary.rows, counter.count, size, parts, undescribed)
        if on_built is not None:
            on_built(conn, built)  # its log line commits with the outbox entry
        return built
