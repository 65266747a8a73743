"""Schedule expressions (SPEC 5): 5-field cron and ``@every`` intervals.

Parsing and validation are pure Python so flowctl can check a schedule without
importing APScheduler; :func:`build_trigger` imports it lazily. Cron is read the way
Vixie cron reads it: day-of-week 0 and 7 are Sunday, and when both day-of-month and
day-of-week are restricted a day matching *either* runs (APScheduler would need both).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from flowd.errors import InputError

ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_EVERY = re.compile(r"@every\s+((?:\d+\s*[smhd]\s*)+)", re.IGNORECASE)
_EVERY_PART = re.compile(r"(\d+)\s*([smhd])", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MONTH_NAMES = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
DOW_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
# APScheduler counts weekdays from Monday = 0; cron from Sunday = 0. Names avoid the trap.
_APS_DOW = {0: "sun", 1: "mon", 2: "tue", 3: "wed", 4: "thu", 5: "fri", 6: "sat"}


@dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int
    names: tuple[str, ...] = ()
    name_base: int = 0


_FIELDS = (
    _Field("minute", 0, 59),
    _Field("hour", 0, 23),
    _Field("day of month", 1, 31),
    _Field("month", 1, 12, MONTH_NAMES, 1),
    _Field("day of week", 0, 7, DOW_NAMES, 0),
)


@dataclass(frozen=True)
class CronSchedule:
    """A parsed cron expression: the allowed values of each field (weekday 0 = Sunday).

    ``*_star`` records whether a field was written starting with ``*``, as Vixie cron
    does: it decides the day-of-month/day-of-week rule and which jobs have a fixed
    wall-clock time (neither minute nor hour starred), which matters across DST.
    """

    expr: str
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: tuple[int, ...]
    months: tuple[int, ...]
    weekdays: tuple[int, ...]
    minute_star: bool
    hour_star: bool
    day_star: bool
    weekday_star: bool

    @property
    def is_fixed_time(self) -> bool:
        """True when the job runs at set wall-clock times (e.g. ``30 2 * * *``)."""
        return not (self.minute_star or self.hour_star)


@dataclass(frozen=True)
class IntervalSchedule:
    """``@every 30s``: a run every ``seconds`` seconds."""

    expr: str
    seconds: int

    @property
    def is_fixed_time(self) -> bool:
        return False


Schedule = CronSchedule | IntervalSchedule


def _error(expr: str, what: str) -> InputError:
    return InputError(f"schedule '{expr}': {what}")


def _parse_value(expr: str, field: _Field, text: str) -> int:
    lowered = text.lower()
    if field.names and lowered in field.names:
        return field.names.index(lowered) + field.name_base
    if not text.isdigit():
        if text.isalpha():
            allowed = f"; use {field.names[0]}..{field.names[-1]} or numbers" if field.names else ""
            raise _error(expr, f"{field.name} '{text}' is not a number{allowed}")
        raise _error(expr, f"{field.name} '{text}' is not understood; use numbers, ranges (1-5), "
                           "steps (*/15), lists (1,15,30) or *")
    value = int(text)
    if not field.low <= value <= field.high:
        raise _error(expr, f"{field.name} {value} is out of range {field.low}-{field.high}")
    return value


def _parse_field(expr: str, field: _Field, text: str) -> set[int]:
    values: set[int] = set()
    for item in text.split(","):
        if not item:
            raise _error(expr, f"the {field.name} field '{text}' has an empty list item")
        base, _, step_text = item.partition("/")
        step = 1
        if _:
            if not step_text.isdigit() or int(step_text) == 0:
                raise _error(expr, f"step '/{step_text}' in the {field.name} field must be a whole number above 0")
            step = int(step_text)
        if base == "*":
            low, high = field.low, field.high
        elif "-" in base:
            start, _, end = base.partition("-")
            low, high = _parse_value(expr, field, start), _parse_value(expr, field, end)
            if low > high:
                raise _error(expr, f"the {field.name} range {base} goes backwards; write it as a list")
        else:
            low = _parse_value(expr, field, base)
            high = field.high if step_text else low  # "5/15" means from 5 to the end, every 15
        values.update(range(low, high + 1, step))
    return values


def parse_schedule(expr: str) -> Schedule:
    """Parse a schedule; raises InputError showing the expression and what is wrong."""
    if not isinstance(expr, str) or not expr.strip():
        raise InputError(f"schedule {expr!r}: it is empty; use a cron expression like '*/5 * * * *' "
                         "or an interval like '@every 30s'")
    text = " ".join(expr.split())
    if text.startswith("@"):
        lowered = text.lower()
        if lowered in ALIASES:
            return _parse_cron(expr, ALIASES[lowered])
        match = _EVERY.fullmatch(text)
        if match is None:
            known = ", ".join(ALIASES)
            raise _error(expr, f"not understood; use '@every <n>s|m|h' (e.g. '@every 30s') or one of {known}")
        seconds = sum(int(n) * _UNIT_SECONDS[unit.lower()] for n, unit in _EVERY_PART.findall(match.group(1)))
        if seconds < 1:
            raise _error(expr, "the interval must be at least 1 second")
        return IntervalSchedule(expr=expr, seconds=seconds)
    return _parse_cron(expr, text)


def _parse_cron(expr: str, text: str) -> CronSchedule:
    parts = text.split(" ")
    if len(parts) != 5:
        raise _error(expr, f"a cron schedule has 5 fields (minute hour day-of-month month day-of-week), "
                           f"got {len(parts)}")
    sets = [_parse_field(expr, field, part) for field, part in zip(_FIELDS, parts, strict=True)]
    weekdays = {0 if d == 7 else d for d in sets[4]}
    return CronSchedule(
        expr=expr,
        minutes=tuple(sorted(sets[0])), hours=tuple(sorted(sets[1])), days=tuple(sorted(sets[2])),
        months=tuple(sorted(sets[3])), weekdays=tuple(sorted(weekdays)),
        minute_star=parts[0].startswith("*"), hour_star=parts[1].startswith("*"),
        day_star=parts[2].startswith("*"), weekday_star=parts[4].startswith("*"),
    )


def resolve_timezone(name: str | None) -> dt.tzinfo:
    """The zone a schedule runs in: ``name``, or the system's when None.

    Raises InputError for a name that is not an IANA time zone.
    """
    if not name:
        import tzlocal  # ships with APScheduler 3; reads /etc/localtime or $TZ

        return tzlocal.get_localzone()
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InputError(f"time zone {name!r} is unknown; use an IANA name like 'Europe/Oslo' or 'UTC'") from None


def validate_schedule(expr: str, timezone: str | None) -> None:
    """Check a schedule and its time zone; raises InputError with a sentence for a person."""
    parse_schedule(expr)
    if timezone:
        resolve_timezone(timezone)


def _render(values: tuple[int, ...], field: _Field) -> str:
    if set(values) == set(range(field.low, field.high + 1)):
        return "*"
    return ",".join(str(v) for v in values)


def build_trigger(expr: str, timezone: str | dt.tzinfo | None, jitter: float | None = None,
                  start_date: dt.datetime | None = None) -> Any:
    """An APScheduler trigger for ``expr`` in ``timezone`` (the system's when None).

    The zone is always passed explicitly: ``CronTrigger.from_crontab`` would use the
    machine's. ``start_date`` anchors an interval (so it keeps its cadence over restarts).
    """
    schedule = parse_schedule(expr)
    tz = timezone if isinstance(timezone, dt.tzinfo) else resolve_timezone(timezone)
    jitter_s = int(jitter) if jitter else None
    if isinstance(schedule, IntervalSchedule):
        from apscheduler.triggers.interval import IntervalTrigger

        return IntervalTrigger(seconds=schedule.seconds, timezone=tz, jitter=jitter_s, start_date=start_date)

    from apscheduler.triggers.cron import CronTrigger

    common = {
        "minute": _render(schedule.minutes, _FIELDS[0]),
        "hour": _render(schedule.hours, _FIELDS[1]),
        "month": _render(schedule.months, _FIELDS[3]),
        "second": "0",
        "timezone": tz,
    }
    day = _render(schedule.days, _FIELDS[2])
    weekday = "*" if len(schedule.weekdays) == 7 else ",".join(_APS_DOW[d] for d in schedule.weekdays)
    if schedule.day_star or schedule.weekday_star or day == "*" or weekday == "*":
        trigger: Any = CronTrigger(day=day, day_of_week=weekday, **common)
    else:
        # Vixie cron: both day fields restricted -> a day matching either one runs.
        from apscheduler.triggers.combining import OrTrigger

        trigger = OrTrigger([CronTrigger(day=day, **common), CronTrigger(day_of_week=weekday, **common)])
    trigger.jitter = jitter_s
    return trigger
