"""RunPod Serverless's client API under /runpod/v2, with plain HTTP against a real server.

The shapes of every route, as RunPod documents them; endpoint ids; RunPod-shaped errors with
the right status codes; that a job is reached only through its own endpoint and workspace;
stream reads that never send a chunk twice; runsync's `wait`; result retention; and the job
options a RunPod body carries (webhook, ttl, executionTimeout) and `retry`.
The official `runpod` client is driven in tests/test_runpod_client.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import UNSANDBOXED, Server, wait_for
from ember.sdk.client import Client
from ember.sdk.deploy import deploy_file

SOURCE = """
import os
import time

import ember

app = ember.App("rpa")


@app.function()
def square(x: int) -> dict:
    return {"y": x * x}


@app.function()
def count(n: int, delay: float = 0.05):
    for i in range(n):
        time.sleep(delay)  # sleep-ok: the deployed function's work, between values
        yield i


@app.function(max_workers=1)
def slow(s: float = 1.0) -> str:
    time.sleep(s)  # sleep-ok: the deployed function's work
    return "slept"


@app.function()
def flaky(path: str) -> str:
    if not os.path.exists(path):
        open(path, "w").close()
        raise RuntimeError("first try fails")
    return "second try works"


rph = ember.App("rph")


@rph.function()
def handler(**job) -> dict:
    return {"got": job}
