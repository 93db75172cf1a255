"""Sending tables to a station again: in full or changed since a date, on
the host admin's word or on the station's own request (issue 18, item 2).

On the host, :func:`queue` is the one way in (``mailsync reload --station
S``, and a station's request): a **full** reload takes the table off the
station's loads and marks the link for a full load, which replaces the
station's copy (:mod:`mailsync.reload`; asked twice before it goes, it
goes once); a **since** reload marks the loaded table with a timestamp
column and a time, and the next build sends the rows in scope changed
since then as changes (:mod:`mailsync.since` says what "changed" can mean;
deletes are not covered). Both go with the next build, through the usual
parts-and-streaming path.

A station asks with ``mailsync reload --table T [--since DATE | --full]``:
the request gets an id, rides on the station's control messages (the
first one at once, then with every control message it sends anyway) until
a changeset from the host says it was acted on (``served``). The host acts
on a request id once (``mailsync_links.table_request``) — a copy delivered
twice, or asked again before the answer came, changes nothing — and only
for tables the station's own rules send it inserts of; it refuses the rest
in its log, naming them.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
from collections.abc import Iterable

from sqlalchemy import Connection, update

from mailsync import link as links_mod
from mailsync import rules as rules_mod
from mailsync import since as since_mod
from mailsync.errors import ConfigError, MailsyncError, RuleError
from mailsync.journal import Journal
from mailsync.link import Link
from mailsync.store.reflection import reflect
from mailsync.store.tables import get_meta, loads, meta_table, set_meta
from mailsync.wire.station_controls import TablesWanted

#: Where a station keeps its request in force (JSON: id, tables, since, column).
META_KEY = "table_request"


# --------------------------------------------------------------------- host


def tables_for(conn: Connection, station: str, wanted: Iterable[str]) -> list[str]:
    """The tables to send ``station`` again: ``wanted`` (default: every one
    its rules send inserts of), each checked. RuleError naming the first
    that cannot be sent (unknown station, a table not sent to it, no
    inserts travel down)."""
    rules_mod.get_station(conn, station)
    effective = rules_mod.effective_rules(conn, station)
    sent = sorted(t for t, r in effective.items() if "I" in r.down)
    chosen = sorted(set(wanted)) or sent
    for name in chosen:
        if name not in effective:
            raise RuleError(
                f"table {name!r} does not travel to {station}",
                hint=f"`mailsync station show {station}` lists its tables",
            )
        if name not in sent:
            raise RuleError(
                f"table {name!r}: the rule for {station} sends no inserts down, "
                "so it cannot be sent again"
            )
    if not chosen:
        raise RuleError(f"no table travels to {station}: nothing to reload")
    return chosen


def queue(
    conn: Connection,
    station: str,
    tables: list[str],
    *,
    since: dt.datetime | None = None,
    column: str | None = None,
) -> dict[str, str | None]:
    """Mark ``tables`` (checked by :func:`tables_for`) to go to ``station``
    again with the next build: in full, or (``since``) the rows changed
    since then by each table's timestamp column (``column``, else the one
    :func:`mailsync.since.timestamp_column` finds; RuleError naming a table
    without one, before anything changes). Returns, per table, the column
    used (None: in full)."""
    if since is None:
        link = links_mod.one(conn, station)
        conn.execute(loads.delete().where(loads.c.station == station, loads.c.tbl.in_(tables)))
        if not link.reload_wanted:
            links_mod.reload_requested(conn, link, None)
        return dict.fromkeys(tables)
    columns = {name: since_mod.timestamp_column(reflect(conn, name), column) for name in tables}
    for name, col in columns.items():
        # a table not loaded yet: its first load brings every row anyway
        conn.execute(
            update(loads)
            .where(loads.c.station == station, loads.c.tbl == name)
            .values(since_column=col, since=since)
        )
    return dict(columns)


def describe(station: str, queued: dict[str, str | None], since: dt.datetime | None) -> str:
    """What was queued, as the log and the CLI say it."""
    names = ", ".join(queued)
    if since is None:
        return f"{station}: {names} to be sent again in full"
    cols = ", ".join(f"{t}.{c}" for t, c in queued.items())
    moment = f"{since:%Y-%m-%d %H:%M} UTC"
    return f"{station}: rows of {names} changed since {moment} (by {cols}) to be sent again"


def honour(journal: Journal, conn: Connection, link: Link, control: TablesWanted) -> None:
    """Host: act on a station's own request, once per request id; only for
    tables its rules send it inserts of. A request that cannot be served
    is refused in the log (the station learns it by its ``served`` never
    coming; its admin reads the host's answer in the host's log)."""
    peer = link.peer
    if control.request == link.table_request:
        journal.info(
            "reload-request",
            f"{peer} asks again for reload {control.request} (acted on already): nothing to do",
            peer=peer,
            conn=conn,
        )
        return
    links_mod.table_request_taken(conn, peer, control.request)
    try:
        effective = rules_mod.effective_rules(conn, peer)
        refused = [t for t in control.tables if "I" not in getattr(effective.get(t), "down", "")]
        if refused:
            journal.warning(
                "reload-refused",
                f"{peer} asks for table(s) {', '.join(sorted(refused)[:10])} again, which its "
                "rules do not send it: refused",
                peer=peer,
                conn=conn,
            )
        wanted = [t for t in control.tables if t not in refused]
        if control.tables and not wanted:
            return
        since = None if control.since is None else since_mod.parse_since(control.since, "since")
        with conn.begin_nested():
            tables = tables_for(conn, peer, wanted)
            queued = queue(conn, peer, tables, since=since, column=control.column)
    except MailsyncError as exc:
        journal.warning(
            "reload-refused", f"{peer} asks for a reload: refused: {exc}", peer=peer, conn=conn
        )
        return
    journal.info(
        "reload", describe(peer, queued, since) + " (asked by the station)", peer=peer, conn=conn
    )


# ------------------------------------------------------------------ station


def ask(
    conn: Connection,
    host: str,
    tables: list[str],
    *,
    since: dt.datetime | None = None,
    column: str | None = None,
) -> str:
    """Station: ask the host for ``tables`` again (checked against the rules
    it sent us); replaces a request still in force. Returns its id."""
    rules = rules_mod.effective_rules(conn, None)
    received = sorted(t for t, r in rules.items() if "I" in r.down)
    for name in tables:
        if name not in rules:
            raise RuleError(
                f"table {name!r} does not come from host {host}",
                hint="`mailsync status` lists the tables synced here",
            )
        if name not in received:
            raise RuleError(f"table {name!r}: host {host} sends no inserts of it here")
    if not (tables or received):
        raise RuleError(f"no table comes from host {host} yet: nothing to ask for")
    request = secrets.token_hex(8)
    wanted = {
        "id": request,
        "tables": sorted(set(tables)),
        "since": None if since is None else since.isoformat(),
        "column": column,
    }
    set_meta(conn, META_KEY, json.dumps(wanted))
    links_mod.table_request_pending(conn, host, request)
    return request


def due(link: Link) -> bool:
    """Station: our request must go now (never sent yet); once sent it rides
    on every control message until the host's answer."""
    return link.table_request is not None and not link.request_told


