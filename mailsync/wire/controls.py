"""Control records: one dataclass and one validating parser per kind.

A changeset carries, besides rows, control records (``["C", kind,
payload]``). Signed by a peer is not the same as well-formed: a buggy or
hostile station can sign anything, so every payload is checked here, once,
before any code acts on it; what does not parse raises
:class:`~mailsync.errors.MessageError` naming the kind and what is wrong,
and the message is set aside. A kind this version does not know parses to
None and is ignored, so a peer one version ahead still gets its ack and
rows through.

Unsequenced messages (sequence 0, acted on as soon as they arrive):

============  =======================  =====================================
kind          dataclass                what it says
============  =======================  =====================================
``resend``    :class:`Resend`          send these changesets / parts again
``reload``    :class:`ReloadRequest`   I went back to a backup: reload me
``ranges``    :class:`RangeReport`     station → host: lease use, blocks wanted
``ranges``    :class:`RangeGrants`     host → station: blocks granted, asked back
``restored``  :class:`HostRestored`    host → station: I went back to a backup
``dict?``     :class:`DictionaryWanted` send me these dictionaries again
``dict``      :class:`Dictionary`      a dictionary asked for (sent again)
============  =======================  =====================================

Sequenced changesets (applied with the rows, in the same transaction):

============  =======================  =====================================
``key``       :class:`KeyAnnouncement` the sender's next public key
``rules``     :class:`RulesUpdate`     a station's effective table rules
``reload``    :class:`FullLoad`        these tables follow in full: replace
``dict``      :class:`Dictionary`      a zstd dictionary for this link's bodies
``verify?``   ``VerifyRequest``        a round of ``mailsync verify`` (host)
``verify``    ``VerifyAnswer``         the station's answer to it
============  =======================  =====================================

(the two ``verify`` kinds live in :mod:`mailsync.wire.verify_controls`)

The wire keeps the name ``reload`` for both a request and a full load (older
nodes read it so); which one is meant follows from whether the message is
sequenced, and only :func:`parse_unsequenced` / :func:`parse_sequenced`
decide it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mailsync.errors import ConfigError, MessageError
from mailsync.ranges.numformat import MAX_FORMAT, parse_format
from mailsync.wire.envelope import MAX_WIRE_INT, dictionary_id
from mailsync.wire.verify_controls import VerifyAnswer, VerifyRequest

#: At most this many sequence numbers or parts are asked for in one request.
MAX_RESEND_REQUEST = 10_000
#: At most this many leases, wanted ranges, grants or tables in one control.
MAX_ITEMS = 10_000
#: Longest name (table, range, column) a control may carry.
MAX_NAME = 200


def _fail(kind: str, what: str) -> MessageError:
    return MessageError(f"malformed {kind!r} control: {what}")


def _int(kind: str, value: Any, what: str) -> int:
    # bool is an int in Python; on the wire it is not a number
    if not isinstance(value, int) or isinstance(value, bool):
        raise _fail(kind, f"{what} is not an integer")
    if not 0 <= value <= MAX_WIRE_INT:  # what a BIGINT column holds
        raise _fail(kind, f"{what} {value} is out of range")
    return value


def _str(kind: str, value: Any, what: str, *, limit: int = MAX_NAME) -> str:
    if not isinstance(value, str) or not value or len(value) > limit:
        raise _fail(kind, f"{what} is not a name of 1–{limit} characters")
    return value


def _list(kind: str, value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise _fail(kind, f"{what} is not a list")
    if len(value) > MAX_ITEMS:
        raise _fail(kind, f"{what} has {len(value):,} items (at most {MAX_ITEMS:,})")
    return value


def _dict(kind: str, value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(kind, f"{what} is not a map")
    return value


# ------------------------------------------------------------------ unsequenced

#: What a resend request names: a whole changeset, or one part of one.
Wanted = int | tuple[int, int]


@dataclass(frozen=True)
class Resend:
    """Send these again: whole changesets (seq) and single parts (seq, part)."""

    wanted: tuple[Wanted, ...]

    KIND = "resend"

    def payload(self) -> list[Any]:
        return [w if isinstance(w, int) else list(w) for w in self.wanted]

    @classmethod
    def parse(cls, payload: Any) -> Resend:
        wanted: list[Wanted] = []
        for item in _list(cls.KIND, payload, "the list")[:MAX_RESEND_REQUEST]:
            if isinstance(item, list) and len(item) == 2:
                seq, part = (_int(cls.KIND, i, "a [seq, part] pair") for i in item)
                if seq < 1 or part < 1:
                    raise _fail(cls.KIND, f"[{seq}, {part}] is not a changeset part")
                wanted.append((seq, part))
            else:
                seq = _int(cls.KIND, item, "a sequence number")
                if seq < 1:
                    raise _fail(cls.KIND, f"{seq} is not a sequence number")
                wanted.append(seq)
        return cls(tuple(wanted))

    def describe(self) -> str:
        shown = [f"#{w}" if isinstance(w, int) else f"#{w[0]} part {w[1]}" for w in self.wanted]
        return ", ".join(shown[:20]) + (" …" if len(shown) > 20 else "")


@dataclass(frozen=True)
class ReloadRequest:
    """A station went back to a backup and has our changesets up to
    ``in_seq``; ``request`` tells a delayed duplicate from a new request."""

    in_seq: int
    request: str | None

    KIND = "reload"

    def payload(self) -> dict[str, Any]:
        return {"in_seq": self.in_seq, "id": self.request}

    @classmethod
    def parse(cls, payload: Any) -> ReloadRequest:
        data = _dict(cls.KIND, payload, "the request")
        in_seq = _int(cls.KIND, data.get("in_seq"), "in_seq")
        request = data.get("id")
        if request is not None:
            request = _str(cls.KIND, request, "id", limit=32)  # mailsync_links.reload_request
        return cls(in_seq, request)


@dataclass(frozen=True)
class LeaseState:
    """One lease as its holder reports it: next number to draw, state; and,
    to a host that went back to a backup (which may not know the lease),
    its range and numbers."""

    lease_id: int
    next: int
    state: str
    range: str | None = None
    first: int = 0
    last: int = 0

    def wire(self) -> list[Any]:
        item: list[Any] = [self.lease_id, self.next, self.state]
        if self.range is not None:
            item += [self.range, self.first, self.last]
        return item


@dataclass(frozen=True)
class HostRestored:
    """Host → station: the host went back to a backup and holds the
    station's changesets up to ``in_seq``: send again what followed, and
    report every lease before asking for a block."""

    in_seq: int

    KIND = "restored"

    def payload(self) -> dict[str, Any]:
        return {"in_seq": self.in_seq}

    @classmethod
    def parse(cls, payload: Any) -> HostRestored:
        data = _dict(cls.KIND, payload, "the notice")
        in_seq = _int(cls.KIND, data.get("in_seq"), "in_seq")
        if not 0 <= in_seq <= MAX_WIRE_INT:
            raise _fail(cls.KIND, "in_seq is out of range")
        return cls(in_seq)


@dataclass(frozen=True)
class RangeReport:
    """Station → host: the use and state of every lease the station holds,
    and the ranges it wants another block of."""

    leases: tuple[LeaseState, ...] = ()
    want: tuple[str, ...] = ()
    #: every lease named with its range and numbers, for a host that went
    #: back to a backup (see :class:`HostRestored`)
    full: bool = False

    KIND = "ranges"
    STATES = ("active", "release", "released", "retired")

    def payload(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "leases": [s.wire() for s in self.leases],
            "want": list(self.want),
        }
        if self.full:
            out["full"] = True
        return out

    @classmethod
    def parse(cls, payload: Any) -> RangeReport:
        data = _dict(cls.KIND, payload, "the report")
        leases = []
        for item in _list(cls.KIND, data.get("leases", []), "leases"):
            if not isinstance(item, list) or len(item) not in (3, 6):
                raise _fail(cls.KIND, "a lease is not [id, next, state(, range, first, last)]")
            state = _str(cls.KIND, item[2], "a lease state")
            if state not in cls.STATES:
                raise _fail(cls.KIND, f"lease state {state[:20]!r} is unknown")
            lease = LeaseState(
                _int(cls.KIND, item[0], "a lease id"), _int(cls.KIND, item[1], "next"), state
            )
            if len(item) == 6:
                first, last = _int(cls.KIND, item[4], "first"), _int(cls.KIND, item[5], "last")
                if not 0 <= first <= last <= MAX_WIRE_INT:
                    raise _fail(cls.KIND, "a lease's numbers are out of range")
                lease = LeaseState(
                    lease.lease_id,
                    lease.next,
                    state,
                    _str(cls.KIND, item[3], "a range name"),
                    first,
                    last,
                )
            leases.append(lease)
        want = tuple(
            _str(cls.KIND, name, "a range name")
            for name in _list(cls.KIND, data.get("want", []), "want")
        )
        full = data.get("full", False)
        if not isinstance(full, bool):
            raise _fail(cls.KIND, "full is not true or false")
        return cls(tuple(leases), want, full)


@dataclass(frozen=True)
class Grant:
    """One block leased to a station, with its range's definition."""

    lease_id: int
    range: str
    start: int
    end: int
    block: int
    threshold: float
    max_blocks: int
    bind: str | None
    first: int
    last: int
    next: int
    format: str | None = None  # the range's number format (ranges/numformat.py)

    def payload(self) -> dict[str, Any]:
        extra = {} if self.format is None else {"format": self.format}
        return {
            **extra,
            "id": self.lease_id,
            "range": self.range,
            "start": self.start,
            "end": self.end,
            "block": self.block,
            "threshold": self.threshold,
            "max_blocks": self.max_blocks,
            "bind": self.bind,
            "first": self.first,
            "last": self.last,
            "next": self.next,
        }

    @classmethod
    def parse(cls, data: Any) -> Grant:
        kind = RangeGrants.KIND
        g = _dict(kind, data, "a grant")
        ints = {
            k: _int(kind, g.get(k), k)
            for k in ("id", "start", "end", "block", "max_blocks", "first", "last", "next")
        }
        threshold = g.get("threshold")
        if not isinstance(threshold, int | float) or isinstance(threshold, bool):
            raise _fail(kind, "threshold is not a number")
        if not 0 <= threshold <= 1:
            raise _fail(kind, f"threshold {threshold} is not between 0 and 1")
        bind = g.get("bind")
        if bind is not None:
            bind = _str(kind, bind, "bind", limit=2 * MAX_NAME + 1)
            table, dot, column = bind.partition(".")
            if not (table and dot and column):
                raise _fail(kind, f"bind {bind[:40]!r} is not table.column")
        fmt = g.get("format")
        if fmt is not None:
            fmt = _str(kind, fmt, "format", limit=MAX_FORMAT)
            try:
                parse_format(fmt, where="format")
            except ConfigError as exc:
                raise _fail(kind, str(exc)) from None
        if not ints["start"] <= ints["first"] <= ints["next"] <= ints["last"] + 1:
            raise _fail(kind, "the block's numbers are not in order")
        if ints["last"] > ints["end"] or ints["block"] < 1 or ints["max_blocks"] < 1:
            raise _fail(kind, "the block lies outside its range")
        return cls(
            lease_id=ints["id"],
            range=_str(kind, g.get("range"), "range"),
            start=ints["start"],
            end=ints["end"],
            block=ints["block"],
            threshold=float(threshold),
            max_blocks=ints["max_blocks"],
            bind=bind,
            first=ints["first"],
            last=ints["last"],
            next=ints["next"],
            format=fmt,
        )


