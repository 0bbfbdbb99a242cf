"""ember and Ray Serve side by side: a Markdown table from the two benchmarks' JSON.

    .venv-ray/bin/python bench/ray_serve.py   # writes bench/results/ray_serve.json
    .venv/bin/python bench/core.py            # writes bench/results/core.json
    python3 bench/compare.py                  # prints the table (docs/benchmarks.md)

    # or both on one Ray cluster, ember's workers on it too, Ray Serve's JSON inside core.json:
    .venv/bin/python bench/core.py --backend ray --ray-serve .venv-ray/bin/python
    python3 bench/compare.py

Both benchmarks measure with the same light client (bench/loadgen.py) on the same machine; run
them back to back. Ratios: Ray Serve / ember for times (above 1: ember is faster), ember / Ray
Serve for throughput (above 1: ember serves more).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"

Row = tuple[str, float, float, str, bool]
"""(what, ember, Ray Serve, unit, higher is better)."""


def rows(ember: dict[str, Any], ray: dict[str, Any]) -> list[Row]:
    out: list[Row] = [
        (
            "warm round trip p50",
            ember["warm_runsync"]["p50_ms"],
            ray["warm"]["p50_ms"],
            "ms",
            False,
        ),
        (
            "warm round trip p99",
            ember["warm_runsync"]["p99_ms"],
            ray["warm"]["p99_ms"],
            "ms",
            False,
        ),
    ]
    if "httpx_ms" in ember["warm_runsync"] and "httpx_ms" in ray["warm"]:
        e, r = ember["warm_runsync"]["httpx_ms"], ray["warm"]["httpx_ms"]
        out.append(("warm round trip p50, from httpx", e["p50_ms"], r["p50_ms"], "ms", False))
    e_tp, r_tp = ember["throughput"], ray["throughput"]
    out.append(
        ("throughput, 32 clients", e_tp["calls_per_s"], r_tp["calls_per_s"], "calls/s", True)
    )
    e_cpu = sum(v for k, v in e_tp["cpu_s"].items() if k != "client") * 1000 / e_tp["calls"]
    r_cpu = sum(v for k, v in r_tp["cpu_s"].items() if k != "client") * 1000 / r_tp["calls"]
    out.append(("CPU per call (server side, all processes)", e_cpu, r_cpu, "ms", False))
    e_cold, r_cold = ember["cold_start"]["end_to_end"], ray["cold_start"]["end_to_end"]
    out.append(("cold start from zero p50", e_cold["p50_ms"], r_cold["p50_ms"], "ms", False))
    if "burst_runsync" in ember and "burst" in ray:
        e_b, r_b = ember["burst_runsync"], ray["burst"]
        n = e_b["n"]
        out.append(
            (
                f"burst of {n}: to 8 workers / replicas",
                e_b["to_8_workers_s"],
                r_b["to_8_running_replicas_s"],
                "s",
                False,
            )
        )
        out.append(
            (
                f"burst of {n}: to the last result",
                e_b["to_last_result_s"],
                r_b["to_last_result_s"],
                "s",
                False,
            )
        )
    return out


def ratio(ember: float, ray: float, higher_is_better: bool) -> str:
    if not (ember > 0 and ray > 0) or math.isnan(ember) or math.isnan(ray):
        return "n/a"
    x = ember / ray if higher_is_better else ray / ember
    return f"{x:.1f}x"


def figure(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def table(ember: dict[str, Any], ray: dict[str, Any]) -> str:
    lines = [
        "| measure | ember | Ray Serve | ember's advantage |",
        "|---|---|---|---|",
    ]
    for what, e, r, unit, higher in rows(ember, ray):
        lines.append(
            f"| {what} | {figure(e)} {unit} | {figure(r)} {unit} | {ratio(e, r, higher)} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ember", type=Path, default=RESULTS / "core.json")
    parser.add_argument(
        "--ray",
        type=Path,
        help="bench/ray_serve.py's JSON [default: the `ray_serve` section of --ember's, from "
        "`bench/core.py --backend ray --ray-serve PYTHON`, else bench/results/ray_serve.json]",
    )
    args = parser.parse_args()
    try:
        ember = json.loads(args.ember.read_text())
        if args.ray is None and "warm" in ember.get("ray_serve", {}):
            ray = ember["ray_serve"]
        else:
            ray = json.loads((args.ray or RESULTS / "ray_serve.json").read_text())
    except OSError as exc:
        print(
            f"cannot read {exc.filename}: run the benchmark that writes it first", file=sys.stderr
        )
        return 2
    print(table(ember, ray))
    return 0


if __name__ == "__main__":
    sys.exit(main())
