"""Applying a received changeset: one transaction with the link's sequence.

The rows, the link's new inbound sequence number and the removal of the
buffered envelope commit together, so a crash leaves all or nothing and a
changeset is never applied twice. Captured changes made while applying are
tagged with the peer as origin (the dialect's flag), so they are relayed to
other stations but never echoed back.

A node applies only what its rules allow: a remote the host's *down*
operations, the host a station's *up* operations, and of those only the rows
:class:`mailsync.admission.Gate` admits (insert-only never overwrites, the
row filter bounds the way up, bound numbers are the sender's). Anything else
is refused and counted per table and reason, never written.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from decimal import Decimal
from functools import partial
from typing import Any

from sqlalchemy import Connection, Engine, Table, delete, select, update
from sqlalchemy.exc import SQLAlchemyError

from mailsync import capture, dictionaries, faults, progress, provision
from mailsync import link as links_mod
from mailsync.admission import CLASH, CLASH_REASON, Check, Gate
from mailsync.conflicts import Detector
from mailsync.dialects import bulk, dialect_for
from mailsync.errors import ApplyError, MailsyncError, SchemaError, first_line
from mailsync.keys import PublicKey
from mailsync.reload import Reload
from mailsync.rules import OP_NAMES, Direction, Rule, replace_rules
from mailsync.storage import Columns
from mailsync.store.engine import transaction
from mailsync.store.reflection import reflect
from mailsync.store.tables import now, parked
from mailsync.trust import trust_key
from mailsync.wire.changeset import (
    Control,
    RowBatch,
    Source,
    TableDef,
    pack,
    read_changeset,
    unpack,
)
from mailsync.wire.controls import (
    Dictionary,
    FullLoad,
    KeyAnnouncement,
    RulesUpdate,
    TableDefinitions,
    parse_sequenced,
)
from mailsync.wire.envelope import Header
from mailsync.wire.limits import DEFAULT_LIMITS


@dataclass
class Applied:
    """What one changeset did."""

    peer: str
    seq: int
    rows: int = 0
    #: rows refused, per (table, reason): the reason completes "refused: …"
    refused: dict[tuple[str, str], int] = field(default_factory=dict)
    rules_received: bool = False
    key_received: bool = False
    parked: int = 0
    #: of the parked rows, those parked by a rule rather than the database,
    #: per (table, reason): an insert of an existing key under an insert-only rule
    parked_by_rule: dict[tuple[str, str], int] = field(default_factory=dict)
    #: a full load that replaced this node's copy (it went back to a backup)
    reloaded: bool = False
    #: conflicts found, a line per table and outcome (see :mod:`mailsync.conflicts`)
    conflicts: list[str] = field(default_factory=list)
    #: tables created from the definitions a load brought (:mod:`mailsync.provision`)
    tables_created: list[str] = field(default_factory=list)
    #: tables this node has that differ from their definition, and how
    tables_differing: dict[str, list[str]] = field(default_factory=dict)


RulesFor = Callable[[Connection], dict[str, Rule]]

#: Local rows a reload did not bring are looked up and deleted this many at a time.
RELOAD_BATCH = 1000
#: Opens the buffered changeset in the apply transaction: (conn, origin) →
#: its verified header and a stream of its records.
Opener = Callable[[Connection, str], tuple[Header, Source]]


class _Target:
    """A local table matched against the sender's declaration; its rows are
    written at driver level (:mod:`mailsync.dialects.bulk`) in this
    database's storage form (:class:`mailsync.storage.Columns`)."""

    def __init__(self, conn: Connection, table: Table, tdef: TableDef) -> None:
        local = {c.name for c in table.columns}
        missing = [c for c in tdef.column_names if c not in local]
        if missing:
            raise SchemaError(
                f"table {tdef.name!r} here lacks column(s) {', '.join(missing)} "
                "that the sender has",
                hint="bring this database's schema up to the sender's",
            )
        pk = tuple(c.name for c in table.primary_key.columns)
        if pk != tdef.pk:
            raise SchemaError(
                f"table {tdef.name!r}: primary key here is ({', '.join(pk)}), "
                f"the sender's is ({', '.join(tdef.pk)})"
            )
        self.table = table
        self.tdef = tdef
        self.columns = Columns(table, tdef, conn.dialect)
        self.sql = bulk.statements(conn, table, tdef.column_names)

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
        except _BAD_VALUE:
            pass
        good: list[tuple[Any, ...]] = []
        good_typed: list[tuple[Any, ...]] = []
        for row in batch.rows:
            one = RowBatch(batch.table, batch.op, [row], [[v] for v in row])
            try:
                stored = self.columns.stored(one)
                good_typed += self.columns.typed(one) if typed else stored
                good += stored
            except _BAD_VALUE as exc:
                park(batch.table, batch.op, row, f"a value this database cannot take: {exc}")
        return good, good_typed if typed else good


