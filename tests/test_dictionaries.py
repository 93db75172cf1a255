"""Per-link zstd dictionaries: trained from the link's own traffic, carried in
the sealed stream, used only once acknowledged, and never a reason to decode
wrongly — lost, duplicated, reordered, restored, forged or oversize."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from sqlalchemy import func, select

from mailsync import dictionaries as dicts_mod
from mailsync.errors import MessageError
from mailsync.store.tables import dictionaries, dictionary_samples, outbox
from mailsync.tools.inspection import inspect_message
from mailsync.transport.memory import MemoryPostOffice
from mailsync.wire.changeset import ChangesetWriter, read_changeset
from mailsync.wire.controls import (
    Dictionary,
    DictionaryWanted,
    parse_sequenced,
    parse_unsequenced,
)
from mailsync.wire.envelope import (
    Codec,
    Header,
    UnknownDictionary,
    dictionary_contexts,
    dictionary_id,
    read_header,
)
from mailsync.wire.message import Address, build_message, extract_envelope
from tests.cluster import Cluster, customers

#: small enough that a handful of changesets train one
FAST = {"dictionary_samples": 4, "dictionary_rotate": 6, "resend_after_minutes": 0}


class Recording(MemoryPostOffice):
    """Remembers the clear header of every changeset it delivers."""

    def __init__(self) -> None:
        super().__init__()
        self.headers: list[Header] = []
        self.raws: list[bytes] = []

    def deliver(self, recipient: str, raw: bytes) -> str:
        self.headers.append(read_header(extract_envelope(raw, "m"), "m"))
        self.raws.append(raw)
        return super().deliver(recipient, raw)

    def used(self) -> set[int]:
        return {h.dictionary for h in self.headers if h.dictionary}


def pair(tmp_path: Path, **settings: object) -> tuple[Cluster, Recording]:
    office = Recording()
    c = Cluster(
        tmp_path,
        f"sqlite:///{tmp_path / 'hq.db'}",
        ("koeln",),
        office=office,
        node_settings={**FAST, "gap_request_minutes": 0, **settings},
    )
    c.host.add_rule("customers", down="IUD", up="IUD")
    c.sync("hq", "koeln", "hq")
    return c, office


def edit(c: Cluster, step: int, rows: int = 5) -> None:
    """A small changeset's worth of new customers on the host."""
    c.execute(
        "hq",
        customers.insert(),
        [
            {"id": step * 100 + i, "name": f"Kunde {step} {i}", "city": "Köln", "credit": i}
            for i in range(rows)
        ],
    )


def held(c: Cluster, node: str, way: str) -> list[int]:
    with c.engines[node].connect() as conn:
        d = dictionaries.c
        return list(conn.execute(select(d.id).where(d.way == way).order_by(d.seq)).scalars())


def run(c: Cluster, steps: range) -> None:
    for step in steps:
        edit(c, step)
        c.sync("hq", "koeln")
    c.sync("hq", "koeln", "hq")


def test_a_dictionary_is_trained_carried_used_once_acknowledged_and_rotated(
    tmp_path: Path,
) -> None:
    c, office = pair(tmp_path)
    try:
        run(c, range(1, 5))  # four samples: trained, carried in the next changeset
        assert not office.used()
        edit(c, 5)
        c.sync("hq")
        (carried,) = held(c, "hq", "out")
        assert not office.used(), "not used before the peer acknowledged it"
        c.sync("koeln", "hq")
        assert held(c, "koeln", "in") == [carried]
        run(c, range(6, 9))
        assert office.used() == {carried}
        assert c.agree("customers")
        # `mailsync inspect` opens one with the dictionary the station holds
        raw = next(r for r, h in zip(office.raws, office.headers, strict=True) if h.dictionary)
        seen = inspect_message(c.nodes["koeln"], raw)
        assert seen.opened == "yes" and seen.summary.rows == 5
        run(c, range(9, 20))  # past dictionary_rotate: a new one, used in turn
        assert len(office.used()) >= 2
        assert c.agree("customers")
        assert 1 <= len(held(c, "koeln", "in")) <= dicts_mod.KEEP_RECEIVED
        with c.engines["hq"].connect() as conn:
            samples = conn.execute(select(func.count()).select_from(dictionary_samples)).scalar()
        assert samples is not None and samples <= FAST["dictionary_samples"]
    finally:
        c.close()


