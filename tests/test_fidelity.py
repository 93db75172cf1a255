"""Fidelity: a value arrives as the sender stored it (same dialect) or as the
receiver's own column type stores the sender's value (across dialects).

For every dialect pair (SQLite → SQLite, SQLite → PostgreSQL, PostgreSQL →
SQLite, PostgreSQL → PostgreSQL) a host and a station sync a table holding
every supported type; hypothesis (derandomized) draws the rows. What is
compared is what the database holds, not what SQLAlchemy reads back:
SQLite's value and its storage class, PostgreSQL's text output. Across
dialects the expectation is the sender's value as SQLAlchemy reads it,
inserted through SQLAlchemy into a scratch copy of the table on the
receiver. The first example of each pair is a load into an empty table (the
plain-insert path), the rest upserts.
"""

from __future__ import annotations

import datetime as dt
import itertools
import math
import os
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Date,
    DateTime,
    Engine,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    Table,
    Time,
    Unicode,
    select,
    text,
)

from mailsync.node import Node, init_node
from mailsync.store.engine import open_engine
from mailsync.transport.memory import MemoryPostOffice
from tests.conftest import require_postgres

schema = MetaData()


def _kinds(name: str) -> Table:
    return Table(
        name,
        schema,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("i", BigInteger),
        Column("f", Float),
        Column("n", Numeric(12, 2)),
        Column("t", Unicode(200)),
        Column("b", LargeBinary),
        Column("ok", Boolean),
        Column("d", Date),
        Column("tm", Time),
        Column("ts", DateTime),
        Column("tz", DateTime(timezone=True)),
    )


kinds = _kinds("kinds")
stamps = Table(  # a date-time key
    "stamps",
    schema,
    Column("at", DateTime, primary_key=True),
    Column("v", Integer),
)
scratch = _kinds("kinds_expected")
VALUE_COLUMNS = [c.name for c in kinds.columns if c.name != "id"]

PAIRS = [
    pytest.param(("sqlite", "sqlite"), id="sqlite-sqlite"),
    pytest.param(("sqlite", "postgresql"), id="sqlite-postgresql", marks=pytest.mark.postgresql),
    pytest.param(("postgresql", "sqlite"), id="postgresql-sqlite", marks=pytest.mark.postgresql),
    pytest.param(
        ("postgresql", "postgresql"), id="postgresql-postgresql", marks=pytest.mark.postgresql
    ),
]

_ids = itertools.count(1)


class Pair:
    """A host on one database and a station on another, syncing ``kinds``."""

    def __init__(self, root: Path, host_url: str, station_url: str) -> None:
        office = MemoryPostOffice()
        self.engines: dict[str, Engine] = {}
        self.nodes: dict[str, Node] = {}
        for name, url, role in (("hq", host_url, "host"), ("koeln", station_url, "remote")):
            engine = open_engine(url)
            schema.create_all(engine)
            self.engines[name] = engine
            path = root / name / "mailsync.toml"
            init_node(
                path,
                role=role,
                node_id=name,
                database=url,
                address=f"{name}@x.test",
                mail="memory:",  # type: ignore[arg-type]
            )
            self.nodes[name] = Node.open(path, memory=office)
        hq, koeln = self.nodes["hq"], self.nodes["koeln"]
        _, bundle = hq.add_station("koeln", "koeln@x.test", key=koeln.public_key)
        koeln.join(bundle)
        hq.add_rule("kinds", down="IUD", up="IUD")
        hq.add_rule("stamps", down="IUD", up="IUD")

    def close(self) -> None:
        for node in self.nodes.values():
            node.close()
        for engine in self.engines.values():
            engine.dispose()


def _url(kind: str, tmp_path: Path, name: str, request: pytest.FixtureRequest) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / (name + '.db')}"
    require_postgres(request.config)
    server = request.getfixturevalue("pg_server")
    db = f"f_{os.getpid()}_{name}_{next(_ids)}"
    server.create_database(db)
    request.addfinalizer(lambda: server.drop_database(db))
    return str(server.url(db))