#: what converting a value to a column's type raises when it cannot be
_BAD_VALUE = (ValueError, TypeError, ArithmeticError, OverflowError)


class _Outside(Exception):
    """Rows a batch left outside the sender's row filter (its savepoint is
    rolled back)."""

    def __init__(self, rows: list[tuple[Any, ...]]) -> None:
        super().__init__(f"{len(rows)} row(s) outside the row filter")
        self.rows = rows


Parker = Callable[[TableDef, str, tuple[Any, ...], str], None]


def park_row(
    conn: Connection, peer: str, seq: int, tdef: TableDef, op: str, row: tuple[Any, ...], error: str
) -> None:
    conn.execute(
        parked.insert().values(
            peer=peer,
            seq=seq,
            tbl=tdef.name,
            op=op,
            columns=json.dumps([list(tdef.column_names if op != "D" else tdef.pk), list(tdef.pk)]),
            row=pack(list(row)),
            error=error,
            parked_at=now(),
        )
    )


def apply_buffered(
    engine: Engine,
    opener: Opener,
    *,
    me: str,
    peer: str,
    seq: int,
    direction: Direction,
    rules_for: RulesFor,
    accept_rules: bool,
    on_applied: Callable[[Connection, Applied], None] | None = None,
    within: Connection | None = None,
) -> Applied:
    """Apply the buffered changeset ``seq`` from ``peer`` in one transaction
    (its own, or a savepoint of ``within``'s).

    The changeset streams from ``opener`` batch by batch: memory holds one
    part and one batch of rows, whatever its size.

    ``direction`` is the direction the changeset travelled (``down`` when a
    remote applies the host's changes), which picks the operations allowed.
    Raises ApplyError (the envelope stays buffered, the link waits).
    ``on_applied`` runs in the transaction just before it commits: what it
    writes (the log lines saying so) commits with the rows or not at all.
    """
    origin = f"changeset #{seq} from {peer}"
    result = Applied(peer, seq)
    table_name = "-"
    try:
        with transaction(engine, within) as conn:
            dialect = dialect_for(conn)
            dialect.begin_apply(conn, peer)
            header, stream = opener(conn, origin)
            if header.sender != peer or header.recipient != me or header.seq != seq:
                raise ApplyError(f"{origin}: header does not match the buffered entry")
            rules = rules_for(conn)
            targets: dict[int, _Target | None] = {}
            reload: Reload | None = None
            detector = Detector(
                conn,
                peer=peer,
                seq=seq,
                ack=header.ack,
                host_side=direction == "up",
                rules=rules,
            )

            def park(tdef: TableDef, op: str, row: tuple[Any, ...], error: str) -> None:
                park_row(conn, peer, seq, tdef, op, row, error)
                result.parked += 1

            def refuse(table: str, reason: str, count: int) -> None:
                result.refused[table, reason] = result.refused.get((table, reason), 0) + count

            gate = Gate(conn, me=me, peer=peer, direction=direction, rules=rules, refuse=refuse)
            #: per table: are its inserts a load into a table that was empty
            #: (no upsert)? Asked at its first insert batch; False once any
            #: other batch of it came
            loading: dict[str, bool] = {}
            #: tables loaded with their capture triggers off (see _loading)
            loads: list[str] = []

            for record in read_changeset(stream, origin=origin):
                if isinstance(record, Control):
                    control = parse_sequenced(record.kind, record.payload)
                    if isinstance(control, FullLoad) and accept_rules and reload is None:
                        reload = Reload(conn, peer, list(control.tables), RELOAD_BATCH)
                    elif isinstance(control, KeyAnnouncement):
                        # signed with the key we trust now: the peer's next one
                        trust_key(conn, peer, PublicKey.parse(control.token))
                        result.key_received = True
                    elif isinstance(control, RulesUpdate) and accept_rules:
                        received = [Rule.from_wire(r) for r in control.rules]
                        tables = replace_rules(conn, received)
                        capture.ensure_capture(conn, tables)
                        rules = rules_for(conn)
                        gate.rules = rules
                        result.rules_received = True
                    elif isinstance(control, TableDefinitions) and accept_rules:
                        # before the rules (their capture needs the tables)
                        made, differing = provision.provision(conn, list(control.tables))
                        result.tables_created += made
                        result.tables_differing.update(differing)
                    elif isinstance(control, Dictionary):
                        limits = getattr(stream, "limits", DEFAULT_LIMITS)
                        dictionaries.received(conn, peer, control, limits, seq)
                    continue
                if isinstance(record, TableDef):
                    table_name = record.name
                    allowed = _ops(rules, record.name, direction)
                    targets[record.index] = (
                        _Target(conn, reflect(conn, record.name), record) if allowed else None
                    )
                    continue
                assert isinstance(record, RowBatch)
                table_name = record.table.name
                target = targets.get(record.table.index)
                allowed = _ops(rules, table_name, direction)
                if target is None or record.op not in allowed:
                    refuse(
                        table_name,
                        f"the rules do not allow {OP_NAMES[record.op]}s from {peer}",
                        len(record.rows),
                    )
                    continue
                op: str = record.op
                if record.op == "U" and "I" in allowed:
                    op = "I"
                clash_test = record.op == "I" and "U" not in allowed
                detector.rules = rules  # they may have come with this changeset
                checked = (
                    reload is not None
                    or clash_test
                    or gate.needed(target.table, record.table, record.op)
                    or bool(detector.pending(target.table))
                )
                stored, rows = target.prepared(record, checked, park)
                by_id = (
                    None
                    if rows is stored
                    else {id(t): r for t, r in zip(rows, stored, strict=True)}
                )
                check = None
                if reload is not None and record.op == "I":
                    as_stored = None if by_id is None else [by_id[id(r)] for r in rows]
                    rows = reload.loaded(record.table, rows, as_stored)
                elif reload is None:
                    rows = gate.before(target.table, record.table, record.op, rows)
                    if clash_test:
                        # before the conflict test: no policy may overwrite
                        rows, clashing = gate.clashes(target.table, record.table, rows)
                        for row in clashing:
                            park(record.table, "I", row if by_id is None else by_id[id(row)], CLASH)
                        if clashing:
                            why = (table_name, CLASH_REASON)
                            before = result.parked_by_rule.get(why, 0)
                            result.parked_by_rule[why] = before + len(clashing)
                    rows = detector.resolve(target.table, record.table, record.op, rows)
                    check = gate.after(target.table, record.table, op)
                if record.op != "I":
                    loading[table_name] = False
                elif op == "I":
                    if table_name not in loading:
                        loading[table_name] = _loading(
                            conn, target.table, direction, loads, dialect
                        )
                    if loading[table_name]:
                        op = "L"  # nothing here to replace: a plain insert
                if not rows:
                    continue
                result.rows += target.guarded(
                    conn,
                    op,
                    rows,
                    park,
                    check,
                    partial(gate.refused_after, table_name),
                    by_id,
                )
                progress.tick("applying", peer, seq, result.rows, getattr(stream, "total", 0))
            result.conflicts = detector.summary()
            if reload is not None:
                mirrored = _mirrored(rules)
                for table, tdef, keys in reload.doomed(mirrored):
                    result.rows += _Target(conn, table, tdef).guarded(conn, "D", keys, park)
                    reload.settled(table, keys)
                reload.close()
                result.reloaded = True
            for name in loads:  # capture as it was, in the same transaction
                dialect.install_capture(conn, reflect(conn, name))
            # the sequence number, its parts and anything older they supersede
            links_mod.applied(conn, peer, seq, header.cid, reloaded=result.reloaded)
            if on_applied is not None:
                on_applied(conn, result)
            faults.point("in-apply")
            dialect.end_apply(conn)
    except ApplyError:
        raise
    except MailsyncError as exc:
        raise ApplyError(f"{origin}: {exc}", hint=exc.hint) from exc
    except (SQLAlchemyError, OverflowError) as exc:
        raise ApplyError(
            f"{origin}: table {table_name}: {first_line(exc)}",
            hint="fix the cause; the changeset stays buffered and is applied next cycle",
        ) from exc
    return result


