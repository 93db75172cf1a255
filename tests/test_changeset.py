"""The changeset format: every business value type survives exactly; what
is garbled, and a control record that is not well-formed, is a MessageError."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import math
import re
from decimal import Decimal
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailsync.errors import MessageError
from mailsync.wire.changeset import (
    _EXT_DECIMAL,
    ChangesetWriter,
    Control,
    RowBatch,
    TableDef,
    read_changeset,
)
from mailsync.wire.controls import (
    Grant,
    ReloadRequest,
    Resend,
    RulesUpdate,
    parse_sequenced,
    parse_unsequenced,
)

offsets = st.integers(min_value=-23 * 60 - 59, max_value=23 * 60 + 59).map(
    lambda m: dt.timezone(dt.timedelta(minutes=m))
)
values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),  # beyond 64 bits too
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.decimals(allow_nan=True, allow_infinity=True),
    st.decimals(places=2, allow_nan=False, allow_infinity=False),
    st.text(),
    st.binary(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.dates(),
    st.times(),
    st.times(timezones=offsets),
    st.datetimes(),
    st.datetimes(timezones=offsets),
)


def same(a: Any, b: Any) -> bool:
    """Exact identity of values: type, scale, sign of zero, NaN, offset."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (
            a == b and math.copysign(1, a) == math.copysign(1, b)
        )
    if isinstance(a, Decimal):
        return a.as_tuple() == b.as_tuple() and str(a) == str(b)
    if isinstance(a, dt.datetime | dt.time):
        return a == b and a.utcoffset() == b.utcoffset() and a.isoformat() == b.isoformat()
    return bool(a == b)


def roundtrip(rows: list[tuple[Any, ...]], op: str = "U") -> list[Any]:
    buf = io.BytesIO()
    writer = ChangesetWriter(buf, {"from": "hq"})
    width = len(rows[0]) if rows else 1
    tdef = writer.table("t", [(f"c{i}", "ANY") for i in range(width)], ["c0"])
    writer.rows(tdef, op, rows)  # type: ignore[arg-type]
    writer.close()
    buf.seek(0)
    return list(read_changeset(buf))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(values, values, values), min_size=1, max_size=20))
def test_every_value_type_survives_exactly(rows: list[tuple[Any, ...]]) -> None:
    records = roundtrip(rows)
    batch = records[1]
    assert isinstance(records[0], TableDef)
    assert isinstance(batch, RowBatch)
    assert len(batch.rows) == len(rows)
    for got, sent in zip(batch.rows, rows, strict=True):
        for g, s in zip(got, sent, strict=True):
            assert same(g, s), (g, s)


def test_named_edge_values() -> None:
    edge = [
        (None, 2**200, -(2**70), Decimal("1.50"), Decimal("-0.000"), Decimal("1E+3")),
        ("Grüße, 東京, 🙂", b"\x00\xff", True, dt.date(1, 1, 1), dt.time(23, 59, 59, 999999), -0.0),
        (
            dt.datetime(2026, 3, 29, 2, 30),
            dt.datetime(2026, 3, 29, 2, 30, tzinfo=dt.timezone(dt.timedelta(hours=2))),
            dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
            Decimal("NaN"),
            float("inf"),
            "",
        ),
    ]
    got = roundtrip(edge)[1].rows
    for g_row, s_row in zip(got, edge, strict=True):
        for g, s in zip(g_row, s_row, strict=True):
            assert same(g, s), (g, s)


def test_deletes_carry_keys_and_controls_pass_through() -> None:
    buf = io.BytesIO()
    w = ChangesetWriter(buf)
    w.control("rules", [{"table": "t"}])
    tdef = w.table("t", [("id", "INTEGER"), ("name", "TEXT")], ["id"])
    w.rows(tdef, "D", [(1,), (2,)])
    summary = w.close()
    assert summary.rows == 2
    records = list(read_changeset(io.BytesIO(buf.getvalue())))
    assert isinstance(records[0], Control) and records[0].payload == [{"table": "t"}]
    assert isinstance(records[2], RowBatch) and records[2].rows == [(1,), (2,)]


