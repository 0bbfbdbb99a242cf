"""Predictive pre-warming and warm schedules: the pure policy, the spec options, the simulator.

The traffic tests replay seeded synthetic traffic and, when present, the Azure Functions 2019
sample in ../shared/traces/. `pytest tests/test_prewarm.py -k traffic -s` prints the figures
that docs/prewarm.md quotes.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ember
from ember.core.prewarm import (
    IdleHistogram,
    Mode,
    Thresholds,
    Window,
    classify,
    in_schedule,
    next_change,
    parse_cron,
    scheduled_min_workers,
    wants_worker,
    window,
)
from ember.core.simulate import SimResult, simulate
from ember.core.spec import FunctionSpec, SpecError, make_spec
from ember.errors import InvalidSpec

TRACE = Path(__file__).resolve().parents[1] / ".." / "shared" / "traces"
AZURE = TRACE / "azure-functions-2019-sample-100"


def hist_of(*idle_s: float, **kw: float) -> IdleHistogram:
    return IdleHistogram(**kw).record_all(idle_s)


# ----------------------------------------------------------------------------- histogram
class TestHistogram:
    def test_empty(self) -> None:
        h = IdleHistogram()
        assert len(h.counts) == 240 and h.range_s == 4 * 3600
        assert h.samples == h.in_range == h.out_of_range == 0
        assert h.cv == 0.0 and h.out_of_range_fraction == 0.0

    def test_record_bins_by_the_minute_and_is_immutable(self) -> None:
        h = IdleHistogram()
        h2 = h.record(0).record(59.9).record(60).record(4 * 3600 - 0.1)
        assert h.samples == 0, "record returns a new histogram"
        assert h2.counts[0] == 2 and h2.counts[1] == 1 and h2.counts[239] == 1
        h3 = h2.record(4 * 3600).record(1e9)
        assert h3.out_of_range == 2 and h3.in_range == 4 and h3.samples == 6
        assert h3.out_of_range_fraction == pytest.approx(2 / 6)

    @pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
    def test_record_rejects_impossible_idle_times(self, bad: float) -> None:
        with pytest.raises(ValueError, match="idle time must be a finite number"):
            IdleHistogram().record(bad)

    def test_bad_shapes(self) -> None:
        with pytest.raises(ValueError, match="expected 240"):
            IdleHistogram(counts=(1, 2))
        with pytest.raises(ValueError, match="bin_s"):
            IdleHistogram(bin_s=0)
        with pytest.raises(ValueError, match="bins"):
            IdleHistogram(bins=0)
        with pytest.raises(ValueError, match="negative"):
            IdleHistogram(out_of_range=-1)

    def test_head_and_tail_are_bin_edges(self) -> None:
        h = hist_of(*[605.0] * 20)
        assert h.head_s() == 600 and h.tail_s() == 660
        mixed = hist_of(*[300.0] * 95, *[3000.0] * 5)
        assert mixed.head_s() == 300, "5th of 100 idle times is in the 300 s bin"
        assert mixed.tail_s() == 3060, "99th is in the 3000 s bin, which ends at 3060 s"
        assert mixed.percentile_bin(0.95) == 5 and mixed.percentile_bin(0.96) == 50

    def test_percentiles_need_samples(self) -> None:
        with pytest.raises(ValueError, match="no in-range"):
            IdleHistogram().head_s()
        with pytest.raises(ValueError, match="p must be"):
            hist_of(1.0).percentile_bin(0)

    def test_cv_of_bin_counts(self) -> None:
        assert hist_of(*[30.0] * 7).cv == pytest.approx(math.sqrt(239))
        assert hist_of(*(60.0 * i for i in range(240))).cv == pytest.approx(0.0)
        two = hist_of(30.0, 90.0)  # two bins of 240 equally: sqrt(240 / 2 - 1)
        assert two.cv == pytest.approx(math.sqrt(119))


# ----------------------------------------------------------------------------- window
class TestWindow:
    def test_not_representative_until_enough_samples(self) -> None:
        assert classify(hist_of(*[605.0] * 9)) is Mode.FIXED
        assert window(hist_of(*[605.0] * 9), idle_timeout=60) == Window(0, 60, Mode.FIXED)
        assert classify(hist_of(*[605.0] * 10)) is Mode.HISTOGRAM
        assert classify(hist_of(605.0), Thresholds(min_samples=1)) is Mode.HISTOGRAM

    def test_spread_out_idle_times_fall_back_to_the_fixed_keep_alive(self) -> None:
        flat = hist_of(*(60.0 * i + 1 for i in range(240)))
        assert flat.cv < 2 and classify(flat) is Mode.FIXED
        assert window(flat, idle_timeout=90) == Window(0, 90, Mode.FIXED)

    def test_mostly_out_of_range_says_so_and_keeps_alive(self) -> None:
        h = hist_of(*[605.0] * 5, *[5 * 3600.0] * 5)
        assert classify(h) is Mode.OUT_OF_RANGE
        assert window(h, idle_timeout=60) == Window(0, 60, Mode.OUT_OF_RANGE)
        assert classify(h.record(605.0)) is Mode.HISTOGRAM, "under half out of range"

    def test_representative_window_with_margins(self) -> None:
        h = hist_of(*[605.0] * 20)
        assert window(h, 60) == Window(600 * 0.9, 660 * 1.1, Mode.HISTOGRAM)
        assert window(h, 60, margin=0) == Window(600, 660, Mode.HISTOGRAM)

    def test_head_in_the_first_bin_keeps_the_worker_from_the_end(self) -> None:
        h = hist_of(*[10.0] * 20, *[70.0] * 5)
        assert window(h, 60) == Window(0, 120 * 1.1, Mode.HISTOGRAM)
        paper = Thresholds(bursts=False)
        assert window(hist_of(*[10.0] * 20, *[300.0] * 5), 60, thresholds=paper) == Window(
            0, 360 * 1.1, Mode.HISTOGRAM
        )

    def test_bursts_hold_then_prewarm_for_the_long_idle_times(self) -> None:
        h = hist_of(*[5.0] * 50, *[1805.0] * 50)
        w = window(h, 60)
        assert w == Window(1800 * 0.9, 1860 * 1.1, Mode.HISTOGRAM, hold_s=66.0)
        assert w.wants(0) and w.wants(65) and not w.wants(66) and not w.wants(1000)
        assert w.wants(1620) and w.wants(2045) and not w.wants(2046.1)
        assert w.warm_s(30) == 30 and w.warm_s(1000) == 66 and w.warm_s(1800) == 66 + 180
        paper = window(h, 60, thresholds=Thresholds(bursts=False))
        assert paper == Window(0, 1860 * 1.1, Mode.HISTOGRAM), "the paper's single window"

    def test_rare_long_idle_times_beyond_the_tail_are_not_prewarmed_for(self) -> None:
        h = hist_of(*[5.0] * 150, 6000.0)  # over 99% in the first bin
        assert window(h, 60) == Window(0, 66, Mode.HISTOGRAM)

    def test_wants_worker_over_time(self) -> None:
        h = hist_of(*[605.0] * 20)
        end = 1000.0
        assert not wants_worker(h, None, 5000.0, 60)
        assert [wants_worker(h, end, end + dt, 60) for dt in (0, 539, 540, 700, 725.9, 726.1)] == [
            False,
            False,
            True,
            True,
            True,
            False,
        ]
        assert next_change(h, end, end + 10, 60) == end + 540
        assert next_change(h, end, end + 600, 60) == pytest.approx(end + 726)
        assert next_change(h, end, end + 800, 60) is None
        assert next_change(h, None, 0, 60) is None
        fresh = IdleHistogram()
        assert wants_worker(fresh, end, end + 59, 60) and not wants_worker(fresh, end, end + 60, 60)
        assert next_change(fresh, end, end + 1, 60) == end + 60

    def test_bad_windows_and_arguments(self) -> None:
        with pytest.raises(ValueError, match="prewarm_at_s <= keep_until_s"):
            Window(10, 5)
        with pytest.raises(ValueError, match="hold_s <= prewarm_at_s"):
            Window(10, 20, hold_s=11)
        with pytest.raises(ValueError, match="margin"):
            window(IdleHistogram(), 60, margin=1)
        with pytest.raises(ValueError, match="idle_timeout"):
            window(IdleHistogram(), -1)
        with pytest.raises(ValueError, match="min_samples"):
            Thresholds(min_samples=0)
        with pytest.raises(ValueError, match="out_of_range"):
            Thresholds(out_of_range=0)


idle_times = st.lists(
    st.one_of(st.floats(0, 300), st.floats(0, 20_000), st.sampled_from([0.0, 59.999, 60.0])),
    max_size=60,
).flatmap(lambda xs: st.integers(0, 300).map(lambda n: xs + [1.0] * n))
"""Any idle times, then up to 300 short ones (so that some tails fall in the first bin)."""


@settings(max_examples=200, deadline=None)
@given(
    idle=idle_times,
    idle_timeout=st.floats(0, 3600),
    margin=st.floats(0, 0.9),
    min_samples=st.integers(1, 20),
    bursts=st.booleans(),
)
def test_windows_are_ordered_and_never_negative(
    idle: list[float], idle_timeout: float, margin: float, min_samples: int, bursts: bool
) -> None:
    h = hist_of(*idle)
    assert h.samples == len(idle) and sum(h.counts) + h.out_of_range == len(idle)
    w = window(h, idle_timeout, margin, Thresholds(min_samples=min_samples, bursts=bursts))
    assert 0 <= w.hold_s <= w.prewarm_at_s <= w.keep_until_s
    assert all(math.isfinite(x) for x in (w.hold_s, w.prewarm_at_s, w.keep_until_s))
    if w.mode is Mode.HISTOGRAM:
        assert h.head_s() < h.tail_s() <= h.range_s
        assert w.prewarm_at_s < w.keep_until_s <= h.range_s * (1 + margin)
        assert w.keep_until_s >= h.tail_s()
    else:
        assert w == Window(0, idle_timeout, w.mode)
    gaps = sorted(idle)
    warm = [w.warm_s(g) for g in gaps]
    assert all(0 <= x <= g for x, g in zip(warm, gaps, strict=True))
    assert warm == sorted(warm), "more idle time never means less warm time"


# ----------------------------------------------------------------------------- cron
MONDAY = datetime(2024, 1, 1)  # a Monday


def at(day: int, hour: int, minute: int, second: int = 0) -> datetime:
    """Day 0 is Monday 2024-01-01, day 5 Saturday, day 6 Sunday."""
    return MONDAY + timedelta(days=day, hours=hour, minutes=minute, seconds=second)


class TestCron:
    BUSINESS = "* 9-16 * * 1-5"

    @pytest.mark.parametrize(
        ("t", "inside"),
        [
            (at(0, 8, 59, 59), False),
            (at(0, 9, 0), True),
            (at(0, 12, 30), True),
            (at(0, 16, 59, 59), True),
            (at(0, 17, 0), False),
            (at(4, 16, 59), True),  # Friday
            (at(4, 17, 0), False),
            (at(5, 10, 0), False),  # Saturday
            (at(6, 10, 0), False),  # Sunday
            (at(7, 9, 0), True),  # the next Monday
        ],
    )
    def test_business_hours_at_the_boundaries(self, t: datetime, inside: bool) -> None:
        assert in_schedule(self.BUSINESS, t) is inside

    def test_a_cron_expression_names_minutes(self) -> None:
        top_of_hour = "0 9-17 * * 1-5"
        assert in_schedule(top_of_hour, at(0, 9, 0)) and in_schedule(top_of_hour, at(0, 17, 0))
        assert not in_schedule(top_of_hour, at(0, 9, 1))

    def test_fields(self) -> None:
        assert parse_cron("*/15 * * * *").minutes == {0, 15, 30, 45}
        assert parse_cron("5/20 * * * *").minutes == {5, 25, 45}
        assert parse_cron("0-30/10 * * * *").minutes == {0, 10, 20, 30}
        assert parse_cron("1,2,5-7 * * * *").minutes == {1, 2, 5, 6, 7}
        c = parse_cron("0 0 * jan-MAR Mon-fri")
        assert c.months == {1, 2, 3} and c.weekdays == {1, 2, 3, 4, 5}
        assert parse_cron("0 0 * * 5-7").weekdays == {0, 5, 6}, "7 is Sunday too"
        assert parse_cron("  0   9-16\t* *  1-5 ").expr == "0 9-16 * * 1-5"

    def test_day_of_month_or_day_of_week(self) -> None:
        either = "0 0 1 * 1"  # both restricted: the 1st of the month, or any Monday
        assert in_schedule(either, datetime(2024, 2, 1))  # a Thursday, the 1st
        assert in_schedule(either, datetime(2024, 2, 5))  # a Monday
        assert not in_schedule(either, datetime(2024, 2, 6))
        mondays = "0 0 * * 1"
        assert not in_schedule(mondays, datetime(2024, 2, 1))
        first_mondays = "0 0 */1 * 1"  # a field starting with '*' makes it "and"
        assert in_schedule(first_mondays, datetime(2024, 2, 5))

    def test_the_datetime_s_own_wall_clock_is_used(self) -> None:
        paris = timezone(timedelta(hours=1))
        t = datetime(2024, 1, 1, 9, 0, tzinfo=paris)  # 08:00 UTC
        assert in_schedule(self.BUSINESS, t)
        assert not in_schedule(self.BUSINESS, t.astimezone(UTC))

    @pytest.mark.parametrize(
        ("expr", "message"),
        [
            ("", "has 0 fields; expected 5: minute hour day-of-month month day-of-week"),
            ("* * * *", "has 4 fields; expected 5"),
            ("* * * * * *", "has 6 fields"),
            ("60 * * * *", "minute field: 60 is out of range 0-59"),
            ("* 24 * * *", "hour field: 24 is out of range 0-23"),
            ("* * 0 * *", "day-of-month field: 0 is out of range 1-31"),
            ("* * * 13 *", "month field: 13 is out of range 1-12"),
            ("* * * * 8", "day-of-week field: 8 is out of range 0-7"),
            ("5-1 * * * *", "minute field '5-1': range start 5 is after its end 1"),
            ("-5 * * * *", "a range needs a start and an end"),
            ("*/0 * * * *", "the step after '/' must be a whole number >= 1"),
            ("*/x * * * *", "the step after '/' must be a whole number >= 1"),
            ("1,,2 * * * *", "empty item in a list"),
            ("x * * * *", "minute field: 'x' is not a number"),
            ("* * * FOO *", "'FOO' is not a number or a name \\(JAN, FEB"),
            ("* * * * someday", "or a name \\(SUN, MON"),
            ("* * 31 2 *", "never matches: no month of '2' has a day '31'"),
            ("* * 30,31 2 *", "never matches"),
        ],
    )
    def test_bad_expressions_say_what_is_wrong(self, expr: str, message: str) -> None:
        with pytest.raises(ValueError, match=message):
            parse_cron(expr)

    def test_not_a_string(self) -> None:
        with pytest.raises(ValueError, match="must be a string"):
            parse_cron(5)

    def test_feb_29_and_day_31_are_possible(self) -> None:
        assert in_schedule("* * 29 2 *", datetime(2024, 2, 29, 3))
        assert parse_cron("* * 31 1-3 *").days == {31}

    def test_scheduled_min_workers(self) -> None:
        sched = parse_cron(self.BUSINESS)
        assert scheduled_min_workers(2, sched, at(0, 10, 0)) == 2
        assert scheduled_min_workers(2, self.BUSINESS, at(5, 10, 0)) == 0
        assert scheduled_min_workers(2, None, at(5, 10, 0)) == 2


@settings(max_examples=100, deadline=None)
@given(t=st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1)))
def test_business_hours_agree_with_the_calendar(t: datetime) -> None:
    expected = t.weekday() < 5 and 9 <= t.hour < 17
    assert in_schedule("* 9-16 * * MON-FRI", t) is expected
    assert in_schedule("* * * * *", t)


# ----------------------------------------------------------------------------- spec
class TestSpecOptions:
    def test_defaults_are_off(self) -> None:
        s = make_spec().scaling
        assert s.prewarm is None and s.warm_schedule is None

    def test_stored_and_round_tripped(self) -> None:
        spec = make_spec(prewarm="auto", warm_schedule=" * 9-16  * * 1-5", min_workers=1)
        assert spec.scaling.prewarm == "auto"
        assert spec.scaling.warm_schedule == "* 9-16 * * 1-5"
        d = spec.to_dict()
        assert d["scaling"]["prewarm"] == "auto"
        assert d["scaling"]["warm_schedule"] == "* 9-16 * * 1-5"
        assert FunctionSpec.from_dict(d) == spec

    def test_old_dicts_without_the_options_still_load(self) -> None:
        d = make_spec().to_dict()
        del d["scaling"]["prewarm"], d["scaling"]["warm_schedule"]
        assert FunctionSpec.from_dict(d) == make_spec()

    @pytest.mark.parametrize(
        ("options", "message"),
        [
            ({"prewarm": "yes"}, "prewarm must be None or 'auto', got 'yes'"),
            ({"prewarm": True}, "prewarm must be None or 'auto'"),
            ({"warm_schedule": 5, "min_workers": 1}, "warm_schedule must be a cron expression"),
            ({"warm_schedule": "9-17", "min_workers": 1}, "warm_schedule: .* has 1 field;"),
            ({"warm_schedule": "* 25 * * *", "min_workers": 1}, "hour field: 25 is out of range"),
            ({"warm_schedule": "* 9-16 * * 1-5"}, "give min_workers >= 1 with it"),
        ],
    )
    def test_invalid(self, options: dict[str, object], message: str) -> None:
        with pytest.raises(SpecError, match=message):
            make_spec(**options)

    def test_sdk_options(self) -> None:
        app = ember.App("prewarm-options")

        @app.function(prewarm="auto", warm_schedule="* 9-16 * * 1-5", min_workers=1)
        def f(x: int) -> int:
            return x

        assert f.spec is not None and f.spec.scaling.prewarm == "auto"
        with pytest.raises(InvalidSpec, match="prewarm must be None or 'auto'"):
            app.function(prewarm="always")(lambda: None)


# ----------------------------------------------------------------------------- simulator
class TestSimulate:
    def test_fixed_keep_alive_by_hand(self) -> None:
        r = simulate([0, 30, 100, 300], 10, idle_timeout=60)
        # ends at 10 -> call at 30 (warm, idle 20) -> ends 40 -> 100 (gap 60: cold, idle 60)
        # -> ends 110 -> 300 (gap 190: cold, idle 60) -> ends 310, then 60 idle
        assert (r.calls, r.cold_starts, r.prewarms) == (4, 3, 0)
        assert r.idle_s == 20 + 60 + 60 + 60 and r.busy_s == 40
        assert simulate([0, 30], 10, idle_timeout=60, horizon=50).idle_s == 20 + 10

    def test_overlapping_calls_share_the_worker(self) -> None:
        r = simulate([0, 5, 9, 30], 10, idle_timeout=0)
        assert r.cold_starts == 2 and r.busy_s == 19 + 10 and r.idle_s == 0

    def test_prewarm_learns_a_period(self) -> None:
        calls = [600.0 * i for i in range(30)]
        r = simulate(calls, 5, idle_timeout=60, prewarm="auto")
        # the first call and the 10 gaps it takes to learn (min_samples) are cold; then idle
        # times of 595 s (bin 540-600 s) pre-warm at 540 * 0.9 and keep until 600 * 1.1
        assert r.cold_starts == 11 and r.histogram_windows == 19 and r.prewarms == 20
        assert r.idle_s == pytest.approx(10 * 60 + 19 * (595 - 486) + (660 - 486))

    def test_empty_and_bad(self) -> None:
        assert simulate([], 1) == SimResult(0, 0, 0, 0.0, 0.0)
        with pytest.raises(ValueError, match="prewarm"):
            simulate([1], 1, prewarm="yes")
        with pytest.raises(ValueError, match="duration_s"):
            simulate([1], -1)
        with pytest.raises(ValueError, match="finite"):
            simulate([1, math.nan], 1)


@settings(max_examples=60, deadline=None)
@given(
    calls=st.lists(st.floats(0, 50_000), max_size=40),
    duration=st.floats(0, 120),
    t1=st.floats(0, 3600),
    t2=st.floats(0, 3600),
)
def test_a_longer_keep_alive_never_adds_cold_starts_nor_saves_idle_time(
    calls: list[float], duration: float, t1: float, t2: float
) -> None:
    short, long_ = sorted((t1, t2))
    a = simulate(calls, duration, idle_timeout=short)
    b = simulate(calls, duration, idle_timeout=long_)
    assert b.cold_starts <= a.cold_starts and b.idle_s >= a.idle_s - 1e-6
    auto = simulate(calls, duration, idle_timeout=short, prewarm="auto")
    for r in (a, b, auto):
        assert (1 if calls else 0) <= r.cold_starts <= len(calls) and r.idle_s >= 0


# ----------------------------------------------------------------------------- traffic
def fixed_at_idle(times: list[float], duration: float, idle_s: float, horizon: float) -> SimResult:
    """The fixed keep-alive spending as much idle time as `idle_s`, or just under (bisection)."""
    lo, hi = 0.0, 4 * 3600.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if simulate(times, duration, idle_timeout=mid, horizon=horizon).idle_s <= idle_s:
            lo = mid
        else:
            hi = mid
    return simulate(times, duration, idle_timeout=lo, horizon=horizon)


def fixed_at_cold_starts(times: list[float], duration: float, cold: int, horizon: float) -> float:
    """Idle seconds of the shortest fixed keep-alive with at most `cold` cold starts."""
    lo, hi = 0.0, 24 * 3600.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if simulate(times, duration, idle_timeout=mid, horizon=horizon).cold_starts <= cold:
            hi = mid
        else:
            lo = mid
    return simulate(times, duration, idle_timeout=hi, horizon=horizon).idle_s


def periodic(rng: random.Random, every: float = 600, jitter: float = 30) -> list[float]:
    """A call every 10 minutes +- 30 s (uniform), for two days."""
    return [i * every + rng.uniform(-jitter, jitter) for i in range(1, 2 * 86400 // int(every))]


def bursty(rng: random.Random) -> list[float]:
    """Every 30 min +- 3 min (uniform), a burst of 5-15 calls 10 s apart on average (Poisson),
    for two days: a pipeline or a user session."""
    out = []
    for i in range(1, 96):
        t = i * 1800 + rng.uniform(-180, 180)
        for _ in range(rng.randint(5, 15)):
            out.append(t)
            t += rng.expovariate(1 / 10)
    return out


def poisson(rng: random.Random) -> list[float]:
    """Memoryless calls, 10 minutes apart on average, for two days: nothing to predict."""
    out, t = [], rng.expovariate(1 / 600)
    while t < 2 * 86400:
        out.append(t)
        t += rng.expovariate(1 / 600)
    return out


@dataclass
class Compared:
    fixed60: SimResult
    auto: SimResult
    equal_idle: SimResult
    idle_for_auto_cold: float

    def row(self, name: str) -> str:
        f, a, e = self.fixed60, self.auto, self.equal_idle
        return (
            f"{name:<14} calls {a.calls:5d} | fixed 60 s: {f.cold_starts:4d} cold, "
            f"{f.idle_s / 3600:6.2f} h idle | auto: {a.cold_starts:4d} cold, "
            f"{a.idle_s / 3600:6.2f} h idle | fixed at auto's idle: {e.cold_starts:4d} cold | "
            f"fixed at auto's cold starts: {self.idle_for_auto_cold / 3600:6.2f} h idle"
        )


def compare(times: list[float], duration: float = 2.0) -> Compared:
    horizon = max(times) + 3600
    auto = simulate(times, duration, idle_timeout=60, prewarm="auto", horizon=horizon)
    return Compared(
        simulate(times, duration, idle_timeout=60, horizon=horizon),
        auto,
        fixed_at_idle(times, duration, auto.idle_s, horizon),
        fixed_at_cold_starts(times, duration, auto.cold_starts, horizon),
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("traffic", [periodic, bursty], ids=["periodic", "bursty"])
def test_traffic_prewarm_beats_a_fixed_keep_alive(
    traffic: Callable[[random.Random], list[float]], seed: int
) -> None:
    c = compare(traffic(random.Random(seed)))
    print("\n" + c.row(f"{traffic.__name__}/{seed}"))
    # Against the 60 s default: far fewer cold starts, paid for with more idle time.
    assert c.auto.cold_starts * 10 < c.fixed60.cold_starts
    assert c.auto.idle_s > c.fixed60.idle_s
    # Against the fixed keep-alive spending the same idle time: far fewer cold starts.
    assert c.equal_idle.idle_s <= c.auto.idle_s
    assert c.auto.cold_starts * 10 < c.equal_idle.cold_starts
    # And a fixed keep-alive needs several times the idle time to get as few cold starts.
    assert c.idle_for_auto_cold > 2 * c.auto.idle_s


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_traffic_memoryless_calls_have_nothing_to_predict(seed: int) -> None:
    c = compare(poisson(random.Random(seed)))
    print("\n" + c.row(f"poisson/{seed}"))
    # Fewer cold starts than 60 s, as any long keep-alive gives, and no free lunch: a fixed
    # keep-alive of the same idle time does about as well (not asserted either way).
    assert c.auto.cold_starts < c.fixed60.cold_starts and c.auto.idle_s > c.fixed60.idle_s


def azure_functions() -> list[tuple[str, list[int], float]]:
    """(function hash, calls per minute, average duration in seconds) of the sample."""
    with (AZURE / "run.csv").open() as f:
        durations = {r["HashFunction"]: float(r["Average"]) / 1000 for r in csv.DictReader(f)}
    with (AZURE / "inv.csv").open() as f:
        rows = list(csv.reader(f))[1:]
    return sorted((r[0], [int(x) for x in r[3:]], durations[r[0]]) for r in rows)


def spread(name: str, per_minute: list[int]) -> list[float]:
    """The trace gives counts per minute: calls placed uniformly at random within their minute,
    with an RNG seeded by the function's hash."""
    rng = random.Random(name)
    return [m * 60 + rng.random() * 60 for m, n in enumerate(per_minute) for _ in range(n)]


