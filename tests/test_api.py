"""The HTTP API through raw requests: every /v1 endpoint, its errors, and nasty inputs.

One server (and one deployed app) serves the whole module; tests that count jobs or workers
deploy an app of their own, so no test depends on another.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import Server, wait_for

SOURCE = """
import time
from typing import Any

import ember

app = ember.App("api", tags={"team": "tests"})


@app.function()
def square(x: int) -> int:
    return x * x


@app.function()
def greet(name: str, punct: str = "!") -> str:
    return f"hello {name}{punct}"


@app.function()
def echo(v: Any = None) -> Any:
    return v


@app.function(max_workers=4)
def sleepy(s: float) -> float:
    deadline = time.monotonic() + s
    while time.monotonic() < deadline:  # short sleeps: a cancel interrupts it at once
        time.sleep(0.01)  # sleep-ok: the deployed function's simulated work
    return s


@app.function()
def count(n: int):
    for i in range(n):
        yield {"i": i}


@app.function()
def fail(msg: str) -> None:
    raise ValueError(msg)


@app.function()
def weird(kind: str) -> Any:
    if kind == "nan":
        return float("nan")
    if kind == "inf":
        return float("inf")
    if kind == "surrogate":
        return "\\ud800"
    if kind == "object":
        return object()
    if kind == "raise_surrogate":
        raise ValueError("bad \\ud800 message")
    if kind == "print_surrogate":
        print("printed \\ud800")
        return "printed"
    return kind


@app.cls()
class Counter:
    @ember.enter()
    def load(self) -> None:
        self.base = 100

    @ember.method()
    def add(self, x: int) -> int:
        return self.base + x
"""

TIMINGS = {"queue_ms", "cold_start_ms", "load_ms", "exec_ms", "post_ms", "total_ms"}
JOB_KEYS = {"id", "app", "function", "status", "output", "error", "timings"}
JOB_KEYS |= {"created_at", "finished_at"}
RUNNING = {"IN_QUEUE", "IN_PROGRESS"}


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(tmp_path_factory.mktemp("api") / "data").start()
    server.deploy(SOURCE, filename="api_app.py")
    yield server
    server.shutdown(timeout=15)  # fails the module if a worker outlives the server
    log = server.log()
    assert "unhandled error" not in log, f"the server hit an unhandled error:\n{log}"


def run(server: Server, fn: str, input: Any, app: str = "api", **kw: Any) -> httpx.Response:
    return server.http("POST", f"/v1/apps/{app}/{fn}/run", json={"input": input}, **kw)


def runsync(server: Server, fn: str, input: Any, app: str = "api", **kw: Any) -> httpx.Response:
    return server.http("POST", f"/v1/apps/{app}/{fn}/runsync", json={"input": input}, **kw)


def job(server: Server, job_id: str, wait: float | None = None) -> dict[str, Any]:
    params = {"wait": wait} if wait is not None else None
    resp = server.http("GET", f"/v1/jobs/{job_id}", params=params)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


def finished(server: Server, job_id: str) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        body = job(server, job_id, wait=5)
        return None if body["status"] in RUNNING else body

    result: dict[str, Any] = wait_for(ended, timeout=30, what=f"job {job_id} to end")
    return result


def assert_error(resp: httpx.Response, status: int, *words: str) -> dict[str, Any]:
    """A JSON error body `{"error": {"code", "message"}}` whose message has every word."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert isinstance(body["error"]["code"], str) and body["error"]["code"]
    for word in words:
        assert word in body["error"]["message"], body
    err: dict[str, Any] = body["error"]
    return err


def parse_sse(text: str) -> list[tuple[str, Any]]:
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        name, data = "message", []
        for line in block.splitlines():
            field, _, value = line.partition(":")
            if field == "event":
                name = value.strip()
            elif field == "data":
                data.append(value.lstrip())
        events.append((name, json.loads("\n".join(data))))
    return events


# ----------------------------------------------------------------------------- jobs


def test_run_answers_202_in_queue_then_the_job_completes(api: Server) -> None:
    resp = run(api, "square", {"x": 7})
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert set(body) == {"id", "status"}
    assert body["status"] == "IN_QUEUE"
    assert body["id"].startswith("job-")
    done = finished(api, body["id"])
    assert done["status"] == "COMPLETED"
    assert done["output"] == 49


