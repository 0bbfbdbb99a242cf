"""Ray Serve on this machine with the workloads of bench/core.py, for a side-by-side comparison.

Starts a local Ray (2 CPUs, no dashboard) and Ray Serve with its HTTP proxy on 127.0.0.1 on a free
port, deploys a no-op, measures, then always shuts Serve and Ray down and checks that no Ray
process outlived them. Prints JSON to stdout and writes it to bench/results/ray_serve.json.
Progress goes to stderr. Ray is not a dependency of ember: run this from its own virtualenv
(the `bench` extra of pyproject.toml), e.g.

    python3 -m venv .venv-ray && .venv-ray/bin/pip install 'ray[serve]' httpx
    .venv-ray/bin/python bench/ray_serve.py          # full: N=2000 warm, 10 s at 32 clients, ...
    .venv-ray/bin/python bench/ray_serve.py --quick  # a smoke check
    .venv-ray/bin/python bench/ray_serve.py --ray-address 127.0.0.1:6379
                                                     # on a running cluster (bench/core.py
                                                     # --backend ray --ray-serve runs it so, on
                                                     # the cluster ember ran on)

Measured as bench/core.py measures ember, with the same light client (bench/loadgen.py): warm
round trip (sequential POST of JSON on one keep-alive connection; httpx too, for reference),
throughput (32 closed-loop connections), cold start from zero, and a burst 0 -> N (N requests at
once, a connection each, to an autoscaled deployment of at most 8 replicas).
This is a benchmark, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import httpx
import loadgen
import ray
from ray import serve
from starlette.requests import Request
from stats import cmdline, emit, log, machine, summary

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "ray_serve.json"

# Replicas reserve no CPU: with Ray's default of 1 CPU per replica, 8 replicas could not be
# placed on 2 CPUs. ember reserves nothing per worker either.
ACTOR_OPTIONS = {"num_cpus": 0}
# Autoscaling from zero, as fast as Ray Serve allows: no delays, a short metrics window.
FROM_ZERO = {
    "min_replicas": 0,
    "initial_replicas": 0,
    "target_ongoing_requests": 1,
    "upscale_delay_s": 0,
    "downscale_delay_s": 0,
    "downscale_to_zero_delay_s": 0,
    "metrics_interval_s": 0.1,
    "look_back_period_s": 0.5,
}


@serve.deployment(max_ongoing_requests=32, ray_actor_options=ACTOR_OPTIONS)
class Noop:
    """The warm no-op: one replica, 32 requests at a time (ember's no-op: 1 worker,
    concurrency 32). Reads the JSON body, returns a small JSON result."""

    async def __call__(self, request: Request) -> dict[str, Any]:
        await request.json()
        return {"status": "COMPLETED", "output": None}


@serve.deployment(
    max_ongoing_requests=1,
    ray_actor_options=ACTOR_OPTIONS,
    autoscaling_config={**FROM_ZERO, "max_replicas": 1},
)
class Cold:
    """Scales to zero as soon as it is idle (ember's `cold`: max_workers=1, idle_timeout=0)."""

    async def __call__(self, request: Request) -> dict[str, Any]:
        await request.json()
        return {"status": "COMPLETED", "output": None, "pid": os.getpid()}


@serve.deployment(
    max_ongoing_requests=1,
    ray_actor_options=ACTOR_OPTIONS,
    autoscaling_config={**FROM_ZERO, "max_replicas": 8},
)
class Work:
    """The burst function of tests/test_burst.py: 20 ms of blocking work, one at a time per
    replica (ember: concurrency 1), at most 8 replicas."""

    async def __call__(self, request: Request) -> list[int]:
        body = await request.json()
        time.sleep(0.02)
        return [body["input"]["i"], os.getpid()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout:.0f} s waiting for {what}")
        time.sleep(every)
    return value


# --- processes (Linux /proc) ---------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1].split()
    except (OSError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def cpu_seconds(pid: int) -> float:
    fields = _stat(pid)
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(root: int) -> set[int]:
    """Live processes below `root` (Ray's gcs_server, raylet, workers, ... all start under the
    driver that ran ray.init)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry))) is not None and fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry))
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def ray_processes(session_dir: str) -> set[int]:
    """Processes of our Ray session, whether or not still below the driver: those naming its
    session dir, and theirs (on a cluster started by `ray start`, the raylet's workers)."""
    found = descendants(os.getpid())
    for entry in os.listdir("/proc"):
        if entry.isdigit() and session_dir and session_dir in cmdline(int(entry)):
            found.add(int(entry))
            found |= descendants(int(entry))  # the raylet's workers, named ray::... by now
    return {p for p in found if pid_alive(p)}


def role(pid: int) -> str:
    cmd = cmdline(pid)
    for key, name in (
        ("ServeReplica", "replicas"),
        ("ProxyActor", "proxy"),
        ("ServeController", "controller"),
        ("raylet", "raylet"),
        ("gcs_server", "gcs_server"),
    ):
        if key in cmd:
            return name
    return "other_ray"


SERVE_ROLES = ("replicas", "proxy", "controller")
"""The processes Serve starts (on a cluster of someone else's, the only ones that must go)."""


def started_at(pid: int) -> float:
    """Wall-clock time (time.time()) at which a process started."""
    fields = _stat(pid)
    if fields is None:
        return math.nan
    with open("/proc/stat") as f:
        btime = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")


# --- Serve ---------------------------------------------------------------------------------


def replica_states(app: str, deployment: str) -> dict[str, int]:
    status = serve.status().applications.get(app)
    if status is None or deployment not in status.deployments:
        return {}
    return {str(k): v for k, v in status.deployments[deployment].replica_states.items() if v}


def running(app: str, deployment: str) -> int:
    return replica_states(app, deployment).get("RUNNING", 0)


def call(client: httpx.Client, path: str, payload: Any = None) -> Any:
    resp = client.post(path, json={"input": payload or {}})
    if resp.status_code != 200:
        raise RuntimeError(f"POST {path}: HTTP {resp.status_code}: {resp.text[:300]}")
    return resp.json()


def _ok(status: int, body: bytes) -> None:
    if status != 200:
        raise RuntimeError(f"HTTP {status}: {body[:300]!r}")


def bench_warm(url: str, n: int, warmup: int) -> dict[str, Any]:
    """As bench/core.py: from the light client, then the same calls from httpx."""
    request = loadgen.request_bytes("POST", url + "/noop", {"input": {}})
    rtt = loadgen.sequential(url, request, _ok, n, warmup)
    health_request = loadgen.request_bytes("GET", url + "/-/healthz")
    health = loadgen.sequential(url, health_request, _ok, n, warmup)
    via_httpx: list[float] = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for _ in range(warmup):
            call(client, "/noop")
        for _ in range(n):
            t0 = time.perf_counter()
            call(client, "/noop")
            via_httpx.append((time.perf_counter() - t0) * 1000)
    return {
        "what": "sequential POST /noop (JSON body) on one keep-alive connection, from "
        "bench/loadgen.py (a light HTTP/1.1 client)",
        "n": n,
        "warmup": warmup,
        **summary(rtt),
        "http_baseline_ms": summary(health),
        "http_baseline_note": "GET /-/healthz round trip, same client: Serve's HTTP proxy alone",
        "httpx_ms": summary(via_httpx),
        "httpx_note": "the same calls from one keep-alive httpx.Client",
    }


def bench_throughput(url: str, clients: int, duration: float, session_dir: str) -> dict[str, Any]:
    pids = ray_processes(session_dir)
    request = loadgen.request_bytes("POST", url + "/noop", {"input": {}})
    before = {p: cpu_seconds(p) for p in pids}
    client_before = time.process_time()
    flat, errors, elapsed = loadgen.closed_loop(url, request, _ok, clients, duration)
    cpu: dict[str, float] = {}
    for p in pids:
        cpu[role(p)] = cpu.get(role(p), 0.0) + cpu_seconds(p) - before[p]
    cpu = {k: round(v, 2) for k, v in sorted(cpu.items())}
    cpu["client"] = round(time.process_time() - client_before, 2)
    calls = len(flat)
    return {
        "what": f"{clients} concurrent closed-loop clients, POST /noop",
        "clients": clients,
        "client_mode": "asyncio, bench/loadgen.py, a keep-alive connection per client",
        "duration_s": round(elapsed, 3),
        "calls": calls,
        "errors": errors,
        "calls_per_s": round(calls / elapsed, 1),
        "latency": summary(flat),
        "cpu_s": cpu,
        "cpu_ms_per_call": {k: round(v * 1000 / calls, 3) for k, v in cpu.items()} if calls else {},
        "cpu_note": "CPU seconds used during the run by Ray's processes (by role) and this client "
        "(the connections are opened and used once before the CPU count starts)",
    }


def bench_cold(url: str, n: int) -> dict[str, Any]:
    """Each round: wait until `Cold` has no replica in any state and the last replica's process
    has exited, then time one request end to end."""
    e2e: list[float] = []
    fresh = 0
    last_pid = 0
    with httpx.Client(base_url=url, timeout=120) as client:
        for i in range(n):
            wait_for(lambda: not replica_states("cold", "Cold"), 120, "scale to zero", 0.05)
            if last_pid:
                wait_for(lambda: not pid_alive(last_pid), 60, "replica exit")  # noqa: B023
            time.sleep(0.05)
            wall0 = time.time()
            t0 = time.perf_counter()
            body = call(client, "/cold")
            e2e.append((time.perf_counter() - t0) * 1000)
            last_pid = body["pid"]
            new_process = started_at(last_pid) >= wall0 - 0.01
            fresh += new_process
            log(f"  cold {i + 1}/{n}: {e2e[-1]:.0f} ms (new process: {new_process})")
    return {
        "what": "POST /cold with no replica (autoscaling min_replicas=0, initial_replicas=0, "
        "downscale_to_zero_delay_s=0), after the previous replica's process exited",
        "n": n,
        "end_to_end": summary(e2e),
        "replica_in_a_new_process": fresh,
        "replica_in_a_new_process_note": "rounds whose replica ran in a process started after "
        "the request was sent (the rest took a worker process Ray had started beforehand)",
    }


def bench_burst(url: str, n: int) -> dict[str, Any]:
    """`n` requests at once to `Work` (0 replicas, at most 8), each on its own connection opened
    beforehand (as bench/core.py's burst_runsync): time to 8 running replicas and to the last
    result."""
    wait_for(lambda: not replica_states("burst", "Work"), 120, "burst deployment at zero", 0.05)
    requests = [
        loadgen.request_bytes("POST", url + "/burst", {"input": {"i": i}}) for i in range(n)
    ]
    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            samples.append((time.perf_counter(), running("burst", "Work")))
            done.wait(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        t0 = time.perf_counter()
        answers, last = loadgen.burst(url, requests)
    finally:
        done.set()
        watcher.join()
    bad = [(status, body[:200]) for status, body in answers if status != 200]
    if bad:
        raise RuntimeError(f"{len(bad)} of the burst's requests failed: {bad[0]}")
    results = [json.loads(body) for _, body in answers]
    assert [r[0] for r in results] == list(range(n))
    to_8 = next((t - t0 for t, k in samples if k >= 8), math.nan)
    return {
        "what": f"{n} POST /burst at once, each on its own keep-alive connection opened "
        "beforehand (bench/loadgen.py), to a deployment at 0 replicas, autoscaling to at most 8, "
        "20 ms of work per request",
        "n": n,
        "to_last_result_s": round(last, 3),
        "to_8_running_replicas_s": round(to_8, 3),
        "peak_running_replicas": max((k for _, k in samples), default=0),
        "replicas_that_served": len({r[1] for r in results}),
        "ideal_s": round(n * 0.02 / 8, 3),
        "ideal_note": "n x 20 ms / 8 replicas: the time with 8 warm replicas and no overhead",
    }


def versions() -> dict[str, Any]:
    import starlette
    import uvicorn

    return machine(
        ray=ray.__version__,
        httpx=httpx.__version__,
        uvicorn=uvicorn.__version__,
        starlette=starlette.__version__,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run, for a smoke check")
    parser.add_argument("--warm-n", type=int, help="sequential warm calls (default 2000)")
    parser.add_argument("--duration", type=float, help="throughput run, seconds (default 10)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument("--cold-n", type=int, help="cold starts from zero (default 5)")
    parser.add_argument(
        "--burst-n", type=int, help="requests in the burst, 0 for none (default 500)"
    )
    parser.add_argument(
        "--ray-address",
        help="join this Ray cluster (HEAD:PORT) instead of starting one; Serve is shut down "
        "after, the cluster left running. Its Python must have Ray Serve, as Serve's actors run "
        "in it",
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="where to write the JSON")
    args = parser.parse_args()
    warm_n = args.warm_n or (200 if args.quick else 2000)
    duration = args.duration or (2.0 if args.quick else 10.0)
    cold_n = args.cold_n or (2 if args.quick else 5)
    burst_n = args.burst_n if args.burst_n is not None else (100 if args.quick else 500)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    result: dict[str, Any] = {
        "benchmark": "bench/ray_serve.py",
        "command": " ".join(["python", "bench/ray_serve.py", *sys.argv[1:]]),
        "machine": versions(),
        "setup": {
            "ray_init": (
                f"ray.init(address={args.ray_address!r}): a running cluster"
                if args.ray_address
                else "ray.init(num_cpus=2, include_dashboard=False)"
            ),
            "http": f"Serve HTTP proxy on {url} (proxy_location=HeadOnly)",
            "noop": "1 replica, max_ongoing_requests=32, num_cpus=0, async def",
            "from_zero": FROM_ZERO,
        },
    }
    ok = False
    session_dir = ""
    try:
        t = time.perf_counter()
        if args.ray_address:
            ray.init(address=args.ray_address, log_to_driver=False)
            result["setup"]["cluster"] = {
                "nodes": len([n for n in ray.nodes() if n.get("Alive")]),
                "resources": ray.cluster_resources(),
            }
        else:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        session_dir = _session_dir()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        serve.run(Noop.bind(), name="noop", route_prefix="/noop")
        serve.run(Cold.bind(), name="cold", route_prefix="/cold")
        serve.run(Work.bind(), name="burst", route_prefix="/burst")
        wait_for(lambda: running("noop", "Noop") >= 1, 60, "the no-op's replica", 0.05)
        result["startup_s"] = round(time.perf_counter() - t, 2)
        log(f"Ray {ray.__version__} and Serve up on {url} in {result['startup_s']} s")
        log(f"warm: {warm_n} sequential calls")
        result["warm"] = bench_warm(url, warm_n, warmup=max(50, warm_n // 10))
        log(f"throughput: {args.clients} clients for {duration:.0f} s")
        result["throughput"] = bench_throughput(url, args.clients, duration, session_dir)
        log(f"cold start: {cold_n} calls from zero")
        result["cold_start"] = bench_cold(url, cold_n)
        if burst_n > 0:
            log(f"burst: {burst_n} requests at once, 0 -> at most 8 replicas")
            result["burst"] = bench_burst(url, burst_n)
        ok = True
    finally:
        pids = ray_processes(session_dir) if session_dir else descendants(os.getpid())
        if args.ray_address:  # the cluster is not ours: only Serve's processes must go
            pids = {p for p in pids if role(p) in SERVE_ROLES}
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: not any(pid_alive(p) for p in pids), 30, "Ray's processes to exit")
        if args.ray_address:
            found = ray_processes(session_dir) if session_dir else set()
            left = sorted(p for p in pids | found if pid_alive(p) and role(p) in SERVE_ROLES)
        else:
            left = sorted(p for p in pids | descendants(os.getpid()) if pid_alive(p))
        result["ray_processes_left_after_stop"] = [f"{p} {cmdline(p)[:120]}" for p in left]
        if left:
            ok = False
            log(f"left behind after shutdown: {result['ray_processes_left_after_stop']}")

    emit(result, args.output)
    return 0 if ok else 1


def _session_dir() -> str:
    """This Ray session's temp dir (e.g. /tmp/ray/session_...): it appears in the command line
    of each of its processes."""
    try:
        return str(ray._private.worker.global_worker.node.get_session_dir_path())
    except Exception:
        return ""


if __name__ == "__main__":
    sys.exit(main())
