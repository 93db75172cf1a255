"""Schedule arithmetic against a clock the test controls: intervals, windows
across midnight, weekday sets, and the days clocks change."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailsync.config import load_config
from mailsync.errors import ConfigError
from mailsync.schedule import DAY_NAMES, Schedule, next_runs, parse_schedule

BERLIN = ZoneInfo("Europe/Berlin")
UTC = dt.UTC


def at(text: str, zone: dt.tzinfo = BERLIN) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=zone)


def walls(runs: list[dt.datetime], zone: dt.tzinfo = BERLIN) -> list[str]:
    return [f"{r.astimezone(zone):%a %H:%M}" for r in runs]


def test_every_quarter_hour_in_office_hours_on_weekdays() -> None:
    s = parse_schedule("15m", "06:00-23:00", "mon-fri", where="test")
    # Friday 22:50: the last run of the day is 23:00, then Monday 06:00
    runs = next_runs([s], at("2026-11-27 22:50"), BERLIN, 5)
    assert walls(runs) == ["Fri 23:00", "Mon 06:00", "Mon 06:15", "Mon 06:30", "Mon 06:45"]


def test_a_window_across_midnight_belongs_to_the_day_it_opens() -> None:
    s = parse_schedule("1h", "22:00-02:00", "fri", where="test")
    runs = next_runs([s], at("2026-11-27 12:00"), BERLIN, 6)
    assert walls(runs) == [
        "Fri 22:00",
        "Fri 23:00",
        "Sat 00:00",
        "Sat 01:00",
        "Sat 02:00",
        "Fri 22:00",
    ]


def test_several_schedules_merge() -> None:
    a = parse_schedule("2h", "08:00-12:00", "all", where="a")
    b = parse_schedule("30m", "09:00-10:00", "all", where="b")
    runs = next_runs([a, b], at("2026-11-23 07:00"), BERLIN, 6)
    assert walls(runs) == [
        "Mon 08:00",
        "Mon 09:00",
        "Mon 09:30",
        "Mon 10:00",
        "Mon 12:00",
        "Tue 08:00",
    ]


def test_spring_forward_skips_the_missing_hour_and_fall_back_runs_once() -> None:
    s = parse_schedule("30m", None, None, where="test")
    spring = next_runs([s], at("2026-03-29 01:00"), BERLIN, 3)  # 02:00-03:00 does not exist
    assert [f"{r:%H:%M %Z}" for r in spring] == ["01:30 CET", "03:00 CEST", "03:30 CEST"]
    assert spring[1].astimezone(UTC) - spring[0].astimezone(UTC) == dt.timedelta(minutes=30)
    autumn = next_runs([s], at("2026-10-25 01:00"), BERLIN, 5)
    assert [f"{r:%H:%M}" for r in autumn] == ["01:30", "02:00", "02:30", "03:00", "03:30"]
    assert len({r.astimezone(UTC) for r in autumn}) == 5


@pytest.mark.parametrize(
    ("every", "between", "days", "words"),
    [
        ("0m", None, None, "not an interval"),
        ("15x", None, None, "not an interval"),
        ("2d", None, None, "longer than a day"),
        ("15m", "25:00-01:00", None, "not a time of day"),
        ("15m", "06:00", None, "not a window"),
        ("15m", "06:00-06:00", None, "empty window"),
        ("15m", None, "funday", "use mon..sun"),
    ],
)
def test_bad_schedules_say_what_is_wrong(
    every: str, between: str | None, days: str | None, words: str
) -> None:
    with pytest.raises(ConfigError, match=words):
        parse_schedule(every, between, days, where="here")


def test_schedules_in_the_config(tmp_path: Path) -> None:
    from mailsync.node import init_node

    path = tmp_path / "mailsync.toml"
    init_node(
        path,
        role="host",
        node_id="hq",
        database=f"sqlite:///{tmp_path / 'hq.db'}",
        address="hq@x.test",
        mail="maildir:mail",
    )
    base = path.read_text()
    path.write_text(
        base.replace("[node]\n", '[node]\ntimezone = "Europe/Berlin"\nlog_retention_days = 30\n')
        + '\n[[schedule]]\nevery = "15m"\nbetween = "06:00-23:00"\ndays = "mon-fri"\n'
        + '\n[[schedule]]\nevery = "2h"\ndays = "sat"\n'
    )
    config = load_config(path)
    assert [s.describe() for s in config.schedules] == [
        "every 15m between 06:00-23:00 on mon,tue,wed,thu,fri",
        "every 2h on sat",
    ]
    assert config.timezone == "Europe/Berlin" and config.log_retention_days == 30
    path.write_text(base + '\n[[schedule]]\nevery = "soon"\n')
    with pytest.raises(ConfigError, match=r"\[\[schedule\]\] #1: every = 'soon'"):
        load_config(path)
    path.write_text(base + '\n[[schedule]]\nevery = "1h"\nwhen = "later"\n')
    with pytest.raises(ConfigError, match="unknown setting"):
        load_config(path)
    path.write_text(base.replace("[node]\n", '[node]\ntimezone = "Mars/Olympus"\n'))
    with pytest.raises(ConfigError, match="time zone 'Mars/Olympus' is unknown"):
        load_config(path)


ZONES = ["Europe/Berlin", "America/New_York", "Australia/Sydney", "UTC"]


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    every=st.integers(min_value=1, max_value=240),
    start=st.integers(min_value=0, max_value=24 * 60 - 1),
    length=st.integers(min_value=1, max_value=24 * 60 - 1),
    days=st.sets(st.integers(min_value=0, max_value=6), min_size=1),
    after=st.datetimes(min_value=dt.datetime(2026, 1, 1), max_value=dt.datetime(2027, 12, 31)),
    zone=st.sampled_from(ZONES),
)
def test_runs_are_in_order_in_their_windows_and_on_the_grid(
    every: int, start: int, length: int, days: set[int], after: dt.datetime, zone: str
) -> None:
    tz = ZoneInfo(zone)
    begin = dt.time(start // 60, start % 60)
    stop_minutes = (start + length) % (24 * 60)
    end = dt.time(stop_minutes // 60, stop_minutes % 60)
    schedule = Schedule(dt.timedelta(minutes=every), begin, end, frozenset(days))
    moment = after.replace(tzinfo=tz)
    runs = next_runs([schedule], moment, tz, 8)
    assert runs, "a weekly schedule always has a next run"
    assert all(r > moment for r in runs)
    assert runs == sorted(set(runs))
    for run in runs:
        wall = run.astimezone(tz).replace(tzinfo=None)
        # the window it belongs to opened on the same day or the day before
        for opened in (wall.date(), wall.date() - dt.timedelta(days=1)):
            window_start = dt.datetime.combine(opened, begin)
            offset = (wall - window_start).total_seconds() / 60
            if opened.weekday() in days and 0 <= offset <= length and offset % every == 0:
                break
        else:
            raise AssertionError(f"{wall} is in no window of {schedule.describe()}")
    # asking again just after a run gives the runs that follow it
    assert next_runs([schedule], runs[0], tz, 7) == runs[1:]


def test_day_names_cover_the_week() -> None:
    assert parse_schedule("1h", None, "sat-mon", where="t").days == {5, 6, 0}
    assert parse_schedule("1h", None, "mon,wed,sat", where="t").days == {0, 2, 5}
    assert len(DAY_NAMES) == 7