def test_runsync_answers_the_whole_job_body(api: Server) -> None:
    resp = runsync(api, "greet", {"name": "ada"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) >= JOB_KEYS
    assert body["app"] == "api"
    assert body["function"] == "greet"
    assert body["status"] == "COMPLETED"
    assert body["output"] == "hello ada!"
    assert body["error"] is None
    assert set(body["timings"]) == TIMINGS
    t = body["timings"]
    assert all(isinstance(v, int | float) and v >= 0 for v in t.values()), t
    parts = t["queue_ms"] + t["cold_start_ms"] + t["load_ms"] + t["exec_ms"] + t["post_ms"]
    assert t["total_ms"] == pytest.approx(parts, abs=0.01)
    assert body["created_at"] <= body["finished_at"]
    # the same body later through GET
    again = job(api, body["id"])
    assert {k: again[k] for k in JOB_KEYS} == {k: body[k] for k in JOB_KEYS}


def test_runsync_with_a_short_wait_answers_202_with_the_running_job(api: Server) -> None:
    resp = api.http(
        "POST", "/v1/apps/api/sleepy/runsync", params={"wait": 0.2}, json={"input": {"s": 30}}
    )
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert set(body) >= JOB_KEYS
    assert body["status"] in RUNNING
    assert body["output"] is None and body["finished_at"] is None
    # GET with a short wait answers at once with the job still running
    assert job(api, body["id"], wait=0.1)["status"] in RUNNING
    cancelled = api.http("POST", f"/v1/jobs/{body['id']}/cancel").json()
    assert cancelled["status"] == "CANCELLED"


def test_get_job_waits_for_the_end(api: Server) -> None:
    job_id = run(api, "sleepy", {"s": 0.3}).json()["id"]
    body = job(api, job_id, wait=30)
    assert body["status"] == "COMPLETED"
    assert body["output"] == 0.3
    assert body["timings"]["exec_ms"] >= 250


def test_stream_sends_one_output_event_per_value_then_done(api: Server) -> None:
    job_id = run(api, "count", {"n": 3}).json()["id"]
    resp = api.http("GET", f"/v1/jobs/{job_id}/stream")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(resp.text)
    assert [name for name, _ in events] == ["output", "output", "output", "done"]
    assert [data for _, data in events[:3]] == [{"i": 0}, {"i": 1}, {"i": 2}]
    done = events[-1][1]
    assert done["id"] == job_id and done["status"] == "COMPLETED"
    assert done["output"] == [{"i": 0}, {"i": 1}, {"i": 2}]
    # a finished job streams the same events again
    assert parse_sse(api.http("GET", f"/v1/jobs/{job_id}/stream").text) == events


def test_stream_of_a_plain_function_sends_only_done(api: Server) -> None:
    job_id = run(api, "square", {"x": 2}).json()["id"]
    events = parse_sse(api.http("GET", f"/v1/jobs/{job_id}/stream").text)
    assert [name for name, _ in events] == ["done"]
    assert events[0][1]["output"] == 4


def test_cancel_a_running_job(api: Server) -> None:
    job_id = run(api, "sleepy", {"s": 60}).json()["id"]
    wait_for(lambda: job(api, job_id)["status"] == "IN_PROGRESS", what="the job to start")
    resp = api.http("POST", f"/v1/jobs/{job_id}/cancel")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["id"] == job_id and body["status"] == "CANCELLED"
    assert body["finished_at"] is not None
    assert job(api, job_id)["status"] == "CANCELLED"
    # cancelling again changes nothing
    assert api.http("POST", f"/v1/jobs/{job_id}/cancel").json()["status"] == "CANCELLED"


def test_cancel_a_finished_job_leaves_it_completed(api: Server) -> None:
    body = runsync(api, "square", {"x": 3}).json()
    resp = api.http("POST", f"/v1/jobs/{body['id']}/cancel")
    assert resp.status_code == 200
    assert resp.json()["status"] == "COMPLETED"
    assert resp.json()["output"] == 9


def test_a_failed_job_carries_type_message_and_traceback(api: Server) -> None:
    body = runsync(api, "fail", {"msg": "no good"}).json()
    assert body["status"] == "FAILED"
    assert body["output"] is None
    err = body["error"]
    assert err["type"] == "ValueError"
    assert err["message"] == "no good"
    assert "raise ValueError(msg)" in err["traceback"]


def test_class_methods_are_addressed_as_class_dot_method(api: Server) -> None:
    resp = runsync(api, "Counter.add", {"x": 5})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["function"] == "Counter.add"
    assert body["output"] == 105  # the enter hook ran first
    job_id = run(api, "Counter.add", {"x": 1}).json()["id"]
    assert finished(api, job_id)["output"] == 101
    health = api.http("GET", "/v1/apps/api/Counter.add/health")
    assert health.status_code == 200
    assert health.json()["jobs"]["completed"] >= 2


# ----------------------------------------------------------------------------- apps


def test_list_and_describe_apps(api: Server) -> None:
    resp = api.http("GET", "/v1/apps")
    assert resp.status_code == 200
    apps = {a["name"]: a for a in resp.json()["apps"]}
    assert "api" in apps
    names = [f["name"] for f in apps["api"]["functions"]]
    assert {"square", "greet", "count", "Counter.add"} <= set(names)

    resp = api.http("GET", "/v1/apps/api")
    assert resp.status_code == 200
    app = resp.json()
    assert app["name"] == "api"
    assert app["tags"] == {"team": "tests"}
    assert app["version"] >= 1
    fns = {f["name"]: f for f in app["functions"]}
    assert fns["count"]["kind"] == "generator"
    assert fns["Counter.add"]["unit"] == "Counter"
    assert fns["greet"]["params"]["names"] == ["name", "punct"]
    assert fns["greet"]["params"]["required"] == ["name"]


HEALTH_SOURCE = """
import time
import ember

app = ember.App("{name}")

@app.function(max_workers=1)
def work(s: float = 0.0, fail: bool = False) -> str:
    deadline = time.monotonic() + s
    while time.monotonic() < deadline:
        time.sleep(0.01)  # sleep-ok: the deployed function's simulated work
    if fail:
        raise RuntimeError("asked to fail")
    return "ok"
"""


def test_health_counts_jobs_and_workers(api: Server) -> None:
    api.deploy(HEALTH_SOURCE.format(name="health"), filename="health_app.py")

    def health() -> dict[str, Any]:
        resp = api.http("GET", "/v1/apps/health/work/health")
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        return body

    h = health()
    assert {"in_queue", "in_progress", "completed", "failed"} <= set(h["jobs"])
    assert {"starting", "idle", "busy"} <= set(h["workers"])
    assert all(v == 0 for v in h["jobs"].values())
    assert h["workers"]["idle"] == h["workers"]["busy"] == 0

    assert runsync(api, "work", {}, app="health").json()["status"] == "COMPLETED"
    assert runsync(api, "work", {}, app="health").json()["status"] == "COMPLETED"
    assert runsync(api, "work", {"fail": True}, app="health").json()["status"] == "FAILED"
    h = health()
    assert h["jobs"]["completed"] == 2 and h["jobs"]["failed"] == 1
    assert h["jobs"]["in_queue"] == h["jobs"]["in_progress"] == 0
    assert h["workers"] == {**h["workers"], "idle": 1, "busy": 0, "starting": 0}

    # max_workers=1: one job runs, the next waits in the queue
    first = run(api, "work", {"s": 60}, app="health").json()["id"]
    second = run(api, "work", {"s": 60}, app="health").json()["id"]
    wait_for(lambda: health()["jobs"]["in_progress"] == 1, what="one job in progress")
    h = health()
    assert h["jobs"]["in_queue"] == 1
    assert h["workers"]["busy"] == 1 and h["workers"]["idle"] == 0
    for job_id in (second, first):
        api.http("POST", f"/v1/jobs/{job_id}/cancel")
    wait_for(
        lambda: health()["jobs"]["in_queue"] + health()["jobs"]["in_progress"] == 0,
        what="nothing in flight",
    )


def test_health_of_the_server_needs_no_token(api: Server) -> None:
    resp = api.http("GET", "/v1/health", token=None)
    assert resp.status_code == 200
    assert resp.json() == {"status": "ok", "role": "leader"}


def test_docs_and_openapi_load(api: Server) -> None:
    docs = api.http("GET", "/docs", token=None)
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()
    spec = api.http("GET", "/openapi.json", token=None)
    assert spec.status_code == 200
    paths = spec.json()["paths"]
    for path in (
        "/v1/apps/{app}/{fn}/run",
        "/v1/apps/{app}/{fn}/runsync",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/stream",
        "/v1/jobs/{job_id}/cancel",
        "/v1/apps",
        "/v1/apps/{app}",
        "/v1/apps/{app}/{fn}/health",
        "/v1/health",
    ):
        assert path in paths, path


# ----------------------------------------------------------------------------- auth


def _routes(server: Server) -> list[tuple[str, str]]:
    """Every (method, concrete path) of the API but the public health check, from OpenAPI."""
    fill = {"{app}": "api", "{fn}": "square", "{job_id}": "job-0"}
    paths = server.http("GET", "/openapi.json", token=None).json()["paths"]
    out = []
    for path, ops in paths.items():
        if path == "/v1/health":
            continue
        for key, value in fill.items():
            path = path.replace(key, value)
        out += [(method.upper(), path) for method in ops]
    return out


@pytest.mark.parametrize(
    "header",
    [None, "Bearer wrong-token", "Bearer", "Basic dXNlcjpwYXNz", "token"],
    ids=["none", "wrong", "empty", "basic", "no-scheme"],
)
def test_every_v1_route_needs_the_token(api: Server, header: str | None) -> None:
    routes = _routes(api)
    assert len(routes) >= 10, routes
    headers = {"Authorization": header} if header is not None else {}
    for method, path in routes:
        resp = api.http(method, path, token=None, headers=headers, json={"input": {}})
        if method == "HEAD":  # an answer to HEAD has no body to read
            assert resp.status_code == 401, (method, path)
            continue
        err = assert_error(resp, 401)
        assert err["code"] == "unauthorized", (method, path)
    # the hint names the token file, never the token
    err = assert_error(api.http("GET", "/v1/apps", token=None), 401, "token")
    assert api.token not in err["message"]
    assert str(api.data_dir) in err["message"]


def test_a_bad_token_does_not_run_anything(api: Server) -> None:
    api.deploy(HEALTH_SOURCE.format(name="noauth"), filename="noauth_app.py")
    assert_error(run(api, "work", {}, app="noauth", token="nope"), 401)
    assert_error(runsync(api, "work", {}, app="noauth", token=api.token + "x"), 401)
    health = api.http("GET", "/v1/apps/noauth/work/health").json()
    assert sum(health["jobs"].values()) == 0


# ----------------------------------------------------------------------------- 404


def test_unknown_app_function_and_job_are_404_naming_what_exists(api: Server) -> None:
    for method, path in [
        ("POST", "/v1/apps/nope/square/run"),
        ("POST", "/v1/apps/nope/square/runsync"),
        ("GET", "/v1/apps/nope"),
        ("GET", "/v1/apps/nope/square/health"),
    ]:
        err = assert_error(api.http(method, path, json={"input": {}}), 404, "'nope'", "api")
        assert err["code"] == "app_not_found"
    for method, path in [
        ("POST", "/v1/apps/api/nope/run"),
        ("POST", "/v1/apps/api/nope/runsync"),
        ("GET", "/v1/apps/api/nope/health"),
        ("POST", "/v1/apps/api/Counter.nope/run"),
    ]:
        err = assert_error(api.http(method, path, json={"input": {}}), 404, "nope", "square")
        assert err["code"] == "function_not_found"
    for method, path in [
        ("GET", "/v1/jobs/job-doesnotexist"),
        ("GET", "/v1/jobs/job-doesnotexist/stream"),
        ("POST", "/v1/jobs/job-doesnotexist/cancel"),
    ]:
        err = assert_error(api.http(method, path), 404, "job-doesnotexist")
        assert err["code"] == "job_not_found"
    assert_error(api.http("GET", "/v1/no/such/route"), 404)


# ----------------------------------------------------------------------------- 422


@pytest.mark.parametrize(
    ("fn", "body", "words"),
    [
        ("square", {"input": {"x": "three"}}, ["'x'", "integer"]),
        ("square", {"input": {"x": 1.5}}, ["'x'", "integer"]),
        ("square", {"input": {"x": True}}, ["'x'"]),
        ("square", {"input": {"x": None}}, ["'x'"]),
        ("square", {"input": {}}, ["missing", "'x'"]),
        ("square", {}, ["missing", "'x'"]),
        ("square", {"input": {"x": 1, "y": 2}}, ["unexpected", "'y'"]),
        ("greet", {"input": {"punct": "?"}}, ["missing", "'name'"]),
        ("greet", {"input": {"name": ["a"]}}, ["'name'", "string"]),
        ("square", {"input": [1]}, ["object"]),
        ("square", {"input": "x=1"}, ["object"]),
        ("square", {"input": None}, ["object"]),
        ("square", [{"input": {"x": 1}}], ["object"]),
        ("square", "x", ["object"]),
        ("square", 3, ["object"]),
        ("square", {"x": 1}, ["'x'", "input"]),
        ("Counter.add", {"input": {"x": "1"}}, ["'x'"]),
    ],
)
def test_input_that_does_not_fit_is_422_naming_the_argument(
    api: Server, fn: str, body: Any, words: list[str]
) -> None:
    for endpoint in ("run", "runsync"):
        resp = api.http("POST", f"/v1/apps/api/{fn}/{endpoint}", json=body)
        assert_error(resp, 422, *words)


def test_a_wrong_input_is_not_queued(api: Server) -> None:
    api.deploy(HEALTH_SOURCE.format(name="reject"), filename="reject_app.py")
    assert_error(run(api, "work", {"s": "long"}, app="reject"), 422, "'s'")
    health = api.http("GET", "/v1/apps/reject/work/health").json()
    assert sum(health["jobs"].values()) == 0


@pytest.mark.parametrize(
    "raw",
    [b"{", b'{"input": {"x": 1}', b"{'input': {}}", b"nope", b'{"input": {"x": 1}}}', b"\x00"],
)
def test_malformed_json_is_a_400_or_422(api: Server, raw: bytes) -> None:
    resp = api.http(
        "POST",
        "/v1/apps/api/square/run",
        content=raw,
        headers={"content-type": "application/json"},
    )
    assert resp.status_code in (400, 422), resp.text
    assert_error(resp, resp.status_code, "JSON")


@pytest.mark.parametrize(
    ("params", "words"),
    [({"wait": "soon"}, ["wait"]), ({"wait": -1}, ["wait"]), ({"wait": 10**6}, ["wait"])],
)
def test_bad_query_parameters_are_422(
    api: Server, params: dict[str, Any], words: list[str]
) -> None:
    resp = api.http("POST", "/v1/apps/api/square/runsync", params=params, json={"input": {"x": 1}})
    assert_error(resp, 422, *words)
    assert_error(api.http("GET", "/v1/jobs/job-0", params=params), 422, *words)


# ----------------------------------------------------------------------------- 413


def test_default_payload_limit_is_10_mib(api: Server) -> None:
    padding = b" " * (11 * 2**20)
    resp = api.http(
        "POST",
        "/v1/apps/api/square/run",
        content=b'{"input": {"x": 1}}' + padding,
        headers={"content-type": "application/json"},
    )
    assert_error(resp, 413, "limit")

    def chunks() -> Iterator[bytes]:  # no content-length: the limit is counted as it arrives
        yield b'{"input": {"x": 1}'
        for _ in range(11):
            yield b" " * 2**20
        yield b"}"

    resp = api.http(
        "POST",
        "/v1/apps/api/square/run",
        content=chunks(),
        headers={"content-type": "application/json"},
    )
    assert "content-length" not in resp.request.headers
    assert_error(resp, 413, "limit")

    # just under the limit is fine
    resp = api.http(
        "POST",
        "/v1/apps/api/square/runsync",
        content=b'{"input": {"x": 2}}' + b" " * (9 * 2**20),
        headers={"content-type": "application/json"},
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["output"] == 4


ECHO_SOURCE = """
import ember
app = ember.App("api")

@app.function()
def echo(v=None):
    return v
"""


def test_payload_limit_is_configurable(make_server: Callable[..., Server]) -> None:
    server = make_server("--max-payload", "1000")
    server.deploy(ECHO_SOURCE, filename="api_app.py")  # a deploy is under the limit too
    ok = server.http("POST", "/v1/apps/api/echo/runsync", json={"input": {"v": "a" * 900}})
    assert ok.status_code == 200, ok.text
    assert ok.json()["output"] == "a" * 900
    big = server.http("POST", "/v1/apps/api/echo/runsync", json={"input": {"v": "a" * 1000}})
    assert_error(big, 413, "1000")
    big = server.http("POST", "/v1/apps/api/echo/run", json={"input": {"v": "a" * 5000}})
    assert_error(big, 413, "1000")

    def chunks() -> Iterator[bytes]:
        yield b'{"input": {"v": "'
        for _ in range(20):
            yield b"a" * 100
        yield b'"}}'

    assert_error(server.http("POST", "/v1/apps/api/echo/run", content=chunks()), 413, "1000")
    # a deploy is a request like any other
    big_deploy = server.http("POST", "/v1/apps", json={"name": "x", "source": "#" * 2000})
    assert_error(big_deploy, 413)
    health = server.http("GET", "/v1/apps/api/echo/health").json()
    assert health["jobs"]["completed"] == 1


# ----------------------------------------------------------------------------- deploy


def _manifest(**changes: Any) -> dict[str, Any]:
    fn: dict[str, Any] = {
        "name": "f",
        "unit": "f",
        "kind": "function",
        "params": {
            "names": ["x"],
            "required": ["x"],
            "var_kwargs": False,
            "schema": {
                "type": "object",
                "properties": {"x": {"type": "integer"}},
                "required": ["x"],
                "additionalProperties": False,
            },
        },
        "spec": {"scaling": {"min_workers": 0, "max_workers": 2}},
    }
    m: dict[str, Any] = {
        "name": "manifest",
        "filename": "manifest_app.py",
        "source": "import ember\napp = ember.App('manifest')\n",
        "tags": {},
        "functions": [fn],
    }
    for key, value in changes.items():
        if key.startswith("fn_"):
            fn[key[3:]] = value
        elif key.startswith("spec_"):
            fn["spec"][key[5:]] = value
        elif key.startswith("scaling_"):
            fn["spec"]["scaling"][key[8:]] = value
        else:
            m[key] = value
    return m


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"name": "has space"}, ["name"]),
        ({"name": ""}, ["name"]),
        ({"name": "a" * 65}, ["name"]),
        ({"name": "a/b"}, ["name"]),
        ({"name": 7}, ["name"]),
        ({"filename": "../evil.py"}, ["filename"]),
        ({"filename": "app.txt"}, ["filename"]),
        ({"source": None}, ["source"]),
        ({"tags": ["team"]}, ["tags"]),
        ({"tags": {"team": 1}}, ["tags"]),
        ({"functions": []}, ["no functions"]),
        ({"functions": ["f"]}, ["functions"]),
        ({"fn_name": "1f"}, ["'1f'"]),
        ({"fn_name": "a/b"}, ["'a/b'"]),
        ({"fn_unit": "g"}, ["unit"]),
        ({"fn_kind": "thread"}, ["kind"]),
        ({"fn_params": None}, ["params"]),
        ({"fn_params": {"names": ["x"], "schema": {"type": 5}}}, ["schema"]),
        ({"fn_spec": [1]}, ["spec"]),
        ({"fn_spec": "fast"}, ["spec"]),
        ({"spec_scaling": "x"}, ["scaling"]),
        ({"scaling_max_workers": 0}, ["max_workers"]),
        ({"scaling_max_workers": "2"}, ["max_workers"]),
        ({"scaling_min_workers": 3, "scaling_max_workers": 2}, ["min_workers", "max_workers"]),
        ({"scaling_min_workers": -1}, ["min_workers"]),
        ({"scaling_concurrency": 0}, ["concurrency"]),
        ({"scaling_idle_timeout": -5}, ["idle_timeout"]),
        ({"scaling_surprise": 1}, ["surprise"]),
        ({"spec_timeout": 0}, ["timeout"]),
        ({"spec_retries": -1}, ["retries"]),
        ({"spec_gpu": "H100:0"}, ["gpu"]),
        ({"spec_gpu": [5]}, ["gpu"]),
        ({"spec_memory_mib": "lots"}, ["memory"]),
        ({"spec_memory_mib": 1e300}, ["memory"]),
        ({"spec_cpu": -1}, ["cpu"]),
        ({"spec_env": "no-such-env"}, ["no-such-env", "environment"]),
        ({"spec_env": "env-0123456789abcdef"}, ["env-0123456789abcdef", "POST /v1/envs"]),
        ({"spec_env": 3}, ["env"]),
    ],
)
def test_bad_deploy_manifests_are_422(
    api: Server, changes: dict[str, Any], words: list[str]
) -> None:
    resp = api.http("POST", "/v1/apps", json=_manifest(**changes))
    err = assert_error(resp, 422, *words)
    assert err["code"] == "invalid_deploy"
    assert_error(api.http("GET", "/v1/apps/manifest"), 404)


