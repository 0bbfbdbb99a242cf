"""GPU inventory and placement against real servers and workers (simulated GPUs via --gpus)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import UNSANDBOXED, Server, free_port, pid_alive, result, spawn, wait_for

GPUS = "L4:2,H100:1"
L4_MIB, H100_MIB = 24 * 1024, 80 * 1024

ENV = """
import os
import ember

app = ember.App("env")

def gpu_env() -> dict:
    return {k: v for k, v in os.environ.items()
            if k == "CUDA_VISIBLE_DEVICES" or k.startswith("EMBER_GPU_")}

@app.function(gpu="H100", idle_timeout=60)
def big() -> dict:
    return gpu_env()

@app.function(gpu="L4", gpu_memory="8GiB", idle_timeout=60)
def small() -> dict:
    return gpu_env()

@app.function(idle_timeout=60)
def plain() -> dict:
    return gpu_env()
"""


def nodes(server: Server) -> list[dict[str, Any]]:
    resp = server.http("GET", "/v1/nodes")
    assert resp.status_code == 200, resp.text
    items: list[dict[str, Any]] = resp.json()["nodes"]
    return items


def gpus(server: Server) -> list[dict[str, Any]]:
    [node] = nodes(server)
    result: list[dict[str, Any]] = node["gpus"]
    return result


def test_nodes_list_simulated_gpus_and_workers_see_only_their_own(
    make_server: Callable[..., Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    # whatever the server's own environment says, a worker sees only its own GPUs
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    monkeypatch.setenv("EMBER_GPU_INDEXES", "0,1,2")
    server = make_server(*UNSANDBOXED, "--gpus", GPUS)
    assert "(simulated)" in server.log() and "H100 80 GiB" in server.log()
    [node] = nodes(server)
    assert node["backend"] == "local"
    inventory = node["gpus"]
    assert [(g["index"], g["type"], g["memory_mib"]) for g in inventory] == [
        (0, "L4", L4_MIB),
        (1, "L4", L4_MIB),
        (2, "H100", H100_MIB),
    ]
    assert all(g["simulated"] is True and g["workers"] == [] for g in inventory)

    server.deploy(ENV)
    big = server.client.runsync("env", "big", {})["output"]
    assert big == {
        "CUDA_VISIBLE_DEVICES": "",
        "EMBER_GPU_INDEXES": "2",
        "EMBER_GPU_TYPE": "H100",
        "EMBER_GPU_SIMULATED": "1",
    }
    small = server.client.runsync("env", "small", {})["output"]
    assert small["CUDA_VISIBLE_DEVICES"] == "" and small["EMBER_GPU_TYPE"] == "L4"
    assert small["EMBER_GPU_INDEXES"] in ("0", "1") and small["EMBER_GPU_MEMORY_MIB"] == "8192"
    plain = server.client.runsync("env", "plain", {})["output"]
    assert plain == {
        "CUDA_VISIBLE_DEVICES": "",
        "EMBER_GPU_INDEXES": "",
        "EMBER_GPU_TYPE": "",
        "EMBER_GPU_SIMULATED": "0",
    }

    workers = {w["unit"]: w for w in server.workers()}
    assert workers["big"]["gpus"] == [2] and workers["big"]["gpu_type"] == "H100"
    assert workers["plain"]["gpus"] == [] and workers["plain"]["gpu_type"] is None
    held = {g["index"]: g["workers"] for g in gpus(server)}
    [on_h100] = held[2]
    assert on_h100["worker"] == workers["big"]["id"] and on_h100["app"] == "env"
    assert on_h100["unit"] == "big" and on_h100["memory_mib"] is None
    [on_l4] = held[int(small["EMBER_GPU_INDEXES"])]
    assert on_l4["worker"] == workers["small"]["id"] and on_l4["memory_mib"] == 8192
    assert held[1 - int(small["EMBER_GPU_INDEXES"])] == []
    assert all(w["worker"] != workers["plain"]["id"] for ws in held.values() for w in ws)

    env = {**os.environ, "EMBER_URL": server.url, "EMBER_TOKEN": server.token, "COLUMNS": "200"}
    out = subprocess.run(
        [sys.executable, "-m", "ember.cli.main", "nodes"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("(simulated)") == 3
    assert workers["big"]["id"] in out.stdout and workers["small"]["id"] in out.stdout


GATED = """
import os, time
import ember

app = ember.App("place")

def gate(path):
    deadline = time.time() + 30
    while not os.path.exists(path) and time.time() < deadline:
        time.sleep(0.01)  # sleep-ok: a deployed function polling for its gate file

def report(path) -> dict:
    t0 = time.time()
    gate(path)
    time.sleep(0.1)  # sleep-ok: the deployed function holds its GPU a moment
    return {"pid": os.getpid(), "gpu": os.environ["EMBER_GPU_INDEXES"],
            "type": os.environ["EMBER_GPU_TYPE"], "start": t0, "end": time.time()}

