"""The official RunPod client (`pip install runpod`), unchanged, against a real ember server.

`runpod.endpoint_url_base` points at the server's /runpod/v2 and `runpod.api_key` is an ember
token; `runpod.Endpoint` and `runpod.AsyncioEndpoint` (with an aiohttp session) then run jobs,
read their status and output, stream a generator's values, cancel, read health and purge the
queue, each answered as RunPod would. The client sleeps a second per `stream` poll and per
`output(timeout)` poll: the jobs here are short.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import requests
import runpod  # the official client, from the registry: the dev extra has it (pyproject.toml)

from conftest import Server, wait_for

SOURCE = """
import time

import ember

app = ember.App("rpc")


@app.function()
def square(x: int) -> dict:
    return {"y": x * x}


@app.function()
def count(n: int, delay: float = 0.2):
    for i in range(n):
        time.sleep(delay)  # sleep-ok: the deployed function's work, between values
        yield {"i": i}


@app.function(max_workers=1)
def slow(s: float = 1.0) -> str:
    time.sleep(s)  # sleep-ok: the deployed function's work
    return "slept"


@app.function()
def boom() -> None:
    raise ValueError("it went boom")


one = ember.App("rpone")


@one.function()
def handler(**job) -> dict:
    return {"echo": job}
"""

FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT")


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(tmp_path_factory.mktemp("runpod-client") / "data").start()
    server.deploy(SOURCE, filename="runpod_client_app.py")
    yield server
    server.shutdown(timeout=15)
    log = server.log()
    assert "unhandled error" not in log, f"the server hit an unhandled error:\n{log}"


@pytest.fixture
def client(srv: Server) -> Iterator[Any]:
    """The `runpod` module, pointed at the server."""
    before = (runpod.api_key, runpod.endpoint_url_base)
    runpod.api_key = srv.token
    runpod.endpoint_url_base = f"{srv.url}/runpod/v2"
    yield runpod
    runpod.api_key, runpod.endpoint_url_base = before


# ----------------------------------------------------------------------------- sync client


def test_run_sync(client: Any) -> None:
    endpoint = client.Endpoint("rpc~square")
    assert endpoint.run_sync({"x": 4}, timeout=30) == {"y": 16}
    assert endpoint.run_sync({"input": {"x": 5}}, timeout=30) == {"y": 25}


def test_the_app_alone_is_an_endpoint(client: Any) -> None:
    assert client.Endpoint("rpone").run_sync({"prompt": "hi"}, timeout=30) == {
        "echo": {"prompt": "hi"}
    }


def test_run_then_status_and_output(client: Any) -> None:
    job = client.Endpoint("rpc~square").run({"x": 3})
    assert job.status() in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
    assert job.output(timeout=30) == {"y": 9}
    assert job.status() == "COMPLETED"


def test_a_failed_job(client: Any) -> None:
    job = client.Endpoint("rpc~boom").run({})
    wait_for(lambda: job.status() in FINAL, timeout=30, what="the job to fail")
    assert job.status() == "FAILED"
    status = job.rp_client.get(f"rpc~boom/status/{job.job_id}")
    assert "it went boom" in status["error"]
    assert job.output() is None


def test_stream(client: Any) -> None:
    job = client.Endpoint("rpc~count").run({"n": 5})
    assert list(job.stream()) == [{"i": i} for i in range(5)]
    assert job.output(timeout=10) == [{"i": i} for i in range(5)]


def test_stream_of_a_plain_function_is_its_output(client: Any) -> None:
    job = client.Endpoint("rpc~square").run({"x": 6})
    assert list(job.stream()) == [{"y": 36}]


def test_cancel_health_and_purge_queue(client: Any) -> None:
    endpoint = client.Endpoint("rpc~slow")
    blocker = endpoint.run({"s": 30})
    wait_for(lambda: blocker.status() == "IN_PROGRESS", timeout=30, what="the slow job to start")
    queued = [endpoint.run({"s": 30}) for _ in range(2)]
    health = endpoint.health()
    assert health["jobs"]["inQueue"] == 2
    assert health["jobs"]["inProgress"] == 1
    assert health["workers"]["running"] == 1
    assert endpoint.purge_queue() == {"removed": 2, "status": "completed"}
    assert [job.status() for job in queued] == ["CANCELLED", "CANCELLED"]
    answer = blocker.cancel()
    assert answer["id"] == blocker.job_id and answer["status"] == "CANCELLED"
    assert blocker.status() == "CANCELLED"
    health = endpoint.health()
    assert health["jobs"]["inQueue"] == 0 and health["jobs"]["inProgress"] == 0


def test_a_wrong_key_and_an_unknown_endpoint(client: Any) -> None:
    with pytest.raises(RuntimeError, match="401 Unauthorized"):
        client.Endpoint("rpc~square", api_key="not-a-token").run_sync({"x": 1}, timeout=30)
    with pytest.raises(requests.HTTPError) as caught:
        client.Endpoint("nope~square").run({"x": 1})
    assert caught.value.response.status_code == 404
    assert "nope" in caught.value.response.json()["error"]


# ----------------------------------------------------------------------------- asyncio client


async def _asyncio_client(client: Any) -> None:
    async with aiohttp.ClientSession() as session:
        square = client.AsyncioEndpoint("rpc~square", session)
        job = await square.run({"x": 7})
        assert await job.status() in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
        assert await job.output(timeout=30) == {"y": 49}
        assert await job.status() == "COMPLETED"

        count = client.AsyncioEndpoint("rpc~count", session)
        job = await count.run({"n": 4})
        got = [chunk async for chunk in job.stream()]
        assert got == [{"i": i} for i in range(4)]

        slow = client.AsyncioEndpoint("rpc~slow", session)
        job = await slow.run({"s": 30})
        for _ in range(300):
            if await job.status() == "IN_PROGRESS":
                break
            await asyncio.sleep(0.05)  # sleep-ok: polling, as the async client has no wait
        answer = await job.cancel()
        assert answer["id"] == job.job_id and answer["status"] == "CANCELLED"
        assert await job.status() == "CANCELLED"

        health = await slow.health()
        assert set(health) == {"jobs", "workers"}
        assert health["jobs"]["inProgress"] == 0
        assert await slow.purge_queue() == {"removed": 0, "status": "completed"}


def test_asyncio_client(client: Any) -> None:
    asyncio.run(_asyncio_client(client))
