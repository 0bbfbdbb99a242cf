"""`make demo`: a tour of ember in about ten seconds, on this machine, with nothing left running.

It starts `ember server` on a free port with a temporary data dir, deploys examples/hello.py with
the CLI, calls its functions through the Python SDK (sync, async, stream, map, a class method),
prints each call's timings, and stops the server, checking that no worker outlived it.

    .venv/bin/python examples/demo.py [--keep]     # --keep: leave the data dir for a look
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

import ember
from ember.testing import LocalServer, wait_for, worker_pids

HERE = Path(__file__).resolve().parent
console = Console(highlight=False)


class DemoServer(LocalServer):
    """`ember server` as a subprocess (free port, temporary data dir, log in a file), plus the
    `ember` CLI pointed at it."""

    def __init__(self, root: Path) -> None:
        super().__init__(root / "data", log_path=root / "server.log")

    def cli(self, *args: str) -> str:
        """Run `ember ARGS...` against this server and return what it printed."""
        done = subprocess.run(
            [sys.executable, "-m", "ember.cli.main", *args],
            # on a terminal, tables fit it; piped, they print whole (and so does this)
            env={**self.env, "COLUMNS": str(console.width) if console.is_terminal else ""},
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"`ember {' '.join(args)}` failed:\n{done.stdout}{done.stderr}")
        return done.stdout


class Calls:
    """Each call's latency terms, as the server measured them, for the table at the end."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, dict[str, Any] | None, float]] = []

    def add(self, call: str, body: dict[str, Any] | None, rtt: float) -> None:
        """`body` is the job body (timings and cost), or None where only outputs came back."""
        self.rows.append((call, body, rtt))

    def table(self) -> Table:
        terms = ("queue_ms", "cold_start_ms", "load_ms", "exec_ms", "post_ms", "total_ms")
        table = Table(
            title="each call's latency terms in ms, as the server measured them, and its cost",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
        )
        table.add_column("call", no_wrap=True)
        for head in ("queue", "cold", "load", "exec", "post", "total", "client", "cost µ$"):
            table.add_column(head, justify="right", no_wrap=True, min_width=len(head))
        for call, body, rtt in self.rows:
            timings = body["timings"] if body else None
            cells = [f"{timings[t]:.1f}" for t in terms] if timings else ["-"] * 6
            cost = f"{body['cost']['usd'] * 1e6:.2f}" if body and body.get("cost") else "-"
            table.add_row(call, *cells, f"{rtt * 1000:.1f}", cost)
        return table


def runsync(fn: ember.Function, **kwargs: Any) -> tuple[Any, dict[str, Any], float]:
    """What `fn.remote(**kwargs)` does (one POST /runsync), keeping the whole job body, whose
    `timings` the demo shows; `fn.remote` itself returns only the output."""
    t0 = time.perf_counter()
    body = fn.client.runsync(fn.app_name, fn.name, kwargs)
    while body["status"] in ("IN_QUEUE", "IN_PROGRESS"):  # runsync answered 202: still running
        body = ember.Job(body["id"]).wait(timeout=60)
    rtt = time.perf_counter() - t0
    if body["status"] != "COMPLETED":
        raise RuntimeError(f"{fn!r} ended {body['status']}: {body['error']}")
    return body["output"], body, rtt