def _loading(
    conn: Connection, table: Table, direction: Direction, loads: list[str], dialect: Any
) -> bool:
    """Is ``table`` empty, so that the peer's inserts (each key once in a
    changeset) need no upsert? On a station (``down``), its capture
    triggers are then taken off until the changeset is applied
    (``loads``: the caller puts them back in the same transaction): rows
    from the host are never sent anywhere from a station, which sends up
    only its own changes. On the host they stay: what a station loads may
    be relayed to the other stations."""
    if not bulk.is_empty(conn, table):
        return False
    if direction == "down" and table.name not in loads:
        dialect.drop_capture(conn, table.name)
        loads.append(table.name)
    return True


def _mirrored(rules: dict[str, Rule]) -> Callable[[str], bool]:
    """Tables a reload leaves equal to the host's: deletes travel down and
    every row travels (no row filter)."""

    def mirrored(table: str) -> bool:
        rule = rules.get(table)
        return rule is not None and "D" in rule.down and not rule.row_filter

    return mirrored


def _ops(rules: dict[str, Rule], table: str, direction: Direction) -> str:
    rule = rules.get(table)
    if rule is None:
        return ""
    return rule.down if direction == "down" else rule.up


@dataclass(frozen=True)
class ParkedRow:
    id: int
    peer: str
    seq: int
    table: str
    op: str
    values: dict[str, Any]
    error: str
    parked_at: Any


