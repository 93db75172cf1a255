"""Stations and table rules: what travels where.

A table rule says, for one table and for all stations (``*``) or one, which
operations travel *down* (host → remote) and *up* (remote → host), and may
bound a station's scope both ways by a row filter (:mod:`mailsync.filters`).
A station-specific rule replaces the all-stations rule of the same table
for that station. Rules live in the host's database; each station's
effective rules travel to it with the next changeset, and a node
applies only what its rules allow.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Literal

from sqlalchemy import Connection, Integer, TextClause, and_, delete, func, select, update

from mailsync import capture, filters
from mailsync import link as links_mod
from mailsync.config import check_email, check_node_id
from mailsync.errors import ConfigError, RuleError
from mailsync.store.reflection import reflect
from mailsync.store.tables import (
    ALL_STATIONS,
    horizons,
    loads,
    now,
    outbox,
    rules_table,
    stations,
)

#: Which way changes travel: ``down`` host → remote, ``up`` remote → host.
Direction = Literal["down", "up"]

OP_NAMES = {"I": "insert", "U": "update", "D": "delete"}
_BY_NAME = {v: k for k, v in OP_NAMES.items()}
CONFLICT_POLICIES = ("host-wins", "remote-wins", "newest-wins", "manual")


def parse_ops(value: str, what: str = "operations") -> str:
    """``insert,update`` / ``all`` / ``none`` → ``"IU"`` / ``"IUD"`` / ``""``."""
    value = value.strip().lower()
    if value in ("all", "*"):
        return "IUD"
    if value in ("none", "-", ""):
        return ""
    found = set()
    for part in value.replace("+", ",").split(","):
        part = part.strip()
        op = _BY_NAME.get(part) or (part.upper() if part.upper() in OP_NAMES else None)
        if op is None:
            raise ConfigError(
                f"{what}: {part!r} is not an operation (use insert, update, delete, all or none)"
            )
        found.add(op)
    return "".join(op for op in "IUD" if op in found)


def describe_ops(ops: str) -> str:
    return ",".join(OP_NAMES[o] for o in ops) or "none"


@dataclass(frozen=True)
class Rule:
    table: str
    station: str
    down: str
    up: str
    row_filter: str | None = None
    conflict: str = "host-wins"
    #: newest-wins: the time column compared (None: the capture times)
    newest_by: str | None = None

    def to_wire(self) -> dict[str, Any]:
        data = asdict(self)
        if self.newest_by is None:  # as before it existed: the same rules hash
            del data["newest_by"]
        return data

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Rule:
        return cls(
            table=str(data["table"]),
            station=str(data["station"]),
            down=str(data["down"]),
            up=str(data["up"]),
            row_filter=data.get("row_filter"),
            conflict=str(data.get("conflict", "host-wins")),
            newest_by=None if data.get("newest_by") is None else str(data["newest_by"]),
        )


@dataclass(frozen=True)
class Station:
    id: str
    label: str
    email: str


def _rule(row: Any) -> Rule:
    return Rule(
        row.tbl, row.station, row.down_ops, row.up_ops, row.row_filter, row.conflict, row.newest_by
    )


def all_rules(conn: Connection) -> list[Rule]:
    rows = conn.execute(
        select(rules_table).order_by(rules_table.c.tbl, rules_table.c.station)
    ).all()
    return [_rule(r) for r in rows]


def effective_rules(conn: Connection, station: str | None) -> dict[str, Rule]:
    """Per table, the rule that governs ``station`` (None: the all-stations ones)."""
    return effective_from(all_rules(conn), station)


def effective_from(every: list[Rule], station: str | None) -> dict[str, Rule]:
    """:func:`effective_rules` from rules already read (:func:`all_rules`)."""
    result: dict[str, Rule] = {}
    for rule in every:
        if (rule.station == ALL_STATIONS and rule.table not in result) or (
            station is not None and rule.station == station
        ):
            result[rule.table] = rule
    return dict(sorted(result.items()))


def rules_hash(effective: dict[str, Rule]) -> str:
    wire = [r.to_wire() for r in effective.values()]
    return hashlib.sha256(json.dumps(wire, sort_keys=True).encode()).hexdigest()[:32]


def get_station(conn: Connection, station_id: str) -> Station:
    row = conn.execute(select(stations).where(stations.c.id == station_id)).first()
    if row is None:
        raise RuleError(f"no station {station_id!r}", hint="see `mailsync station list`")
    return Station(row.id, row.label, row.email)


def list_stations(conn: Connection) -> list[Station]:
    rows = conn.execute(select(stations).order_by(stations.c.id)).all()
    return [Station(r.id, r.label, r.email) for r in rows]


def add_station(
    conn: Connection, station_id: str, email: str, label: str = "", *, host_id: str
) -> Station:
    """Define a station; its link starts after every change already logged,
    because its initial load will carry the current rows."""
    check_node_id(station_id, "station id")
    check_email(email, "station e-mail")
    if station_id == host_id:
        raise RuleError(f"station id {station_id!r} is the host's own id")
    exists = conn.execute(select(stations.c.id).where(stations.c.id == station_id)).first()
    if exists:
        raise RuleError(f"station {station_id!r} already exists")
    clash = conn.execute(select(stations.c.id).where(stations.c.email == email)).first()
    if clash:
        raise RuleError(f"address {email} already belongs to station {clash[0]!r}")
    conn.execute(
        stations.insert().values(id=station_id, label=label, email=email, created_at=now())
    )
    cursor = conn.execute(select(func.coalesce(func.max(capture.changes.c.id), 0))).scalar()
    links_mod.create(conn, station_id, email, change_cursor=int(cursor or 0))
    return Station(station_id, label, email)


def edit_station(
    conn: Connection, station_id: str, *, label: str | None = None, email: str | None = None
) -> tuple[Station, Station]:
    """Change a station's label or address; returns it before and after.
    A new address is where its mail goes from now on (its link too)."""
    before = get_station(conn, station_id)
    if label is None and email is None:
        raise RuleError(f"station {station_id}: nothing to change", hint="give --label or --email")
    if email is not None and email != before.email:
        check_email(email, "station e-mail")
        clash = conn.execute(
            select(stations.c.id).where(stations.c.email == email, stations.c.id != station_id)
        ).first()
        if clash:
            raise RuleError(f"address {email} already belongs to station {clash[0]!r}")
        links_mod.readdress(conn, station_id, email)
    after = Station(
        station_id,
        before.label if label is None else label,
        before.email if email is None else email,
    )
    conn.execute(
        update(stations)
        .where(stations.c.id == station_id)
        .values(label=after.label, email=after.email)
    )
    return before, after


def remove_station(conn: Connection, station_id: str) -> None:
    get_station(conn, station_id)
    conn.execute(delete(rules_table).where(rules_table.c.station == station_id))
    conn.execute(delete(loads).where(loads.c.station == station_id))
    conn.execute(delete(outbox).where(outbox.c.peer == station_id))
    conn.execute(delete(horizons).where(horizons.c.peer == station_id))
    links_mod.forget(conn, station_id)
    conn.execute(delete(stations).where(stations.c.id == station_id))


def filter_predicate(row_filter: str, station: str, email: str = "") -> TextClause:
    """A rule's row filter as SQL for ``station`` (:func:`mailsync.filters.predicate`)."""
    return filters.predicate(row_filter, station, email)


