"""RunPod handler files deployed unchanged with `ember deploy --runpod FILE` (docs/runpod.md).

Each file is written as RunPod's docs show one (`import runpod` at the top,
`runpod.serverless.start({...})` at the bottom), deployed with the CLI against a real server,
and called through ember's native API; progress is read through `/runpod/v2/.../status`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Server, wait_for
from ember.sdk.job import Job

PLAIN = """
import runpod


def handler(job):
    job_input = job["input"]
    name = job_input.get("name", "World")
    return {"greeting": f"Hello, {name}!", "job_id": job["id"], "worker": worker_id()}


_me = None


def worker_id():
    global _me
    if _me is None:  # made at the first job: each worker process (fork) has its own
        import uuid

        _me = uuid.uuid4().hex
    return _me


runpod.serverless.start({"handler": handler})
"""

ASYNC = """
import asyncio

import runpod


async def handler(job):
    await asyncio.sleep(0.01)
    return sum(job["input"]["numbers"])


runpod.serverless.start({"handler": handler})
"""

GENERATOR = """
import time

import runpod


def handler(job):
    for word in job["input"]["text"].split():
        time.sleep(0.01)
        yield word.upper()


runpod.serverless.start({"handler": handler, "return_aggregate_stream": True})
"""

ASYNC_GENERATOR = """
import asyncio

import runpod


async def handler(job):
    for i in range(job["input"]["n"]):
        await asyncio.sleep(0.01)
        yield {"i": i}


runpod.serverless.start({"handler": handler, "return_aggregate_stream": True})
"""

ERRORS = """
import runpod


def handler(job):
    if job["input"].get("fail"):
        return {"error": "bad input: fail was set"}
    if job["input"].get("raise"):
        raise ValueError("the handler raised")
    return {"ok": True}


runpod.serverless.start({"handler": handler})
"""

CONCURRENT = """
import runpod


async def handler(job):
    return job["input"]


def adjust_concurrency(current_concurrency):
    return 4


runpod.serverless.start({"handler": handler, "concurrency_modifier": adjust_concurrency})
"""

PROGRESS = """
import time

import runpod


def handler(job):
    runpod.serverless.progress_update(job, "halfway there")
    time.sleep(60)
    return "done"


runpod.serverless.start({"handler": handler})
"""

REFRESH = """
import runpod

_me = None


def handler(job):
    global _me
    if _me is None:
        import uuid

        _me = uuid.uuid4().hex
    return {"worker": _me, "refresh_worker": True}


runpod.serverless.start({"handler": handler})
"""

STAND_IN = """
import runpod


def handler(job):
    return {"stand_in": getattr(runpod, "__ember_stand_in__", False), "x": job["input"]["x"]}


runpod.serverless.start({"handler": handler})
"""

NO_START = """
import runpod


def handler(job):
    return 1


if __name__ == "__main__":
    runpod.serverless.start({"handler": handler})