"""

FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")


def server_args(*extra: str) -> list[str]:
    args = [*UNSANDBOXED, *extra]  # `flaky` leaves a file under the test's tmp_path
    return args


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(tmp_path_factory.mktemp("runpod") / "data", server_args()).start()
    server.deploy(SOURCE, filename="runpod_app.py")
    yield server
    server.shutdown(timeout=15)
    log = server.log()
    assert "unhandled error" not in log, f"the server hit an unhandled error:\n{log}"


def rp(
    srv: Server, method: str, path: str, *, token: str | None = "default", **kw: Any
) -> httpx.Response:
    return srv.http(method, "/runpod/v2/" + path, token=token, **kw)


def ok(resp: httpx.Response, status: int = 200) -> Any:
    assert resp.status_code == status, f"{resp.request.method} {resp.request.url}: {resp.text}"
    return resp.json()


def refused(resp: httpx.Response, status: int, *words: str) -> str:
    """A RunPod-shaped refusal, `{"error": "message"}`, whose message has every word."""
    assert resp.status_code == status, f"{resp.request.method} {resp.request.url}: {resp.text}"
    body = resp.json()
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    for word in words:
        assert word in body["error"], body
    return str(body["error"])


def ended(srv: Server, endpoint: str, job_id: str, timeout: float = 30) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        body: dict[str, Any] = ok(rp(srv, "GET", f"{endpoint}/status/{job_id}?wait=1000"))
        return body if body["status"] in FINAL else None

    found: dict[str, Any] = wait_for(done, timeout=timeout, what=f"job {job_id} to end")
    return found


# ----------------------------------------------------------------------------- shapes


def test_runsync_answers_the_status_body(srv: Server) -> None:
    body = ok(rp(srv, "POST", "rpa~square/runsync", json={"input": {"x": 7}}))
    assert body["status"] == "COMPLETED"
    assert body["output"] == {"y": 49}
    assert body["id"].startswith("job-") or body["id"]
    assert set(body) >= {"id", "status", "output", "delayTime", "executionTime", "workerId"}
    assert isinstance(body["delayTime"], int) and isinstance(body["executionTime"], int)
    assert "error" not in body


def test_run_then_status(srv: Server) -> None:
    queued = ok(rp(srv, "POST", "rpa~square/run", json={"input": {"x": 3}}))
    assert set(queued) == {"id", "status"}
    assert queued["status"] in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
    body = ended(srv, "rpa~square", queued["id"])
    assert body["status"] == "COMPLETED" and body["output"] == {"y": 9}
    assert body["id"] == queued["id"]
    # POST reads it as well as GET, as RunPod's API does
    assert ok(rp(srv, "POST", f"rpa~square/status/{queued['id']}"))["output"] == {"y": 9}


def test_the_app_alone_names_its_handler(srv: Server) -> None:
    body = ok(rp(srv, "POST", "rph/runsync", json={"input": {"prompt": "hi", "n": [1]}}))
    assert body["output"] == {"got": {"prompt": "hi", "n": [1]}}
    again = ok(rp(srv, "POST", "rph~handler/runsync", json={"input": {}}))
    assert again["output"] == {"got": {}}
    # the job reads back through either id of its endpoint
    assert ok(rp(srv, "GET", f"rph/status/{again['id']}"))["status"] == "COMPLETED"


def test_a_failed_job_shows_its_error(srv: Server) -> None:
    path = Path(srv.data_dir.parent) / f"flaky-{uuid.uuid4().hex}"
    body = ok(rp(srv, "POST", "rpa~flaky/runsync", json={"input": {"path": str(path)}}))
    assert body["status"] == "FAILED"
    assert "first try fails" in body["error"]
    assert "output" not in body


def test_health(srv: Server) -> None:
    ok(rp(srv, "POST", "rpa~square/runsync", json={"input": {"x": 1}}))
    body = ok(rp(srv, "GET", "rpa~square/health"))
    assert set(body) == {"jobs", "workers"}
    assert set(body["jobs"]) == {"completed", "failed", "inProgress", "inQueue", "retried"}
    assert {"idle", "running"} <= set(body["workers"])
    assert body["jobs"]["completed"] >= 1
    assert all(isinstance(v, int) for v in [*body["jobs"].values(), *body["workers"].values()])


def test_cancel_and_purge_queue(srv: Server) -> None:
    running = ok(rp(srv, "POST", "rpa~slow/run", json={"input": {"s": 30}}))
    wait_for(
        lambda: ok(rp(srv, "GET", f"rpa~slow/status/{running['id']}"))["status"] == "IN_PROGRESS",
        timeout=30,
        what="the slow job to start",
    )
    queued = [
        ok(rp(srv, "POST", "rpa~slow/run", json={"input": {"s": 30}}))["id"] for _ in range(3)
    ]
    assert ok(rp(srv, "GET", "rpa~slow/health"))["jobs"]["inQueue"] == 3
    assert ok(rp(srv, "POST", "rpa~slow/purge-queue")) == {"removed": 3, "status": "completed"}
    for job_id in queued:
        assert ended(srv, "rpa~slow", job_id)["status"] == "CANCELLED"
    cancelled = ok(rp(srv, "POST", f"rpa~slow/cancel/{running['id']}"))
    assert cancelled["id"] == running["id"]
    assert cancelled["status"] == "CANCELLED"
    assert ended(srv, "rpa~slow", running["id"])["status"] == "CANCELLED"
    # cancelling a job that has ended answers how it ended
    assert ok(rp(srv, "POST", f"rpa~slow/cancel/{running['id']}"))["status"] == "CANCELLED"
    assert ok(rp(srv, "POST", "rpa~slow/purge-queue")) == {"removed": 0, "status": "completed"}


# ----------------------------------------------------------------------------- stream


def read_stream(srv: Server, endpoint: str, job_id: str) -> tuple[list[Any], list[dict[str, Any]]]:
    """Every chunk, read as RunPod's client reads them (until a final state with nothing new)."""
    got: list[Any] = []
    reads: list[dict[str, Any]] = []
    for _ in range(200):
        body = ok(rp(srv, "GET", f"{endpoint}/stream/{job_id}"))
        reads.append(body)
        assert set(body) >= {"status", "stream"}
        got += [chunk["output"] for chunk in body["stream"]]
        if body["status"] in FINAL and not body["stream"]:
            return got, reads
    raise AssertionError(f"the stream did not end: {reads[-3:]}")