@pytest.fixture(params=PAIRS)
def pair(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Pair]:
    sender, receiver = request.param
    p = Pair(
        tmp_path,
        _url(sender, tmp_path, "hq", request),
        _url(receiver, tmp_path, "koeln", request),
    )
    yield p
    p.close()


# --------------------------------------------------------------- the values

offsets = st.integers(min_value=-14 * 60, max_value=14 * 60).map(
    lambda m: dt.timezone(dt.timedelta(minutes=m))
)
_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    max_size=30,
)
_years = {"min_value": dt.datetime(1, 1, 2), "max_value": dt.datetime(9999, 12, 30)}
_columns: dict[str, st.SearchStrategy[Any]] = {
    "i": st.integers(min_value=-(2**63), max_value=2**63 - 1),
    "f": st.floats(allow_nan=False, allow_infinity=False).map(lambda x: x + 0.0),
    "n": st.decimals(
        min_value=-(10**9), max_value=10**9, places=2, allow_nan=False, allow_infinity=False
    ),
    "t": _text,
    "b": st.binary(max_size=20),
    "ok": st.booleans(),
    "d": st.dates(min_value=dt.date(1, 1, 1)),
    "tm": st.times(),
    "ts": st.datetimes(**_years),
    "tz": st.datetimes(**_years, timezones=offsets),
}
rows = st.lists(
    st.fixed_dictionaries({k: st.none() | v for k, v in _columns.items()}),
    min_size=1,
    max_size=6,
)


