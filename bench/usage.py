"""Usage benchmark: `GET /v1/usage` over a deep history, and how long it stalls other requests.

Fills a fresh data dir with N usage rows (default 400,000) written straight into the store with
SQLAlchemy, the way the meter writes them: workers of many apps, functions, GPU types, tags and
policies, spread over 30 days, each worker's life cut into records of at most a second (the
checkpoint interval). Then starts a real `ember server` on it (timing the start, which folds
rows that no rollup holds yet), and times a few forms of `GET /v1/usage` while another thread
pings `GET /v1/health` in a loop: the worst health latency during the queries is the event-loop
stall a usage query costs everybody else. Prints JSON and writes it to bench/results/usage.json.

    .venv/bin/python bench/usage.py                 # 400,000 rows, 3 runs of each form
    .venv/bin/python bench/usage.py --rows 50000    # a quick look

This is a benchmark, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import insert
from stats import emit, log, machine, percentile

from ember.control.meter import usage_row
from ember.core.metering import Phase, make_record
from ember.core.pricing import PriceTable, Resources
from ember.store import tables
from ember.store.db import make_engine, migrate, sqlite_url
from ember.testing import LocalServer

DAYS = 30
APPS = [f"app{i:02d}" for i in range(20)]
UNITS = ["embed", "rank", "chat", "ocr", "score"]
TEAMS = ["search", "ads", "vision", "speech", "infra"]
PROJECTS = [f"p{i}" for i in range(12)]
GPUS = [
    Resources("L4", 1.0, cpu=4, memory_gib=16),
    Resources("A10G", 1.0, cpu=4, memory_gib=16),
    Resources("H100", 1.0, cpu=8, memory_gib=64),
    Resources("H100", 2.0, cpu=16, memory_gib=128),
    Resources("L4", 0.25, cpu=1, memory_gib=4),
    Resources(None, 0.0, cpu=1, memory_gib=1),
]
POLICIES = [None, None, None, "batch", "interactive"]


def usage_rows(n: int, now: float, seed: int = 7) -> tuple[list[dict[str, Any]], list[Any]]:
    """`n` usage rows (and their workers) as the meter writes them, in time order per worker."""
    rng = random.Random(seed)
    prices = PriceTable()
    rows: list[dict[str, Any]] = []
    workers: list[dict[str, Any]] = []
    fn_shape = {
        (a, u): (
            rng.choice(GPUS),
            {"team": rng.choice(TEAMS), "project": rng.choice(PROJECTS)},
            rng.choice(POLICIES),
        )
        for a in APPS
        for u in UNITS
    }
    w = 0
    while len(rows) < n:
        app, unit = rng.choice(APPS), rng.choice(UNITS)
        res, tags, policy = fn_shape[(app, unit)]
        workspace = "team" if rng.random() < 0.1 else "default"
        wid = f"w-{w:07d}"
        w += 1
        t = now - rng.uniform(0, DAYS * 86400)
        born = t
        life = rng.uniform(10, 300)
        phase = Phase.COLD_START
        left = rng.uniform(0.3, 3.0)  # of the current phase
        first = True
        tags_json = json.dumps(tags)
        while t < born + life and len(rows) < n:
            step = min(1.0, left, born + life - t)  # cut at every checkpoint (1 s)
            r = make_record(
                worker=wid,
                app=app,
                unit=unit,
                version=1,
                phase=phase,
                start=t,
                end=t + step,
                resources=res,
                prices=prices,
                tags=tags,
                starts=1 if first else 0,
                workspace=workspace,
                policy=policy,
            )
            rows.append(usage_row(r, tags_json))
            first = False
            t += step
            left -= step
            if left <= 1e-9:
                phase = Phase.BUSY if phase is not Phase.BUSY else Phase.IDLE
                left = rng.uniform(0.5, 20.0)
        workers.append(
            {
                "id": wid,
                "app": app,
                "unit": unit,
                "version": 1,
                "gpus": "[]",
                "started_at": born,
                "metered_until": t,
                "ended_at": t,
                "exit_code": 0,
                "stop_reason": "idle",
                "workspace": workspace,
                "policy": policy,
            }
        )
    return rows, workers


def fill(data_dir: Path, n: int, now: float) -> float:
    """Migrate a fresh store and insert the rows; seconds it took."""
    t0 = time.perf_counter()
    data_dir.mkdir(mode=0o700, parents=True)
    engine = make_engine(sqlite_url(data_dir))
    migrate(engine)
    rows, workers = usage_rows(n, now)
    with engine.begin() as conn:
        for i in range(0, len(workers), 10_000):
            conn.execute(insert(tables.workers), workers[i : i + 10_000])
        for i in range(0, len(rows), 10_000):
            conn.execute(insert(tables.usage), rows[i : i + 10_000])
    engine.dispose()
    return time.perf_counter() - t0


class Pinger(threading.Thread):
    """GET /v1/health in a loop; latencies with the time each was sent."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                t0 = time.perf_counter()
                client.get(self.url + "/v1/health")
                self.samples.append((t0, (time.perf_counter() - t0) * 1000))
                time.sleep(0.002)

    def worst(self, start: float, end: float) -> float:
        during = [ms for t, ms in self.samples if start <= t <= end]
        return max(during) if during else float("nan")


