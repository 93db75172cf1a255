"""Sealed changesets: enrollment both ways, every rejection reason, key rotation."""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select, update

from mailsync.errors import MessageError
from mailsync.keys import KeyPair
from mailsync.store.tables import log_table
from mailsync.transport.maildir import deliver
from mailsync.wire.changeset import pack, unpack
from mailsync.wire.envelope import Codec, Header, read_header
from mailsync.wire.message import Address, build_message, extract_envelope
from tests.cluster import Cluster, customers


def customer(i: int) -> dict[str, object]:
    return {"id": i, "name": f"Kunde {i}", "city": "koeln"}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}", transport="maildir")
    c.host.add_rule("customers", down="IUD", up="IUD")
    yield c
    c.close()


def box(c: Cluster, name: str) -> Path:
    return c.root / "mail" / f"{name}@example.test"


def take_one(c: Cluster, name: str) -> bytes:
    """Remove the single waiting changeset from a mailbox and return it
    (bare acks, which carry no sequence number, stay where they are)."""
    (path,) = [
        p
        for p in (box(c, name) / "new").iterdir()
        if read_header(extract_envelope(p.read_bytes(), "x"), "x").seq > 0
    ]
    raw = path.read_bytes()
    path.unlink()
    return raw


def rewrap(raw: bytes, envelope: bytes) -> bytes:
    """The same message around another envelope."""
    try:
        header = read_header(envelope, "x")
    except Exception:
        header = Header("hq", "koeln", 1)
    return build_message(header, Address("a", "a@x"), Address("b", "b@x"), envelope)


def rejections(c: Cluster, name: str) -> list[str]:
    with c.engines[name].connect() as conn:
        return list(
            conn.execute(
                select(log_table.c.message).where(log_table.c.event == "rejected")
            ).scalars()
        )


def test_both_enrollment_paths_round_trip(tmp_path: Path) -> None:
    c = Cluster(tmp_path, f"sqlite:///{tmp_path / 'hq.db'}", ("koeln",), transport="maildir")
    try:
        c.names.append("berlin")
        from mailsync.node import Node, init_node
        from mailsync.store.engine import open_engine
        from tests.cluster import schema

        engine = open_engine(f"sqlite:///{tmp_path / 'berlin.db'}")
        schema.create_all(engine)
        c.engines["berlin"] = engine
        init_node(
            tmp_path / "berlin" / "mailsync.toml",
            role="remote",
            node_id="berlin",
            database=f"sqlite:///{tmp_path / 'berlin.db'}",
            address="berlin@example.test",
            mail=f"maildir:{tmp_path / 'mail'}",
        )
        c.nodes["berlin"] = Node.open(tmp_path / "berlin" / "mailsync.toml")
        own_key = c.nodes["berlin"].public_key
        c.enroll("berlin", host_makes_keys=True)
        assert c.nodes["berlin"].public_key != own_key  # took the keys from the bundle
        c.host.add_rule("customers", down="IUD", up="IUD")
        c.execute("hq", customers.insert(), customer(1))
        c.sync("hq", "koeln", "berlin")
        c.execute("berlin", customers.insert(), customer(2))
        c.execute("koeln", customers.insert(), customer(3))
        c.converge()
        assert c.agree("customers") and len(c.rows("berlin", customers)) == 3
    finally:
        c.close()


Mutation = Callable[[bytes], bytes]


def flip(offset_from: Callable[[bytes], int]) -> Mutation:
    def mutate(env: bytes) -> bytes:
        i = offset_from(env)
        return env[:i] + bytes([env[i] ^ 0x01]) + env[i + 1 :]

    return mutate


def header_end(env: bytes) -> int:
    return 9 + struct.unpack_from(">I", env, 5)[0]


def resender(name: str) -> Mutation:
    def mutate(env: bytes) -> bytes:
        head = unpack(env[9 : header_end(env)])
        head["from"] = name
        new = pack(head)
        return env[:5] + struct.pack(">I", len(new)) + new + env[header_end(env) :]

    return mutate


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        # any byte of the clear header: caught as altered, whatever field it hits
        (flip(lambda e: header_end(e) - 3), "bad signature|malformed|truncated|extra bytes"),
        (flip(lambda e: header_end(e) + 5), "bad signature"),  # the ciphertext
        (flip(lambda e: len(e) - 7), "bad signature"),  # the signature
        (resender("berlin"), "bad signature"),  # replayed under another station's name
        (resender("mallory"), "unknown sender 'mallory'"),
        (lambda e: e[:4] + b"\x09" + e[5:], "version 9 is not supported"),
        (lambda e: e[: len(e) // 2], "envelope is truncated"),
        (lambda e: e[:20], "truncated"),
        (lambda e: b"", "attachment is empty"),
    ],
    ids=[
        "header-byte",
        "ciphertext-byte",
        "signature-byte",
        "replay-as-berlin",
        "unknown-sender",
        "version",
        "truncated-half",
        "truncated-header",
        "zero-bytes",
    ],
)
def test_each_rejection_is_set_aside_and_the_cycle_goes_on(
    cluster: Cluster, mutate: Mutation, reason: str
) -> None:
    cluster.sync("hq", "koeln")
    cluster.execute("koeln", customers.insert(), customer(10))
    cluster.sync("koeln")
    raw = take_one(cluster, "hq")
    bad = rewrap(raw, mutate(extract_envelope(raw, "x")))
    deliver(box(cluster, "hq"), bad)
    report = cluster.sync("hq")["hq"]
    assert report.set_aside == 1 and report.applied == []
    assert any(re.search(reason, r) for r in rejections(cluster, "hq")), rejections(cluster, "hq")
    assert len(list((box(cluster, "hq") / ".Unrecognized" / "cur").iterdir())) == 1
    assert cluster.host.status().set_aside == 1
    # the genuine message still applies when it comes
    deliver(box(cluster, "hq"), raw)
    assert cluster.sync("hq")["hq"].rows_applied == 1


