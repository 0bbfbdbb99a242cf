"""Which parts of a usage query the rollups answer, and which only raw records can.

The store keeps, beside the raw usage records, their sums per workspace, shape
(`core.metering.Shape`) and hour, and per day (`core.metering.Totals`, exact integers). A query
over `[since, until)` counts every record that overlaps the window, in the bucket of its start.
An hour (or day) that lies wholly inside the window holds only records that count: its rollup
row stands for them. Only the records starting in the partial hours at either edge, or shortly
before `since` (no earlier than the longest record), are read raw. A query costs a few hundred
rollup rows and at most two hours of raw records, however long the history.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

HOUR = 3600
DAY = 86400
SPANS = {"hour": HOUR, "day": DAY}
MARGIN_S = 1.0
"""Raw records are read from this much more than the longest record before `since`: float
differences of start and end are exact only to a few ulps."""

Range = tuple[float, float]
"""[lo, hi); an infinite end is no bound."""


@dataclass(frozen=True)
class Plan:
    days: Range | None
    """Day buckets read from the day rollup."""
    hours: tuple[Range, ...]
    """Hour buckets read from the hour rollup."""
    raw: tuple[Range, ...]
    """Ranges of record starts read raw, each also under the window's own test (end > since,
    start < until)."""
    zero_at: float | None
    """A whole bucket begins exactly at `since`: records of no length starting (and ending)
    there are in its rollup but outside the window, so they are taken back out."""


def _up(t: float, step: int) -> float:
    return float(math.ceil(t / step) * step)


def _down(t: float, step: int) -> float:
    return float(math.floor(t / step) * step)


def plan(
    since: float | None, until: float | None, granularity: str | None, longest_s: float
) -> Plan:
    """Split the window `[since, until)` (None: unbounded) into rollup buckets and raw edges.

    `longest_s` is the longest record's length (rollups keep it). Records never end before they
    start (the meter cuts at `max(now, start)`): that is what makes a whole bucket's records all
    overlap the window."""
    lo = -math.inf if since is None else since
    hi = math.inf if until is None else until
    h0 = lo if math.isinf(lo) else _up(lo, HOUR)
    h1 = hi if math.isinf(hi) else _down(hi, HOUR)
    if not h0 < h1:
        edge = lo if math.isinf(lo) else lo - longest_s - MARGIN_S
        # Even an empty or backwards window counts the records that span it: raw ones only.
        return Plan(None, (), ((edge, hi),), None)
    days: Range | None = None
    hours: tuple[Range, ...] = ((h0, h1),)
    if granularity != "hour":
        d0 = h0 if math.isinf(h0) else _up(h0, DAY)
        d1 = h1 if math.isinf(h1) else _down(h1, DAY)
        if d0 < d1:
            days = (d0, d1)
            hours = tuple(r for r in ((h0, d0), (d1, h1)) if r[0] < r[1])
    raw: list[Range] = []
    if not math.isinf(lo):
        raw.append((lo - longest_s - MARGIN_S, h0))
    if not math.isinf(hi) and h1 < hi:
        raw.append((h1, hi))
    return Plan(days, hours, tuple(raw), lo if h0 == lo else None)
