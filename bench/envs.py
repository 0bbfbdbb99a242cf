"""Environments benchmark: Env build times, reuse, disk per Env on the AI base, cold start in an Env.

Starts its own `ember server`s (free port, temporary data dir, as bench/core.py does) and measures:

- first builds: a standard Env with one small package, and an Env on the AI base with one small
  package (the base is built first, once per server), asked for over POST /v1/envs and timed
  from the request until the Env is ready. The first server builds with an empty uv cache of its
  own (UV_CACHE_DIR in the temporary dir: every wheel is unpacked, every remote one downloaded),
  a second server (a new data dir, the same cache, now warm) builds the same Envs again;
- reuse: the same specs asked for again, found by their content (what a redeploy does);
- disk: bytes of distinct inodes (hard links counted once, as `du` counts them) under the data
  dir's envs/ and uv's cache, before and after each extra Env on the AI base, beside the base's
  own size and what each Env's view reports (`disk_bytes`, `own_bytes`); then the same for the
  Env of examples/embeddings.py (a model package and sentence-transformers' dependencies from
  PyPI; `--no-example` leaves it out, and it is recorded as skipped where it cannot be built);
- cold start from zero, with templates: one trivial function on the server's Python, the same in
  a standard Env of its own and in an Env on the AI base (max_workers=1, idle_timeout=0; each
  call waits until its function has no worker), interleaved; the jobs' cold_start_ms and
  total_ms, and the client's round trip. The second server runs with --no-templates, and measures
  the same without templates (each worker a new process) for comparison;
- a first import: a call whose body is `import torch`, on a new worker, on the server's Python
  (where it has torch) and in the Env on the AI base, with and without templates.

Prints JSON to stdout and writes it to bench/results/envs.json; progress goes to stderr.

    .venv/bin/python bench/envs.py                   # under a minute on 2 cores
    .venv/bin/python bench/envs.py --cold-n 40       # more cold-start samples (default 20)
    .venv/bin/python bench/envs.py --uv-cache shared # use the machine's uv cache, warm or not

This is a benchmark, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from core import BenchServer, call, versions, wait_for_zero, with_server
from stats import emit, log, summary

import ember
from ember.envs.builder import uv_bin
from ember.sdk.deploy import load_apps

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "envs.json"
EXAMPLE = ROOT / "examples" / "embeddings.py"
APP = "envbench"

STANDARD = ember.Env.standard().pip_install("humanize")
AI = ember.Env.ai().pip_install("tabulate")
EXTRA_AI = [ember.Env.ai().pip_install("python-slugify"), ember.Env.ai().pip_install("humanize")]
"""More Envs on the AI base: what each one more costs on disk."""

# The same trivial function three times: on the server's Python, in a standard Env of its own,
# in an Env on the AI base. Each scales to zero as soon as it is idle.
COLD_APP = """
import sys

import ember

app = ember.App("envbench")
STANDARD = ember.Env.standard().pip_install("humanize")
AI = ember.Env.ai().pip_install("tabulate")


@app.function(max_workers=1, idle_timeout=0)
def plain() -> str:
    return sys.prefix


@app.function(max_workers=1, idle_timeout=0, env=STANDARD)
def in_env() -> str:
    return sys.prefix


@app.function(max_workers=1, idle_timeout=0, env=AI)
def in_ai() -> str:
    return sys.prefix


@app.function(max_workers=1, idle_timeout=0)
def plain_torch() -> str:
    import torch

    return torch.__version__


@app.function(max_workers=1, idle_timeout=0, env=AI)
def ai_torch() -> str:
    import torch

    return torch.__version__
"""
COLD_UNITS = ("plain", "in_env", "in_ai")
IMPORT_UNITS = ("plain_torch", "ai_torch")
"""`import torch` in the call itself, on a new worker: what a first import costs where it runs."""


def spec(env: ember.Env) -> dict[str, Any]:
    return env.resolve().to_dict()


def label(env: ember.Env) -> str:
    s = env.spec
    return s.base + (" + " + ", ".join(s.packages) if s.packages else "")


def build(server: BenchServer, env: ember.Env) -> dict[str, Any]:
    """POST /v1/envs, then poll until the Env is ready: the client's time, and the view."""
    client = server.client
    t0 = time.perf_counter()
    view = client.build_env(spec(env))
    phases: list[str] = []
    while view["status"] == "building":
        if not phases or phases[-1] != view.get("phase"):
            phases.append(view.get("phase") or "")
        time.sleep(0.05)
        view = client.get_env(view["id"], build=True)
    took = time.perf_counter() - t0
    if view["status"] != "ready":
        raise RuntimeError(f"building {label(env)} failed: {view.get('error')}\n{view.get('log')}")
    return {
        "env": label(env),
        "id": view["id"],
        "ready_after_s": round(took, 2),
        "build_s": view["build_s"],
        "phases": phases,
        "packages": len(view["packages"]),
        "disk_bytes": view["disk_bytes"],
        "own_bytes": view["own_bytes"],
    }


