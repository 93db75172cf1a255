"""The two controls of ``mailsync verify``: the host's request, the station's answer.

Both ride inside sequenced changesets (exactly once, in order, resent until
acknowledged — the path rows take), so a lost, duplicated or reordered mail
neither loses a round nor answers one twice, and the station answers at the
state the host's earlier changesets left it in.

============  =======================  =====================================
kind          dataclass                what it says
============  =======================  =====================================
``verify?``   :class:`VerifyRequest`   host → station: digest these spans,
                                       hash the rows of those, resend keys
``verify``    :class:`VerifyAnswer`    station → host: the digests and row
                                       hashes asked for, item by item
============  =======================  =====================================

A key travels as a list of canonical values (:func:`mailsync.verify.canonical`):
NULL, an integer, a text, or a ``[tag, text]`` pair for the other types.
Signed is not well-formed: every bound (items, keys, lengths, shapes) is
checked here before anything acts on a payload; what breaks one raises
:class:`~mailsync.errors.MessageError` and the changeset carrying it does
not apply. That a station answers only what it was asked (its own
verification, the round in progress, the spans asked) is checked where the
host keeps the verification (:mod:`mailsync.verification`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mailsync.errors import MessageError
from mailsync.wire.envelope import MAX_WIRE_INT

#: At most this many spans are asked about in one round.
MAX_ASK = 256
#: A station lists at most this many row hashes for one span (more: it cuts
#: the span and answers with its digests of the parts).
MAX_LEAF_ANSWER = 256
#: At most this many spans in a station's own cut of one span.
MAX_CUT = 64
#: At most this many keys a repair asks a station to send again.
MAX_RESEND = 10_000
#: Columns in a key, characters in a key value's text.
MAX_KEY_COLUMNS = 32
MAX_VALUE_TEXT = 4096
#: Value tags of :func:`mailsync.verify.canonical` beside plain ints and texts.
VALUE_TAGS = frozenset("nftdhbs")
DIGEST_CHARS = 32

Key = tuple[Any, ...]
#: a span's bounds: ``lo`` inclusive, ``hi`` exclusive, None open
Bounds = tuple[Key | None, Key | None]


def _fail(kind: str, what: str) -> MessageError:
    return MessageError(f"malformed {kind!r} control: {what}")


def _int(kind: str, value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_WIRE_INT:
        raise _fail(kind, f"{what} is not a count")
    return value


def _text(kind: str, value: Any, what: str, limit: int) -> str:
    if not isinstance(value, str) or not value or len(value) > limit:
        raise _fail(kind, f"{what} is not a text of 1–{limit} characters")
    return value


def _list(kind: str, value: Any, what: str, limit: int) -> list[Any]:
    if not isinstance(value, list | tuple):
        raise _fail(kind, f"{what} is not a list")
    if len(value) > limit:
        raise _fail(kind, f"{what} has {len(value):,} items (at most {limit:,})")
    return list(value)


def _digest(kind: str, value: Any) -> str:
    if not isinstance(value, str) or len(value) != DIGEST_CHARS or value.strip("0123456789abcdef"):
        raise _fail(kind, "a digest is not 32 hex digits")
    return value


def parse_key(kind: str, value: Any) -> Key:
    """A key as canonical values; ``[tag, text]`` pairs become tuples."""
    items = _list(kind, value, "a key", MAX_KEY_COLUMNS)
    if not items:
        raise _fail(kind, "a key has no columns")
    out: list[Any] = []
    for item in items:
        if item is None or (isinstance(item, int) and not isinstance(item, bool)):
            out.append(item)
        elif isinstance(item, str):
            if len(item) > MAX_VALUE_TEXT:
                raise _fail(kind, f"a key value has more than {MAX_VALUE_TEXT:,} characters")
            out.append(item)
        elif isinstance(item, list | tuple) and len(item) == 2 and item[0] in VALUE_TAGS:
            out.append((item[0], _text(kind, item[1], "a key value", MAX_VALUE_TEXT)))
        else:
            raise _fail(kind, "a key value is not NULL, an integer, a text or [tag, text]")
    return tuple(out)


def wire_key(key: Key | None) -> list[Any] | None:
    return None if key is None else [list(v) if isinstance(v, tuple) else v for v in key]


def _bound(kind: str, value: Any) -> Key | None:
    return None if value is None else parse_key(kind, value)


def _head(kind: str, payload: Any) -> tuple[dict[str, Any], str, str, int]:
    """The map, and the verification's id, table and round every payload names."""
    if not isinstance(payload, dict):
        raise _fail(kind, "the payload is not a map")
    return (
        payload,
        _text(kind, payload.get("id"), "id", 32),
        _text(kind, payload.get("table"), "table", 200),
        _int(kind, payload.get("round"), "round"),
    )


