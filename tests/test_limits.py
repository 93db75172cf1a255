"""Decoding is bounded: a validly signed hostile changeset never exhausts the host (DESIGN §12).

A station's keys may be in an attacker's hands: everything it sends passes
the signature check. What a changeset may make a node decode is bounded by
the ``[limits]`` table of its config: decompressed bytes per part and per
changeset, bytes per record, rows per batch, columns per table, tables per
changeset, and the length of every string, bytes value, array and map the
msgpack decoder accepts. A message that breaks one is refused with a reason
that names the setting.

Where: the receiver checks the header numbers and reads the first part of a
changeset through (the only part that decodes on its own) before it buffers
anything — what fails is set aside, never buffered, and the cycle serves
koeln. A later part decodes only when the changeset is applied; a violation
there holds berlin's link alone.

berlin's messages are forged as berlin's own mailsync seals them
(``tests.test_containment.from_berlin``), but with hand-made bodies; the
host's peak memory is measured with :mod:`tracemalloc` around its cycle.

``MAILSYNC_HOSTILE_EXAMPLES`` (default 25) sets how many hostile changesets
the hypothesis test generates.
"""

from __future__ import annotations

import io
import os
import random
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailsync import CycleReport
from mailsync.config import load_config
from mailsync.errors import ConfigError, MessageError
from mailsync.store.tables import inbox
from mailsync.wire.changeset import MAGIC, VERSION, ChangesetWriter, read_changeset
from mailsync.wire.envelope import Codec, Header
from mailsync.wire.limits import DEFAULT_LIMITS, MIB, Limits
from mailsync.wire.message import Address, build_message
from tests.cluster import Cluster, customers, invoices, notes, orders
from tests.measure import measured
from tests.test_containment import (
    RefusingPostOffice,
    address,
    assert_koeln_served,
    customer,
    link,
    logged,
    started,
)

#: what the host's cycle may allocate (tracemalloc's peak) while it refuses
#: a bomb: the bombs below decompress into 100 MB and more
PEAK_BOUND = 64 * MIB

# ------------------------------------------------------------ forging bodies


def compressed(records: Iterator[bytes]) -> bytes:
    """A zstd body made of raw msgpack ``records``, streamed (a bomb is never
    held whole, here either)."""
    out = io.BytesIO()
    writer = Codec().body_writer(out)
    for record in records:
        writer.write(record)
    writer.close()  # type: ignore[no-untyped-call]
    return out.getvalue()


def head() -> bytes:
    return msgpack.packb([MAGIC, VERSION, {"from": "berlin", "to": "hq"}])


def table_record(index: int = 0, columns: int = 3, name: str = "customers") -> bytes:
    cols = [["id", "INTEGER", "int"], ["name", "VARCHAR", "text"], ["city", "VARCHAR", "text"]]
    cols = cols[:columns] + [[f"c{i}", "INTEGER", "int"] for i in range(columns - len(cols))]
    return msgpack.packb(["T", index, name, cols, ["id"]])


def array_header(n: int) -> bytes:
    """A msgpack array of ``n`` elements, before its elements."""
    return b"\xdd" + n.to_bytes(4, "big")


def nils(n: int, chunk: int = 1 << 20) -> Iterator[bytes]:
    """``n`` msgpack nils (one byte each), in chunks."""
    while n > 0:
        yield b"\xc0" * min(n, chunk)
        n -= chunk


def tiny_value_bomb(values: int = 100_000_000) -> Iterator[bytes]:
    """The issue's bomb: one batch of three columns of tiny values (nil),
    ~100 MB decompressed from a few kilobytes."""
    per_column = values // 3
    yield head()
    yield table_record()
    yield b"\x94\xa1R\x00\xa1I"  # ["R", 0, "I", ...
    yield b"\x93"  # ... [three columns]]
    for _ in range(3):
        yield array_header(per_column)
        yield from nils(per_column)


def zstd_bomb(megabytes: int = 300) -> Iterator[bytes]:
    """Controls of 1 MiB of zeros each, ``megabytes`` of them: every record
    is within the limits, the part is not."""
    yield head()
    record = msgpack.packb(["C", "padding", bytes(MIB)])
    for _ in range(megabytes):
        yield record


