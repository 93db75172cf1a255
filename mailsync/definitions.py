"""Which definition of each synced table a station has, and what changed since.

The host's tables change: an ERP upgrade adds a column, an admin drops one.
Every definition a station was sent (:mod:`mailsync.provision`'s portable
form) is kept by its digest (``mailsync_definitions``), and each station's
row in ``mailsync_loads`` names the one it has. A cycle compares that with
the host's definition now and decides per station and table:

- the same: nothing (the common case, decided without a statement: the
  host's definitions are described again only when a table's schema
  fingerprint — which the capture check reads anyway — has moved);
- only columns added that a station can add (nullable, or with a default):
  *refresh* — the new definition goes, the station adds the columns in its
  own dialect, and the table follows in full (``reload`` control: the
  machinery of :mod:`mailsync.reload`, so the station's undelivered changes
  are kept) so that the new columns carry the host's values, not the
  station's default;
- anything else (a column dropped or renamed, another type, NOT NULL, key):
  the table *stops* for that station, with one line naming table, column
  and change; its rows no longer go, other tables do, until the admin fixes
  the station's table and runs ``mailsync table resync T`` (:data:`RESYNC`),
  which sends definition and rows afresh.

Only the columns and the primary key count: a foreign key or unique
constraint added later does not travel (a station created from an older
definition keeps its constraints).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import Connection, Engine, select, update
from sqlalchemy.exc import IntegrityError

from mailsync import provision
from mailsync import rules as rules_mod
from mailsync.errors import RuleError, SchemaError
from mailsync.store.reflection import fingerprint
from mailsync.store.tables import definitions, get_meta, loads, now, rules_table, set_meta

#: a station's digest when the admin asked for the table afresh (resync)
RESYNC = "resync"


def digest(definition: Mapping[str, Any]) -> str:
    """The digest of what counts in a definition: its columns and key."""
    counted = {
        "table": definition.get("table"),
        "columns": definition.get("columns"),
        "primary_key": definition.get("primary_key"),
    }
    text = json.dumps(counted, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


#: per engine, per table: (schema fingerprint, the definition then and its
#: digest, or None where the table cannot be described)
_described: weakref.WeakKeyDictionary[
    Engine, dict[str, tuple[Any, tuple[dict[str, Any], str] | None]]
] = weakref.WeakKeyDictionary()
#: per engine: definitions by digest (they never change)
_bodies: weakref.WeakKeyDictionary[Engine, dict[str, dict[str, Any]]] = weakref.WeakKeyDictionary()


def current(conn: Connection, names: Iterable[str]) -> dict[str, tuple[dict[str, Any], str]]:
    """The host's definition of each of ``names`` now, with its digest (a
    table that cannot be described — no portable type, gone — is left out).
    A table is described again only when its schema fingerprint moved: an
    idle cycle asks nothing (the capture check read the fingerprints)."""
    held = _described.setdefault(conn.engine, {})
    out = {}
    for name in names:
        mark = fingerprint(conn, name)
        known = held.get(name)
        if known is None or mark is None or known[0] != mark:
            try:
                made = provision.describe(conn, [name])[0]
                known = (mark, (made, digest(made)))
            except SchemaError:
                known = (mark, None)
            held[name] = known
        if known[1] is not None:
            out[name] = known[1]
    return out


def remember(conn: Connection, definition: dict[str, Any]) -> str:
    """Keep a definition that goes to a station; its digest."""
    key = digest(definition)
    bodies = _bodies.setdefault(conn.engine, {})
    if key not in bodies:
        found = conn.execute(
            select(definitions.c.digest).where(definitions.c.digest == key)
        ).first()
        if found is None:
            # in a savepoint: another worker of the host (``serve
            # --workers``) may be keeping the same body at this moment
            with contextlib.suppress(IntegrityError), conn.begin_nested():
                conn.execute(
                    definitions.insert().values(
                        digest=key,
                        tbl=str(definition.get("table")),
                        body=json.dumps(definition, sort_keys=True),
                        created_at=now(),
                    )
                )
    return key


def bodies(conn: Connection, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The kept definitions of ``keys`` (one read for those not held yet)."""
    held = _bodies.setdefault(conn.engine, {})
    wanted = sorted({k for k in keys if k not in held})
    if wanted:
        rows = conn.execute(
            select(definitions.c.digest, definitions.c.body).where(definitions.c.digest.in_(wanted))
        )
        for key, body in rows:
            held[key] = json.loads(body)
    return {k: held[k] for k in keys if k in held}


def changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """What changed from ``old`` to ``new``: the columns added that a
    station can add, and the breaking changes in words (empty: additive)."""
    table = new.get("table")
    before = {c["name"]: c for c in old.get("columns", [])}
    after = {c["name"]: c for c in new.get("columns", [])}
    added: list[str] = []
    breaking: list[str] = []
    for name, column in before.items():
        if name not in after:
            breaking.append(f"column {table}.{name} was dropped or renamed on the host")
            continue
        was, now_ = _kind(column), _kind(after[name])
        if was != now_:
            breaking.append(f"column {table}.{name} changed type from {was} to {now_}")
        if column.get("not_null", False) != after[name].get("not_null", False):
            became = "NOT NULL" if after[name].get("not_null") else "nullable"
            breaking.append(f"column {table}.{name} became {became}")
    for name, column in after.items():
        if name in before:
            continue
        if column.get("not_null") and column.get("default") is None:
            breaking.append(f"column {table}.{name} was added NOT NULL without a default")
        else:
            added.append(name)
    if list(old.get("primary_key", [])) != list(new.get("primary_key", [])):
        breaking.append(
            f"table {table}: primary key changed from ({', '.join(old.get('primary_key', []))}) "
            f"to ({', '.join(new.get('primary_key', []))})"
        )
    return added, breaking


def _kind(column: Mapping[str, Any]) -> str:
    args = [f"{k}={column[k]}" for k in ("length", "precision", "scale", "timezone") if k in column]
    return f"{column.get('type')}({', '.join(args)})" if args else str(column.get("type"))


@dataclass
class Standing:
    """One station's tables against the host's definitions, for one build."""

    #: tables whose new definition and rows go (additive change, or resync)
    refresh: list[str] = field(default_factory=list)
    #: tables a breaking change stops now, and why (recorded by the build)
    stopping: dict[str, str] = field(default_factory=dict)
    #: tables stopped before (no rows go until the admin's resync)
    stopped: set[str] = field(default_factory=set)
    #: loads whose digest is not known yet: the host's now is recorded
    baseline: dict[str, str] = field(default_factory=dict)

    @property
    def anything(self) -> bool:
        """Something to send or record even with no change logged."""
        return bool(self.refresh or self.stopping or self.baseline)


class Watch:
    """The host's definitions against every station's, for one cycle's plans:
    built from the rows of ``mailsync_loads`` (read once for all stations)."""

    def __init__(self, conn: Connection, rows: Sequence[Any]) -> None:
        self.rows: dict[str, dict[str, tuple[str | None, str | None]]] = {}
        for station, table, key, stopped in rows:
            self.rows.setdefault(station, {})[table] = (key, stopped)
        tables = {t for held in self.rows.values() for t in held}
        now_ = current(conn, sorted(tables))
        self.defs = {t: d for t, (d, _) in now_.items()}
        self.now = {t: key for t, (_, key) in now_.items()}
        old = {
            key
            for held in self.rows.values()
            for key, stopped in held.values()
            if key not in (None, RESYNC) and stopped is None
        } - set(self.now.values())
        self.old = bodies(conn, old) if old else {}

    def loaded(self, station: str) -> set[str]:
        """The tables loaded into ``station``."""
        return set(self.rows.get(station, {}))

    def standing(self, station: str, tables: Iterable[str]) -> Standing:
        """Where ``station`` stands for ``tables`` (those it gets)."""
        out = Standing()
        held = self.rows.get(station, {})
        for table in tables:
            if table not in held:
                continue
            key, stopped = held[table]
            if stopped is not None:
                out.stopped.add(table)
                continue
            now_ = self.now.get(table)
            if key == RESYNC:
                out.refresh.append(table)
            elif now_ is None or key == now_:
                continue
            elif key is None:
                out.baseline[table] = now_
            elif key in self.old:
                added, breaking = changes(self.old[key], self.defs[table])
                if breaking:
                    out.stopping[table] = "; ".join(breaking)
                elif added:
                    out.refresh.append(table)
                else:  # only a default or a constraint: nothing to send
                    out.baseline[table] = now_
            else:  # its definition was not kept: sent afresh
                out.refresh.append(table)
        return out


def record(conn: Connection, station: str, table: str, key: str | None) -> None:
    """``station`` has the definition ``key`` of ``table`` now."""
    conn.execute(
        update(loads)
        .where(loads.c.station == station, loads.c.tbl == table)
        .values(digest=key, stopped=None)
    )


def stop(conn: Connection, station: str, table: str, why: str) -> None:
    """A breaking change stops ``table`` for ``station`` until a resync."""
    conn.execute(
        update(loads).where(loads.c.station == station, loads.c.tbl == table).values(stopped=why)
    )


def received(conn: Connection, host: str, definitions_: Sequence[dict[str, Any]]) -> None:
    """On a station: the definitions the host sent (and this station
    provisioned), kept by digest for ``status``."""
    for definition in definitions_:
        table = str(definition.get("table"))
        values = {"digest": digest(definition), "loaded_at": now(), "stopped": None}
        done = conn.execute(
            update(loads).where(loads.c.station == host, loads.c.tbl == table).values(**values)
        )
        if not done.rowcount:
            conn.execute(loads.insert().values(station=host, tbl=table, **values))


