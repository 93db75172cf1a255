"""A synced table's definition, portable between databases (issue 19).

A new station should not need its own PostgreSQL → SQLite converter: the
host describes each synced table — columns with portable types, primary key,
NOT NULL, portable defaults, unique constraints, foreign keys among the
synced tables — and a station that lacks a table creates it in its own
dialect from that description, parents before children. A station whose
table exists but lacks columns the host added gets them (:func:`add_columns`,
nullable or with a default: nothing is dropped or changed); any other
difference is told in words (:func:`differences`), not altered.

The description is plain JSON-able data (it travels inside a sealed
changeset) built from SQLAlchemy's generic types (``TypeEngine.as_generic``):
``NUMERIC(12,2)`` on PostgreSQL and SQLite alike is ``Numeric(12, 2)``, a
``TIMESTAMP WITH TIME ZONE`` is ``DateTime(timezone=True)``; a type with no
portable form (PostgreSQL ranges, arrays, user types) is refused naming the
column, and so is a default that is an expression other than the current
time (sequences and identities: a synced table's keys come from the host or
from number ranges, never from a station's own counter).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Connection,
    Date,
    DateTime,
    Double,
    Float,
    ForeignKeyConstraint,
    Integer,
    Interval,
    LargeBinary,
    MetaData,
    Numeric,
    PrimaryKeyConstraint,
    SmallInteger,
    String,
    Table,
    Text,
    Time,
    Unicode,
    UnicodeText,
    UniqueConstraint,
    Uuid,
    inspect,
    text,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.schema import CreateColumn
from sqlalchemy.types import TypeEngine

from mailsync.dialects import dialect_for
from mailsync.errors import SchemaError
from mailsync.store.reflection import dependency_order, forget, reflect

#: the generic types a definition may name, and the arguments each keeps
_TYPES: dict[str, tuple[type[TypeEngine[Any]], tuple[str, ...]]] = {
    "Integer": (Integer, ()),
    "BigInteger": (BigInteger, ()),
    "SmallInteger": (SmallInteger, ()),
    "Numeric": (Numeric, ("precision", "scale")),
    "Float": (Float, ("precision",)),
    "Double": (Double, ()),
    "String": (String, ("length",)),
    "Unicode": (Unicode, ("length",)),
    "Text": (Text, ()),
    "UnicodeText": (UnicodeText, ()),
    "Boolean": (Boolean, ()),
    "Date": (Date, ()),
    "DateTime": (DateTime, ("timezone",)),
    "Time": (Time, ("timezone",)),
    "Interval": (Interval, ()),
    "LargeBinary": (LargeBinary, ("length",)),
    "Uuid": (Uuid, ()),
    "JSON": (JSON, ()),
}
#: defaults every dialect can write: a number, a quoted text, true or false,
#: the current time
_LITERAL = re.compile(r"^\(*(-?\d+(\.\d+)?|'([^']|'')*'|true|false)\)*(::[a-z ]+)?$", re.IGNORECASE)
_NOW = re.compile(r"^\(*(now\(\)|current_timestamp|CURRENT_TIMESTAMP)\)*$", re.IGNORECASE)


def portable_type(kind: TypeEngine[Any], where: str) -> dict[str, Any]:
    """A column's type (as the database reports it) as generic data;
    SchemaError where it has none."""
    try:
        generic = kind.as_generic()
    except NotImplementedError:
        generic = None
    name = type(generic).__name__ if generic is not None else str(kind)
    if name not in _TYPES:
        raise SchemaError(
            f"{where}: type {kind} has no portable form across databases",
            hint="use a standard SQL type for synced tables, or create the table on "
            "the station by hand",
        )
    out: dict[str, Any] = {"type": name}
    for arg in _TYPES[name][1]:
        value = getattr(generic, arg, None)
        if value not in (None, False):
            out[arg] = value
    if name == "Numeric" and out.get("scale") is None and "precision" in out:
        out["scale"] = 0
    return out


def _default(column: Column[Any], where: str) -> str | None:
    """A server default every dialect can write, or None; SchemaError for
    one that would give a station's rows values of its own."""
    default = column.server_default
    if default is None or column.identity is not None:
        return None
    sql = str(getattr(default, "arg", default)).strip()
    if sql.lower().startswith("nextval("):
        return None  # a serial key: keys come from the host or a range
    if _LITERAL.match(sql):
        return re.sub(r"::[a-z ]+$", "", sql, flags=re.IGNORECASE)
    if _NOW.match(sql):
        return "CURRENT_TIMESTAMP"
    raise SchemaError(
        f"{where}: default {sql} is not portable (a number, a text, true, false or the "
        "current time)",
        hint="give the column a plain default, or none",
    )