def stored(engine: Engine, table: str, ids: list[int]) -> dict[int, tuple[Any, ...]]:
    """Each row as the database holds it: SQLite value and storage class,
    PostgreSQL's text output, per value column."""
    quote = engine.dialect.identifier_preparer.quote
    if engine.dialect.name == "sqlite":
        cols = ", ".join(f"{quote(c)}, typeof({quote(c)})" for c in VALUE_COLUMNS)
    else:
        cols = ", ".join(f"{quote(c)}::text" for c in VALUE_COLUMNS)
    marks = ", ".join(str(int(i)) for i in ids)
    with engine.connect() as conn:
        found = conn.exec_driver_sql(
            f"SELECT id, {cols} FROM {quote(table)} WHERE id IN ({marks})"
        ).all()
    return {r[0]: tuple(r[1:]) for r in found}


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Equal, NaN aside (a float NaN is not equal to itself)."""
    return all(
        x == y
        or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))
        for x, y in zip(a, b, strict=True)
    )


_FIDELITY = settings(
    max_examples=int(os.environ.get("MAILSYNC_FIDELITY_EXAMPLES", "12")),
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@_FIDELITY
@given(batch=rows)
def test_every_type_round_trips_for_every_dialect_pair(
    pair: Pair, batch: list[dict[str, Any]]
) -> None:
    hq, koeln = pair.engines["hq"], pair.engines["koeln"]
    ids = [next(_ids) for _ in batch]
    values = [{"id": i, **r} for i, r in zip(ids, batch, strict=True)]
    with hq.begin() as conn:
        conn.execute(kinds.insert(), values)
    pair.nodes["hq"].sync()
    report = pair.nodes["koeln"].sync()
    assert not report.errors and not report.peer_errors, (report.errors, report.peer_errors)
    assert report.rows_applied == len(batch), report

    got = stored(koeln, "kinds", ids)
    if hq.dialect.name == koeln.dialect.name:
        expected = stored(hq, "kinds", ids)
    else:  # the sender's values as SQLAlchemy reads them, stored by the receiver's types
        with hq.connect() as conn:
            read = [r._asdict() for r in conn.execute(select(kinds).where(kinds.c.id.in_(ids)))]
        with koeln.begin() as conn:
            conn.execute(scratch.insert(), read)
        expected = stored(koeln, "kinds_expected", ids)
    assert set(got) == set(ids)
    for i in ids:
        assert _same(got[i], expected[i]), (i, got[i], expected[i])


# ------------------------------------------------ SQLite's own text, kept

SQLITE_FORMS = [
    # (column, stored value): what another program (or an older SQLAlchemy) wrote
    ("ts", "2021-01-01 00:00:00"),
    ("ts", "2021-01-01T00:00:00"),
    ("ts", "2021-01-01 00:00:00.000000"),
    ("d", "2021-01-01"),
    ("tm", "10:00"),
    ("n", "1.50"),
    ("n", 7),
    ("n", 2.5),
    ("ok", 1),
    ("t", "Grüße 🙂"),
]


@pytest.mark.parametrize(("column", "value"), SQLITE_FORMS)
def test_sqlite_values_arrive_byte_identical(tmp_path: Path, column: str, value: Any) -> None:
    """The issue's case: ``2021-01-01 00:00:00`` arrived as
    ``2021-01-01 00:00:00.000000``, and an exact-date query found nothing."""
    p = Pair(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}", f"sqlite:///{tmp_path / 'koeln.db'}")
    try:
        hq, koeln = p.engines["hq"], p.engines["koeln"]
        with hq.begin() as conn:
            conn.exec_driver_sql(f'INSERT INTO kinds (id, "{column}") VALUES (1, ?)', (value,))
        p.nodes["hq"].sync()
        assert p.nodes["koeln"].sync().rows_applied == 1
        query = text(f'SELECT count(*) FROM kinds WHERE "{column}" = :v')
        with koeln.connect() as conn:
            assert conn.execute(query, {"v": value}).scalar() == 1
        assert stored(koeln, "kinds", [1]) == stored(hq, "kinds", [1])
    finally:
        p.close()


def test_an_upsert_and_a_delete_find_sqlite_s_own_text_key(tmp_path: Path) -> None:
    """Updates and deletes of a row travel in storage form too."""
    p = Pair(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}", f"sqlite:///{tmp_path / 'koeln.db'}")
    try:
        hq, koeln = p.engines["hq"], p.engines["koeln"]
        with hq.begin() as conn:
            conn.exec_driver_sql("INSERT INTO kinds (id, n) VALUES (1, '1.50'), (2, 3)")
        p.nodes["hq"].sync()
        p.nodes["koeln"].sync()
        with hq.begin() as conn:
            conn.exec_driver_sql("UPDATE kinds SET n = 9.25, ts = '2021-01-01 00:00:00'")
            conn.exec_driver_sql("DELETE FROM kinds WHERE id = 2")
        p.nodes["hq"].sync()
        assert p.nodes["koeln"].sync().rows_applied == 2
        assert stored(koeln, "kinds", [1, 2]) == stored(hq, "kinds", [1, 2])
        assert Decimal(str(stored(koeln, "kinds", [1])[1][4])) == Decimal("9.25")
    finally:
        p.close()


def test_a_date_time_key_in_sqlite_s_own_text_is_updated_and_deleted(tmp_path: Path) -> None:
    p = Pair(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}", f"sqlite:///{tmp_path / 'koeln.db'}")
    try:
        hq, koeln = p.engines["hq"], p.engines["koeln"]
        with hq.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO stamps VALUES ('2021-01-01 00:00:00', 1), ('2021-01-02 00:00:00', 2)"
            )
        p.nodes["hq"].sync()
        assert p.nodes["koeln"].sync().rows_applied == 2
        with hq.begin() as conn:
            conn.exec_driver_sql("UPDATE stamps SET v = 10 WHERE at = '2021-01-01 00:00:00'")
            conn.exec_driver_sql("DELETE FROM stamps WHERE at = '2021-01-02 00:00:00'")
        p.nodes["hq"].sync()
        assert p.nodes["koeln"].sync().rows_applied == 2
        with koeln.connect() as conn:
            assert conn.exec_driver_sql("SELECT at, v FROM stamps").all() == [
                ("2021-01-01 00:00:00", 10)
            ]
    finally:
        p.close()
