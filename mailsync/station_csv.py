"""A list of stations as a spreadsheet writes it: reading and checking the
CSV of ``mailsync station add --csv FILE`` (bulk enrollment,
:mod:`mailsync.bulk_enroll`).

The file has a header row naming its columns — ``id`` and ``email``
required, ``label`` and ``key`` optional, in any order, any case — then
one station per row. A ``key`` (``msk1:…``, printed by the station's own
``mailsync init remote``) means the station made its keys; an empty one
that mailsync makes them. The separator is the header's: a comma, or a
semicolon or tab as a German or French spreadsheet saves it. A UTF-8
byte-order mark (Excel's "CSV UTF-8") is accepted; blank lines (also a row
of separators only) are skipped.

Nothing is added unless every row is right, so every row is checked and
every problem reported, each as one line ``FILE:LINE: column: what`` — an
admin with 3,000 rows fixes them all in one go, not one per run. The file
is read whole (a station is a line of ~150 bytes: 10,000 are 1.5 MB).
"""

from __future__ import annotations

import csv
import difflib
import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from mailsync.config import check_email, check_node_id
from mailsync.errors import ConfigError
from mailsync.keys import PublicKey

REQUIRED = ("id", "email")
OPTIONAL = ("label", "key")
COLUMNS = REQUIRED + OPTIONAL
HEADER_HELP = "the first line names the columns: id,email[,label][,key]"

#: the stored sizes (``mailsync_stations``): longer fails on PostgreSQL only
MAX_LABEL, MAX_EMAIL = 200, 320

#: problems printed one per line before the summary; the rest are counted
SHOWN_PROBLEMS = 50


@dataclass(frozen=True)
class StationRow:
    """One station of the file, checked on its own."""

    line: int
    id: str
    email: str
    label: str
    key: PublicKey | None


class StationListError(ConfigError):
    """The stations file is wrong somewhere: nothing was added.

    ``problems`` holds every problem found, one line each (``FILE:LINE:
    column: what``); the message is the only one, or how many there are and
    the first (the CLI prints them all before it)."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = problems
        if len(problems) == 1:
            message = f"{problems[0]}; no station added"
        else:
            message = f"{source}: {len(problems)} problems, no station added (first: {problems[0]})"
        super().__init__(message, hint="fix the file and run the command again")


def _decode(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise StationListError(
            str(path),
            [
                f"{path}:{line}: byte {raw[exc.start]:#04x} is not UTF-8 "
                "(save the file as CSV UTF-8)"
            ],
        ) from None


def _separator(header: str) -> str:
    """The header's separator: a comma unless it has none and a ``;`` or tab."""
    if "," in header:
        return ","
    for sep in (";", "\t"):
        if sep in header:
            return sep
    return ","


def _header(path: Path, line: int, fields: list[str]) -> tuple[list[str], list[str]]:
    """The column names (lower case) and the problems of the header row."""
    names = [f.strip().lower() for f in fields]
    if not set(names) & set(COLUMNS):
        shown = ",".join(f.strip() for f in fields)
        return names, [f"{path}:{line}: no header row (found {shown[:80]!r}; {HEADER_HELP})"]
    problems: list[str] = []
    for i, name in enumerate(names):
        if name in COLUMNS:
            if name in names[:i]:
                problems.append(f"{path}:{line}: column {name!r} is named twice")
            continue
        near = difflib.get_close_matches(name, COLUMNS, n=1)
        if near:
            problems.append(f"{path}:{line}: unknown column {name!r} (did you mean {near[0]!r}?)")
        elif not name:
            problems.append(f"{path}:{line}: column {i + 1} has no name ({HEADER_HELP})")
        else:
            problems.append(f"{path}:{line}: unknown column {name!r} ({HEADER_HELP})")
    missing = [c for c in REQUIRED if c not in names]
    if missing and not problems:
        found = ",".join(f.strip() for f in fields)
        problems.append(
            f"{path}:{line}: no column {' or '.join(repr(m) for m in missing)} "
            f"(found {found!r}; {HEADER_HELP})"
        )
    return names, problems


def _wrong(check: Callable[[], object]) -> str | None:
    """What ``check`` (a validator raising ConfigError) says is wrong, if anything."""
    try:
        check()
    except ConfigError as exc:
        return str(exc)
    return None


def _email(email: str) -> str | None:
    if len(email) > MAX_EMAIL:
        return f"longer than {MAX_EMAIL} characters"
    return _wrong(lambda: check_email(email, "station e-mail"))


