"""A station's part of ``mailsync verify``: answer the host's rounds, send keys again.

The host asks (:mod:`mailsync.verification`); the station answers each
round in the transaction applying the changeset that carried it — so at the
state the host's earlier changesets left it in — and the answer waits for
the station's next build up (its link's ``verify_due``). The station's
side is every row of its copy of the table: a row it should not hold shows
as extra. A span it holds many rows of (more than
:data:`~mailsync.wire.verify_controls.MAX_LEAF_ANSWER`) where the host
asked for row hashes is cut by the station and answered with its digests
of the parts. A repair of a table the station owns names keys to send
again: they are logged as the station's own changes (an update where the
row is here, a delete where it is not), so its next changeset sends them.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, delete, select, update
from sqlalchemy.exc import SQLAlchemyError

from mailsync import link as links_mod
from mailsync.errors import MailsyncError, RuleError, first_line
from mailsync.rules import effective_rules
from mailsync.storage import key_to_storage
from mailsync.store.changelog import key_filter
from mailsync.store.reflection import reflect
from mailsync.store.tables import changes, now, verifications
from mailsync.verification import REPAIRED, RUNNING, STATION, Note
from mailsync.verify import FAN_OUT, Key, Side, Span
from mailsync.wire.verify_controls import (
    MAX_LEAF_ANSWER,
    AnswerItem,
    VerifyAnswer,
    VerifyRequest,
)


def asked(conn: Connection, host: str, request: VerifyRequest) -> list[Note]:
    """Answer a round (in the transaction applying the changeset that
    carried it, so at the state the host's earlier changesets left): the
    answer waits for our next build. A repair's keys are logged as our own
    changes, so that build sends their rows (or deletes) up."""
    try:
        with conn.begin_nested():  # what fails leaves nothing half-written
            if request.table not in effective_rules(conn, None):
                # nothing is told about a table that does not travel
                raise RuleError(f"table {request.table!r} is not synced here")
            side = Side(conn, request.table)
            items = _answer(side, request)
            touched = _touch(conn, side, request.resend) if request.resend else 0
        answer = VerifyAnswer(request.vid, request.table, request.round, tuple(items))
    except (MailsyncError, SQLAlchemyError, ValueError, TypeError, ArithmeticError) as exc:
        # the host hears why, rather than wait: the link is not held for it
        why = str(exc) if isinstance(exc, MailsyncError) else first_line(exc)
        answer = VerifyAnswer(request.vid, request.table, request.round, (), why[:1000])
        touched = 0
    stamp = now()
    record = {
        "state": REPAIRED if request.resend else RUNNING,
        "rounds": request.round,
        "outgoing": None if request.resend else json.dumps([answer.KIND, answer.payload()]),
        "updated_at": stamp,
        "error": answer.error,
    }
    mine = verifications.c
    done = conn.execute(
        update(verifications)
        .where(mine.side == STATION, mine.peer == host, mine.vid == request.vid)
        .values(**record)
    )
    if not done.rowcount:
        # one row per table: an earlier verification's is done with
        conn.execute(
            delete(verifications).where(
                mine.side == STATION, mine.peer == host, mine.tbl == request.table
            )
        )
        conn.execute(
            verifications.insert().values(
                vid=request.vid,
                side=STATION,
                peer=host,
                tbl=request.table,
                started_at=stamp,
                **record,
            )
        )
    if request.resend:
        return [("verify", f"{touched} row(s) of {request.table} to send again to {host} (repair)")]
    links_mod.verify_due(conn, host)
    return []


def _answer(side: Side, request: VerifyRequest) -> list[AnswerItem]:
    items: list[AnswerItem] = []
    ask = request.ask
    i = 0
    while i < len(ask):
        kind, lo, hi = ask[i]
        if kind == "d":
            group = [Span(lo, hi)]
            while (
                i + 1 < len(ask) and ask[i + 1][0] == "d" and hi is not None and ask[i + 1][1] == hi
            ):
                i += 1
                _, lo, hi = ask[i]
                group.append(Span(lo, hi))
            items += [("d", d.rows, d.digest) for d in side.digests(group)]
        else:
            span = Span(lo, hi)
            if side.count(span) <= MAX_LEAF_ANSWER:
                items.append(("r", tuple(side.row_hashes(span).items())))
            else:
                cut = side.plan(span, FAN_OUT)
                items.append(("p", tuple((d.span.lo, d.span.hi, d.rows, d.digest) for d in cut)))
        i += 1
    return items


def _touch(conn: Connection, side: Side, keys: Sequence[Key]) -> int:
    """Log ``keys`` as local changes (an update where the row is here, a
    delete where it is not), keys as the capture triggers write them."""
    table = reflect(conn, side.table.name)
    stored = key_to_storage(table, conn.dialect)
    count = 0
    for start_at in range(0, len(keys), 500):
        chunk = [side.python_key(k) for k in keys[start_at : start_at + 500]]
        pk = list(table.primary_key.columns)
        here = {tuple(r) for r in conn.execute(select(*pk).where(key_filter(table, chunk)))}
        rows = [
            {
                "tbl": table.name,
                "pk": json.dumps(
                    [v if f is None or v is None else f(v) for f, v in zip(stored, k, strict=True)],
                    default=_json_value,
                ),
                "op": "U" if k in here else "D",
                "origin": None,
            }
            for k in chunk
        ]
        conn.execute(changes.insert(), rows)
        count += len(rows)
    return count


def _json_value(value: Any) -> Any:
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    return str(value)