def asked(conn: Connection, link: Link) -> TablesWanted | None:
    """Station: the request in force, as it goes (recorded as sent)."""
    found = pending(conn)
    if found is not None:
        links_mod.request_told(conn, link.peer)
    return found


def pending(conn: Connection) -> TablesWanted | None:
    """Station: the request in force, if any (``status`` shows it)."""
    raw = get_meta(conn, META_KEY)
    if not raw:
        return None
    try:
        data = json.loads(raw)
        return TablesWanted(
            str(data["id"]), tuple(data.get("tables", ())), data.get("since"), data.get("column")
        )
    except (ValueError, KeyError, TypeError):
        return None


def waiting(request: TablesWanted) -> str:
    """A request in force, as ``status`` says it."""
    how = "in full" if request.since is None else f"changed since {request.since[:16]}"
    return f"asked the host to send {', '.join(request.tables) or 'every table'} again {how}"


def served(conn: Connection, host: str, request: str) -> str | None:
    """Station: the host says it acted on ``request``; what it was asked
    for (None: an older request's answer, or one said twice)."""
    found = pending(conn)
    if found is None or found.request != request:
        return None
    conn.execute(meta_table.delete().where(meta_table.c.key == META_KEY))
    links_mod.table_request_served(conn, host)
    return ", ".join(found.tables) or "every table"


def check_options(since: str | None, full: bool) -> dt.datetime | None:
    """``--since`` and ``--full`` together is an operator's mistake."""
    if since is not None and full:
        raise ConfigError("--since and --full exclude each other: pick one")
    return None if since is None else since_mod.parse_since(since)
