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
import datetime as dt
import json
import secrets
from collections.abc import Callable, Iterable, Mapping
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

from mailsync import conflict_notes, definitions, progress, provision, routing, verification
from mailsync import dictionaries as dicts_mod
from mailsync import link as links_mod
from mailsync import since as since_mod
from mailsync.dialects import bulk
from mailsync.linkplan import Built, LinkPlan
from mailsync.rules import filter_predicate
from mailsync.shared_reads import Sealer, SharedReads
from mailsync.spools import KeySpool, PartSpool
from mailsync.storage import (
    key_to_storage,
    key_typers,
    raw_select_columns,
    tag_for,
    wire_functions,
)
from mailsync.store.changelog import first_changes, key_filter, stored_key_filter
from mailsync.store.engine import transaction
from mailsync.store.reflection import dependency_order, reflect
from mailsync.store.tables import changes as changelog
from mailsync.store.tables import horizons, loads, now, outbox
from mailsync.wire.changeset import ChangesetWriter, Op, TableDef, batches
from mailsync.wire.controls import (
    FullLoad,
    KeyAnnouncement,
    RulesUpdate,
    SequencedControl,
    TableDefinitions,
)
from mailsync.wire.envelope import Codec, Header
from mailsync.wire.rowinfo import KIND, row_info
from mailsync.wire.station_controls import RequestServed
from mailsync.wire.values import convert


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
        deletes: KeySpool,
        routes: routing.Routes | None = None,
    ) -> None:
        self.conn = conn
        #: the reads this build shares with the other links of its cycle
        self.routes = routes
        self.engine = engine
        self.plan = plan
        self.writer = writer
        self.batch = batch
        self.tables: dict[str, Table] = {}
        self.defs: dict[str, TableDef] = {}
        #: per table, per column: the driver's value → the wire's (None: as is)
        self.wire: dict[str, list[Any]] = {}
        self.deletes = deletes
        #: per table: changed rows outside the filter the rule cannot delete
        self.left_kept: dict[str, int] = {}

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
            predicate = filter_predicate(row_filter, self.plan.peer, self.plan.address)
            flag = case((predicate, 1), else_=0)
        else:
            flag = literal(1)
        columns = raw_select_columns(table, self.engine.dialect)
        return select(*columns, flag.label("mailsync_in_scope"))

    def write(
        self, name: str, op: Op, rows: list[Row[Any]], info: list[tuple[Any, Any]] | None = None
    ) -> None:
        """Rows as read (the flag last), column by column in storage form;
        ``info``: per row, its changed columns and capture time, sent ahead
        of the batch (:mod:`mailsync.wire.rowinfo`)."""
        if rows:
            tdef = self.tdef(name)
            if info:
                self.writer.control(KIND, row_info(op, info))
            columns = list(zip(*rows, strict=True))[:-1]
            fns = self.wire[name]
            self.writer.columns(
                tdef, op, [convert(list(c), f) for c, f in zip(columns, fns, strict=True)]
            )
            summary = self.writer.summary
            progress.tick("packing", self.plan.peer, None, summary.rows, summary.bytes)

    def tombstones(
        self, name: str, logged: list[str], keys: list[tuple[Any, ...]], ats: list[Any]
    ) -> None:
        """Keys of rows gone, as stored: SQLite's change log holds them so
        (JSON of the stored values), elsewhere the typed keys are made
        msgpack-native like any value of their columns."""
        if not keys:
            return
        if self.engine.dialect.name == "sqlite":
            self.deletes.add(name, [tuple(json.loads(pk)) for pk in logged], ats)
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
            ats,
        )

    def initial_load(self, name: str) -> None:
        table = self.table(name)
        order = list(table.primary_key.columns)
        query = self.scoped_select(table, name).order_by(*order)
        result = self.conn.execute(query, execution_options={"yield_per": self.batch})
        for part in result.partitions():
            self.write(name, "I", [r for r in part if r[-1]])

    def since_load(self, name: str, column: str, since: dt.datetime) -> None:
        """The rows in scope whose timestamp ``column`` is at or after
        ``since``, sent again as changes (upserts where the rule sends
        inserts and updates; inserts — never overwriting — where it sends
        no updates)."""
        table = self.table(name)
        op: Op = "U" if "U" in self.plan.ops(name) else "I"
        query = (
            self.scoped_select(table, name)
            .where(table.c[column] >= since_mod.bound(table, column, since))
            .order_by(*table.primary_key.columns)
        )
        result = self.conn.execute(query, execution_options={"yield_per": self.batch})
        for part in result.partitions():
            self.write(name, op, [r for r in part if r[-1]])

    def changes(self, name: str, horizon: int, cursor: int, *, loaded: bool = False) -> None:
        """Route the logged changes of one table; after an initial load in the
        same changeset (``loaded``) only its tombstones still matter."""
        table = self.table(name)
        pk_cols = list(table.primary_key.columns)
        ops = self.plan.ops(name)
        if loaded:
            ops = ops.replace("I", "").replace("U", "")
        not_from = None if self.plan.direction == "up" else self.plan.peer
        routes = self.routes
        # shared with the other links at this cursor (routing.py), or read alone
        width = len(table.columns)
        window = routes.window(self.conn, name, cursor, horizon, width) if routes else None
        result: Iterable[routing.First] = (
            window.first_changes(not_from)
            if window is not None
            else first_changes(
                self.conn, name, cursor, horizon, not_from=not_from, batch=self.batch, width=width
            )
        )
        columns = list(table.columns)
        at = [columns.index(c) for c in pk_cols]
        # SQLite's change log holds keys as stored: they are looked up so
        stored = self.engine.dialect.name == "sqlite"
        typers = [None] * len(at) if stored else key_typers(table, self.engine.dialect)
        where = stored_key_filter if stored else key_filter
        for part in batches(result, self.batch):
            keyed = [
                (routing.parse_key(window, pk, table, stored), op, pk, (cols, at))
                for pk, op, cols, at in part
            ]
            keys = [k[0] for k in keyed]
            found: Mapping[tuple[Any, ...], Any] | None = None
            if routes is not None and window is not None:
                found = routes.found(self.conn, table, keys, self.plan)
            if found is None:
                rows = self.conn.execute(
                    self.scoped_select(table, name).where(where(table, keys))
                ).all()
                found = {_key_of(r, at, typers): r for r in rows}
            inserts: list[Row[Any]] = []
            updates: list[Row[Any]] = []
            changed: list[tuple[Any, Any]] = []
            gone: list[tuple[Any, ...]] = []
            logged: list[str] = []
            gone_at: list[Any] = []
            for key, first_op, pk, info in keyed:
                row = found.get(key)
                if row is not None:
                    if not row[-1]:
                        # outside the station's row filter: where it may
                        # have been inside before, it leaves the station
                        if first_op != "I" and "D" in ops:
                            gone.append(key)
                            logged.append(pk)
                        elif first_op != "I":
                            self.left_kept[name] = self.left_kept.get(name, 0) + 1
                        continue
                    if first_op == "I":
                        if "I" in ops:
                            inserts.append(row)
                    elif "U" in ops:
                        updates.append(row)
                        changed.append(info)
                elif first_op != "I" and "D" in ops:
                    gone.append(key)
                    logged.append(pk)
                    gone_at.append(info[1])
            self.tombstones(name, logged, gone, gone_at)
            self.write(name, "I", inserts)
            self.write(name, "U", updates, changed)

    def keyed(self, name: str, keys: list[tuple[Any, ...]]) -> None:
        """The rows of ``keys`` (Python values) as they are now, for this
        peer alone (a verification's repair): a row in scope as an update
        (an upsert where the rule sends inserts), a key with no row here or
        one outside the scope as a tombstone where the rule sends deletes."""
        table = self.table(name)
        ops = self.plan.ops(name)
        columns = list(table.columns)
        at = [columns.index(c) for c in table.primary_key.columns]
        typers = key_typers(table, self.engine.dialect)
        to_storage = key_to_storage(table, self.engine.dialect)
        for start in range(0, len(keys), self.batch):
            chunk = keys[start : start + self.batch]
            rows = self.conn.execute(
                self.scoped_select(table, name).where(key_filter(table, chunk))
            ).all()
            found = {_key_of(r, at, typers): r for r in rows}
            if "U" in ops or "I" in ops:
                self.write(
                    name, "U", [r for k in chunk if (r := found.get(k)) is not None and r[-1]]
                )
            gone = [k for k in chunk if (r := found.get(k)) is None or not r[-1]]
            if gone and "D" in ops:
                self.tdef(name)
                self.deletes.add(
                    name,
                    [
                        tuple(
                            v if f is None or v is None else f(v)
                            for f, v in zip(to_storage, k, strict=True)
                        )
                        for k in gone
                    ],
                    [None] * len(gone),  # a repair's deletes: no capture time
                )