@dataclass(frozen=True)
class RangeGrants:
    """Host → station: blocks granted (or granted again, unconfirmed), and
    leases the host asks back."""

    grants: tuple[Grant, ...] = ()
    release: tuple[int, ...] = ()

    KIND = "ranges"

    def __bool__(self) -> bool:
        return bool(self.grants or self.release)

    def payload(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.grants:
            out["grant"] = [g.payload() for g in self.grants]
        if self.release:
            out["release"] = list(self.release)
        return out

    @classmethod
    def parse(cls, payload: Any) -> RangeGrants:
        data = _dict(cls.KIND, payload, "the grants")
        grants = tuple(Grant.parse(g) for g in _list(cls.KIND, data.get("grant", []), "grant"))
        release = tuple(
            _int(cls.KIND, i, "a lease id")
            for i in _list(cls.KIND, data.get("release", []), "release")
        )
        return cls(grants, release)


#: No dictionary this version would accept is larger (``[limits]``
#: ``max_dictionary_bytes`` is the node's own bound, at most this).
MAX_DICTIONARY_BYTES = 1024 * 1024
#: At most this many dictionaries asked for in one request.
MAX_DICTIONARIES_WANTED = 16


@dataclass(frozen=True)
class Dictionary:
    """A zstd dictionary the sender compresses this link's small bodies with
    once the receiver has it (see :mod:`mailsync.dictionaries`); ``id`` is
    the digest of ``data`` (:func:`~mailsync.wire.envelope.dictionary_id`),
    checked here, so a forged or damaged one never parses."""

    id: int
    data: bytes

    KIND = "dict"

    def payload(self) -> dict[str, Any]:
        return {"id": self.id, "data": self.data}

    @classmethod
    def parse(cls, payload: Any) -> Dictionary:
        data = _dict(cls.KIND, payload, "the dictionary")
        ident = _int(cls.KIND, data.get("id"), "id")
        blob = data.get("data")
        if not isinstance(blob, bytes) or not blob:
            raise _fail(cls.KIND, "data is not bytes")
        if len(blob) > MAX_DICTIONARY_BYTES:
            raise _fail(
                cls.KIND, f"data has {len(blob):,} bytes (at most {MAX_DICTIONARY_BYTES:,})"
            )
        if dictionary_id(blob) != ident:
            raise _fail(cls.KIND, f"id {ident:x} is not the digest of its data")
        return cls(ident, blob)


@dataclass(frozen=True)
class DictionaryWanted:
    """Send me these dictionaries again: a body named one I do not hold."""

    ids: tuple[int, ...]

    KIND = "dict?"

    def payload(self) -> list[int]:
        return list(self.ids)

    @classmethod
    def parse(cls, payload: Any) -> DictionaryWanted:
        items = _list(cls.KIND, payload, "the ids")[:MAX_DICTIONARIES_WANTED]
        return cls(tuple(_int(cls.KIND, i, "an id") for i in items))


UnsequencedControl = (
    Resend
    | ReloadRequest
    | RangeReport
    | RangeGrants
    | HostRestored
    | Dictionary
    | DictionaryWanted
)


def parse_unsequenced(kind: str, payload: Any, *, from_host: bool) -> UnsequencedControl | None:
    """The control record of an unsequenced message, checked; ``from_host``
    says which side sent it (a ``ranges`` record is a report or grants).

    None for a kind this side does not act on (a newer peer's, or a reload
    request sent to a remote): the caller ignores it, so that a peer one
    version ahead still gets its ack through. A known kind is parsed
    strictly."""
    if kind == Resend.KIND:
        return Resend.parse(payload)
    if kind == ReloadRequest.KIND and not from_host:
        return ReloadRequest.parse(payload)
    if kind == "ranges":
        return RangeGrants.parse(payload) if from_host else RangeReport.parse(payload)
    if kind == HostRestored.KIND and from_host:
        return HostRestored.parse(payload)
    if kind == Dictionary.KIND:
        return Dictionary.parse(payload)
    if kind == DictionaryWanted.KIND:
        return DictionaryWanted.parse(payload)
    return None


# -------------------------------------------------------------------- sequenced


@dataclass(frozen=True)
class KeyAnnouncement:
    """The sender's next public key (a ``msk1:`` token)."""

    token: str

    KIND = "key"

    def payload(self) -> str:
        return self.token

    @classmethod
    def parse(cls, payload: Any) -> KeyAnnouncement:
        return cls(_str(cls.KIND, payload, "the key", limit=1000))


@dataclass(frozen=True)
class RulesUpdate:
    """The effective table rules of the receiving station (wire dicts; the
    rules module reads each one)."""

    rules: tuple[dict[str, Any], ...]

    KIND = "rules"

    def payload(self) -> list[dict[str, Any]]:
        return list(self.rules)

    @classmethod
    def parse(cls, payload: Any) -> RulesUpdate:
        rules = []
        for item in _list(cls.KIND, payload, "the rules"):
            rule = _dict(cls.KIND, item, "a rule")
            for key in ("table", "station"):
                _str(cls.KIND, rule.get(key), key)
            for key in ("down", "up"):
                ops = rule.get(key)
                if not isinstance(ops, str) or not set(ops) <= set("IUD"):
                    raise _fail(cls.KIND, f"{key} is not a set of operations (I, U, D)")
            row_filter = rule.get("row_filter")
            if row_filter is not None and not isinstance(row_filter, str):
                raise _fail(cls.KIND, "row_filter is not text")
            if not isinstance(rule.get("conflict", "host-wins"), str):
                raise _fail(cls.KIND, "conflict is not a policy name")
            rules.append(rule)
        return cls(tuple(rules))


@dataclass(frozen=True)
class FullLoad:
    """These tables follow in full and replace the receiver's copy."""

    tables: tuple[str, ...] = field(default_factory=tuple)

    KIND = "reload"

    def payload(self) -> list[str]:
        return list(self.tables)

    @classmethod
    def parse(cls, payload: Any) -> FullLoad:
        names = _list(cls.KIND, payload, "the tables")
        return cls(tuple(_str(cls.KIND, t, "a table name") for t in names))


@dataclass(frozen=True)
class TableDefinitions:
    """The definitions of tables a load brings, in the portable form of
    :mod:`mailsync.provision` (which checks each one before it is used): a
    station that lacks one creates it. Only the envelope is checked here."""

    tables: tuple[dict[str, Any], ...]

    KIND = "tables"

    def payload(self) -> list[dict[str, Any]]:
        return list(self.tables)

    @classmethod
    def parse(cls, payload: Any) -> TableDefinitions:
        out = []
        for item in _list(cls.KIND, payload, "the tables"):
            table = _dict(cls.KIND, item, "a table definition")
            _str(cls.KIND, table.get("table"), "table", limit=128)
            out.append(table)
        return cls(tuple(out))


SequencedControl = (
    KeyAnnouncement
    | RulesUpdate
    | FullLoad
    | Dictionary
    | TableDefinitions
    | VerifyRequest
    | VerifyAnswer
)

_SEQUENCED: dict[
    str,
    type[KeyAnnouncement]
    | type[RulesUpdate]
    | type[FullLoad]
    | type[Dictionary]
    | type[TableDefinitions]
    | type[VerifyRequest]
    | type[VerifyAnswer],
] = {
    c.KIND: c
    for c in (
        KeyAnnouncement,
        RulesUpdate,
        FullLoad,
        Dictionary,
        TableDefinitions,
        VerifyRequest,
        VerifyAnswer,
    )
}


def parse_sequenced(kind: str, payload: Any) -> SequencedControl | None:
    """A control record inside a sequenced changeset, checked; None for a
    kind this version does not know (ignored, as for unsequenced ones)."""
    parser = _SEQUENCED.get(kind)
    return None if parser is None else parser.parse(payload)


Control = UnsequencedControl | SequencedControl
