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

import json
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from sqlalchemy import Connection, Engine, Table, bindparam, delete, select, update
from sqlalchemy.exc import SQLAlchemyError

from mailsync import capture, faults
from mailsync import link as links_mod
from mailsync.admission import CLASH, CLASH_REASON, Check, Gate
from mailsync.conflicts import Detector
from mailsync.dialects import dialect_for
from mailsync.errors import ApplyError, MailsyncError, SchemaError, first_line
from mailsync.keys import PublicKey
from mailsync.reload import Reload
from mailsync.rules import OP_NAMES, Direction, Rule, replace_rules
from mailsync.store.changelog import key_filter
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
from mailsync.wire.controls import FullLoad, KeyAnnouncement, RulesUpdate, parse_sequenced
from mailsync.wire.envelope import Header


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


RulesFor = Callable[[Connection], dict[str, Rule]]

#: Local rows a reload did not bring are looked up and deleted this many at a time.
RELOAD_BATCH = 1000
#: Opens the buffered changeset in the apply transaction: (conn, origin) →
#: its verified header and a stream of its records.
Opener = Callable[[Connection, str], tuple[Header, Source]]


class _Target:
    """A local table matched against the sender's declaration."""

    def __init__(self, table: Table, tdef: TableDef) -> None:
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
        names = tdef.column_names
        self._update = (
            update(table)
            .where(*[table.c[k] == bindparam(f"k_{k}") for k in pk])
            .values({c: bindparam(f"v_{c}") for c in names if c not in pk})
        )
        self._names = names
        self._pk = pk

    def upsert(self, conn: Connection, rows: list[tuple[Any, ...]]) -> None:
        dialect_for(conn).upsert(
            conn, self.table, [dict(zip(self._names, r, strict=True)) for r in rows]
        )

    def update(self, conn: Connection, rows: list[tuple[Any, ...]]) -> None:
        if len(self._names) == len(self._pk):
            return  # nothing but the key: an update changes nothing
        params = []
        for row in rows:
            values = dict(zip(self._names, row, strict=True))
            params.append(
                {
                    **{f"v_{c}": v for c, v in values.items() if c not in self._pk},
                    **{f"k_{k}": values[k] for k in self._pk},
                }
            )
        conn.execute(self._update, params)

    def delete(self, conn: Connection, keys: list[tuple[Any, ...]]) -> None:
        conn.execute(delete(self.table).where(key_filter(self.table, keys)))

    def run(self, conn: Connection, op: str, rows: list[tuple[Any, ...]]) -> None:
        """``op``: D delete, I upsert, U update only (no insert right)."""
        {"D": self.delete, "I": self.upsert, "U": self.update}[op](conn, rows)

    def guarded(
        self,
        conn: Connection,
        op: str,
        rows: list[tuple[Any, ...]],
        park: Parker,
        check: Check | None = None,
        outside: Callable[[int], None] | None = None,
    ) -> int:
        """Apply a batch; if it fails, row by row, parking the rows that fail
        (constraint, foreign key, type) so that they never stall the link.

        ``check`` (a row filter to keep) names the rows the batch, written
        in its savepoint, left outside; then nothing of the batch stays, those
        rows are counted by ``outside`` and the rest is applied again."""
        while rows:
            try:
                with conn.begin_nested():
                    self.run(conn, op, rows)
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
                    self.run(conn, op, [row])
                    if check is not None and check([row]):
                        raise _Outside([row])
                done += 1
            except _Outside:
                if outside is not None:
                    outside(1)
            except (SQLAlchemyError, OverflowError) as exc:
                park(self.tdef, op, row, first_line(exc))
        return done


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
                    continue
                if isinstance(record, TableDef):
                    table_name = record.name
                    allowed = _ops(rules, record.name, direction)
                    targets[record.index] = (
                        _Target(reflect(conn, record.name), record) if allowed else None
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
                op = "I" if record.op == "I" or (record.op == "U" and "I" in allowed) else record.op
                rows = record.rows
                check = None
                if reload is not None and record.op == "I":
                    rows = reload.loaded(record.table, rows)
                elif reload is None:
                    rows = gate.before(target.table, record.table, record.op, rows)
                    if record.op == "I" and "U" not in allowed:
                        # before the conflict test: no policy may overwrite
                        rows, clashing = gate.clashes(target.table, record.table, rows)
                        for row in clashing:
                            park(record.table, "I", row, CLASH)
                        if clashing:
                            why = (table_name, CLASH_REASON)
                            before = result.parked_by_rule.get(why, 0)
                            result.parked_by_rule[why] = before + len(clashing)
                    detector.rules = rules  # they may have come with this changeset
                    rows = detector.resolve(target.table, record.table, record.op, rows)
                    check = gate.after(target.table, record.table, op)
                if not rows:
                    continue
                result.rows += target.guarded(
                    conn,
                    op,
                    rows,
                    park,
                    check,
                    partial(gate.refused_after, table_name),
                )
            result.conflicts = detector.summary()
            if reload is not None:
                mirrored = _mirrored(rules)
                for table, tdef, keys in reload.doomed(mirrored):
                    result.rows += _Target(table, tdef).guarded(conn, "D", keys, park)
                    reload.settled(table, keys)
                reload.close()
                result.reloaded = True
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
        target = _Target(reflect(conn, r.tbl), tdef)
        with conn.begin_nested():
            target.run(conn, r.op, [tuple(values)])
        conn.execute(delete(parked).where(parked.c.id == r.id))
    except (SQLAlchemyError, MailsyncError) as exc:
        error = first_line(exc)
        conn.execute(update(parked).where(parked.c.id == r.id).values(error=error))
    dialect.end_apply(conn)
    return True, error


def drop_parked(conn: Connection, ids: Collection[int] | None) -> int:
    """Forget parked rows (all, or these ids); their change is given up here."""
    stmt = delete(parked)
    if ids is not None:
        stmt = stmt.where(parked.c.id.in_(list(ids)))
    return int(conn.execute(stmt).rowcount)
