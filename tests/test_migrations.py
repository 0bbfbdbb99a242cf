"""Upgrading a data dir made before workspaces (schema revision 0002) by starting a new server.

The database is built at 0002 with Alembic and filled the way the old server filled it: one
app with a version, a finished job and one still queued, and the bootstrap token (name `admin`,
its sha256 in the row, the token itself in `<data dir>/token`). A real server started on it must
put all of it in the `default` workspace, keep serving the app, run the queued job, and keep
accepting the old token as the operator's admin token.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config

from conftest import Server, result, spawn, wait_for
from ember.sdk.deploy import load_apps
from ember.store.db import MIGRATIONS, make_engine, sqlite_url

SOURCE = """
import ember

app = ember.App("legacy", tags={"team": "old"})


@app.function()
def square(x: int) -> int:
    return x * x
"""


def old_functions(path: Path) -> str:
    """The `functions` column as the old server wrote it: the spec had no `secrets` yet."""
    (app,), _ = load_apps(path)
    functions = app.manifest()
    for f in functions:
        f["spec"].pop("secrets", None)
    return json.dumps(functions)


def build_0002(data_dir: Path, token: str) -> dict[str, Any]:
    data_dir.mkdir(mode=0o700, parents=True)
    engine = make_engine(sqlite_url(data_dir))
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0002")
    engine.dispose()

    source_path = data_dir.parent / "legacy_app.py"
    source_path.write_text(textwrap.dedent(SOURCE))
    now = time.time()
    done_id, queued_id = "job-" + secrets.token_hex(12), "job-" + secrets.token_hex(12)
    db = sqlite3.connect(data_dir / "ember.db")
    try:
        assert db.execute("SELECT version_num FROM alembic_version").fetchone() == ("0002",)
        columns = {r[1] for r in db.execute("PRAGMA table_info(tokens)")}
        assert columns == {"id", "name", "hash", "created_at"}  # really the old schema
        db.execute(
            "INSERT INTO tokens (name, hash, created_at) VALUES ('admin', ?, ?)",
            (hashlib.sha256(token.encode()).hexdigest(), now - 86400),
        )
        db.execute(
            "INSERT INTO apps (name, tags, current_version, created_at, updated_at) "
            "VALUES ('legacy', ?, 1, ?, ?)",
            (json.dumps({"team": "old"}), now - 3600, now - 3600),
        )
        db.execute(
            "INSERT INTO versions (app, version, filename, source, functions, created_at) "
            "VALUES ('legacy', 1, 'legacy_app.py', ?, ?, ?)",
            (textwrap.dedent(SOURCE), old_functions(source_path), now - 3600),
        )
        db.execute(
            "INSERT INTO jobs (id, app, function, status, input, output, error, timings, "
            "attempts, version, created_at, finished_at, cost) "
            "VALUES (?, 'legacy', 'square', 'COMPLETED', ?, ?, NULL, ?, 1, 1, ?, ?, ?)",
            (
                done_id,
                json.dumps({"x": 7}),
                json.dumps(49),
                json.dumps({"exec_ms": 1.0, "total_ms": 2.0}),
                now - 600,
                now - 599,
                json.dumps({"usd": 1e-6, "gpu_seconds": 0.0, "cpu_seconds": 0.1}),
            ),
        )
        db.execute(
            "INSERT INTO jobs (id, app, function, status, input, attempts, version, created_at) "
            "VALUES (?, 'legacy', 'square', 'IN_QUEUE', ?, 0, 1, ?)",
            (queued_id, json.dumps({"x": 9}), now - 60),
        )
        db.commit()
    finally:
        db.close()
    fd = os.open(data_dir / "token", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return {"done": done_id, "queued": queued_id}


@pytest.fixture
def upgraded(tmp_path: Path) -> Iterator[tuple[Server, str, dict[str, Any]]]:
    token = "ember_" + secrets.token_urlsafe(32)
    jobs = build_0002(tmp_path / "data", token)
    server = Server(tmp_path / "data")
    try:
        yield server.start(), token, jobs
    finally:
        server.shutdown(timeout=15)


def rows(server: Server, query: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(f"file:{server.data_dir / 'ember.db'}?mode=ro", uri=True) as db:
        return db.execute(query).fetchall()


def test_a_0002_data_dir_is_upgraded_into_the_default_workspace(
    upgraded: tuple[Server, str, dict[str, Any]],
) -> None:
    server, token, jobs = upgraded
    assert server.token == token  # the token file was kept, not rotated
    assert rows(server, "SELECT version_num FROM alembic_version") == [("0009",)]
    assert rows(server, "SELECT name FROM workspaces") == [("default",)]
    assert rows(server, "SELECT workspace, name, current_version FROM apps") == [
        ("default", "legacy", 1)
    ]
    assert rows(server, "SELECT workspace, app, version FROM versions") == [
        ("default", "legacy", 1)
    ]
    assert sorted(rows(server, "SELECT id, workspace FROM jobs")) == sorted(
        [(jobs["done"], "default"), (jobs["queued"], "default")]
    )
    (tok,) = rows(
        server, "SELECT name, workspace, scope, bootstrap, revoked_at, expires_at FROM tokens"
    )
    assert tok == ("admin", "default", "admin", 1, None, None)

    # the old app is listed and callable, with its tags
    apps = server.http("GET", "/v1/apps").json()["apps"]
    assert [a["name"] for a in apps] == ["legacy"]
    assert server.client.runsync("legacy", "square", {"x": 12})["output"] == 144
    assert result(server, spawn(server, "legacy", "square", x=3))["output"] == 9

    # the finished job reads as it was; the queued one was run by the new server
    done = server.http("GET", f"/v1/jobs/{jobs['done']}").json()
    assert (done["status"], done["output"]) == ("COMPLETED", 49)
    queued = result(server, jobs["queued"])
    assert (queued["status"], queued["output"]) == ("COMPLETED", 81)


def test_the_old_token_is_the_operators_admin_token(
    upgraded: tuple[Server, str, dict[str, Any]],
) -> None:
    server, token, _ = upgraded
    tokens = server.http("GET", "/v1/tokens", token=token).json()["tokens"]
    assert [(t["name"], t["scope"], t["bootstrap"], t["revoked_at"]) for t in tokens] == [
        ("admin", "admin", True, None)
    ]
    # admin of the default workspace: the operator, who alone may create workspaces
    created = server.http("POST", "/v1/workspaces", token=token, json={"name": "team"})
    assert created.status_code == 201, created.text
    assert server.http("GET", "/v1/doctor", token=token).status_code == 200
    made = server.http("POST", "/v1/tokens", token=token, json={"name": "ci", "scope": "deploy"})
    assert made.status_code == 201, made.text
    # the bootstrap token is not reported as an admin token that never expires
    findings = server.http("GET", "/v1/doctor", token=token).json()["findings"]
    assert not any(
        f["code"] == "admin_token_no_expiry" and "'default'" in f["message"] for f in findings
    )
    # and the audit trail names it as the operator
    events = server.http("GET", "/v1/audit", token=token).json()["events"]
    assert any(
        e["action"] == "workspace.create" and e["actor"] == "token:default/admin" for e in events
    )

    # a second start is a no-op for the schema and keeps everything
    server.restart()
    assert server.token == token
    assert server.http("GET", "/v1/tokens", token=token).status_code == 200
    assert rows(server, "SELECT version_num FROM alembic_version") == [("0009",)]
    assert server.client.runsync("legacy", "square", {"x": 4})["output"] == 16

    # deleting the token file still rotates it: the old one stops working
    (server.data_dir / "token").unlink()
    server.restart()
    assert server.token != token
    wait_for(lambda: server.http("GET", "/v1/apps", token=token).status_code == 401)
    assert server.http("GET", "/v1/apps").status_code == 200