@pytest.mark.skipif(
    not (AZURE / "inv.csv").exists(),
    reason=f"the Azure Functions 2019 sample is not at {AZURE} (see ../shared/traces/README.md)",
)
def test_traffic_azure_functions_2019_sample() -> None:
    day = 86400.0
    lines, good, fewer, both = [], 0, 0, 0
    total = {"fixed 10 min": [0, 0.0], "auto": [0, 0.0]}
    chosen = [f for f in azure_functions() if 50 <= sum(f[1]) <= 5000]
    for name, per_minute, duration in chosen:
        times = spread(name, per_minute)
        ten = simulate(times, duration, idle_timeout=600, horizon=day)
        auto = simulate(times, duration, idle_timeout=600, prewarm="auto", horizon=day)
        same_idle = fixed_at_idle(times, duration, auto.idle_s, day)
        ok = auto.cold_starts <= same_idle.cold_starts
        good += ok
        fewer += auto.cold_starts <= ten.cold_starts
        both += auto.cold_starts <= ten.cold_starts and auto.idle_s <= ten.idle_s
        for key, r in (("fixed 10 min", ten), ("auto", auto)):
            total[key][0] += r.cold_starts
            total[key][1] += r.idle_s
        lines.append(
            f"{name[:8]} {len(times):5d} calls {duration:7.1f} s | fixed 10 min: "
            f"{ten.cold_starts:3d} cold {ten.idle_s / 3600:6.2f} h idle | auto: "
            f"{auto.cold_starts:3d} cold {auto.idle_s / 3600:6.2f} h idle | fixed at auto's idle: "
            f"{same_idle.cold_starts:3d} cold {'ok' if ok else 'WORSE'}"
        )
    print(
        f"\n{len(chosen)} functions of 50-5000 calls/day, calls spread uniformly in their minute:"
    )
    print("\n".join(lines))
    for key, (cold, idle) in total.items():
        print(f"total {key}: {cold} cold starts, {idle / 3600:.1f} h idle")
    n = len(chosen)
    print(f"auto no worse than the fixed keep-alive of equal idle time: {good}/{n}")
    print(f"auto with no more cold starts than fixed 10 min: {fewer}/{n}")
    print(f"auto with no more cold starts and no more idle time than fixed 10 min: {both}/{n}")
    assert n >= 30
    # Per function, on the trade-off: for most functions no fixed keep-alive spending auto's idle
    # time has fewer cold starts, and auto has no more cold starts than 10 minutes (often by
    # keeping workers longer: it beats 10 minutes on both counts for about a third of them).
    assert good >= 2 / 3 * n
    assert fewer >= 2 / 3 * n
    # In total, fewer than half the cold starts of the paper's 10-minute keep-alive, for no more
    # idle worker time.
    assert total["auto"][0] * 2 < total["fixed 10 min"][0]
    assert total["auto"][1] <= total["fixed 10 min"][1]