def _label(label: str) -> str | None:
    if len(label) > MAX_LABEL:
        return f"longer than {MAX_LABEL} characters"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in label):
        return "holds a control character (a line break?)"
    return None


def _row(path: Path, line: int, values: Mapping[str, str]) -> tuple[StationRow | None, list[str]]:
    """One data row checked on its own: the station, or its problems."""
    station_id, email = values.get("id", ""), values.get("email", "")
    label, token = values.get("label", ""), values.get("key", "")
    found = {
        "id": _wrong(lambda: check_node_id(station_id, "station id")) if station_id else "empty",
        "email": _email(email) if email else "empty",
        "label": _label(label),
        "key": _wrong(lambda: PublicKey.parse(token, "key")) if token else None,
    }
    problems = [f"{path}:{line}: {column}: {what}" for column, what in found.items() if what]
    if problems:
        return None, problems
    key = PublicKey.parse(token, "key") if token else None
    return StationRow(line, station_id, email, label, key), []


def read_stations(path: Path) -> list[StationRow]:
    """Every station of the file at ``path``, each checked on its own and
    against the others (an id, an address or a key twice); raises
    :class:`StationListError` with every problem found."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read stations file {path}: {exc.strerror}") from None
    text = _decode(path, raw)
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise StationListError(str(path), [f"{path}: the file is empty ({HEADER_HELP})"])
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=_separator(lines[0]), strict=True)
    rows: list[StationRow] = []
    problems: list[str] = []
    names: list[str] | None = None
    try:
        start = 1
        for fields in reader:
            line, start = start, reader.line_num + 1
            if not any(f.strip() for f in fields):
                continue  # a blank line, or separators only
            if names is None:
                names, problems = _header(path, line, fields)
                if problems:
                    raise StationListError(str(path), problems)
                continue
            if len(fields) > len(names):
                problems.append(
                    f"{path}:{line}: {len(fields)} fields, the header names {len(names)}"
                )
                continue
            values = {n: f.strip() for n, f in zip(names, fields, strict=False)}
            row, wrong = _row(path, line, values)
            problems += wrong
            if row is not None:
                rows.append(row)
    except csv.Error as exc:
        raise StationListError(
            str(path), [f"{path}:{reader.line_num}: not CSV as expected ({exc})"]
        ) from None
    problems += _twice(path, rows)
    if problems:
        raise StationListError(str(path), problems)
    if not rows:
        raise StationListError(str(path), [f"{path}: a header but no station"])
    return rows


def _twice(path: Path, rows: list[StationRow]) -> list[str]:
    """An id, an address (in any case) or a key on two rows of the file."""
    problems: list[str] = []
    seen: dict[tuple[str, str], int] = {}
    for row in rows:
        for column, value in (
            ("id", row.id),
            ("email", row.email.casefold()),
            ("key", row.key.key_id if row.key else ""),
        ):
            if not value:
                continue
            first = seen.setdefault((column, value), row.line)
            if first != row.line:
                shown = row.email if column == "email" else value
                problems.append(f"{path}:{row.line}: {column}: {shown} is on line {first} already")
    return problems


def check_against(
    path: Path,
    rows: list[StationRow],
    *,
    host_id: str,
    host_key: str,
    host_address: str,
    stations: Mapping[str, str],
    keys: Mapping[str, str],
) -> list[str]:
    """The rows' problems with what the host holds already: its own id, key
    id and address, ``stations`` (id → address) and the peers' current
    ``keys`` (key id → peer)."""
    taken = {email.casefold(): sid for sid, email in stations.items()}
    problems: list[str] = []
    for row in rows:
        where = f"{path}:{row.line}"
        if row.id == host_id:
            problems.append(f"{where}: id: {row.id} is the host's own id")
        elif row.id in stations:
            problems.append(f"{where}: id: station {row.id} exists already")
        owner = taken.get(row.email.casefold())
        if row.email.casefold() == host_address.casefold():
            problems.append(f"{where}: email: {row.email} is the host's own address")
        elif owner is not None:
            problems.append(f"{where}: email: {row.email} belongs to station {owner} already")
        if row.key is not None and row.key.key_id == host_key:
            problems.append(f"{where}: key: {host_key} is the host's own key")
        elif row.key is not None and keys.get(row.key.key_id, row.id) != row.id:
            problems.append(
                f"{where}: key: {row.key.key_id} is {keys[row.key.key_id]}'s key already"
            )
    return problems