def test_a_good_manifest_deploys_and_a_redeploy_bumps_the_version(api: Server) -> None:
    source = "import ember\napp = ember.App('manifest2')\n@app.function\ndef f(x: int): return x\n"
    m = _manifest(name="manifest2", source=source)
    first = api.http("POST", "/v1/apps", json=m)
    assert first.status_code == 201, first.text
    assert first.json() == {
        "app": "manifest2",
        "version": 1,
        "functions": ["f"],
        "bundle": None,
        "envs": {},
        "warnings": [],
    }
    second = api.http("POST", "/v1/apps", json=m)
    assert second.json()["version"] == 2


def test_a_manifest_whose_code_does_not_define_its_functions_deploys_nothing(
    api: Server,
) -> None:
    m = _manifest(name="manifest3", source="import ember\napp = ember.App('manifest3')\n")
    err = assert_error(api.http("POST", "/v1/apps", json=m), 422, "has no function or class 'f'")
    assert "not deployed" in err["message"]
    assert_error(api.http("GET", "/v1/apps/manifest3"), 404)
    # `wait: false` stores it as before: nothing imports it until a call does
    assert api.http("POST", "/v1/apps", json={**m, "wait": False}).status_code == 201


@pytest.mark.parametrize("body", [b"", b"[]", b"null", b"{", b'"app"'])
def test_deploy_with_a_body_that_is_not_a_manifest(api: Server, body: bytes) -> None:
    resp = api.http("POST", "/v1/apps", content=body)
    assert resp.status_code in (400, 422), resp.text
    assert_error(resp, resp.status_code)


