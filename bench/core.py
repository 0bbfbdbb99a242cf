"""Core benchmark: warm /runsync latency, throughput at 32 clients, cold start from zero.

Starts its own `ember server` (free port, temporary data dir), deploys a no-op function, measures,
stops the server and checks that no worker outlived it. Prints JSON to stdout and writes it to
bench/results/core.json. Progress goes to stderr.

    .venv/bin/python bench/core.py            # full run: N=2000 warm, 10 s at 32 clients, N=20 cold
    .venv/bin/python bench/core.py --quick    # a few seconds, for a smoke check

This is a benchmark, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from stats import cpu_seconds, log, machine, summary

from ember.testing import LocalServer, WorkersOutlived, pid_alive, wait_for

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "core.json"
APP = "bench"

# The deployed app: `noop` stays warm; `cold` scales to zero as soon as it is idle.
BENCH_APP = """
import ember

app = ember.App("bench")


@app.function(
    min_workers={min_workers},
    max_workers={max_workers},
    concurrency={concurrency},
    idle_timeout=600,
)
def noop() -> None:
    return None


@app.function(max_workers=1, idle_timeout=0)
def cold() -> None:
    return None
"""

# Ray Serve 2.60 on a 2-core machine like this one, as given in issue 2 (not re-measured here).
RAY_SERVE_REFERENCE: dict[str, Any] = {
    "source": "issue 2 (Ray Serve 2.60, 2-core machine); not re-measured in this run",
    "warm_p50_ms": [4.0, 6.0],
    "warm_p99_ms": [8.0, 14.0],
    "throughput_calls_per_s": 270.0,
    "cold_start_s": [7.0, 17.0],
}


class BenchServer(LocalServer):
    """`ember server` on a free port with a temporary data dir, plus what the benchmark needs:
    plain httpx clients (the benchmark measures HTTP, not the SDK) and a deploy through the CLI."""

    def __init__(self, root: Path, log_level: str = "warning") -> None:
        super().__init__(root / "data", log_path=root / "server.log", log_level=log_level)
        self.root = root

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def http_client(self) -> httpx.Client:
        """A fresh keep-alive httpx.Client on this server, with the token."""
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=60)

    def deploy(self, source: str) -> None:
        path = self.root / "bench_app.py"
        path.write_text(source)
        subprocess.run(
            [sys.executable, "-m", "ember.cli.main", "deploy", str(path)],
            env=self.env,
            check=True,
            capture_output=True,
        )


def runsync_path(fn: str) -> str:
    return f"/v1/apps/{APP}/{fn}/runsync"


def call(client: httpx.Client, fn: str) -> dict[str, Any]:
    resp = client.post(runsync_path(fn), json={"input": {}})
    if resp.status_code != 200:
        raise RuntimeError(f"runsync {fn}: HTTP {resp.status_code}: {resp.text[:300]}")
    body: dict[str, Any] = resp.json()
    if body["status"] != "COMPLETED":
        raise RuntimeError(f"runsync {fn}: job {body['status']}: {body.get('error')}")
    return body


def bench_warm(server: BenchServer, n: int, warmup: int) -> dict[str, Any]:
    """Sequential POST /runsync of a no-op on a warm worker, one keep-alive connection."""
    rtt: list[float] = []
    server_total: list[float] = []
    health: list[float] = []
    with server.http_client() as client:
        for _ in range(warmup):
            call(client, "noop")
            client.get("/v1/health")
        for _ in range(n):
            t0 = time.perf_counter()
            body = call(client, "noop")
            rtt.append((time.perf_counter() - t0) * 1000)
            server_total.append(body["timings"]["total_ms"])
        for _ in range(n):  # the same client and server, no job: the HTTP stack alone
            t0 = time.perf_counter()
            client.get("/v1/health").raise_for_status()
            health.append((time.perf_counter() - t0) * 1000)
    return {
        "what": "sequential POST /v1/apps/bench/noop/runsync, one keep-alive httpx.Client",
        "n": n,
        "warmup": warmup,
        **summary(rtt),
        "server_total_ms": summary(server_total),
        "server_total_note": "the job's own total_ms: accepted to finished, inside the server",
        "http_baseline_ms": summary(health),
        "http_baseline_note": "GET /v1/health round trip, same client: HTTP + uvicorn alone",
    }


Load = tuple[list[float], int, float]
"""Latencies (ms), errors, seconds from the first call to the last answer."""


def _threads_load(server: BenchServer, clients: int, duration: float) -> Load:
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def worker(i: int) -> None:
        with server.http_client() as client:
            call(client, "noop")  # open the connection before the clock starts
            start.wait()
            mine = latencies[i]
            while time.perf_counter() < stop_at[0]:
                t0 = time.perf_counter()
                try:
                    call(client, "noop")
                except Exception:
                    errors[i] += 1
                    continue
                mine.append((time.perf_counter() - t0) * 1000)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + 3600
    start.wait()
    t0 = time.perf_counter()
    stop_at[0] = t0 + duration
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    return [x for lat in latencies for x in lat], sum(errors), elapsed


def _asyncio_load(server: BenchServer, clients: int, duration: float) -> Load:
    async def run() -> Load:
        latencies: list[float] = []
        errors = 0
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(
            base_url=server.url, headers=server.headers, timeout=60, limits=limits
        ) as client:

            async def one() -> None:
                resp = await client.post(runsync_path("noop"), json={"input": {}})
                if resp.status_code != 200 or resp.json()["status"] != "COMPLETED":
                    raise RuntimeError(resp.text[:300])

            await asyncio.gather(*(one() for _ in range(clients)))  # open the connections
            t0 = time.perf_counter()
            stop_at = t0 + duration

            async def loop() -> None:
                nonlocal errors
                while time.perf_counter() < stop_at:
                    t0 = time.perf_counter()
                    try:
                        await one()
                    except Exception:
                        errors += 1
                        continue
                    latencies.append((time.perf_counter() - t0) * 1000)

            await asyncio.gather(*(loop() for _ in range(clients)))
            elapsed = time.perf_counter() - t0
        return latencies, errors, elapsed

    return asyncio.run(run())


def bench_throughput(
    server: BenchServer, clients: int, duration: float, mode: str
) -> dict[str, Any]:
    """`clients` closed-loop clients calling the no-op for `duration` seconds."""
    load = _threads_load if mode == "threads" else _asyncio_load
    assert server.proc is not None
    worker_pids = [w["pid"] for w in server.workers() if w["pid"]]
    pids = {"server": [server.proc.pid], "workers": worker_pids}
    before = {k: sum(cpu_seconds(p) for p in v) for k, v in pids.items()}
    client_before = time.process_time()
    latencies, errors, elapsed = load(server, clients, duration)
    cpu = {k: round(sum(cpu_seconds(p) for p in v) - before[k], 2) for k, v in pids.items()}
    cpu["client"] = round(time.process_time() - client_before, 2)
    return {
        "what": f"{clients} concurrent closed-loop clients, POST runsync of the no-op",
        "clients": clients,
        "client_mode": (
            "threads, each with its own httpx.Client (keep-alive)"
            if mode == "threads"
            else "asyncio, one httpx.AsyncClient with a connection per client"
        ),
        "duration_s": round(elapsed, 3),
        "calls": len(latencies),
        "errors": errors,
        "calls_per_s": round(len(latencies) / elapsed, 1),
        "latency": summary(latencies),
        "cpu_s": cpu,
        "cpu_note": "CPU seconds used during the run by the server, its workers and this client "
        "(all on the same cores)",
    }


def cold_workers(server: BenchServer, client: httpx.Client) -> list[dict[str, Any]]:
    workers: list[dict[str, Any]] = client.get("/v1/workers").json()["workers"]
    return [w for w in workers if w["app"] == APP and w["unit"] == "cold"]


def bench_cold(server: BenchServer, n: int) -> dict[str, Any]:
    """Each round: wait until `cold` (idle_timeout=0) has no worker process at all, then time
    one call end to end; the job's own cold_start_ms is reported beside it."""
    e2e: list[float] = []
    cold_ms: list[float] = []
    total_ms: list[float] = []
    with server.http_client() as client:
        for i in range(n):
            pids = {w["pid"] for w in cold_workers(server, client) if w.get("pid")}
            wait_for(lambda: not cold_workers(server, client), 30, 0.01, "scale to zero")
            wait_for(lambda: not any(pid_alive(p) for p in pids), 30, 0.01, "worker exit")  # noqa: B023
            time.sleep(0.05)  # let the exiting process's last CPU work settle
            t0 = time.perf_counter()
            body = call(client, "cold")
            e2e.append((time.perf_counter() - t0) * 1000)
            cold_ms.append(body["timings"]["cold_start_ms"])
            total_ms.append(body["timings"]["total_ms"])
            if body["timings"]["cold_start_ms"] <= 0:
                raise RuntimeError(f"round {i}: the call found a warm worker: {body['timings']}")
    return {
        "what": "POST runsync with no worker running (idle_timeout=0); the worker is forked from "
        "the function's template unless the server runs with EMBER_TEMPLATES=0 (plain start)",
        "templates": os.environ.get("EMBER_TEMPLATES", "1") != "0",
        "n": n,
        "end_to_end": summary(e2e),
        "job_cold_start_ms": summary(cold_ms),
        "job_total_ms": summary(total_ms),
    }


