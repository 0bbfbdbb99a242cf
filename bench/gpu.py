"""The GPU path of examples/embeddings.py: CUDA only after the fork, a GPU of its own per worker.

Starts an `ember server` (free port, temporary data dir), deploys examples/embeddings.py with
`EMBER_EXAMPLE_GPU` set to the type of this machine's GPUs (NVML), and measures:

- `cold_start`: rounds from zero (no worker, the last one's process gone), each timing one
  `Embedder.info` call end to end; with the job's `cold_start_ms` and `load_ms` (the per-worker
  `@ember.enter()` hook: CUDA initialisation and the model's move to the GPU) and the worker's own
  `cuda_init_s` and `to_device_s`. Each round checks that the worker was forked from the template
  (the model was loaded in another process) and that the template had not touched CUDA.
- `workers`: redeployed with one worker per GPU, all started by concurrent calls; each worker's
  `CUDA_VISIBLE_DEVICES` and device, which must differ from worker to worker.
- `warm_embed`: sequential embed calls of 8 texts of 256 tokens on a warm GPU worker.

    .venv/bin/python bench/gpu.py                    # on a machine with NVIDIA GPUs
    .venv/bin/python bench/gpu.py --simulate L4:2    # anywhere: simulated GPUs, the model on CPU

With `--simulate`, the server is given simulated GPUs (`ember server --gpus`): the placement and
the fork path are the same, but torch finds no CUDA and the model stays on the CPU. Prints JSON
and writes it to bench/results/gpu.json. A benchmark, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from core import (
    MODEL_APP,
    MODEL_LONG_TEXT,
    MODEL_UNIT,
    BenchServer,
    call,
    deploy_model,
    model_missing,
    unit_workers,
    versions,
    wait_for_zero,
    with_server,
)
from stats import emit, log, summary

from ember.backends.gpus import discover
from ember.core.placement import parse_declared

RESULTS = Path(__file__).resolve().parent / "results" / "gpu.json"
INFO = f"{MODEL_UNIT}.info"
EMBED = f"{MODEL_UNIT}.embed"


def cold_start(server: BenchServer, n: int) -> dict[str, Any]:
    rounds: list[dict[str, Any]] = []
    with server.http_client() as client:
        for i in range(n):
            wait_for_zero(client, MODEL_APP, MODEL_UNIT)
            t0 = time.perf_counter()
            body = call(client, INFO, MODEL_APP)
            e2e = (time.perf_counter() - t0) * 1000
            info, t = body["output"], body["timings"]
            if t["cold_start_ms"] <= 0:
                raise RuntimeError(f"round {i}: the call found a warm worker: {t}")
            rounds.append(
                {
                    "end_to_end_ms": round(e2e, 1),
                    "cold_start_ms": round(t["cold_start_ms"], 1),
                    "load_ms": round(t["load_ms"], 1),
                    "cuda_init_ms": _ms(info["cuda_init_s"]),
                    "to_device_ms": _ms(info["to_device_s"]),
                    "forked": info["loaded_in_pid"] != info["pid"],
                    "template_touched_cuda": info["cuda_initialized_at_load"],
                    "device": info["device"],
                    "gpu": info["gpu"],
                    "cuda_visible_devices": info["cuda_visible_devices"],
                }
            )
            log(f"  cold {i + 1}/{n}: {e2e:.0f} ms, {rounds[-1]}")

    def col(key: str) -> dict[str, float] | None:
        values = [r[key] for r in rounds if r[key] is not None]
        return summary(values) if values else None

    return {
        "n": n,
        "end_to_end": col("end_to_end_ms"),
        "job_cold_start_ms": col("cold_start_ms"),
        "job_load_ms": col("load_ms"),
        "cuda_init_ms": col("cuda_init_ms"),
        "to_device_ms": col("to_device_ms"),
        "all_forked": all(r["forked"] for r in rounds),
        "template_touched_cuda": any(r["template_touched_cuda"] for r in rounds),
        "rounds": rounds,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def all_workers(server: BenchServer, gpus: int) -> dict[str, Any]:
    """One worker per GPU, started by concurrent long embed calls; then what each one sees."""

    def one(_: int) -> None:
        with server.http_client() as c:
            call(c, EMBED, MODEL_APP, {"texts": [MODEL_LONG_TEXT] * 8})

    with server.http_client() as client:
        for _ in range(5):
            if len(unit_workers(client, MODEL_APP, MODEL_UNIT)) >= gpus:
                break
            with ThreadPoolExecutor(gpus) as pool:
                list(pool.map(one, range(gpus)))
        workers = unit_workers(client, MODEL_APP, MODEL_UNIT)
        seen: dict[int, dict[str, Any]] = {}
        for _ in range(10 * gpus):  # calls land on every idle worker in turn
            if len(seen) >= len(workers):
                break
            with ThreadPoolExecutor(gpus) as pool:
                for body in pool.map(lambda _: call(client, INFO, MODEL_APP), range(gpus)):
                    info = body["output"]
                    seen[info["pid"]] = {
                        k: info[k]
                        for k in ("pid", "device", "gpu", "gpu_indexes", "cuda_visible_devices")
                    }
    indexes = [s["gpu_indexes"] for s in seen.values()]
    visible = [s["cuda_visible_devices"] for s in seen.values() if s["cuda_visible_devices"]]
    return {
        "workers": len(workers),
        "gpus_assigned_by_the_server": [w.get("gpus") for w in workers],
        "seen_by_the_workers": list(seen.values()),
        "each_worker_its_own_gpu": len(set(indexes)) == len(indexes) == len(workers)
        and len(set(visible)) == len(visible),
        "note": "gpu_indexes: EMBER_GPU_INDEXES, the assignment; cuda_visible_devices: what CUDA "
        "sees (empty for simulated GPUs, so that no real device is used)",
    }


def warm_embed(server: BenchServer, n: int) -> dict[str, Any]:
    latencies, exec_ms = [], []
    with server.http_client() as client:
        for i in range(n + 3):
            t0 = time.perf_counter()
            body = call(client, EMBED, MODEL_APP, {"texts": [MODEL_LONG_TEXT] * 8})
            if i >= 3:  # the first calls warm up the kernels
                latencies.append((time.perf_counter() - t0) * 1000)
                exec_ms.append(body["timings"]["exec_ms"])
    return {
        "what": "sequential embed calls of 8 texts of 256 tokens, after 3 untimed",
        "n": n,
        "end_to_end": summary(latencies),
        "job_exec_ms": summary(exec_ms),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--simulate", metavar="TYPE:N", help="simulated GPUs (ember server --gpus), e.g. L4:2"
    )
    parser.add_argument("--cold-n", type=int, default=5, help="cold starts from zero (default 5)")
    parser.add_argument("--warm-n", type=int, default=20, help="warm embed calls (default 20)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where to write the JSON")
    args = parser.parse_args()
    result: dict[str, Any] = {
        "benchmark": "bench/gpu.py",
        "command": " ".join(["python", "bench/gpu.py", *sys.argv[1:]]),
        "machine": versions(),
    }
    gpus = parse_declared(args.simulate) if args.simulate else discover()
    missing = model_missing()
    if not gpus or missing:
        result["skipped"] = missing or "no NVIDIA GPU here (NVML found none); try --simulate L4:2"
        log(f"skipped: {result['skipped']}")
        emit(result, args.output)
        return 0
    kind = gpus[0].type
    count = sum(1 for g in gpus if g.type == kind)
    result["gpus"] = [{"index": g.index, "type": g.type, "simulated": g.simulated} for g in gpus]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    extra = ["--gpus", args.simulate] if args.simulate else []
    root = Path(tempfile.mkdtemp(prefix="ember-bench-gpu-"))

    def measure(server: BenchServer) -> dict[str, Any]:
        out: dict[str, Any] = {}
        log(f"deploying examples/embeddings.py with EMBER_EXAMPLE_GPU={kind}")
        deploy_model(server, True, max_workers=1, idle_timeout=0, gpu=kind)
        log(f"cold start: {args.cold_n} calls from zero")
        out["cold_start"] = cold_start(server, args.cold_n)
        deploy_model(server, True, max_workers=count, idle_timeout=600, gpu=kind)
        log(f"{count} workers at once, one per {kind}")
        out["workers"] = all_workers(server, count)
        log(f"warm: {args.warm_n} embed calls")
        out["warm_embed"] = warm_embed(server, args.warm_n)
        return out

    section, ok = with_server(BenchServer(root, extra), measure)
    result.update(section)
    if ok:
        shutil.rmtree(root, ignore_errors=True)
    emit(result, args.output)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
