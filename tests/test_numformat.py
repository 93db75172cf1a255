"""Formatted numbers (issue 16, item 4): a text column bound to a range.

The format's grammar and its canonical form in Python; the SQL each dialect
writes for reading a number back agrees with Python on any text (a property
test against the real databases); a bound text column filled and guarded by
the trigger on the host (SQLite and PostgreSQL) and on a station; the
operator's mistakes refused with one line; the never-twice guarantee after a
restore is in ``tests/test_restore.py`` (parametrized over a format).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from mailsync.dialects import dialect_for
from mailsync.dialects import postgresql as pg_sql
from mailsync.dialects import sqlite as sqlite_sql
from mailsync.errors import ConfigError, MessageError
from mailsync.ranges import admin, exchange, model
from mailsync.ranges.draw import next_number
from mailsync.ranges.numformat import PLAIN, number_in, parse_format
from mailsync.store.tables import log_table
from mailsync.wire.controls import Grant
from tests.cluster import Cluster, orders

FORMATS = ("R-{year}-{n:06}", "{n}", "INV{n:04}/{year}", "{year}{n:03}x", "A {n}.B")


def test_a_format_renders_and_reads_back_its_canonical_text() -> None:
    fmt = parse_format("R-{year}-{n:06}", where="t")
    assert fmt.render(123, 2026) == "R-2026-000123"
    assert fmt.render(1234567, 2026) == "R-2026-1234567"  # wider than the padding
    assert fmt.number_of("R-2026-000123") == 123
    assert fmt.number_of("R-1999-1234567") == 1234567
    for not_ours in (
        "R-2026-123",  # not padded: not canonical
        "R-2026-0000123",  # padded too far
        "r-2026-000123",  # another prefix
        "R-26-000123",
        "R-2026-00012x",
        "R-2026-",
        "R-2026-0001234567890123456789",  # more than 18 digits
        "R-２０２６-000123",  # fullwidth digits are not digits here
        123,
        None,
    ):
        assert fmt.number_of(not_ours) is None, not_ours
    tail = parse_format("INV{n:04}/{year}", where="t")
    assert tail.render(7, 2027) == "INV0007/2027" and tail.number_of("INV0007/2027") == 7
    assert number_in("0042", None) is None or number_in("42", None) == 42
    assert number_in(42, None) == 42 and number_in(True, None) is None


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("R-{year}", "has no {n}"),
        ("{n}-{n}", "{n} more than once"),
        ("{year}{year}{n}", "{year} more than once"),
        ("{n:019}", "more than 18 digits"),
        ("{n:00}", "pads to no digits"),
        ("R-{x}-{n}", "not '{'"),
        ("R'{n}", 'not "\'"'),
        ("100%{n}", "not '%'"),
        ("R:{n}", "not ':'"),
        ("R-{n}\n", r"not '\n'"),
        ("R" * 70 + "{n}", "longer than 64"),
    ],
)
def test_a_bad_format_is_refused_with_what_is_wrong(text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(words)):
        parse_format(text, where="range r")


@settings(max_examples=300, derandomize=True)
@given(
    st.sampled_from(FORMATS),
    st.integers(0, 10**18 - 1),
    st.integers(1000, 9999),
)
def test_every_number_reads_back_from_its_text(fmt_text: str, n: int, year: int) -> None:
    fmt = parse_format(fmt_text, where="t")
    assert fmt.number_of(fmt.render(n, year)) == n


def _texts() -> st.SearchStrategy[str]:
    """Rendered numbers, and rendered numbers damaged a little: the texts a
    check must tell apart."""
    rendered = st.builds(
        lambda f, n, y: parse_format(f, where="t").render(n, y),
        st.sampled_from(FORMATS),
        st.integers(0, 10**19),
        st.integers(0, 99999),
    )

    def damage(s: str, at: int, ch: str, how: int) -> str:
        at = at % (len(s) + 1)
        return (s[:at] + ch + s[at:], s[:at] + s[at + 1 :], s[:at] + ch + s[at + 1 :])[how]

    damaged = st.builds(
        damage,
        rendered,
        st.integers(0, 40),
        st.sampled_from("0123456789R-/ xé."),
        st.integers(0, 2),
    )
    return st.one_of(rendered, damaged, st.text(max_size=30))


@pytest.mark.parametrize("fmt_text", FORMATS)
def test_the_databases_read_a_number_as_python_does(db_url: str, fmt_text: str) -> None:
    """The SQL a bound column's trigger and the host's accounting use to
    read ``n`` agrees with :meth:`NumberFormat.number_of` on any text."""
    from mailsync.store.engine import open_engine

    fmt = parse_format(fmt_text, where="t")
    engine = open_engine(db_url)
    pg = engine.dialect.name == "postgresql"
    sql = pg_sql.number_sql(fmt, "CAST(:v AS text)") if pg else sqlite_sql.number_sql(fmt, ":v")
    plain = (
        pg_sql.number_sql(PLAIN, "CAST(:v AS text)") if pg else sqlite_sql.number_sql(PLAIN, ":v")
    )
    query, plain_query = text(f"SELECT {sql}"), text(f"SELECT {plain}")

    @settings(
        max_examples=150,
        derandomize=True,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(_texts())
    @example("R-2026-000123")
    @example("0042")
    def check(value: str) -> None:
        value = value.replace("\x00", "")  # PostgreSQL text holds no NUL
        with engine.connect() as conn:
            assert conn.execute(query, {"v": value}).scalar() == fmt.number_of(value), value
            assert conn.execute(plain_query, {"v": value}).scalar() == PLAIN.number_of(value)

    try:
        check()
    finally:
        engine.dispose()


def cluster(tmp_path: Path, host_url: str) -> Cluster:
    c = Cluster(
        tmp_path,
        host_url,
        ("koeln",),
        node_settings={"resend_after_minutes": 0, "gap_request_minutes": 0},
    )
    c.host.add_rule("orders", down="IUD", up="IUD")
    return c


def add(c: Cluster, fmt: str = "R-{year}-{n:06}", **kw: object) -> model.RangeDef:
    args: dict[str, object] = {"first": 1000, "last": 99_999, "block": 10, **kw}
    spec = model.RangeSpec("order_no", format=fmt, **args)  # type: ignore[arg-type]
    with c.engines["hq"].begin() as conn:
        return admin.add_range(conn, spec)


def test_a_formatted_column_is_filled_and_guarded_on_host_and_station(
    tmp_path: Path, db_url: str
) -> None:
    c = cluster(tmp_path, db_url)
    try:
        add(c, bind="orders.order_no")
        c.sync("hq", "koeln")
        with c.engines["koeln"].connect() as conn:
            year = dialect_for(conn).current_year(conn)
        with c.engines["hq"].connect() as conn:
            assert dialect_for(conn).current_year(conn) == year  # one machine, one clock
        c.execute(
            "koeln", orders.insert(), [{"id": 1, "customer": "a"}, {"id": 2, "customer": None}]
        )
        got = {r[0]: r[1] for r in c.rows("koeln", orders)}
        assert got == {1: f"R-{year}-001000", 2: f"R-{year}-001001"}
        c.execute("hq", orders.insert(), {"id": 3, "customer": "b"})
        (host_no,) = [r[1] for r in c.rows("hq", orders)]
        assert re.fullmatch(rf"R-{year}-0010[1-9]\d", host_no), host_no  # the host's own block
        # drawn first by the API: the text to store, accepted by the trigger
        drawn = c.nodes["koeln"].next_number("order_no")
        assert drawn == f"R-{year}-001002"
        c.execute("koeln", orders.insert(), {"id": 10, "order_no": drawn})
        # not drawn yet, another node's, another year's text of no number,
        # the plain number, padding that is not canonical: refused
        for name, number in (
            ("koeln", f"R-{year}-001005"),
            ("koeln", f"R-{year}-005000"),
            ("hq", f"R-{year}-001002"),
            ("koeln", "1002"),
            ("koeln", f"R-{year}-1002"),
            ("koeln", "R-20x6-001002"),
        ):
            with pytest.raises(IntegrityError, match="was not drawn on this node from number"):
                c.execute(name, orders.insert(), {"id": 11, "order_no": number})
        c.sync("koeln", "hq", "koeln")
        assert c.rows("hq", orders) == c.rows("koeln", orders)
        assert len(c.rows("hq", orders)) == 4
        # the host reads the station's numbers back from the bound column
        with c.engines["hq"].connect() as conn:
            rdef = model.get_range(conn, "order_no")
            (lease,) = [x for x in model.list_leases(conn, "order_no") if x.holder == "koeln"]
            assert exchange._seen_next(conn, rdef, lease) == 1003
    finally:
        c.close()


def test_a_station_cannot_bring_a_formatted_number_outside_its_leases(
    tmp_path: Path, db_url: str
) -> None:
    """A station whose trigger is gone (a hostile or broken one) sends a row
    with a number of the host's block: the host sets that row aside."""
    c = cluster(tmp_path, db_url)
    try:
        add(c, bind="orders.order_no")
        c.sync("hq", "koeln")
        with c.engines["koeln"].begin() as conn:
            year = dialect_for(conn).current_year(conn)
            dialect_for(conn).drop_binding(conn, "orders", "order_no")
        stolen = f"R-{year}-009000"
        c.execute(
            "koeln", orders.insert(), [{"id": 1, "order_no": stolen}, {"id": 2, "order_no": None}]
        )
        c.sync("koeln", "hq")
        assert [r[0] for r in c.rows("hq", orders)] == [2]
        with c.engines["hq"].connect() as conn:
            said = [m for (m,) in conn.execute(text("SELECT message FROM mailsync_log"))]
        assert any("order_no holds a number not from koeln's leases" in m for m in said), said
        assert log_table is not None
    finally:
        c.close()