# ----------------------------------------------------------------------------- nasty


def test_huge_integers_round_trip_exactly(api: Server) -> None:
    body = runsync(api, "square", {"x": 10**30}).json()
    assert body["output"] == 10**60
    body = runsync(api, "echo", {"v": -(2**100)}).json()
    assert body["output"] == -(2**100)


def test_integers_too_long_to_parse_are_400(api: Server) -> None:
    raw = b'{"input": {"x": ' + b"9" * 5000 + b"}}"
    assert_error(api.http("POST", "/v1/apps/api/square/run", content=raw), 400)


@pytest.mark.parametrize("depth", [2_000, 100_000])
def test_deeply_nested_json_is_refused(api: Server, depth: int) -> None:
    raw = b'{"input": {"v": ' + b"[" * depth + b"]" * depth + b"}}"
    for endpoint in ("run", "runsync"):
        resp = api.http("POST", f"/v1/apps/api/echo/{endpoint}", content=raw)
        assert_error(resp, 400, "nested")
    deep = b"{" * depth
    assert_error(api.http("POST", "/v1/apps", content=deep), 400)


def test_moderately_nested_json_round_trips(api: Server) -> None:
    value: Any = "leaf"
    for i in range(100):
        value = [value] if i % 2 else {"k": value}
    assert runsync(api, "echo", {"v": value}).json()["output"] == value


