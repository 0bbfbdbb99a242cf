"""What a new user meets in the first hour, tried as one would: the version, a class's logs, an
`int` given a float, an argument JSON cannot carry, a `--since` ember does not read, and the tags
on a job. Real servers, real workers, the real `ember` command."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import pytest

import ember
from conftest import Server, result, spawn, wait_for


def ember_cli(server: Server | None, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBER_")}
    env["COLUMNS"] = "200"
    if server is not None:
        env["EMBER_URL"], env["EMBER_TOKEN"] = server.url, server.token
    return subprocess.run(
        [sys.executable, "-m", "ember.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parent,
    )


def ok(resp: httpx.Response, status: int = 200) -> Any:
    assert resp.status_code == status, f"{resp.status_code}: {resp.text}"
    return resp.json()


APP = """
import ember

app = ember.App("hour", tags={"team": "search", "project": "old"})


@app.function(tags={"project": "rag"})
def square(x: int) -> int:
    print(f"squaring {x}")
    return x * x


@app.function()
def echo(value, other=None):
    return value


@app.cls()
class Embedder:
    @ember.enter()
    def load(self) -> None:
        print("loading the model")

    @ember.method()
    def embed(self, text: str) -> int:
        print(f"embedding {text}")
        return len(text)
"""


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(tmp_path_factory.mktemp("first-hour") / "data").start()
    try:
        server.deploy(APP)
        yield server
    finally:
        server.shutdown()


def test_version() -> None:
    for flag in ("--version", "-V"):
        proc = ember_cli(None, flag)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == f"ember {version('ember')}"


def test_logs_of_a_class_show_its_hooks_and_its_methods(srv: Server) -> None:
    assert srv.function("hour", "Embedder.embed").remote("hello") == 5

    def lines(target: str, *needles: str) -> str | None:
        proc = ember_cli(srv, "logs", target)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout if all(n in proc.stdout for n in needles) else None

    out = wait_for(
        lambda: lines("hour/Embedder", "loading the model", "embedding hello"),
        timeout=20,
        what="the hook's and the method's lines in `ember logs hour/Embedder`",
    )
    assert "squaring" not in out
    # a method's logs hold its calls and its class's hook lines
    out = wait_for(lambda: lines("hour/Embedder.embed", "embedding hello"), timeout=20)
    assert "loading the model" in out
    # the API answers the same for the class, and a name that is neither is still a 404
    body = ok(srv.http("GET", "/v1/apps/hour/Embedder/logs"))
    assert {r["function"] for r in body["lines"]} == {"Embedder", "Embedder.embed"}
    resp = srv.http("GET", "/v1/apps/hour/Embedding/logs")
    assert resp.status_code == 404 and "Embedder.embed" in resp.json()["error"]["message"]


def test_an_int_argument_refuses_a_float(srv: Server) -> None:
    for raw in ('{"input": {"x": 2.0}}', '{"input": {"x": 2.5}}', '{"input": {"x": true}}'):
        resp = srv.http(
            "POST",
            "/v1/apps/hour/square/runsync",
            content=raw,
            headers={"content-type": "application/json"},
        )
        assert resp.status_code == 422, resp.text
        err = resp.json()["error"]
        assert err["code"] == "invalid_input"
        assert "'x'" in err["message"] and "integer" in err["message"], err
    assert (
        ok(srv.http("POST", "/v1/apps/hour/square/runsync", json={"input": {"x": 2}}))["output"]
        == 4
    )
    with pytest.raises(ember.InvalidInput, match="integer"):
        srv.function("hour", "square").remote(2.0)


def test_an_argument_json_cannot_carry_names_itself(srv: Server) -> None:
    echo = srv.function("hour", "echo")
    jobs_before = srv.http("GET", "/v1/apps/hour/echo/health").json()["jobs"]
    cases: list[tuple[Any, str]] = [
        (b"raw bytes", "bytes"),
        ({1, 2}, "set"),
        (object(), "object"),
        (math.nan, "float"),
        ("\ud800", "str"),
    ]
    for value, kind in cases:
        for call in (echo.remote, echo.spawn):
            with pytest.raises(ember.InvalidInput) as caught:
                call("fine", other=value)
            message = str(caught.value)
            assert "argument 'other'" in message and kind in message, message
            assert "echo()" in message and "HTTP" not in message, message
            assert caught.value.code == "invalid_input"
    # nested too: the argument holding it is named
    with pytest.raises(ember.InvalidInput, match="argument 'value'"):
        echo.remote({"deep": [b"x"]})
    # nothing was sent
    assert srv.http("GET", "/v1/apps/hour/echo/health").json()["jobs"] == jobs_before
    assert echo.remote([1, "two", None]) == [1, "two", None]


def test_since_explains_the_forms_it_takes(srv: Server) -> None:
    for args in (
        ("logs", "hour/square", "--since", "1y"),
        ("usage", "--since", "1y"),
        ("audit", "--since", "1y"),
        ("usage", "--until", "yesterday"),
    ):
        proc = ember_cli(srv, *args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        text = " ".join(proc.stderr.split())
        for form in ("30s", "15m", "2h", "7d", "ISO 8601"):
            assert form in text, (args, text)
    for since in ("10m", "2h", "2024-06-01", "1717200000"):
        proc = ember_cli(srv, "logs", "hour/square", "--since", since)
        assert proc.returncode == 0, (since, proc.stderr)
    resp = srv.http("GET", "/v1/usage", params={"since": "1y"})
    assert resp.status_code == 422 and "ISO 8601" in resp.json()["error"]["message"]


def test_logs_since_shows_only_later_lines(srv: Server) -> None:
    srv.function("hour", "square").remote(7)
    wait_for(
        lambda: "squaring 7" in ember_cli(srv, "logs", "hour/square").stdout,
        timeout=20,
        what="the line in `ember logs`",
    )
    assert "squaring 7" in ember_cli(srv, "logs", "hour/square", "--since", "10m").stdout
    future = ember_cli(srv, "logs", "hour/square", "--since", "2999-01-01")
    assert future.returncode == 0 and "squaring" not in future.stdout


def test_a_job_carries_the_tags_its_usage_carries(srv: Server) -> None:
    policy = {"name": "search-prod", "tags": {"cost-center": "42", "team": "search-prod"}}
    ok(srv.http("POST", "/v1/policies", json=policy), 201)
    token = ok(
        srv.http(
            "POST", "/v1/tokens", json={"name": "fe", "scope": "invoke", "policy": "search-prod"}
        ),
        201,
    )["token"]
    body = ok(
        srv.http("POST", "/v1/apps/hour/square/runsync", token=token, json={"input": {"x": 3}})
    )
    # the app's tags, then the function's, then the policy's, each over the one before
    expected = {"team": "search-prod", "project": "rag", "cost-center": "42"}
    assert body["tags"] == expected
    # without a policy: the app's and the function's
    plain = result(srv, spawn(srv, "hour", "square", x=4))
    assert plain["tags"] == {"team": "search", "project": "rag"}
    assert ok(srv.http("GET", f"/v1/jobs/{body['id']}"))["tags"] == expected

    # the same values as its usage: grouped by those tags, the policy's calls are one group
    def grouped() -> list[dict[str, Any]] | None:
        groups = ok(
            srv.http(
                "GET",
                "/v1/usage",
                params={"group_by": "policy,tag:team,tag:project,tag:cost-center"},
            )
        )["groups"]
        mine = [g for g in groups if g["key"].get("policy") == "search-prod"]
        return mine or None

    [group] = wait_for(grouped, timeout=30, interval=0.5, what="the policy's usage")
    assert {k: group["key"][f"tag:{k}"] for k in expected} == expected
