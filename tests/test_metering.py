"""Metering against real servers and workers: every worker-second once, per-job cost, usage by tag.

The store is read directly (SQLite, read-only) only after `GET /v1/usage` (which meters up to that
instant) or after the server stopped, so what is read is a consistent snapshot.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from conftest import Server, result, spawn, wait_for, worker_pids
from ember.cli.common import money

H100, L4 = 0.001097, 0.000222
CPU, MEM = 0.0000131, 0.00000222
"""Default USD per second: GPU types, one CPU core, one GiB of memory (1 core and 1 GiB default)."""
BASE = CPU + MEM
PHASES = {"cold_start", "busy", "idle"}


def rows(server: Server, sql: str, *args: Any) -> list[dict[str, Any]]:
    con = sqlite3.connect(f"file:{server.data_dir / 'ember.db'}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute(sql, args)]
    finally:
        con.close()


def usage(server: Server, **params: Any) -> list[dict[str, Any]]:
    resp = server.http("GET", "/v1/usage", params=params)
    assert resp.status_code == 200, resp.text
    groups: list[dict[str, Any]] = resp.json()["groups"]
    return groups


def records_by_worker(server: Server) -> dict[str, list[dict[str, Any]]]:
    by: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows(server, "SELECT * FROM usage ORDER BY id"):
        by[r["worker"]].append(r)
    return by


def reconcile(server: Server) -> tuple[dict[str, dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Every worker's records are one contiguous chain covering exactly its lifetime."""
    workers = {w["id"]: w for w in rows(server, "SELECT * FROM workers")}
    by = records_by_worker(server)
    assert set(by) <= set(workers), f"usage of unknown workers: {set(by) - set(workers)}"
    for wid, w in workers.items():
        recs = by.get(wid, [])
        assert w["ended_at"] is not None, f"worker {wid} has no end: {w}"
        assert w["metered_until"] == w["ended_at"], w
        assert recs, f"worker {wid} was never metered"
        assert recs[0]["phase"] == "cold_start", recs[0]
        assert [r["starts"] for r in recs] == [1] + [0] * (len(recs) - 1)
        phases = [r["phase"] for r in recs]
        assert set(phases) <= PHASES, phases
        # cold_start only opens a life: once ready, a worker is idle or busy
        first_other = next((i for i, p in enumerate(phases) if p != "cold_start"), len(phases))
        assert "cold_start" not in phases[first_other:], phases
        assert recs[0]["start"] == w["started_at"]
        for a, b in itertools.pairwise(recs):
            assert b["start"] == a["end"], f"worker {wid}: gap or overlap between {a} and {b}"
        for r in recs:
            assert r["end"] >= r["start"], r
        assert recs[-1]["end"] == w["ended_at"]
        metered = sum(r["end"] - r["start"] for r in recs)
        lifetime = w["ended_at"] - w["started_at"]
        assert abs(metered - lifetime) < 0.001, (wid, metered, lifetime)
    return workers, by


RECON = """
import os, time
import ember

app = ember.App("recon", tags={"team": "infra"})

def gate(path):
    deadline = time.time() + 30
    while not os.path.exists(path) and time.time() < deadline:
        time.sleep(0.01)  # sleep-ok: the deployed function's gate polls with a deadline

@app.function(idle_timeout=1, max_workers=3)
def quick(delay: float = 0) -> int:
    time.sleep(delay)  # sleep-ok: the deployed function's work
    return os.getpid()

@app.function(idle_timeout=60)
def crash() -> None:
    os._exit(3)

@app.function(idle_timeout=60)
def hang(path: str) -> int:
    gate(path)
    return os.getpid()

@app.function(idle_timeout=60, timeout=1.5)
def slow() -> None:
    time.sleep(30)  # sleep-ok: the deployed function's work

@app.function(idle_timeout=60)
def stays() -> int:
    return os.getpid()
"""


def units(server: Server, unit: str) -> list[dict[str, Any]]:
    return [w for w in server.workers() if w["unit"] == unit]