def test_stream_sends_each_chunk_once(srv: Server) -> None:
    job = ok(rp(srv, "POST", "rpa~count/run", json={"input": {"n": 12, "delay": 0.1}}))
    got, reads = read_stream(srv, "rpa~count", job["id"])
    assert got == list(range(12))
    assert len(reads) > 2  # it came in parts, not all at the end
    # once read, nothing is sent again; the status shows the generator's values
    assert ok(rp(srv, "GET", f"rpa~count/stream/{job['id']}"))["stream"] == []
    assert ok(rp(srv, "GET", f"rpa~count/status/{job['id']}"))["output"] == list(range(12))


def test_a_plain_functions_output_is_one_chunk_at_its_end(srv: Server) -> None:
    job = ok(rp(srv, "POST", "rpa~slow/run", json={"input": {"s": 0.5}}))
    got, _ = read_stream(srv, "rpa~slow", job["id"])
    assert got == ["slept"]


# ----------------------------------------------------------------------------- runsync wait


def test_runsync_wait_is_milliseconds(srv: Server) -> None:
    body = ok(rp(srv, "POST", "rpa~slow/runsync?wait=200", json={"input": {"s": 2}}))
    assert set(body) == {"id", "status"}
    assert body["status"] in ("IN_QUEUE", "IN_PROGRESS")
    assert ended(srv, "rpa~slow", body["id"])["output"] == "slept"
    for wait in ("-1", "300001", "soon"):
        refused(rp(srv, "POST", f"rpa~square/runsync?wait={wait}", json={"input": {}}), 400, "wait")


# ----------------------------------------------------------------------------- errors


def test_auth_takes_bearer_or_a_bare_key(srv: Server) -> None:
    body = {"input": {"x": 2}}
    bare = {"Authorization": srv.token}
    assert ok(rp(srv, "POST", "rpa~square/runsync", token=None, headers=bare, json=body))
    refused(rp(srv, "POST", "rpa~square/runsync", token=None, json=body), 401)
    refused(rp(srv, "POST", "rpa~square/runsync", token="wrong", json=body), 401)
    refused(rp(srv, "GET", "rpa~square/health", token=None, headers={"Authorization": "x"}), 401)
    refused(rp(srv, "GET", "nope/health", token=None), 401)  # 401 before 404


def test_scopes_are_the_native_ones(srv: Server) -> None:
    made = ok(
        srv.http("POST", "/v1/tokens", json={"name": f"r{uuid.uuid4().hex[:8]}", "scope": "read"}),
        201,
    )
    reader = made["token"]
    job = ok(rp(srv, "POST", "rpa~square/runsync", json={"input": {"x": 2}}))
    assert ok(rp(srv, "GET", f"rpa~square/status/{job['id']}", token=reader))["status"]
    assert ok(rp(srv, "GET", "rpa~square/health", token=reader))["jobs"]
    for path in ("rpa~square/run", "rpa~square/runsync", f"rpa~square/cancel/{job['id']}"):
        refused(rp(srv, "POST", path, token=reader, json={"input": {"x": 1}}), 403, "scope")
    refused(rp(srv, "POST", "rpa~square/purge-queue", token=reader), 403)


def test_unknown_endpoints_jobs_and_routes_are_404(srv: Server) -> None:
    refused(rp(srv, "POST", "nope/run", json={"input": {}}), 404, "'nope'")
    refused(rp(srv, "POST", "rpa~nope/runsync", json={"input": {}}), 404, "nope", "square")
    refused(rp(srv, "GET", "nope~x/health"), 404)
    # `rpa` alone: several functions, none named handler
    refused(rp(srv, "POST", "rpa/run", json={"input": {}}), 404, "rpa~square", "handler")
    refused(rp(srv, "GET", "rpa~square/status/job-doesnotexist"), 404, "job-doesnotexist")
    refused(rp(srv, "GET", "rpa~square/stream/job-doesnotexist"), 404)
    refused(rp(srv, "POST", "rpa~square/cancel/job-doesnotexist"), 404)
    refused(rp(srv, "POST", "rpa~square/retry/job-doesnotexist"), 404)
    refused(rp(srv, "GET", "rpa~square/nothing"), 404, "no such route")
    resp = rp(srv, "GET", "rpa~square/run")
    refused(resp, 405, "POST")
    assert resp.headers["allow"] == "POST"