def add_rule(conn: Connection, rule: Rule) -> list[str]:
    """Define (or replace) a table rule; returns warnings for the admin.

    Checks that the table exists with a primary key, that the station exists
    and that the row filter runs; installs the capture triggers.
    """
    if rule.conflict not in CONFLICT_POLICIES:
        raise RuleError(
            f"conflict policy {rule.conflict!r} is not one of {', '.join(CONFLICT_POLICIES)}"
        )
    if rule.newest_by is not None and rule.conflict != "newest-wins":
        raise RuleError(
            f"table {rule.table!r}: a time column (--newest-by) goes with the newest-wins "
            f"policy, not {rule.conflict}"
        )
    if rule.station != ALL_STATIONS:
        get_station(conn, rule.station)
    table = reflect(conn, rule.table)
    if rule.newest_by is not None and rule.newest_by not in table.c:
        raise RuleError(
            f"table {rule.table!r} has no column {rule.newest_by!r} (--newest-by): "
            f"its columns are {', '.join(c.name for c in table.columns)}"
        )
    if rule.row_filter:
        filters.check(conn, rule.table, rule.row_filter)
    warnings: list[str] = []
    if "I" in rule.up:
        pk = list(table.primary_key.columns)
        # a key made of foreign keys (a link table, lines of an invoice whose
        # number is ranged) is as unique as the rows it points at
        own = [c for c in pk if isinstance(c.type, Integer) and not c.foreign_keys]
        if own:
            warnings.append(
                f"{rule.table}: stations insert rows with an integer key "
                f"({', '.join(c.name for c in pk)}); keys created offline collide unless "
                "they come from a number range per station (or are UUIDs)"
            )
    values = {
        "down_ops": rule.down,
        "up_ops": rule.up,
        "row_filter": rule.row_filter,
        "conflict": rule.conflict,
        "newest_by": rule.newest_by,
    }
    where = and_(rules_table.c.tbl == rule.table, rules_table.c.station == rule.station)
    if conn.execute(select(rules_table.c.id).where(where)).first():
        conn.execute(update(rules_table).where(where).values(**values))
    else:
        conn.execute(
            rules_table.insert().values(
                tbl=rule.table, station=rule.station, created_at=now(), **values
            )
        )
    capture.ensure_capture(conn, [rule.table])
    return warnings


def remove_rule(conn: Connection, table_name: str, station: str | None = None) -> None:
    target = station or ALL_STATIONS
    where = and_(rules_table.c.tbl == table_name, rules_table.c.station == target)
    if conn.execute(select(rules_table.c.id).where(where)).first() is None:
        scope = f"station {station!r}" if station else "all stations"
        raise RuleError(f"no rule for table {table_name!r} and {scope}")
    conn.execute(delete(rules_table).where(where))
    if station is None:
        conn.execute(delete(loads).where(loads.c.tbl == table_name))
    else:
        conn.execute(
            delete(loads).where(and_(loads.c.tbl == table_name, loads.c.station == station))
        )
    remaining = conn.execute(
        select(rules_table.c.id).where(rules_table.c.tbl == table_name)
    ).first()
    if remaining is None:
        capture.drop_capture(conn, table_name)


def replace_rules(conn: Connection, received: list[Rule]) -> list[str]:
    """On a remote: take the rules the host sent; returns the tables they name."""
    conn.execute(delete(rules_table))
    for rule in received:
        conn.execute(
            rules_table.insert().values(
                tbl=rule.table,
                station=ALL_STATIONS,
                down_ops=rule.down,
                up_ops=rule.up,
                row_filter=rule.row_filter,
                conflict=rule.conflict,
                newest_by=rule.newest_by,
                created_at=now(),
            )
        )
    return [r.table for r in received]