def test_rows_of_the_wrong_width_are_refused_when_written() -> None:
    w = ChangesetWriter(io.BytesIO())
    tdef = w.table("t", [("id", "INTEGER"), ("name", "TEXT")], ["id"])
    with pytest.raises(ValueError, match="needs 2 values"):
        w.rows(tdef, "I", [(1,)])


def _valid() -> bytes:
    buf = io.BytesIO()
    w = ChangesetWriter(buf)
    tdef = w.table("t", [("id", "INTEGER")], ["id"])
    w.rows(tdef, "I", [(i,) for i in range(50)])
    w.close()
    return buf.getvalue()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "truncated"),
        (_valid()[:-3], "truncated|corrupt"),
        (b"\x93\xa3abc\x01\x80", "not a mailsync changeset"),
        (_valid().replace(b"\x02", b"\x09", 1), "version 9 is not supported"),
        (_valid() + b"\xc0", "after the end"),
    ],
)
def test_malformed_changesets_raise_message_error(data: bytes, message: str) -> None:
    with pytest.raises(MessageError, match=message):
        list(read_changeset(io.BytesIO(data)))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_random_corruption_never_escapes_as_another_error(data: st.DataObject) -> None:
    blob = bytearray(_valid())
    pos = data.draw(st.integers(0, len(blob) - 1))
    blob[pos] = data.draw(st.integers(0, 255))
    with contextlib.suppress(MessageError):
        list(read_changeset(io.BytesIO(bytes(blob))))


@pytest.mark.parametrize("text", [b"12,50 EUR", b"", b"1.2.3"])
def test_a_garbled_decimal_is_a_corrupt_changeset(text: bytes) -> None:
    """A signed changeset may still carry nonsense: decimal.InvalidOperation
    escaped as itself, past every guard of the apply stage."""
    buf = io.BytesIO()
    w = ChangesetWriter(buf)
    tdef = w.table("t", [("id", "INTEGER"), ("credit", "NUMERIC")], ["id"])
    w.rows(tdef, "I", [(1, msgpack.ExtType(_EXT_DECIMAL, text))])
    w.close()
    with pytest.raises(MessageError, match="changeset is corrupt"):
        list(read_changeset(io.BytesIO(buf.getvalue()), origin="changeset #1 from berlin"))


# ------------------------------------------------------- control records

GRANT = {
    "id": 1,
    "range": "orders",
    "start": 1,
    "end": 1000,
    "block": 100,
    "threshold": 0.8,
    "max_blocks": 2,
    "bind": "orders.order_no",
    "first": 1,
    "last": 100,
    "next": 1,
}


def test_a_grant_binds_a_column_whose_name_holds_a_dot() -> None:
    """``mailsync range add --bind`` splits at the first dot and accepts the
    rest as the column: the grant must read what the host granted."""
    assert Grant.parse({**GRANT, "bind": "orders.no.x"}).bind == "orders.no.x"


@pytest.mark.parametrize("bind", ["orders", ".order_no", "orders."])
def test_a_grant_bind_without_a_table_and_a_column_is_malformed(bind: str) -> None:
    with pytest.raises(MessageError, match=r"is not table\.column"):
        Grant.parse({**GRANT, "bind": bind})


RULE = {
    "table": "customers",
    "station": "koeln",
    "down": "IUD",
    "up": "",
    "row_filter": None,
    "conflict": "host-wins",
}