def test_the_operators_mistakes_with_a_format_are_one_line_errors(
    tmp_path: Path, db_url: str
) -> None:
    c = cluster(tmp_path, db_url)
    try:
        with pytest.raises(ConfigError, match="needs a text column"):
            add(c, bind="orders.id")
        with pytest.raises(ConfigError, match=r"VARCHAR\(20\), too short for 'R-2000-10{15}'"):
            add(c, fmt="R-{year}-{n}", last=10**15, bind="orders.order_no")
        with pytest.raises(ConfigError, match=re.escape("has no {n}")):
            add(c, fmt="R-{year}")
        with c.engines["hq"].connect() as conn:
            assert model.list_ranges(conn) == []  # nothing half-made
        # a format without a bound column: the API hands out the text
        add(c, fmt="K{n:05}")
        assert next_number(c.engines["hq"], "order_no") == "K01000"
    finally:
        c.close()


def test_a_grant_with_a_hostile_format_is_refused() -> None:
    grant = Grant(1, "r", 1, 100, 10, 0.5, 2, "orders.order_no", 1, 10, 1, "R-{n:06}")
    assert Grant.parse(grant.payload()) == grant
    for bad in ("R-{x}", "{n}{n}", "x" * 65, 7):
        payload = {**grant.payload(), "format": bad}
        with pytest.raises(MessageError, match="format"):
            Grant.parse(payload)
    plain = {k: v for k, v in grant.payload().items() if k != "format"}
    assert Grant.parse(plain).format is None  # a host of an earlier version