def test_usage_reconciles_with_lifetimes_of_idle_crashed_killed_and_timed_out_workers(
    make_server: Callable[..., Server], tmp_path: Path
) -> None:
    server = make_server()
    server.deploy(RECON)
    gate = tmp_path / "never"
    quick = [spawn(server, "recon", "quick", delay=0.3) for _ in range(3)]
    crash = spawn(server, "recon", "crash")
    hang = spawn(server, "recon", "hang", path=str(gate))
    assert server.client.runsync("recon", "stays", {})["status"] == "COMPLETED"
    wait_for(lambda: server.client.get_job(hang)["status"] == "IN_PROGRESS", what="hang to run")
    # started once the others are up: `timeout` also bounds a worker's start
    slow = spawn(server, "recon", "slow")
    [victim] = units(server, "hang")
    os.kill(victim["pid"], signal.SIGKILL)

    assert all(result(server, j)["status"] == "COMPLETED" for j in quick)
    assert server.client.runsync("recon", "quick", {})["status"] == "COMPLETED"  # a warm one
    assert result(server, crash)["status"] == "FAILED"
    assert result(server, slow)["status"] == "TIMED_OUT"
    assert result(server, hang)["status"] == "FAILED"
    wait_for(lambda: not units(server, "quick"), timeout=20, what="quick workers to idle out")
    server.stop()

    workers, by = reconcile(server)
    unit_of = {wid: w["unit"] for wid, w in workers.items()}
    assert set(unit_of.values()) == {"quick", "crash", "hang", "slow", "stays"}
    by_unit: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for w in workers.values():
        by_unit[w["unit"]].append(w)
    assert all(w["stop_reason"] == "idle" for w in by_unit["quick"]), by_unit["quick"]
    assert [w["exit_code"] for w in by_unit["crash"]] == [3]
    assert [w["exit_code"] for w in by_unit["hang"]] == [-signal.SIGKILL]
    [timed_out] = by_unit["slow"]
    assert "timed out" in timed_out["stop_reason"]
    [kept] = by_unit["stays"]
    assert kept["stop_reason"] == "server stopping"
    # the idle workers were billed for their idle time, the busy ones for their jobs
    for w in by_unit["quick"]:
        idle = sum(r["end"] - r["start"] for r in by[w["id"]] if r["phase"] == "idle")
        assert idle >= 1.0, "idle_timeout=1: at least a second idle before stopping"
    assert any(r["phase"] == "busy" for w in by_unit["quick"] for r in by[w["id"]])
    busy_slow = sum(r["end"] - r["start"] for r in by[timed_out["id"]] if r["phase"] == "busy")
    assert busy_slow >= 1.5
    # per-millisecond billing: billed time is metered time, priced at the worker's rate
    for recs in by.values():
        for r in recs:
            assert abs(r["billed_ms"] - (r["end"] - r["start"]) * 1000) < 0.002, r
            assert r["gpu_type"] is None and r["gpu_count"] == 0
            assert math.isclose(r["usd"], r["billed_ms"] / 1000 * BASE, rel_tol=1e-9), r
            assert '"team": "infra"' in r["tags"]


KEEP = """
import os, time
import ember

app = ember.App("keep")

@app.function(idle_timeout=60)
def idle() -> int:
    return os.getpid()

@app.function(idle_timeout=60)
def busy(path: str) -> int:
    deadline = time.time() + 30
    while not os.path.exists(path) and time.time() < deadline:
        time.sleep(0.01)  # sleep-ok: the deployed function's gate polls with a deadline
    return os.getpid()
"""