def test_a_rule_as_the_host_sends_it_parses() -> None:
    assert RulesUpdate.parse([RULE, {**RULE, "row_filter": "city = :station"}]).rules[0] == RULE


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"table": None}, "table is not a name"),
        ({"station": ""}, "station is not a name"),
        ({"down": "IX"}, "down is not a set of operations"),
        ({"up": None}, "up is not a set of operations"),
        ({"row_filter": 5}, "row_filter is not text"),
        ({"conflict": ["host-wins"]}, "conflict is not a policy name"),
    ],
    ids=["no-table", "empty-station", "down-IX", "no-up", "row-filter-5", "conflict-list"],
)
def test_a_rule_is_checked_field_by_field(change: dict[str, Any], message: str) -> None:
    """A missing table used to pass as "-", a bad down as text, a row filter
    of 5 unchecked: each failed later, in the apply, holding the link."""
    # None: the field is missing (row_filter: None is "no filter", and valid)
    rule = {k: v for k, v in {**RULE, **change}.items() if v is not None or k == "row_filter"}
    with pytest.raises(MessageError, match=f"malformed 'rules' control: {message}"):
        RulesUpdate.parse([rule])


def test_a_resend_request_names_what_a_bigint_holds() -> None:
    wanted = Resend.parse([3, [4, 2], 2**63 - 1]).wanted
    assert wanted == (3, (4, 2), 2**63 - 1)


@pytest.mark.parametrize(
    "item",
    [True, -1, 0, 2**63, 2**64 - 1, [2**63, 1], [1, True], "7"],
    ids=["true", "minus-1", "zero", "2**63", "2**64-1", "part-2**63", "part-true", "text"],
)
def test_a_resend_request_for_what_no_sequence_number_is_malformed(item: Any) -> None:
    with pytest.raises(MessageError, match="malformed 'resend' control"):
        Resend.parse([item])


def test_a_reload_request_id_fits_its_column() -> None:
    assert ReloadRequest.parse({"in_seq": 4, "id": "r" * 32}).request == "r" * 32
    with pytest.raises(MessageError, match="id is not a name of 1–32 characters"):
        ReloadRequest.parse({"in_seq": 4, "id": "r" * 33})


def test_a_control_kind_this_version_does_not_know_parses_to_nothing() -> None:
    """So a peer one version ahead still gets its ack and rows through;
    the kinds this version knows stay strict."""
    assert parse_unsequenced("future-thing", {"x": 1}, from_host=False) is None
    assert parse_unsequenced("reload", {"in_seq": 1}, from_host=True) is None  # not to a station
    assert parse_sequenced("future-thing", [1, 2]) is None
    with pytest.raises(MessageError, match="malformed 'resend' control"):
        parse_unsequenced("resend", {"x": 1}, from_host=False)
    with pytest.raises(MessageError, match="malformed 'rules' control"):
        parse_sequenced("rules", [{"table": "t"}])


# ------------------------------------------------- format 2: tagged columns


def _tagged(records: list[Any], version: int = 2, meta: dict[str, Any] | None = None) -> bytes:
    """A changeset made of raw records, as a peer could sign it."""
    body = [msgpack.packb(["mailsync-changeset", version, meta or {"dialect": "sqlite"}])]
    body += [msgpack.packb(r) for r in records]
    rows = sum(len(r[3][0]) for r in records if r[0] == "R")
    body.append(msgpack.packb(["E", {"rows": rows, "records": 1 + len(records)}]))
    return b"".join(body)


_T = ["T", 0, "t", [["id", "INTEGER", "int"], ["at", "DATETIME", "datetime"]], ["id"]]


def test_tagged_columns_travel_in_storage_form_with_the_sender_s_dialect() -> None:
    buf = io.BytesIO()
    w = ChangesetWriter(buf, {"dialect": "sqlite"})
    tdef = w.table("t", [("id", "INTEGER"), ("at", "DATETIME")], ["id"], ["int", "datetime"])
    w.rows(tdef, "I", [(1, "2021-01-01 00:00:00"), (2, None)])
    w.close()
    table, batch = list(read_changeset(io.BytesIO(buf.getvalue())))
    assert isinstance(table, TableDef) and table.tags == ("int", "datetime")
    assert table.form == "sqlite"
    assert isinstance(batch, RowBatch)
    assert batch.rows == [(1, "2021-01-01 00:00:00"), (2, None)]


