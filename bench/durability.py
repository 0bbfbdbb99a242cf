"""Durability under faults: kill -9 of the server under load, kill storms, a deep queue, large
inputs, the OpenAPI fuzzer; then every accepted job is accounted for.

One `ember server` (free port, temporary data dir) takes all the faults in turn, with clients
submitting `/run` jobs from several threads throughout:

- server kills: `--server-kills` times, the server is killed (-9) while the clients submit, then
  started again on the same data dir;
- a kill storm: for `--storm-s` seconds a worker is killed (-9) every quarter second and every
  template found is killed too; the app is deployed again every few seconds, so that there are
  new templates to kill;
- a deep queue: `--deep` jobs queued behind one held worker, the server killed and restarted,
  the queue drained (its rate is reported);
- large inputs: jobs just under the payload limit, and bodies over it (413, nothing stored);
- the fuzzer: tests/test_openapi_fuzz.py with `--fuzz-examples` examples per operation.

Then each job that got a 202 is looked up in the store: `lost` counts those missing or never
ended, and those COMPLETED without their output; it must be 0. Beside that, on fresh servers,
the `/run` throughput with `--durability normal` and `--durability full`, interleaved.

    .venv/bin/python bench/durability.py           # the default run: a few minutes
    .venv/bin/python bench/durability.py --quick   # about a minute

Prints JSON and writes it to bench/results/durability.json; progress goes to stderr. Exits 1
when a job was lost. docs/reliability.md has the latest figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import loadgen
from stats import cmdline, emit, log, machine, parent_pid

from ember.config import DEFAULT_MAX_PAYLOAD
from ember.errors import ApiError, EmberError, ServerUnavailable
from ember.sdk.client import Client
from ember.sdk.deploy import deploy_file
from ember.testing import LocalServer, WorkersOutlived, wait_for, worker_pids

ROOT = Path(__file__).resolve().parent.parent
SOURCE = """
import time
import ember

app = ember.App("durable")

@app.function(max_workers=2)
def quick(i: int) -> int:
    return i * i

@app.function(max_workers=2, retries=2)
def slow(i: int) -> int:
    time.sleep(0.05)
    return i

@app.function(max_workers=3, retries=3)
def sturdy(i: int) -> int:
    time.sleep(0.1)
    return i

@app.function(max_workers=2)
def fragile(i: int) -> int:
    time.sleep(0.1)
    return i

@app.function(max_workers=1)
def held(i: int, hold: float = 0.0) -> int:
    time.sleep(hold)
    return i

@app.function()
def size(blob: str) -> int:
    return len(blob)
