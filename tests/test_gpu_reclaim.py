"""Idle GPUs serve waiting work, against a real server (one simulated L4, `--gpus L4:1`).

A job that waits for a GPU held by an idle worker of another function gets it at once: that
worker is drained (as an idle timeout would drain it), its usage closed, and the waiting pool
starts its own worker there. A busy worker is never drained: the waiting job waits for its job.
The rule itself (`ember.core.reclaim`) is tested in tests/test_reclaim.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import UNSANDBOXED, Server, pid_alive, result, spawn, wait_for
from test_metering import reconcile

IDLE_TIMEOUT = 60
FAST = 10.0
"""A reclaimed GPU serves the waiting job well within this (the idle timeout is 60 s)."""

RECLAIM = f"""
import os, time
import ember

app = ember.App("reclaim")

def gate(path):
    deadline = time.time() + 60
    while path and not os.path.exists(path) and time.time() < deadline:
        time.sleep(0.01)  # sleep-ok: a deployed function polling for its gate file

def where() -> dict:
    return {{"pid": os.getpid(), "gpu": os.environ["EMBER_GPU_INDEXES"]}}

@app.function(gpu="L4", idle_timeout={IDLE_TIMEOUT})
def a(path: str = "") -> dict:
    gate(path)
    return where()

@app.function(gpu="L4", idle_timeout={IDLE_TIMEOUT})
def b() -> dict:
    return where()

@app.function(gpu="L4", idle_timeout={IDLE_TIMEOUT}, min_workers=1)
def kept() -> dict:
    return where()
"""


def units(server: Server) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for w in server.workers():
        out.setdefault(w["unit"], []).append(w)
    return out


def deploy(server: Server, *, keep: bool = False) -> None:
    source = RECLAIM if keep else RECLAIM.replace("min_workers=1", "min_workers=0")
    server.deploy(source)


def test_an_idle_worker_of_another_function_gives_up_its_gpu_at_once(
    make_server: Callable[..., Server],
) -> None:
    server = make_server(*UNSANDBOXED, "--gpus", "L4:1")
    deploy(server)
    first = server.client.runsync("reclaim", "a", {})
    assert first["status"] == "COMPLETED" and first["output"]["gpu"] == "0"
    wait_for(
        lambda: [w["state"] for w in units(server).get("a", [])] == ["IDLE"],
        what="a's worker to idle, holding the L4",
    )

    t0 = time.monotonic()
    second = server.client.runsync("reclaim", "b", {})
    waited = time.monotonic() - t0
    print(f"b waited {waited:.2f} s for the L4 held by a's idle worker")  # the report's figure
    assert second["status"] == "COMPLETED", second
    assert waited < FAST, f"b waited {waited:.1f} s: the idle worker was not reclaimed"
    assert second["output"]["gpu"] == "0" and second["reason"] is None
    assert second["timings"]["queue_ms"] < FAST * 1000
    assert second["timings"]["cold_start_ms"] > 0, "b's own worker started on the freed L4"
    wait_for(lambda: not pid_alive(first["output"]["pid"]), what="a's worker to exit")
    assert set(units(server)) == {"b"}
    assert server.client.get_job(first["id"])["status"] == "COMPLETED"

    # a again: now b's idle worker gives the L4 back the same way
    third = server.client.runsync("reclaim", "a", {})
    assert third["status"] == "COMPLETED" and third["timings"]["queue_ms"] < FAST * 1000
    wait_for(lambda: not pid_alive(second["output"]["pid"]), what="b's worker to exit")
    server.stop()

    workers, _ = reconcile(server)  # every worker's usage is one chain over its lifetime
    by_unit = sorted((w["unit"], w["stop_reason"]) for w in workers.values())
    assert [u for u, _ in by_unit] == ["a", "a", "b"]
    reclaimed = [w for w in workers.values() if w["stop_reason"] != "server stopping"]
    assert len(reclaimed) == 2
    assert all("idle" in w["stop_reason"] and "reclaim/" in w["stop_reason"] for w in reclaimed)


def test_a_busy_worker_keeps_its_gpu_until_its_job_ends(
    make_server: Callable[..., Server], tmp_path: Path
) -> None:
    server = make_server(*UNSANDBOXED, "--gpus", "L4:1")
    deploy(server)
    gate = tmp_path / "open"
    busy = spawn(server, "reclaim", "a", path=str(gate))
    wait_for(lambda: server.client.get_job(busy)["status"] == "IN_PROGRESS", what="a to run")
    [worker] = units(server)["a"]

    waiting = spawn(server, "reclaim", "b")
    body = wait_for(
        lambda: (j := server.client.get_job(waiting))["reason"] and j, what="b to wait, saying why"
    )
    assert body["status"] == "IN_QUEUE" and "L4" in body["reason"]
    time.sleep(1.0)  # sleep-ok: four ticks (0.25 s) in which a busy worker must not be drained
    assert pid_alive(worker["pid"]) and [w["state"] for w in units(server)["a"]] == ["BUSY"]
    assert server.client.get_job(busy)["status"] == "IN_PROGRESS"
    assert server.client.get_job(waiting)["status"] == "IN_QUEUE"

    gate.touch()
    done = result(server, busy)
    assert done["status"] == "COMPLETED" and done["output"]["pid"] == worker["pid"]
    t0 = time.monotonic()
    served = result(server, waiting)
    assert served["status"] == "COMPLETED" and served["output"]["gpu"] == "0"
    assert time.monotonic() - t0 < FAST, "once idle, a's worker gave the L4 up at once"
    wait_for(lambda: not pid_alive(worker["pid"]), what="a's worker to exit")


def test_min_workers_are_never_reclaimed(make_server: Callable[..., Server]) -> None:
    server = make_server(*UNSANDBOXED, "--gpus", "L4:1")
    deploy(server, keep=True)
    [kept] = wait_for(
        lambda: [w for w in units(server).get("kept", []) if w["state"] == "IDLE"],
        what="kept's min worker to idle, holding the L4",
    )
    job = spawn(server, "reclaim", "b")
    body = wait_for(
        lambda: (j := server.client.get_job(job))["reason"] and j, what="b to wait, saying why"
    )
    assert body["status"] == "IN_QUEUE"
    time.sleep(1.0)  # sleep-ok: four ticks (0.25 s) in which a min worker must not be drained
    assert [w["id"] for w in units(server)["kept"]] == [kept["id"]] and pid_alive(kept["pid"])
    assert server.client.get_job(job)["status"] == "IN_QUEUE"
    server.http("POST", f"/v1/jobs/{job}/cancel")
    assert result(server, job)["status"] == "CANCELLED"
