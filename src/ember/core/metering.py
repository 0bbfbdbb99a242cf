"""Usage arithmetic: records of a worker's phases, a job's share of cost, and grouping.

A worker's life is cut into contiguous records (`cold_start`, then alternating `idle` and `busy`,
also cut at every checkpoint), so the records of one worker add up exactly to its lifetime.

A job's cost (documented in docs/metering.md): its own execution time, its share of the cold start
it waited through, and the idle time its worker spent waiting for it since its previous job; each
divided by the worker's `concurrency`, since that many jobs share the worker. Idle time after a
worker's last job, or before its first (a `min_workers` worker kept warm), is in the usage totals
but in no job's cost.
"""

from __future__ import annotations

import functools
import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ember.core.pricing import PriceTable, Resources, gpu_price, rate


class Phase(StrEnum):
    COLD_START = "cold_start"
    BUSY = "busy"
    IDLE = "idle"


@dataclass(frozen=True)
class UsageRecord:
    worker: str
    app: str
    unit: str
    version: int
    phase: Phase
    start: float
    """Epoch seconds."""
    end: float
    billed_ms: float
    resources: Resources
    usd: float
    tags: Mapping[str, str] = field(default_factory=dict)
    starts: int = 0
    """1 on the record that begins a worker's life: counts cold starts."""
    workspace: str = "default"
    policy: str | None = None
    """The usage policy whose calls the worker served: its budget pays for the record."""

    @property
    def ms(self) -> float:
        return (self.end - self.start) * 1000.0


def make_record(
    *,
    worker: str,
    app: str,
    unit: str,
    version: int,
    phase: Phase,
    start: float,
    end: float,
    resources: Resources,
    prices: PriceTable,
    tags: Mapping[str, str],
    starts: int = 0,
    extra_billed_ms: float = 0.0,
    workspace: str = "default",
    policy: str | None = None,
) -> UsageRecord:
    billed = round(max(0.0, (end - start) * 1000.0) + extra_billed_ms, 3)
    return UsageRecord(
        worker,
        app,
        unit,
        version,
        phase,
        start,
        end,
        billed,
        resources,
        rate(resources, prices) * billed / 1000.0,
        dict(tags),
        starts,
        workspace,
        policy,
    )


@dataclass(frozen=True)
class Cost:
    usd: float
    gpu_seconds: float
    cpu_seconds: float

    def to_dict(self) -> dict[str, float]:
        return {
            "usd": round(self.usd, 9),
            "gpu_seconds": round(self.gpu_seconds, 6),
            "cpu_seconds": round(self.cpu_seconds, 6),
        }


def job_cost(
    *,
    exec_ms: float,
    cold_start_ms: float,
    idle_before_ms: float,
    concurrency: int,
    resources: Resources,
    prices: PriceTable,
) -> Cost:
    seconds = (exec_ms + cold_start_ms + idle_before_ms) / 1000.0 / max(1, concurrency)
    return Cost(
        usd=rate(resources, prices) * seconds,
        gpu_seconds=resources.gpu_count * seconds,
        cpu_seconds=resources.cpu * seconds,
    )


GRANULARITY_S = {"hour": 3600, "day": 86400}
PICO = 10**12
"""Money in rollups is counted in integer pico-dollars, time in integer billed microseconds:
integer sums are exact in any order, so totals from rollups equal totals from raw records."""


def to_int(x: float) -> int:
    """`x` rounded to the nearest integer, halves away from zero: SQLite's ROUND, and the store
    computes these sums in SQL (`control.meter.fold_usage`), so both must round alike."""
    return int(x + 0.5) if x >= 0 else -int(-x + 0.5)


def pico(usd: float) -> int:
    return to_int(usd * PICO)


def micros(billed_ms: float) -> int:
    return to_int(billed_ms * 1000)


def bucket_of(t: float, step: int) -> int:
    """The start of the `step`-second bucket holding `t`: `bucket <= t < bucket + step` holds in
    float comparisons too (`floor(t / step)` alone can round up across an edge)."""
    b = math.floor(t / step) * step
    if b > t:
        b -= step
    elif b + step <= t:
        b += step
    return b


def canonical_tags(tags: Mapping[str, str]) -> str:
    """Tags as one string, equal for equal tags whatever their order."""
    return _canonical(tuple(sorted(tags.items())))


@functools.lru_cache(maxsize=4096)
def _canonical(items: tuple[tuple[str, str], ...]) -> str:
    # A few distinct tag sets among very many records: each is written once.
    return json.dumps(dict(items), separators=(",", ":"))