@pytest.mark.parametrize(
    "text", ["héllo wörld", "日本語のテキスト", "emoji 😀🚀", "rtl עברית", "nul \x00 byte", ""]
)
def test_unicode_round_trips(api: Server, text: str) -> None:
    body = runsync(api, "greet", {"name": text, "punct": "‽"}).json()
    assert body["status"] == "COMPLETED"
    assert body["output"] == f"hello {text}‽"


def test_unicode_names_in_paths_are_404(api: Server) -> None:
    for path in ("/v1/apps/äpp/square/run", "/v1/apps/api/squäre/run", "/v1/apps/%00/f/run"):
        assert_error(api.http("POST", path, json={"input": {}}), 404)
    assert_error(api.http("GET", "/v1/jobs/" + "a" * 5000), 404)
    assert_error(api.http("GET", "/v1/jobs/😀"), 404)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"input": {"v": "\\ud800"}}',  # an escaped lone surrogate
        b'{"input": {"v": "\xed\xa0\x80"}}',  # a raw one: not UTF-8
        b'{"input": {"v": "\xff"}}',
        b'{"input": {"v": NaN}}',
        b'{"input": {"v": Infinity}}',
        b'{"input": {"v": -Infinity}}',
    ],
)
def test_text_that_is_not_json_is_400(api: Server, raw: bytes) -> None:
    resp = api.http("POST", "/v1/apps/api/echo/runsync", content=raw)
    assert_error(resp, 400)
    # and the worker is still there for good calls
    assert runsync(api, "echo", {"v": "fine"}).json()["output"] == "fine"