"""

EXPECTED: dict[str, Callable[[dict[str, Any]], Any]] = {
    "quick": lambda x: x["i"] * x["i"],
    "slow": lambda x: x["i"],
    "sturdy": lambda x: x["i"],
    "fragile": lambda x: x["i"],
    "held": lambda x: x["i"],
    "size": lambda x: len(x["blob"]),
}
"""What each function returns for an input: the output a COMPLETED job must hold."""

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}


class Ledger:
    """Every job that got its 202: id -> (function, expected output); and the faults."""

    def __init__(self) -> None:
        self.accepted: dict[str, tuple[str, Any]] = {}
        self.faults: Counter[str] = Counter()
        self.bad_inputs: Counter[str] = Counter()
        self.refused: Counter[int] = Counter()
        self._lock = threading.Lock()

    def add(self, job_id: str, fn: str, input: dict[str, Any]) -> None:
        with self._lock:
            self.accepted[job_id] = (fn, EXPECTED[fn](input))


class Bench:
    def __init__(self, root: Path, ledger: Ledger) -> None:
        self.root = root
        self.server = LocalServer(root / "data", log_path=root / "server.log")
        self.ledger = ledger
        self.deploys = 0

    def deploy(self) -> None:
        path = self.root / "durable_app.py"
        path.write_text(SOURCE + f"\n# deploy {self.deploys}\n")
        self.deploys += 1
        deploy_file(path, client=self.server.client)

    def run(self, client: Client, fn: str, input: dict[str, Any]) -> str | None:
        """Submit one job; its id once accepted (None when refused, e.g. a full queue)."""
        try:
            job_id = str(client.run("durable", fn, input)["id"])
        except ApiError as exc:
            self.ledger.refused[exc.status] += 1
            time.sleep(0.05)
            return None
        self.ledger.add(job_id, fn, input)
        return job_id

    def submitting(
        self, fns: tuple[str, ...], threads: int, pause: float = 0.0
    ) -> tuple[threading.Event, list[threading.Thread]]:
        """`threads` clients submitting jobs of `fns` back to back until `stop` is set or the
        server is gone."""
        stop = threading.Event()
        server = self.server

        def loop(k: int) -> None:
            client = Client(url=server.url, token=server.token)
            rng = random.Random(k)
            i = k * 10_000_000
            try:
                while not stop.is_set():
                    try:
                        self.run(client, rng.choice(fns), {"i": i})
                    except ServerUnavailable:
                        return
                    except EmberError:
                        continue
                    i += 1
                    if pause:
                        time.sleep(pause)
            finally:
                client.close()

        pool = [threading.Thread(target=loop, args=(k,), daemon=True) for k in range(threads)]
        for t in pool:
            t.start()
        return stop, pool

    def kill_server(self) -> None:
        self.server.kill9()
        self.ledger.faults["server_kills"] += 1
        wait_for(
            lambda: not worker_pids(self.server.data_dir), timeout=15, what="orphan workers to exit"
        )

    # ------------------------------------------------------------------ the faults
    def server_kills(self, rounds: int, threads: int) -> None:
        rng = random.Random(1)
        for r in range(rounds):
            stop, pool = self.submitting(("quick", "slow"), threads)
            time.sleep(rng.uniform(1.0, 2.5))
            self.kill_server()
            stop.set()
            for t in pool:
                t.join(timeout=30)
            self.server.start()
            log(f"server kill {r + 1}/{rounds}: {len(self.ledger.accepted)} jobs accepted so far")

    def storm(self, seconds: float, threads: int) -> None:
        stop, pool = self.submitting(("sturdy", "fragile"), threads, pause=0.05)
        end = time.monotonic() + seconds
        next_deploy = time.monotonic() + 3
        while time.monotonic() < end:
            templates, workers = templates_and_workers(self.server)
            for kind, pids in (("template_kills", templates), ("worker_kills", workers[:1])):
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                        self.ledger.faults[kind] += 1
            if time.monotonic() > next_deploy:
                self.deploy()  # a new version: a new template to kill
                next_deploy = time.monotonic() + 3
            time.sleep(0.25)
        stop.set()
        for t in pool:
            t.join(timeout=30)
        log(f"kill storm: {dict(self.ledger.faults)}")

    def deep_queue(self, n: int) -> dict[str, Any]:
        client = self.server.client
        gate = self.run(client, "held", {"i": -1, "hold": 600})
        assert gate is not None
        self.ledger.accepted[gate] = ("held", None)  # cancelled below
        wait_for(
            lambda: client.get_job(gate)["status"] == "IN_PROGRESS",
            timeout=30,
            what="the gate job to hold the worker",
        )
        with ThreadPoolExecutor(8) as pool:
            accepted = [
                j for j in pool.map(lambda i: self.run(client, "held", {"i": i}), range(n)) if j
            ]
        self.kill_server()
        self.server.start()
        client = self.server.client
        t0 = time.perf_counter()
        client.cancel(gate)

        def drained() -> bool:
            jobs = client.request("GET", "/apps/durable/held/health").json()["jobs"]
            return jobs["in_queue"] + jobs["in_progress"] == 0

        wait_for(drained, timeout=600, interval=0.2, what="the deep queue to drain")
        elapsed = time.perf_counter() - t0
        log(f"deep queue: {len(accepted)} jobs drained in {elapsed:.1f} s after a restart")
        return {"jobs": len(accepted), "drain_s": round(elapsed, 2)}

    def large_inputs(self, k: int) -> None:
        limit = DEFAULT_MAX_PAYLOAD
        client = self.server.client
        for _ in range(k):
            self.run(client, "size", {"blob": "x" * (limit - 64)})
        before = len(stored(self.server))
        over = json.dumps({"input": {"blob": "x" * limit}}).encode()
        headers = {"Authorization": f"Bearer {self.server.token}"}
        url = self.server.url + "/v1/apps/durable/size/run"
        for i in range(2 * k):
            content: Any = (
                over if i % 2 else (over[j : j + 2**20] for j in range(0, len(over), 2**20))
            )
            resp = httpx.post(url, content=content, headers=headers, timeout=60)
            assert resp.status_code == 413, resp.text
            self.ledger.bad_inputs["over_the_payload_limit"] += 1
        assert len(stored(self.server)) == before, "a refused body left a job behind"


def templates_and_workers(server: LocalServer) -> tuple[list[int], list[int]]:
    """Template processes and workers. A template runs `ember.worker.template` and is the
    server's child (or grandchild, under a sandbox's launcher); its forks run that command line
    too, as its children or, once it is gone, as orphans: workers."""
    assert server.proc is not None
    tag = "ember.worker.template"
    templates, workers = [], []
    for pid in worker_pids(server.data_dir):
        cmd, ppid = cmdline(pid), parent_pid(pid) or 0
        near = (ppid, parent_pid(ppid) or 0)
        if tag in cmd and tag not in cmdline(ppid) and server.proc.pid in near:
            templates.append(pid)
        elif "ember.worker" in cmd:
            workers.append(pid)
    return templates, sorted(workers)


def stored(server: LocalServer) -> dict[str, tuple[str, Any]]:
    """Every job row: id -> (status, output), read from the server's SQLite file."""
    uri = f"file:{server.data_dir / 'ember.db'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=30)) as db:
        rows = db.execute("SELECT id, status, output FROM jobs").fetchall()
    return {i: (s, None if o is None else json.loads(o)) for i, s, o in rows}


