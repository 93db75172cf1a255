"""Conflict notes: the other side of a conflict hears of it.

A conflict is detected where a changeset arrives. When the two changesets
crossed in the mail, both sides detect it, each from its side; when one
side's changeset was built after it had applied the other's, only that side
can (the other receives a plain later edit). So the side that detects a
conflict records it and sends a note with its next changeset to that peer
(a control record of kind ``conflicts``, sequenced: applied once, in
order). The peer records the note as a conflict of its own (``source`` =
``peer``, ours and theirs swapped) unless it detected the same conflict
itself: a record of the same row whose window of our changesets
(``mine_from`` < n ≤ ``mine_to``, the changesets that may have carried our
version) holds the changeset the note names. Either way, every conflict is
recorded once on both nodes, and the side that lost learns it lost.

An admin's decision on a ``manual`` conflict travels the same way, from
the host only (:mod:`mailsync.conflict_resolve`): a ``resolved`` note marks
the station's records of that row resolved and, when the host's version was
kept, writes the host's values of the columns in conflict (the station may
still hold its own: it kept it while the conflict waited).

Notes are queued in ``mailsync_conflict_notes`` and taken by the build of
the next changeset to that peer, in its transaction. An older peer ignores
them (an unknown control kind). What a note says is only recorded (a
station's note can make the host show a conflict, never change a row): the
host decides.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import Connection, delete, insert, select, update

from mailsync.errors import MessageError
from mailsync.store.changelog import coerce_key, key_filter
from mailsync.store.reflection import reflect
from mailsync.store.tables import conflict_notes, conflicts_table, now
from mailsync.wire.changeset import pack, unpack

KIND = "conflicts"
#: Notes one changeset may carry (more is a broken or hostile peer).
MAX_NOTES = 10_000
_STATES = ("settled", "waiting")


@dataclass(frozen=True)
class Record:
    """A conflict as this node records it (values packed)."""

    table: str
    pk: str  # JSON
    op: str
    policy: str
    kept: str  # ours or theirs
    columns: list[str]
    ours: bytes | None
    theirs: bytes | None
    differing: list[str]
    state: str  # settled or waiting


def _insert(conn: Connection, peer: str, seq: int, record: Record, **extra: Any) -> None:
    conn.execute(
        conflicts_table.insert().values(
            at=now(),
            peer=peer,
            seq=seq,
            tbl=record.table,
            pk=record.pk,
            op=record.op,
            policy=record.policy,
            kept=record.kept,
            columns=json.dumps(record.columns),
            ours=record.ours,
            theirs=record.theirs,
            state=record.state,
            differing=json.dumps(record.differing),
            **extra,
        )
    )


def record_here(
    conn: Connection, peer: str, seq: int, record: Record, *, mine_from: int, mine_to: int
) -> None:
    """Record a conflict this node detected in ``peer``'s changeset ``seq``,
    and queue its note to the peer. Our version went out in one of our
    changesets after ``mine_from`` up to ``mine_to``."""
    _insert(conn, peer, seq, record, source="here", mine_from=mine_from, mine_to=mine_to)
    queue(
        conn,
        peer,
        {
            "k": "found",
            "seq": seq,  # the peer's changeset that carried its version
            "tbl": record.table,
            "pk": record.pk,
            "op": record.op,
            "policy": record.policy,
            "kept": record.kept,
            "columns": record.columns,
            "ours": record.ours,
            "theirs": record.theirs,
            "differing": record.differing,
            "state": record.state,
        },
    )


def queue(conn: Connection, peer: str, note: dict[str, Any]) -> None:
    """A note for ``peer``'s next changeset."""
    conn.execute(insert(conflict_notes).values(peer=peer, note=pack(note)))


def take(conn: Connection, peer: str) -> list[dict[str, Any]] | None:
    """The notes queued for ``peer``, forgotten here (in the transaction that
    builds the changeset carrying them); None when there are none."""
    rows = conn.execute(
        select(conflict_notes.c.id, conflict_notes.c.note)
        .where(conflict_notes.c.peer == peer)
        .order_by(conflict_notes.c.id)
        .limit(MAX_NOTES)
    ).all()
    if not rows:
        return None
    conn.execute(
        delete(conflict_notes).where(
            conflict_notes.c.peer == peer, conflict_notes.c.id <= rows[-1].id
        )
    )
    return [unpack(r.note) for r in rows]