@pytest.mark.parametrize("billing", ["ms", "second"])
def test_kill9_ends_workers_at_their_last_checkpoint_and_meters_nothing_twice(
    make_server: Callable[..., Server], tmp_path: Path, billing: str
) -> None:
    prices = tmp_path / "prices.toml"
    prices.write_text(f'billing = "{billing}"\n')
    server = make_server("--prices", str(prices))
    server.deploy(KEEP)
    gate = tmp_path / "gate"
    assert server.client.runsync("keep", "idle", {})["status"] == "COMPLETED"
    job = spawn(server, "keep", "busy", path=str(gate))
    wait_for(lambda: server.client.get_job(job)["status"] == "IN_PROGRESS", what="busy job")
    flushed = time.time()
    usage(server)  # meters every live worker up to now
    server.kill9()
    wait_for(lambda: not worker_pids(server.data_dir), timeout=15, what="orphaned workers to exit")

    before = {w["id"]: w for w in rows(server, "SELECT * FROM workers")}
    assert len(before) == 2 and all(w["ended_at"] is None for w in before.values())
    old_records = records_by_worker(server)
    for wid, w in before.items():
        # a checkpoint is atomic: the last record ends where the worker's metering does
        assert old_records[wid][-1]["end"] == w["metered_until"]
        assert w["metered_until"] >= flushed

    gate.touch()  # the requeued job can finish after the restart
    server.restart()
    assert result(server, job)["status"] == "COMPLETED"
    assert server.client.runsync("keep", "idle", {})["status"] == "COMPLETED"
    server.stop()

    workers, by = reconcile(server)
    assert len(workers) == 4
    for wid, w in before.items():
        after = workers[wid]
        assert after["ended_at"] == w["metered_until"], "ends at its last checkpoint"
        assert after["stop_reason"] == "server stopped"
        # nothing metered for it after the restart; per-second billing rounds its life up
        recs, old = by[wid], old_records[wid]
        assert [(r["id"], r["start"], r["end"]) for r in recs] == [
            (r["id"], r["start"], r["end"]) for r in old
        ]
        assert recs[:-1] == old[:-1]
        check_billed(after, recs, billing)
    # no two records of one worker overlap (reconcile checked the chains); the new workers
    # began after the restart, so nothing was metered twice across the kill either
    new = [w for wid, w in workers.items() if wid not in before]
    assert len(new) == 2
    assert min(w["started_at"] for w in new) >= max(w["metered_until"] for w in before.values())
    for w in new:
        check_billed(w, by[w["id"]], billing)


def check_billed(worker: dict[str, Any], recs: list[dict[str, Any]], billing: str) -> None:
    """Billed time is the lifetime (ms), or the lifetime rounded up to whole seconds."""
    billed = sum(r["billed_ms"] for r in recs)
    lifetime_ms = (worker["ended_at"] - worker["started_at"]) * 1000
    if billing == "ms":
        assert abs(billed - lifetime_ms) < 0.01, (billed, lifetime_ms)
    else:
        assert abs(billed - round(billed / 1000) * 1000) < 0.01, (worker["id"], billed)
        assert lifetime_ms - 0.01 <= billed < lifetime_ms + 1000, (billed, lifetime_ms)
    for r in recs:  # each record at the worker's rate: 1 core and 1 GiB, no GPU
        assert math.isclose(r["usd"], r["billed_ms"] / 1000 * BASE, rel_tol=1e-9), r


COST = """
import os, time
import ember

app = ember.App("cost")

@app.function(gpu="H100", idle_timeout=60)
def big(delay: float = 0) -> str:
    time.sleep(delay)  # sleep-ok: the deployed function's work
    return os.environ["EMBER_GPU_TYPE"]

@app.function(idle_timeout=60)
def cpu(delay: float = 0) -> str:
    time.sleep(delay)
    return os.environ["EMBER_GPU_TYPE"]

@app.function(gpu="L4", gpu_memory="8GiB", idle_timeout=60)
def packed(delay: float = 0) -> str:
    time.sleep(delay)
    return os.environ["EMBER_GPU_TYPE"]
"""


def seconds(body: dict[str, Any], *, cold: bool) -> float:
    t = body["timings"]
    s = t["exec_ms"] + t["post_ms"]
    if cold:
        s += t["cold_start_ms"] + t["load_ms"]
    return float(s) / 1000.0


def check_warm(body: dict[str, Any], gpu_share: float, rate: float) -> None:
    """A warm job pays its own execution (and the few ms its worker waited for it)."""
    assert body["status"] == "COMPLETED", body
    assert body["timings"]["cold_start_ms"] == 0, body["timings"]
    cost, own = body["cost"], seconds(body, cold=False)
    assert own - 1e-6 <= cost["cpu_seconds"] <= own + 0.25, (cost, body["timings"])
    assert math.isclose(cost["gpu_seconds"], gpu_share * cost["cpu_seconds"], abs_tol=2e-6)
    assert math.isclose(cost["usd"], cost["cpu_seconds"] * rate, rel_tol=1e-5, abs_tol=2e-9)