def test_a_lost_or_duplicated_carrier_delays_the_dictionary_never_breaks_it(
    tmp_path: Path,
) -> None:
    """The changeset carrying the dictionary is lost: nothing uses the
    dictionary until it came again and was acknowledged; a duplicate of it
    changes nothing. (Nothing is resent by time here: the station asks for
    the gap.)"""
    c, office = pair(tmp_path, resend_after_minutes=10_000)
    try:
        run(c, range(1, 5))
        edit(c, 5)
        c.sync("hq")
        (carried,) = held(c, "hq", "out")
        carrier = office.raws[-1]
        office.boxes["koeln@example.test"].clear()  # lost
        for step in (6, 7):  # more changesets while it is unacknowledged
            edit(c, step)
            c.sync("hq", "koeln")
        # the station asked for the gap and got the carrier again; the host
        # has not heard its ack yet: the dictionary is not used
        assert not office.used() and held(c, "koeln", "in") == [carried]
        office.deliver("koeln@example.test", carrier)  # a late duplicate
        run(c, range(8, 11))
        assert office.used() == {carried}
        assert held(c, "koeln", "in") == [carried]
        assert c.agree("customers")
    finally:
        c.close()


def test_bodies_with_a_dictionary_are_smaller(tmp_path: Path) -> None:
    c, office = pair(tmp_path)
    try:
        run(c, range(1, 12))
        sizes: dict[bool, list[int]] = {True: [], False: []}
        for h in office.headers:
            if h.seq and h.parts == 1 and h.seq > 1:
                sizes[bool(h.dictionary)].append(h.length)
        assert sizes[True] and sizes[False]
        assert max(sizes[True]) < min(sizes[False])
    finally:
        c.close()


def test_a_body_naming_an_unknown_dictionary_is_asked_for_and_comes_again(
    tmp_path: Path,
) -> None:
    """The station loses its dictionaries (an admin deleted them, say): the
    next body is set aside, never decoded with another; the station asks,
    the host sends the dictionary again with the changeset."""
    c, office = pair(tmp_path)
    try:
        run(c, range(1, 9))
        assert office.used()
        with c.engines["koeln"].begin() as conn:
            conn.execute(dictionaries.delete())
        c.restart("koeln")
        edit(c, 9)
        c.sync("hq")
        report = c.sync("koeln")["koeln"]
        assert report.set_aside == 1 and not report.applied
        c.sync("hq", "koeln", "hq", "koeln")
        assert c.agree("customers")
        assert held(c, "koeln", "in")
        with c.engines["hq"].connect() as conn:
            assert conn.execute(select(func.count()).select_from(outbox)).scalar() == 0
    finally:
        c.close()


def test_a_station_restored_from_a_backup_without_the_dictionary_catches_up(
    tmp_path: Path,
) -> None:
    c, office = pair(tmp_path)
    try:
        run(c, range(1, 3))
        copy = c.backup("koeln")  # before any dictionary
        run(c, range(3, 12))
        assert office.used()
        c.restore("koeln", copy)
        assert held(c, "koeln", "in") == []
        edit(c, 12)
        for _ in range(8):
            c.sync("hq", "koeln")
            if c.agree("customers"):
                break
        c.sync("hq", "koeln", "hq", "koeln")
        assert c.agree("customers")
        edit(c, 13)
        c.sync("hq", "koeln", "hq", "koeln")
        assert c.agree("customers")
    finally:
        c.close()


def test_an_oversize_dictionary_holds_the_link_with_the_limit_named(tmp_path: Path) -> None:
    """Operator mistake: the station admits smaller dictionaries than the
    host trains. The changeset carrying one fails with the limit named, the
    link is held, nothing crashes; raising the limit lets it through."""
    c, _ = pair(tmp_path, dictionary_bytes=4096)
    try:
        path = tmp_path / "koeln" / "mailsync.toml"
        path.write_text(path.read_text() + "\n[limits]\nmax_dictionary_bytes = 256\n")
        c.restart("koeln")
        for step in range(1, 7):
            edit(c, step, rows=20)
            c.sync("hq", "koeln")
        c.sync("hq")
        (link,) = c.nodes["koeln"].status().links
        assert held(c, "hq", "out")
        if link.held is None:  # trained from little: perhaps under 256 bytes
            pytest.skip("the dictionary trained was small enough")
        assert "max_dictionary_bytes" in link.held
        path.write_text(path.read_text().replace("max_dictionary_bytes = 256", ""))
        c.restart("koeln")
        c.cli("koeln", "inbox", "retry", "hq")
        for _ in range(3):
            c.sync("hq", "koeln")
        assert c.agree("customers")
    finally:
        c.close()


# ----------------------------------------------------------------- the codec