@dataclass(frozen=True, slots=True, order=True)
class Shape:
    """Everything a usage group or a figure derived from it depends on: a rollup's key besides
    its workspace and bucket. No None in it (`""` for no GPU, no policy), so it sorts."""

    app: str
    unit: str
    phase: str
    gpu_type: str
    gpu_count: float
    cpu: float
    policy: str
    tags: str
    """`canonical_tags`"""


@dataclass(slots=True)
class Totals:
    """Sums over usage records of one shape: integers, so adding is exact and order-free."""

    billed_us: int = 0
    usd_pico: int = 0
    starts: int = 0
    records: int = 0
    longest_s: float = 0.0
    """The longest record's length: how far before a window's start a record can begin and
    still overlap it."""

    def add(self, other: Totals) -> None:
        self.billed_us += other.billed_us
        self.usd_pico += other.usd_pico
        self.starts += other.starts
        self.records += other.records
        self.longest_s = max(self.longest_s, other.longest_s)


def make_shape(
    app: str,
    unit: str,
    phase: str,
    gpu_type: str | None,
    gpu_count: float,
    cpu: float,
    policy: str | None,
    tags: str,
) -> Shape:
    """`tags`: `canonical_tags` of the record's tags."""
    return Shape(app, unit, phase, gpu_type or "", float(gpu_count), float(cpu), policy or "", tags)


def make_totals(billed_ms: float, usd: float, starts: int, start: float, end: float) -> Totals:
    """The totals of one record."""
    return Totals(micros(billed_ms), pico(usd), starts, 1, max(0.0, end - start))


def shape_of(r: UsageRecord) -> Shape:
    res = r.resources
    return make_shape(
        r.app,
        r.unit,
        r.phase.value,
        res.gpu_type,
        res.gpu_count,
        res.cpu,
        r.policy,
        canonical_tags(r.tags),
    )


def totals_of(r: UsageRecord) -> Totals:
    return make_totals(r.billed_ms, r.usd, r.starts, r.start, r.end)


def group_key(spec: str) -> Callable[[UsageRecord], tuple[str, str]]:
    """`tag:team`, `app`, `function`, `gpu`, `phase` or `policy` -> a function naming a record's
    group."""
    of_shape = shape_key(spec)
    return lambda r: of_shape(shape_of(r))


def shape_key(spec: str) -> Callable[[Shape], tuple[str, str]]:
    """Like `group_key`, over a shape."""
    if spec.startswith("tag:") and len(spec) > 4:
        tag = spec[4:]
        parsed: dict[str, dict[str, str]] = {}

        def by_tag(s: Shape) -> tuple[str, str]:
            tags = parsed.get(s.tags)
            if tags is None:
                tags = parsed[s.tags] = json.loads(s.tags)
            return (spec, tags.get(tag, ""))

        return by_tag
    fields: dict[str, Callable[[Shape], str]] = {
        "app": lambda s: s.app,
        "function": lambda s: f"{s.app}/{s.unit}",
        "gpu": lambda s: s.gpu_type,
        "phase": lambda s: s.phase,
        "policy": lambda s: s.policy,
    }
    if spec not in fields:
        raise ValueError(f"group_by {spec!r}: use app, function, gpu, phase, policy or tag:NAME")
    get = fields[spec]
    return lambda s: (spec, get(s))


def check_query(group_by: Iterable[str] | str, granularity: str | None) -> list[str]:
    """The group names, or ValueError saying what to fix."""
    names = [group_by] if isinstance(group_by, str) else list(group_by)
    for g in names:
        shape_key(g)
    if granularity is not None and granularity not in GRANULARITY_S:
        raise ValueError(f"granularity {granularity!r}: use hour or day")
    return names


def shape_fields(group_by: Iterable[str]) -> frozenset[str]:
    """The fields of a shape that a query grouped by `group_by` needs: those its groups name,
    and those every figure needs (phase, GPU type and count, CPU)."""
    need = {"phase", "gpu_type", "gpu_count", "cpu"}
    for g in group_by:
        if g == "app":
            need.add("app")
        elif g == "function":
            need |= {"app", "unit"}
        elif g == "policy":
            need.add("policy")
        elif g.startswith("tag:"):
            need.add("tags")
    return frozenset(need)


class Projection:
    """A shape cut down to what a query needs (`shape_fields`; of the tags, only those it groups
    by): shapes that differ only elsewhere sum into one, exactly, whichever way they came."""

    def __init__(self, group_by: Iterable[str]) -> None:
        names = list(group_by)
        self.fields = shape_fields(names)
        self.tags = sorted({g[4:] for g in names if g.startswith("tag:")})
        self._seen: dict[Shape, Shape] = {}

    def __call__(self, s: Shape) -> Shape:
        got = self._seen.get(s)
        if got is None:
            f = self.fields
            tags = ""
            if self.tags:
                parsed = json.loads(s.tags) if s.tags else {}
                tags = canonical_tags({k: parsed[k] for k in self.tags if k in parsed})
            got = self._seen[s] = Shape(
                s.app if "app" in f else "",
                s.unit if "unit" in f else "",
                s.phase,
                s.gpu_type,
                s.gpu_count,
                s.cpu,
                s.policy if "policy" in f else "",
                tags,
            )
        return got


