"""Several `ember server` processes on one PostgreSQL store: one schedules, any answers.

Real servers on a new database each (tests/pg.py), one master key for all (EMBER_MASTER_KEY), a
short scheduler lease (EMBER_LEASE_TTL) so that takeovers fit a test. They check what the
design promises (docs/architecture.md, "Several servers"): a call or a job read through either
server works; what only the scheduler does is forwarded to it; tokens, secrets, policies and
audit behave the same through either; kill -9 of the scheduler under load, or of a standby,
loses no accepted job and leaves none stuck; a scheduler whose lease is taken stops at once.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet
from sqlalchemy import create_engine, text

from conftest import UNSANDBOXED, Server, pid_alive, wait_for
from ember.testing import ServerExited

TTL = 2.0

APP = """
import os
import time
import ember

app = ember.App("pair")

@app.function()
def echo(i: int, marks: str = "") -> dict:
    if marks:  # one line per run: how often each job ran, and where
        from ember.worker.output import current_job

        with open(os.path.join(marks, str(i)), "a") as f:
            f.write(f"{os.getpid()}:{current_job.get()}\\n")
        time.sleep(0.002)  # sleep-ok: the job's work, so that jobs are in flight at a kill
    return {"i": i, "pid": os.getpid()}

@app.function()
def slow(s: float) -> float:
    time.sleep(s)  # sleep-ok: the job's work, cancelled while it runs
    return s

@app.function(secrets=["shared"])
def secret() -> str:
    return os.environ.get("SHARED_VALUE", "")[::-1]  # the value itself is redacted
