"""When a node syncs on its own: every N minutes, between two times of day,
on chosen weekdays — the schedules users know from their ERP's branch sync.

A schedule is ``every`` (``15m``, ``2h``, ``30s``), optionally ``between``
(``06:00-23:00``; a window may cross midnight, ``22:00-02:00``, and then
belongs to the day it starts on) and ``days`` (``mon-fri``, ``mon,wed,sat``,
``all``). Runs are wall-clock times in the node's time zone, counted from
the window's start (or from midnight): ``every 15m between 06:00-23:00``
runs at 06:00, 06:15, … 23:00. On the day clocks change, a time that does
not exist (02:30 when they spring forward) is skipped and one that happens
twice (when they fall back) runs once. A node may have several schedules;
their runs merge.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import tzlocal

from mailsync.errors import ConfigError

DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_EVERY = re.compile(r"^\s*(\d+)\s*(s|m|h|d)\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_TIME = re.compile(r"^(\d{1,2}):(\d{2})$")


@dataclass(frozen=True)
class Schedule:
    every: dt.timedelta
    start: dt.time = dt.time(0, 0)
    #: None: until the end of the day (no ``between``)
    end: dt.time | None = None
    days: frozenset[int] = frozenset(range(7))

    def describe(self) -> str:
        parts = [f"every {format_every(self.every)}"]
        if self.end is not None:
            parts.append(f"between {self.start:%H:%M}-{self.end:%H:%M}")
        if self.days != frozenset(range(7)):
            parts.append("on " + ",".join(DAY_NAMES[d] for d in sorted(self.days)))
        return " ".join(parts)


def format_every(every: dt.timedelta) -> str:
    seconds = int(every.total_seconds())
    for unit in ("d", "h", "m"):
        if seconds % _UNITS[unit] == 0:
            return f"{seconds // _UNITS[unit]}{unit}"
    return f"{seconds}s"


def parse_every(text: str, where: str) -> dt.timedelta:
    match = _EVERY.match(text)
    if not match or int(match.group(1)) == 0:
        raise ConfigError(f"{where}: every = {text!r} is not an interval like 15m, 2h or 30s")
    every = dt.timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])
    if every > dt.timedelta(days=1):
        # runs are counted from each day's start: a longer interval would
        # quietly mean "daily"
        raise ConfigError(
            f"{where}: every = {text!r} is longer than a day; runs start again each day",
            hint='for fewer days, choose them: every = "24h" with days = "mon,thu"',
        )
    return every


def _parse_time(text: str, where: str) -> dt.time:
    match = _TIME.match(text.strip())
    if match is None or int(match.group(1)) > 24 or int(match.group(2)) > 59:
        raise ConfigError(f"{where}: {text!r} is not a time of day like 06:00")
    hour, minute = int(match.group(1)), int(match.group(2))
    if hour == 24 and minute == 0:
        return dt.time(23, 59, 59, 999999)  # "until midnight"
    if hour == 24:
        raise ConfigError(f"{where}: {text!r} is not a time of day like 06:00")
    return dt.time(hour, minute)


def parse_between(text: str, where: str) -> tuple[dt.time, dt.time]:
    first, sep, last = text.partition("-")
    if not sep:
        raise ConfigError(f"{where}: between = {text!r} is not a window like 06:00-23:00")
    start, end = _parse_time(first, where), _parse_time(last, where)
    if start == end:
        raise ConfigError(f"{where}: between = {text!r} is an empty window")
    return start, end


def parse_days(text: str, where: str) -> frozenset[int]:
    value = text.strip().lower()
    if value in ("all", "*", ""):
        return frozenset(range(7))
    days: set[int] = set()
    for item in value.split(","):
        first, sep, last = item.strip().partition("-")
        try:
            a = DAY_NAMES.index(first.strip()[:3])
            b = DAY_NAMES.index(last.strip()[:3]) if sep else a
        except ValueError:
            raise ConfigError(
                f"{where}: days = {text!r}: use mon..sun, ranges like mon-fri, lists like "
                "mon,wed,sat, or all"
            ) from None
        span = range(a, b + 1) if a <= b else [*range(a, 7), *range(0, b + 1)]
        days.update(span)
    return frozenset(days)


def parse_schedule(
    every: str, between: str | None = None, days: str | None = None, *, where: str
) -> Schedule:
    start, end = parse_between(between, where) if between else (dt.time(0, 0), None)
    return Schedule(parse_every(every, where), start, end, parse_days(days or "all", where))


def parse_zone(name: str | None, where: str) -> dt.tzinfo:
    """The schedule's time zone: a name like Europe/Berlin, or the machine's."""
    if not name:
        return tzlocal.get_localzone()
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"{where}: time zone {name!r} is unknown") from None


def _exists(wall: dt.datetime, zone: dt.tzinfo) -> dt.datetime | None:
    """The aware time for a wall-clock time, or None if the clocks skip it."""
    aware = wall.replace(tzinfo=zone, fold=0)
    back = aware.astimezone(dt.UTC).astimezone(zone)
    if back.replace(tzinfo=None) != wall:
        return None
    return aware


def _slots(schedule: Schedule, day: dt.date, zone: dt.tzinfo) -> Iterator[dt.datetime]:
    """The runs of a window that opens on ``day``, in order."""
    if day.weekday() not in schedule.days:
        return
    begin = dt.datetime.combine(day, schedule.start)
    if schedule.end is None:
        stop = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(0, 0))
        inclusive = False
    else:
        stop = dt.datetime.combine(day, schedule.end)
        if schedule.end <= schedule.start:
            stop += dt.timedelta(days=1)
        inclusive = True
    wall = begin
    while wall < stop or (inclusive and wall == stop):
        aware = _exists(wall, zone)
        if aware is not None:
            yield aware
        wall += schedule.every


def next_runs(
    schedules: Iterable[Schedule], after: dt.datetime, zone: dt.tzinfo, count: int = 5
) -> list[dt.datetime]:
    """The next ``count`` run times strictly after ``after`` (aware), in ``zone``."""
    found: set[dt.datetime] = set()
    after = after.astimezone(dt.UTC)  # compared as instants, not wall times
    start = after.astimezone(zone).date() - dt.timedelta(days=1)
    for schedule in schedules:
        taken = 0
        for offset in range(0, 800):
            for run in _slots(schedule, start + dt.timedelta(days=offset), zone):
                if run.astimezone(dt.UTC) > after:
                    found.add(run.astimezone(dt.UTC))
                    taken += 1
            if taken >= count:
                break
    return [run.astimezone(zone) for run in sorted(found)[:count]]


def next_run(
    schedules: Iterable[Schedule], after: dt.datetime, zone: dt.tzinfo
) -> dt.datetime | None:
    runs = next_runs(schedules, after, zone, 1)
    return runs[0] if runs else None