def test_job_cost_prices_its_worker_gpu_cpu_and_memory(make_server: Callable[..., Server]) -> None:
    server = make_server("--gpus", "L4:2,H100:1")
    server.deploy(COST)
    rate = H100 + BASE

    cold = server.client.runsync("cost", "big", {"delay": 0.2})
    assert cold["status"] == "COMPLETED" and cold["output"] == "H100"
    assert cold["timings"]["cold_start_ms"] > 0
    cost = cold["cost"]
    assert set(cost) == {"usd", "gpu_seconds", "cpu_seconds"}
    # a cold job also pays the cold start (and @enter load) it waited through
    assert math.isclose(cost["gpu_seconds"], seconds(cold, cold=True), abs_tol=2e-6)
    assert math.isclose(cost["usd"], cost["gpu_seconds"] * rate, rel_tol=1e-5, abs_tol=2e-9)
    assert cost["gpu_seconds"] > seconds(cold, cold=False)

    warm = server.client.runsync("cost", "big", {"delay": 0.3})
    check_warm(warm, 1.0, rate)
    assert warm["cost"]["usd"] >= 0.3 * rate
    assert server.client.get_job(warm["id"])["cost"] == warm["cost"]

    assert server.client.runsync("cost", "cpu", {})["output"] == ""
    plain = server.client.runsync("cost", "cpu", {"delay": 0.2})
    check_warm(plain, 0.0, BASE)
    assert plain["cost"]["gpu_seconds"] == 0

    # 8 GiB of a 24 GiB L4: a third of the card's price
    assert server.client.runsync("cost", "packed", {})["output"] == "L4"
    packed = server.client.runsync("cost", "packed", {"delay": 0.2})
    check_warm(packed, 1 / 3, L4 / 3 + BASE)

    # the job rows keep their cost
    stored = rows(server, "SELECT id, cost FROM jobs WHERE id = ?", warm["id"])
    assert stored and stored[0]["cost"] is not None


def test_price_file_overrides_prices_and_per_second_billing_rounds_each_worker_up(
    make_server: Callable[..., Server], tmp_path: Path
) -> None:
    prices = tmp_path / "prices.toml"
    prices.write_text('billing = "second"\n\n[gpu]\nH100 = 0.01\n')
    server = make_server("--gpus", "L4:2,H100:1", "--prices", str(prices))
    assert "billing: per second" in server.log()
    server.deploy(COST)
    assert server.client.runsync("cost", "big", {})["status"] == "COMPLETED"
    warm = server.client.runsync("cost", "big", {"delay": 0.2})
    check_warm(warm, 1.0, 0.01 + BASE)
    assert server.client.runsync("cost", "cpu", {"delay": 0.1})["status"] == "COMPLETED"
    assert server.client.runsync("cost", "packed", {"delay": 0.1})["status"] == "COMPLETED"
    server.stop()

    workers, by = reconcile(server)
    assert len(workers) == 3
    for wid, w in workers.items():
        recs = by[wid]
        billed = sum(r["billed_ms"] for r in recs)
        lifetime_ms = (w["ended_at"] - w["started_at"]) * 1000
        assert abs(billed - round(billed / 1000) * 1000) < 0.01, (wid, billed)
        assert lifetime_ms - 0.01 <= billed < lifetime_ms + 1000, (billed, lifetime_ms)
        assert billed >= 1000 - 0.01  # a float sum of the records' parts: 999.9999999999999 is 1 s
        gpu = {"H100": 0.01, "L4": L4}.get(recs[0]["gpu_type"], 0.0)
        for r in recs:
            rate = gpu * r["gpu_count"] + BASE
            assert math.isclose(r["usd"], r["billed_ms"] / 1000 * rate, rel_tol=1e-9), r


TAGGED = """
import time
import ember

app = ember.App("tagged", tags={"team": "search", "project": "rag"})

@app.function(gpu="L4", idle_timeout=1)
def embed(delay: float = 0) -> int:
    time.sleep(delay)
    return 1

@app.function(idle_timeout=1, tags={"team": "ads"})
def rank(delay: float = 0) -> int:
    time.sleep(delay)
    return 2
"""

SUMS = ("gpu_seconds", "cpu_seconds", "cost_usd", "cold_starts", "idle_fraction")