@app.function(gpu="L4", max_workers=4, idle_timeout=60)
def whole(path: str) -> dict:
    return report(path)

@app.function(gpu="L4", gpu_memory="8GiB", max_workers=8, idle_timeout=60)
def packed(path: str) -> dict:
    return report(path)
"""


def peak_overlap(outs: list[dict[str, Any]]) -> int:
    points = sorted([(o["end"], -1) for o in outs] + [(o["start"], 1) for o in outs])
    running = peak = 0
    for _, step in points:
        running += step
        peak = max(peak, running)
    return peak


class Watcher:
    """Samples /v1/nodes in a thread for as long as the load runs."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.samples: list[list[dict[str, Any]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(gpus(self.server))
            time.sleep(0.01)  # sleep-ok: sampling interval of the watcher thread

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def statuses(server: Server, ids: list[str]) -> list[dict[str, Any]]:
    return [server.client.get_job(i) for i in ids]


def check_load(
    server: Server, tmp_path: Path, fn: str, per_gpu: int, memory_mib: int | None
) -> None:
    """8 gated jobs on 2 L4s holding `per_gpu` workers each: the rest wait, saying why."""
    gate = tmp_path / f"{fn}.gate"
    running = 2 * per_gpu
    with Watcher(server) as watcher:
        ids = [spawn(server, "place", fn, path=str(gate)) for _ in range(8)]

        def settled() -> list[dict[str, Any]] | None:
            bodies = statuses(server, ids)
            busy = [b for b in bodies if b["status"] == "IN_PROGRESS"]
            waiting = [b for b in bodies if b["status"] == "IN_QUEUE" and b["reason"]]
            return bodies if len(busy) == running and len(waiting) == 8 - running else None

        bodies = wait_for(settled, timeout=30, what=f"{running} running and the rest waiting")
        for b in bodies:
            if b["status"] == "IN_QUEUE":
                assert "waiting" in b["reason"] and "L4" in b["reason"], b["reason"]
            else:
                assert b["reason"] is None
        held = {g["index"]: g["workers"] for g in gpus(server)}
        assert [len(held[0]), len(held[1]), len(held[2])] == [per_gpu, per_gpu, 0], held
        assert all(w["memory_mib"] == memory_mib for ws in held.values() for w in ws)
        gate.touch()
        outs = [result(server, i) for i in ids]
    assert all(o["status"] == "COMPLETED" for o in outs), outs
    outputs = [o["output"] for o in outs]
    assert {o["type"] for o in outputs} == {"L4"}
    assert {o["gpu"] for o in outputs} == {"0", "1"}
    assert len({o["pid"] for o in outputs}) == running
    assert peak_overlap(outputs) <= running
    assert watcher.samples
    for sample in watcher.samples:
        assert sample[2]["workers"] == [], "an L4 function never lands on the H100"
        for g in sample[:2]:
            assert len(g["workers"]) <= per_gpu, sample
            reserved = sum(w["memory_mib"] or g["memory_mib"] for w in g["workers"])
            assert reserved <= g["memory_mib"], sample
    assert len([w for w in server.workers() if w["unit"] == fn]) == running


def test_whole_gpus_bound_workers_below_max_workers_and_queued_jobs_say_why(
    make_server: Callable[..., Server], tmp_path: Path
) -> None:
    server = make_server(*UNSANDBOXED, "--gpus", GPUS)
    server.deploy(GATED)
    check_load(server, tmp_path, "whole", per_gpu=1, memory_mib=None)


def test_gpu_memory_packs_three_workers_per_l4_and_never_more(
    make_server: Callable[..., Server], tmp_path: Path
) -> None:
    server = make_server(*UNSANDBOXED, "--gpus", GPUS)
    server.deploy(GATED)
    check_load(server, tmp_path, "packed", per_gpu=3, memory_mib=8192)


SHARED = """
import os
import ember

app = ember.App("shared")

def where() -> dict:
    return {"pid": os.getpid(), "type": os.environ["EMBER_GPU_TYPE"],
            "gpu": os.environ["EMBER_GPU_INDEXES"]}

@app.function(gpu=["H100", "L4"], idle_timeout=60)
def flex() -> dict:
    return where()

@app.function(gpu="H100", idle_timeout=60)
def hog() -> dict:
    return where()
"""


