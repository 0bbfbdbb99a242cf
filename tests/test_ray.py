"""The Ray backend on a real multi-node Ray cluster on this machine (`ray.cluster_utils`).

One cluster and one `ember server --backend ray` for the module: a head node with a simulated
L4 and a second node with a simulated A100 (GPUs declared to Ray, no NVML behind them); a third
node with an H100 joins while the server runs and is killed (its raylet, ungracefully) while a
job runs on it.
"""

from __future__ import annotations

import os
import shutil
import signal
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

from conftest import Server, result, spawn, wait_for

cluster_utils = pytest.importorskip(
    "ray.cluster_utils", reason="the ray package is not installed (pip install 'ember[ray]')"
)

FAST_DEATH = {  # a killed raylet is declared dead in about a second, not 15
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 300,
    "health_check_failure_threshold": 3,
}

APP = """
import os, time
import ember

app = ember.App("onray")


def where() -> dict:
    return {
        "type": os.environ["EMBER_GPU_TYPE"],
        "indexes": os.environ["EMBER_GPU_INDEXES"],
        "simulated": os.environ["EMBER_GPU_SIMULATED"],
        "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "secret": os.environ.get("RAY_TEST_KEY"),
        "pid": os.getpid(),
    }


@app.function(gpu="L4", secrets=["raytest"], idle_timeout=1)
def on_l4() -> dict:
    print("hello from the L4 node")
    return where()


@app.function(gpu=["H100", "A100"], idle_timeout=1)
def fallback() -> dict:
    return where()


@app.function(gpu=["H100", "A100"], retries=1, idle_timeout=1, timeout=60)
def slow(path: str) -> dict:
    with open(path, "a") as f:
        f.write(os.environ["EMBER_GPU_TYPE"] + "\\n")
    if os.environ["EMBER_GPU_TYPE"] == "H100":
        time.sleep(30)  # sleep-ok: its node is killed meanwhile
    return where()
"""


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    c = cluster_utils.Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "num_gpus": 1,
            "resources": {"accelerator_type:L4": 1},
            "include_dashboard": False,
            "_system_config": FAST_DEATH,
        },
    )
    c.add_node(num_cpus=1, num_gpus=1, resources={"accelerator_type:A100": 1})
    try:
        yield c
    finally:
        c.shutdown()


