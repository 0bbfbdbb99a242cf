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


def group_key(spec: str) -> Callable[[UsageRecord], tuple[str, str]]:
    """`tag:team`, `app`, `function`, `gpu`, `phase` or `policy` -> a function naming a record's
    group."""
    if spec.startswith("tag:") and len(spec) > 4:
        tag = spec[4:]
        return lambda r: (spec, r.tags.get(tag, ""))
    fields: dict[str, Callable[[UsageRecord], str]] = {
        "app": lambda r: r.app,
        "function": lambda r: f"{r.app}/{r.unit}",
        "gpu": lambda r: r.resources.gpu_type or "",
        "phase": lambda r: r.phase.value,
        "policy": lambda r: r.policy or "",
    }
    if spec not in fields:
        raise ValueError(f"group_by {spec!r}: use app, function, gpu, phase, policy or tag:NAME")
    get = fields[spec]
    return lambda r: (spec, get(r))


def summarize(
    records: Iterable[UsageRecord],
    group_by: Iterable[str],
    granularity: str | None,
    prices: PriceTable,
) -> list[dict[str, Any]]:
    """Totals per group (and per hour/day bucket of each record's start)."""
    keys = [group_key(g) for g in ([group_by] if isinstance(group_by, str) else group_by)]
    if granularity is not None and granularity not in GRANULARITY_S:
        raise ValueError(f"granularity {granularity!r}: use hour or day")
    sums: dict[tuple[Any, ...], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for r in records:
        key: list[Any] = [k(r) for k in keys]
        if granularity is not None:
            step = GRANULARITY_S[granularity]
            key.append(("bucket", math.floor(r.start / step) * step))
        s = sums[tuple(key)]
        seconds = r.billed_ms / 1000.0
        gpu_usd = gpu_price(prices, r.resources.gpu_type) * r.resources.gpu_count * seconds
        s["gpu_seconds"] += r.resources.gpu_count * seconds
        s["cpu_seconds"] += r.resources.cpu * seconds
        s["cost_usd"] += r.usd
        s["cold_starts"] += r.starts
        s[f"{r.phase.value}_seconds"] += seconds
        s[f"{r.phase.value}_usd"] += r.usd
        s["gpu_usd"] += gpu_usd
        if r.phase is Phase.IDLE:
            s["idle_gpu_usd"] += gpu_usd
    out = []
    # Keys are (name, str) pairs then, last, ("bucket", int): they compare as they are, so
    # buckets come out in time order (comparing them as strings put 10800 before 7200).
    for gkey, s in sorted(sums.items(), key=lambda kv: kv[0]):
        group: dict[str, Any] = {"key": {k: v for k, v in gkey if k != "bucket"}}
        if granularity is not None:
            group["start"] = dict(gkey)["bucket"]
        idle_base = s["gpu_usd"] if s["gpu_usd"] > 0 else s["cost_usd"]
        idle_part = s["idle_gpu_usd"] if s["gpu_usd"] > 0 else s["idle_usd"]
        group.update(
            {
                "gpu_seconds": round(s["gpu_seconds"], 6),
                "cpu_seconds": round(s["cpu_seconds"], 6),
                "cost_usd": round(s["cost_usd"], 9),
                "cold_starts": int(s["cold_starts"]),
                "busy_seconds": round(s["busy_seconds"], 6),
                "idle_seconds": round(s["idle_seconds"], 6),
                "cold_start_seconds": round(s["cold_start_seconds"], 6),
                "idle_usd": round(s["idle_usd"], 9),
                "idle_fraction": round(idle_part / idle_base, 6) if idle_base > 0 else 0.0,
            }
        )
        out.append(group)
    return out