def base_view(server: BenchServer) -> dict[str, Any]:
    """The AI base's own Env (base ai, nothing added), as GET /v1/envs lists it."""
    for e in server.client.list_envs():
        if e["spec"]["base"] == "ai" and not e["spec"]["packages"] and not e["spec"]["lock"]:
            return e
    raise RuntimeError("no AI base among the server's Envs")


def builds(server: BenchServer) -> dict[str, Any]:
    """First builds on this server: the standard Env, then the Env on the AI base (which builds
    the base first); the base's own build time from its view."""
    log(f"  building {label(STANDARD)}")
    standard = build(server, STANDARD)
    log(f"  building {label(AI)} (the AI base first)")
    ai = build(server, AI)
    base = base_view(server)
    return {
        "standard": standard,
        "ai": ai,
        "ai_base": {
            "id": base["id"],
            "build_s": base["build_s"],
            "packages": len(base["packages"]),
            "disk_bytes": base["disk_bytes"],
        },
    }


def reuse(server: BenchServer, n: int = 5) -> dict[str, Any]:
    """The same specs again: each POST /v1/envs answers `ready` at once (found by content)."""
    out: dict[str, Any] = {}
    for env in (STANDARD, AI):
        ms = []
        for _ in range(n):
            t0 = time.perf_counter()
            view = server.client.build_env(spec(env))
            ms.append((time.perf_counter() - t0) * 1000)
            if view["status"] != "ready":
                raise RuntimeError(f"{label(env)} asked for again was not found built: {view}")
        out[label(env)] = {"n": n, "p50_ms": round(statistics.median(ms), 2)}
    return out


def inodes(*roots: Path) -> dict[tuple[int, int], tuple[int, int]]:
    """(device, inode) -> (apparent bytes, allocated bytes) of every regular file under the
    roots: a file hard-linked from several places appears once, as in `du`."""
    out: dict[tuple[int, int], tuple[int, int]] = {}
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for name in files:
                try:
                    st = os.lstat(os.path.join(dirpath, name))
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                out[(st.st_dev, st.st_ino)] = (st.st_size, st.st_blocks * 512)
    return out


def mib(n: float) -> float:
    return round(n / (1 << 20), 1)


def used(files: dict[tuple[int, int], tuple[int, int]]) -> dict[str, float]:
    return {
        "apparent_mib": mib(sum(a for a, _ in files.values())),
        "allocated_mib": mib(sum(b for _, b in files.values())),
    }


def extra_env(
    server: BenchServer, env: ember.Env, cache: Path, before: dict[tuple[int, int], Any]
) -> tuple[dict[str, Any], dict[tuple[int, int], Any]]:
    """Build one more Env and say what it added: to envs/, to uv's cache, to both together."""
    envs_dir = server.data_dir / "envs"
    log(f"  building {label(env)} (disk)")
    b = build(server, env)
    in_envs, in_cache = inodes(envs_dir), inodes(cache)
    after = {**in_envs, **in_cache}
    row = {
        "env": b["env"],
        "ready_after_s": b["ready_after_s"],
        "packages": b["packages"],
        "added": used({k: v for k, v in after.items() if k not in before}),
        "added_to_envs": used({k: v for k, v in in_envs.items() if k not in before}),
        "added_to_uv_cache_only": used(
            {k: v for k, v in in_cache.items() if k not in before and k not in in_envs}
        ),
        "view_disk_mib": mib(b["disk_bytes"]),
        "view_own_mib": mib(b["own_bytes"]),
    }
    return row, after


