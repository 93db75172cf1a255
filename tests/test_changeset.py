"""The changeset format: every business value type survives exactly."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import math
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailsync.errors import MessageError
from mailsync.wire.changeset import ChangesetWriter, Control, RowBatch, TableDef, read_changeset

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
        (_valid().replace(b"\x01", b"\x09", 1), "version 9 is not supported"),
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
