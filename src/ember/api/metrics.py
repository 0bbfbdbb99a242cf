"""`GET /metrics`: the server's state in Prometheus' text format, for the server's operator.

Nothing is counted for metrics alone as calls run: each scrape reads what the control plane
already keeps (job counts per function and status, the jobs in flight, the duration histogram
the series room adds each ended call to, the workers, the policies' spend) and asks the usage
rollups, as stored at the last checkpoint (a second ago), for GPU seconds, cost and cold starts,
then renders it all with prometheus-client. A scrape does not wait for the store's writer.

The operator scrapes it with the default workspace's admin token; `--metrics-port` also
serves the same text, without a token, on 127.0.0.1 only (`listen`).

Label cardinality is bounded: a family keeps at most `CAP` label sets, the largest values, and
sums the rest into one set whose labels read `_other` (docs/metrics.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ember.api.auth import Auth, Scope
from ember.api.bodies import plane
from ember.api.errors import ApiException
from ember.control.plane import ControlPlane
from ember.core.jobs import JobStatus
from ember.core.series import BUCKETS_S, Durations

router = APIRouter()

CAP = 200
"""The most label sets one metric family shows; the rest are summed under `_other`."""
OTHER = "_other"
TAG_KEYS = 20
"""The most tag names usage is broken down by (the first, in name order)."""
TERMS = ("queue", "cold_start", "load", "exec", "post", "total")
TERMINAL = tuple(s.value for s in JobStatus if s.terminal)

Values = Mapping[tuple[str, ...], float]


def capped(
    values: Values, labels: Sequence[str], keep: Sequence[str] = (), cap: int = CAP
) -> list[tuple[tuple[str, ...], float]]:
    """At most `cap` label sets, the largest values first chosen; the others summed into sets
    whose labels are `_other`, but those named in `keep` (a status, a state: few values)."""
    ranked = sorted(values.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = dict(ranked[:cap])
    kept = [labels.index(name) for name in keep]
    for key, value in ranked[cap:]:
        folded = tuple(key[i] if i in kept else OTHER for i in range(len(labels)))
        shown[folded] = shown.get(folded, 0.0) + value
    return sorted(shown.items())


def _family(
    kind: type[CounterMetricFamily] | type[GaugeMetricFamily],
    name: str,
    doc: str,
    labels: Sequence[str],
    values: Values,
    keep: Sequence[str] = (),
) -> Metric:
    family = kind(name, doc, labels=list(labels))
    for key, value in capped(values, labels, keep):
        family.add_metric(list(key), value)
    return family


def _histogram(durations: Durations) -> Metric:
    family = HistogramMetricFamily(
        "ember_job_duration_seconds",
        "Latency terms of the jobs ended since this server started",
        labels=["term"],
    )
    for term in TERMS:
        counts, total = durations.cumulative(f"{term}_ms")
        bounds = [*(repr(b) for b in BUCKETS_S), "+Inf"]
        buckets = [(b, float(n)) for b, n in zip(bounds, counts, strict=True)]
        family.add_metric([term], buckets, sum_value=total)
    return family


def _split(function: str) -> tuple[str, str]:
    app, _, fn = function.partition("/")
    return app, fn


def _tag_names(cp: ControlPlane) -> list[str]:
    """The tag names usage can carry: a job's and a worker's tags are its app's, its
    function's and its policy's (`JobOps.submit`), so these are all of them, read without
    going over the jobs in memory."""
    names: set[str] = set()
    for app in cp.deployments.apps.values():
        names.update(app.tags)
        for meta in app.functions.values():
            names.update(meta.spec.tags)
    for rules in list(cp.governance.policies.policies.values()):
        names.update(rules.tags or {})
    for w in cp.workers.live():  # those of a version since replaced
        names.update(w.tags)
    return sorted(names)[:TAG_KEYS]


async def families(cp: ControlPlane) -> list[Metric]:
    """Every metric family, read now: the state of memory first (no await in between), then
    the usage rollups."""
    jobs = list(cp.jobs.jobs.values())
    ended: dict[tuple[str, ...], float] = {}
    for (ws, app, fn), counts in cp.jobs.counts.items():
        for status in TERMINAL:
            if counts.get(status):
                ended[(ws, app, fn, status)] = float(counts[status])
    retried: dict[tuple[str, ...], float] = {k: float(n) for k, n in cp.jobs.retried.items()}
    queued: Counter[tuple[str, ...]] = Counter()
    running: Counter[tuple[str, ...]] = Counter()
    for (ws, name), state in cp.deployments.apps.items():
        for fn in state.functions:
            queued[(ws, name, fn)] += 0
            running[(ws, name, fn)] += 0
    for job in jobs:
        if job.status is JobStatus.IN_QUEUE:
            queued[(job.workspace, job.app, job.function)] += 1
        elif job.status is JobStatus.IN_PROGRESS:
            running[(job.workspace, job.app, job.function)] += 1
    workers: Counter[tuple[str, ...]] = Counter(
        (w.pool.workspace, w.pool.app, w.state.value) for w in cp.workers.live()
    )
    spent: dict[tuple[str, ...], float] = {}
    budget: dict[tuple[str, ...], float] = {}
    now = time.time()
    for (ws, name), rules in list(cp.governance.policies.policies.items()):
        spent[(ws, name)] = cp.governance.spent(ws, rules, now)
        if rules.budget_usd is not None:
            budget[(ws, name)] = float(rules.budget_usd)
    tag_names = _tag_names(cp)

    out: list[Metric] = [
        _family(
            CounterMetricFamily,
            "ember_jobs",
            "Jobs ended, by function and final status, since the store began",
            ("workspace", "app", "function", "status"),
            ended,
            keep=("status",),
        ),
        _family(
            CounterMetricFamily,
            "ember_jobs_retried",
            "Jobs queued again by a retry, since this server started",
            ("workspace", "app", "function"),
            retried,
        ),
        _family(
            GaugeMetricFamily,
            "ember_jobs_in_queue",
            "Jobs waiting for a worker",
            ("workspace", "app", "function"),
            queued,
        ),
        _family(
            GaugeMetricFamily,
            "ember_jobs_in_progress",
            "Jobs running on a worker",
            ("workspace", "app", "function"),
            running,
        ),
        _family(
            GaugeMetricFamily,
            "ember_workers",
            "Workers by state",
            ("workspace", "app", "state"),
            workers,
            keep=("state",),
        ),
        _histogram(cp.series.durations),
        _family(
            GaugeMetricFamily,
            "ember_budget_spent_usd",
            "What each usage policy has spent in its current budget period",
            ("workspace", "policy"),
            spent,
        ),
        _family(
            GaugeMetricFamily,
            "ember_budget_usd",
            "Each usage policy's budget for its period (policies with one)",
            ("workspace", "policy"),
            budget,
        ),
    ]
    out += await _usage_read(cp, tag_names)
    return out


USAGE_EVERY_S = 5.0
"""How often a scrape reads the usage rollups again (a query per workspace and tag name, in a
thread beside the event loop); a scrape in between gets the last reading, so the usage counters
move in steps of 5 s at most, whatever the scrape interval."""

_read: weakref.WeakKeyDictionary[ControlPlane, tuple[float, tuple[str, ...], list[Metric]]] = (
    weakref.WeakKeyDictionary()
)


async def _usage_read(cp: ControlPlane, tag_names: Sequence[str]) -> list[Metric]:
    now, names = time.monotonic(), tuple(tag_names)
    last = _read.get(cp)
    if last is not None and now - last[0] < USAGE_EVERY_S and last[1] == names:
        return last[2]
    found = await _usage(cp, names)
    _read[cp] = (now, names, found)
    return found


async def _usage(cp: ControlPlane, tag_names: Sequence[str]) -> list[Metric]:
    gpu: dict[tuple[str, ...], float] = {}
    usd: dict[tuple[str, ...], float] = {}
    starts: dict[tuple[str, ...], float] = {}
    tag_gpu: dict[tuple[str, ...], float] = {}
    tag_usd: dict[tuple[str, ...], float] = {}
    for ws in [w["name"] for w in await cp.tokens.workspaces()]:
        for group in await cp.usage(ws, ["function"], None, None, None, fresh=False):
            key = (ws, *_split(group["key"]["function"]))
            gpu[key] = group["gpu_seconds"]
            usd[key] = group["cost_usd"]
            starts[key] = float(group["cold_starts"])
        for tag in tag_names:
            for group in await cp.usage(ws, [f"tag:{tag}"], None, None, None, fresh=False):
                value = group["key"][f"tag:{tag}"]
                if value:
                    tag_gpu[(ws, tag, value)] = group["gpu_seconds"]
                    tag_usd[(ws, tag, value)] = group["cost_usd"]
    by_fn = ("workspace", "app", "function")
    by_tag = ("workspace", "tag", "value")
    return [
        _family(CounterMetricFamily, "ember_gpu_seconds", "GPU seconds metered", by_fn, gpu),
        _family(CounterMetricFamily, "ember_cost_usd", "Cost metered, in US dollars", by_fn, usd),
        _family(CounterMetricFamily, "ember_cold_starts", "Workers started", by_fn, starts),
        _family(
            CounterMetricFamily,
            "ember_gpu_seconds_by_tag",
            "GPU seconds metered, by tag",
            by_tag,
            tag_gpu,
            keep=("tag",),
        ),
        _family(
            CounterMetricFamily,
            "ember_cost_usd_by_tag",
            "Cost metered in US dollars, by tag",
            by_tag,
            tag_usd,
            keep=("tag",),
        ),
    ]


class _Families(Collector):
    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self.metrics)


async def render(cp: ControlPlane) -> bytes:
    """The exposition text of every metric, as of now."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(await families(cp)))
    return generate_latest(registry)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus metrics of the whole server: an admin token of the default workspace."""
    auth: Auth = request.app.state.auth
    who = auth.require(request, Scope.ADMIN)
    if not who.operator:
        message = "metrics cover every workspace: only an admin of the default workspace may scrape"
        auth.on_refused(request, "auth.forbidden", message)
        raise ApiException(403, "forbidden", message)
    return Response(await render(plane(request)), media_type=CONTENT_TYPE_LATEST)


_HEAD_LIMIT = 16 << 10
_READ_S = 5.0


async def listen(cp: ControlPlane, port: int) -> asyncio.Server:
    """`GET /metrics` without a token on 127.0.0.1:`port` alone: only this machine reaches it.
    One request per connection; anything else is a 404."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_S)
                method, target, _ = head.split(b"\r\n", 1)[0].split(b" ", 2)
                if method == b"GET" and target.partition(b"?")[0] == b"/metrics":
                    status, kind, body = "200 OK", CONTENT_TYPE_LATEST, await render(cp)
                else:
                    status, kind, body = "404 Not Found", "text/plain", b"try GET /metrics\n"
                writer.write(
                    f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
            finally:
                writer.close()

    return await asyncio.start_server(answer, "127.0.0.1", port, limit=_HEAD_LIMIT)
