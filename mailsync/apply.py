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

from mailsync import (
    capture,
    conflict_notes,
    definitions,
    dictionaries,
    faults,
    joined,
    progress,
    provision,
    table_requests,
)
from mailsync import link as links_mod
from mailsync.admission import CLASH, CLASH_REASON, Gate
from mailsync.conflicts import Detector
from mailsync.dialects import bulk, dialect_for
from mailsync.errors import ApplyError, MailsyncError, first_line
from mailsync.keys import PublicKey
from mailsync.reload import Reload
from mailsync.rules import OP_NAMES, Direction, Rule, replace_rules
from mailsync.store.engine import transaction
from mailsync.store.reflection import reflect, table_names
from mailsync.store.tables import now, parked
from mailsync.target import Parker, Target
from mailsync.trust import trust_key
from mailsync.wire import rowinfo
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
from mailsync.wire.rowinfo import RowInfo
from mailsync.wire.station_controls import parse_sequenced as parse_served
from mailsync.wire.verify_controls import VerifyAnswer, VerifyRequest


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
    #: local edits overwritten (this link never carries them), and the
    #: peer's conflict notes acted on: a log line each
    overwritten: list[str] = field(default_factory=list)
    #: tables created from the definitions a load brought (:mod:`mailsync.provision`)
    tables_created: list[str] = field(default_factory=list)
    #: tables this node has that differ from their definition, and how
    tables_differing: dict[str, list[str]] = field(default_factory=dict)
    #: station: the host acted on our own reload request (what it asked for)
    served: str | None = None
    #: ``mailsync verify`` rounds and answers it carried, acted on by the
    #: cycle before the transaction commits (:mod:`mailsync.cycle.verify`)
    verify: list[VerifyRequest | VerifyAnswer] = field(default_factory=list)

    #: columns added here from the definitions a changeset brought, per table
    columns_added: dict[str, list[str]] = field(default_factory=dict)
    #: definitions refused (a table outside this node's rules, a bad name), why
    tables_refused: dict[str, str] = field(default_factory=dict)
    #: tables sent again in full for a new definition or a resync (not a restore)
    tables_refreshed: list[str] = field(default_factory=list)
    #: per table, the sender's columns this node does not have (ignored)
    columns_ignored: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: per table whose rows do not fit here (a column missing, another key): why;
    #: its rows are parked, the rest of the changeset applies
    tables_stopped: dict[str, str] = field(default_factory=dict)


class Deferred(Exception):
    """The changeset carries a table this run leaves out (``sync --table``):
    rolled back, it stays buffered for a run that includes it."""


RulesFor = Callable[[Connection], dict[str, Rule]]

#: Local rows a reload did not bring are looked up and deleted this many at a time.
RELOAD_BATCH = 1000
#: Opens the buffered changeset in the apply transaction: (conn, origin) →
#: its verified header and a stream of its records.
Opener = Callable[[Connection, str], tuple[Header, Source]]


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
            row=pack([_parkable(v) for v in row]),
            error=error,
            parked_at=now(),
        )
    )


