"""Replay call times through a keep-alive policy: how many cold starts, how much idle worker time.

The model is the paper's ("Serverless in the Wild", Shahrad et al. 2020): one function, one worker
that is either warm or not. A call that finds no warm worker is a cold start (the worker is ready
at once: the counts are events, not latency). A call that arrives while earlier calls are still
running shares the worker at once (calls never queue, as with a large `concurrency`). When the last
call in flight ends, the policy picks a `Window` from what it knows then, and the worker is warm
and unused for `window.warm_s(gap)` seconds of the gap before the next call.

An idle time is recorded in the histogram only when no call was in flight (the gap between the end
of a busy period and the next call), which is what the server can observe for one function.
Pure: no I/O, no clock reads.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from ember.core.prewarm import (
    MARGIN,
    IdleHistogram,
    Mode,
    Thresholds,
    Window,
    fixed_window,
    window,
)


@dataclass(frozen=True)
class SimResult:
    calls: int
    cold_starts: int
    """Calls that found no warm worker."""
    prewarms: int
    """Workers started ahead of a call by the policy (used or not)."""
    idle_s: float
    """Worker-seconds warm but running no call: the waste a keep-alive policy trades for hits."""
    busy_s: float
    """Worker-seconds running at least one call."""
    histogram_windows: int = 0
    """Idle gaps for which the histogram was representative (prewarm="auto" only)."""

    @property
    def cold_start_rate(self) -> float:
        return self.cold_starts / self.calls if self.calls else 0.0


def simulate(
    call_times: Iterable[float],
    duration_s: float,
    *,
    idle_timeout: float = 60.0,
    prewarm: str | None = None,
    margin: float = MARGIN,
    thresholds: Thresholds = Thresholds(),
    horizon: float | None = None,
    histogram: IdleHistogram | None = None,
) -> SimResult:
    """Replay `call_times` (seconds, any order), each call running `duration_s` seconds.

    `prewarm=None` keeps the worker `idle_timeout` seconds after each call; `prewarm="auto"` uses
    the hybrid histogram policy (falling back to `idle_timeout`), learning from an empty histogram
    (or from `histogram`). Idle time after the last call counts until `horizon` when given (the end
    of the trace), else for the whole last window.
    """
    if prewarm not in (None, "auto"):
        raise ValueError(f"prewarm must be None or 'auto', got {prewarm!r}")
    if not (math.isfinite(duration_s) and duration_s >= 0):
        raise ValueError(f"duration_s must be a finite number >= 0, got {duration_s}")
    times = sorted(call_times)
    if times and not (math.isfinite(times[0]) and math.isfinite(times[-1])):
        raise ValueError("call times must be finite")
    hist = histogram if histogram is not None else IdleHistogram()
    fixed = fixed_window(idle_timeout)

    def policy() -> Window:
        return window(hist, idle_timeout, margin, thresholds) if prewarm else fixed

    cold = prewarms = in_histogram = 0
    idle = busy = 0.0
    busy_until: float | None = None
    for t in times:
        if busy_until is None:
            cold += 1
        elif t > busy_until:
            gap = t - busy_until
            w = policy()
            in_histogram += w.mode is Mode.HISTOGRAM
            if not w.wants(gap):
                cold += 1
            if w.prewarm_at_s > 0 and gap >= w.prewarm_at_s:
                prewarms += 1
            idle += w.warm_s(gap)
            if prewarm:
                hist = hist.record(gap)
        end = t + duration_s
        start = t if busy_until is None else max(t, busy_until)
        busy += max(0.0, end - start)
        busy_until = end if busy_until is None else max(busy_until, end)
    if busy_until is not None:
        w = policy()
        gap = math.inf if horizon is None else max(0.0, horizon - busy_until)
        if w.prewarm_at_s > 0 and gap >= w.prewarm_at_s:
            prewarms += 1
        idle += w.warm_s(gap)
    return SimResult(len(times), cold, prewarms, idle, busy, in_histogram)