@dataclass(frozen=True)
class VerifyRequest:
    """Host → station: for verification ``vid`` of ``table``, round
    ``round``: per item of ``ask``, ``("d", lo, hi)`` — your digest of the
    span — or ``("r", lo, hi)`` — your row hashes in it (or your own cut of
    it, if you hold many rows there); and send again the rows of ``resend``
    (a repair of a table the station owns)."""

    vid: str
    table: str
    round: int
    ask: tuple[tuple[str, Key | None, Key | None], ...] = ()
    resend: tuple[Key, ...] = ()

    KIND = "verify?"

    def payload(self) -> dict[str, Any]:
        return {
            "id": self.vid,
            "table": self.table,
            "round": self.round,
            "ask": [[k, wire_key(lo), wire_key(hi)] for k, lo, hi in self.ask],
            "resend": [wire_key(k) for k in self.resend],
        }

    @classmethod
    def parse(cls, payload: Any) -> VerifyRequest:
        kind = cls.KIND
        data, vid, table, number = _head(kind, payload)
        ask = []
        for item in _list(kind, data.get("ask", []), "ask", MAX_ASK):
            if not isinstance(item, list | tuple) or len(item) != 3 or item[0] not in ("d", "r"):
                raise _fail(kind, "an item of ask is not [d|r, lo, hi]")
            ask.append((str(item[0]), _bound(kind, item[1]), _bound(kind, item[2])))
        resend = tuple(
            parse_key(kind, k) for k in _list(kind, data.get("resend", []), "resend", MAX_RESEND)
        )
        return cls(vid, table, number, tuple(ask), resend)


#: One answer item: ``("d", rows, digest)``, ``("r", ((key, hash), ...))``
#: or ``("p", ((lo, hi, rows, digest), ...))`` — the station's own cut.
AnswerItem = tuple[Any, ...]


@dataclass(frozen=True)
class VerifyAnswer:
    """Station → host: the answer to round ``round`` of verification
    ``vid``, one item per item asked (or ``error``: the station cannot
    answer, e.g. it lacks the table)."""

    vid: str
    table: str
    round: int
    items: tuple[AnswerItem, ...] = ()
    error: str | None = None

    KIND = "verify"

    def payload(self) -> dict[str, Any]:
        items: list[Any] = []
        for item in self.items:
            if item[0] == "d":
                items.append(list(item))
            elif item[0] == "r":
                items.append(["r", [[wire_key(k), h] for k, h in item[1]]])
            else:
                items.append(
                    ["p", [[wire_key(lo), wire_key(hi), n, d] for lo, hi, n, d in item[1]]]
                )
        out: dict[str, Any] = {
            "id": self.vid,
            "table": self.table,
            "round": self.round,
            "items": items,
        }
        if self.error is not None:
            out["error"] = self.error
        return out

    @classmethod
    def parse(cls, payload: Any) -> VerifyAnswer:
        kind = cls.KIND
        data, vid, table, number = _head(kind, payload)
        items = [
            _answer_item(kind, i) for i in _list(kind, data.get("items", []), "items", MAX_ASK)
        ]
        error = data.get("error")
        if error is not None:
            error = _text(kind, error, "error", 1000)
        return cls(vid, table, number, tuple(items), error)


def _answer_item(kind: str, item: Any) -> AnswerItem:
    if not isinstance(item, list | tuple) or not item or item[0] not in ("d", "r", "p"):
        raise _fail(kind, "an item is not [d, rows, digest], [r, hashes] or [p, spans]")
    if item[0] == "d":
        if len(item) != 3:
            raise _fail(kind, "a digest item is not [d, rows, digest]")
        return ("d", _int(kind, item[1], "rows"), _digest(kind, item[2]))
    if len(item) != 2:
        raise _fail(kind, f"an item [{item[0]}, …] has {len(item)} fields")
    if item[0] == "r":
        hashes = []
        for pair in _list(kind, item[1], "row hashes", MAX_LEAF_ANSWER):
            if not isinstance(pair, list | tuple) or len(pair) != 2:
                raise _fail(kind, "a row hash is not [key, hash]")
            hashes.append((parse_key(kind, pair[0]), _digest(kind, pair[1])))
        return ("r", tuple(hashes))
    spans = []
    for span in _list(kind, item[1], "a cut", MAX_CUT):
        if not isinstance(span, list | tuple) or len(span) != 4:
            raise _fail(kind, "a span is not [lo, hi, rows, digest]")
        spans.append(
            (
                _bound(kind, span[0]),
                _bound(kind, span[1]),
                _int(kind, span[2], "rows"),
                _digest(kind, span[3]),
            )
        )
    if not spans:
        raise _fail(kind, "a cut has no spans")
    return ("p", tuple(spans))