def forms(now: float) -> dict[str, dict[str, str]]:
    day = 86400
    return {
        "by_app_all_time": {"group_by": "app"},
        "by_function_phase_7d": {"group_by": "function,phase", "since": str(now - 7 * day)},
        "by_team_daily": {"group_by": "tag:team", "granularity": "day"},
        "by_app_hourly_2d": {
            "group_by": "app",
            "granularity": "hour",
            "since": str(now - 2 * day),
        },
        "by_gpu_policy_window": {
            "group_by": "gpu,policy",
            "since": str(now - 20.3 * day),
            "until": str(now - 3.7 * day),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results/usage.json")
    args = parser.parse_args()

    now = time.time()
    with tempfile.TemporaryDirectory(prefix="ember-usage-") as tmp:
        data_dir = Path(tmp) / "data"
        log(f"filling {args.rows:,} usage rows ...")
        fill_s = fill(data_dir, args.rows, now - 60)
        server = LocalServer(data_dir)
        t0 = time.perf_counter()
        server.start(timeout=300)
        start_s = time.perf_counter() - t0
        log(f"server up in {start_s:.2f} s")
        headers = {"Authorization": f"Bearer {server.token}"}
        pinger = Pinger(server.url)
        pinger.start()
        results: dict[str, Any] = {}
        try:
            time.sleep(1.0)
            idle = [ms for _, ms in pinger.samples]
            with httpx.Client(timeout=120, headers=headers) as client:
                for name, params in forms(now).items():
                    times, stalls, groups = [], [], 0
                    for _ in range(args.runs):
                        a = time.perf_counter()
                        resp = client.get(server.url + "/v1/usage", params=params)
                        b = time.perf_counter()
                        resp.raise_for_status()
                        groups = len(resp.json()["groups"])
                        times.append((b - a) * 1000)
                        time.sleep(0.05)  # let the pinger's last request land
                        stalls.append(pinger.worst(a, b))
                    results[name] = {
                        "params": params,
                        "groups": groups,
                        "median_ms": round(statistics.median(times), 1),
                        "max_ms": round(max(times), 1),
                        "worst_health_ms": round(max(stalls), 1),
                    }
                    log(f"{name}: {results[name]}")
        finally:
            pinger.stop.set()
            pinger.join()
            server.shutdown()
    emit(
        {
            "benchmark": "usage",
            "rows": args.rows,
            "days": DAYS,
            "runs": args.runs,
            "fill_s": round(fill_s, 2),
            "server_start_s": round(start_s, 2),
            "health_idle_p50_ms": round(percentile(idle, 50), 2),
            "health_idle_max_ms": round(max(idle), 2) if idle else None,
            "queries": results,
            "machine": machine(),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