def seal_from_berlin(c: Cluster, office: RefusingPostOffice, body: bytes, **fields: Any) -> None:
    """Put ``body`` (compressed) into hq's mailbox sealed as berlin's
    mailsync seals a changeset: signed with berlin's key, for hq's."""
    fields.setdefault("ack", link(c, "berlin", "hq").in_seq)
    fields.setdefault("seq", 1)
    fields.setdefault("cid", uuid.uuid4().hex)
    header = Header("berlin", "hq", **fields)
    sealed = Codec().seal(
        header, body, c.host.ring.current.public, c.nodes["berlin"].ring.current.sign
    )
    sender, recipient = Address("berlin", address("berlin")), Address("hq", address("hq"))
    office.deliver(address("hq"), build_message(header, sender, recipient, sealed))


def set_limits(c: Cluster, **limits: int) -> None:
    """Give hq a [limits] table and open it again, as a restart would."""
    path = c.root / "hq" / "mailsync.toml"
    lines = "".join(f"{k} = {v}\n" for k, v in limits.items())
    path.write_text(path.read_text() + "\n[limits]\n" + lines)
    c.restart("hq")


@pytest.fixture
def office() -> RefusingPostOffice:
    return RefusingPostOffice()


@pytest.fixture
def cluster(tmp_path: Path, office: RefusingPostOffice) -> Iterator[Cluster]:
    c = started(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}", office)
    yield c
    c.close()


def host_cycle_with_koeln(c: Cluster) -> tuple[CycleReport, int]:
    """koeln's customer 2 waits to go out; one host cycle, measured."""
    c.execute("hq", customers.insert(), customer(2, "koeln"))
    return measured(c.host.sync)


def assert_set_aside_not_buffered(
    c: Cluster, office: RefusingPostOffice, report: CycleReport, peak: int, reason: str
) -> None:
    """berlin's changeset was set aside with ``reason`` (in the rejection and
    in hq's log), never buffered; koeln was served in the same cycle; the
    host's peak memory stayed under the bound."""
    assert report.set_aside == 1, (report.set_aside, report.errors)
    ((_, why),) = office.aside[address("hq")]
    assert reason in why, why
    assert any(reason in line for line in logged(c, "rejected")), logged(c, "rejected")
    assert not report.peer_errors, report.peer_errors
    assert link(c, "hq", "berlin").buffered == 0
    assert_koeln_served(c, office, report, 2)
    assert peak < PEAK_BOUND, f"peak {peak / MIB:.1f} MiB"


# ------------------------------------------------- bombs, set aside at receive


def test_a_zstd_bomb_is_set_aside_at_its_part_limit_without_being_held_in_memory(
    cluster: Cluster, office: RefusingPostOffice
) -> None:
    """300 MiB of zeros compress to a few kilobytes; the first part is
    decompressed as it is verified, keeping nothing, up to max_part_bytes."""
    body = compressed(zstd_bomb(300))
    assert len(body) < 64_000
    seal_from_berlin(cluster, office, body)
    report, peak = host_cycle_with_koeln(cluster)

    assert_set_aside_not_buffered(
        cluster,
        office,
        report,
        peak,
        "decompressed size of part 1 exceeds limits.max_part_bytes = 268,435,456",
    )


def test_a_changeset_of_a_hundred_million_tiny_values_is_set_aside_not_a_memory_error(
    cluster: Cluster, office: RefusingPostOffice
) -> None:
    """The issue's 5.6 kB bomb: it drove the host's sync to MemoryError, and
    stayed buffered to be retried first in every later cycle. msgpack now
    refuses the column's declared length before it builds one element."""
    body = compressed(tiny_value_bomb())
    assert len(body) < 64_000
    seal_from_berlin(cluster, office, body)
    report, peak = host_cycle_with_koeln(cluster)

    assert_set_aside_not_buffered(
        cluster, office, report, peak, "an array of 33,333,333 elements exceeds 100,000"
    )
    # the next cycle has nothing of it to retry
    assert not cluster.host.sync().errors