def expected_groups(
    records: list[dict[str, Any]], key: Callable[[dict[str, Any]], tuple[tuple[str, str], ...]]
) -> dict[tuple[tuple[str, str], ...], dict[str, float]]:
    """What /v1/usage should answer, computed from the records themselves."""
    sums: dict[Any, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for r in records:
        s = sums[key(r)]
        sec = r["billed_ms"] / 1000
        gpu_usd = {"L4": L4}.get(r["gpu_type"], 0.0) * r["gpu_count"] * sec
        s["gpu_seconds"] += r["gpu_count"] * sec
        s["cpu_seconds"] += r["cpu"] * sec
        s["cost_usd"] += r["usd"]
        s["cold_starts"] += r["starts"]
        s["gpu_usd"] += gpu_usd
        s[r["phase"] + "_seconds"] += sec
        if r["phase"] == "idle":
            s["idle_gpu_usd"] += gpu_usd
            s["idle_usd"] += r["usd"]
    for s in sums.values():
        base, part = (
            (s["gpu_usd"], s["idle_gpu_usd"])
            if s["gpu_usd"] > 0
            else (s["cost_usd"], s["idle_usd"])
        )
        s["idle_fraction"] = part / base if base > 0 else 0.0
    return sums


def check_groups(
    groups: list[dict[str, Any]], expected: dict[Any, dict[str, float]], names: list[str]
) -> None:
    got = {tuple((n, g["key"][n]) for n in names): g for g in groups}
    assert set(got) == set(expected), (sorted(got), sorted(expected))
    for k, g in got.items():
        assert set(SUMS) <= set(g), g
        for field in SUMS:
            tol = 2e-9 if field == "cost_usd" else 2e-6  # as rounded by the server
            assert math.isclose(g[field], expected[k][field], rel_tol=1e-6, abs_tol=tol), (
                k,
                field,
                g[field],
                expected[k][field],
            )
        for phase in PHASES:
            assert math.isclose(
                g[f"{phase}_seconds"], expected[k][f"{phase}_seconds"], abs_tol=1e-5
            )


def test_usage_groups_by_tag_function_phase_and_time(make_server: Callable[..., Server]) -> None:
    server = make_server("--gpus", "L4:2,H100:1")
    server.deploy(TAGGED)
    t0 = time.time()
    for fn in ("embed", "embed", "rank"):
        assert server.client.runsync("tagged", fn, {"delay": 0.1})["status"] == "COMPLETED"
    wait_for(lambda: not server.workers(), timeout=20, what="workers to idle out")
    by_team = usage(server, group_by="tag:team")  # flushes: the store now holds everything
    records = rows(server, "SELECT * FROM usage")
    assert records and min(r["start"] for r in records) >= t0

    # function tags override the app's, and the app's tags reach every function
    for r in records:
        tags = r["tags"]
        assert '"project": "rag"' in tags
        assert ('"team": "ads"' if r["unit"] == "rank" else '"team": "search"') in tags, r
    expected = expected_groups(
        records, lambda r: (("tag:team", "ads" if r["unit"] == "rank" else "search"),)
    )
    check_groups(by_team, expected, ["tag:team"])
    groups = {g["key"]["tag:team"]: g for g in by_team}
    assert groups["search"]["gpu_seconds"] > 0 and groups["ads"]["gpu_seconds"] == 0
    assert groups["search"]["cold_starts"] == 1 and groups["ads"]["cold_starts"] == 1
    # a second of idle_timeout against a few hundred ms of work: idle money shows
    assert 0.2 < groups["search"]["idle_fraction"] < 1
    assert 0.2 < groups["ads"]["idle_fraction"] < 1

    [rag] = usage(server, group_by="tag:project")
    assert rag["key"] == {"tag:project": "rag"}
    assert math.isclose(rag["cost_usd"], sum(g["cost_usd"] for g in by_team), abs_tol=3e-9)

    by_fn_phase = usage(server, group_by="function,phase")
    expected = expected_groups(
        records, lambda r: (("function", f"tagged/{r['unit']}"), ("phase", r["phase"]))
    )
    check_groups(by_fn_phase, expected, ["function", "phase"])
    assert {(g["key"]["function"], g["key"]["phase"]) for g in by_fn_phase} == {
        (f"tagged/{fn}", p) for fn in ("embed", "rank") for p in PHASES
    }

    hourly = usage(server, group_by="app", granularity="hour")
    assert hourly and all(g["start"] % 3600 == 0 and g["start"] <= time.time() for g in hourly)
    assert [g["start"] for g in hourly] == sorted(g["start"] for g in hourly)
    total = sum(r["usd"] for r in records)
    assert math.isclose(sum(g["cost_usd"] for g in hourly), total, abs_tol=3e-9)
    [daily] = usage(server, group_by="app", granularity="day")
    assert daily["start"] % 86400 == 0 and math.isclose(daily["cost_usd"], total, abs_tol=2e-9)

    first = min(r["start"] for r in records)
    last = max(r["end"] for r in records)
    assert usage(server, since=str(last)) == []
    assert usage(server, until=str(first)) == []
    everything = usage(server, group_by="tag:team", since=str(first), until=str(last))
    assert everything == by_team

    def iso(t: float) -> str:
        return datetime.fromtimestamp(t, UTC).isoformat()

    assert (
        usage(server, group_by="tag:team", since=iso(t0 - 60), until=iso(time.time() + 60))
        == by_team
    )
    assert usage(server, group_by="tag:team", since="2000-01-01T00:00:00Z") == by_team
    naive_future = datetime.fromtimestamp(time.time() + 3600, UTC).replace(tzinfo=None).isoformat()
    assert usage(server, since=naive_future) == []


def test_bad_usage_queries_get_422_with_a_clear_message(server: Server) -> None:
    cases = [
        ({"group_by": "bogus"}, ["bogus", "tag:NAME"]),
        ({"group_by": "tag:"}, ["tag:NAME"]),
        ({"group_by": "app,colour"}, ["colour"]),
        ({"granularity": "week"}, ["week", "hour or day"]),
        ({"since": "yesterday"}, ["since", "yesterday", "ISO 8601"]),
        ({"until": "2024-13-45"}, ["until", "ISO 8601"]),
    ]
    for params, words in cases:
        resp = server.http("GET", "/v1/usage", params=params)
        assert resp.status_code == 422, (params, resp.text)
        error = resp.json()["error"]
        assert error["code"] == "invalid_request"
        assert all(w in error["message"] for w in words), (params, error)


def cli(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EMBER_URL": server.url, "EMBER_TOKEN": server.token, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "ember.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_ember_usage_cli_prints_a_table_and_csv(make_server: Callable[..., Server]) -> None:
    server = make_server("--gpus", "L4:2,H100:1")
    server.deploy(TAGGED)
    for fn in ("embed", "rank"):
        assert server.client.runsync("tagged", fn, {})["status"] == "COMPLETED"
    wait_for(lambda: not server.workers(), timeout=20, what="workers to idle out")
    api = {g["key"]["tag:team"]: g for g in usage(server, group_by="tag:team")}

    table = cli(server, "usage", "--by", "team", "--since", "7d")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    for team, g in api.items():
        [line] = [ln for ln in lines if f" {team} " in ln]
        assert f" {money(g['cost_usd'])} " in line and f"{g['gpu_seconds']:.3f}" in line, line

    got = cli(server, "usage", "--by", "team", "--since", "7d", "--csv")
    assert got.returncode == 0, got.stderr
    [header, *body] = list(csv.reader(io.StringIO(got.stdout)))
    assert header[0] == "team"
    assert {"gpu_seconds", "cpu_seconds", "cost_usd", "cold_starts", "idle_fraction"} <= set(header)
    parsed = {row[0]: dict(zip(header, row, strict=True)) for row in body}
    assert set(parsed) == set(api)
    for team, g in api.items():
        assert float(parsed[team]["cost_usd"]) == round(g["cost_usd"], 9)  # as the API has it
        assert int(parsed[team]["cold_starts"]) == g["cold_starts"]
        assert math.isclose(float(parsed[team]["idle_fraction"]), g["idle_fraction"], abs_tol=1e-6)

    # nothing in a window before this server existed
    empty = cli(server, "usage", "--by", "team", "--until", "2000-01-01T00:00:00", "--csv")
    assert empty.returncode == 0 and empty.stdout.splitlines()[1:] == []
    bad = cli(server, "usage", "--granularity", "week")
    assert bad.returncode != 0 and "hour or day" in bad.stderr
