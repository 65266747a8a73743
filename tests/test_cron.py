"""Schedule expressions: parsing, refusals, and the APScheduler triggers they become."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from zoneinfo import ZoneInfo

import pytest
from conftest import ROOT

from flowd.errors import InputError
from flowd.schedule import cron

UTC = dt.UTC


def next_fires(expr: str, start: dt.datetime, count: int = 3, zone: str = "UTC") -> list[dt.datetime]:
    trigger = cron.build_trigger(expr, zone)
    fires, previous, now = [], None, start
    for _ in range(count):
        fire = trigger.get_next_fire_time(previous, now)
        fires.append(fire)
        previous = now = fire
    return fires


@pytest.mark.parametrize("expr, minutes, hours, days, months, weekdays", [
    ("* * * * *", range(60), range(24), range(1, 32), range(1, 13), range(7)),
    ("*/15 0-6/2 1,15 jan-mar,DEC mon-fri", [0, 15, 30, 45], [0, 2, 4, 6], [1, 15], [1, 2, 3, 12], [1, 2, 3, 4, 5]),
    ("5/20 23 31 2 7", [5, 25, 45], [23], [31], [2], [0]),
    ("0 12 * * 0,7", [0], [12], range(1, 32), range(1, 13), [0]),
    ("0 12 * * sat,SUN", [0], [12], range(1, 32), range(1, 13), [0, 6]),
    ("  30   2  *  *  *  ", [30], [2], range(1, 32), range(1, 13), range(7)),
])
def test_fields_parse_to_the_values_cron_means(expr: str, minutes: object, hours: object, days: object,
                                                months: object, weekdays: object) -> None:
    s = cron.parse_schedule(expr)
    assert isinstance(s, cron.CronSchedule)
    assert (s.minutes, s.hours, s.days, s.months, s.weekdays) == tuple(
        tuple(v) for v in (minutes, hours, days, months, weekdays))  # type: ignore[call-overload]


@pytest.mark.parametrize("expr, seconds", [
    ("@every 2s", 2), ("@every 30s", 30), ("@every 5m", 300), ("@every 1h", 3600), ("@every 1h30m", 5400),
    ("@EVERY 10 S", 10), ("@every 1d", 86400),
])
def test_every_intervals(expr: str, seconds: int) -> None:
    s = cron.parse_schedule(expr)
    assert isinstance(s, cron.IntervalSchedule) and s.seconds == seconds and not s.is_fixed_time


@pytest.mark.parametrize("alias, same_as", [
    ("@hourly", "0 * * * *"), ("@daily", "0 0 * * *"), ("@midnight", "0 0 * * *"), ("@weekly", "0 0 * * 0"),
    ("@monthly", "0 0 1 * *"), ("@yearly", "0 0 1 1 *"), ("@annually", "0 0 1 1 *"),
])
def test_aliases(alias: str, same_as: str) -> None:
    start = dt.datetime(2026, 2, 27, 13, 17, tzinfo=UTC)
    assert next_fires(alias, start) == next_fires(same_as, start)


@pytest.mark.parametrize("expr, message", [
    ("61 * * * *", "schedule '61 * * * *': minute 61 is out of range 0-59"),
    ("0 24 * * *", "schedule '0 24 * * *': hour 24 is out of range 0-23"),
    ("0 0 0 * *", "schedule '0 0 0 * *': day of month 0 is out of range 1-31"),
    ("0 0 * 13 *", "schedule '0 0 * 13 *': month 13 is out of range 1-12"),
    ("0 0 * * 8", "schedule '0 0 * * 8': day of week 8 is out of range 0-7"),
    ("* * *", "schedule '* * *': a cron schedule has 5 fields (minute hour day-of-month month day-of-week), got 3"),
    ("* * * * * *", "got 6"),
    ("*/0 * * * *", "step '/0' in the minute field must be a whole number above 0"),
    ("5-2 * * * *", "the minute range 5-2 goes backwards"),
    ("0 0 * * funday", "day of week 'funday' is not a number; use sun..sat or numbers"),
    ("0 0 * foo *", "month 'foo' is not a number; use jan..dec or numbers"),
    ("0 0 * * mon#2", "day of week 'mon#2' is not understood"),
    ("0 0 L * *", "day of month 'L' is not a number"),
    ("1,,2 * * * *", "has an empty list item"),
    ("@every 0s", "the interval must be at least 1 second"),
    ("@every 5", "not understood; use '@every <n>s|m|h'"),
    ("@every 5 minutes", "not understood"),
    ("@reboot", "not understood"),
    ("", "it is empty"),
    ("   ", "it is empty"),
])
def test_bad_schedules_are_refused_with_a_sentence(expr: str, message: str) -> None:
    with pytest.raises(InputError) as info:
        cron.validate_schedule(expr, None)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_timezone_is_refused() -> None:
    with pytest.raises(InputError, match=r"time zone 'Mars/Olympus' is unknown; use an IANA name"):
        cron.validate_schedule("* * * * *", "Mars/Olympus")
    cron.validate_schedule("*/5 * * * *", "Europe/Oslo")
    cron.validate_schedule("@every 30s", None)


def test_sunday_is_0_and_7_not_monday() -> None:
    # APScheduler's day_of_week 0 is Monday; cron's is Sunday. 2026-11-28 is a Saturday.
    start = dt.datetime(2026, 11, 28, 12, tzinfo=UTC)
    for expr in ("0 8 * * 0", "0 8 * * 7", "0 8 * * sun"):
        fires = next_fires(expr, start)
        assert [f.strftime("%a %d %H:%M") for f in fires] == ["Sun 29 08:00", "Sun 06 08:00", "Sun 13 08:00"]
    assert next_fires("0 8 * * 1", start, 1)[0].strftime("%a") == "Mon"
    assert [f.strftime("%a") for f in next_fires("0 8 * * 5-7", start, 4)] == ["Sun", "Fri", "Sat", "Sun"]


def test_day_of_month_or_day_of_week_as_in_vixie_cron() -> None:
    # Both restricted: the 1st OR a Monday. 2026-06-01 is a Monday; 2026-07-01 a Wednesday.
    fires = next_fires("0 9 1 * mon", dt.datetime(2026, 6, 2, tzinfo=UTC), 6)
    assert [f.strftime("%m-%d %a") for f in fires] == [
        "06-08 Mon", "06-15 Mon", "06-22 Mon", "06-29 Mon", "07-01 Wed", "07-06 Mon"]
    # A starred day field keeps the AND rule: every other day, only when it is a Monday.
    fires = next_fires("0 9 */2 * mon", dt.datetime(2026, 6, 2, tzinfo=UTC), 2)
    assert all(f.strftime("%a") == "Mon" and f.day % 2 == 1 for f in fires)


def test_trigger_uses_the_given_zone_not_the_machine_zone() -> None:
    fires = next_fires("0 8 * * *", dt.datetime(2026, 6, 1, tzinfo=UTC), 1, zone="Asia/Tokyo")
    assert fires[0].astimezone(UTC) == dt.datetime(2026, 6, 1, 23, 0, tzinfo=UTC)
    trigger = cron.build_trigger("0 8 * * *", ZoneInfo("America/New_York"))
    assert str(trigger.timezone) == "America/New_York"


def test_jitter_is_set_on_the_trigger() -> None:
    assert cron.build_trigger("*/5 * * * *", "UTC", jitter=30).jitter == 30
    assert cron.build_trigger("@every 10s", "UTC", jitter=3).jitter == 3
    assert cron.build_trigger("@every 10s", "UTC").jitter is None


def test_interval_start_date_anchors_the_slots() -> None:
    anchor = dt.datetime(2026, 1, 1, tzinfo=UTC)
    trigger = cron.build_trigger("@every 90s", "UTC", start_date=anchor)
    fire = trigger.get_next_fire_time(None, dt.datetime(2026, 1, 1, 0, 10, tzinfo=UTC))
    assert fire == dt.datetime(2026, 1, 1, 0, 10, 30, tzinfo=UTC)


def test_importing_cron_does_not_import_apscheduler() -> None:
    code = ("import sys, flowd.schedule.cron as c; c.validate_schedule('*/5 * * * *', 'Europe/Oslo'); "
            "print('apscheduler' in ' '.join(sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT), check=True)
    assert out.stdout.strip() == "False"