def account(bench: Bench, timeout: float) -> dict[str, Any]:
    """Wait for every accepted job to end; count the lost ones (missing, never ended, or
    COMPLETED without the output its input asks for)."""
    accepted = bench.ledger.accepted

    def settled() -> dict[str, tuple[str, Any]] | None:
        rows = stored(bench.server)
        return rows if all(rows.get(j, ("",))[0] in TERMINAL for j in accepted) else None

    try:
        rows = wait_for(settled, timeout=timeout, interval=1.0, what="every job to end")
    except TimeoutError:
        rows = stored(bench.server)
    statuses: Counter[str] = Counter()
    lost: list[str] = []
    for job_id, (_fn, expected) in accepted.items():
        status, output = rows.get(job_id, ("MISSING", None))
        statuses[status] += 1
        if status not in TERMINAL or (status == "COMPLETED" and output != expected):
            lost.append(job_id)
    errors: Counter[str] = Counter()
    uri = f"file:{bench.server.data_dir / 'ember.db'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=30)) as db:
        for (error,) in db.execute("SELECT error FROM jobs WHERE status = 'FAILED'"):
            errors[json.loads(error).get("type", "?") if error else "none"] += 1
    return {
        "statuses": dict(statuses),
        "failed_by_reason": dict(errors),
        "lost": len(lost),
        "lost_ids": lost[:20],
    }


def run_throughput(durability: str, seconds: float, clients: int) -> float:
    """/run jobs accepted per second by a fresh server with `--durability durability`."""
    with tempfile.TemporaryDirectory(prefix="ember-durability-") as tmp:
        server = LocalServer(Path(tmp) / "data", ["--durability", durability])
        server.start()
        try:
            path = Path(tmp) / "noop_app.py"
            path.write_text(
                "import ember\napp = ember.App('tp')\n\n@app.function(max_workers=2)\n"
                "def noop() -> None:\n    return None\n"
            )
            deploy_file(path, client=server.client)
            request = loadgen.request_bytes(
                "POST",
                server.url + "/v1/apps/tp/noop/run",
                {"input": {}},
                {"Authorization": f"Bearer {server.token}"},
            )

            def check(status: int, body: bytes) -> None:
                if status != 202:
                    raise ValueError(f"{status}: {body[:200]!r}")

            latencies, errors, elapsed = loadgen.closed_loop(
                server.url, request, check, clients, seconds
            )
            if errors:
                log(f"--durability {durability}: {errors} calls were not answered 202")
            return len(latencies) / elapsed
        finally:
            server.shutdown()