def _key_of(row: Row[Any], at: list[int], typers: list[Any]) -> tuple[Any, ...]:
    """A raw row's key in the values the change log's keys are read in."""
    return tuple(
        row[i] if f is None or row[i] is None else f(row[i])
        for i, f in zip(at, typers, strict=True)
    )


def _covered(conn: Connection, plan: LinkPlan, cursor: int, horizon: int) -> int:
    """How far this build covers the change log: up to the horizon; in a
    run limited to some tables (``sync --table``), only up to the first
    change of another table the link carries, so that the cursor never
    passes a change that did not travel (what the run did send after it
    goes again next time: rows are read as they are then, so nothing
    travels wrong, only twice)."""
    if plan.waits_for_rules:
        return cursor  # what a station logged before its rules waits for them
    upto = max(cursor, horizon)
    if plan.only_tables is None:
        return upto
    others = [n for n in plan.rules if plan.ops(n) and n not in plan.only_tables]
    if not others:
        return upto
    routed: Any = changelog.c.origin.is_(None)
    if plan.direction == "down":
        routed = routed | (changelog.c.origin != plan.peer)
    first = conn.execute(
        select(func.min(changelog.c.id)).where(
            changelog.c.id > cursor, changelog.c.id <= horizon, changelog.c.tbl.in_(others), routed
        )
    ).scalar()
    return upto if first is None else max(cursor, int(first) - 1)


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
    on_left: Callable[[Connection, dict[str, int]], None] | None = None,
    routes: routing.Routes | None = None,
    reads: SharedReads | None = None,
) -> Built | None:
    """Build, seal and queue the next changeset for ``plan.peer`` (in its
    own transaction, or in a savepoint of ``within``'s).

    Rows stream from the database through the changeset writer and zstd into
    a spool, which is cut into parts of at most ``part_size`` bytes; each part
    is sealed on its own (``seal(conn, header, body)``) and queued. Memory
    holds a batch of rows and a part, whatever the size of the tables.
    Returns None when there is nothing to send (the cursor still advances).
    ``on_left`` hears, per table, how many changed rows lie outside the
    station's row filter and stay there (its rule sends no deletes).
    ``routes``: the change log and rows read once for all the links built
    in ``within``'s transaction (:mod:`mailsync.routing`); ``reads``: the
    link's own facts, read once for all of them (:mod:`mailsync.shared_reads`).
    """
    with (
        contextlib.closing(PartSpool(part_size)) as spool,
        contextlib.closing(KeySpool()) as keys,
        transaction(engine, within) as conn,
    ):
        shared = reads.link(plan.peer) if reads is not None else None
        link = shared or links_mod.one(conn, plan.peer)
        cursor = link.change_cursor
        bulk.read_as_text(conn)
        # tables whose definition changed (columns added) or that the admin
        # asked for afresh: definition, then every row again
        fresh = [t for t in plan.schema.refresh if plan.ops(t) and t not in plan.initial_loads]
        loading = bool(plan.initial_loads or plan.reload or plan.resend_all or fresh)
        dicts = (  # no rows may go (a station without up rules): no read
            dicts_mod.for_build(
                conn,
                codec,
                plan.peer,
                acked=link.acked_seq,
                out_seq=link.out_seq,
                bulk=loading,
                known=reads.dictionaries.get(plan.peer, []) if reads and shared else None,
            )
            if any(plan.ops(n) for n in plan.rules)
            else dicts_mod.BuildDictionaries(plan.peer)
        )
        compressed = codec.body_writer(spool, plan.peer, dicts.use)  # type: ignore[arg-type]
        counter = _CountingSink(dicts.tap(compressed))
        meta = {"from": plan.me, "to": plan.peer, "dialect": engine.dialect.name}
        writer = ChangesetWriter(counter, meta)
        builder = _Builder(conn, engine, plan, writer, batch_rows, keys, routes)
        controls: list[SequencedControl] = []
        if plan.announce_key is not None:
            controls.append(KeyAnnouncement(plan.announce_key.token()))
        if plan.send_rules:
            # first: a station creates only tables its rules name
            controls.append(RulesUpdate(tuple(r.to_wire() for r in plan.rules.values())))
        undescribed: dict[str, str] = {}
        digests: dict[str, str] = {}
        if (plan.initial_loads or fresh) and plan.direction == "down":
            # before the rows, so that a station lacking a table has it
            defined, undescribed = provision.describe_each(
                conn, [*plan.initial_loads, *fresh], among=list(plan.rules)
            )
            if defined:
                controls.append(TableDefinitions(tuple(defined)))
            digests = {str(d["table"]): definitions.remember(conn, d) for d in defined}
        for table, key in plan.schema.baseline.items():
            definitions.record(conn, plan.peer, table, key)
        if plan.reload or fresh:
            # a refresh is no restore: its changeset keeps its place in the
            # sequence (base -1), only its tables are replaced
            whole = tuple(plan.initial_loads) if plan.reload else ()
            controls.append(FullLoad(whole + tuple(fresh)))
        if dicts.carry is not None:
            controls.append(dicts.carry)
        for control in controls:
            writer.control(control.KIND, control.payload())
        noted = (
            conflict_notes.take(conn, plan.peer)
            if reads is None or not shared or plan.peer in reads.noted
            else None
        )
        if noted is not None:  # conflicts the peer must hear of, decisions
            writer.control(conflict_notes.KIND, noted)
        if plan.served is not None:
            writer.control(RequestServed.KIND, RequestServed(plan.served).payload())
            links_mod.request_told(conn, plan.peer)
        verifying = verification.due(conn, plan.peer) if plan.verify_due else None
        for kind, payload in verifying.controls if verifying else ():
            writer.control(kind, payload)
        names = [n for n in plan.rules if plan.builds(n)]
        ordered = dependency_order(conn, names) if names else []
        for name in ordered:
            loaded = name in plan.initial_loads
            if loaded:
                builder.initial_load(name)
                conn.execute(
                    loads.insert().values(
                        station=plan.peer, tbl=name, loaded_at=now(), digest=digests.get(name)
                    )
                )
            elif name in fresh:
                builder.initial_load(name)
                definitions.record(conn, plan.peer, name, digests.get(name))
                loaded = True
            elif plan.resend_all and "I" in plan.ops(name):
                builder.initial_load(name)
                loaded = True
            elif name in plan.since_loads:
                builder.since_load(name, *plan.since_loads[name])
            builder.changes(name, horizon, cursor, loaded=loaded)
            if verifying and name in verifying.resends:
                builder.keyed(name, verifying.resends[name])
        if plan.since_loads:
            conn.execute(
                update(loads)
                .where(loads.c.station == plan.peer, loads.c.tbl.in_(list(plan.since_loads)))
                .values(since=None, since_column=None)
            )
        upto = _covered(conn, plan, cursor, horizon)
        if builder.left_kept and on_left is not None:
            on_left(conn, builder.left_kept)
        for name in reversed(ordered):
            for chunk, ats in keys.read(name):
                if any(a is not None for a in ats):
                    writer.control(KIND, row_info("D", [(None, a) for a in ats]))
                writer.rows(builder.tdef(name), "D", chunk)
        rules_hash = plan.rules_hash if plan.send_rules else None
        if writer.summary.records <= 1:
            if verifying is not None:
                verification.sent(conn, plan.peer, None, verifying)
            links_mod.nothing_built(conn, plan.peer, upto, rules_hash)
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
                .values(horizon=upto)
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
            upto,
            rules_hash=rules_hash,
            announced_key=plan.announce_key.key_id if plan.announce_key is not None else None,
            reload=plan.reload,
            resent_all=plan.resend_all,
        )
        samples = reads.samples.get(plan.peer, 0) if reads is not None and shared else None
        dicts_mod.after_build(conn, codec, dicts, seq, samples)
        if verifying is not None:
            verification.sent(conn, plan.peer, seq, verifying)
        # what this changeset covers of our change log, for conflict tests
        # (a number reused after a restore replaces its old row)
        if reads is None or reads.may_hold_horizon(plan.peer, seq):
            conn.execute(
                delete(horizons).where(horizons.c.peer == plan.peer, horizons.c.seq >= seq)
            )
        conn.execute(horizons.insert().values(peer=plan.peer, seq=seq, horizon=upto))
        cid = secrets.token_hex(8)
        size = 0
        parts = spool.parts
        # the link as sealing reads it, where read for every link at once
        announced = plan.announce_key is not None
        known = reads.after_built(plan.peer, seq, announced) if reads is not None else None
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
            known = (
                reads.after_built(plan.peer, seq, plan.announce_key is not None) if reads else None
            )
            blob = seal(conn, header, body, known)
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