"""


@pytest.fixture
def pair(
    pg_url: str,
    make_server: Callable[..., Server],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[Server, Server]:
    """Server a (it starts first: it schedules) and server b (standing by), on one store."""
    monkeypatch.setenv("EMBER_MASTER_KEY", Fernet.generate_key().decode())
    monkeypatch.setenv("EMBER_LEASE_TTL", str(TTL))
    a = make_server("--db", pg_url, *UNSANDBOXED)
    b_dir = tmp_path / "b"
    b_dir.mkdir()
    # the operator's token is the first server's; the others are given it, not a new one
    shutil.copy(a.data_dir / "token", b_dir / "token")
    b = make_server("--db", pg_url, *UNSANDBOXED, data_dir=b_dir)
    return a, b


def deploy(server: Server, value: str = "first") -> None:
    """The app, and the secret it names first (a deploy needs it), through `server`."""
    body = {"values": {"SHARED_VALUE": value}}
    ok(server.http("PUT", "/v1/secrets/shared", json=body))
    server.deploy(APP)


def role(server: Server) -> str:
    return str(server.http("GET", "/v1/health", token=None).json()["role"])


def ok(resp: httpx.Response, status: int = 200) -> Any:
    assert resp.status_code == status, f"{resp.status_code}: {resp.text}"
    return resp.json()


def runsync(server: Server, fn: str, token: str | None = "default", **input: Any) -> Any:
    resp = server.http("POST", f"/v1/apps/pair/{fn}/runsync", token=token, json={"input": input})
    return ok(resp)


def test_one_schedules_and_either_answers_for_any_job(pair: tuple[Server, Server]) -> None:
    a, b = pair
    assert (role(a), role(b)) == ("leader", "standby")
    deploy(b)  # forwarded: the scheduler deploys
    assert ok(a.http("GET", "/v1/apps"))["apps"] == ok(b.http("GET", "/v1/apps"))["apps"]
    # a call through the standby right after the deploy: it reads the store again for it
    assert runsync(b, "echo", i=0)["output"]["i"] == 0

    # calls through either run on the scheduler's workers; jobs read back through either
    on_a, on_b = runsync(a, "echo", i=1), runsync(b, "echo", i=2)
    assert on_a["output"]["i"] == 1 and on_b["output"]["i"] == 2
    assert on_a["output"]["pid"] == on_b["output"]["pid"]  # one worker, the scheduler's
    queued = ok(b.http("POST", "/v1/apps/pair/echo/run", json={"input": {"i": 3}}), 202)["id"]
    for server in (a, b):
        body = ok(server.http("GET", f"/v1/jobs/{queued}", params={"wait": 10}))
        assert body["status"] == "COMPLETED" and body["output"]["i"] == 3
    for server in (a, b):
        body = ok(server.http("GET", f"/v1/jobs/{on_b['id']}"))
        assert body["status"] == "COMPLETED" and body["output"]["i"] == 2

    # what only the scheduler knows comes through the standby too
    workers = ok(b.http("GET", "/v1/workers"))["workers"]
    assert [w["pid"] for w in workers] == [
        w["pid"] for w in ok(a.http("GET", "/v1/workers"))["workers"]
    ]
    assert b.http("GET", "/v1/jobs/job-nope").status_code == 404
    bad = b.http("POST", "/v1/apps/pair/nope/run", json={"input": {}})
    assert bad.status_code == 404 and "nope" in bad.json()["error"]["message"]


def test_tokens_secrets_policies_and_audit_work_through_either(
    pair: tuple[Server, Server],
) -> None:
    a, b = pair
    deploy(b, "s3cr3t")
    # a secret set through the standby reaches the scheduler's workers (one master key)
    assert runsync(a, "secret")["output"] == "t3rc3s"

    policy = {"name": "team", "tags": {"team": "search"}}
    ok(a.http("POST", "/v1/policies", json=policy), 201)
    made = ok(
        b.http("POST", "/v1/tokens", json={"name": "t1", "scope": "invoke", "policy": "team"}), 201
    )
    token = made["token"]

    def tagged_on_b() -> bool:
        resp = b.http("POST", "/v1/apps/pair/echo/runsync", token=token, json={"input": {"i": 9}})
        return resp.status_code == 200 and resp.json()["tags"] == {"team": "search"}

    wait_for(tagged_on_b, timeout=10, what="the standby to know the new token and its policy")
    assert runsync(a, "echo", token=token, i=8)["tags"] == {"team": "search"}

    ok(a.http("DELETE", "/v1/tokens/t1"))
    wait_for(
        lambda: b.http("POST", "/v1/apps/pair/echo/run", token=token, json={"input": {"i": 1}})
        .status_code == 401,
        timeout=10,
        what="the revoked token to be refused by the standby",
    )  # fmt: skip
    assert (
        a.http("POST", "/v1/apps/pair/echo/run", token=token, json={"input": {"i": 1}}).status_code
        == 401
    )

    events = {e["action"] for e in ok(b.http("GET", "/v1/audit"))["events"]}
    assert {"app.deploy", "secret.set", "policy.create", "token.create", "token.revoke"} <= events
    assert ok(a.http("GET", "/v1/audit"))["events"] == ok(b.http("GET", "/v1/audit"))["events"]


async def _submit_all(
    servers: list[Server], n: int, marks: Path, kill_after: int, kill: Callable[[], None]
) -> dict[int, str]:
    """Submit `n` jobs round-robin with an Idempotency-Key each, 32 at a time; a submit whose
    server is gone is retried on the next one under the same key, as a client behind a load
    balancer does. `kill()` runs once `kill_after` jobs are accepted."""
    ids: dict[int, str] = {}
    todo = iter(range(n))
    killed = False

    async def client(c: int) -> None:
        nonlocal killed
        async with httpx.AsyncClient(timeout=30) as http:
            for i in todo:
                for attempt in range(40):
                    server = servers[(i + attempt) % len(servers)]
                    try:
                        resp = await http.post(
                            f"{server.url}/v1/apps/pair/echo/run",
                            json={"input": {"i": i, "marks": str(marks)}},
                            headers={
                                "Authorization": f"Bearer {servers[0].token}",
                                "Idempotency-Key": f"job-{i}",
                            },
                        )
                    except httpx.TransportError:
                        await asyncio.sleep(0.05)
                        continue
                    if resp.status_code == 202:
                        ids[i] = resp.json()["id"]
                        break
                    assert resp.status_code in (502, 503), resp.text
                    await asyncio.sleep(0.05)
                else:
                    raise AssertionError(f"job {i} was never accepted")
                if len(ids) >= kill_after and not killed:
                    killed = True
                    kill()

    await asyncio.gather(*(client(c) for c in range(32)))
    return ids


def _query(url: str, sql: str, **params: Any) -> list[Any]:
    """Rows of `sql` on the store, read directly (what the servers wrote, not what they say)."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql), params)]
    finally:
        engine.dispose()