def test_a_column_whose_values_do_not_fit_its_tag_goes_as_any() -> None:
    """SQLite holds any value in any column: the table is declared again
    for that batch, the misfit column tagged ``any``."""
    buf = io.BytesIO()
    w = ChangesetWriter(buf, {"dialect": "sqlite"})
    tdef = w.table("t", [("id", "INTEGER"), ("n", "INTEGER")], ["id"], ["int", "int"])
    w.rows(tdef, "I", [(1, "not a number"), (2, Decimal("1.5"))])
    w.rows(tdef, "I", [(3, 4)])
    w.close()
    records = list(read_changeset(io.BytesIO(buf.getvalue())))
    first, again, misfit, fitting = records
    assert isinstance(again, TableDef) and again.tags == ("int", "any")
    assert isinstance(misfit, RowBatch) and misfit.table.index == again.index
    assert misfit.rows == [(1, "not a number"), (2, Decimal("1.5"))]
    assert isinstance(fitting, RowBatch) and fitting.table.index == first.index  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("records", "message"),
    [
        (
            [["T", 0, "t", [["id", "INTEGER", "int"], ["at", "DATETIME", "hex"]], ["id"]]],
            "table 't', column 'at': unknown type tag 'hex'",
        ),
        (
            [["T", 0, "t", [["id", "INTEGER"]], ["id"]]],
            "table 't', column 'id': no type tag",
        ),
        (
            [_T, ["R", 0, "I", [[1], [20210101]]]],
            "table t, I batch, column 'at': a value of type int in a datetime column",
        ),
        (
            [_T, ["R", 0, "I", [["1"], [None]]]],
            "table t, I batch, column 'id': a value of type str in a int column",
        ),
        (
            [_T, ["R", 0, "I", [[1], ["2021-01-01" + "0" * 100]]]],
            "column 'at': a datetime value of 110 characters",
        ),
        (
            [_T, ["R", 0, "D", [[b"\x01"]]]],
            "table t, D batch, column 'id': a value of type bytes in a int column",
        ),
    ],
    ids=["unknown-tag", "no-tag", "int-as-datetime", "text-as-int", "oversize", "key"],
)
def test_a_value_that_does_not_fit_its_tag_is_refused_naming_where(
    records: list[Any], message: str
) -> None:
    with pytest.raises(MessageError, match=re.escape(message)) as caught:
        list(read_changeset(io.BytesIO(_tagged(records)), origin="changeset #3 from berlin"))
    assert str(caught.value).startswith("changeset #3 from berlin: ")
    assert "\n" not in str(caught.value)


def test_an_extension_value_in_a_tagged_column_is_refused() -> None:
    decimal = msgpack.ExtType(_EXT_DECIMAL, b"1.50")
    data = _tagged([_T, ["R", 0, "U", [[1], [decimal]]]])
    with pytest.raises(MessageError, match="a value of type Decimal in a datetime column"):
        list(read_changeset(io.BytesIO(data)))


def test_a_format_1_changeset_still_reads() -> None:
    """Nodes upgrade one by one: what an older node sent, or left in an
    outbox or inbox, is read as before (every column typed value by value)."""
    decimal = msgpack.ExtType(_EXT_DECIMAL, b"1.50")
    table = ["T", 0, "t", [["id", "INTEGER"], ["credit", "NUMERIC"]], ["id"]]
    data = _tagged([table, ["R", 0, "I", [[1], [decimal]]]], version=1, meta={"from": "hq"})
    tdef, batch = list(read_changeset(io.BytesIO(data)))
    assert isinstance(tdef, TableDef) and tdef.tags == () and tdef.form is None
    assert isinstance(batch, RowBatch) and batch.rows == [(1, Decimal("1.50"))]
