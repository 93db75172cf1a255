"""Formatted numbers: a range whose numbers are text such as ``R-2026-100250``.

Real invoice and order numbers carry a prefix. A range may carry a format
— ``R-{year}-{n:06}`` — so that a text column can be bound to it and filled
by its trigger with the same never-twice guarantee as a plain number: the
guarantee is on ``n`` (the range's number, leased, ceilinged and witnessed
exactly like a plain one); the rest of the text is decoration.

The grammar is small on purpose, so that every dialect can both write a
number (in a trigger) and read one back (in a trigger's check, in the host's
accounting of a station's leases, in admission) without a regular-expression
engine — SQLite has none built in:

- ``{n}`` or ``{n:0W}`` (zero-padded to at least W digits, 1 ≤ W ≤ 18),
  exactly once;
- ``{year}``, at most once: the year the number is drawn in, four digits,
  in the database's local time (SQLite: the machine's; PostgreSQL: the
  session's ``TimeZone``);
- any other text from letters, digits, spaces and ``-_./#`` — literal (no
  quote, percent sign or colon ever reaches the SQL it is written into).

Every piece but ``n`` has a fixed width, so ``n`` sits at a known offset from
both ends and is read back with ``substr``. A text counts as a number of the
range only in its canonical form (``R-2026-000123``, not ``R-2026-123``):
one ``n``, one text per year, and a check that cannot be fooled by padding.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mailsync.errors import ConfigError

#: The most digits ``n`` may have: every such number fits a BIGINT.
MAX_DIGITS = 18
_PIECE = re.compile(r"\{(year|n(?::0(\d{1,2}))?)\}")
_LITERAL = re.compile(r"[A-Za-z0-9\-_./# ]*")
MAX_FORMAT = 64


@dataclass(frozen=True)
class Piece:
    """A fixed-width piece around ``n``: a literal text, or the year."""

    literal: str | None  # None: the year

    @property
    def width(self) -> int:
        return 4 if self.literal is None else len(self.literal)


@dataclass(frozen=True)
class NumberFormat:
    """A parsed format: the pieces before ``n``, its padding, the pieces after."""

    text: str
    before: tuple[Piece, ...]
    width: int  # 0: no padding
    after: tuple[Piece, ...]

    @property
    def head(self) -> int:
        """Characters before ``n``."""
        return sum(p.width for p in self.before)

    @property
    def tail(self) -> int:
        """Characters after ``n``."""
        return sum(p.width for p in self.after)

    @property
    def has_year(self) -> bool:
        return any(p.literal is None for p in (*self.before, *self.after))

    def digits(self, n: int) -> str:
        return str(n).rjust(self.width, "0") if self.width else str(n)

    def render(self, n: int, year: int) -> str:
        """The text of number ``n`` drawn in ``year``."""

        def text(pieces: tuple[Piece, ...]) -> str:
            return "".join(f"{year:04d}" if p.literal is None else p.literal for p in pieces)

        return text(self.before) + self.digits(n) + text(self.after)

    def number_of(self, value: object) -> int | None:
        """``n`` of a text in this format's canonical form, else None."""
        if not isinstance(value, str):
            return None
        span = len(value) - self.head - self.tail
        if not 1 <= span <= MAX_DIGITS:
            return None
        at = 0
        for piece in self.before:
            if not _piece_matches(piece, value[at : at + piece.width]):
                return None
            at += piece.width
        slot = value[at : at + span]
        at += span
        for piece in self.after:
            if not _piece_matches(piece, value[at : at + piece.width]):
                return None
            at += piece.width
        if not slot.isascii() or not slot.isdigit():
            return None
        n = int(slot)
        return n if self.digits(n) == slot else None

    def max_text(self) -> int:
        """The longest text this format writes."""
        return self.head + max(self.width, MAX_DIGITS) + self.tail


def _piece_matches(piece: Piece, text: str) -> bool:
    if piece.literal is not None:
        return text == piece.literal
    return len(text) == 4 and text.isascii() and text.isdigit()


def parse_format(text: str, *, where: str) -> NumberFormat:
    """Check a range's format and take it apart; ``where`` names it in errors."""
    if len(text) > MAX_FORMAT:
        raise ConfigError(f"{where}: the format is longer than {MAX_FORMAT} characters")
    before: list[Piece] = []
    after: list[Piece] = []
    width: int | None = None
    years = 0
    at = 0
    for match in _PIECE.finditer(text):
        literal = text[at : match.start()]
        if literal:
            _check_literal(literal, where)
            (after if width is not None else before).append(Piece(literal))
        at = match.end()
        if match.group(1) == "year":
            years += 1
            (after if width is not None else before).append(Piece(None))
            continue
        if width is not None:
            raise ConfigError(f"{where}: the format has {{n}} more than once")
        width = int(match.group(2)) if match.group(2) else 0
        if width > MAX_DIGITS:
            raise ConfigError(f"{where}: {{n:0{width}}} pads to more than {MAX_DIGITS} digits")
        if match.group(2) and width == 0:
            raise ConfigError(f"{where}: {{n:00}} pads to no digits; write {{n}}")
    rest = text[at:]
    if rest:
        _check_literal(rest, where)
        (after if width is not None else before).append(Piece(rest))
    if width is None:
        raise ConfigError(
            f"{where}: the format {text!r} has no {{n}} (the number), e.g. 'R-{{year}}-{{n:06}}'"
        )
    if years > 1:
        raise ConfigError(f"{where}: the format has {{year}} more than once")
    return NumberFormat(text, tuple(before), width, tuple(after))


def _check_literal(literal: str, where: str) -> None:
    if not _LITERAL.fullmatch(literal):
        bad = next(c for c in literal if not _LITERAL.fullmatch(c))
        hint = "{n}, {n:0W} and {year} are the placeholders" if bad in "{}" else ""
        raise ConfigError(
            f"{where}: the format may hold letters, digits, spaces and - _ . / #, "
            f"not {bad!r}" + (f" ({hint})" if hint else "")
        )


#: A plain number, as a format: how the dialects read a bound column that
#: has none (a number, or a text of digits in canonical form).
PLAIN = NumberFormat("{n}", (), 0, ())


def number_in(value: object, fmt: NumberFormat | None) -> int | None:
    """``n`` of a bound column's value: a number (plain ranges: an integer,
    or a text of digits), or the text of a formatted one; else None."""
    if fmt is not None:
        return fmt.number_of(value)
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    text = str(value).strip()
    return int(text) if text.isascii() and text.isdigit() else None
