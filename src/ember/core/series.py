"""Recent calls over time, in 10 s buckets: counts, latency percentiles, workers by state.

A bucket keeps counts and a uniform sample (a reservoir) of its calls' timings, not every call,
so that recording one costs O(1) however busy a function is, and an hour of buckets stays small.
A percentile is read off one real call of the sample (the call at that rank of `total_ms`), not
term by term: its terms then add up to its total, as a stacked chart shows them.

Pure: the room that holds the buckets (`control/series.py`) passes clocks and randomness in.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

STEP_S = 10
"""The width of a bucket, in seconds of the wall clock."""
WINDOW_S = 3600
"""How far back buckets are kept."""
SAMPLE = 64
"""Calls sampled per bucket (per function)."""
MIN_WINDOW_S = 60
TERMS = ("queue_ms", "cold_start_ms", "load_ms", "exec_ms", "post_ms", "total_ms")
STATES = ("STARTING", "IDLE", "BUSY", "DRAINING")
"""The worker states a series counts (a STOPPED worker is gone)."""
QUANTILES = (("p50", 0.50), ("p95", 0.95), ("p99", 0.99))


BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
"""The upper bounds of the duration histogram's buckets, in seconds (`/metrics`)."""


class BadQuery(ValueError):
    """A series asked for with a window or step out of range; the message says what to use."""


def slot_of(t: float) -> int:
    """The start of the bucket `t` (epoch seconds) falls in."""
    return int(t // STEP_S) * STEP_S


@dataclass(slots=True)
class Bucket:
    start: int
    """Epoch seconds, a multiple of STEP_S."""
    calls: int = 0
    failed: int = 0
    cold_starts: int = 0
    sample: list[dict[str, float]] = field(default_factory=list)
    """Up to SAMPLE calls' timings, each call of the bucket equally likely to be here."""
    seen: int = 0
    """Calls offered to the sample."""
    workers: list[float] = field(default_factory=lambda: [0.0] * len(STATES))
    """Per state (as STATES orders them), the worker counts summed over the samples taken."""

    def add(
        self, timings: dict[str, float] | None, failed: bool, draw: Callable[[], float]
    ) -> None:
        """One ended call; `draw` gives a uniform float in [0, 1) (Algorithm R)."""
        self.calls += 1
        if failed:
            self.failed += 1
        if timings is None:
            return
        if timings.get("cold_start_ms", 0.0) > 0.0:
            self.cold_starts += 1
        self.seen += 1
        if len(self.sample) < SAMPLE:
            self.sample.append(timings)
        else:
            j = int(draw() * self.seen)
            if j < SAMPLE:
                self.sample[j] = timings

    def count(self, states: Iterable[int]) -> None:
        """Add one sample of worker counts, per state index."""
        for i, n in enumerate(states):
            self.workers[i] += n

    def merge_calls(self, other: Bucket) -> None:
        self.calls += other.calls
        self.failed += other.failed
        self.cold_starts += other.cold_starts
        self.sample.extend(other.sample)
        self.seen += other.seen

    def merge_workers(self, other: Bucket) -> None:
        for i, n in enumerate(other.workers):
            self.workers[i] += n


@dataclass(slots=True)
class Durations:
    """Each latency term of every call since start, as a histogram over BUCKETS_S: what a
    Prometheus histogram is (cumulative, never reset), kept as calls end at a few additions
    each, so that a scrape reads it at once instead of going over the jobs in memory."""

    counts: list[list[int]] = field(
        default_factory=lambda: [[0] * (len(BUCKETS_S) + 1) for _ in TERMS]
    )
    """Per term (as TERMS orders them), calls per bucket; the last bucket is above them all."""
    sums_s: list[float] = field(default_factory=lambda: [0.0] * len(TERMS))

    def add(self, timings: Mapping[str, float]) -> None:
        for i, term in enumerate(TERMS):
            seconds = timings.get(term, 0.0) / 1000.0
            self.counts[i][bisect.bisect_left(BUCKETS_S, seconds)] += 1
            self.sums_s[i] += seconds

    def cumulative(self, term: str) -> tuple[list[int], float]:
        """Calls at or under each bound of BUCKETS_S, then all of them; and their sum."""
        i = TERMS.index(term)
        out, n = [], 0
        for count in self.counts[i]:
            n += count
            out.append(n)
        return out, self.sums_s[i]


def check_query(window: int, step: int) -> None:
    """BadQuery unless 60 <= window <= 3600 and step is a multiple of 10 in 10..window/2."""
    if not MIN_WINDOW_S <= window <= WINDOW_S:
        raise BadQuery(
            f"window={window} is out of range: give seconds from {MIN_WINDOW_S} to {WINDOW_S} "
            f"(the last hour is kept)"
        )
    if step % STEP_S != 0 or not STEP_S <= step <= window // 2:
        raise BadQuery(
            f"step={step} is not allowed with window={window}: give a multiple of {STEP_S} "
            f"from {STEP_S} to {window // 2} (half the window)"
        )


def at_rank(sample: list[dict[str, float]], q: float) -> dict[str, float] | None:
    """The terms of the call at rank `q` (0..1, nearest rank) of `total_ms`, or None."""
    if not sample:
        return None
    ranked = sorted(sample, key=lambda t: t.get("total_ms", 0.0))
    i = min(len(ranked) - 1, max(0, math.ceil(q * len(ranked)) - 1))
    call = ranked[i]
    return {term: float(call.get(term, 0.0)) for term in TERMS}


def points(
    buckets: Iterable[Bucket],
    samples: Mapping[int, int],
    now: float,
    window: int,
    step: int,
) -> list[dict[str, Any]]:
    """One point per `step` over the last `window` seconds up to `now`, oldest first, empty
    steps included. `samples`: bucket start -> how many times workers were counted in it (the
    divisor of the buckets' worker sums, shared by every function's bucket of that start)."""
    n = window // step
    last = int(now // step) * step
    first = last - (n - 1) * step
    merged = [Bucket(first + i * step) for i in range(n)]
    for b in buckets:
        i = (b.start - first) // step
        if 0 <= i < n:
            merged[i].merge_calls(b)
            merged[i].merge_workers(b)
    counted = [0] * n
    for start, k in samples.items():
        i = (start - first) // step
        if 0 <= i < n:
            counted[i] += k
    out = []
    for b, k in zip(merged, counted, strict=True):
        point: dict[str, Any] = {
            "t": b.start,
            "calls": b.calls,
            "failed": b.failed,
            "cold_starts": b.cold_starts,
        }
        for name, q in QUANTILES:
            point[name] = at_rank(b.sample, q)
        point["workers"] = {
            s: (round(b.workers[i] / k, 3) if k else 0.0) for i, s in enumerate(STATES)
        }
        out.append(point)
    return out


def totals(series: list[dict[str, Any]]) -> dict[str, int]:
    return {
        "calls": sum(p["calls"] for p in series),
        "failed": sum(p["failed"] for p in series),
        "cold_starts": sum(p["cold_starts"] for p in series),
    }