def test_a_text_value_declared_longer_than_the_limit_is_set_aside(
    cluster: Cluster, office: RefusingPostOffice
) -> None:
    """A str header declaring 4 GiB: refused once the value would pass
    max_value_bytes, not buffered to its declared length."""
    set_limits(cluster, max_value_bytes=MIB)
    bomb = b"\x93\xa1C\xa4note\xdb" + (2**32 - 1).to_bytes(4, "big")  # ["C", "note", str32
    body = compressed(iter([head(), bomb, *(b"x" * MIB for _ in range(3))]))
    seal_from_berlin(cluster, office, body)
    report, peak = host_cycle_with_koeln(cluster)

    assert_set_aside_not_buffered(
        cluster, office, report, peak, "exceeds limits.max_value_bytes = 1,048,576"
    )


@pytest.mark.parametrize(
    ("limits", "records", "reason"),
    [
        (
            {},
            [table_record(columns=1601)],
            "1,601 columns exceeds limits.max_columns = 1,600",
        ),
        (
            {"max_tables": 50},
            [table_record(i, name=f"t{i}") for i in range(51)],
            "51 tables exceeds limits.max_tables = 50",
        ),
        (
            {"max_batch_rows": 10},
            [table_record(), msgpack.packb(["R", 0, "I", [list(range(11))] * 3])],
            "11 rows exceeds limits.max_batch_rows = 10",
        ),
        (
            {"max_record_bytes": 100_000},
            [table_record(), msgpack.packb(["R", 0, "I", [["x" * 50_000] * 3] * 3])],
            "exceeds limits.max_record_bytes = 100,000",
        ),
    ],
    ids=["columns", "tables", "rows-per-batch", "record-bytes"],
)
def test_a_changeset_over_a_count_limit_is_set_aside_with_the_limit_named(
    cluster: Cluster,
    office: RefusingPostOffice,
    limits: dict[str, int],
    records: list[bytes],
    reason: str,
) -> None:
    if limits:
        set_limits(cluster, **limits)
    trailer = msgpack.packb(["E", {"rows": 0, "records": 1 + len(records)}])
    seal_from_berlin(cluster, office, compressed(iter([head(), *records, trailer])))
    report, peak = host_cycle_with_koeln(cluster)

    assert_set_aside_not_buffered(cluster, office, report, peak, reason)


# --------------------------------------------- a later part: held at apply


def test_a_bomb_in_a_later_part_holds_only_its_station_at_apply(
    cluster: Cluster, office: RefusingPostOffice
) -> None:
    """Part 2 decodes only after part 1: both are buffered, and the apply
    stops at the bomb's declared length; berlin's link is held with the
    reason, koeln is served in the same cycle, memory stays bounded."""
    c = cluster
    noise = random.Random(15).randbytes(200_000)  # incompressible: fills part 1
    body = compressed(_noise_then_bomb(noise))
    cut = 150_000  # inside the noise: the bomb lies in part 2
    assert len(body) > 200_000
    cid = uuid.uuid4().hex
    seal_from_berlin(c, office, body[:cut], part=1, parts=2, cid=cid)
    seal_from_berlin(c, office, body[cut:], part=2, parts=2, cid=cid)
    report, peak = host_cycle_with_koeln(c)

    assert report.set_aside == 0 and report.received_from["berlin"] == 2
    assert set(report.peer_errors) == {"berlin"}, report.peer_errors
    assert "exceeds 100,000" in report.peer_errors["berlin"]
    assert any("changeset #1 from berlin" in line for line in logged(c, "apply-failed"))
    assert_koeln_served(c, office, report, 2)
    assert peak < PEAK_BOUND, f"peak {peak / MIB:.1f} MiB"
    assert link(c, "hq", "berlin").in_seq == 0


def _noise_then_bomb(noise: bytes) -> Iterator[bytes]:
    bomb = tiny_value_bomb()
    yield next(bomb)  # the changeset's head
    yield msgpack.packb(["C", "padding", noise])
    yield from bomb


# --------------------------------------------------------------- the codec


def test_the_default_limits_admit_what_mailsync_writes_and_name_every_setting() -> None:
    """A batch of the default 5,000 rows is far inside every default, and a
    changeset read with limits reads as before."""
    assert DEFAULT_LIMITS.max_batch_rows >= 20 * 5000
    out = io.BytesIO()
    writer = Codec().body_writer(out)
    changeset = ChangesetWriter(writer)
    table = changeset.table("t", [("id", "INTEGER"), ("v", "TEXT")], ["id"])
    changeset.rows(table, "I", [(i, "x" * 100) for i in range(5000)])
    changeset.close()
    writer.close()  # type: ignore[no-untyped-call]
    codec = Codec()
    assert codec.check_first_part(out.getvalue(), "m", whole=True) > 500_000
    rows = [r for r in read_changeset(codec.stream([out.getvalue()], "m")) if hasattr(r, "rows")]
    assert len(rows[0].rows) == 5000