def test_spam_and_wrong_recipient(cluster: Cluster) -> None:
    cluster.sync("hq")
    raw = take_one(cluster, "koeln")
    deliver(box(cluster, "berlin"), raw)  # swapped recipient: koeln's mail in berlin's box
    deliver(box(cluster, "berlin"), b"From: x@y\r\nSubject: cheap\r\n\r\nbuy now")
    report = cluster.sync("berlin")["berlin"]
    assert report.set_aside == 2
    reasons = rejections(cluster, "berlin")
    assert any("addressed to 'koeln', not 'berlin'" in r for r in reasons)
    assert any("not a mailsync message" in r for r in reasons)


def test_a_message_cannot_be_replayed(cluster: Cluster) -> None:
    cluster.sync("hq")
    raw = take_one(cluster, "koeln")
    deliver(box(cluster, "koeln"), raw)
    assert cluster.sync("koeln")["koeln"].rows_applied == 0  # the rules only, no rows yet
    cluster.execute("koeln", customers.insert(), customer(5))
    deliver(box(cluster, "koeln"), raw)
    report = cluster.sync("koeln")["koeln"]
    assert report.duplicates == 1 and report.applied == []


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_random_mutations_are_always_rejected(cluster: Cluster, data: st.DataObject) -> None:
    if not hasattr(cluster, "_valid"):
        cluster.sync("hq")
        cluster._valid = take_one(cluster, "koeln")  # type: ignore[attr-defined]
    raw: bytes = cluster._valid  # type: ignore[attr-defined]
    env = bytearray(extract_envelope(raw, "x"))
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, max(len(env) - 1, 0)))
        if kind == "flip" and env:
            env[pos] ^= data.draw(st.integers(1, 255))
        elif kind == "cut":
            del env[pos : pos + data.draw(st.integers(1, 64))]
        else:
            env[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
    if bytes(env) == extract_envelope(raw, "x"):
        return
    deliver(box(cluster, "koeln"), rewrap(raw, bytes(env)))
    report = cluster.sync("koeln")["koeln"]  # never raises
    assert report.set_aside == 1 and report.applied == [] and report.received == 0


def test_key_rotation_keeps_mail_flowing(cluster: Cluster) -> None:
    cluster.sync("hq", "koeln", "berlin")
    old = cluster.host.public_key
    # koeln seals a message to the host's current key, still on its way ...
    cluster.execute("koeln", customers.insert(), customer(20))
    cluster.sync("koeln")
    new = cluster.host.rotate_keys()
    assert new != old
    # ... and it still opens: the old key is within its grace period
    cluster.execute("hq", customers.insert(), customer(21))
    report = cluster.sync("hq")["hq"]
    assert report.rows_applied == 1 and not report.set_aside
    cluster.sync("koeln", "berlin")
    for name in ("koeln", "berlin"):
        from mailsync import trust

        with cluster.engines[name].connect() as conn:
            assert trust.current_key(conn, "hq") == new
    # after the stations acknowledge, the host signs with the new key alone
    cluster.execute("koeln", customers.insert(), customer(22))
    cluster.execute("berlin", customers.insert(), customer(23))
    cluster.converge()
    assert cluster.agree("customers")
    with cluster.engines["hq"].begin() as conn:
        from mailsync.store.tables import links

        conn.execute(update(links).values(acked_seq=links.c.key_announced_seq))
    # a station rotates too
    cluster.nodes["koeln"].rotate_keys()
    cluster.execute("koeln", customers.insert(), customer(24))
    cluster.converge()
    cluster.execute("hq", customers.insert(), customer(25))
    cluster.converge()
    assert cluster.agree("customers")
    assert not any(n.status().set_aside for n in cluster.nodes.values())


def sealed(header: Header) -> bytes:
    pair = KeyPair.generate()
    return Codec().seal(header, b"", pair.public, pair.sign)


@pytest.mark.parametrize(
    "numbers",
    [{"seq": 2**63}, {"ack": 2**63}, {"acked": 2**63}, {"parts": 2**63}, {"ack": 2**64 - 1}],
    ids=["seq", "ack", "acked", "parts", "ack-uint64"],
)
def test_a_header_number_beyond_what_a_bigint_holds_is_impossible(numbers: dict[str, int]) -> None:
    """Signed by a known peer is not well-formed (DESIGN §12): such an ack
    went into a BIGINT column and failed the cycle on every run."""
    blob = sealed(Header("berlin", "hq", **{"seq": 1, **numbers}))
    with pytest.raises(MessageError, match="envelope header has impossible numbers"):
        read_header(blob, "message m1")


def test_a_header_number_a_bigint_holds_is_read() -> None:
    biggest = 2**63 - 1
    header = read_header(sealed(Header("berlin", "hq", biggest, ack=biggest)), "message m1")
    assert (header.seq, header.ack) == (biggest, biggest)
