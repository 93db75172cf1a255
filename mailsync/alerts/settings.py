"""The ``[alerts]`` config table: who is told, and when something counts.

Read through :mod:`mailsync.config`'s strict machinery (unknown keys
refused with "did you mean", types in words, file and line): the config
hands :func:`read_alerts` its getter, so this module needs nothing of
the config's and the config imports it without a circle. Every threshold
has a default a careful admin would pick; ``0`` (or ``false``) turns one
condition off. Without an ``[alerts]`` table, or with ``to`` empty, no
alert is ever checked: an idle cycle costs what it cost before.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mailsync.errors import ConfigError

#: defaults: a station silent this many days, this many parked rows,
#: conflicts, numbers left in a range; checks at most this often
DEFAULT_SILENT_DAYS = 3.0
DEFAULT_PARKED_ROWS = 1
DEFAULT_CONFLICTS = 1
DEFAULT_RANGE_LEFT = 100
DEFAULT_EVERY_MINUTES = 60.0
#: the same condition (for the same station / table) is told once a day
REPEAT_HOURS = 24.0

_EMAIL = re.compile(r"^[^@\s/<>,;\"]+@[^@\s/<>,;\"]+\.[^@\s/<>,;\".]+$")

#: (key, type word for the template, default, what it means) in the
#: template's order; ``to`` comes first and has no default
KEYS: tuple[tuple[str, str, str], ...] = (
    ("silent_days", f"{DEFAULT_SILENT_DAYS:g}", "a peer not heard from for this many days"),
    ("parked_rows", str(DEFAULT_PARKED_ROWS), "rows parked (could not be applied), per table"),
    ("conflicts", str(DEFAULT_CONFLICTS), "conflicts recorded and not dropped, per table"),
    ("range_left", str(DEFAULT_RANGE_LEFT), "a number range with fewer numbers left here"),
    ("restore", "true", "this database was found restored from a backup"),
    ("hostile", "true", "mail set aside, rows refused by the rules, a replayed control"),
    ("held", "true", "a link held: a peer's changesets do not apply"),
    ("every_minutes", f"{DEFAULT_EVERY_MINUTES:g}", "check at most this often (after a cycle)"),
)


@dataclass(frozen=True)
class AlertSettings:
    """Who is told and the thresholds; ``to`` empty: alerts are off."""

    to: tuple[str, ...] = ()
    silent_days: float = DEFAULT_SILENT_DAYS
    parked_rows: int = DEFAULT_PARKED_ROWS
    conflicts: int = DEFAULT_CONFLICTS
    range_left: int = DEFAULT_RANGE_LEFT
    restore: bool = True
    hostile: bool = True
    held: bool = True
    every_minutes: float = DEFAULT_EVERY_MINUTES

    @property
    def enabled(self) -> bool:
        return bool(self.to)


#: ``get(key, kind, default)``: the config's strict getter for this table
Getter = Callable[[str, Any, Any], Any]


def read_alerts(get: Getter, where: str, own_address: str | None = None) -> AlertSettings:
    """The ``[alerts]`` table, checked: every address, every threshold.

    An ``[alerts]`` table without ``to`` is an operator's mistake (the
    thresholds would be set and nobody told), so is an address that is
    this node's own mailbox: the alert would be read by the node itself
    and set aside as not mailsync's."""
    raw = get("to", str | list, None)
    if raw is None:
        raise ConfigError(
            f"{where}: missing setting 'to' (who is told)",
            hint='e.g. to = "admin@firma.example"; remove [alerts] to turn alerts off',
        )
    addresses = [raw] if isinstance(raw, str) else raw
    if not addresses or not all(isinstance(a, str) for a in addresses):
        raise ConfigError(f'{where}: to must be an address or a list of them ("admin@…")')
    for address in addresses:
        if not _EMAIL.match(address):
            raise ConfigError(f"{where}: to {address!r} is not an e-mail address")
        if own_address is not None and address.lower() == own_address.lower():
            raise ConfigError(
                f"{where}: to {address!r} is this node's own mailbox: the node would read "
                "its alerts and set them aside",
                hint="send alerts to a person's address",
            )
    numbers: dict[str, Any] = {}
    for key, kind, default in (
        ("silent_days", int | float, DEFAULT_SILENT_DAYS),
        ("parked_rows", int, DEFAULT_PARKED_ROWS),
        ("conflicts", int, DEFAULT_CONFLICTS),
        ("range_left", int, DEFAULT_RANGE_LEFT),
        ("every_minutes", int | float, DEFAULT_EVERY_MINUTES),
    ):
        value = get(key, kind, default)
        if value < 0:
            raise ConfigError(f"{where}: {key} must not be negative (0 turns it off), not {value}")
        numbers[key] = value
    return AlertSettings(
        to=tuple(addresses),
        silent_days=float(numbers["silent_days"]),
        parked_rows=numbers["parked_rows"],
        conflicts=numbers["conflicts"],
        range_left=numbers["range_left"],
        restore=get("restore", bool, True),
        hostile=get("hostile", bool, True),
        held=get("held", bool, True),
        every_minutes=float(numbers["every_minutes"]),
    )


def render_alerts() -> list[str]:
    """The commented ``[alerts]`` table of a new config (every key, its
    default and meaning; a test uncomments it and loads it)."""
    lines = [
        "# Tell a person, by a short mail through this node's own send account,",
        "# when something needs one (at most one mail per condition and day;",
        "# 0 or false turns a condition off). `mailsync alerts test` tries it.",
        "# [alerts]",
        '# to = "admin@example.com"        # or a list: ["a@…", "b@…"]',
    ]
    for key, default, meaning in KEYS:
        lines.append(f"# {key} = {default}".ljust(30) + f"  # {meaning}")
    return lines