# --------------------------------------------------------------------------- the autoscaler floor


def test_worker_floor_joins_schedule_and_prewarming() -> None:
    from ember.core.autoscaler import PoolView, decide
    from ember.core.prewarm import worker_floor
    from ember.core.spec import make_spec

    monday_10 = datetime(2026, 11, 23, 10, 0)
    sunday_10 = datetime(2026, 11, 22, 10, 0)
    office = make_spec(min_workers=2, warm_schedule="* 9-16 * * 1-5").scaling
    assert worker_floor(office, IdleHistogram(), None, 0.0, monday_10) == 2
    assert worker_floor(office, IdleHistogram(), None, 0.0, sunday_10) == 0
    # the floor is what decide() keeps: two workers on a Monday morning, none on Sunday
    empty = PoolView(queued=0, running=0, workers=())
    assert (
        decide(
            empty, office, 0.0, worker_floor(office, IdleHistogram(), None, 0.0, monday_10)
        ).start
        == 2
    )
    assert (
        decide(
            empty, office, 0.0, worker_floor(office, IdleHistogram(), None, 0.0, sunday_10)
        ).start
        == 0
    )

    # calls every 10 minutes: after a call, no worker is wanted until just before the next one
    auto = make_spec(prewarm="auto", idle_timeout=60).scaling
    hist = IdleHistogram().record_all([600.0] * 40)
    assert worker_floor(auto, hist, 0.0, 120.0, monday_10) == 0
    assert worker_floor(auto, hist, 0.0, 590.0, monday_10) == 1
    assert worker_floor(auto, hist, None, 590.0, monday_10) == 0  # never called: no prediction