def disk(server: BenchServer, cache: Path, first: dict[str, Any], example: bool) -> dict[str, Any]:
    """What the AI base takes, what the first Env on it adds, then what each more Env on it
    adds to envs/ and uv's cache together (distinct inodes); with `example`, the Env of
    examples/embeddings.py too (a model package and sentence-transformers' dependencies, from
    PyPI: recorded as skipped where it cannot be built)."""
    envs_dir = server.data_dir / "envs"
    base_id, ai_id = first["ai_base"]["id"], first["ai"]["id"]
    base = inodes(envs_dir / base_id)
    first_env = inodes(envs_dir / ai_id)
    first_delta = {k: v for k, v in first_env.items() if k not in base}
    before = inodes(envs_dir, cache)
    extra = []
    for env in EXTRA_AI:
        row, before = extra_env(server, env, cache, before)
        extra.append(row)
    out: dict[str, Any] = {
        "what": "bytes of distinct inodes (a file hard-linked from several places counted once, "
        "as `du` counts): apparent (file sizes) and allocated (blocks)",
        "ai_base": {"id": base_id, **used(base)},
        "first_env_on_base": {
            "env": first["ai"]["env"],
            "all_files": used(first_env),
            "not_shared_with_base": used(first_delta),
            "view_disk_mib": mib(first["ai"]["disk_bytes"]),
            "view_own_mib": mib(first["ai"]["own_bytes"]),
        },
        "each_more_env_on_base": extra,
    }
    if example:
        try:
            [app], _ = load_apps(EXAMPLE)
            assert app.env is not None
            out["example_env"], before = extra_env(server, app.env, cache, before)
        except Exception as exc:  # no network, say: the rest stands
            out["example_env"] = {"skipped": f"{type(exc).__name__}: {str(exc)[:300]}"}
            log(f"  {EXAMPLE.name}'s Env: skipped: {exc}")
    out["envs_and_cache_total"] = used(inodes(envs_dir, cache))
    out["envs_built"] = len([d for d in envs_dir.iterdir() if d.name.startswith("env-")])
    out["without_sharing_note"] = (
        "a copy per Env would cost each Env on the AI base the base's size again"
    )
    return out


def deploy_cold_app(server: BenchServer) -> float:
    """`ember deploy` of the cold-start app (its Envs are built by now): seconds, until every
    function's template has imported the code."""
    t0 = time.perf_counter()
    server.deploy(COLD_APP, filename="envbench.py")
    return time.perf_counter() - t0


def cold_starts(server: BenchServer, n: int, templates: bool = True) -> dict[str, Any]:
    """`n` rounds; in each, every unit in turn: wait until it has no worker, then one runsync."""
    samples: dict[str, dict[str, list[float]]] = {
        u: {"cold_start_ms": [], "total_ms": [], "end_to_end_ms": []} for u in COLD_UNITS
    }
    prefixes: dict[str, str] = {}
    with server.http_client() as client:
        for _ in range(n):
            for unit in COLD_UNITS:
                wait_for_zero(client, APP, unit)
                t0 = time.perf_counter()
                body = call(client, unit, APP)
                e2e = (time.perf_counter() - t0) * 1000
                t = body["timings"]
                if t["cold_start_ms"] <= 0:
                    raise RuntimeError(f"{unit}: the call found a warm worker: {t}")
                prefixes[unit] = body["output"]
                samples[unit]["cold_start_ms"].append(t["cold_start_ms"])
                samples[unit]["total_ms"].append(t["total_ms"])
                samples[unit]["end_to_end_ms"].append(e2e)
    out: dict[str, Any] = {
        "what": "POST runsync to a function with no worker (max_workers=1, idle_timeout=0), "
        + (
            "forked from its version's template"
            if templates
            else "started as a new process (--no-templates)"
        )
        + "; the three functions interleaved, each call after its own function is back at zero",
        "n": n,
    }
    for unit in COLD_UNITS:
        s = samples[unit]
        out[unit] = {
            "sys_prefix": prefixes[unit],
            **{k: summary(v) for k, v in s.items()},
        }
    for unit in ("in_env", "in_ai"):
        out[f"{unit}_vs_plain"] = {
            k: round(out[unit][k]["p50_ms"] / out["plain"][k]["p50_ms"], 2)
            for k in ("cold_start_ms", "total_ms", "end_to_end_ms")
        }
    return out


def first_imports(server: BenchServer, n: int) -> dict[str, Any]:
    """`n` rounds of a call that imports torch on a new worker, on the server's Python (where
    it has torch) and in the Env on the AI base: the job's exec_ms is the import."""
    units = [u for u in IMPORT_UNITS if u != "plain_torch" or importlib.util.find_spec("torch")]
    samples: dict[str, list[float]] = {u: [] for u in units}
    totals: dict[str, list[float]] = {u: [] for u in units}
    with server.http_client() as client:
        for _ in range(n):
            for unit in units:
                wait_for_zero(client, APP, unit)
                body = call(client, unit, APP)
                samples[unit].append(body["timings"]["exec_ms"])
                totals[unit].append(body["timings"]["total_ms"])
    out: dict[str, Any] = {
        "what": "a call whose body is `import torch`, each on a new worker (idle_timeout=0): "
        "the job's exec_ms is the import, compiling to bytecode what has none",
        "n": n,
    }
    for unit in units:
        out[unit] = {"exec_ms": summary(samples[unit]), "total_ms": summary(totals[unit])}
    if len(units) == 2:
        out["ai_torch_vs_plain_torch"] = round(
            out["ai_torch"]["exec_ms"]["p50_ms"] / out["plain_torch"]["exec_ms"]["p50_ms"], 2
        )
    return out