"""


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(tmp_path_factory.mktemp("runpod") / "data").start()
    yield server
    server.shutdown(timeout=15)


def write(srv: Server, filename: str, source: str) -> Path:
    """A handler file in a directory of its own (the bundle is the file's directory)."""
    d = srv.data_dir.parent / Path(filename).stem
    d.mkdir(exist_ok=True)
    path = d / filename
    path.write_text(textwrap.dedent(source))
    return path


def ember(srv: Server, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBER_")}
    env.update({"EMBER_URL": srv.url, "EMBER_TOKEN": srv.token, "COLUMNS": "200"})
    return subprocess.run(
        [sys.executable, "-m", "ember.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def deploy(srv: Server, filename: str, source: str, *flags: str) -> str:
    proc = ember(srv, "deploy", "--runpod", str(write(srv, filename, source)), *flags)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc.stdout


def runsync(srv: Server, app: str, input: dict[str, Any]) -> dict[str, Any]:
    r = srv.http("POST", f"/v1/apps/{app}/handler/runsync", json={"input": input})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def test_a_plain_handler_is_the_function_handler_of_an_app_named_after_the_file(
    srv: Server,
) -> None:
    out = deploy(srv, "hello_worker.py", PLAIN)
    assert "deployed app hello_worker version 1: handler" in out, out
    assert "RunPod endpoint id: hello_worker" in out, out
    first = runsync(srv, "hello_worker", {"name": "ember"})
    assert first["status"] == "COMPLETED", first
    assert first["output"]["greeting"] == "Hello, ember!"
    assert first["output"]["job_id"] == first["id"]  # RunPod's job["id"] is ember's job id
    second = runsync(srv, "hello_worker", {})
    assert second["output"]["greeting"] == "Hello, World!"
    assert second["output"]["worker"] == first["output"]["worker"]  # the warm worker again
    assert second["timings"]["cold_start_ms"] == 0.0, second["timings"]
    apps = srv.http("GET", "/v1/apps/hello_worker").json()
    (fn,) = apps["functions"]
    assert fn["name"] == "handler" and fn["kind"] == "function"


def test_name_overrides_the_file_name_and_flags_set_the_function_options(srv: Server) -> None:
    out = deploy(
        srv, "named_worker.py", PLAIN, "--name", "greeter", "--max-workers", "3", "--timeout", "9"
    )
    assert "deployed app greeter version 1: handler" in out, out
    assert runsync(srv, "greeter", {"name": "x"})["output"]["greeting"] == "Hello, x!"
    (fn,) = srv.http("GET", "/v1/apps/greeter").json()["functions"]
    assert fn["spec"]["scaling"]["max_workers"] == 3
    assert fn["spec"]["timeout"] == 9.0
    assert srv.http("GET", "/v1/apps/named_worker").status_code == 404


def test_a_config_file_gives_the_settings_and_flags_win(srv: Server) -> None:
    path = write(srv, "configured_worker.py", PLAIN)
    (path.parent / "runpod.toml").write_text('name = "configured"\nmax-workers = 2\nretries = 1\n')
    proc = ember(
        srv, "deploy", "--runpod", str(path), "--config", str(path.parent / "runpod.toml"),
        "--retries", "2",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (fn,) = srv.http("GET", "/v1/apps/configured").json()["functions"]
    assert fn["spec"]["scaling"]["max_workers"] == 2 and fn["spec"]["retries"] == 2


def test_an_async_handler(srv: Server) -> None:
    deploy(srv, "async_worker.py", ASYNC)
    body = runsync(srv, "async_worker", {"numbers": [1, 2, 3]})
    assert body["status"] == "COMPLETED" and body["output"] == 6, body


def test_a_generator_handler_streams_and_aggregates(srv: Server) -> None:
    deploy(srv, "stream_worker.py", GENERATOR)
    body = runsync(srv, "stream_worker", {"text": "hello from ember"})
    assert body["status"] == "COMPLETED", body
    assert body["output"] == ["HELLO", "FROM", "EMBER"]  # return_aggregate_stream
    job = srv.client.run("stream_worker", "handler", {"text": "a b c"})
    assert list(Job(job["id"], client=srv.client).stream()) == ["A", "B", "C"]
    (fn,) = srv.http("GET", "/v1/apps/stream_worker").json()["functions"]
    assert fn["kind"] == "generator"


def test_an_async_generator_handler(srv: Server) -> None:
    deploy(srv, "agen_worker.py", ASYNC_GENERATOR)
    body = runsync(srv, "agen_worker", {"n": 3})
    assert body["output"] == [{"i": 0}, {"i": 1}, {"i": 2}], body


def test_a_returned_error_fails_the_job_with_its_message(srv: Server) -> None:
    deploy(srv, "error_worker.py", ERRORS)
    body = runsync(srv, "error_worker", {"fail": True})
    assert body["status"] == "FAILED", body
    assert body["error"]["type"] == "HandlerError"
    assert body["error"]["message"] == "bad input: fail was set"
    raised = runsync(srv, "error_worker", {"raise": True})
    assert raised["status"] == "FAILED" and raised["error"]["type"] == "ValueError", raised
    ok = runsync(srv, "error_worker", {})
    assert ok["status"] == "COMPLETED" and ok["output"] == {"ok": True}, ok


def test_concurrency_modifier_sets_the_concurrency_unless_the_flag_does(srv: Server) -> None:
    deploy(srv, "conc_worker.py", CONCURRENT)
    (fn,) = srv.http("GET", "/v1/apps/conc_worker").json()["functions"]
    assert fn["spec"]["scaling"]["concurrency"] == 4
    assert runsync(srv, "conc_worker", {"a": 1})["output"] == {"a": 1}
    deploy(srv, "conc_worker.py", CONCURRENT, "--concurrency", "2")
    (fn,) = srv.http("GET", "/v1/apps/conc_worker").json()["functions"]
    assert fn["spec"]["scaling"]["concurrency"] == 2


def test_progress_update_shows_in_the_runpod_status_while_the_job_runs(srv: Server) -> None:
    deploy(srv, "progress_worker.py", PROGRESS)
    job_id = srv.client.run("progress_worker", "handler", {})["id"]

    def progress() -> Any:
        r = srv.http("GET", f"/runpod/v2/progress_worker/status/{job_id}")
        assert r.status_code == 200, r.text  # needs the /runpod/v2 router
        body = r.json()
        return body if body.get("output") == "halfway there" else None

    body = wait_for(progress, timeout=30, what="the job's progress")
    assert body["status"] == "IN_PROGRESS"
    srv.http("POST", f"/v1/jobs/{job_id}/cancel")


def test_refresh_worker_stops_the_worker_after_its_job(srv: Server) -> None:
    deploy(srv, "refresh_worker.py", REFRESH)
    first = runsync(srv, "refresh_worker", {})
    assert first["status"] == "COMPLETED" and set(first["output"]) == {"worker"}, first
    second = runsync(srv, "refresh_worker", {})
    assert second["output"]["worker"] != first["output"]["worker"]


def test_a_file_that_never_starts_fails_the_deploy_saying_so(srv: Server) -> None:
    proc = ember(srv, "deploy", "--runpod", str(write(srv, "idle_worker.py", NO_START)))
    assert proc.returncode == 1
    assert "never called runpod.serverless.start" in proc.stderr, proc.stderr
    assert srv.http("GET", "/v1/apps/idle_worker").status_code == 404


def test_runpod_flags_need_runpod(srv: Server) -> None:
    proc = ember(srv, "deploy", str(write(srv, "flag_worker.py", PLAIN)), "--gpu", "H100")
    assert proc.returncode == 1 and "--gpu is for `ember deploy --runpod" in proc.stderr


def test_an_env_without_runpod_runs_the_handler_with_the_stand_in(srv: Server) -> None:
    out = deploy(srv, "standin_worker.py", STAND_IN, "--base", "standard")
    assert "runs in env-" in out, out
    body = runsync(srv, "standin_worker", {"x": 5})
    assert body["output"] == {"stand_in": True, "x": 5}, body


LOADER = """
import sys
from importlib.abc import MetaPathFinder
from pathlib import Path


class NoRunpod(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "runpod" or name.startswith("runpod."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None


sys.meta_path.insert(0, NoRunpod())
from ember.sdk.runpod import capturing, import_handler, make_app, the_config

here = Path(sys.argv[1])
with capturing(keep=True) as configs:
    import_handler(here.parent, here.stem, here.name)
app = make_app("standin", the_config(configs, here.name))
import runpod

print(app.units["handler"].local(x=7)["stand_in"], runpod.serverless.start.__module__)
try:
    runpod.get_pods
except AttributeError as exc:
    print("AttributeError:", exc)
"""


def test_the_stand_in_when_runpod_is_not_importable(tmp_path: Path) -> None:
    handler = tmp_path / "standin_handler.py"
    handler.write_text(textwrap.dedent(STAND_IN))
    proc = subprocess.run(
        [sys.executable, "-c", LOADER, str(handler)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.splitlines()[:2]
    assert first == "True ember.sdk.runpod"
    assert "only serverless.start and serverless.progress_update" in second
    assert "--packages runpod" in second


def test_a_handler_in_a_package_keeps_its_relative_imports(srv: Server) -> None:
    pkg = srv.data_dir.parent / "proj" / "pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "helpers.py").write_text("def shout(s):\n    return s.upper()\n")
    (pkg / "pkg_worker.py").write_text(
        "import runpod\n\nfrom .helpers import shout\n\n\n"
        "def handler(job):\n    return shout(job['input']['s'])\n\n\n"
        "runpod.serverless.start({'handler': handler})\n"
    )
    proc = ember(srv, "deploy", "--runpod", str(pkg / "pkg_worker.py"))
    assert proc.returncode == 0, proc.stderr
    assert runsync(srv, "pkg_worker", {"s": "hi"})["output"] == "HI"
    assert not list(pkg.parent.glob("_ember_runpod_*")) and not list(pkg.glob("_ember_runpod_*"))


def test_what_a_handler_returns_reads_as_runpod_reads_it() -> None:
    from ember.sdk.runpod import HandlerError, handler_function

    def handler(job: dict[str, Any]) -> Any:
        return job["input"]["out"]

    fn = handler_function({"handler": handler})
    assert fn(out={"a": 1, "refresh_worker": False}) == {"a": 1}
    assert fn(out={"refresh_worker": True}) is None  # nothing left: no output, as RunPod
    assert fn(out={"error": None, "a": 2}) == {"a": 2}
    assert fn(out=[1, {"error": "inside a list is data"}]) == [
        1,
        {"error": "inside a list is data"},
    ]
    with pytest.raises(HandlerError, match=r'^\{"code": 3\}$'):
        fn(out={"error": {"code": 3}})

    def stream(job: dict[str, Any]) -> Iterator[Any]:
        yield 1
        yield {"error": "stopped"}
        yield 2

    chunks: list[Any] = []
    with pytest.raises(HandlerError, match="stopped"):
        for chunk in handler_function({"handler": stream})():
            chunks.append(chunk)
    assert chunks == [1]