def _rows_of(url: str, runs: dict[int, list[str]]) -> list[Any]:
    """The rows of the jobs named in `runs` ("pid:job-id" each), to tell what ran twice."""
    ids = sorted({r.split(":")[1] for rs in runs.values() for r in rs})
    sql = "SELECT id, idempotency_key, owner, status, attempts, created_at FROM jobs"
    return _query(url, sql + " WHERE id = ANY(:ids)", ids=ids)


def _ids(url: str) -> set[str]:
    return {r[0] for r in _query(url, "SELECT id FROM jobs")}


def _statuses(url: str) -> Counter[str]:
    rows = _query(url, "SELECT status, count(*) FROM jobs GROUP BY status")
    return Counter({status: n for status, n in rows})


@pytest.mark.parametrize("victim", ["scheduler", "standby"])
def test_kill_9_of_either_under_load_loses_no_job_and_leaves_none_stuck(
    pair: tuple[Server, Server], pg_url: str, tmp_path: Path, victim: str
) -> None:
    a, b = pair
    deploy(a)
    marks = tmp_path / "marks"
    marks.mkdir()
    assert runsync(b, "echo", i=-1)["output"]["i"] == -1
    dead, alive = (a, b) if victim == "scheduler" else (b, a)
    before_pids = {w["pid"] for w in ok(a.http("GET", "/v1/workers"))["workers"]}
    killed_at: list[float] = []

    led_at: list[float] = []

    def watch_takeover() -> None:
        while role(alive) != "leader":
            time.sleep(0.05)  # sleep-ok: polling the survivor's role while the load runs
        led_at.append(time.monotonic())

    def kill() -> None:
        assert dead.proc is not None
        os.kill(dead.proc.pid, signal.SIGKILL)
        killed_at.append(time.monotonic())
        threading.Thread(target=watch_takeover, daemon=True).start()

    n = 2000
    ids = asyncio.run(_submit_all([a, b], n, marks, kill_after=n // 2, kill=kill))
    assert len(ids) == n and len(set(ids.values())) == n

    if victim == "scheduler":
        wait_for(lambda: led_at, timeout=TTL * 3, what="the standby to take over")
        took = led_at[0] - killed_at[0]
        assert took < TTL + 3.0, f"takeover took {took:.1f} s"
        # the dead scheduler's workers died with it: nothing runs a job twice
        wait_for(lambda: not any(pid_alive(p) for p in before_pids), timeout=10,
                 what="the killed scheduler's workers to exit")  # fmt: skip

    def all_done() -> bool:
        counts = _statuses(pg_url)
        return not (counts["IN_QUEUE"] or counts["IN_PROGRESS"])

    wait_for(all_done, timeout=120, interval=0.5, what="every accepted job to end")
    counts = _statuses(pg_url)
    assert set(counts) == {"COMPLETED"} and counts["COMPLETED"] > n, counts  # and warm-ups
    assert set(ids.values()) <= _ids(pg_url), "a 202 named a job the store does not have"
    for i, job_id in list(ids.items())[:: n // 20]:
        assert ok(alive.http("GET", f"/v1/jobs/{job_id}"))["output"]["i"] == i

    runs = {int(p.name): p.read_text().split() for p in marks.iterdir()}
    assert set(runs) == set(range(n)), "a job never ran"
    twice = {i: pids for i, pids in runs.items() if len(pids) > 1}
    if victim == "standby":
        rows = {r[0]: r for r in _rows_of(pg_url, twice)}
        told = [
            f"{i}: answered {ids[i][-6:]}; ran "
            + ", ".join(
                f"{r.split(':')[1][-6:]} (row {rows.get(r.split(':')[1], '-')})" for r in rs
            )
            for i, rs in twice.items()
        ]
        assert twice == {}, "\n".join(told)  # the scheduler lived: every job ran once
    else:
        # At least once: what the dead scheduler was running, or had run without its end
        # stored yet, ran again, once, on the new scheduler's workers; nothing else did.
        print(f"takeover {took:.2f} s (TTL {TTL} s); {len(twice)} of {n} jobs ran twice")
        assert len(twice) <= 64, twice

        def odd_runs(runs: list[str]) -> bool:  # "pid:job-id" each: one job, two processes
            (pid1, job1), (pid2, job2) = (r.split(":") for r in runs)
            return pid1 == pid2 or job1 != job2

        odd = {i: runs for i, runs in twice.items() if len(runs) != 2 or odd_runs(runs)}
        assert odd == {}, odd


def test_a_scheduler_that_loses_its_lease_stops_at_once(
    pair: tuple[Server, Server], pg_url: str
) -> None:
    """A partition as the store sees it: the lease moves on (here: taken under the scheduler's
    feet); the scheduler finds out at its next renewal, kills its workers and exits."""
    a, b = pair
    deploy(a)
    runsync(a, "echo", i=1)
    pids = {w["pid"] for w in ok(a.http("GET", "/v1/workers"))["workers"]}
    assert pids
    engine = create_engine(pg_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "UPDATE leases SET holder = 'elsewhere', epoch = epoch + 1, "
                    "expires_at = extract(epoch FROM clock_timestamp()) + 1 WHERE name = 'scheduler'"
                )
            )
    finally:
        engine.dispose()
    assert a.proc is not None
    a.proc.wait(timeout=TTL * 2 + 10)
    assert not any(pid_alive(p) for p in pids)
    assert "no longer schedules" in a.log()
    # nobody renews "elsewhere": b takes the lease once it expires and serves on
    wait_for(lambda: role(b) == "leader", timeout=TTL * 3, what="the standby to take over")
    assert runsync(b, "echo", i=2)["output"]["i"] == 2


ENV_APP = """
import ember

app = ember.App("withenv")

@app.function(env=ember.Env.standard().pip_install("six==1.16.0"))
def six_version() -> str:
    import six
    return six.__version__
"""


def test_an_app_on_its_own_env_is_served_by_a_standby_and_after_a_takeover(
    pair: tuple[Server, Server],
) -> None:
    """The Env is built by the scheduler at deploy; the standby, which never built it, accepts
    its calls, and once it takes over it builds the Env from the store's record and runs them."""
    a, b = pair
    a.deploy(ENV_APP, "env_app.py")
    resp = b.http("POST", "/v1/apps/withenv/six_version/runsync", json={"input": {}})
    assert ok(resp)["output"] == "1.16.0"
    assert a.proc is not None
    os.kill(a.proc.pid, signal.SIGKILL)
    # until the lease runs out, what only a scheduler does is refused, saying when to retry
    refused = b.http("GET", "/v1/workers")
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert refused.json()["error"]["code"] == "no_scheduler"
    wait_for(lambda: role(b) == "leader", timeout=TTL * 3 + 60, what="the standby to take over")
    resp = b.http("POST", "/v1/apps/withenv/six_version/runsync", json={"input": {}})
    assert ok(resp)["output"] == "1.16.0"
    assert "building Env" in b.log()


def test_a_cancel_through_the_standby_reaches_the_job(pair: tuple[Server, Server]) -> None:
    a, b = pair
    deploy(a)
    job_id = ok(b.http("POST", "/v1/apps/pair/slow/run", json={"input": {"s": 60}}), 202)["id"]
    ok(b.http("POST", f"/v1/jobs/{job_id}/cancel"))  # forwarded, taken in by the scheduler
    body = ok(b.http("GET", f"/v1/jobs/{job_id}", params={"wait": 20}))
    assert body["status"] == "CANCELLED", body
    assert ok(a.http("GET", f"/v1/jobs/{job_id}"))["status"] == "CANCELLED"


def test_a_server_with_another_master_key_refuses_to_join(
    pair: tuple[Server, Server],
    pg_url: str,
    make_server: Callable[..., Server],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, _ = pair
    deploy(a)  # a secret is stored, encrypted under the pair's key
    monkeypatch.setenv("EMBER_MASTER_KEY", Fernet.generate_key().decode())
    (tmp_path / "c").mkdir()
    shutil.copy(a.data_dir / "token", tmp_path / "c" / "token")
    with pytest.raises(ServerExited, match="EMBER_MASTER_KEY"):
        make_server("--db", pg_url, *UNSANDBOXED, data_dir=tmp_path / "c")