def test_an_escaped_surrogate_pair_is_fine(api: Server) -> None:
    raw = b'{"input": {"v": "\\ud83d\\ude00 and \\\\ud800"}}'
    resp = api.http("POST", "/v1/apps/api/echo/runsync", content=raw)
    assert resp.status_code == 200, resp.text
    assert resp.json()["output"] == "😀 and \\ud800"


def test_empty_body_means_no_arguments(api: Server) -> None:
    resp = api.http("POST", "/v1/apps/api/echo/runsync", content=b"")
    assert resp.status_code == 200, resp.text
    assert resp.json()["output"] is None
    assert_error(api.http("POST", "/v1/apps/api/square/runsync", content=b""), 422, "'x'")


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "", "image/png"]
)
def test_the_content_type_does_not_matter_for_json(api: Server, content_type: str) -> None:
    resp = api.http(
        "POST",
        "/v1/apps/api/square/runsync",
        content=b'{"input": {"x": 6}}',
        headers={"content-type": content_type},
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["output"] == 36


def test_a_form_body_is_400(api: Server) -> None:
    resp = api.http("POST", "/v1/apps/api/square/runsync", data={"x": "6"})
    assert_error(resp, 400, "JSON")


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("nan", ["JSON"]),
        ("inf", ["JSON"]),
        ("surrogate", ["JSON"]),
        ("object", ["JSON"]),
    ],
)
def test_outputs_that_are_not_json_fail_the_job_not_the_server(
    api: Server, kind: str, words: list[str]
) -> None:
    resp = runsync(api, "weird", {"kind": kind})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["status"] == "FAILED"
    assert body["error"]["type"] == "TypeError"
    for word in words:
        assert word in body["error"]["message"]
    assert job(api, body["id"])["status"] == "FAILED"


