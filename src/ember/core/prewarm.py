"""Predictive pre-warming (`prewarm="auto"`) and warm schedules (`warm_schedule`), as pure policy.

Pre-warming is the hybrid histogram policy of "Serverless in the Wild" (Shahrad et al., USENIX
ATC 2020). Per function, an `IdleHistogram` counts the idle times between calls (the time from the
end of the last call to the start of the next, recorded only when no call was in flight) in 1-minute
bins up to a range of 4 hours; longer idle times are counted apart, as out of range. After each
call, `window` says when a warm worker should exist, relative to the end of that call:

- histogram representative (at least `min_samples` idle times, and the coefficient of variation
  of the bin counts at least `cv`, i.e. a few bins hold most of the mass): the worker is released
  at once and pre-warmed at `head * (1 - margin)`, then kept until `tail * (1 + margin)`, where
  head is the start of the bin holding the 5th percentile of the idle times and tail the end of
  the bin holding the 99th. When head is 0 the worker is simply kept from the end of the call.
- not representative (too few idle times, or spread thin over many bins): a fixed keep-alive of
  the function's `idle_timeout`, as without pre-warming.
- mostly out of range (at least `out_of_range` of the idle times beyond the histogram): the paper
  forecasts the next idle time with ARIMA; ember does not, and uses the fixed keep-alive here too.
  The window says which case it is (`Mode.OUT_OF_RANGE`), so a later ARIMA branch can slot in.

A warm schedule is a cron expression (minute hour day-of-month month day-of-week, see cron.py)
naming the minutes in which `min_workers` are kept; outside them the floor is 0. `in_schedule`
evaluates it on the wall-clock fields of the datetime it is given: the caller picks the timezone.

Everything here is a function of its arguments: no I/O, no clock reads, no globals.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from functools import cached_property
from itertools import accumulate
from operator import mul

from ember.core.cron import Cron, in_schedule
from ember.core.cron import parse_cron as parse_cron  # re-exported: it lived here before cron.py
from ember.core.spec import ScalingSpec

BIN_S = 60.0
"""Width of a histogram bin: one minute, as in the paper."""
BINS = 240
"""Number of bins: 240 one-minute bins make the paper's 4-hour range."""
HEAD = 0.05
"""Percentile of the idle times before which no worker is kept (the head)."""
TAIL = 0.99
"""Percentile of the idle times up to which a worker is kept (the tail)."""
MARGIN = 0.1
"""Pre-warm 10% earlier than the head and keep 10% longer than the tail."""


class Mode(StrEnum):
    HISTOGRAM = "histogram"
    """Representative histogram: release, pre-warm at the head, keep until the tail."""
    FIXED = "fixed"
    """Not (yet) representative: fixed keep-alive of `idle_timeout` after each call."""
    OUT_OF_RANGE = "out_of_range"
    """Most idle times exceed the histogram's range: fixed keep-alive (the paper uses ARIMA)."""


@dataclass(frozen=True)
class Thresholds:
    """When a histogram is trusted; the defaults are the paper's, plus a minimum sample count."""

    min_samples: int = 10
    """Idle times (in range or not) needed before the histogram is considered at all."""
    cv: float = 2.0
    """Least coefficient of variation of the bin counts for the histogram to be representative."""
    out_of_range: float = 0.5
    """Fraction of out-of-range idle times from which the histogram is not used."""
    bursts: bool = True
    """Hold through the first bin and pre-warm for the longer idle times when the head falls in
    the first bin (ember's addition; False is the paper's single window)."""

    def __post_init__(self) -> None:
        if self.min_samples < 1:
            raise ValueError(f"min_samples must be >= 1, got {self.min_samples}")
        if not (math.isfinite(self.cv) and self.cv >= 0):
            raise ValueError(f"cv must be a finite number >= 0, got {self.cv}")
        if not 0 < self.out_of_range <= 1:
            raise ValueError(f"out_of_range must be in (0, 1], got {self.out_of_range}")


