"""Per-job options on the native API (webhook, ttl, timeout; retention), retry and purge.

Against real servers, except the retention test, which drives the job room on a store of its
own: no native body field sets a job's retention (the RunPod API does).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

from conftest import UNSANDBOXED, Server, result, wait_for, worker_pids

SOURCE = """
import os, time
import ember

app = ember.App("opts")

@app.function(max_workers=1)
def slow(delay: float) -> float:
    time.sleep(delay)  # sleep-ok: the deployed function's simulated work
    return delay

@app.function()
def quick(x: int) -> int:
    return x + 1

@app.function()
def flaky(path: str) -> str:
    if not os.path.exists(path):
        raise RuntimeError("not yet: " + path)
    return "ok"
"""


@pytest.fixture
def opts(make_server: Callable[..., Server]) -> Server:
    server = make_server(*UNSANDBOXED)  # `flaky` reads a file of the test's
    server.deploy(SOURCE)
    return server


def run(server: Server, fn: str, input: dict[str, Any], **options: Any) -> str:
    answer = server.http("POST", f"/v1/apps/opts/{fn}/run", json={"input": input, **options})
    assert answer.status_code == 202, answer.text
    return str(answer.json()["id"])


class Receiver:
    """A webhook receiver on a free local port: each POST's JSON body, answered with the next
    of `codes` (200 once they run out)."""

    def __init__(self, codes: list[int] | None = None) -> None:
        self.codes = list(codes or [])
        self.bodies: list[Any] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                outer.bodies.append(json.loads(body))
                code = outer.codes.pop(0) if outer.codes else 200
                self.send_response(code)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def receiver() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(codes: list[int] | None = None) -> Receiver:
        made.append(Receiver(codes))
        return made[-1]

    yield make
    for r in made:
        r.close()


def test_a_jobs_timeout_replaces_its_functions(opts: Server) -> None:
    body = opts.http(
        "POST", "/v1/apps/opts/slow/runsync", json={"input": {"delay": 30}, "timeout": 0.5}
    ).json()
    assert body["status"] == "TIMED_OUT"
    assert body["error"]["type"] == "TimeoutError"
    assert "timeout of 0.5 s" in body["error"]["message"]


def test_ttl_ends_a_job_still_queued_and_spares_one_that_started(opts: Server) -> None:
    blocker = run(opts, "slow", {"delay": 4})  # the only worker `slow` may have
    late = run(opts, "slow", {"delay": 0}, ttl=1)
    in_time = run(opts, "quick", {"x": 1}, ttl=30)
    expired = result(opts, late)
    assert expired["status"] == "TIMED_OUT"
    assert expired["error"]["type"] == "TTLExpired"
    assert "past its ttl of 1 s" in expired["error"]["message"]
    assert expired["attempts"] == 0 and expired["cost"]["usd"] == 0
    assert result(opts, in_time)["output"] == 2
    assert opts.client.get_job(blocker)["status"] in ("IN_QUEUE", "IN_PROGRESS")


def test_a_ttl_survives_a_restart(opts: Server) -> None:
    blocker = run(opts, "slow", {"delay": 60})
    wait_for(lambda: opts.client.get_job(blocker)["status"] == "IN_PROGRESS", timeout=30)
    late = run(opts, "slow", {"delay": 0}, ttl=3)
    opts.kill9()  # a crash: the row holds the ttl, and nothing else does
    wait_for(lambda: not worker_pids(opts.data_dir), timeout=10, what="orphan workers to exit")
    opts.start()
    assert opts.client.get_job(late)["status"] == "IN_QUEUE"
    expired = result(opts, late)  # recovered queued behind the blocker, run again
    assert (expired["status"], expired["error"]["type"]) == ("TIMED_OUT", "TTLExpired")
    assert opts.client.get_job(blocker)["status"] in ("IN_QUEUE", "IN_PROGRESS")
    opts.client.cancel(blocker)


def test_a_webhook_gets_the_jobs_body(opts: Server, receiver: Callable[..., Receiver]) -> None:
    hook = receiver()
    job = run(opts, "quick", {"x": 41}, webhook=hook.url)
    body = result(opts, job)
    wait_for(lambda: hook.bodies, timeout=10)
    (sent,) = hook.bodies
    assert sent["id"] == job and sent["status"] == "COMPLETED" and sent["output"] == 42
    assert sent == body


def test_a_webhook_is_retried_then_given_up(
    make_server: Callable[..., Server],
    receiver: Callable[..., Receiver],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EMBER_WEBHOOK_BACKOFF", "0.1,0.2")
    server = make_server(*UNSANDBOXED)
    server.deploy(SOURCE)
    once = receiver([500])
    never = receiver([500, 503, 500, 200])  # the 4th attempt would succeed: there is none
    job = run(server, "quick", {"x": 1}, webhook=once.url)
    other = run(server, "quick", {"x": 2}, webhook=never.url)
    wait_for(lambda: len(once.bodies) == 2, timeout=10)
    assert [b["id"] for b in once.bodies] == [job, job]
    wait_for(lambda: len(never.bodies) == 3, timeout=10)
    wait_for(lambda: "webhook given up after 3 attempts" in server.log(), timeout=10)
    assert f"job {other}: webhook given up" in server.log()
    assert len(never.bodies) == 3


def test_retry_runs_a_failed_job_again_under_its_id(opts: Server, tmp_path: Path) -> None:
    flag = tmp_path / "ready"
    job = run(opts, "flaky", {"path": str(flag)}, ttl=60)
    failed = result(opts, job)
    assert failed["status"] == "FAILED" and "not yet" in failed["error"]["message"]
    health = opts.http("GET", "/v1/apps/opts/flaky/health").json()["jobs"]
    assert (health["failed"], health["retried"]) == (1, 0)
    flag.write_text("")
    again = opts.http("POST", f"/v1/jobs/{job}/retry")
    assert again.status_code == 200, again.text
    assert again.json()["id"] == job and again.json()["error"] is None
    done = result(opts, job)
    assert (done["status"], done["output"]) == ("COMPLETED", "ok")
    health = opts.http("GET", "/v1/apps/opts/flaky/health").json()["jobs"]
    assert (health["failed"], health["completed"], health["retried"]) == (0, 1, 1)
    # a completed job is not retried; an unknown one is not found
    refused = opts.http("POST", f"/v1/jobs/{job}/retry")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "not_retryable"
    assert "COMPLETED" in refused.json()["error"]["message"]
    missing = opts.http("POST", "/v1/jobs/job-000000000000000000000000/retry")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "job_not_found"


def test_retry_after_a_restart_reads_the_job_from_the_store(opts: Server, tmp_path: Path) -> None:
    flag = tmp_path / "ready"
    job = run(opts, "flaky", {"path": str(flag)})
    assert result(opts, job)["status"] == "FAILED"
    opts.restart()
    flag.write_text("")
    assert opts.http("POST", f"/v1/jobs/{job}/retry").status_code == 200
    assert result(opts, job)["output"] == "ok"


def test_purge_cancels_the_queued_jobs_only(opts: Server) -> None:
    running = run(opts, "slow", {"delay": 30})
    wait_for(lambda: opts.client.get_job(running)["status"] == "IN_PROGRESS", timeout=30)
    queued = [run(opts, "slow", {"delay": 0}) for _ in range(3)]
    purged = opts.http("POST", "/v1/apps/opts/slow/purge-queue")
    assert purged.status_code == 200 and purged.json() == {"removed": 3}
    assert {result(opts, j)["status"] for j in queued} == {"CANCELLED"}
    assert opts.client.get_job(running)["status"] == "IN_PROGRESS"
    assert opts.http("POST", "/v1/apps/opts/slow/purge-queue").json() == {"removed": 0}
    assert opts.http("POST", "/v1/apps/opts/nope/purge-queue").status_code == 404
    retried = opts.http("POST", f"/v1/jobs/{queued[0]}/retry")  # a cancelled job may be
    assert retried.status_code == 200 and retried.json()["status"] == "IN_QUEUE"
    busy = opts.http("POST", f"/v1/jobs/{running}/retry")
    assert busy.status_code == 409 and "IN_PROGRESS" in busy.json()["error"]["message"]
    opts.client.cancel(running)


BAD = [
    ('"webhook": "ftp://example.com/x"', "webhook"),
    ('"webhook": 12', "webhook"),
    ('"webhook": "http://"', "webhook"),
    ('"ttl": 0', "ttl"),
    ('"ttl": -1', "ttl"),
    ('"ttl": "10"', "ttl"),
    ('"ttl": 604801', "ttl"),
    ('"timeout": true', "timeout"),
    ('"timeout": 1e400', "timeout"),  # parsed as infinity
]


def test_bad_options_are_a_422_naming_the_field(server: Server) -> None:
    server.deploy(SOURCE)
    for (extra, field), verb in itertools.product(BAD, ("run", "runsync")):
        answer = server.http(
            "POST",
            f"/v1/apps/opts/quick/{verb}",
            content='{"input": {"x": 1}, ' + extra + "}",
            headers={"content-type": "application/json"},
        )
        assert answer.status_code == 422, answer.text
        error = answer.json()["error"]
        assert error["code"] == "invalid_request" and error["message"].startswith(field)
    answer = server.http("POST", "/v1/apps/opts/quick/run", json={"input": {"x": 1}, "ttls": 1})
    assert answer.status_code == 422 and "'ttls'" in answer.json()["error"]["message"]


def test_a_jobs_own_retention_outlives_it_no_longer(tmp_path: Path) -> None:
    """The job room: a job with `retain_s` reads as not found once it is past, from memory and
    from the store alike, and the prune deletes its row (the server's retention is longer)."""
    from ember.control import job_rows
    from ember.control.errors import NotFoundError
    from ember.control.jobs import JobBook
    from ember.control.records import FunctionMeta
    from ember.core.jobs import JobOptions, JobStatus
    from ember.core.pricing import PriceTable
    from ember.core.spec import FunctionSpec
    from ember.store.db import open_store, sqlite_url
    from ember.store.writer import Writer

    engine = open_store(sqlite_url(tmp_path))
    meta = FunctionMeta("f", "f", "function", {}, FunctionSpec())

    async def go() -> None:
        book = JobBook(engine, PriceTable(), lambda job: None)
        book.writer = Writer(engine, asyncio.get_running_loop())
        short = book.accept(
            "default",
            "a",
            meta,
            {},
            policy=None,
            token=None,
            tags={},
            options=JobOptions(retain_s=0.3),
        )
        plain = book.accept("default", "a", meta, {}, policy=None, token=None, tags={})
        for job in (short, plain):
            await book.store(job)
            book.finish(job, JobStatus.COMPLETED, output=1, error=None)
        await asyncio.sleep(0.05)  # sleep-ok: the final rows' writes, queued behind the loop
        await book.writer.submit(lambda conn: None)
        assert (await book.get("default", short.id)) is short
        assert job_rows.load_job(engine, short.id) is not None
        await asyncio.sleep(0.4)  # sleep-ok: past its retention of 0.3 s
        with pytest.raises(NotFoundError):
            await book.get("default", short.id)
        book.recent.clear()  # as after a restart: the store's answer
        with pytest.raises(NotFoundError):
            await book.get("default", short.id)
        assert (await book.get("default", plain.id))["status"] == "COMPLETED"
        assert await book.prune(time.time()) == 1
        assert job_rows.load_row(engine, short.id) is None
        assert job_rows.load_row(engine, plain.id) is not None
        book.writer.close()

    asyncio.run(go())
    engine.dispose()


def test_options_retry_and_purge_through_a_standby(
    pg_url: str,
    make_server: Callable[..., Server],
    receiver: Callable[..., Receiver],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two servers on one store: a standby's job carries its options through the store to the
    scheduler (which alone sends its webhook), and retry and purge-queue reach the scheduler."""
    monkeypatch.setenv("EMBER_MASTER_KEY", Fernet.generate_key().decode())
    a = make_server("--db", pg_url, *UNSANDBOXED)
    b_dir = tmp_path / "b"
    b_dir.mkdir()
    shutil.copy(a.data_dir / "token", b_dir / "token")
    b = make_server("--db", pg_url, *UNSANDBOXED, data_dir=b_dir)
    a.deploy(SOURCE)
    body = b.http(
        "POST", "/v1/apps/opts/slow/runsync", json={"input": {"delay": 30}, "timeout": 0.5}
    ).json()
    assert (body["status"], body["error"]["type"]) == ("TIMED_OUT", "TimeoutError")

    hook, flag = receiver(), tmp_path / "ready"
    job = run(b, "flaky", {"path": str(flag)}, webhook=hook.url)
    assert result(b, job)["status"] == "FAILED"
    wait_for(lambda: hook.bodies, timeout=10)
    flag.write_text("")
    assert b.http("POST", f"/v1/jobs/{job}/retry").status_code == 200
    assert result(b, job)["output"] == "ok"
    wait_for(lambda: len(hook.bodies) == 2, timeout=10)
    assert [x["status"] for x in hook.bodies] == ["FAILED", "COMPLETED"]

    running = run(b, "slow", {"delay": 30})
    wait_for(lambda: a.client.get_job(running)["status"] == "IN_PROGRESS", timeout=30)
    queued = run(b, "slow", {"delay": 0})
    wait_for(lambda: a.http("GET", "/v1/apps/opts/slow/health").json()["jobs"]["in_queue"] == 1)
    assert b.http("POST", "/v1/apps/opts/slow/purge-queue").json() == {"removed": 1}
    assert result(b, queued)["status"] == "CANCELLED"
    b.client.cancel(running)