def test_a_job_is_reached_only_through_its_own_endpoint(srv: Server) -> None:
    job = ok(rp(srv, "POST", "rpa~square/runsync", json={"input": {"x": 2}}))
    for path in (f"rpa~count/status/{job['id']}", f"rph/stream/{job['id']}"):
        refused(rp(srv, "GET", path), 404, job["id"])
    refused(rp(srv, "POST", f"rpa~slow/cancel/{job['id']}"), 404)


def test_another_workspaces_job_is_404(srv: Server, tmp_path: Path) -> None:
    job = ok(rp(srv, "POST", "rpa~square/runsync", json={"input": {"x": 2}}))
    name = f"rp{uuid.uuid4().hex[:8]}"
    other = ok(srv.http("POST", "/v1/workspaces", json={"name": name}), 201)["token"]
    refused(rp(srv, "GET", f"rpa~square/status/{job['id']}", token=other), 404, "'rpa'")
    # the same app in the other workspace is its own endpoint: still not this job
    path = tmp_path / "runpod_app.py"
    path.write_text(SOURCE)
    deploy_file(path, client=Client(srv.url, token=other), wait=False)
    for route in ("status", "stream"):
        refused(rp(srv, "GET", f"rpa~square/{route}/{job['id']}", token=other), 404, job["id"])
    refused(rp(srv, "POST", f"rpa~square/cancel/{job['id']}", token=other), 404)
    assert ok(rp(srv, "GET", f"rpa~square/status/{job['id']}"))["status"] == "COMPLETED"


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"input": {"x": 1}, "webhook": "ftp://example.com/hook"}, 400, ["webhook", "http"]),
        ({"input": {"x": 1}, "webhook": "javascript:alert(1)"}, 400, ["webhook"]),
        ({"input": {"x": 1}, "policy": {"ttl": -1000}}, 400, ["policy.ttl"]),
        ({"input": {"x": 1}, "policy": {"executionTimeout": -1}}, 400, ["executionTimeout"]),
        ({"input": {"x": 1}, "policy": {"speed": 1}}, 400, ["speed"]),
        ({"input": {"x": 1}, "extra": 1}, 400, ["unknown field 'extra'"]),
        ({"x": 1}, 400, ["input"]),
        ([1, 2], 400, ["JSON object"]),
        ({"input": [1, 2]}, 422, ["input", "JSON object"]),
        ({"input": "hello"}, 422, ["JSON object"]),
        ({"input": {"y": 1}}, 422, ["'y'", "square takes x"]),
        ({"input": {"x": "two"}}, 422, ["'x'"]),
    ],
)
def test_a_bad_body_is_a_runpod_shaped_error(
    srv: Server, body: Any, status: int, words: list[str]
) -> None:
    for route in ("run", "runsync"):
        refused(rp(srv, "POST", f"rpa~square/{route}", json=body), status, *words)