@pytest.fixture(scope="module")
def ray_server(cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("ray")
    server = Server(
        root / "data",
        ["--backend", "ray", "--ray-address", cluster.address, "--sandbox", "off"],
    )
    server.start(timeout=60)
    try:
        ok = server.http("PUT", "/v1/secrets/raytest", json={"values": {"RAY_TEST_KEY": "s3"}})
        assert ok.status_code == 200, ok.text
        path = root / "onray.py"
        path.write_text(textwrap.dedent(APP))
        from ember.sdk.deploy import deploy_file

        deploy_file(path, client=server.client, wait=True)
        yield server
    finally:
        server.shutdown(timeout=30)


def gpus(server: Server) -> dict[int, dict[str, Any]]:
    """Every GPU of /v1/nodes by index, with its node's name."""
    nodes = server.http("GET", "/v1/nodes").json()["nodes"]
    return {g["index"]: {**g, "node_name": n["name"]} for n in nodes for g in n["gpus"]}


def test_inventory_comes_from_the_clusters_nodes(ray_server: Server) -> None:
    nodes = ray_server.http("GET", "/v1/nodes").json()["nodes"]
    assert len(nodes) == 2 and {n["backend"] for n in nodes} == {"ray"}
    types = sorted(g["type"] for n in nodes for g in n["gpus"])
    assert types == ["A100", "L4"]
    assert all(g["simulated"] for n in nodes for g in n["gpus"])  # declared to Ray, not NVML


def test_placement_across_nodes_and_a_fallback_on_the_second(ray_server: Server) -> None:
    t0 = time.monotonic()
    l4 = ray_server.function("onray", "on_l4").remote()
    first_ms = (time.monotonic() - t0) * 1000
    fb = ray_server.function("onray", "fallback").remote()
    inventory = gpus(ray_server)
    l4_gpu, a100_gpu = inventory[int(l4["indexes"])], inventory[int(fb["indexes"])]
    assert (l4["type"], l4_gpu["type"]) == ("L4", "L4")
    assert (fb["type"], a100_gpu["type"]) == ("A100", "A100")  # no H100: the list's second
    assert l4_gpu["node_name"] != a100_gpu["node_name"]  # two nodes
    # each saw its own GPU only: simulated GPUs are no CUDA device at all
    assert l4["simulated"] == fb["simulated"] == "1" and l4["cuda"] == fb["cuda"] == ""
    assert l4["secret"] == "s3" and fb["secret"] is None  # only where the function names it
    lines = wait_for(
        lambda: [
            x
            for x in ray_server.http("GET", "/v1/apps/onray/on_l4/logs").json().get("lines", [])
            if "hello from the L4 node" in str(x)
        ],
        what="the L4 worker's log line",
    )
    assert lines
    # once its worker idled out, a cold start on the warm node forks from the node's template
    wait_for(
        lambda: (
            not any(
                w["unit"] == "on_l4"
                for w in ray_server.http("GET", "/v1/workers").json()["workers"]
            )
        ),
        what="the L4 worker to idle out",
    )
    t0 = time.monotonic()
    again = ray_server.function("onray", "on_l4").remote()
    cold_ms = (time.monotonic() - t0) * 1000
    print(f"first call {first_ms:.0f} ms; cold start on a warm node {cold_ms:.0f} ms")
    assert again["pid"] != l4["pid"] and again["type"] == "L4"


def test_a_node_joins_and_a_killed_node_retries_its_job(
    ray_server: Server, cluster: Any, tmp_path: Path
) -> None:
    node = cluster.add_node(num_cpus=1, num_gpus=1, resources={"accelerator_type:H100": 1})
    h100 = wait_for(
        lambda: [g for g in gpus(ray_server).values() if g["type"] == "H100"],
        timeout=30,
        what="the joining node's H100 in /v1/nodes",
    )[0]
    marks = tmp_path / "attempts"
    job = spawn(ray_server, "onray", "slow", path=str(marks))
    wait_for(lambda: marks.exists() and "H100" in marks.read_text(), timeout=60, what="H100 run")
    running = gpus(ray_server)[h100["index"]]["workers"]
    assert [w["jobs"] for w in running] == [[job]]
    cluster.remove_node(node, allow_graceful=False)  # its raylet and everything on it
    body = result(ray_server, job, timeout=90)
    # retried as after a worker crash, on the node still there with a GPU on its list
    assert body["status"] == "COMPLETED", body
    assert body["output"]["type"] == "A100"
    assert marks.read_text().split() == ["H100", "A100"]
    wait_for(
        lambda: all(g["type"] != "H100" for g in gpus(ray_server).values()),
        what="the dead node's H100 to leave the inventory",
    )


PAIR_APP = """
import os
import ember

app = ember.App("raypair")

@app.function(gpu="L4", idle_timeout=30)
def where() -> dict:
    return {"type": os.environ["EMBER_GPU_TYPE"], "pid": os.getpid()}
"""


def test_two_servers_share_one_ray_cluster_and_the_standby_takes_over(
    cluster: Any,
    ray_server: Server,
    pg_url: str,
    make_server: Callable[..., Server],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two servers on one PostgreSQL store and one Ray cluster (docs/architecture.md, "Several
    servers"): calls through the standby run on the scheduler's Ray actors; kill -9 of the
    scheduler ends its actors with its driver, and the standby takes over on the same cluster."""
    wait_for(lambda: not ray_server.http("GET", "/v1/workers").json()["workers"],
             timeout=30, what="the module server's workers to go idle and stop")  # fmt: skip
    monkeypatch.setenv("EMBER_MASTER_KEY", Fernet.generate_key().decode())
    monkeypatch.setenv("EMBER_LEASE_TTL", "2")
    args = ["--backend", "ray", "--ray-address", cluster.address, "--sandbox", "off"]
    a = make_server("--db", pg_url, *args)
    (tmp_path / "b").mkdir()
    shutil.copy(a.data_dir / "token", tmp_path / "b" / "token")
    b = make_server("--db", pg_url, *args, data_dir=tmp_path / "b")
    a.deploy(PAIR_APP, "raypair.py")
    first = b.http("POST", "/v1/apps/raypair/where/runsync", json={"input": {}})
    assert first.status_code == 200 and first.json()["output"]["type"] == "L4", first.text
    assert a.proc is not None
    os.kill(a.proc.pid, signal.SIGKILL)
    wait_for(
        lambda: b.http("GET", "/v1/health", token=None).json()["role"] == "leader",
        timeout=15,
        what="the standby to take over",
    )
    # the dead driver's actor held the L4; Ray frees it, and the new scheduler's worker gets it
    again = b.http("POST", "/v1/apps/raypair/where/runsync", json={"input": {}})
    assert again.status_code == 200 and again.json()["output"]["type"] == "L4", again.text
    assert again.json()["output"]["pid"] != first.json()["output"]["pid"]