def describe(
    conn: Connection, names: Sequence[str], among: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """The definitions of ``names`` (synced tables), parents first; foreign
    keys to tables outside ``names`` and ``among`` (the other synced tables)
    are left out: the station has no such table to point at."""
    wanted = set(names) | set(among)
    out = []
    for name in _parents_first(conn, names):
        table = reflect(conn, name)
        raw = {c["name"]: c["type"] for c in inspect(conn).get_columns(name)}
        columns = []
        for column in table.columns:
            where = f"{name}.{column.name}"
            entry: dict[str, Any] = {
                "name": column.name,
                **portable_type(raw[column.name], where),
            }
            if not column.nullable:
                entry["not_null"] = True
            default = _default(column, where)
            if entry["type"] == "Boolean" and default is not None:
                default = {"1": "true", "0": "false", "'1'": "true", "'0'": "false"}.get(
                    default.strip("()").lower(), default.strip("()").lower()
                )
            if default is not None:
                entry["default"] = default
            columns.append(entry)
        uniques = dialect_for(conn).unique_constraints(conn, name)
        foreign = [
            {
                "columns": [c.parent.name for c in fk.elements],
                "table": fk.referred_table.name,
                "refers": [c.column.name for c in fk.elements],
            }
            for fk in table.foreign_key_constraints
            if fk.referred_table.name in wanted
        ]
        out.append(
            {
                "table": name,
                "columns": columns,
                "primary_key": [c.name for c in table.primary_key.columns],
                "unique": uniques,
                "foreign_keys": foreign,
            }
        )
    return out


def _parents_first(conn: Connection, names: Sequence[str]) -> list[str]:
    return dependency_order(conn, list(names))


def table_of(definition: dict[str, Any], metadata: MetaData) -> Table:
    """A definition as a SQLAlchemy :class:`Table` (checked: it came by mail)."""
    name = _name(definition.get("table"), "table")
    columns = []
    for entry in _list(definition.get("columns"), f"{name}: columns"):
        if not isinstance(entry, dict):
            raise SchemaError(f"table {name}: a column is not described")
        cname = _name(entry.get("name"), f"{name}: a column name")
        kind = entry.get("type")
        if kind not in _TYPES:
            raise SchemaError(f"{name}.{cname}: unknown type {str(kind)[:40]!r}")
        cls, args = _TYPES[kind]
        kwargs = {a: entry[a] for a in args if a in entry}
        for a, v in kwargs.items():
            if not isinstance(v, int | bool):
                raise SchemaError(f"{name}.{cname}: {a} {str(v)[:20]!r} is not a number")
        default = entry.get("default")
        server_default = None
        if default is not None:
            if not isinstance(default, str) or not (
                _LITERAL.match(default) or default == "CURRENT_TIMESTAMP"
            ):
                raise SchemaError(f"{name}.{cname}: default {str(default)[:40]!r} is not portable")
            server_default = text(default)
        columns.append(
            Column(
                cname,
                cls(**kwargs),
                nullable=not entry.get("not_null", False),
                server_default=server_default,
                autoincrement=False,
            )
        )
    known = {c.name for c in columns}
    pk = [_known(c, known, name) for c in _list(definition.get("primary_key"), f"{name}: key")]
    if not pk:
        raise SchemaError(f"table {name}: no primary key")
    constraints: list[Any] = [PrimaryKeyConstraint(*pk)]
    for cols in _list(definition.get("unique", []), f"{name}: unique"):
        constraints.append(UniqueConstraint(*[_known(c, known, name) for c in _list(cols, name)]))
    for fk in _list(definition.get("foreign_keys", []), f"{name}: foreign keys"):
        if not isinstance(fk, dict):
            raise SchemaError(f"table {name}: a foreign key is not described")
        parent = _name(fk.get("table"), f"{name}: a foreign key's table")
        local = [_known(c, known, name) for c in _list(fk.get("columns"), name)]
        remote = [_name(c, name) for c in _list(fk.get("refers"), name)]
        if len(local) != len(remote):
            raise SchemaError(f"table {name}: a foreign key's columns do not pair up")
        constraints.append(ForeignKeyConstraint(local, [f"{parent}.{c}" for c in remote]))
    return Table(name, metadata, *columns, *constraints)


#: a name a definition may give a table or column: letters, digits, ``_``
#: and ``$``, not starting with a digit; mailsync's own prefix is refused
_IDENTIFIER = re.compile(r"^[^\W\d]\w*\$?\w*$")


def _name(value: Any, what: str) -> str:
    if (
        not isinstance(value, str)
        or not value
        or len(value) > 128
        or not _IDENTIFIER.match(value)
        or value.lower().startswith("mailsync_")
    ):
        raise SchemaError(f"{what}: {str(value)[:40]!r} is not a name a synced table may have")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list) or len(value) > 4096:
        raise SchemaError(f"{what}: not a list")
    return value


def _known(column: Any, known: set[str], table: str) -> str:
    name = _name(column, f"table {table}: a column")
    if name not in known:
        raise SchemaError(f"table {table}: no column {name!r}")
    return name


def create_missing(conn: Connection, definitions: Sequence[dict[str, Any]]) -> list[str]:
    """Create the described tables this database lacks, parents before
    children, in its own dialect; returns the names created."""
    existing = set(inspect(conn).get_table_names())
    metadata = MetaData()
    tables = [table_of(d, metadata) for d in definitions]
    for table in tables:  # a foreign key to an existing table: reflect it in
        for fk in table.foreign_key_constraints:
            parent = fk.elements[0].target_fullname.split(".")[0]
            if parent not in metadata.tables and parent in existing:
                Table(parent, metadata, autoload_with=conn)
    missing = [t for t in tables if t.name not in existing]
    metadata.create_all(conn, tables=missing)
    return [t.name for t in missing]