def test_the_changeset_limit_counts_every_part() -> None:
    codec = Codec(limits=Limits(max_changeset_bytes=3 * MIB, max_part_bytes=8 * MIB))
    body = compressed(zstd_bomb(4))
    cut = len(body) // 2
    reason = "the changeset's decompressed size exceeds limits.max_changeset_bytes"
    with pytest.raises(MessageError, match=re.escape(reason)):
        for _ in read_changeset(codec.stream([body[:cut], body[cut:]], "m")):
            pass


# ------------------------------------------------------------------ config


def test_limits_are_read_from_the_config_and_a_misspelt_one_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "mailsync.toml"
    base = (
        '[node]\nid = "hq"\nrole = "host"\ndatabase = "sqlite:///hq.db"\n'
        '[mailbox]\naddress = "hq@example.org"\nsend = "memory:"\nreceive = "memory:"\n'
    )
    path.write_text(base)
    assert load_config(path).limits == DEFAULT_LIMITS
    path.write_text(base + "[limits]\nmax_batch_rows = 20000\nmax_ahead = 500\n")
    limits = load_config(path).limits
    assert (limits.max_batch_rows, limits.max_ahead) == (20000, 500)
    assert limits.max_columns == DEFAULT_LIMITS.max_columns
    path.write_text(base + "[limits]\nmax_batch_row = 20000\n")
    with pytest.raises(
        ConfigError,
        match=r":\d+ \[limits\]: unknown setting 'max_batch_row' "
        r"\(did you mean 'max_batch_rows'\?\)",
    ):
        load_config(path)
    path.write_text(base + "[limits]\nmax_parts = 0\n")
    with pytest.raises(ConfigError, match="max_parts must be at least 1"):
        load_config(path)


# ---------------------------------------------------- hostile, generated

HOSTILE_EXAMPLES = int(os.environ.get("MAILSYNC_HOSTILE_EXAMPLES", "25"))

_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.floats(allow_nan=False),
)
_column_names = st.sampled_from(["id", "name", "city", "ghost", "x" * 70, ""])
#: type tags, known and not (format 2 declares one per column)
_tags = st.sampled_from(["int", "text", "any", "decimal", "datetime", "bogus"])


def outside_berlins_rules(c: Cluster) -> dict[str, list[tuple[Any, ...]]]:
    """hq's rows berlin may not touch: every customer not in berlin, and
    every row of the tables berlin has no rule for."""
    out = {t.name: c.rows("hq", t) for t in (invoices, notes, orders)}
    out["customers"] = [r for r in c.rows("hq", customers) if r[2] != "berlin"]
    return out


@st.composite
def hostile_records(draw: st.DrawFn) -> list[bytes]:
    """Records a station could sign: real and unknown tables, declared and
    undeclared columns and indexes, any operation, short or long batches,
    declared lengths that lie, a wrong or missing trailer."""
    records: list[bytes] = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["T", "R", "R", "C", "lie", "junk"]))
        index = draw(st.integers(-1, 3))
        if kind == "T":
            name = draw(st.sampled_from(["customers", "articles", "nope", "mailsync_links"]))
            columns = draw(
                st.lists(st.tuples(_column_names, st.just("INTEGER"), _tags), max_size=5)
            )
            pk = draw(st.lists(_column_names, max_size=2))
            records.append(msgpack.packb(["T", index, name, [list(c) for c in columns], pk]))
        elif kind == "R":
            op = draw(st.sampled_from(["I", "U", "D", "X"]))
            width = draw(st.integers(0, 4))
            rows = draw(st.integers(0, 8))
            columns = [[draw(_values) for _ in range(rows)] for _ in range(width)]
            records.append(msgpack.packb(["R", index, op, columns]))
        elif kind == "C":
            records.append(msgpack.packb(["C", draw(st.sampled_from(["rules", "x"])), {}]))
        elif kind == "lie":  # a declared length far beyond what follows
            n = draw(st.sampled_from([2**16, 2**20, 2**32 - 1]))
            what = draw(st.sampled_from([b"\xdd", b"\xdf", b"\xdb", b"\xc6"]))
            records.append(b"\x94\xa1R\x00\xa1I\x91" + what + n.to_bytes(4, "big"))
        else:
            records.append(draw(st.binary(max_size=16)))
    if draw(st.booleans()):
        rows = draw(st.integers(0, 3))
        records.append(msgpack.packb(["E", {"rows": rows, "records": len(records) + 1}]))
    return records