def test_bad_json_is_a_400_not_fastapis_422(srv: Server) -> None:
    resp = rp(
        srv,
        "POST",
        "rpa~square/run",
        content=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    refused(resp, 400, "JSON")


# ----------------------------------------------------------------------------- job options


class Receiver:
    """A local HTTP server that records every POST's JSON body."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        received = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                received.append(json.loads(self.rfile.read(length) or b"null"))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def test_the_webhook_gets_the_status_body(srv: Server, receiver: Receiver) -> None:
    job = ok(rp(srv, "POST", "rpa~square/run", json={"input": {"x": 5}, "webhook": receiver.url}))
    wait_for(lambda: receiver.bodies, timeout=30, what="the webhook")
    (body,) = receiver.bodies
    assert body["id"] == job["id"]
    assert body["status"] == "COMPLETED"
    assert body["output"] == {"y": 25}
    assert {"delayTime", "executionTime"} <= set(body)


def test_ttl_expires_a_queued_job(srv: Server) -> None:
    blocker = ok(rp(srv, "POST", "rpa~slow/run", json={"input": {"s": 3}}))
    queued = ok(rp(srv, "POST", "rpa~slow/run", json={"input": {"s": 0}, "policy": {"ttl": 300}}))
    assert ended(srv, "rpa~slow", queued["id"])["status"] == "TIMED_OUT"
    assert ended(srv, "rpa~slow", blocker["id"])["status"] == "COMPLETED"


def test_execution_timeout_is_the_jobs_timeout(srv: Server) -> None:
    body = {"input": {"s": 20}, "policy": {"executionTimeout": 500}}
    job = ok(rp(srv, "POST", "rpa~slow/run", json=body))
    assert ended(srv, "rpa~slow", job["id"])["status"] == "TIMED_OUT"


def test_retry_runs_a_failed_job_again_under_its_id(srv: Server, tmp_path: Path) -> None:
    path = tmp_path / "flaky"
    failed = ok(rp(srv, "POST", "rpa~flaky/runsync", json={"input": {"path": str(path)}}))
    assert failed["status"] == "FAILED"
    again = ok(rp(srv, "POST", f"rpa~flaky/retry/{failed['id']}"))
    assert again == {"id": failed["id"], "status": again["status"]}
    assert again["status"] in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
    body = ended(srv, "rpa~flaky", failed["id"])
    assert body["status"] == "COMPLETED" and body["output"] == "second try works"
    assert ok(rp(srv, "GET", "rpa~flaky/health"))["jobs"]["retried"] >= 1
    # a completed job is not retried
    refused(rp(srv, "POST", f"rpa~flaky/retry/{failed['id']}"), 409)


# ----------------------------------------------------------------------------- retention


def test_results_are_kept_as_long_as_the_server_says(make_server: Any) -> None:
    server: Server = make_server(
        *server_args("--runpod-run-retention", "1", "--runpod-runsync-retention", "1")
    )
    server.deploy(SOURCE, filename="runpod_app.py")
    sync = ok(rp(server, "POST", "rpa~square/runsync", json={"input": {"x": 2}}))
    queued = ok(rp(server, "POST", "rpa~square/run", json={"input": {"x": 3}}))
    assert ended(server, "rpa~square", queued["id"])["status"] == "COMPLETED"
    native = server.client.run("rpa", "square", {"x": 4})["id"]
    for job_id in (sync["id"], queued["id"]):
        wait_for(
            lambda job_id=job_id: (
                rp(server, "GET", f"rpa~square/status/{job_id}").status_code == 404
            ),
            timeout=30,
            what=f"job {job_id} to be dropped",
        )
    # a job of the native API is kept as the server's --job-retention says
    assert server.http("GET", f"/v1/jobs/{native}").status_code == 200


def test_the_retention_flags_are_checked() -> None:
    from ember.core.quotas import from_flags

    quotas = from_flags(
        max_queued_jobs=10,
        max_queued_bytes="1MiB",
        job_retention="7d",
        max_job_log="1MiB",
        max_app_log="1MiB",
        runpod_run_retention="2h",
        runpod_runsync_retention="90s",
    )
    assert (quotas.runpod_run_retention_s, quotas.runpod_runsync_retention_s) == (7200, 90)
    with pytest.raises(ValueError, match="--runpod-run-retention"):
        from_flags(
            max_queued_jobs=10,
            max_queued_bytes="1MiB",
            job_retention="7d",
            max_job_log="1MiB",
            max_app_log="1MiB",
            runpod_run_retention="soon",
        )


def test_a_full_queue_is_a_429_with_retry_after(make_server: Any) -> None:
    server: Server = make_server(*server_args("--max-queued-jobs", "1"))
    server.deploy(SOURCE, filename="runpod_app.py")
    running = ok(rp(server, "POST", "rpa~slow/run", json={"input": {"s": 30}}))
    wait_for(
        lambda: (
            ok(rp(server, "GET", f"rpa~slow/status/{running['id']}"))["status"] == "IN_PROGRESS"
        ),
        timeout=30,
        what="the slow job to start",
    )
    ok(rp(server, "POST", "rpa~slow/run", json={"input": {"s": 30}}))
    resp = rp(server, "POST", "rpa~slow/run", json={"input": {"s": 30}})
    refused(resp, 429, "queue")
    assert int(resp.headers["retry-after"]) >= 1
    refused(rp(server, "POST", "rpa~square/runsync", json={"input": {"x": 1}}), 429)
    assert ok(rp(server, "POST", "rpa~slow/purge-queue"))["removed"] == 1
    ok(rp(server, "POST", f"rpa~slow/cancel/{running['id']}"))


# ----------------------------------------------------------------------------- ember endpoints


def ember_cli(srv: Server, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBER_")}
    env.update(EMBER_URL=srv.url, EMBER_TOKEN=srv.token, COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "ember.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_ember_endpoints_lists_every_functions_endpoint(srv: Server) -> None:
    proc = ember_cli(srv, "endpoints", "--json")
    assert proc.returncode == 0, proc.stderr
    listed = {e["endpoint_id"]: e for e in json.loads(proc.stdout)}
    assert listed["rpa~square"] == {
        "endpoint_id": "rpa~square",
        "app": "rpa",
        "function": "square",
        "aliases": [],
    }
    assert listed["rph~handler"]["aliases"] == ["rph"]
    assert {e["function"] for e in listed.values() if e["app"] == "rpa"} == {
        "square",
        "count",
        "slow",
        "flaky",
    }
    # every id listed answers on /runpod/v2
    for endpoint_id in listed:
        assert ok(rp(srv, "GET", f"{endpoint_id}/health"))["jobs"] is not None
    table = ember_cli(srv, "endpoints")
    assert table.returncode == 0, table.stderr
    assert "rpa~square" in table.stdout and "rph~handler" in table.stdout
    assert f"{srv.url}/runpod/v2" in table.stdout


# ----------------------------------------------------------------------------- several servers


def test_a_standby_forwards_the_runpod_api_to_the_scheduler(
    pg_url: str, make_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cryptography.fernet import Fernet

    monkeypatch.setenv("EMBER_MASTER_KEY", Fernet.generate_key().decode())
    monkeypatch.setenv("EMBER_LEASE_TTL", "2")
    a: Server = make_server("--db", pg_url, *UNSANDBOXED)
    b_dir = tmp_path / "b"
    b_dir.mkdir()
    shutil.copy(a.data_dir / "token", b_dir / "token")
    b: Server = make_server("--db", pg_url, *UNSANDBOXED, data_dir=b_dir)
    assert b.http("GET", "/v1/health", token=None).json()["role"] == "standby"
    a.deploy(SOURCE, filename="runpod_app.py")
    assert ok(rp(b, "POST", "rpa~square/runsync", json={"input": {"x": 3}}))["output"] == {"y": 9}
    job = ok(rp(b, "POST", "rpa~count/run", json={"input": {"n": 4}}))
    got, _ = read_stream(b, "rpa~count", job["id"])
    assert got == [0, 1, 2, 3]
    assert ok(rp(a, "GET", f"rpa~count/status/{job['id']}"))["output"] == [0, 1, 2, 3]
    refused(rp(b, "GET", "rpa~nope/health"), 404, "nope")
