"""Does watching cost the warm path? bench/core.py's warm phase, plain and watched, alternating.

One `ember server` with bench/core.py's no-op deployed and warm. Rounds alternate: a plain round,
then a watched one, and so on. Each round is bench/core.py's warm phase in small: sequential
POST /runsync on one keep-alive connection (p50, p99), then 32 closed-loop clients (calls/s).
In a watched round, headless Chromium (Debian's, through Playwright) has the dashboard's overview
open at /ui (it polls GET /v1/series every second and redraws its charts) and a second page on
its job table (refreshed every 2 s), while a thread scrapes GET /metrics every second.

Alternating rounds on one server cancel most drift of a shared machine; the medians over the
rounds of each kind are compared. The browser runs on the same cores as the server, the
workers and the load: what it costs to draw the pages is in the figures, as it would be for an
operator watching the dashboard on the server's own machine.

    .venv/bin/python bench/watch.py               # 3 rounds of each, about a minute and a half
    .venv/bin/python bench/watch.py --rounds 5 --warm-n 2000 --duration 5

Prints JSON to stdout and writes it to bench/results/watch.json. Needs Playwright (the dev
extra) and Chromium at /usr/bin/chromium (or --chromium PATH). A benchmark: asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import queue
import statistics
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import loadgen
from core import (
    APP,
    BENCH_APP,
    BURST_MAX_WORKERS,
    BURST_WORK_S,
    BenchServer,
    _completed,
    runsync_path,
    with_server,
)
from stats import cpu_seconds, emit, log, machine, summary

from ember.testing import wait_for

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "watch.json"


class Watchers:
    """The dashboard open in headless Chromium, and /metrics scraped every second, in a process
    of their own (so that they take nothing from the load generator's interpreter), until
    `stop()`; what they asked the server is counted, so a watched round shows it was watched."""

    def __init__(
        self,
        server: BenchServer,
        chromium: str,
        which: set[str],
        nice: int = 0,
        routes: tuple[str, ...] = ("#/overview",),
    ) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.halt = ctx.Event()
        self.ready = ctx.Event()
        self.report: Any = ctx.Queue()
        self.proc = ctx.Process(
            target=watch,
            args=(server.url, server.token, chromium, sorted(which), self.halt, self.ready),
            kwargs={"report": self.report, "nice": nice, "routes": routes},
            daemon=True,
        )
        self.seen: dict[str, Any] = {}

    def start(self) -> Watchers:
        self.proc.start()
        if not self.ready.wait(60):
            self.stop()
            raise RuntimeError(f"the dashboard did not open: {self.seen}")
        return self

    def stop(self) -> dict[str, Any]:
        self.halt.set()
        with contextlib.suppress(queue.Empty):
            self.seen = self.report.get(timeout=30)
        self.proc.join(30)
        return self.seen


def watch(
    url: str,
    token: str,
    chromium: str,
    which: list[str],
    halt: Any,
    ready: Any,
    report: Any,
    nice: int = 0,
    routes: tuple[str, ...] = ("#/overview",),
) -> None:
    """The watchers' process: a browser on the overview and the job table, a /metrics scraper
    on a thread; puts its counts and the browser's CPU seconds on `report` at the end."""
    seen: dict[str, Any] = {"series_polls": 0, "job_lists": 0, "scrapes": 0, "errors": []}
    if nice:
        os.nice(nice)  # the browser and the scraper inherit it

    def count(request_url: str) -> None:
        if "/v1/series" in request_url:
            seen["series_polls"] += 1
        elif "/v1/jobs?" in request_url or request_url.endswith("/v1/jobs"):
            seen["job_lists"] += 1

    def scrape() -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as client:
            while not halt.wait(1.0):
                resp = client.get("/metrics")
                if resp.status_code == 200:
                    seen["scrapes"] += 1
                else:
                    seen["errors"].append(f"/metrics: HTTP {resp.status_code}")

    def replay() -> None:
        """What the two pages ask, without a browser: the overview's series every second (the
        hour once a minute, else the last minute) and the job table every 2 s."""
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as client:
            tick = 0
            while not halt.wait(1.0):
                window = 3600 if tick % 60 == 0 else 60
                client.get("/v1/series", params={"window": window, "step": 30})
                seen["series_polls"] += 1
                if tick % 2 == 0:
                    client.get("/v1/jobs", params={"limit": 50})
                    seen["job_lists"] += 1
                tick += 1

    helpers = [
        threading.Thread(target=run, daemon=True)
        for name, run in (("metrics", scrape), ("replay", replay))
        if name in which
    ]
    for helper in helpers:
        helper.start()
    if "browser" not in which:
        ready.set()
        halt.wait()
    else:
        from playwright.sync_api import sync_playwright

        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(
                    executable_path=chromium, args=["--no-sandbox"], headless=True
                )
                pages = []
                for route in routes:
                    page = browser.new_page(viewport={"width": 1280, "height": 800})
                    page.on("request", lambda r: count(r.url))
                    page.on("pageerror", lambda e: seen["errors"].append(str(e)))
                    page.goto(f"{url}/ui/")
                    page.fill("#token", token)
                    page.click("#signin")
                    page.wait_for_selector("#workspace:not(:empty)")
                    page.goto(f"{url}/ui/{route}")
                    pages.append(page)
                pages[0].wait_for_selector(
                    "#chart-latency" if routes[0] == "#/overview" else "main"
                )
                cpu0 = _tree_cpu(os.getpid())
                ready.set()
                while not halt.is_set():
                    pages[0].wait_for_timeout(200)  # the pages poll on their own timers
                seen["browser_cpu_s"] = round(_tree_cpu(os.getpid()) - cpu0, 2)
                browser.close()
        except Exception as exc:
            seen["errors"].append(f"{type(exc).__name__}: {exc}")
            ready.set()
    for helper in helpers:
        helper.join(5)
    report.put(seen)


def _tree_cpu(pid: int) -> float:
    """CPU seconds of `pid`'s descendants (the browser's processes), from /proc."""
    total = 0.0
    for child in Path("/proc").iterdir():
        if not child.name.isdigit() or int(child.name) == pid:
            continue
        seen, p = 0, int(child.name)
        while p > 1 and seen < 8:  # is `pid` an ancestor?
            try:
                p = int((Path("/proc") / str(p) / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                break
            if p == pid:
                total += cpu_seconds(int(child.name))
                break
            seen += 1
    return total


def settle(server: BenchServer) -> None:
    """Wait until the server has written the last round's job rows: `GET /v1/usage` waits for
    the store's writer to drain (a round leaves tens of thousands of rows queued, and what is
    still being written when the next round starts would be charged to that round)."""
    with server.http_client() as client:
        client.get("/v1/usage").raise_for_status()
    time.sleep(0.5)


def one_round(server: BenchServer, warm_n: int, clients: int, duration: float) -> dict[str, Any]:
    url = server.url + runsync_path("noop")
    request = loadgen.request_bytes("POST", url, {"input": {}}, server.headers)
    assert server.proc is not None
    cpu0 = cpu_seconds(server.proc.pid)
    sequential = loadgen.sequential(server.url, request, _completed, warm_n, warm_n // 10)
    latencies, errors, elapsed = loadgen.closed_loop(
        server.url, request, _completed, clients, duration
    )
    return {
        "warm": summary(sequential),
        "calls_per_s": round(len(latencies) / elapsed, 1),
        "throughput_errors": errors,
        "server_cpu_s": round(cpu_seconds(server.proc.pid) - cpu0, 2),
    }


def _median(rounds: list[dict[str, Any]], pick: Any) -> float:
    return round(statistics.median(pick(r) for r in rounds), 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each kind (default 3)")
    parser.add_argument("--warm-n", type=int, default=1000, help="sequential calls a round")
    parser.add_argument("--duration", type=float, default=4.0, help="throughput seconds a round")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument(
        "--watchers",
        default="browser,metrics",
        help="what watches in a watched round, comma-separated: browser (the dashboard in "
        "Chromium), metrics (a /metrics scrape every second), replay (the dashboard's own "
        "requests from a plain client, as from a browser on another machine); default "
        "browser,metrics",
    )
    parser.add_argument(
        "--pages",
        default="overview",
        help="the dashboard's pages open, a tab each (overview, jobs, apps...): default the "
        "overview, whose live charts poll every second",
    )
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run the watchers at this niceness (19: they take only what the server leaves, as "
        "a browser on another machine would); default 0, the same priority as the server",
    )
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="the browser to drive")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    def body(server: BenchServer) -> dict[str, Any]:
        server.deploy(
            textwrap.dedent(BENCH_APP).format(
                min_workers=1,
                max_workers=1,
                concurrency=32,
                burst_max_workers=BURST_MAX_WORKERS,
                burst_work_s=BURST_WORK_S,
            )
        )
        with server.http_client() as c:
            wait_for(
                lambda: c.get(f"/v1/apps/{APP}/noop/health").json()["workers"].get("idle", 0),
                timeout=60,
                interval=0.05,
                what="the no-op's worker",
            )
        plain: list[dict[str, Any]] = []
        watched: list[dict[str, Any]] = []
        seen: dict[str, Any] = {"series_polls": 0, "job_lists": 0, "scrapes": 0, "errors": []}
        one_round(server, args.warm_n // 2, args.clients, 1.0)  # warm everything up, untimed
        for i in range(args.rounds):
            log(f"round {i + 1}/{args.rounds}: plain")
            settle(server)
            plain.append(one_round(server, args.warm_n, args.clients, args.duration))
            log(f"round {i + 1}/{args.rounds}: watched (dashboard open, /metrics every 1 s)")
            which = set(args.watchers.split(","))
            settle(server)
            routes = tuple(f"#/{page}" for page in args.pages.split(","))
            watchers = Watchers(server, args.chromium, which, args.nice, routes).start()
            try:
                watched.append(one_round(server, args.warm_n, args.clients, args.duration))
            finally:
                watchers.stop()
            watched[-1]["watchers"] = watchers.seen
            for key, value in watchers.seen.items():
                seen[key] = seen.get(key, 0 if key != "errors" else []) + value
        out: dict[str, Any] = {"plain_rounds": plain, "watched_rounds": watched, "watchers": seen}
        for name, rounds in (("plain", plain), ("watched", watched)):
            out[name] = {
                "warm_p50_ms": _median(rounds, lambda r: r["warm"]["p50_ms"]),
                "warm_p99_ms": _median(rounds, lambda r: r["warm"]["p99_ms"]),
                "calls_per_s": _median(rounds, lambda r: r["calls_per_s"]),
            }
        out["delta_pct"] = {
            key: round((out["watched"][key] / out["plain"][key] - 1) * 100, 1)
            for key in out["plain"]
        }
        return out

    with tempfile.TemporaryDirectory(prefix="ember-bench-watch-") as tmp:
        server = BenchServer(Path(tmp))
        result, ok = with_server(server, body)
    emit(
        {
            "what": "bench/core.py's warm phase, plain rounds and watched rounds alternating "
            "(dashboard overview and job table open in headless Chromium, /metrics scraped "
            "every second); medians over the rounds of each kind",
            "rounds": args.rounds,
            "watchers_on": args.watchers,
            "watchers_nice": args.nice,
            "pages": args.pages,
            "warm_n": args.warm_n,
            "clients": args.clients,
            "duration_s": args.duration,
            "machine": machine(),
            **result,
        },
        args.output,
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