class Outcome(Protocol):
    """What applying a changeset did to the schema (:class:`mailsync.apply.Applied`)."""

    peer: str
    columns_added: dict[str, list[str]]
    tables_refused: dict[str, str]
    tables_refreshed: list[str]
    tables_stopped: dict[str, str]
    columns_ignored: dict[str, tuple[str, ...]]


#: ``mailsync_meta`` key prefix: the sender's columns this node said it ignores
_IGNORED = "ignored:"


def applied_notes(conn: Connection, done: Outcome) -> list[tuple[str, str]]:
    """The log lines (level, text) for what a changeset did to the schema.
    Columns of the sender's that this node lacks are said once per peer,
    table and set of columns, not with every changeset."""
    out: list[tuple[str, str]] = []
    for table, columns in sorted(done.columns_added.items()):
        out.append(("info", f"added column(s) {', '.join(columns)} to table {table}"))
    for table, why in sorted(done.tables_refused.items()):
        out.append(("warning", f"definition of table {table} refused: {why}"))
    if done.tables_refreshed:
        tables = ", ".join(done.tables_refreshed)
        out.append(("info", f"table(s) {tables} sent again in full (new definition or resync)"))
    for _table, why in sorted(done.tables_stopped.items()):
        out.append(("warning", f"{why} (`mailsync errors list`)"))
    for table, ignored in sorted(done.columns_ignored.items()):
        key = f"{_IGNORED}{done.peer}:{table}"[:64]
        said = ",".join(ignored)
        if get_meta(conn, key) != said:
            set_meta(conn, key, said)
            out.append(
                (
                    "warning",
                    f"table {table}: column(s) {', '.join(ignored)} of {done.peer}'s are not "
                    "in this database; their values are ignored (said once)",
                )
            )
    return out


def resync(conn: Connection, table: str, station: str | None = None) -> list[str]:
    """The admin fixed ``table`` (on the stations, or took a change back on
    the host): send its definition and every row again to ``station`` (or
    every station it was loaded into), lifting a breaking change's stop.
    The stations it goes to; RuleError for a table that is not synced."""
    synced = conn.execute(select(rules_table.c.id).where(rules_table.c.tbl == table)).first()
    if synced is None:
        raise RuleError(
            f"table {table!r} is not synced (no rule): there is nothing to resync",
            hint="`mailsync table list` shows the synced tables",
        )
    where = [loads.c.tbl == table]
    if station is not None:
        rules_mod.get_station(conn, station)  # RuleError: no such station
        rule = rules_mod.effective_rules(conn, station).get(table)
        if rule is None or "I" not in rule.down:
            raise RuleError(
                f"table {table!r} is not sent to station {station!r} in full (its rule "
                "sends no inserts down): there is nothing to resync",
                hint=f"`mailsync station show {station}` lists its tables",
            )
        where.append(loads.c.station == station)
    stations = sorted(s for (s,) in conn.execute(select(loads.c.station).where(*where)))
    conn.execute(update(loads).where(*where).values(digest=RESYNC, stopped=None))
    return stations


@dataclass(frozen=True)
class TableVersion:
    """One table's definition on one link, for ``status``."""

    table: str
    #: the digest of the definition the station has (its first 12 digits;
    #: None: loaded before definitions were kept)
    version: str | None
    #: "current", "new definition goes with the next sync", "resync
    #: queued", "stopped: …"; on a station "as the host sent it"
    state: str


def versions(conn: Connection, is_host: bool) -> dict[str, list[TableVersion]]:
    """Per peer, the definition of each table it has (host: each station's
    against the host's now; a station: what the host sent it)."""
    rows = conn.execute(
        select(loads.c.station, loads.c.tbl, loads.c.digest, loads.c.stopped).order_by(
            loads.c.station, loads.c.tbl
        )
    ).all()
    now_ = {}
    if is_host:
        now_ = {t: key for t, (_, key) in current(conn, sorted({r.tbl for r in rows})).items()}
    out: dict[str, list[TableVersion]] = {}
    for station, table, key, stopped in rows:
        if not is_host:
            state = "as the host sent it"
        elif stopped is not None:
            state = f"stopped: {stopped}"
        elif key == RESYNC:
            state = "resync queued"
        elif key is None or key == now_.get(table):
            state = "current"
        else:
            state = "the host's table changed: goes with the next sync"
        shown = None if key is None or key == RESYNC else key[:12]
        out.setdefault(station, []).append(TableVersion(table, shown, state))
    return out
