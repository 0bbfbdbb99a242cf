"""Templates: workers forked from a process that imported the function once."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

import ember
from conftest import UNSANDBOXED, Server, pid_alive, wait_for, worker_pids

SOURCE = """
import os
import time

import ember

app = ember.App("tpl")


@app.cls(max_workers=2, idle_timeout=60)
class Model:
    @ember.enter(snap=True)
    def load(self) -> None:
        # CPU-side loading: runs once, in the template, and every fork shares the result.
        self.loaded_in = os.getpid()
        self.weights = list(range(1000))

    @ember.enter()
    def per_worker(self) -> None:
        self.worker_pid = os.getpid()
        self.cuda = os.environ.get("CUDA_VISIBLE_DEVICES")
        self.gpus = os.environ.get("EMBER_GPU_INDEXES")

    @ember.method()
    def info(self, delay: float = 0.0) -> dict:
        time.sleep(delay)
        return {"loaded_in": self.loaded_in, "worker_pid": self.worker_pid, "pid": os.getpid(),
                "ppid": os.getppid(), "weights": len(self.weights), "cuda": self.cuda,
                "gpus": self.gpus}
"""


def test_workers_fork_from_a_template_that_ran_the_snap_hooks_once(
    make_server: Callable[..., Server],
) -> None:
    server = make_server(*UNSANDBOXED, "--gpus", "L4:2")
    server.deploy(SOURCE.replace("max_workers=2,", 'max_workers=2, gpu="L4",'))
    info = server.function("tpl", "Model.info")
    jobs = [info.spawn(delay=1.0), info.spawn(delay=1.0)]
    first, second = (job.result(timeout=60) for job in jobs)
    # two workers, each its own process, both children of the one template that loaded the model
    assert first["pid"] != second["pid"]
    assert first["loaded_in"] == second["loaded_in"] == first["ppid"] == second["ppid"]
    assert first["loaded_in"] not in (first["pid"], second["pid"])
    assert first["weights"] == 1000
    # the plain @enter hook ran in each worker, which sees its own GPU and no CUDA device
    assert first["worker_pid"] == first["pid"] and second["worker_pid"] == second["pid"]
    assert {first["gpus"], second["gpus"]} == {"0", "1"}
    assert first["cuda"] == "" and second["cuda"] == ""
    # a forked worker starts without importing again: its job shows a cold start, no import
    assert {w["pid"] for w in server.workers()} == {first["pid"], second["pid"]}


def test_without_templates_workers_are_plain_processes(make_server: Callable[..., Server]) -> None:
    server = make_server(*UNSANDBOXED, "--no-templates")
    server.deploy(SOURCE)
    out = server.function("tpl", "Model.info").remote()
    assert out["loaded_in"] == out["pid"] == out["worker_pid"]
    assert out["ppid"] == server.proc.pid  # type: ignore[union-attr]


def test_a_template_that_fails_falls_back_to_plain_workers(
    make_server: Callable[..., Server],
) -> None:
    server = make_server(*UNSANDBOXED)
    # the snap hook fails only in a template (it has no CUDA_VISIBLE_DEVICES of its own choosing
    # and the marker below), so plain workers still serve with the same behaviour
    failing = SOURCE.replace(
        "self.loaded_in = os.getpid()",
        "self.loaded_in = os.getpid()\n"
        "        if os.environ.get('EMBER_TEMPLATE'):\n"
        "            raise RuntimeError('no template for me')",
    )
    # a deploy that waits says so, with the traceback, and deploys nothing
    with pytest.raises(ember.InvalidInput, match=r"(?s)line 17, in load.*no template for me"):
        server.deploy(failing)
    assert server.http("GET", "/v1/apps").json()["apps"] == []
    # one that does not wait (`ember deploy --no-wait`) serves from plain workers
    server.deploy(failing, wait=False)
    template_log = wait_for(
        lambda: list((server.data_dir / "logs" / "workers").glob("template-*.log"))
    )[0]
    wait_for(lambda: "no template for me" in template_log.read_text(), what="the template to fail")
    out = server.function("tpl", "Model.info").remote()
    assert out["loaded_in"] == out["pid"]


def test_redeploy_retires_the_template_after_its_workers_drain(
    make_server: Callable[..., Server],
) -> None:
    server = make_server(*UNSANDBOXED)
    server.deploy(SOURCE)
    old = server.function("tpl", "Model.info").remote()
    template = old["ppid"]
    assert pid_alive(template)
    server.deploy(SOURCE.replace("list(range(1000))", "list(range(10))"))
    new = server.function("tpl", "Model.info").remote()
    assert new["weights"] == 10
    wait_for(lambda: not pid_alive(old["pid"]), what="the old worker to drain")
    wait_for(lambda: not pid_alive(template), what="the old template to exit")


def test_a_killed_server_leaves_no_template_or_fork_behind(
    make_server: Callable[..., Server],
) -> None:
    server = make_server(*UNSANDBOXED)
    server.deploy(SOURCE)
    out = server.function("tpl", "Model.info").remote()
    assert pid_alive(out["ppid"])
    data_dir: Path = server.data_dir
    server.kill9()
    wait_for(lambda: not worker_pids(data_dir), timeout=10, what="template and worker to exit")
    assert not pid_alive(out["pid"]) and not pid_alive(out["ppid"])
    assert os.path.exists(data_dir)


def test_an_idle_template_stops_and_the_next_call_starts_it_again(
    make_server: Callable[..., Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EMBER_TEMPLATE_IDLE", "1s")
    server = make_server(*UNSANDBOXED)
    server.deploy(SOURCE.replace("idle_timeout=60", "idle_timeout=0.5"))
    info = server.function("tpl", "Model.info")
    first = info.remote()
    template = first["ppid"]
    assert first["loaded_in"] == template
    # the worker idles out, then the template, which forked nothing for a second: memory goes too
    wait_for(lambda: not pid_alive(first["pid"]), what="the worker to scale to zero")
    wait_for(lambda: not pid_alive(template), what="the idle template to stop")
    # the next call brings a new template back and forks from it
    second = info.remote()
    assert second["ppid"] != template and second["loaded_in"] == second["ppid"]
    assert pid_alive(second["ppid"])
