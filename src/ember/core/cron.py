"""Cron expressions (`minute hour day-of-month month day-of-week`): parsing and matching.

A cron expression names the minutes in which something holds, e.g. a function's `warm_schedule`
(the minutes in which `min_workers` are kept). `parse_cron` validates one (spec.py checks a
`warm_schedule` with it at decoration and deploy time); `in_schedule` evaluates it on the
wall-clock fields of the datetime it is given: the caller picks the timezone.

Everything here is a function of its arguments: no I/O, no clock reads, no globals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_DAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
_FIELDS: tuple[tuple[str, int, int, dict[str, int]], ...] = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day-of-month", 1, 31, {}),
    ("month", 1, 12, {m: i + 1 for i, m in enumerate(_MONTHS)}),
    ("day-of-week", 0, 7, {d: i for i, d in enumerate(_DAYS)}),
)
_MAX_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


@dataclass(frozen=True)
class Cron:
    """A parsed cron expression: the sets of minutes, hours, days, months and weekdays it names.

    Weekdays are 0-6 from Sunday (7 is read as Sunday too). As in Vixie cron, when both the
    day-of-month and the day-of-week fields are restricted (neither starts with `*`), a day
    matches if either does; otherwise both must.
    """

    expr: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    any_day: bool = field(default=True)
    any_weekday: bool = field(default=True)

    def matches(self, t: datetime) -> bool:
        if t.minute not in self.minutes or t.hour not in self.hours or t.month not in self.months:
            return False
        day = t.day in self.days
        weekday = (t.weekday() + 1) % 7 in self.weekdays
        if self.any_day or self.any_weekday:
            return day and weekday
        return day or weekday


def _value(text: str, name: str, lo: int, hi: int, names: dict[str, int]) -> int:
    if text.upper() in names:
        return names[text.upper()]
    if not text.isdigit():
        hint = f" or a name ({', '.join(names)})" if names else ""
        raise ValueError(f"{name} field: {text!r} is not a number{hint}")
    v = int(text)
    if not lo <= v <= hi:
        raise ValueError(f"{name} field: {v} is out of range {lo}-{hi}")
    return v


def _field(text: str, name: str, lo: int, hi: int, names: dict[str, int]) -> frozenset[int]:
    out: set[int] = set()
    for item in text.split(","):
        if not item:
            raise ValueError(f"{name} field {text!r}: empty item in a list")
        base, slash, step_text = item.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) < 1:
                raise ValueError(
                    f"{name} field {item!r}: the step after '/' must be a whole number >= 1"
                )
            step = int(step_text)
        if base == "*":
            start, end = lo, hi
        elif "-" in base:
            a, _, b = base.partition("-")
            if not a or not b:
                raise ValueError(f"{name} field {item!r}: a range needs a start and an end")
            start, end = _value(a, name, lo, hi, names), _value(b, name, lo, hi, names)
            if start > end:
                raise ValueError(f"{name} field {item!r}: range start {a} is after its end {b}")
        else:
            start = _value(base, name, lo, hi, names)
            end = hi if slash else start  # `5/15`: from 5 to the end, every 15
        out.update(range(start, end + 1, step))
    return frozenset(out)


def parse_cron(expr: str) -> Cron:
    """Parse `minute hour day-of-month month day-of-week`, each field `*`, a number (or a name:
    JAN-DEC, SUN-SAT), a range `a-b`, a step `*/n`, `a-b/n` or `a/n`, or a comma list of those.
    Raises ValueError saying which field is wrong and why."""
    if not isinstance(expr, str):
        raise ValueError(f"a cron expression must be a string, got {type(expr).__name__}")
    parts = expr.split()
    if len(parts) != 5:
        raise ValueError(
            f"cron expression {expr!r} has {len(parts)} field{'s' * (len(parts) != 1)}; "
            "expected 5: minute hour day-of-month month day-of-week (e.g. '* 9-16 * * 1-5')"
        )
    try:
        sets = [_field(p, *spec) for p, spec in zip(parts, _FIELDS, strict=True)]
    except ValueError as exc:
        raise ValueError(f"cron expression {expr!r}: {exc}") from None
    minutes, hours, days, months, weekdays = sets
    weekdays = frozenset(d % 7 for d in weekdays)
    cron = Cron(
        " ".join(parts),
        minutes,
        hours,
        days,
        months,
        weekdays,
        any_day=parts[2].startswith("*"),
        any_weekday=parts[4].startswith("*"),
    )
    if cron.any_weekday and not any(d <= _MAX_DAYS[m - 1] for m in months for d in days):
        raise ValueError(
            f"cron expression {expr!r} never matches: no month of {parts[3]!r} "
            f"has a day {parts[2]!r}"
        )
    return cron


def in_schedule(expr: str | Cron, t: datetime) -> bool:
    """Whether the minute of `t` (its own wall-clock fields, seconds ignored) is in the schedule.

    A cron expression names minutes: business hours Monday to Friday, 9:00 to 16:59, are
    `* 9-16 * * 1-5`. (`0 9-17 * * 1-5` names only the first minute of each hour.)
    """
    cron = expr if isinstance(expr, Cron) else parse_cron(expr)
    return cron.matches(t)