def test_forged_and_oversize_dictionary_controls_do_not_parse() -> None:
    data = b"mailsync dictionary " * 50
    good = Dictionary(dictionary_id(data), data)
    assert parse_sequenced("dict", good.payload()) == good
    assert parse_unsequenced("dict", good.payload(), from_host=True) == good
    forged = {"id": good.id ^ 1, "data": data}
    with pytest.raises(MessageError, match="not the digest"):
        parse_sequenced("dict", forged)
    with pytest.raises(MessageError, match="at most"):
        big = b"x" * (1024 * 1024 + 1)
        parse_sequenced("dict", {"id": dictionary_id(big), "data": big})
    for bad in ({"id": -1, "data": data}, {"id": 1}, [1, 2], {"id": "1", "data": data}):
        with pytest.raises(MessageError):
            parse_sequenced("dict", bad)
    # well-formed, signed, but not a dictionary zstd can load (its magic
    # number, then garbage): refused before it is stored
    broken = b"\x37\xa4\x30\xec" + b"garbage" * 10
    with pytest.raises(MessageError, match="not a usable zstd dictionary"):
        dictionary_contexts(broken, 9)
    with pytest.raises(MessageError, match="not a usable zstd dictionary"):
        Codec().learn("hq", broken)
    wanted = parse_unsequenced("dict?", list(range(100)), from_host=False)
    assert isinstance(wanted, DictionaryWanted) and len(wanted.ids) == 16
    with pytest.raises(MessageError):
        parse_unsequenced("dict?", ["x"], from_host=False)


def body(codec: Codec, peer: str, dictionary: int, rows: int = 10) -> bytes:
    buf = io.BytesIO()
    compressed = codec.body_writer(buf, peer, dictionary)
    writer = ChangesetWriter(compressed)
    tdef = writer.table("customers", [("id", "INTEGER"), ("name", "TEXT")], ["id"])
    writer.rows(tdef, "I", [(i, f"Kunde {i}") for i in range(rows)])
    writer.close()
    compressed.close()
    return buf.getvalue()


def test_a_body_is_never_decoded_with_another_peers_or_an_unknown_dictionary() -> None:
    data = b"customers Kunde INTEGER TEXT id name " * 40
    sender, receiver = Codec(), Codec()
    ident = sender.learn("hq", data)
    blob = body(sender, "hq", ident)
    header = Header("hq", "koeln", 5, dictionary=ident)
    with pytest.raises(UnknownDictionary, match="does not hold"):
        receiver.check_first_part(blob, "m", whole=True, header=header)
    receiver.learn("berlin", data)  # the same bytes, from another peer
    with pytest.raises(UnknownDictionary):
        receiver.stream([blob], "m", header)
    receiver.learn("hq", data)
    assert receiver.check_first_part(blob, "m", whole=True, header=header) > 0
    rows = [r for r in read_changeset(receiver.stream([blob], "m", header)) if hasattr(r, "rows")]
    assert rows[0].rows[3] == (3, "Kunde 3")
    # named no dictionary (a header altered on the way fails its signature;
    # this is a buggy sender): the frame asks for one, so it fails loudly
    with pytest.raises(MessageError, match="corrupt"):
        Codec().check_first_part(blob, "m", whole=True, header=Header("hq", "koeln", 5))


def test_a_forged_id_in_a_signed_header_sets_the_message_aside(tmp_path: Path) -> None:
    """A peer (buggy, or its key stolen) names an id nobody trained: the
    message is set aside and asked for; the host answers that it holds no
    such dictionary; nothing crashes and the link goes on."""
    c, office = pair(tmp_path)
    try:
        hq, koeln = c.nodes["hq"], c.nodes["koeln"]
        header = Header("hq", "koeln", 2, ack=0, dictionary=2**62 + 12345)
        with c.engines["hq"].connect() as conn:
            sealed = hq.cycle.seal(conn, header, body(hq.codec, "koeln", 0))
        office.deliver(
            "koeln@example.test",
            build_message(
                header, Address("hq", "hq@example.test"), Address("koeln", "k@x"), sealed
            ),
        )
        report = koeln.sync()
        assert report.set_aside == 1 and not report.errors
        assert not c.sync("hq")["hq"].errors
        edit(c, 1)
        c.sync("hq", "koeln", "hq", "koeln")
        assert c.agree("customers")
    finally:
        c.close()


def test_without_dictionaries_nothing_is_sampled(tmp_path: Path) -> None:
    c, office = pair(tmp_path, dictionary_bytes=0)
    try:
        run(c, range(1, 10))
        assert not office.used() and held(c, "hq", "out") == []
        with c.engines["hq"].connect() as conn:
            assert conn.execute(select(func.count()).select_from(dictionary_samples)).scalar() == 0
    finally:
        c.close()


def test_dictionary_ids_are_digests() -> None:
    """Never 0 (no dictionary), within a BIGINT, stable, distinct."""
    assert dictionary_id(b"a") == dictionary_id(b"a") != dictionary_id(b"b")
    assert all(0 < dictionary_id(bytes([i])) < 2**63 for i in range(50))


def test_training_falls_back_to_raw_content() -> None:
    """Too little for zstd to train on: the newest bodies' own bytes, bounded."""
    few = [b"tiny body %d" % i for i in range(4)]
    data = dicts_mod.train(few, 30)
    assert len(data) == 30 and data.endswith(b"tiny body 0")