def _parkable(value: Any) -> Any:
    """A row's value as a parked row keeps it: a driver's wrapper (psycopg
    wraps bytes in ``Binary`` on their way to PostgreSQL) gives back what it
    wraps, so that a row a PostgreSQL table refuses is parked, not a
    changeset stalled by a value the changeset codec does not know."""
    inner = getattr(value, "obj", None)
    return inner if inner is not None and type(value).__name__ == "Binary" else value


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
    only_tables: frozenset[str] | None = None,
) -> Applied:
    """Apply the buffered changeset ``seq`` from ``peer`` in one transaction
    (its own, or a savepoint of ``within``'s).

    The changeset streams from ``opener`` batch by batch: memory holds one
    part and one batch of rows, whatever its size.

    ``direction`` is the direction the changeset travelled (``down`` when a
    remote applies the host's changes), which picks the operations allowed.
    Raises ApplyError (the envelope stays buffered, the link waits), or
    :class:`Deferred` (rolled back, not a failure) for a changeset with a
    table outside ``only_tables`` (a run limited by ``sync --table``).
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
            targets: dict[int, Target | None] = {}
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
            #: the tables a ``reload`` control names; all of them (and the
            #: rows of every table go ungated) only for a restored station's
            #: full reload (header base 0), else a refresh of these tables
            reloading: set[str] = set()
            whole = False

            #: what the sender says of the rows of its next batch
            info: RowInfo | None = None
            for record in read_changeset(stream, origin=origin):
                if isinstance(record, Control):
                    if record.kind == rowinfo.KIND:
                        info = rowinfo.parse(record.payload)
                        continue
                    if record.kind == conflict_notes.KIND:
                        result.overwritten += conflict_notes.received(
                            conn, peer, seq, record.payload, from_host=direction == "down"
                        )
                        continue
                    control = parse_sequenced(record.kind, record.payload)
                    if isinstance(control, FullLoad) and accept_rules and reload is None:
                        reload = Reload(conn, peer, list(control.tables), RELOAD_BATCH)
                        reloading, whole = set(control.tables), header.base == 0
                        if not whole:
                            result.tables_refreshed += list(control.tables)
                    elif isinstance(control, KeyAnnouncement):
                        # signed with the key we trust now: the peer's next one
                        trust_key(conn, peer, PublicKey.parse(control.token))
                        result.key_received = True
                    elif isinstance(control, RulesUpdate) and accept_rules:
                        received = [Rule.from_wire(r) for r in control.rules]
                        tables = replace_rules(conn, received)
                        # a table its definition is yet to create gets its
                        # capture when it is created
                        present = set(table_names(conn))
                        capture.ensure_capture(conn, [t for t in tables if t in present])
                        joined.narrow(conn, tables)
                        rules = rules_for(conn)
                        gate.rules = rules
                        result.rules_received = True
                    elif isinstance(control, TableDefinitions) and accept_rules:
                        # after the rules: only tables they name are made
                        done = provision.provision(conn, list(control.tables), allowed=rules)
                        capture.ensure_capture(conn, [t for t in done.created if t in rules])
                        definitions.received(conn, peer, done.accepted)
                        result.tables_created += done.created
                        result.tables_differing.update(done.differing)
                        result.columns_added.update(done.added)
                        result.tables_refused.update(done.refused)
                    elif isinstance(control, Dictionary):
                        limits = getattr(stream, "limits", DEFAULT_LIMITS)
                        dictionaries.received(conn, peer, control, limits, seq)
                    elif control is None and accept_rules:
                        answer = parse_served(record.kind, record.payload)
                        if answer is not None:
                            result.served = table_requests.served(conn, peer, answer.request)
                    elif isinstance(control, VerifyRequest | VerifyAnswer):
                        result.verify.append(control)  # after the rows
                    continue
                if isinstance(record, TableDef):
                    table_name = record.name
                    if only_tables is not None and record.name not in only_tables:
                        raise Deferred(record.name)
                    allowed = _ops(rules, record.name, direction)
                    made = (
                        Target(conn, reflect(conn, record.name), record, lenient=direction == "up")
                        if allowed
                        else None
                    )
                    targets[record.index] = made
                    if made is not None and made.ignored and made.broken is None:
                        result.columns_ignored[record.name] = made.ignored
                    continue
                assert isinstance(record, RowBatch)
                table_name = record.table.name
                said, info = info, None
                target = targets.get(record.table.index)
                if target is not None and target.broken is not None:
                    for row in record.rows:  # held, not lost: retried once fixed
                        park(record.table, record.op, row, target.broken)
                    result.tables_stopped[table_name] = target.broken
                    continue
                if target is not None:
                    record = target.project(record)
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
                reloaded = reload is not None and (whole or table_name in reloading)
                checked = (
                    reloaded
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
                if reload is not None and reloaded and record.op == "I":
                    as_stored = None if by_id is None else [by_id[id(r)] for r in rows]
                    rows = reload.loaded(record.table, rows, as_stored)
                elif not reloaded:
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
                    rows = detector.resolve(
                        target.table,
                        record.table,
                        record.op,
                        rows,
                        said,
                        partial(_park_partial, park, record.table, by_id),
                    )
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
            result.overwritten += detector.overwritten_lines()
            if reload is not None:
                mirrored = _mirrored(rules)
                for table, tdef, keys in reload.doomed(mirrored):
                    result.rows += Target(conn, table, tdef).guarded(conn, "D", keys, park)
                    reload.settled(table, keys)
                reload.close()
                result.reloaded = whole
                if not whole:  # a refresh brings what older changesets parked of it
                    conn.execute(
                        delete(parked).where(
                            parked.c.peer == peer,
                            parked.c.seq < seq,
                            parked.c.tbl.in_(sorted(reloading)),
                        )
                    )
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


def _park_partial(
    park: Parker,
    tdef: TableDef,
    by_id: dict[int, tuple[Any, ...]] | None,
    row: tuple[Any, ...],
    error: str,
) -> None:
    """Park a row of which only some columns were to apply (a conflict
    settled column by column), as an update of the whole row."""
    park(tdef, "U", row if by_id is None else by_id[id(row)], error)


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
    """Tables a reload leaves equal to the host's: deletes travel down (a
    row filter bounds the station's scope both ways, so a row the load of a
    filtered table did not bring lies outside it, and leaves)."""

    def mirrored(table: str) -> bool:
        rule = rules.get(table)
        return rule is not None and "D" in rule.down

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
        target = Target(conn, table, tdef)
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
