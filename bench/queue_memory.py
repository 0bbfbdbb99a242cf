"""Queue memory benchmark: how much server memory one queued job holds.

Starts a real `ember server` (free port, temporary data dir), deploys a class whose `@enter` hook
never returns, so its one worker never becomes ready and every call stays queued, queues a
warm-up batch, reads the server's RSS, queues N more jobs (default 20,000) with an input of
about 100 bytes through `POST /run`, reads the RSS again, and reports the growth per queued job.
The figure bounds what `--max-queued-jobs` costs the server per workspace. Prints JSON and
writes it to bench/results/queue_memory.json; progress goes to stderr.

    .venv/bin/python bench/queue_memory.py              # 20,000 jobs
    .venv/bin/python bench/queue_memory.py --jobs 2000  # a quick look

This is a benchmark, not a test: it asserts nothing about memory.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stats import emit, log, machine

from ember.sdk.deploy import deploy_file
from ember.testing import LocalServer

RESULTS = Path(__file__).resolve().parent / "results" / "queue_memory.json"
APP = "qmem"
SOURCE = """
import time

import ember

app = ember.App("qmem")


@app.cls(max_workers=1, timeout=3600)
class Stuck:
    @ember.enter()
    def never_ready(self):
        time.sleep(3600)

    @ember.method()
    def work(self, text: str = "", n: int = 0) -> int:
        return n
"""
WARMUP = 1000
THREADS = 8


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def queue(server: LocalServer, count: int, start: int) -> float:
    """Queue `count` jobs from THREADS clients; seconds taken."""
    text = "x" * 80

    def worker(part: range) -> None:
        with httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {server.token}"}, timeout=60
        ) as http:
            for i in part:
                resp = http.post(
                    f"/v1/apps/{APP}/Stuck.work/run", json={"input": {"text": text, "n": i}}
                )
                resp.raise_for_status()

    t0 = time.perf_counter()
    parts = [range(start + k, start + count, THREADS) for k in range(THREADS)]
    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(worker, parts))
    return time.perf_counter() - t0


def in_queue(server: LocalServer) -> int:
    resp = httpx.get(
        f"{server.url}/v1/apps/{APP}/Stuck.work/health",
        headers={"Authorization": f"Bearer {server.token}"},
    )
    n: int = resp.json()["jobs"]["in_queue"]
    return n


def settled_rss(pid: int) -> int:
    """RSS once the store's writes of the last calls are done (it stops moving)."""
    last = rss_bytes(pid)
    for _ in range(20):
        time.sleep(0.25)
        now = rss_bytes(pid)
        if abs(now - last) < 64 * 1024:
            return now
        last = now
    return last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ember-qmem-") as tmp:
        server = LocalServer(
            Path(tmp) / "data", ["--max-queued-jobs", str(args.jobs + WARMUP + 10)]
        ).start()
        try:
            app = Path(tmp) / "qmem.py"
            app.write_text(textwrap.dedent(SOURCE))
            deploy_file(app, client=server.client)
            assert server.proc is not None
            pid = server.proc.pid
            log(f"warm-up: {WARMUP} jobs")
            queue(server, WARMUP, 0)
            before = settled_rss(pid)
            log(f"queueing {args.jobs} jobs")
            seconds = queue(server, args.jobs, WARMUP)
            after = settled_rss(pid)
            queued = in_queue(server)
        finally:
            server.stop()
    input_bytes = len('{"text":"' + "x" * 80 + '","n":12345}')
    result: dict[str, Any] = {
        "benchmark": "queue_memory",
        "jobs": args.jobs,
        "in_queue_at_end": queued,
        "input_bytes": input_bytes,
        "rss_before_mib": round(before / 2**20, 1),
        "rss_after_mib": round(after / 2**20, 1),
        "bytes_per_queued_job": round((after - before) / args.jobs),
        "queue_calls_per_s": round(args.jobs / seconds),
        "machine": machine(),
    }
    emit(result, RESULTS)


if __name__ == "__main__":
    main()