@dataclass(frozen=True)
class IdleHistogram:
    """Counts of idle times per bin of `bin_s` seconds, `bins` of them; longer ones apart.

    Immutable: `record` returns a new histogram. `counts=()` means all bins empty.
    """

    counts: tuple[int, ...] = ()
    out_of_range: int = 0
    bin_s: float = BIN_S
    bins: int = BINS

    def __post_init__(self) -> None:
        if not (math.isfinite(self.bin_s) and self.bin_s > 0):
            raise ValueError(f"bin_s must be a positive number of seconds, got {self.bin_s}")
        if self.bins < 1:
            raise ValueError(f"bins must be >= 1, got {self.bins}")
        if not self.counts:
            object.__setattr__(self, "counts", (0,) * self.bins)
        elif len(self.counts) != self.bins:
            raise ValueError(f"counts has {len(self.counts)} bins, expected {self.bins}")
        if self.out_of_range < 0 or min(self.counts) < 0:
            raise ValueError("counts must not be negative")

    @property
    def range_s(self) -> float:
        """Idle times from this many seconds on are out of range."""
        return self.bin_s * self.bins

    def record(self, idle_s: float) -> IdleHistogram:
        """This histogram with one more idle time of `idle_s` seconds."""
        if not (math.isfinite(idle_s) and idle_s >= 0):
            raise ValueError(f"an idle time must be a finite number of seconds >= 0, got {idle_s}")
        i = int(idle_s // self.bin_s)
        if i >= self.bins:
            return replace(self, out_of_range=self.out_of_range + 1)
        counts = self.counts
        return replace(self, counts=(*counts[:i], counts[i] + 1, *counts[i + 1 :]))

    def record_all(self, idle_s: Iterable[float]) -> IdleHistogram:
        h = self
        for s in idle_s:
            h = h.record(s)
        return h

    @cached_property
    def cumulative(self) -> tuple[int, ...]:
        """Running totals of the bin counts."""
        return tuple(accumulate(self.counts))

    @property
    def in_range(self) -> int:
        """Idle times counted in the bins."""
        return self.cumulative[-1]

    @property
    def samples(self) -> int:
        """All idle times recorded, in range or not."""
        return self.in_range + self.out_of_range

    @property
    def out_of_range_fraction(self) -> float:
        return self.out_of_range / self.samples if self.samples else 0.0

    @cached_property
    def cv(self) -> float:
        """Coefficient of variation (population std / mean) of the bin counts; 0 when empty.

        High when a few bins hold the idle times (a predictable function), about 0 when they are
        spread evenly: at most sqrt(bins - 1), reached with every idle time in one bin.
        """
        n = self.in_range
        if n == 0:
            return 0.0
        mean = n / self.bins
        var = sum(map(mul, self.counts, self.counts)) / self.bins - mean * mean
        return math.sqrt(max(var, 0.0)) / mean

    def percentile_bin(self, p: float, start: int = 0) -> int:
        """Index of the bin holding the `p` quantile (0 < p <= 1) of the in-range idle times,
        counting only the bins from `start` on."""
        if not 0 < p <= 1:
            raise ValueError(f"p must be in (0, 1], got {p}")
        cum = self.cumulative
        before = cum[start - 1] if start > 0 else 0
        if cum[-1] == before:
            raise ValueError("the histogram holds no in-range idle time there")
        return bisect_left(cum, before + p * (cum[-1] - before), lo=start)

    def head_s(self, p: float = HEAD, start: int = 0) -> float:
        """Start of the bin holding the `p` quantile: no call is expected before it."""
        return self.percentile_bin(p, start) * self.bin_s

    def tail_s(self, p: float = TAIL) -> float:
        """End of the bin holding the `p` quantile: calls are expected before it."""
        return (self.percentile_bin(p) + 1) * self.bin_s


@dataclass(frozen=True)
class Window:
    """When a warm worker should exist, in seconds after the end of the last call.

    A worker is wanted while `idle < hold_s` (kept through a burst) or while
    `prewarm_at_s <= idle < keep_until_s`. With `prewarm_at_s == 0` it is simply kept from the end
    of the call; otherwise it is released (after `hold_s`) and started again at `prewarm_at_s`.
    """

    prewarm_at_s: float
    keep_until_s: float
    mode: Mode = Mode.FIXED
    hold_s: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.prewarm_at_s <= self.keep_until_s:
            raise ValueError(
                f"a window needs 0 <= prewarm_at_s <= keep_until_s, "
                f"got {self.prewarm_at_s} and {self.keep_until_s}"
            )
        if not 0 <= self.hold_s <= self.prewarm_at_s or (self.hold_s and not self.prewarm_at_s):
            raise ValueError(
                f"a window needs 0 <= hold_s <= prewarm_at_s, got {self.hold_s} and "
                f"{self.prewarm_at_s}"
            )

    def wants(self, idle_s: float) -> bool:
        """Whether a warm worker should exist `idle_s` seconds after the last call ended."""
        idle = max(idle_s, 0.0)
        return idle < self.hold_s or self.prewarm_at_s <= idle < self.keep_until_s

    def warm_s(self, idle_s: float) -> float:
        """Seconds a worker is warm and unused in an idle gap of `idle_s` seconds."""
        idle = max(idle_s, 0.0)
        held = min(idle, self.hold_s)
        return held + max(0.0, min(idle, self.keep_until_s) - self.prewarm_at_s)


def fixed_window(idle_timeout: float, mode: Mode = Mode.FIXED) -> Window:
    """The plain keep-alive: a worker stays for `idle_timeout` seconds after each call."""
    return Window(0.0, idle_timeout, mode)


def classify(hist: IdleHistogram, thresholds: Thresholds = Thresholds()) -> Mode:
    """Which branch of the hybrid policy the histogram is in."""
    if hist.samples < thresholds.min_samples:
        return Mode.FIXED
    if hist.out_of_range_fraction >= thresholds.out_of_range:
        return Mode.OUT_OF_RANGE
    if hist.cv < thresholds.cv:
        return Mode.FIXED
    return Mode.HISTOGRAM


def window(
    hist: IdleHistogram,
    idle_timeout: float,
    margin: float = MARGIN,
    thresholds: Thresholds = Thresholds(),
) -> Window:
    """The hybrid policy: when a warm worker should exist after a call (see the module doc)."""
    if not 0 <= margin < 1:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    if not (math.isfinite(idle_timeout) and idle_timeout >= 0):
        raise ValueError(f"idle_timeout must be a finite number >= 0, got {idle_timeout}")
    mode = classify(hist, thresholds)
    if mode is not Mode.HISTOGRAM:
        return fixed_window(idle_timeout, mode)
    keep_until = hist.tail_s() * (1 + margin)
    head = hist.head_s()
    if head == 0 and thresholds.bursts and hist.in_range > hist.counts[0]:
        # Short idle times (calls in bursts) put the head in the first bin, which would keep the
        # worker through every long gap too: hold it through the first bin only, and pre-warm
        # for the head of the longer idle times.
        hold = hist.bin_s * (1 + margin)
        prewarm_at = hist.head_s(start=1) * (1 - margin)
        if hold < prewarm_at < keep_until:
            return Window(prewarm_at, keep_until, Mode.HISTOGRAM, hold_s=hold)
    return Window(head * (1 - margin), keep_until, Mode.HISTOGRAM)


def wants_worker(
    hist: IdleHistogram,
    last_call_end: float | None,
    now: float,
    idle_timeout: float,
    margin: float = MARGIN,
    thresholds: Thresholds = Thresholds(),
) -> bool:
    """Should a warm worker exist at `now`, the last call having ended at `last_call_end`?

    For the autoscaler's floor with `prewarm="auto"`: while this holds, keep (or pre-warm) one
    worker even with no work. Never called yet (`last_call_end` None): no.
    """
    if last_call_end is None:
        return False
    return window(hist, idle_timeout, margin, thresholds).wants(now - last_call_end)


def next_change(
    hist: IdleHistogram,
    last_call_end: float | None,
    now: float,
    idle_timeout: float,
    margin: float = MARGIN,
    thresholds: Thresholds = Thresholds(),
) -> float | None:
    """When `wants_worker` next changes its answer (pre-warm or release), so the shell can sleep
    until then; None when it will not change before another call."""
    if last_call_end is None:
        return None
    w = window(hist, idle_timeout, margin, thresholds)
    idle = max(now - last_call_end, 0.0)
    if idle < w.prewarm_at_s:
        return last_call_end + w.prewarm_at_s
    if idle < w.keep_until_s:
        return last_call_end + w.keep_until_s
    return None


# ----------------------------------------------------------------------------- warm schedules
def scheduled_min_workers(min_workers: int, warm_schedule: str | Cron | None, t: datetime) -> int:
    """The floor of workers at `t`: `min_workers`, or 0 outside the warm schedule when one is set."""
    if warm_schedule is None or in_schedule(warm_schedule, t):
        return min_workers
    return 0


def worker_floor(
    spec: ScalingSpec,
    hist: IdleHistogram,
    last_call_end: float | None,
    now: float,
    local_time: datetime,
) -> int:
    """The fewest workers to keep now: `min_workers` (inside its warm schedule, if any), and one
    warm worker while pre-warming predicts a call (`prewarm="auto"`). The autoscaler's floor."""
    floor = scheduled_min_workers(spec.min_workers, spec.warm_schedule, local_time)
    if spec.prewarm == "auto" and wants_worker(hist, last_call_end, now, spec.idle_timeout):
        floor = max(floor, 1)
    return floor
