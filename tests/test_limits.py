"""What a tenant may grow is bounded: queued jobs and bytes per workspace, log bytes per job and
per app, and how long finished jobs are kept.

Real servers started with small limits through their flags, real workers; the pure rules of
`ember.core.quotas` are tested on their own first.
"""

from __future__ import annotations

import sqlite3
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

import ember
from conftest import Server, result, spawn, wait_for
from ember.cli.main import app as cli
from ember.core.quotas import (
    GIB,
    KIB,
    MIB,
    Queued,
    Quotas,
    admit,
    duration_text,
    from_flags,
    log_marker,
    log_room,
    parse_duration,
    parse_size,
    prune_every,
)
from ember.sdk.client import Client
from ember.sdk.deploy import deploy_file

# ----------------------------------------------------------------------------- the pure rules


def test_admit_refuses_the_job_past_either_limit() -> None:
    q = Quotas(max_queued_jobs=3, max_queued_bytes=1000)
    assert admit(Queued(2, 0), 10, q) is None
    full = admit(Queued(3, 0), 10, q)
    assert full is not None and full.limit == "max_queued_jobs" and full.value == 3
    assert full.retry_after_s >= 1 and not full.never
    assert "max_queued_jobs = 3" in full.message and "cancel" in full.message
    assert admit(Queued(1, 900), 100, q) is None  # exactly at the limit fits
    full = admit(Queued(1, 900), 101, q)
    assert full is not None and full.limit == "max_queued_bytes" and not full.never
    assert full.to_dict() == {"limit": "max_queued_bytes", "value": 1000, "queued": 900}
    too_big = admit(Queued(0, 0), 1001, q)
    assert too_big is not None and too_big.never and "smaller input" in too_big.message


def test_log_room_keeps_up_to_the_cap_then_one_marker() -> None:
    assert log_room(0, 100, 100).keep
    first = log_room(90, 20, 100)
    assert not first.keep and first.marker
    after = log_room(101, 1, 100)  # the store counts cap + 1 once the marker is out
    assert not after.keep and not after.marker
    assert log_marker(MIB, "job-1") == (
        "[ember] log limit of 1 MiB reached for job-1: further output dropped"
    )


def test_sizes_durations_and_the_prune_interval() -> None:
    assert parse_size("1GiB") == GIB
    assert parse_size("512 MiB") == 512 * MIB
    assert parse_size("4kib") == 4 * KIB
    assert parse_size("1000") == 1000
    assert parse_size("64MB") == 64_000_000
    for bad in ("", "-1", "1 parsec", "0", "1e9"):
        with pytest.raises(ValueError, match="GiB"):
            parse_size(bad)
    assert parse_duration("7d") == 7 * 86_400
    assert parse_duration("12h") == 12 * 3600
    assert parse_duration("1s") == 1
    assert parse_duration("90") == 90
    for bad in ("1y", "0", "", "soon"):
        with pytest.raises(ValueError, match="7d, 12h"):
            parse_duration(bad)
    assert duration_text(7 * 86_400) == "7 days"
    assert duration_text(3600) == "1 hour"
    assert duration_text(1) == "1 s"
    assert prune_every(7 * 86_400) == 60.0
    assert prune_every(1) == 0.25
    assert prune_every(2) == 0.5


def test_the_server_flags_and_their_errors() -> None:
    q = from_flags(
        max_queued_jobs=5,
        max_queued_bytes="1MiB",
        job_retention="12h",
        max_job_log="4KiB",
        max_app_log="1MiB",
    )
    assert q == Quotas(5, MIB, 12 * 3600, 4 * KIB, MIB)
    with pytest.raises(ValueError, match="--job-retention: '1y' is not a duration"):
        from_flags(
            max_queued_jobs=5,
            max_queued_bytes="1MiB",
            job_retention="1y",
            max_job_log="4KiB",
            max_app_log="1MiB",
        )
    # the CLI refuses before starting anything, naming the flag
    out = CliRunner().invoke(cli, ["server", "--max-queued-bytes", "lots"])
    assert out.exit_code == 1 and "--max-queued-bytes" in out.output, out.output
    out = CliRunner().invoke(cli, ["server", "--max-queued-jobs", "0"])
    assert out.exit_code == 1 and "--max-queued-jobs" in out.output, out.output


