"""Calls answered straight from ASGI (`ember.api.invoke`) answer exactly as the FastAPI routes do.

A plain call (no query string, or runsync's `wait` alone) takes the short path; the same request
with one more query parameter goes through FastAPI's route instead. Every case here is sent both
ways against one real server and must get the same status and the same body.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from conftest import Server
from ember.api.invoke import Call, call_of, wait_of
from ember.api.routes import RUNSYNC_WAIT

SOURCE = """
import ember

app = ember.App("inv")


@app.function()
def square(x: int) -> int:
    return x * x


@app.function()
def hello() -> str:
    return "hello"


@app.function()
def fail() -> None:
    raise ValueError("no")
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("invoke") / "data").start()
    s.deploy(SOURCE, filename="inv_app.py")
    yield s
    s.shutdown(timeout=15)
    assert "unhandled error" not in s.log()


@pytest.fixture(scope="module")
def read_token(server: Server) -> str:
    resp = server.http("POST", "/v1/tokens", json={"name": "reader", "scope": "read"})
    assert resp.status_code == 201, resp.text
    return str(resp.json()["token"])


def both_ways(
    server: Server, path: str, query: str, **kw: Any
) -> tuple[httpx.Response, httpx.Response]:
    """The request on the short path, then through FastAPI (an extra query parameter)."""
    short = server.http("POST", path + query, **kw)
    sep = "&" if query else "?"
    routed = server.http("POST", path + query + sep + "via=fastapi", **kw)
    return short, routed


def comparable(resp: httpx.Response) -> tuple[int, str, Any]:
    """Status, content type and body, less what differs between two runs of one call."""
    body = resp.json()
    if isinstance(body, dict) and "id" in body:
        body = {k: v for k, v in body.items() if k not in ("id", "timings", "cost")}
        body.pop("created_at", None)
        body.pop("finished_at", None)
        if isinstance(body.get("error"), dict):
            body["error"] = {k: v for k, v in body["error"].items() if k != "traceback"}
    return resp.status_code, resp.headers["content-type"], body


CASES: list[tuple[str, str, str, dict[str, Any], int]] = [
    # (name, path, query, request keywords, expected status)
    ("ok", "/v1/apps/inv/square/runsync", "", {"json": {"input": {"x": 3}}}, 200),
    ("ok-wait", "/v1/apps/inv/square/runsync", "?wait=30", {"json": {"input": {"x": 4}}}, 200),
    ("ok-wait-fraction", "/v1/apps/inv/hello/runsync", "?wait=2.5", {"json": {"input": {}}}, 200),
    ("no-arguments", "/v1/apps/inv/hello/runsync", "", {"json": {}}, 200),
    ("empty-body", "/v1/apps/inv/hello/runsync", "", {"content": b""}, 200),
    ("failed-job", "/v1/apps/inv/fail/runsync", "", {"json": {"input": {}}}, 200),
    ("queued", "/v1/apps/inv/square/run", "", {"json": {"input": {"x": 2}}}, 202),
    ("unknown-app", "/v1/apps/nope/square/runsync", "", {"json": {"input": {}}}, 404),
    ("unknown-fn", "/v1/apps/inv/nope/run", "", {"json": {"input": {}}}, 404),
    ("wrong-type", "/v1/apps/inv/square/runsync", "", {"json": {"input": {"x": "3"}}}, 422),
    ("missing", "/v1/apps/inv/square/run", "", {"json": {"input": {}}}, 422),
    ("extra-arg", "/v1/apps/inv/hello/runsync", "", {"json": {"input": {"y": 1}}}, 422),
    ("extra-field", "/v1/apps/inv/hello/runsync", "", {"json": {"inputs": {}}}, 422),
    ("not-an-object", "/v1/apps/inv/hello/run", "", {"json": [1, 2]}, 422),
    ("bad-json", "/v1/apps/inv/hello/runsync", "", {"content": b"{nope"}, 400),
    ("not-utf8", "/v1/apps/inv/hello/runsync", "", {"content": b'{"input": "\xff"}'}, 400),
    ("no-token", "/v1/apps/inv/hello/runsync", "", {"json": {}, "token": None}, 401),
    ("bad-token", "/v1/apps/inv/hello/run", "", {"json": {}, "token": "ember_guess"}, 401),
]


@pytest.mark.parametrize(
    ("path", "query", "kw", "status"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_the_short_path_answers_as_the_route_does(
    server: Server, path: str, query: str, kw: dict[str, Any], status: int
) -> None:
    short, routed = both_ways(server, path, query, **kw)
    assert short.status_code == status, short.text
    assert comparable(short) == comparable(routed)


def test_a_read_token_is_refused_the_same_way(server: Server, read_token: str) -> None:
    short, routed = both_ways(
        server, "/v1/apps/inv/hello/runsync", "", json={"input": {}}, token=read_token
    )
    assert short.status_code == 403
    assert comparable(short) == comparable(routed)


def test_refusals_on_the_short_path_are_audited(server: Server) -> None:
    server.http("POST", "/v1/apps/inv/hello/run", json={}, token="ember_audit_me")
    events = server.http("GET", "/v1/audit").json()["events"]
    refused = [e for e in events if e["action"] == "auth.failed"]
    assert any(e["target"] == "POST /v1/apps/inv/hello/run" for e in refused), events


def test_a_payload_over_the_limit_is_413_on_the_short_path(server: Server) -> None:
    big = b'{"input": {"x": "' + b"a" * (11 * 2**20) + b'"}}'
    resp = server.http("POST", "/v1/apps/inv/square/runsync", content=big)
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "payload_too_large"


def test_unusual_waits_are_left_to_the_route(server: Server) -> None:
    for query in ("?wait=-1", "?wait=soon", "?wait=1e9", "?wait=3601", "?wait=nan"):
        resp = server.http("POST", "/v1/apps/inv/hello/runsync" + query, json={"input": {}})
        assert resp.status_code == 422, (query, resp.text)
        assert "wait" in resp.json()["error"]["message"]


@pytest.mark.parametrize(
    ("query", "wait"),
    [
        (b"", RUNSYNC_WAIT),
        (b"wait=0", 0.0),
        (b"wait=60", 60.0),
        (b"wait=2.5", 2.5),
        (b"wait=3600", 3600.0),
        (b"wait=3601", None),
        (b"wait=-1", None),
        (b"wait=1e3", None),
        (b"wait=nan", None),
        (b"wait=", None),
        (b"wait=1&wait=2", None),
        (b"x=1", None),
        (b"wait=%31", None),
    ],
)
def test_wait_of(query: bytes, wait: float | None) -> None:
    assert wait_of(query) == wait


def test_call_of_takes_plain_calls_only() -> None:
    assert call_of("POST", "/v1/apps/a/f/runsync", b"") == Call("a", "f", RUNSYNC_WAIT)
    assert call_of("POST", "/v1/apps/a/C.m/run", b"") == Call("a", "C.m", None)
    assert call_of("POST", "/v1/apps/a/f/runsync", b"wait=5") == Call("a", "f", 5.0)
    for method, path, query in [
        ("GET", "/v1/apps/a/f/runsync", b""),
        ("PUT", "/v1/apps/a/f/run", b""),
        ("POST", "/v1/apps/a/f/run", b"wait=5"),
        ("POST", "/v1/apps/a/f/runsync/", b""),
        ("POST", "/v1/apps/a/f/stream", b""),
        ("POST", "/v1/apps/a/b/f/run", b""),
        ("POST", "/v1/apps//f/run", b""),
        ("POST", "/v2/apps/a/f/run", b""),
    ]:
        assert call_of(method, path, query) is None, (method, path, query)
