"""What both benchmarks share (ember's and Ray Serve's): percentiles, summaries, CPU time, memory
and parent of a process, the machine. Standard library only, since bench/ray_serve.py runs in a
virtualenv without ember."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, TypeVar

C = TypeVar("C")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def summary(values_ms: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(values_ms, 50), 3),
        "p99_ms": round(percentile(values_ms, 99), 3),
        "mean_ms": round(statistics.fmean(values_ms), 3) if values_ms else math.nan,
        "min_ms": round(min(values_ms), 3) if values_ms else math.nan,
        "max_ms": round(max(values_ms), 3) if values_ms else math.nan,
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc; NaN elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(") ", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parent_pid(pid: int) -> int | None:
    """The parent's pid (Linux /proc; None where there is none or the process is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(") ", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def cmdline(pid: int) -> str:
    """The command line of a process, space-separated ("" where it is gone or unreadable)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


SMAPS_FIELDS = ("Rss", "Pss", "Shared_Clean", "Shared_Dirty", "Private_Clean", "Private_Dirty")
SMAPS_ANON = ("Anonymous", "Pss_Anon")  # Pss_Anon: Linux >= 5.9


def smaps_rollup(pid: int) -> dict[str, float] | None:
    """A process's memory from /proc/PID/smaps_rollup, in MiB: `rss_mib`, `pss_mib` (each page
    divided among the processes that map it), `shared_mib` (Shared_Clean + Shared_Dirty: pages
    another process maps too), `private_mib` (Private_Clean + Private_Dirty), and where the kernel
    has them `anon_mib` and `pss_anon_mib` (anonymous memory: the heap, where a loaded model lives,
    not files such as shared libraries). None where it is unreadable (the process is gone, or no
    Linux >= 4.14)."""
    kib: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in SMAPS_FIELDS or key in SMAPS_ANON:
                    kib[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if not set(SMAPS_FIELDS) <= set(kib):
        return None
    out = {
        "rss_mib": kib["Rss"] / 1024,
        "pss_mib": kib["Pss"] / 1024,
        "shared_mib": (kib["Shared_Clean"] + kib["Shared_Dirty"]) / 1024,
        "private_mib": (kib["Private_Clean"] + kib["Private_Dirty"]) / 1024,
    }
    if "Anonymous" in kib:
        out["anon_mib"] = kib["Anonymous"] / 1024
    if "Pss_Anon" in kib:
        out["pss_anon_mib"] = kib["Pss_Anon"] / 1024
    return {k: round(v, 1) for k, v in out.items()}


def machine(**versions: str) -> dict[str, Any]:
    """CPU model, cores, Python and platform, plus the versions a benchmark names."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        **versions,
    }


def closed_loop(
    clients: int,
    duration: float,
    connect: Callable[[], AbstractContextManager[C]],
    call: Callable[[C], None],
    on_start: Callable[[], None] = lambda: None,
) -> tuple[list[float], int, float]:
    """`clients` threads, each with its own client (`connect`), calling `call` back to back for
    `duration` seconds once every one has made a first call (its connection is open before the
    clock starts); `on_start` runs just before. Latencies (ms), errors, seconds elapsed."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    start = threading.Barrier(clients + 1)
    stop_at = [time.perf_counter() + 3600]

    def worker(i: int) -> None:
        with connect() as client:
            call(client)
            start.wait()
            mine = latencies[i]
            while time.perf_counter() < stop_at[0]:
                t0 = time.perf_counter()
                try:
                    call(client)
                except Exception:
                    errors[i] += 1
                    continue
                mine.append((time.perf_counter() - t0) * 1000)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    on_start()
    start.wait()
    t0 = time.perf_counter()
    stop_at[0] = t0 + duration
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    return [x for lat in latencies for x in lat], sum(errors), elapsed


def emit(result: dict[str, Any], path: Path) -> None:
    """Print a benchmark's result as JSON and write it to `path`."""
    text = json.dumps(result, indent=2)
    print(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    log(f"written to {path}")