def throughput(rounds: int, seconds: float, clients: int) -> dict[str, Any]:
    figures: dict[str, list[float]] = {"normal": [], "full": []}
    for _ in range(rounds):
        for mode in figures:
            figures[mode].append(run_throughput(mode, seconds, clients))
            log(f"/run throughput, --durability {mode}: {figures[mode][-1]:.0f} jobs/s")
    normal, full = (statistics.median(v) for v in figures.values())
    return {
        "clients": clients,
        "seconds_per_run": seconds,
        "runs": {k: [round(x) for x in v] for k, v in figures.items()},
        "normal_jobs_per_s": round(normal),
        "full_jobs_per_s": round(full),
        "full_over_normal": round(full / normal, 3),
    }


def fuzz(examples: int) -> dict[str, int]:
    """tests/test_openapi_fuzz.py, with `examples` per operation: the cases it sent."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "fuzz.json"
        env = {
            **os.environ,
            "EMBER_FUZZ_EXAMPLES": str(examples),
            "EMBER_FUZZ_REPORT": str(report),
        }
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "tests/test_openapi_fuzz.py",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"the fuzzer failed:\n{proc.stdout[-5000:]}{proc.stderr[-2000:]}")
        counts: dict[str, int] = json.loads(report.read_text())
        return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="about a minute: fewer of each")
    parser.add_argument("--server-kills", type=int, help="kill -9 of the server (default 5)")
    parser.add_argument("--threads", type=int, default=4, help="submitting clients (default 4)")
    parser.add_argument("--storm-s", type=float, help="seconds of kill storm (default 20)")
    parser.add_argument("--deep", type=int, help="jobs in the deep queue (default 5000)")
    parser.add_argument("--large", type=int, help="inputs near the payload limit (default 3)")
    parser.add_argument("--fuzz-examples", type=int, help="fuzzer examples (default 20; 0: none)")
    parser.add_argument(
        "--throughput-s", type=float, help="seconds per /run throughput run, 0 for none (default 4)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "durability.json")
    args = parser.parse_args()
    q = args.quick
    kills = args.server_kills if args.server_kills is not None else (2 if q else 5)
    storm_s = args.storm_s if args.storm_s is not None else (6.0 if q else 20.0)
    deep = args.deep if args.deep is not None else (1000 if q else 5000)
    large = args.large if args.large is not None else (1 if q else 3)
    examples = args.fuzz_examples if args.fuzz_examples is not None else (5 if q else 20)
    tp_s = args.throughput_s if args.throughput_s is not None else (2.0 if q else 4.0)

    ledger = Ledger()
    t0 = time.perf_counter()
    result: dict[str, Any] = {"machine": machine()}
    with tempfile.TemporaryDirectory(prefix="ember-durability-") as tmp:
        bench = Bench(Path(tmp), ledger)
        bench.server.start()
        ok = False
        try:
            bench.deploy()
            bench.server_kills(kills, args.threads)
            bench.storm(storm_s, args.threads)
            deep_queue = bench.deep_queue(deep)
            bench.large_inputs(large)
            figures = account(bench, timeout=300)
            ok = True
        finally:
            try:
                bench.server.shutdown()
                workers_left = 0
            except WorkersOutlived as exc:
                workers_left = len(exc.pids)
            if not ok:
                log(f"server log:\n{bench.server.log()[-5000:]}")
    if examples:
        counts = fuzz(examples)
        ledger.bad_inputs["fuzzer_requests"] = counts["cases"]
        ledger.bad_inputs["fuzzer_schema_violations"] = counts["negative"]
        log(f"fuzzer: {counts}")
    result.update(
        jobs_accepted=len(ledger.accepted),
        faults_injected={**dict(ledger.faults), "total": sum(ledger.faults.values())},
        bad_inputs_tried={**dict(ledger.bad_inputs)},
        refused_while_submitting={str(k): v for k, v in ledger.refused.items()},
        lost=figures["lost"],
        completed=figures["statuses"].get("COMPLETED", 0),
        failed=figures["statuses"].get("FAILED", 0),
        statuses=figures["statuses"],
        failed_by_reason=figures["failed_by_reason"],
        deep_queue=deep_queue,
        workers_left_after_stop=workers_left,
    )
    if figures["lost"]:
        result["lost_ids"] = figures["lost_ids"]
    if tp_s:
        result["run_throughput"] = throughput(3, tp_s, 16)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    emit(result, args.out)
    return 1 if figures["lost"] or workers_left else 0


if __name__ == "__main__":
    sys.exit(main())