def test_defaults_are_the_documented_ones() -> None:
    q = Quotas()
    assert (q.max_queued_jobs, q.max_queued_bytes) == (10_000, GIB)
    assert q.job_retention_s == 7 * 86_400
    assert (q.max_job_log_bytes, q.max_app_log_bytes) == (MIB, 64 * MIB)
    docs = (Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text()
    for flag in ("--max-queued-jobs", "--max-queued-bytes", "--job-retention", "--max-job-log"):
        assert flag in docs
    assert "Retry-After" in docs


# ----------------------------------------------------------------------------- helpers

NAP = """
import asyncio

import ember

app = ember.App({app!r})


@app.function(max_workers=1, concurrency=1, timeout=120, idle_timeout=60)
async def nap(s: float = 0, pad: str = "") -> float:
    await asyncio.sleep(s)  # a cancel interrupts it at once
    return s
"""


def deploy_nap(server: Server, client: Client | None = None) -> str:
    name = f"lim{uuid.uuid4().hex[:8]}"
    path = server.data_dir.parent / f"{name}.py"
    path.write_text(textwrap.dedent(NAP.format(app=name)))
    deploy_file(path, client=client or server.client)
    return name


def run(server: Server, app: str, token: str | None = "default", **input: Any) -> httpx.Response:
    return server.http("POST", f"/v1/apps/{app}/nap/run", token=token, json={"input": input})


def occupy(server: Server, app: str) -> str:
    """A long job on the app's only worker: what is queued after it stays queued."""
    job = spawn(server, app, "nap", s=60)
    wait_for(
        lambda: server.client.get_job(job)["status"] == "IN_PROGRESS",
        timeout=60,
        what="the long job to reach its worker",
    )
    return job


def rows(server: Server) -> int:
    with sqlite3.connect(f"file:{server.data_dir / 'ember.db'}?mode=ro", uri=True) as db:
        n: int = db.execute("SELECT count(*) FROM jobs").fetchone()[0]
    return n


def refused_full(resp: httpx.Response, limit: str, value: int) -> dict[str, Any]:
    assert resp.status_code == 429, resp.text
    assert resp.headers["retry-after"] == "1"
    err: dict[str, Any] = resp.json()["error"]
    assert err["code"] == "queue_full"
    assert err["limit"] == limit and err["value"] == value, err
    assert limit in err["message"] and "retry after" in err["message"], err
    return err


# ----------------------------------------------------------------------------- queue bounds


def test_the_job_past_max_queued_jobs_is_a_429_and_nothing_is_written(
    make_server: Callable[..., Server],
) -> None:
    server = make_server("--max-queued-jobs", "3")
    app = deploy_nap(server)
    first = occupy(server, app)  # in progress: not queued, not counted
    queued = [run(server, app).json()["id"] for _ in range(3)]
    before = rows(server)
    assert before == 4

    err = refused_full(run(server, app), "max_queued_jobs", 3)
    assert err["queued"] == 3
    sync = server.http("POST", f"/v1/apps/{app}/nap/runsync", json={"input": {}})
    refused_full(sync, "max_queued_jobs", 3)
    with pytest.raises(ember.RateLimited, match="max_queued_jobs") as raised:
        server.function(app, "nap").spawn()
    assert raised.value.status == 429 and raised.value.retry_after == 1.0
    assert rows(server) == before  # no record of any refused call
    health = server.http("GET", f"/v1/apps/{app}/nap/health").json()
    assert health["jobs"]["in_queue"] == 3

    # a cancelled queued job frees its room at once
    server.client.cancel(queued[0])
    more = run(server, app)
    assert more.status_code == 202, more.text
    refused_full(run(server, app), "max_queued_jobs", 3)

    # once the worker takes and finishes them, the counts are back to zero: three fit again
    server.client.cancel(first)
    for job in [*queued[1:], more.json()["id"]]:
        assert result(server, job, timeout=60)["status"] == "COMPLETED"
    again = occupy(server, app)
    for _ in range(3):
        assert run(server, app).status_code == 202
    refused_full(run(server, app), "max_queued_jobs", 3)
    server.client.cancel(again)


def test_queued_input_bytes_are_bounded_and_an_input_over_the_limit_is_a_413(
    make_server: Callable[..., Server],
) -> None:
    server = make_server("--max-queued-bytes", "2KiB")
    app = deploy_nap(server)
    first = occupy(server, app)
    pad = "x" * 600  # each input encodes to about 620 bytes: three fit in 2 KiB, four do not
    for _ in range(3):
        assert run(server, app, pad=pad).status_code == 202
    before = rows(server)
    err = refused_full(run(server, app, pad=pad), "max_queued_bytes", 2048)
    assert err["queued"] > 1800
    assert run(server, app).status_code == 202  # a small input still fits
    too_big = run(server, app, pad="x" * 3000)
    assert too_big.status_code == 413, too_big.text
    assert too_big.json()["error"]["code"] == "payload_too_large"
    assert "max_queued_bytes" in too_big.json()["error"]["message"]
    assert rows(server) == before + 1
    server.client.cancel(first)


def test_the_limit_is_per_workspace(make_server: Callable[..., Server]) -> None:
    server = make_server("--max-queued-jobs", "2")
    app = deploy_nap(server)
    first = occupy(server, app)
    for _ in range(2):
        assert run(server, app).status_code == 202
    refused_full(run(server, app), "max_queued_jobs", 2)

    name = f"ws{uuid.uuid4().hex[:8]}"
    made = server.http("POST", "/v1/workspaces", json={"name": name})
    assert made.status_code == 201, made.text
    token = made.json()["token"]
    other = Client(url=server.url, token=token)
    try:
        theirs = deploy_nap(server, other)
        resp = run(server, theirs, token=token)
        assert resp.status_code == 202, resp.text  # another workspace still queues
    finally:
        other.close()
    refused_full(run(server, app), "max_queued_jobs", 2)  # and this one is still full
    server.client.cancel(first)


def test_queue_counts_survive_a_restart(make_server: Callable[..., Server]) -> None:
    """Jobs requeued at start count against the limit they were accepted under."""
    server = make_server("--max-queued-jobs", "2")
    app = deploy_nap(server)
    first = occupy(server, app)
    for _ in range(2):
        assert run(server, app).status_code == 202
    server.kill9()
    server.restart()
    # the long job and the two queued ones are back in the queue: the server holds three, one
    # more than the limit (accepted jobs are never refused), and a new call is refused
    refused_full(run(server, app), "max_queued_jobs", 2)
    server.client.cancel(first)


# ----------------------------------------------------------------------------- logs

CHATTY = """
import ember

app = ember.App({app!r})


@app.cls(max_workers=1, idle_timeout=60)
class Chatty:
    @ember.enter()
    def start(self):
        for i in range(200):
            print(f"starting {{i:03d}} " + "s" * 90)

    @ember.method()
    def talk(self, lines: int = 200, width: int = 100) -> int:
        for i in range(lines):
            print(f"line {{i:04d}} " + "t" * width)
        return lines
"""


def deploy_chatty(server: Server) -> str:
    name = f"chat{uuid.uuid4().hex[:8]}"
    server.deploy(CHATTY.format(app=name), filename=f"{name}.py")
    return name


def log_lines(server: Server, app: str) -> list[dict[str, Any]]:
    resp = server.http("GET", f"/v1/apps/{app}/Chatty.talk/logs", params={"tail": 100_000})
    assert resp.status_code == 200, resp.text
    lines: list[dict[str, Any]] = resp.json()["lines"]
    return lines


def test_a_jobs_log_is_capped_with_one_marker_line(make_server: Callable[..., Server]) -> None:
    server = make_server("--max-job-log", "4KiB")
    app = deploy_chatty(server)
    job = spawn(server, app, "Chatty.talk")
    assert result(server, job)["status"] == "COMPLETED"
    marker = f"[ember] log limit of 4 KiB reached for {job}: further output dropped"
    lines = wait_for(
        lambda: (got := log_lines(server, app)) and any(r["line"] == marker for r in got) and got,
        what="the job's marker line",
    )
    mine = [r for r in lines if r["job"] == job]
    assert mine[-1]["line"] == marker  # nothing of the job after its marker
    kept = mine[:-1]
    assert 30 <= len(kept) <= 40  # about 4 KiB of 110-byte lines, not the 200 printed
    assert sum(len(r["line"]) for r in kept) <= 4 * KIB
    assert [r["line"][:9] for r in kept] == [f"line {i:04d}" for i in range(len(kept))]

    # lines outside any job (the worker's @enter) have a cap of their own, per worker
    starting = [r for r in lines if r["job"] is None]
    assert starting and starting[-1]["line"].startswith("[ember] log limit of 4 KiB reached for")
    assert "worker" in starting[-1]["line"]
    assert len(starting) < 200

    # a second job of the same worker has its own 4 KiB
    again = spawn(server, app, "Chatty.talk", lines=5)
    assert result(server, again)["status"] == "COMPLETED"
    wait_for(
        lambda: len([r for r in log_lines(server, app) if r["job"] == again]) == 5,
        what="the second job's five lines",
    )


def test_an_apps_log_file_is_rotated_and_bounded(make_server: Callable[..., Server]) -> None:
    server = make_server("--max-app-log", "64KiB")
    app = deploy_chatty(server)
    for _ in range(4):  # 4 jobs of 2,000 lines of 80 bytes: about 800 KB of records
        job = spawn(server, app, "Chatty.talk", lines=2000, width=60)
        assert result(server, job)["status"] == "COMPLETED"
    last = f"line {1999:04d} " + "t" * 60
    wait_for(
        lambda: any(r["line"] == last and r["job"] == job for r in log_lines(server, app)),
        what="the last job's last line",
    )
    files = sorted(p.name for p in (server.data_dir / "logs").rglob(f"{app}.jsonl*"))
    assert files == [f"{app}.jsonl", f"{app}.jsonl.1"], files
    for path in (server.data_dir / "logs").rglob(f"{app}.jsonl*"):
        assert path.stat().st_size <= 64 * KIB


# ----------------------------------------------------------------------------- retention


def test_finished_jobs_are_pruned_after_the_retention_and_queued_ones_never(
    make_server: Callable[..., Server],
) -> None:
    server = make_server("--job-retention", "1s")
    app = deploy_nap(server)
    done = server.client.runsync(app, "nap", {})
    assert done["status"] == "COMPLETED"
    running = occupy(server, app)
    waiting = run(server, app).json()["id"]

    def gone() -> httpx.Response | None:
        resp = server.http("GET", f"/v1/jobs/{done['id']}")
        return resp if resp.status_code == 404 else None

    resp = wait_for(gone, timeout=15, what="the finished job to be pruned")
    err = resp.json()["error"]
    assert err["code"] == "job_not_found"
    assert "kept for 1 s" in err["message"] and "--job-retention" in err["message"], err
    with sqlite3.connect(f"file:{server.data_dir / 'ember.db'}?mode=ro", uri=True) as db:
        ids = {r[0] for r in db.execute("SELECT id FROM jobs")}
    assert done["id"] not in ids
    time.sleep(1.5)  # several prune passes later, older than the retention, still there
    assert server.client.get_job(running)["status"] == "IN_PROGRESS"
    assert server.client.get_job(waiting)["status"] == "IN_QUEUE"
    with sqlite3.connect(f"file:{server.data_dir / 'ember.db'}?mode=ro", uri=True) as db:
        ids = {r[0] for r in db.execute("SELECT id FROM jobs")}
    assert {running, waiting} <= ids
    server.client.cancel(running)
    server.client.cancel(waiting)
