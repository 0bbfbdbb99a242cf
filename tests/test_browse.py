"""What a dashboard browses with, against one real server: /v1/whoami, /v1/series, the job
listing, a job's input, a job's log lines, and none of it across workspaces."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import NO_SANDBOX, Server, result, wait_for
from test_workspaces import create_token, create_workspace, ok, refused

SOURCE = """
import time

import ember

app = ember.App("browse")


@app.function(idle_timeout=300)
def square(x: int) -> int:
    print(f"square of {x}")
    return x * x


@app.function(idle_timeout=300)
def fail() -> None:
    raise ValueError("no good")


@app.function(idle_timeout=300)
def size(data: str) -> int:
    return len(data)


@app.function(idle_timeout=300)
def slow(s: float) -> float:
    time.sleep(s)  # sleep-ok: the deployed function's own work, what the test waits on
    return s
"""

TERMS = ("queue_ms", "cold_start_ms", "load_ms", "exec_ms", "post_ms")


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    args = ["--no-tenant-isolation"] if NO_SANDBOX else []
    server = Server(tmp_path_factory.mktemp("browse") / "data", args).start()
    server.deploy(SOURCE, filename="browse_app.py")
    yield server
    server.shutdown(timeout=15)
    log = server.log()
    assert "unhandled error" not in log, f"the server hit an unhandled error:\n{log}"


def runsync(srv: Server, fn: str, **input: Any) -> dict[str, Any]:
    body: dict[str, Any] = ok(
        srv.http("POST", f"/v1/apps/browse/{fn}/runsync", json={"input": input})
    )
    return body


def run(srv: Server, fn: str, **input: Any) -> str:
    body = ok(srv.http("POST", f"/v1/apps/browse/{fn}/run", json={"input": input}), 202)
    return str(body["id"])


def jobs(srv: Server, token: str | None = "default", **query: Any) -> dict[str, Any]:
    found: dict[str, Any] = ok(srv.http("GET", "/v1/jobs", token=token, params=query))
    return found


def test_whoami_names_the_workspace_the_scope_and_the_token(srv: Server) -> None:
    assert ok(srv.http("GET", "/v1/whoami"))["workspace"] == "default"
    for scope in ("read", "invoke", "deploy", "admin"):
        token = create_token(srv, srv.token, f"who-{scope}", scope)
        body = ok(srv.http("GET", "/v1/whoami", token=token))
        assert body == {"workspace": "default", "scope": scope, "token": f"who-{scope}"}
    other = create_workspace(srv, "whoelse")
    assert ok(srv.http("GET", "/v1/whoami", token=other))["workspace"] == "whoelse"
    refused(srv.http("GET", "/v1/whoami", token=None), 401, "unauthorized")


def test_series_counts_calls_percentiles_and_workers(srv: Server) -> None:
    for x in range(5):
        assert runsync(srv, "square", x=x)["status"] == "COMPLETED"
    assert runsync(srv, "fail")["status"] == "FAILED"

    def square_series() -> dict[str, Any] | None:
        body: dict[str, Any] = ok(
            srv.http("GET", "/v1/series", params={"app": "browse", "function": "square"})
        )
        busy = any(sum(p["workers"].values()) > 0 for p in body["points"])
        return body if busy else None  # workers are counted once a second

    body = wait_for(square_series, timeout=10, what="a sample of the square worker")
    assert body["window"] == 3600 and body["step"] == 10
    points = body["points"]
    assert len(points) == 360
    assert all(b["t"] - a["t"] == 10 for a, b in itertools.pairwise(points))
    assert points[-1]["t"] <= body["now"] < points[-1]["t"] + 10
    assert body["totals"]["calls"] == 5 and body["totals"]["failed"] == 0
    assert body["totals"]["cold_starts"] >= 1  # the first call started the worker
    called = [p for p in points if p["calls"]]
    assert called and all(p["p50"] is not None and p["p99"] is not None for p in called)
    for p in called:
        for rank in ("p50", "p95", "p99"):
            terms = p[rank]
            assert sum(terms[t] for t in TERMS) == pytest.approx(terms["total_ms"], abs=0.01)
        assert p["p50"]["total_ms"] <= p["p95"]["total_ms"] <= p["p99"]["total_ms"]
    assert all(p["p50"] is None for p in points if not p["calls"])
    assert set(points[-1]["workers"]) == {"STARTING", "IDLE", "BUSY", "DRAINING"}

    app = ok(srv.http("GET", "/v1/series", params={"app": "browse", "window": 300, "step": 60}))
    assert len(app["points"]) == 5 and app["step"] == 60
    assert app["totals"]["calls"] >= 6 and app["totals"]["failed"] >= 1
    whole = ok(srv.http("GET", "/v1/series"))
    assert whole["totals"]["calls"] >= app["totals"]["calls"]

    for params, word in (
        ({"window": 30}, "'window'"),
        ({"window": 7200}, "'window'"),
        ({"step": 15}, "'step'"),
        ({"window": 600, "step": 600}, "step=600"),
        ({"function": "square"}, "needs app="),
    ):
        refused(srv.http("GET", "/v1/series", params=params), 422, "invalid_request", word)


def test_the_job_listing_pages_filters_and_reads_memory_too(srv: Server) -> None:
    ids = [run(srv, "square", x=x) for x in range(7)] + [run(srv, "fail") for _ in range(2)]
    for job_id in ids:
        result(srv, job_id)
    slow = run(srv, "slow", s=4)
    wait_for(
        lambda: any(j["id"] == slow for j in jobs(srv, status="RUNNING")["jobs"]),
        timeout=20,
        what="the slow job to be listed as running",
    )

    every = jobs(srv, app="browse", limit=500)
    assert every["next_cursor"] is None
    listed = every["jobs"]
    keys = [(j["created_at"], j["id"]) for j in listed]
    assert keys == sorted(keys, reverse=True)  # newest first
    assert set(ids) | {slow} <= {j["id"] for j in listed}
    assert listed[0]["id"] == slow and listed[0]["status"] == "IN_PROGRESS"
    assert listed[0]["finished_at"] is None and listed[0]["total_ms"] is None

    failed = jobs(srv, function="fail", status="FAILED")["jobs"]
    assert len(failed) >= 2 and all(j["function"] == "fail" for j in failed)
    assert all(j["error_type"] == "ValueError" for j in failed)
    done = jobs(srv, function="square", status="COMPLETED,FAILED")["jobs"]
    assert all(j["status"] == "COMPLETED" and j["function"] == "square" for j in done)
    assert all(j["total_ms"] > 0 and j["cost_usd"] is not None for j in done)
    assert all(j["error_type"] is None and j["tags"] == {} for j in done)
    assert {j["id"] for j in jobs(srv, status="queued,running")["jobs"]} <= {slow}

    one = ids[3]
    prefixed = jobs(srv, id=one[:10])["jobs"]
    assert one in {j["id"] for j in prefixed} and all(
        j["id"].startswith(one[:10]) for j in prefixed
    )
    assert jobs(srv, id="%")["jobs"] == [] and jobs(srv, id="_")["jobs"] == []
    since = next(j["created_at"] for j in listed if j["id"] == ids[4])
    recent = jobs(srv, app="browse", since=since, limit=500)["jobs"]
    assert recent and all(j["created_at"] >= since for j in recent)
    assert {ids[4], *ids[5:]} <= {j["id"] for j in recent}
    assert ids[0] not in {j["id"] for j in recent}

    paged: list[str] = []
    cursor = None
    while True:
        page = jobs(srv, app="browse", limit=3, **({"cursor": cursor} if cursor else {}))
        assert len(page["jobs"]) <= 3
        paged += [j["id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert paged == [j["id"] for j in listed]  # each job once, in order

    for params, word in (
        ({"cursor": "!!!"}, "cursor="),
        ({"cursor": "bm90LWEtY3Vyc29y"}, "cursor="),
        ({"status": "DONE"}, "DONE"),
        ({"limit": 0}, "'limit'"),
        ({"limit": 501}, "'limit'"),
    ):
        refused(srv.http("GET", "/v1/jobs", params=params), 422, "invalid_request", word)
    result(srv, slow)


def test_a_job_input_is_cut_at_64_kib_on_a_character(srv: Server) -> None:
    small = runsync(srv, "size", data="hello")
    body = ok(srv.http("GET", f"/v1/jobs/{small['id']}/input"))
    assert json.loads(body["input"]) == {"data": "hello"}
    assert body["truncated"] is False and body["bytes"] == len(body["input"])

    data = "ab" + "€" * 30000  # 3 bytes each: 65536 falls inside one
    big = runsync(srv, "size", data=data)
    assert big["output"] == len(data)
    body = ok(srv.http("GET", f"/v1/jobs/{big['id']}/input"))
    full = json.dumps({"data": data}, ensure_ascii=False, separators=(",", ":"))
    assert body["truncated"] is True and body["bytes"] == len(full.encode())
    cut = body["input"].encode()
    assert 65536 - 3 < len(cut) <= 65536 and full.encode().startswith(cut)
    refused(srv.http("GET", "/v1/jobs/nope/input"), 404, "job_not_found")


def test_logs_of_one_job(srv: Server) -> None:
    first, second = runsync(srv, "square", x=11), runsync(srv, "square", x=12)

    def lines() -> list[dict[str, Any]] | None:
        got = ok(srv.http("GET", "/v1/apps/browse/square/logs", params={"job": first["id"]}))
        found: list[dict[str, Any]] = got["lines"]
        return found or None

    found = wait_for(lines, timeout=10, what="the job's log line")
    assert all(line["job"] == first["id"] for line in found)
    assert any("square of 11" in line["line"] for line in found)
    assert not any("square of 12" in line["line"] for line in found)
    assert second["id"] != first["id"]


def test_another_workspace_sees_none_of_it(srv: Server) -> None:
    mine = runsync(srv, "square", x=3)
    theirs = create_workspace(srv, "stranger")
    reader = create_token(srv, theirs, "peek", "read")
    assert jobs(srv, token=reader)["jobs"] == []
    assert jobs(srv, token=reader, id=mine["id"])["jobs"] == []
    for params in ({}, {"app": "browse"}, {"app": "browse", "function": "square"}):
        body = ok(srv.http("GET", "/v1/series", token=reader, params=params))
        assert body["totals"] == {"calls": 0, "failed": 0, "cold_starts": 0}
        assert all(sum(p["workers"].values()) == 0 for p in body["points"])
    refused(srv.http("GET", f"/v1/jobs/{mine['id']}/input", token=reader), 404, "job_not_found")
    refused(srv.http("GET", f"/v1/jobs/{mine['id']}", token=reader), 404, "job_not_found")
    assert ok(srv.http("GET", f"/v1/jobs/{mine['id']}/input"))["truncated"] is False
    assert time.time() >= mine["created_at"]