@contextmanager
def uv_cache(path: Path | None) -> Iterator[None]:
    """UV_CACHE_DIR for the servers started inside (they pass it on to uv)."""
    old = os.environ.get("UV_CACHE_DIR")
    if path is not None:
        os.environ["UV_CACHE_DIR"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("UV_CACHE_DIR", None)
        else:
            os.environ["UV_CACHE_DIR"] = old


def default_cache() -> Path:
    out = subprocess.run([uv_bin(), "cache", "dir"], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cold-n", type=int, default=20, help="cold starts per function, with templates"
    )
    parser.add_argument(
        "--cold-n-plain",
        type=int,
        default=10,
        help="cold starts per function on the second server, which runs --no-templates (each "
        "worker a new process); 0 for none",
    )
    parser.add_argument(
        "--import-n",
        type=int,
        default=3,
        help="calls that import torch on a new worker, per function and server; 0 for none",
    )
    parser.add_argument(
        "--uv-cache",
        choices=("fresh", "shared"),
        default="fresh",
        help="fresh (default): an empty uv cache in the temporary dir, so the first builds are "
        "cold; shared: the machine's own uv cache, as it is",
    )
    parser.add_argument(
        "--example",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also build examples/embeddings.py's Env for its disk figures (needs the network "
        "for its packages; skipped where it fails)",
    )
    args = parser.parse_args()

    result: dict[str, Any] = {"machine": versions()}
    ok = True
    with tempfile.TemporaryDirectory(prefix="ember-bench-envs-") as tmp:
        root = Path(tmp)
        fresh = args.uv_cache == "fresh"
        cache = root / "uv-cache" if fresh else default_cache()
        before = used(inodes(cache)) if cache.exists() else {"apparent_mib": 0.0}
        result["uv_cache"] = {
            "mode": args.uv_cache,
            "dir": str(cache),
            "before_first_server_mib": before["apparent_mib"],
            "state_at_first_builds": "cold (empty)"
            if before["apparent_mib"] == 0
            else "warm (it held packages already)",
        }
        result["sandbox"] = "see the server log's `sandbox:` line; the servers run as configured"

        def first_server(server: BenchServer) -> dict[str, Any]:
            out: dict[str, Any] = {}
            log("first builds")
            out["first_build"] = builds(server)
            log("the same specs again")
            out["reuse"] = reuse(server)
            out["disk"] = disk(server, cache, out["first_build"], args.example)
            log("deploying the cold-start app (its Envs are built)")
            out["deploy_with_envs_built_s"] = round(deploy_cold_app(server), 2)
            log(f"cold starts: {args.cold_n} rounds of {', '.join(COLD_UNITS)}")
            out["cold_start"] = cold_starts(server, args.cold_n)
            if args.import_n:
                log(f"first imports of torch: {args.import_n} rounds")
                out["first_import"] = first_imports(server, args.import_n)
            out["sandbox"] = next(
                (ln for ln in server.log().splitlines() if ln.startswith("sandbox:")), "?"
            )
            return out

        def second_server(server: BenchServer) -> dict[str, Any]:
            log("first builds on a new server (--no-templates), uv's cache now warm")
            out: dict[str, Any] = {"first_build": builds(server)}
            if args.cold_n_plain or args.import_n:
                deploy_cold_app(server)
            if args.cold_n_plain:
                log(f"cold starts without templates: {args.cold_n_plain} rounds")
                out["cold_start"] = cold_starts(server, args.cold_n_plain, templates=False)
            if args.import_n:
                log(f"first imports of torch, without templates: {args.import_n} rounds")
                out["first_import"] = first_imports(server, args.import_n)
            return out

        with uv_cache(cache if fresh else None):
            a, ok_a = with_server(BenchServer(root / "a"), first_server)
            second = BenchServer(root / "b", ["--no-templates"])
            b, ok_b = with_server(second, second_server) if ok_a else ({}, False)
        ok = ok_a and ok_b
        result["sandbox"] = a.pop("sandbox", "?")
        cache_state = "cold" if fresh else "as found"
        result["first_build"] = {
            f"uv_cache_{cache_state}": a.get("first_build"),
            "uv_cache_warm": b.get("first_build"),
        }
        for key in ("reuse", "disk", "deploy_with_envs_built_s", "cold_start"):
            result[key] = a.get(key)
        if b.get("cold_start"):
            result["cold_start_without_templates"] = b["cold_start"]
        result["first_import"] = a.get("first_import")
        if b.get("first_import"):
            result["first_import_without_templates"] = b["first_import"]
        result["workers_left_after_stop"] = a.get("workers_left_after_stop", 0) + b.get(
            "workers_left_after_stop", 0
        )
        result["uv_cache"]["after_mib"] = used(inodes(cache))["apparent_mib"]
    emit(result, RESULTS)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