def _decode(row: Any) -> tuple[list[str], list[str], list[Any]]:
    names, pk = json.loads(row.columns)
    return names, pk, unpack(row.row)


def list_parked(conn: Connection, ids: Collection[int] | None = None) -> list[ParkedRow]:
    """The parked rows (all, or those of ``ids`` that exist), oldest first."""
    query = select(parked).order_by(parked.c.id)
    if ids is not None:
        query = query.where(parked.c.id.in_(list(ids)))
    out = []
    for r in conn.execute(query).all():
        names, _, values = _decode(r)
        out.append(
            ParkedRow(
                r.id,
                r.peer,
                r.seq,
                r.tbl,
                r.op,
                dict(zip(names, values, strict=True)),
                r.error,
                r.parked_at,
            )
        )
    return out


def retry_parked_row(conn: Connection, row_id: int) -> tuple[bool, str | None]:
    """Apply parked row ``row_id`` again, as from its peer, in ``conn``'s
    transaction (one row each, so that one that still fails keeps no other
    from applying): it leaves the parking table when it applies, else its
    error is brought up to date. Returns (found, that error or None when it
    applied); not found: another admin dropped or applied it meanwhile."""
    r = conn.execute(select(parked).where(parked.c.id == row_id)).first()
    if r is None:
        return False, None
    names, pk, values = _decode(r)
    dialect = dialect_for(conn)
    dialect.begin_apply(conn, r.peer)
    tdef = TableDef(0, r.tbl, tuple((n, "") for n in (names if r.op != "D" else pk)), tuple(pk))
    error = None
    try:
        table = reflect(conn, r.tbl)
        target = _Target(conn, table, tdef)
        with conn.begin_nested():
            target.run(conn, r.op, [_stored(conn, table, names if r.op != "D" else pk, values)])
        conn.execute(delete(parked).where(parked.c.id == r.id))
    except (SQLAlchemyError, MailsyncError) as exc:
        error = first_line(exc)
        conn.execute(update(parked).where(parked.c.id == r.id).values(error=error))
    dialect.end_apply(conn)
    return True, error


def _stored(conn: Connection, table: Table, names: list[str], values: list[Any]) -> tuple[Any, ...]:
    """A parked row's values as the driver takes them: parked since format 2
    in storage form already; before, as Python values (Decimal, dates)."""
    out = []
    for name, value in zip(names, values, strict=True):
        if isinstance(value, Decimal | dt.date | dt.time):
            process = table.c[name].type._cached_bind_processor(conn.dialect)
            value = value if process is None else process(value)
        out.append(value)
    return tuple(out)


def drop_parked(conn: Connection, ids: Collection[int] | None) -> int:
    """Forget parked rows (all, or these ids); their change is given up here."""
    stmt = delete(parked)
    if ids is not None:
        stmt = stmt.where(parked.c.id.in_(list(ids)))
    return int(conn.execute(stmt).rowcount)
