"""Idempotent submits: a repeat under the same `Idempotency-Key` gets the same job, never a second.

The SDK sends a key with every submit and tries again under it when an answer is lost; the test
that shows it puts a real TCP proxy between the SDK and the server that drops the first answer.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from conftest import Server, result
from ember.core.idempotency import MAX_KEY, digest, key_problem
from ember.sdk.client import Client
from ember.sdk.deploy import deploy_file
from ember.testing import wait_for

SOURCE = """
import time

import ember

app = ember.App("idem")


@app.function(idle_timeout=300)
def square(x: int) -> int:
    return x * x


@app.function(idle_timeout=300)
def slow(x: int) -> int:
    time.sleep(0.5)  # sleep-ok: the job is still running while its repeats arrive
    return x
"""


def completed(server: Server, fn: str) -> int:
    body = server.http("GET", f"/v1/apps/idem/{fn}/health").json()
    return (
        int(body["jobs"]["completed"])
        + int(body["jobs"]["in_queue"])
        + int(body["jobs"]["in_progress"])
    )


def post(server: Server, verb: str, fn: str, key: str | None, x: Any, **kw: Any) -> Any:
    headers = {} if key is None else {"Idempotency-Key": key}
    return server.http(
        "POST", f"/v1/apps/idem/{fn}/{verb}", headers=headers, json={"input": {"x": x}}, **kw
    )


@pytest.fixture
def idem(server: Server) -> Server:
    server.deploy(SOURCE)
    return server


# ----------------------------------------------------------------------------- the pure rules
def test_a_key_is_visible_ascii_of_bounded_length() -> None:
    assert key_problem("0b9c2e4a-uuid-like_KEY.1") is None
    assert key_problem("x" * MAX_KEY) is None
    for bad, word in [("", "empty"), ("x" * (MAX_KEY + 1), "at most"), ("a b", "visible")]:
        problem = key_problem(bad)
        assert problem is not None and word in problem


def test_the_digest_tells_function_and_input_apart() -> None:
    base = digest("a", "f", '{"x":1}')
    assert base == digest("a", "f", '{"x":1}')
    assert len({base, digest("a", "g", '{"x":1}'), digest("a", "f", '{"x":2}')}) == 3
    assert digest("ab", "c", "{}") != digest("a", "bc", "{}")  # the parts are delimited


# ----------------------------------------------------------------------------- on a real server
def test_a_repeated_run_gets_the_same_job_and_runs_once(idem: Server) -> None:
    first = post(idem, "run", "square", "k-1", 7)
    assert first.status_code == 202, first.text
    job_id = first.json()["id"]
    again = post(idem, "run", "square", "k-1", 7)
    assert again.status_code == 202 and again.json()["id"] == job_id
    assert result(idem, job_id)["output"] == 49
    after = post(idem, "run", "square", "k-1", 7)  # once it has ended: the stored job
    assert after.json() == {"id": job_id, "status": "COMPLETED"}
    synced = post(idem, "runsync", "square", "k-1", 7)
    assert synced.status_code == 200 and synced.json()["id"] == job_id
    assert synced.json()["output"] == 49
    assert completed(idem, "square") == 1


def test_a_repeated_runsync_waits_for_the_same_job(idem: Server) -> None:
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: post(idem, "runsync", "slow", "s-1", 3), range(8)))
    assert {a.status_code for a in answers} == {200}
    assert len({a.json()["id"] for a in answers}) == 1
    assert {a.json()["output"] for a in answers} == {3}
    assert completed(idem, "slow") == 1


def test_concurrent_runs_under_one_key_make_one_job(idem: Server) -> None:
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: post(idem, "run", "slow", "c-1", 5), range(32)))
    assert {a.status_code for a in answers} == {202}
    ids = {a.json()["id"] for a in answers}
    assert len(ids) == 1
    assert result(idem, ids.pop())["output"] == 5
    assert completed(idem, "slow") == 1


def test_the_same_key_for_another_request_is_a_409_and_makes_nothing(idem: Server) -> None:
    job_id = post(idem, "run", "square", "k-2", 2).json()["id"]
    for fn, x in [("square", 3), ("slow", 2)]:
        resp = post(idem, "run", fn, "k-2", x)
        assert resp.status_code == 409, resp.text
        error = resp.json()["error"]
        assert error["code"] == "idempotency_conflict" and "k-2" in error["message"]
    resp = post(idem, "runsync", "square", "k-2", 3)
    assert resp.status_code == 409
    result(idem, job_id)
    assert completed(idem, "square") == 1 and completed(idem, "slow") == 0


def test_keys_without_a_key_and_bad_keys(idem: Server) -> None:
    ids = {post(idem, "run", "square", None, 1).json()["id"] for _ in range(3)}
    assert len(ids) == 3  # no key: each call is a job, as before
    for bad in ["", "x" * (MAX_KEY + 1), "two words"]:
        for verb in ("run", "runsync"):
            resp = post(idem, verb, "square", bad, 1)
            assert resp.status_code == 400, (bad, resp.text)
            assert resp.json()["error"]["code"] == "invalid_idempotency_key"
    # the FastAPI route (an extra query parameter) answers the same
    resp = post(idem, "runsync", "square", "two words", 1, params={"wait": 5, "x": 1})
    assert resp.status_code == 400


def test_a_key_is_the_workspace_s_own(idem: Server) -> None:
    created = idem.http("POST", "/v1/workspaces", json={"name": "other"})
    assert created.status_code == 201, created.text
    other = Client(idem.url, token=created.json()["token"])
    path = idem.data_dir.parent / "idem_other.py"
    path.write_text(SOURCE)
    deploy_file(path, client=other)
    mine = post(idem, "run", "square", "shared", 4).json()["id"]
    theirs = other.run("idem", "square", {"x": 4}, idempotency_key="shared")["id"]
    assert mine != theirs
    assert other.get_job(theirs, wait=5)["status"] in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
    assert idem.http("GET", f"/v1/jobs/{theirs}").status_code == 404


def test_a_key_outlives_a_restart(idem: Server) -> None:
    job_id = post(idem, "run", "square", "r-1", 6).json()["id"]
    result(idem, job_id)
    idem.restart()
    again = post(idem, "runsync", "square", "r-1", 6)
    assert again.status_code == 200 and again.json()["id"] == job_id
    assert again.json()["output"] == 36
    assert post(idem, "run", "square", "r-1", 7).status_code == 409


def test_a_queued_job_s_key_outlives_a_restart(make_server: Callable[..., Server]) -> None:
    """Stopped while the job is queued or running: after the restart, the repeat finds the
    requeued job rather than making another."""
    srv = make_server()
    srv.deploy(SOURCE)
    job_id = post(srv, "run", "slow", "q-1", 1).json()["id"]
    srv.restart()
    again = post(srv, "run", "slow", "q-1", 1)
    assert again.json()["id"] == job_id
    assert result(srv, job_id)["output"] == 1
    assert completed(srv, "slow") == 1


# ----------------------------------------------------------------------------- the SDK's retries
class DropFirstAnswer:
    """A TCP proxy in front of the server that swallows the server's answer on the first
    connection and closes it: the request was served, its caller never hears."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.dropped = threading.Event()
        self._stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            drop = self.connections == 1
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._back, args=(upstream, client, drop), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            dst.close()

    def _back(self, upstream: socket.socket, client: socket.socket, drop: bool) -> None:
        if not drop:
            self._pipe(upstream, client)
            return
        try:
            upstream.recv(65536)  # the answer, lost
        finally:
            self.dropped.set()
            client.shutdown(socket.SHUT_RDWR)
            client.close()
            upstream.close()

    def close(self) -> None:
        self._stop = True
        self.listener.close()