def tour(server: DemoServer) -> None:
    calls = Calls()

    console.rule("[bold]1. deploy examples/hello.py with the CLI")
    console.print(f"$ EMBER_URL={server.url} ember deploy examples/hello.py")
    console.print(
        server.cli("deploy", str(HERE / "hello.py")).rstrip(), markup=False, soft_wrap=True
    )

    # The SDK finds the server through ember.configure (or EMBER_URL / EMBER_TOKEN).
    ember.configure(url=server.url, token=server.token)
    square = ember.Function.lookup("hello", "square")
    slow_square = ember.Function.lookup("hello", "slow_square")
    countdown = ember.Function.lookup("hello", "countdown")
    add = ember.Function.lookup("hello", "Counter.add")

    console.rule("[bold]2. square.remote(x): synchronous calls")
    out, body, rtt = runsync(square, x=3)
    console.print(f"square.remote(3) = {out}   cold: no worker existed, one was started")
    calls.add("square(3) remote, cold", body, rtt)
    out, body, rtt = runsync(square, x=4)
    console.print(f"square.remote(4) = {out}   warm: the same worker served it")
    calls.add("square(4) remote, warm", body, rtt)
    t0 = time.perf_counter()
    out = square.remote(5)
    console.print(f"square.remote(5) = {out}   (the plain SDK call; returns the output only)")
    calls.add("square(5) remote", None, time.perf_counter() - t0)

    console.rule("[bold]3. square.spawn(x): asynchronous, a durable job")
    t0 = time.perf_counter()
    job = square.spawn(6)
    console.print(f"job = square.spawn(6)  ->  job id {job.id}  (status {job.status()})")
    out = job.result(timeout=30)
    console.print(f"job.result() = {out}")
    calls.add("square(6) spawn", job.info(), time.perf_counter() - t0)

    console.rule("[bold]4. countdown: a generator, streamed as it yields")
    t0 = time.perf_counter()
    job = countdown.spawn(n=5, delay=0.1)  # countdown.stream(n=5) is the one-line form
    console.print("countdown.stream(n=5): ", end="")
    values = []
    for value in job.stream():
        values.append(value)
        console.print(f"{value} [dim](+{(time.perf_counter() - t0) * 1000:.0f} ms)[/dim] ", end="")
    console.print()
    calls.add("countdown(5) stream", job.info(), time.perf_counter() - t0)

    console.rule("[bold]5. slow_square.map(range(8)): fan out over several workers")
    t0 = time.perf_counter()
    results = list(slow_square.map(range(8)))  # each call sleeps 0.2 s
    wall = time.perf_counter() - t0
    console.print(f"list(slow_square.map(range(8))) = {results}")
    calls.add("slow_square.map(8 calls)", None, wall)
    # Each line a worker prints is logged with its job id and worker id.
    lines = wait_for(
        lambda: len(logs := slow_square.client.logs("hello", "slow_square")) >= 8 and logs,
        timeout=10,
        interval=0.05,
        what="the workers' log lines",
    )
    served = sorted({line["worker"] for line in lines})
    console.print(
        f"8 calls of 0.2 s each took {wall:.2f} s (1.6 s one after another): "
        f"{len(served)} workers served them ({', '.join(served)}; max_workers=4)"
    )
    console.print("$ ember logs hello/slow_square --tail 3   (worker output, with job ids)")
    console.print(
        server.cli("logs", "hello/slow_square", "--tail", "3").rstrip(),
        markup=False,
        soft_wrap=True,
    )

    console.rule("[bold]6. Counter().add: a class; @ember.enter runs once per worker")
    out, body, rtt = runsync(add, n=5)
    console.print(f"Counter().add.remote(5) = {out}   (enter hook set start=100 on a new worker)")
    calls.add("Counter.add(5) cold", body, rtt)
    out, body, rtt = runsync(add, n=5)
    console.print(f"Counter().add.remote(5) = {out}   (same worker, same instance)")
    calls.add("Counter.add(5) warm", body, rtt)

    console.rule("[bold]7. timings")
    console.print(calls.table())
    console.print(
        "[dim]total = queue + cold + load + exec + post. queue: waiting for a worker slot; "
        "cold: starting a worker process; load: @ember.enter hooks; exec: your code; post: "
        "result delivery. client: the round trip as the caller saw it, HTTP included. Warm "
        "calls show 0 cold start and 0 load. cost: millionths of a dollar, the job's execution "
        "plus the cold start it waited for (CPU and memory prices; no GPU here). "
        "(- : .remote() and .map() return outputs only.)[/dim]"
    )

    console.rule("[bold]8. usage: every worker-second metered, by function")
    console.print("$ ember usage --by function")
    console.print(server.cli("usage", "--by", "function").rstrip(), markup=False, soft_wrap=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the data dir and server log")
    args = parser.parse_args()
    # SIGTERM (like Ctrl-C) unwinds through the `finally` below, which stops the server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="ember-demo-"))
    server = DemoServer(root)
    console.rule("[bold]ember demo")
    console.print(f"starting `ember server --port {server.port} --data-dir {server.data_dir}`")
    console.print(f"[dim]server log: {server.log_path}[/dim]")
    ok = interrupted = False
    try:
        server.start()
        console.print(f"server up at {server.url} ({time.perf_counter() - started:.1f} s)")
        tour(server)
        ok = True
    except (KeyboardInterrupt, SystemExit):
        interrupted = True
    finally:
        # Cleanup must finish: a second Ctrl-C must not leave the server running. (It is
        # bounded: SIGTERM, at most 30 s, then SIGKILL.)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        console.rule("[bold]9. stop the server")
        with contextlib.suppress(Exception):
            server.workers()  # remember their pids, to check that they are gone after the stop
        with_workers = len(server.seen_workers | set(worker_pids(server.data_dir)))
        try:
            # SIGTERM, SIGKILL after 30 s; then any worker still running is killed and an error.
            if server.shutdown() == -signal.SIGKILL:
                console.print("[red]server did not stop in 30 s: it was killed[/red]")
            workers = f"{with_workers} worker{'' if with_workers == 1 else 's'}"
            console.print(f"server stopped by SIGTERM; it had {workers}, none is left running")
        except Exception as exc:
            ok = False
            console.print(f"[red]{exc}[/red]")
        if interrupted:
            console.print("[yellow]interrupted[/yellow]")
            shutil.rmtree(root, ignore_errors=True)
        elif not ok:
            tail = server.log()[-3000:]
            console.print(f"[red]demo failed; server log ({server.log_path}):[/red]\n{tail}")
        elif args.keep:
            console.print(f"data dir kept: {server.data_dir}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    if ok:
        console.print(
            f"[bold green]demo done in {time.perf_counter() - started:.1f} s[/bold green]"
        )
    return 130 if interrupted else 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