#: the ids of the koeln customers the test inserts (one per example), and others
_ids = st.one_of(st.integers(2_000_000_001, 2_000_000_030), st.integers(1, 6))


@st.composite
def plausible_records(draw: st.DrawFn) -> list[bytes]:
    """Well-formed batches of customers, as berlin's mailsync writes them,
    whose rows may lie in berlin's scope or not — inserts over koeln's rows,
    updates that move a row into or out of berlin, deletes of koeln's."""
    records = [msgpack.packb(["T", 0, "customers", _CUSTOMER_COLUMNS, ["id"]])]
    rows = 0
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["I", "U", "D"]))
        batch = draw(
            st.lists(
                st.tuples(_ids, st.text(max_size=8), st.sampled_from(["berlin", "koeln", None])),
                min_size=1,
                max_size=4,
                unique_by=lambda r: r[0],
            )
        )
        columns = (
            [[r[0] for r in batch]] if op == "D" else [list(c) for c in zip(*batch, strict=True)]
        )
        records.append(msgpack.packb(["R", 0, op, columns]))
        rows += len(batch)
    records.append(msgpack.packb(["E", {"rows": rows, "records": len(records) + 1}]))
    return records


_CUSTOMER_COLUMNS = [
    ["id", "INTEGER", "int"],
    ["name", "VARCHAR", "text"],
    ["city", "VARCHAR", "text"],
]


_HOSTILE = settings(
    max_examples=HOSTILE_EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@_HOSTILE
@given(records=hostile_records(), seq=st.integers(1, 3))
def test_a_validly_signed_hostile_changeset_never_crashes_a_host_cycle(
    cluster: Cluster, office: RefusingPostOffice, records: list[bytes], seq: int
) -> None:
    """Whatever berlin signs, hq's cycle ends without an exception, blames
    berlin alone (its message set aside, or its link held), writes nothing
    outside berlin's rules and still sends koeln its row in the same cycle."""
    one_hostile_cycle(cluster, office, records, seq)


@_HOSTILE
@given(records=plausible_records())
def test_a_validly_signed_changeset_never_writes_outside_the_station_s_rules(
    cluster: Cluster, office: RefusingPostOffice, records: list[bytes]
) -> None:
    """Well-formed batches that berlin applies at once (its next number):
    inserts, updates and deletes of koeln's rows and of its own are cut to
    what its rule allows — customers, up IUD, rows with ``city = 'berlin'``
    before and after the change."""
    one_hostile_cycle(cluster, office, records, 1)


def one_hostile_cycle(
    c: Cluster, office: RefusingPostOffice, records: list[bytes], seq: int
) -> None:
    body = compressed(iter([head(), *records]))
    seal_from_berlin(c, office, body, seq=link(c, "hq", "berlin").in_seq + seq)
    koeln_id = max([r[0] for r in c.rows("hq", customers)] + [2_000_000_000]) + 1
    c.execute("hq", customers.insert(), customer(koeln_id, "koeln"))
    before = outside_berlins_rules(c)
    report = c.host.sync()  # must not raise

    assert outside_berlins_rules(c) == before, "berlin wrote outside its rules"
    assert set(report.peer_errors) <= {"berlin"}, report.peer_errors
    assert report.sent_to["koeln"] == 1, (report.errors, report.sent_to)
    assert koeln_id in {r[0] for r in c.rows("hq", customers)}
    # koeln takes its row; nothing of berlin's is left for the next example
    c.nodes["koeln"].sync()
    office.aside.clear()
    with c.engines["hq"].begin() as conn:
        conn.execute(inbox.delete().where(inbox.c.peer == "berlin"))