def versions() -> dict[str, Any]:
    import ember

    return machine(ember=ember.__version__, httpx=httpx.__version__)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run: a few seconds")
    parser.add_argument("--warm-n", type=int, help="sequential warm calls (default 2000)")
    parser.add_argument("--duration", type=float, help="throughput run, seconds (default 10)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument(
        "--client-mode",
        choices=("threads", "asyncio"),
        default="threads",
        help="throughput clients: threads with an httpx.Client each, or asyncio (default threads)",
    )
    parser.add_argument("--cold-n", type=int, help="cold starts from zero (default 20)")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes of the no-op, started at deploy (default 1)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=32, help="slots per no-op worker (default 32)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="where to write the JSON")
    args = parser.parse_args()
    warm_n = args.warm_n or (200 if args.quick else 2000)
    duration = args.duration or (2.0 if args.quick else 10.0)
    cold_n = args.cold_n or (5 if args.quick else 20)

    root = Path(tempfile.mkdtemp(prefix="ember-bench-"))
    server = BenchServer(root)
    result: dict[str, Any] = {
        "benchmark": "bench/core.py",
        "command": " ".join(["python", "bench/core.py", *sys.argv[1:]]),
        "machine": versions(),
        "noop_function": {
            "workers": args.workers,
            "concurrency": args.concurrency,
            "note": "min_workers=max_workers=--workers, started at deploy and kept warm",
        },
    }
    ok = False
    try:
        log(f"starting ember server on {server.url} (data dir {server.data_dir})")
        server.start()
        server.deploy(
            textwrap.dedent(BENCH_APP).format(
                min_workers=args.workers, max_workers=args.workers, concurrency=args.concurrency
            )
        )
        with server.http_client() as c:
            wait_for(
                lambda: (
                    c.get(f"/v1/apps/{APP}/noop/health").json()["workers"].get("idle", 0)
                    >= args.workers
                ),
                timeout=60,
                interval=0.01,
                what="the no-op's workers",
            )
        log(f"warm: {warm_n} sequential calls")
        result["warm_runsync"] = bench_warm(server, warm_n, warmup=max(50, warm_n // 10))
        log(f"throughput: {args.clients} clients ({args.client_mode}) for {duration:.0f} s")
        result["throughput"] = bench_throughput(server, args.clients, duration, args.client_mode)
        log(f"cold start: {cold_n} calls from zero")
        result["cold_start"] = bench_cold(server, cold_n)
        ok = True
    finally:
        try:
            server.shutdown()
            result["workers_left_after_stop"] = 0
        except WorkersOutlived as exc:
            ok = False
            log(str(exc))
        if not ok:
            log(f"server log ({server.log_path}):\n{server.log()[-3000:]}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    warm, tp, cold = result["warm_runsync"], result["throughput"], result["cold_start"]
    ref = RAY_SERVE_REFERENCE
    result["ray_serve_reference"] = ref
    cold_p50_s = cold["end_to_end"]["p50_ms"] / 1000
    result["ray_serve_over_ember"] = {
        "note": "Ray Serve figure / ember figure (latency: >1 means ember is faster; "
        "throughput: ember / Ray Serve, >1 means ember is faster)",
        "warm_p50": [round(x / warm["p50_ms"], 1) for x in ref["warm_p50_ms"]],
        "warm_p99": [round(x / warm["p99_ms"], 1) for x in ref["warm_p99_ms"]],
        "throughput": round(tp["calls_per_s"] / ref["throughput_calls_per_s"], 1),
        "cold_start_p50": [round(x / cold_p50_s) for x in ref["cold_start_s"]],
    }
    text = json.dumps(result, indent=2)
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text + "\n")
    log(f"written to {args.output}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
