"""``mailsync verify`` over mail: the host's verifications, the station's answers, the repair.

:mod:`mailsync.verify` compares one side's rows with another's by rounds
of digests over key spans. Here those rounds travel: the host keeps one row
per verification in ``mailsync_verifications`` (the spans still to look at,
its own side of the round it asked, the keys found so far), so a
verification survives a restart and runs across as many cycles as the mail
takes. Each round is a :class:`~mailsync.wire.verify_controls.VerifyRequest`
in the host's next changeset to the station, answered by a
:class:`~mailsync.wire.verify_controls.VerifyAnswer` in the station's next
changeset up — the sequenced path, so a lost, duplicated or reordered mail
changes nothing, and the station answers at the state the host's earlier
changesets left it in. A link's ``verify_due`` flag tells the build that a
request, an answer or a repair waits for it (an idle link reads nothing).

The host's side of a round is computed when it asks (the state the station
will hold once it has applied everything sent before the request); a cut the
station makes itself (a span where it holds many rows the host has not) is
digested by the host when the answer arrives. The host's side is the rows of
the table **in the station's scope** (the rule's row filter, for that
station, exactly as the build sends them); the station's side is every row
of its copy, so a row the station should not hold shows as extra.

What a station answers is checked against what was asked: its own
verification (another station's answer is refused), the round in progress
(a replayed or stale answer is refused), one item per span asked, keys
inside their span, a cut that covers its span. A station that lies in its
digests only makes the host narrow further: every verification is bounded
(:data:`MAX_ROUNDS` rounds, :data:`MAX_FOUND` keys, :data:`MAX_TODO` spans
waiting) and ends ``failed`` with the reason when a bound is reached.

Repair (``--repair``) sends the differing rows again from the side that owns
the direction: host → station tables (and two-way tables unless the policy
is ``remote-wins``) by a keyed resend in the host's next changeset to that
station alone (rows as they are now, in the station's scope; a key the host
lacks, or holds outside the scope, as a delete where the rule sends
deletes); station → host tables (and two-way ``remote-wins``) by asking the
station to log those keys as its own changes, so its next changeset sends
them (a key it lacks as a delete). The rules still apply on the way in.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import Connection, Row, select, update
from sqlalchemy.exc import SQLAlchemyError

from mailsync import link as links_mod
from mailsync.errors import MailsyncError, first_line
from mailsync.rules import Rule, effective_rules, filter_predicate
from mailsync.store.tables import now, verifications
from mailsync.verify import (
    FAN_OUT,
    LEAF_ROWS,
    Key,
    Side,
    Span,
    key_order,
)
from mailsync.wire.verify_controls import (
    MAX_ASK,
    AnswerItem,
    VerifyAnswer,
    VerifyRequest,
    parse_key,
    wire_key,
)

#: A verification that has not found its end in this many rounds fails.
MAX_ROUNDS = 64
#: More differing keys than this: a verification stops (reload the table).
MAX_FOUND = 10_000
#: At most this many spans wait for a later round.
MAX_TODO = 4096

RUNNING, DONE, REPAIRING, REPAIRED, FAILED, SUPERSEDED = (  # the states
    "running",
    "done",
    "repairing",
    "repaired",
    "failed",
    "superseded",
)
#: states of a verification still in progress
OPEN = (RUNNING, REPAIRING)
HOST: Literal["host"] = "host"
STATION: Literal["station"] = "station"


@dataclass(frozen=True)
class Found:
    """A key whose rows differ, and which side holds a row under it."""

    key: Key
    host: bool
    station: bool

    def to_json(self) -> dict[str, Any]:
        return {"key": wire_key(self.key), "host": self.host, "station": self.station}


@dataclass(frozen=True)
class Verification:
    """One verification of one table at one station, as the host keeps it."""

    id: int
    station: str
    table: str
    state: str
    repair: bool
    started_at: dt.datetime
    finished_at: dt.datetime | None
    rounds: int
    rows_compared: int
    differing: int
    error: str | None
    found: tuple[Found, ...] = field(default=())

    @property
    def finished(self) -> bool:
        return self.state not in OPEN

    @property
    def equal(self) -> bool:
        return self.state == DONE and self.differing == 0

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "station": self.station,
            "table": self.table,
            "state": self.state,
            "repair": self.repair,
            "started_at": self.started_at.isoformat(),
            "finished_at": None if self.finished_at is None else self.finished_at.isoformat(),
            "rounds": self.rounds,
            "rows_compared": self.rows_compared,
            "differing": self.differing,
            "error": self.error,
            "keys": [f.to_json() for f in self.found],
        }

    @classmethod
    def from_row(cls, row: Row[Any]) -> Verification:
        found = tuple(
            Found(parse_key("verify", f["key"]), bool(f["host"]), bool(f["station"]))
            for f in json.loads(row.found or "[]")
        )
        return cls(
            id=int(row.id),
            station=row.peer,
            table=row.tbl,
            state=row.state,
            repair=bool(row.repair),
            started_at=links_mod.aware(row.started_at),
            finished_at=None if row.finished_at is None else links_mod.aware(row.finished_at),
            rounds=int(row.rounds),
            rows_compared=int(row.rows_compared),
            differing=int(row.differing),
            error=row.error,
            found=found,
        )


Owner = Literal["host", "station"]


def owner(rule: Rule) -> Owner:
    """Which side a repair sends the rows from: the one whose changes travel;
    both travel (two-way): as the conflict policy says (``remote-wins``:
    the station; every other policy: the host, the reference copy)."""
    if rule.up and not rule.down:
        return STATION
    if rule.down and not rule.up:
        return HOST
    return STATION if rule.conflict == "remote-wins" else HOST


# ------------------------------------------------------------------ reading


def get(conn: Connection, ident: int) -> Verification:
    row = conn.execute(select(verifications).where(verifications.c.id == ident)).one()
    return Verification.from_row(row)


def latest(
    conn: Connection, station: str | None = None, table: str | None = None
) -> list[Verification]:
    """The last verification of each (station, table), in that order."""
    query = select(verifications).where(verifications.c.side == HOST)
    if station is not None:
        query = query.where(verifications.c.peer == station)
    if table is not None:
        query = query.where(verifications.c.tbl == table)
    last: dict[tuple[str, str], Row[Any]] = {}
    for row in conn.execute(query.order_by(verifications.c.id)):
        last[row.peer, row.tbl] = row
    return [Verification.from_row(last[k]) for k in sorted(last)]


# ---------------------------------------------------------------- the host


def _side(conn: Connection, station: str, table: str) -> Side:
    """The host's rows of ``table`` in ``station``'s scope."""
    rule = effective_rules(conn, station).get(table)
    where = None
    if rule is not None and rule.row_filter:
        where = filter_predicate(rule.row_filter, station)
    return Side(conn, table, where)


def start(conn: Connection, station: str, table: str, *, repair: bool) -> Verification:
    """Begin verifying ``table`` at ``station`` (one that runs already for
    them is superseded: its answers are refused from now on); the first
    round goes with the next build to the station."""
    stamp = now()
    conn.execute(
        update(verifications)
        .where(
            verifications.c.side == HOST,
            verifications.c.peer == station,
            verifications.c.tbl == table,
            verifications.c.state.in_(OPEN),
        )
        .values(state=SUPERSEDED, finished_at=stamp, updated_at=stamp, outgoing=None)
    )
    ident = conn.execute(
        verifications.insert().values(
            vid=secrets.token_hex(8),
            side=HOST,
            peer=station,
            tbl=table,
            state=RUNNING,
            repair=repair,
            started_at=stamp,
            updated_at=stamp,
            todo=json.dumps([[None, None]]),
            found="[]",
        )
    ).inserted_primary_key
    assert ident is not None
    row = conn.execute(select(verifications).where(verifications.c.id == ident[0])).one()
    _next_round(conn, row, _side(conn, station, table), [])
    return get(conn, int(ident[0]))


def _next_round(conn: Connection, row: Row[Any], side: Side, found: list[Found]) -> list[Note]:
    """Ask about the spans waiting: the host cuts a span it holds many rows
    of (its digests of the parts), and asks for the row hashes of one it
    holds few of (the station cuts it if it holds many)."""
    todo = [(_bound(lo), _bound(hi)) for lo, hi in json.loads(row.todo or "[]")]
    if row.rounds >= MAX_ROUNDS:
        raise Refused(f"no end after {MAX_ROUNDS} rounds: the station's answers do not agree")
    ask: list[tuple[str, Key | None, Key | None]] = []
    expect: list[Any] = []
    while todo and len(ask) + FAN_OUT <= MAX_ASK:
        span = Span(*todo.pop(0))
        if side.count(span) > LEAF_ROWS:
            for d in side.plan(span):
                ask.append(("d", d.span.lo, d.span.hi))
                expect.append([d.rows, d.digest])
        else:
            ask.append(("r", span.lo, span.hi))
            expect.append([[wire_key(k), h] for k, h in side.row_hashes(span).items()])
    request = VerifyRequest(row.vid, row.tbl, row.rounds + 1, tuple(ask))
    conn.execute(
        update(verifications)
        .where(verifications.c.id == row.id)
        .values(
            rounds=row.rounds + 1,
            todo=json.dumps([[wire_key(lo), wire_key(hi)] for lo, hi in todo]),
            expect=json.dumps(
                [
                    [k, wire_key(lo), wire_key(hi), e]
                    for (k, lo, hi), e in zip(ask, expect, strict=True)
                ]
            ),
            found=json.dumps([f.to_json() for f in found]),
            outgoing=json.dumps([request.KIND, request.payload()]),
            sent_seq=None,
            updated_at=now(),
        )
    )
    links_mod.verify_due(conn, row.peer)
    return []


def _bound(value: Any) -> Key | None:
    return None if value is None else parse_key("verify", value)


def _fail(conn: Connection, row: Row[Any], error: str) -> None:
    stamp = now()
    conn.execute(
        update(verifications)
        .where(verifications.c.id == row.id)
        .values(state=FAILED, error=error, outgoing=None, finished_at=stamp, updated_at=stamp)
    )


class Refused(MailsyncError):
    """An answer that does not fit what was asked (a station's bug or lie)."""


Note = tuple[str, str]


def answered(conn: Connection, peer: str, answer: VerifyAnswer) -> list[Note]:
    """Act on a station's answer (in the transaction applying the changeset
    that carried it): compare, then ask the next round, finish, or repair.
    Returns (event, line) for the log."""
    row = conn.execute(
        select(verifications).where(verifications.c.side == HOST, verifications.c.vid == answer.vid)
    ).first()
    if row is None:
        return [("verify-refused", f"{peer} answered verification {answer.vid}, never asked")]
    if row.peer != peer:
        return [
            (
                "verify-refused",
                f"{peer} answered the verification of {row.tbl} at {row.peer} (#{row.id}): "
                "not its own",
            )
        ]
    if (
        row.state != RUNNING
        or row.rounds != answer.round
        or row.sent_seq is None
        or answer.table != row.tbl
    ):
        return [
            (
                "verify-refused",
                f"{peer} answered round {answer.round} of verification #{row.id} of {row.tbl}, "
                f"which is {row.state} at round {row.rounds}: stale or replayed",
            )
        ]
    if answer.error is not None:
        _fail(conn, row, f"{peer} cannot answer: {answer.error}")
        return [("verify-failed", f"verification #{row.id} of {row.tbl} at {peer}: {answer.error}")]
    try:
        with conn.begin_nested():  # what fails leaves nothing half-written
            return _advance(conn, row, peer, answer)
    except Refused as exc:
        why = f"answer to round {answer.round} refused: {exc}"
    except (MailsyncError, SQLAlchemyError, ValueError, TypeError, ArithmeticError) as exc:
        why = f"cannot go on: {first_line(exc)}"
    _fail(conn, row, why)
    return [("verify-failed", f"verification #{row.id} of {row.tbl} at {peer}: {why}")]


def _advance(conn: Connection, row: Row[Any], peer: str, answer: VerifyAnswer) -> list[Note]:
    """Compare the answer, then ask the next round, or finish."""
    side = _side(conn, peer, row.tbl)
    found = [
        Found(parse_key("verify", f["key"]), f["host"], f["station"])
        for f in json.loads(row.found or "[]")
    ]
    todo = [(_bound(lo), _bound(hi)) for lo, hi in json.loads(row.todo or "[]")]
    compared = _compare(side, json.loads(row.expect or "[]"), answer.items, todo, found)
    if len(found) > MAX_FOUND or len(todo) > MAX_TODO:
        raise Refused(
            f"more than {MAX_FOUND:,} rows differ: send the table again "
            f"(`mailsync reload --station {peer} --table {row.tbl}`)"
        )
    conn.execute(
        update(verifications)
        .where(verifications.c.id == row.id)
        .values(
            rows_compared=row.rows_compared + compared,
            differing=len(found),
            todo=json.dumps([[wire_key(lo), wire_key(hi)] for lo, hi in todo]),
        )
    )
    row = conn.execute(select(verifications).where(verifications.c.id == row.id)).one()
    if todo:
        return _next_round(conn, row, side, found)
    return _finish(conn, row, found)


def _compare(
    side: Side,
    expect: list[Any],
    items: Sequence[AnswerItem],
    todo: list[tuple[Key | None, Key | None]],
    found: list[Found],
) -> int:
    """Compare a round's answer with the host's side; spans that differ join
    ``todo``, keys that differ ``found``. Returns the rows found equal."""
    if len(items) != len(expect):
        raise Refused(f"{len(items)} item(s) answer {len(expect)} asked")
    equal = 0
    for (kind, lo, hi, mine), item in zip(expect, items, strict=True):
        span = Span(_bound(lo), _bound(hi))
        if kind == "d":
            if item[0] != "d":
                raise Refused("a digest was asked, something else answered")
            if [item[1], item[2]] == mine:
                equal += int(mine[0])
            else:
                todo.append((span.lo, span.hi))
        elif item[0] == "r":
            theirs: dict[Key, str] = {}
            for key, hashed in item[1]:
                if not _within(key, span) or len(key) != len(side.pk):
                    raise Refused(f"key {wire_key(key)} lies outside the span asked")
                theirs[key] = hashed
            ours = {parse_key("verify", k): h for k, h in mine}
            for key in sorted(set(ours) | set(theirs), key=key_order):
                if ours.get(key) != theirs.get(key):
                    found.append(Found(key, key in ours, key in theirs))
                else:
                    equal += 1
        elif item[0] == "p":
            cut: list[tuple[Key | None, Key | None, int, str]] = list(item[1])
            _check_cut(span, cut)
            spans = [Span(a, b) for a, b, _, _ in cut]
            for (_, _, rows, digest), d in zip(cut, side.digests(spans), strict=True):
                if (rows, digest) == (d.rows, d.digest):
                    equal += rows
                else:
                    todo.append((d.span.lo, d.span.hi))
        else:
            raise Refused("row hashes were asked, a digest answered")
    return equal


def _within(key: Key, span: Span) -> bool:
    order = key_order(key)
    if span.lo is not None and order < key_order(span.lo):
        return False
    return span.hi is None or order < key_order(span.hi)


def _check_cut(span: Span, cut: list[tuple[Key | None, Key | None, int, str]]) -> None:
    """A station's cut of ``span`` must cover it with consecutive, growing
    spans (or the host would compare something other than what it asked)."""
    if cut[0][0] != span.lo or cut[-1][1] != span.hi:
        raise Refused("a cut does not cover the span asked")
    for (_, hi, _, _), (lo, _, _, _) in itertools.pairwise(cut):
        if hi is None or hi != lo:
            raise Refused("a cut's spans do not follow each other")
    for lo, hi, _, _ in cut:
        if lo is not None and hi is not None and not key_order(lo) < key_order(hi):
            raise Refused("a cut's span is empty or backwards")


def _finish(conn: Connection, row: Row[Any], found: list[Found]) -> list[Note]:
    stamp = now()
    values: dict[str, Any] = {
        "found": json.dumps([f.to_json() for f in found]),
        "differing": len(found),
        "expect": None,
        "todo": None,
        "updated_at": stamp,
    }
    summary = (
        f"verification #{row.id} of {row.tbl} at {row.peer}: {row.rows_compared:,} rows "
        f"equal, {len(found)} differ"
    )
    if len(found) > 0 and row.repair:
        rule = effective_rules(conn, row.peer).get(row.tbl)
        side = HOST if rule is None else owner(rule)
        if side == HOST:
            values["outgoing"] = json.dumps(["resend", [wire_key(f.key) for f in found]])
        else:
            request = VerifyRequest(
                row.vid, row.tbl, row.rounds + 1, (), tuple(f.key for f in found)
            )
            values["outgoing"] = json.dumps([request.KIND, request.payload()])
        values["state"] = REPAIRING
        conn.execute(update(verifications).where(verifications.c.id == row.id).values(**values))
        links_mod.verify_due(conn, row.peer)
        by = (
            "the host sends them again"
            if side == HOST
            else f"{row.peer} is asked to send them again"
        )
        return [("verify", f"{summary}; repair: {by}")]
    values.update(state=DONE, finished_at=stamp, outgoing=None)
    conn.execute(update(verifications).where(verifications.c.id == row.id).values(**values))
    named = ", ".join(str(wire_key(f.key)) for f in found[:10]) + (" …" if len(found) > 10 else "")
    return [("verify", summary + (f": {named}" if found else ""))]


# ------------------------------------------------------------- the build


@dataclass
class Outgoing:
    """What verifications have for one build to a peer."""

    ids: list[int] = field(default_factory=list)
    #: controls (kind, payload) to carry
    controls: list[tuple[str, Any]] = field(default_factory=list)
    #: the host's keyed resends: per table, keys in the columns' Python values
    resends: dict[str, list[tuple[Any, ...]]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.controls or self.resends)


def due(conn: Connection, peer: str) -> Outgoing:
    """What waits for the next build to ``peer`` (its link's ``verify_due``)."""
    out = Outgoing()
    rows = conn.execute(
        select(verifications)
        .where(verifications.c.peer == peer, verifications.c.outgoing.is_not(None))
        .order_by(verifications.c.id)
    )
    for row in rows:
        out.ids.append(int(row.id))
        kind, payload = json.loads(row.outgoing)
        if kind == "resend":
            side = Side(conn, row.tbl)
            keys = [side.python_key(parse_key("verify", k)) for k in payload]
            out.resends.setdefault(row.tbl, []).extend(keys)
        else:
            out.controls.append((kind, payload))
    return out


def sent(conn: Connection, peer: str, seq: int | None, out: Outgoing) -> None:
    """The build to ``peer`` carried ``out`` in changeset ``seq`` (None: it
    had nothing to carry): a repair is sent, a round or an answer asked."""
    stamp = now()
    mine = verifications.c
    if out.ids:
        conn.execute(
            update(verifications)
            .where(mine.id.in_(out.ids), mine.state == REPAIRING)
            .values(state=REPAIRED, finished_at=stamp)
        )
        conn.execute(
            update(verifications)
            .where(mine.id.in_(out.ids))
            .values(outgoing=None, sent_seq=seq, updated_at=stamp)
        )
    links_mod.verify_due(conn, peer, False)
