"""A station's standing with its host: enabled, disabled, removed — and
telling the station by mail (issue 18, item 4).

On the host:

- **disabled** (``station disable S``): nothing is built, composed or sent
  for the station — except the one notice saying so; what it sends is
  taken out of the mailbox and *held* in the inbox buffer (within the
  usual caps; what does not fit waits in the station's outbox, which
  sends it again), never applied, and applied in order once it is enabled
  again. Its control messages are read for their ack only (the station
  sends every control again while it still matters). The change log keeps
  what it has not acknowledged, so nothing is lost while it is paused.
- **enabled** (``station enable S``): everything flows again from the next
  cycle; the station is told.
- **removed** (``station remove S``): the station's key is forgotten with
  it, so the notice is sealed *before* that, in the removing transaction,
  and kept in ``mailsync_farewells`` until the next cycle sends it (once).
  The row stays: later mail from the station is set aside and said in the
  log the first time only, not as "unknown sender" noise every cycle.
  Adding a station under that id again forgets the row.

On a station, the notice (``standing``, unsequenced, signed by the host)
is recorded in ``mailsync_meta`` (``standing``); ``status`` shows it, and
``sync`` says it in one line with exit code 2 (an admin's decision, like a
rule). A disabled station keeps syncing (its changes wait on the host); a
removed one stops at the start of every cycle until it joins a host again
(``mailsync join``, which forgets the standing).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import Connection, Engine, delete, select, update

from mailsync import link as links_mod
from mailsync.errors import MailsyncError
from mailsync.journal import Journal
from mailsync.store.tables import farewells, meta_table, now, set_meta
from mailsync.wire.changeset import ChangesetWriter
from mailsync.wire.envelope import Codec, Header
from mailsync.wire.station_controls import StationStanding

#: Where a station keeps what its host told it of its standing.
META_KEY = "standing"
#: The sequence number of an unsequenced (control) message.
CONTROL_SEQ = 0

Sealer = Callable[[Connection, Header, bytes], bytes]


@dataclass(frozen=True)
class Told:
    """What a station's host told it: ``state`` (disabled or removed), when
    (the host's clock), and by which host."""

    state: str
    at: str
    host: str

    def line(self) -> str:
        """The one line ``sync`` and ``status`` say."""
        when = self.at[:16].replace("T", " ")
        if self.state == "removed":
            return (
                f"host {self.host} removed this station on {when} UTC: nothing is sent or "
                "received (`mailsync join BUNDLE` once its admin adds it again)"
            )
        return (
            f"host {self.host} disabled this station on {when} UTC: what it sends is held "
            "there, nothing comes from it until it is enabled again"
        )


def say(report: _Report) -> None:
    """A cycle's outcome on a station its host disabled or removed: one
    line among its errors, exit code 2 (an admin's decision, like a rule)."""
    if report.standing is not None:
        report.errors.append(report.standing.line())
        report.exit_codes.append(2)


class _Report(Protocol):
    standing: Told | None
    errors: list[str]
    exit_codes: list[int]


# ------------------------------------------------------------------- the host


def disable(conn: Connection, station: str) -> bool:
    """Pause the station's link; False if it was disabled already."""
    link = links_mod.one(conn, station)
    if link.paused_at is not None:
        return False
    links_mod.paused(conn, station)
    return True


def enable(conn: Connection, station: str) -> bool:
    """Resume the station's link; False if it was not disabled."""
    link = links_mod.one(conn, station)
    if link.paused_at is None:
        return False
    links_mod.resumed(conn, station)
    return True


def notice(
    conn: Connection, codec: Codec, seal: Sealer, me: str, link: links_mod.Link, state: str
) -> bytes:
    """The sealed unsequenced message telling ``link.peer`` its standing
    (numbered like every control message of the link: applied once)."""
    buffer = io.BytesIO()
    compressed = codec.body_writer(buffer)
    writer = ChangesetWriter(compressed, {"from": me, "to": link.peer})
    told = StationStanding(state, now().isoformat(timespec="seconds"))
    writer.control(told.KIND, told.payload())
    writer.close()
    compressed.close()  # type: ignore[no-untyped-call]
    return seal(conn, control_header(conn, me, link), buffer.getvalue())


def control_header(conn: Connection, me: str, link: links_mod.Link) -> Header:
    """The clear header of an unsequenced message to ``link.peer``: our ack,
    and the link's next control number (applied once)."""
    return Header(
        me,
        link.peer,
        CONTROL_SEQ,
        ack=link.in_seq,
        ack_cid=link.in_cid,
        acked=link.acked_seq,
        ctl=links_mod.control_numbered(conn, link),
    )


def farewell(conn: Connection, codec: Codec, seal: Sealer, me: str, station: str) -> str | None:
    """Before a station is forgotten: seal the notice that it was removed
    while its key is still known, and keep it to be sent by the next cycle.
    Returns why it cannot be told (no key of it), or None."""
    link = links_mod.one(conn, station)
    blob: bytes | None = None
    why = None
    try:
        blob = notice(conn, codec, seal, me, link, "removed")
    except MailsyncError as exc:  # no key of it to seal for
        why = str(exc)
    conn.execute(delete(farewells).where(farewells.c.peer == station))
    conn.execute(
        farewells.insert().values(peer=station, address=link.address, blob=blob, removed_at=now())
    )
    return why


def forget_farewell(conn: Connection, station: str) -> None:
    """A station is added under a removed one's id: it is no longer removed."""
    conn.execute(delete(farewells).where(farewells.c.peer == station))


def farewells_due(conn: Connection) -> list[tuple[str, str, bytes]]:
    """(peer, address, blob) of the removal notices not sent yet, recorded
    as sent now (in the settling transaction: they go once)."""
    due = conn.execute(
        select(farewells.c.peer, farewells.c.address, farewells.c.blob).where(
            farewells.c.sent_at.is_(None), farewells.c.blob.is_not(None)
        )
    ).all()
    if due:
        conn.execute(
            update(farewells)
            .where(farewells.c.peer.in_([p for p, _, _ in due]))
            .values(sent_at=now())
        )
    return [(p, a, bytes(b)) for p, a, b in due]


def heard_from_removed(engine: Engine, peer: str) -> bool | None:
    """Mail claiming to be from ``peer`` came: None if it is no removed
    station; else whether this is the first time (then it is said in the
    log; later ones are set aside quietly)."""
    with engine.begin() as conn:
        found = conn.execute(select(farewells.c.heard_at).where(farewells.c.peer == peer)).first()
        if found is None:
            return None
        if found[0] is not None:
            return False
        conn.execute(update(farewells).where(farewells.c.peer == peer).values(heard_at=now()))
        return True


# ---------------------------------------------------------------- the station


def record(conn: Connection, journal: Journal, host: str, told: StationStanding) -> Told | None:
    """Station: the host told us our standing; returns it (None: enabled)."""
    if told.state == "enabled":
        conn.execute(delete(meta_table).where(meta_table.c.key == META_KEY))
        journal.info("standing", f"host {host} enabled this station again", peer=host, conn=conn)
        return None
    found = Told(told.state, told.at, host)
    set_meta(conn, META_KEY, json.dumps({"state": told.state, "at": told.at, "host": host}))
    journal.error("standing", found.line(), peer=host, conn=conn)
    return found


def read(raw: str | None) -> Told | None:
    """What ``mailsync_meta`` holds of our standing (None: in good standing)."""
    if not raw:
        return None
    try:
        data = json.loads(raw)
        return Told(str(data["state"]), str(data["at"]), str(data["host"]))
    except (ValueError, KeyError, TypeError):
        return None


def forget(conn: Connection) -> None:
    """Station: joined a host (again); whatever we were told no longer holds."""
    conn.execute(delete(meta_table).where(meta_table.c.key == META_KEY))