def summarize(
    records: Iterable[UsageRecord],
    group_by: Iterable[str] | str,
    granularity: str | None,
    prices: PriceTable,
) -> list[dict[str, Any]]:
    """Totals per group (and per hour/day bucket of each record's start)."""
    return summarize_cells(
        ((r.start, shape_of(r), totals_of(r)) for r in records), group_by, granularity, prices
    )


def summarize_cells(
    cells: Iterable[tuple[float, Shape, Totals]],
    group_by: Iterable[str] | str,
    granularity: str | None,
    prices: PriceTable,
) -> list[dict[str, Any]]:
    """Totals per group (and bucket) over (time, shape, totals) cells: raw records (their start)
    or rollup rows (their bucket, no longer than `granularity`'s). Cells are first summed exactly
    per bucket and shape (cut down to the fields the query needs: `Projection`), then turned into
    figures in shape order: the same usage gives the same answer to the last bit, however it was
    split into cells."""
    wanted = check_query(group_by, granularity)
    keys = [shape_key(g) for g in wanted]
    project = Projection(wanted)
    step = GRANULARITY_S[granularity] if granularity is not None else None
    merged: dict[tuple[int | None, Shape], Totals] = {}
    for t, shape, totals in cells:
        key = (None if step is None else bucket_of(t, step), project(shape))
        cell = merged.get(key)
        if cell is None:
            merged[key] = cell = Totals()
        cell.add(totals)
    groups: dict[tuple[Any, ...], list[tuple[Shape, Totals]]] = defaultdict(list)
    for (bucket, shape), totals in merged.items():
        if totals.records == 0:  # taken back out entirely (`core.rollup.Plan.zero_at`)
            continue
        names: list[Any] = [k(shape) for k in keys]
        if bucket is not None:
            names.append(("bucket", bucket))
        groups[tuple(names)].append((shape, totals))
    out = []
    # Keys are (name, str) pairs then, last, ("bucket", int): they compare as they are, so
    # buckets come out in time order (comparing them as strings put 10800 before 7200).
    for gkey, members in sorted(groups.items(), key=lambda kv: kv[0]):
        group: dict[str, Any] = {"key": {k: v for k, v in gkey if k != "bucket"}}
        if step is not None:
            group["start"] = dict(gkey)["bucket"]
        group.update(_figures(sorted(members, key=lambda m: m[0]), prices))
        out.append(group)
    return out


def _figures(members: list[tuple[Shape, Totals]], prices: PriceTable) -> dict[str, Any]:
    gpu_seconds = cpu_seconds = gpu_usd = idle_gpu_usd = 0.0
    usd = starts = 0
    phase_us: dict[str, int] = defaultdict(int)
    phase_usd: dict[str, int] = defaultdict(int)
    for s, t in members:
        seconds = t.billed_us / 1e6
        gpu_seconds += s.gpu_count * seconds
        cpu_seconds += s.cpu * seconds
        usd += t.usd_pico
        starts += t.starts
        phase_us[s.phase] += t.billed_us
        phase_usd[s.phase] += t.usd_pico
        money = gpu_price(prices, s.gpu_type) * s.gpu_count * seconds
        gpu_usd += money
        if s.phase == Phase.IDLE.value:
            idle_gpu_usd += money
    cost_usd = usd / PICO
    idle_usd = phase_usd[Phase.IDLE.value] / PICO
    idle_base = gpu_usd if gpu_usd > 0 else cost_usd
    idle_part = idle_gpu_usd if gpu_usd > 0 else idle_usd
    return {
        "gpu_seconds": round(gpu_seconds, 6),
        "cpu_seconds": round(cpu_seconds, 6),
        "cost_usd": round(cost_usd, 9),
        "cold_starts": starts,
        "busy_seconds": round(phase_us[Phase.BUSY.value] / 1e6, 6),
        "idle_seconds": round(phase_us[Phase.IDLE.value] / 1e6, 6),
        "cold_start_seconds": round(phase_us[Phase.COLD_START.value] / 1e6, 6),
        "idle_usd": round(idle_usd, 9),
        "idle_fraction": round(idle_part / idle_base, 6) if idle_base > 0 else 0.0,
    }