def test_odd_text_in_errors_and_prints_does_not_break_the_worker(api: Server) -> None:
    body = runsync(api, "weird", {"kind": "raise_surrogate"}).json()
    assert body["status"] == "FAILED"
    assert body["error"]["type"] == "ValueError"
    assert body["error"]["message"].startswith("bad ")
    body = runsync(api, "weird", {"kind": "print_surrogate"}).json()
    assert body["status"] == "COMPLETED" and body["output"] == "printed"
    assert runsync(api, "weird", {"kind": "ok"}).json()["output"] == "ok"
    lines = api.http("GET", "/v1/apps/api/weird/logs").json()["lines"]
    assert any(rec["line"].startswith("printed ") for rec in lines)


def test_logs_endpoint_tags_lines_with_job_ids(api: Server) -> None:
    api.deploy(
        """
        import ember
        app = ember.App("logged")

        @app.function()
        def shout(word: str) -> None:
            print("said", word)
        """,
        filename="logged_app.py",
    )
    job_id = runsync(api, "shout", {"word": "boo"}, app="logged").json()["id"]
    resp = api.http("GET", "/v1/apps/logged/shout/logs")
    assert resp.status_code == 200
    lines = resp.json()["lines"]
    assert any(r["job"] == job_id and r["line"] == "said boo" for r in lines), lines
    assert_error(api.http("GET", "/v1/apps/logged/nope/logs"), 404, "shout")
    assert_error(api.http("GET", "/v1/apps/logged/shout/logs", params={"tail": -1}), 422)


def test_the_server_is_still_healthy_and_answers_after_everything(api: Server) -> None:
    assert api.http("GET", "/v1/health", token=None).status_code == 200
    assert runsync(api, "square", {"x": 11}).json()["output"] == 121
    log = Path(api.log_path).read_text(errors="replace")
    assert "unhandled error" not in log, log