def test_fallback_order_and_an_idle_worker_gives_its_gpu_to_a_waiting_job(
    make_server: Callable[..., Server],
) -> None:
    server = make_server(*UNSANDBOXED, "--gpus", GPUS)
    server.deploy(SHARED)
    first = server.client.runsync("shared", "flex", {})["output"]
    assert first["type"] == "H100" and first["gpu"] == "2", "the first choice when it is free"

    # flex's idle worker holds the only H100: it is drained at once, not after its idle_timeout,
    # and hog's worker starts on the H100 it frees (tests/test_gpu_reclaim.py has the rest)
    done = server.client.runsync("shared", "hog", {})
    assert done["status"] == "COMPLETED" and done["reason"] is None
    assert done["output"]["type"] == "H100" and done["output"]["gpu"] == "2"
    wait_for(lambda: not pid_alive(first["pid"]), what="flex's idle worker to stop")
    assert done["timings"]["queue_ms"] > 0 and done["timings"]["cold_start_ms"] > 0

    # now hog's idle worker holds the H100: flex falls back to an L4 at once
    second = server.client.runsync("shared", "flex", {})
    assert second["output"]["type"] == "L4" and second["output"]["gpu"] in ("0", "1")
    held = {g["index"]: [w["unit"] for w in g["workers"]] for g in gpus(server)}
    assert held[2] == ["hog"]
    assert sorted(held[0] + held[1]) == ["flex"]


UNFIT = """
import ember

app = ember.App("unfit")

@app.function(gpu="A10G")
def a10g() -> int:
    return 1

@app.function(gpu="L4", gpu_memory="30GiB")
def huge() -> int:
    return 1

@app.function(gpu="H100:2")
def pair() -> int:
    return 1

@app.function()
def fine() -> int:
    return 1
"""


def test_a_gpu_no_machine_here_has_is_refused_at_once_naming_what_exists(
    make_server: Callable[..., Server],
) -> None:
    server = make_server(*UNSANDBOXED, "--gpus", GPUS)
    server.deploy(UNFIT)
    cases = [("a10g", "A10G"), ("huge", "30 GiB"), ("pair", "H100:2")]
    for (fn, asked), route in itertools.product(cases, ("run", "runsync")):
        t0 = time.monotonic()
        resp = server.http("POST", f"/v1/apps/unfit/{fn}/{route}", json={"input": {}})
        assert resp.status_code == 422, resp.text
        assert time.monotonic() - t0 < 5
        error = resp.json()["error"]
        assert error["code"] == "no_fitting_gpu"
        message = error["message"]
        assert asked in message and "2x L4 (24 GiB)" in message and "1x H100 (80 GiB)" in message
    assert server.workers() == []
    assert server.client.runsync("unfit", "fine", {})["output"] == 1


def bad_server(tmp_path: Path, *args: str) -> tuple[int, str, float]:
    env = {**os.environ, "COLUMNS": "1000"}
    t0 = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ember.cli.main",
            "server",
            "--port",
            str(free_port()),
            "--data-dir",
            str(tmp_path / "data"),
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc.returncode, " ".join((proc.stdout + proc.stderr).split()), time.monotonic() - t0


@pytest.mark.parametrize(
    ("gpus", "prices", "words"),
    [
        ("junk::", None, ["--gpus entry 'junk::'"]),
        ("L4:0", None, ["--gpus entry 'L4:0'", "at least 1"]),
        ("WHAT:2", None, ["unknown GPU type", "WHAT:2:24GiB"]),
        (None, "billing = \n", ["not valid TOML", "line 1"]),
        (None, "[gpu]\nH100 = -0.5\n", ["gpu.H100", "non-negative", "-0.5"]),
        (None, 'currency = "EUR"\n', ["unknown key 'currency'", "gpu"]),
        (None, "gpu = 3\n", ["[gpu] must be a table"]),
        (None, 'billing = "minute"\n', ["billing must be 'ms' or 'second'", "minute"]),
    ],
)
def test_bad_gpus_or_price_file_stop_the_server_at_once(
    tmp_path: Path, gpus: str | None, prices: str | None, words: list[str]
) -> None:
    args: list[str] = []
    if gpus is not None:
        args += ["--gpus", gpus]
    if prices is not None:
        path = tmp_path / "prices.toml"
        path.write_text(prices)
        args += ["--prices", str(path)]
        words = [*words, str(path)]
    code, output, elapsed = bad_server(tmp_path, *args)
    assert code != 0, output
    assert "error:" in output and "Traceback" not in output, output
    assert all(w in output for w in words), output
    assert elapsed < 30
    assert not (tmp_path / "data" / "ember.db").exists(), "refused before touching the data dir"


def test_a_missing_price_file_is_named(tmp_path: Path) -> None:
    code, output, _ = bad_server(tmp_path, "--prices", str(tmp_path / "nope.toml"))
    assert code != 0 and "cannot read the price file" in output and "nope.toml" in output


def test_deploying_a_function_no_gpu_here_fits_warns(make_server: Callable[..., Server]) -> None:
    server = make_server("--gpus", "L4:1")
    deployed = server.deploy(
        """
        import ember

        app = ember.App("nofit")

        @app.function(gpu="H100")
        def big() -> int:
            return 1

        @app.function(gpu="L4")
        def fits() -> int:
            return 2
        """
    )
    assert deployed["functions"] == ["big", "fits"]
    (warning,) = deployed["warnings"]
    assert warning.startswith("big: no GPU here can ever fit H100") and "1x L4 (24 GiB)" in warning