def received(conn: Connection, peer: str, seq: int, payload: Any, *, from_host: bool) -> list[str]:
    """Act on the notes of ``peer``'s changeset ``seq`` (in its apply
    transaction, the origin flag set); returns lines for the log."""
    if not isinstance(payload, list) or len(payload) > MAX_NOTES:
        raise MessageError(f"conflict notes from {peer}: not a list of at most {MAX_NOTES}")
    lines: list[str] = []
    refused = 0
    for note in payload:
        kind = note.get("k") if isinstance(note, dict) else None
        if kind == "found":
            _found(conn, peer, seq, _checked(note, peer))
        elif kind == "resolved" and from_host:
            lines.append(_resolved(conn, peer, _checked_resolution(note, peer)))
        elif kind == "resolved":
            refused += 1  # only the host decides
        else:
            raise MessageError(f"conflict notes from {peer}: unknown note {kind!r}")
    if refused:
        lines.append(f"{refused} conflict decision(s) from {peer} ignored: the host decides")
    return lines


def _found(conn: Connection, peer: str, seq: int, note: dict[str, Any]) -> None:
    """Record the peer's conflict as ours, unless we detected it too."""
    c = conflicts_table.c
    same = conn.execute(
        select(c.id).where(
            c.peer == peer,
            c.tbl == note["tbl"],
            c.pk == note["pk"],
            c.source == "here",
            c.mine_from < note["seq"],
            c.mine_to >= note["seq"],
        )
    ).first()
    if same is not None:
        return
    swapped = Record(
        table=note["tbl"],
        pk=note["pk"],
        op=note["op"],
        policy=note["policy"],
        kept="ours" if note["kept"] == "theirs" else "theirs",
        columns=note["columns"],
        ours=note["theirs"],
        theirs=note["ours"],
        differing=note["differing"],
        state=note["state"],
    )
    if note["state"] == "waiting":
        swapped = replace(swapped, kept="ours")  # nobody's yet: each keeps its own
    _insert(conn, peer, seq, swapped, source="peer")


def _resolved(conn: Connection, peer: str, note: dict[str, Any]) -> str:
    """The host decided a manual conflict: our records of the row resolved,
    and the host's values of the columns in conflict written when the
    host's version was kept."""
    c = conflicts_table.c
    mine = (c.peer == peer) & (c.tbl == note["tbl"]) & (c.pk == note["pk"]) & (c.state == "waiting")
    kept = "theirs" if note["keep"] == "host" else "ours"
    conn.execute(update(conflicts_table).where(mine).values(state="resolved", kept=kept))
    what = f"table {note['tbl']} row {note['pk']}"
    if note["keep"] != "host":
        return f"{what}: the conflict was resolved on {peer}, this station's version kept"
    table = reflect(conn, note["tbl"])
    pk = list(table.primary_key.columns)
    key = coerce_key(json.loads(note["pk"]), pk)
    where = key_filter(table, [key])
    if note["row"] is None:
        conn.execute(delete(table).where(where))
    else:
        values = dict(zip(note["columns"], unpack(note["row"]), strict=True))
        values = {k: v for k, v in values.items() if k in table.c}
        changed = {k: values[k] for k in note["differing"] if k in values}
        exists = conn.execute(select(pk[0]).where(where)).first() is not None
        if not exists:
            conn.execute(insert(table).values(values))
        elif changed:
            conn.execute(update(table).where(where).values(changed))
    return f"{what}: the conflict was resolved on {peer}, {peer}'s version written here"


def _checked(note: dict[str, Any], peer: str) -> dict[str, Any]:
    """A ``found`` note with every field of its type."""
    bad = MessageError(f"conflict notes from {peer}: a malformed note")
    if not isinstance(note.get("seq"), int) or isinstance(note.get("seq"), bool):
        raise bad
    for name in ("tbl", "pk", "op", "policy", "kept", "state"):
        if not isinstance(note.get(name), str):
            raise bad
    if note["kept"] not in ("ours", "theirs") or note["state"] not in _STATES:
        raise bad
    for name in ("columns", "differing"):
        value = note.get(name)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad
    for name in ("ours", "theirs"):
        if note.get(name) is not None and not isinstance(note[name], bytes):
            raise bad
    return note


def _checked_resolution(note: dict[str, Any], peer: str) -> dict[str, Any]:
    bad = MessageError(f"conflict notes from {peer}: a malformed decision")
    for name in ("tbl", "pk", "keep"):
        if not isinstance(note.get(name), str):
            raise bad
    if note["keep"] not in ("host", "station"):
        raise bad
    for name in ("columns", "differing"):
        value = note.get(name)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad
    if note.get("row") is not None and not isinstance(note["row"], bytes):
        raise bad
    return note