def differences(conn: Connection, definition: dict[str, Any]) -> list[str]:
    """How an existing table differs from its definition, in words (empty:
    it matches): missing or extra columns, other types, key or NOT NULL."""
    wanted = table_of(definition, MetaData())
    here = reflect(conn, wanted.name)
    raw = {c["name"]: c["type"] for c in inspect(conn).get_columns(wanted.name)}
    out = []
    for column in wanted.columns:
        if column.name not in here.c:
            out.append(f"{wanted.name}.{column.name} is missing")
            continue
        mine = portable_type(raw[column.name], f"{wanted.name}.{column.name}")
        theirs = portable_type(column.type, f"{wanted.name}.{column.name}")
        if mine["type"] != theirs["type"] and {mine["type"], theirs["type"]} not in _SAME:
            out.append(f"{wanted.name}.{column.name} is {mine['type']}, not {theirs['type']}")
        mine_col = here.c[column.name]
        if mine_col.nullable and not column.nullable and not mine_col.primary_key:
            out.append(f"{wanted.name}.{column.name} allows NULL")
    for name in set(here.c.keys()) - set(wanted.c.keys()):
        out.append(f"{wanted.name}.{name} is not on the host")
    if [c.name for c in here.primary_key.columns] != [c.name for c in wanted.primary_key.columns]:
        out.append(f"{wanted.name}: another primary key")
    return out


#: type names that differ only in how a dialect reflects them
_SAME = [
    {"String", "Unicode"},
    {"Text", "UnicodeText"},
    {"String", "Text"},
    {"Float", "Double"},
    {"Integer", "BigInteger"},
    {"Integer", "SmallInteger"},
]


def describe_each(
    conn: Connection, names: Sequence[str], among: Sequence[str] = ()
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """:func:`describe`, table by table: the definitions that could be made,
    and per table that cannot travel, why (its station creates it by hand)."""
    made: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    for name in _parents_first(conn, names):
        try:
            made += describe(conn, [name], among=[*names, *among])
        except SchemaError as exc:
            failed[name] = str(exc)
    return made, failed


@dataclass
class Provisioned:
    """What :func:`provision` did with the definitions a changeset brought."""

    #: the definitions taken (created, altered, or compared)
    accepted: list[dict[str, Any]] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    #: per table, the columns added to it
    added: dict[str, list[str]] = field(default_factory=dict)
    #: per table, how it still differs (reported, not altered)
    differing: dict[str, list[str]] = field(default_factory=dict)
    #: per definition refused, why (not in this node's rules, a bad name)
    refused: dict[str, str] = field(default_factory=dict)


def provision(
    conn: Connection, definitions: Sequence[dict[str, Any]], allowed: Collection[str]
) -> Provisioned:
    """On a station: create the described tables it lacks and add to those
    it has the columns they lack that can be added (nullable, or with a
    default); report how they still differ, never drop or change anything.
    Only tables in ``allowed`` (the station's rules) are touched: a
    definition of any other is refused, whoever signed it."""
    done = Provisioned()
    taken = []
    for definition in definitions:
        name = str(definition.get("table"))[:128]
        try:
            table_of(definition, MetaData())  # checked before anything is made
        except SchemaError as exc:
            done.refused[name] = str(exc)
            continue
        if name not in allowed:
            done.refused[name] = f"table {name} is not synced to this station (no rule)"
            continue
        taken.append(definition)
    existing = set(inspect(conn).get_table_names())
    done.created = create_missing(conn, taken)
    done.accepted = taken
    for definition in taken:
        name = str(definition["table"])
        if name not in existing:
            continue
        try:
            added = add_columns(conn, definition)
            if added:
                done.added[name] = added
            found = differences(conn, definition)
        except SchemaError as exc:  # e.g. the station's table has no key
            found = [str(exc)]
        if found:
            done.differing[name] = found
    return done


def add_columns(conn: Connection, definition: dict[str, Any]) -> list[str]:
    """Add to an existing table the described columns it lacks that can be
    added to a table with rows (nullable, or with a default), each with
    ``ALTER TABLE … ADD COLUMN`` in this database's dialect; the names added.
    One the database refuses (SQLite takes no current-time default on an
    added column) is left out and reported by :func:`differences`."""
    wanted = table_of(definition, MetaData())
    here = {c["name"] for c in inspect(conn).get_columns(wanted.name)}
    quote = conn.dialect.identifier_preparer.quote
    added = []
    for column in wanted.columns:
        if column.name in here or (not column.nullable and column.server_default is None):
            continue
        ddl = CreateColumn(column).compile(dialect=conn.dialect)
        try:
            with conn.begin_nested():
                conn.exec_driver_sql(f"ALTER TABLE {quote(wanted.name)} ADD COLUMN {ddl}")
        except SQLAlchemyError:
            continue
        added.append(column.name)
    if added:
        forget(conn)
    return added