@pytest.fixture
def lossy(idem: Server) -> Iterator[DropFirstAnswer]:
    proxy = DropFirstAnswer(idem.port)
    yield proxy
    proxy.close()


@pytest.mark.parametrize("verb", ["run", "runsync"])
def test_the_sdk_retries_a_lost_answer_under_its_key(
    idem: Server, lossy: DropFirstAnswer, verb: str
) -> None:
    client = Client(f"http://127.0.0.1:{lossy.port}", token=idem.token)
    try:
        if verb == "run":
            job_id = client.run("idem", "slow", {"x": 9})["id"]
        else:
            body = client.runsync("idem", "slow", {"x": 9})
            job_id = body["id"]
            assert body["output"] == 9
    finally:
        client.close()
    assert lossy.dropped.is_set() and lossy.connections >= 2
    assert result(idem, job_id)["output"] == 9
    wait_for(lambda: completed(idem, "slow") == 1, timeout=10, what="one job done")
    assert completed(idem, "slow") == 1


def test_the_async_sdk_sends_a_key_too(idem: Server, tmp_path: Path) -> None:
    import asyncio

    from ember.sdk.client import AsyncClient

    async def twice() -> tuple[str, str]:
        client = AsyncClient(idem.url, token=idem.token)
        try:
            a = await client.run("idem", "square", {"x": 2}, idempotency_key="async-1")
            b = await client.runsync("idem", "square", {"x": 2}, idempotency_key="async-1")
        finally:
            await client.aclose()
        assert b["output"] == 4
        return a["id"], b["id"]

    first, second = asyncio.run(twice())
    assert first == second
