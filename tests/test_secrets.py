"""Secrets end to end: set through the API, named by `@app.function(secrets=[...])`, run by real
workers of a real server.

A secret's value must reach the environment of the workers (and the template) of the functions
that name it, and nothing else: no other function, no API answer, no log, no file of the data dir
in clear, not the server's own output. The worker's redaction itself is tested line by line in
test_worker_secrets.py; the CLI (`ember secret set --from-dotenv`, ...) in test_cli_admin.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

from conftest import UNSANDBOXED, Server, result, spawn, wait_for, worker_pids
from ember.sdk.deploy import load_apps, manifest

VALUE = "hf_e2eS3cretVALUE_7f3a9c2b41"
NEW_VALUE = "hf_e2eR0tatedVALUE_51d0e8aa"
OTHER = "pg-e2e-password-0c9d2e"


def digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


SOURCE = """
import hashlib
import os
import sys
import time

import ember

app = ember.App("sec")
# read when the module is imported: in the function's template (or its plainly started worker)
SEEN_AT_IMPORT = "HF_TOKEN" in os.environ


def view() -> dict:
    value = os.environ.get("HF_TOKEN")
    return {
        # a digest, not the value: a returned value would be redacted, a digest is not
        "digest": None if value is None else hashlib.sha256(value.encode()).hexdigest(),
        "at_import": SEEN_AT_IMPORT,
        "master_key": os.environ.get("EMBER_MASTER_KEY"),
        "api_token": os.environ.get("EMBER_TOKEN"),
        "secret_keys": os.environ.get("EMBER_SECRET_KEYS"),
        "pid": os.getpid(),
    }


@app.function(secrets=["hf"])
def uses() -> dict:
    return view()


@app.function()
def plain() -> dict:
    return view()


@app.function(secrets=["hf"])
def slow(until: str | None = None) -> dict:
    deadline = time.monotonic() + 60
    while until and not os.path.exists(until) and time.monotonic() < deadline:
        time.sleep(0.02)
    return view()


@app.function(secrets=["hf"])
def leak(mode: str):
    token = os.environ["HF_TOKEN"]
    print(f"logging in with {token}")
    print(f"on stderr: {token}", file=sys.stderr)
    if mode == "raise":
        raise RuntimeError(f"login rejected for {token}")
    if mode == "stream":
        return [token, {"k": token}]
    return {"token": token, "header": f"Bearer {token}"}
"""


def put_secret(server: Server, name: str, values: dict[str, str]) -> dict[str, Any]:
    resp = server.http("PUT", f"/v1/secrets/{name}", json={"values": values})
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


def call(server: Server, fn: str, **input: Any) -> dict[str, Any]:
    body = server.client.runsync("sec", fn, input)
    assert body["status"] in ("COMPLETED", "FAILED"), body
    return body


def environ_of(pid: int) -> dict[str, str]:
    """The environment a process was started with (a fork shows its template's)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def processes(server: Server) -> list[dict[str, str]]:
    """The environments of the server's workers and templates that still run."""
    return [env for env in map(environ_of, worker_pids(server.data_dir)) if env]


def data_files(server: Server) -> dict[str, bytes]:
    """Every regular file under the data dir, by its path relative to it."""
    return {
        str(p.relative_to(server.data_dir)): p.read_bytes()
        for p in sorted(server.data_dir.rglob("*"))
        if p.is_file()
    }


def needs_proc() -> None:
    if not os.path.isdir("/proc"):
        pytest.skip("reads worker environments from /proc")


TEMPLATES = pytest.mark.parametrize(
    "args", [(), ("--no-templates",)], ids=["templates", "no-templates"]
)


# ----------------------------------------------------------------------------- who sees it


@TEMPLATES
def test_only_the_functions_that_name_a_secret_see_it(
    make_server: Callable[..., Server], args: tuple[str, ...]
) -> None:
    needs_proc()
    server = make_server(*args)
    put_secret(server, "hf", {"HF_TOKEN": VALUE})
    put_secret(server, "db", {"PGPASSWORD": OTHER})  # exists, named by nobody here
    server.deploy(SOURCE)

    uses = call(server, "uses")["output"]
    assert uses["digest"] == digest(VALUE)
    assert uses["at_import"] is True  # the module saw it at import, in template or worker
    assert uses["secret_keys"] == "HF_TOKEN"

    plain = call(server, "plain")["output"]
    assert plain["digest"] is None
    assert plain["at_import"] is False  # nor did the module of its template
    assert plain["secret_keys"] is None

    # straight from /proc: no process of `plain` (worker or template) holds the value
    envs = processes(server)
    units = {env.get("EMBER_UNIT") for env in envs}
    assert {"uses", "plain"} <= units, units
    if not args:  # templates on: each function version has one, started at deploy
        templates = {env["EMBER_UNIT"] for env in envs if "EMBER_TEMPLATE" in env}
        assert {"uses", "plain"} <= templates, templates
    for env in envs:
        assert "PGPASSWORD" not in env and OTHER not in env.values()  # named by nobody
        assert "EMBER_MASTER_KEY" not in env and "EMBER_TOKEN" not in env
        if env.get("EMBER_UNIT") == "plain":
            assert "HF_TOKEN" not in env and VALUE not in env.values(), env.get("EMBER_UNIT")
        elif env.get("EMBER_UNIT") == "uses":
            assert env.get("HF_TOKEN") == VALUE


@TEMPLATES
def test_the_value_appears_in_no_answer_log_or_file(
    make_server: Callable[..., Server], args: tuple[str, ...]
) -> None:
    server = make_server(*args, "--log-level", "debug")  # the last --log-level wins
    put_secret(server, "hf", {"HF_TOKEN": VALUE})
    server.deploy(SOURCE)

    answers: list[str] = []

    def get(path: str) -> Any:
        resp = server.http("GET", path)
        assert resp.status_code == 200, (path, resp.text)
        answers.append(resp.text)
        return resp.json()

    ok = call(server, "leak", mode="return")
    failed = call(server, "leak", mode="raise")
    listed = call(server, "leak", mode="stream")
    queued = spawn(server, "sec", "leak", mode="return")
    later = result(server, queued)
    for body in (ok, failed, listed, later):
        answers.append(json.dumps(body))
    # what the function produced came back, with the value replaced
    assert ok["output"] == {"token": "[secret]", "header": "Bearer [secret]"}
    assert listed["output"] == ["[secret]", {"k": "[secret]"}]
    assert failed["status"] == "FAILED"
    assert failed["error"]["message"] == "login rejected for [secret]"
    assert "RuntimeError: login rejected for [secret]" in failed["error"]["traceback"]

    for job_id in (ok["id"], failed["id"], listed["id"], queued):
        get(f"/v1/jobs/{job_id}")
    secrets = get("/v1/secrets")["secrets"]
    assert [(s["name"], s["keys"]) for s in secrets] == [("hf", ["HF_TOKEN"])]
    assert get("/v1/secrets/hf")["used_by"] == ["sec/leak", "sec/slow", "sec/uses"]
    get("/v1/apps")
    get("/v1/apps/sec")
    get("/v1/workers")
    get("/v1/audit")
    get("/v1/usage")

    def printed() -> list[str] | None:
        lines = get("/v1/apps/sec/leak/logs?tail=1000")["lines"]
        text = json.dumps(lines)
        return lines if text.count("logging in with [secret]") >= 4 else None

    lines = wait_for(printed, what="the printed lines in the function's logs")
    assert "on stderr: [secret]" in json.dumps(lines)

    for text in answers:
        assert VALUE not in text

    def no_leak_in_files(when: str) -> dict[str, bytes]:
        files = data_files(server)
        leaked = sorted(path for path, raw in files.items() if VALUE.encode() in raw)
        assert leaked == [], f"{when}: the value is in {leaked}"
        return files

    running = no_leak_in_files("while the server runs")
    assert "ember.db" in running and "ember.db-wal" in running, sorted(running)
    assert any(p.startswith("bundles/") for p in running), sorted(running)
    assert any(p.startswith("logs/workers/w-") for p in running), sorted(running)  # raw output
    if not args:
        assert any(p.startswith("logs/workers/template-") for p in running), sorted(running)

    server.shutdown(timeout=15)
    stopped = no_leak_in_files("after the server stopped")
    assert "ember.db" in stopped
    log = server.log()
    assert "ember server on" in log and " DEBUG " in log  # the server logged all it would
    assert VALUE not in log


# ----------------------------------------------------------------------------- at rest


def test_the_store_holds_ciphertext_under_the_key_file(make_server: Callable[..., Server]) -> None:
    server = make_server()
    key_file = server.data_dir / "master.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    put_secret(server, "hf", {"HF_TOKEN": VALUE, "HF_ORG": "ember-e2e-org"})

    with sqlite3.connect(f"file:{server.data_dir / 'ember.db'}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT workspace, name, keys, ciphertext FROM secrets").fetchall()
    assert len(rows) == 1
    workspace, name, keys, ciphertext = rows[0]
    assert (workspace, name, json.loads(keys)) == ("default", "hf", ["HF_ORG", "HF_TOKEN"])
    assert VALUE not in ciphertext and "ember-e2e-org" not in ciphertext
    # what is stored is the Fernet ciphertext of the values under the data dir's key
    plain = Fernet(key_file.read_bytes().strip()).decrypt(ciphertext.encode())
    assert json.loads(plain) == {"HF_TOKEN": VALUE, "HF_ORG": "ember-e2e-org"}

    # the key file survives a restart unchanged, and the secret is still usable
    key = key_file.read_bytes()
    server.restart()
    assert key_file.read_bytes() == key
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    server.deploy(SOURCE)
    assert call(server, "uses")["output"]["digest"] == digest(VALUE)


def test_a_master_key_from_the_environment_makes_no_file_and_never_reaches_workers(
    make_server: Callable[..., Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    key = Fernet.generate_key().decode()
    monkeypatch.setenv("EMBER_MASTER_KEY", key)  # the server inherits the test's environment
    monkeypatch.setenv("EMBER_TOKEN", "ember_not-for-workers")
    server = make_server()
    put_secret(server, "hf", {"HF_TOKEN": VALUE})
    assert not (server.data_dir / "master.key").exists()
    assert not any("master" in p for p in data_files(server))

    with sqlite3.connect(f"file:{server.data_dir / 'ember.db'}?mode=ro", uri=True) as db:
        (ciphertext,) = db.execute("SELECT ciphertext FROM secrets").fetchone()
    assert json.loads(Fernet(key.encode()).decrypt(ciphertext.encode())) == {"HF_TOKEN": VALUE}

    server.deploy(SOURCE)
    for fn in ("uses", "plain"):
        seen = call(server, fn)["output"]
        assert seen["master_key"] is None, fn
        assert seen["api_token"] is None, fn
    assert call(server, "uses")["output"]["digest"] == digest(VALUE)
    if os.path.isdir("/proc"):
        envs = processes(server)
        assert envs
        for env in envs:
            assert "EMBER_MASTER_KEY" not in env and key not in env.values()

    server.restart()  # the same key from the environment decrypts what is stored
    assert not (server.data_dir / "master.key").exists()
    assert call(server, "uses")["output"]["digest"] == digest(VALUE)


# ----------------------------------------------------------------------------- updates


@TEMPLATES
def test_workers_started_after_an_update_see_the_new_value(
    make_server: Callable[..., Server], args: tuple[str, ...], tmp_path: Path
) -> None:
    server = make_server(*args, *UNSANDBOXED)  # a release file; pids compared
    put_secret(server, "hf", {"HF_TOKEN": VALUE})
    server.deploy(SOURCE)
    before = call(server, "slow")["output"]
    assert before["digest"] == digest(VALUE)

    put_secret(server, "hf", {"HF_TOKEN": NEW_VALUE})
    # The first call holds a worker (the idle one, most likely, which keeps the environment it
    # started with) until `release` exists: the second needs a worker started after the update.
    release = tmp_path / "release"
    first = spawn(server, "sec", "slow", until=str(release))
    wait_for(lambda: server.client.get_job(first)["status"] == "IN_PROGRESS", what="first job")
    second = result(server, spawn(server, "sec", "slow"))["output"]
    release.touch()
    held = result(server, first)["output"]
    assert second["pid"] not in (before["pid"], held["pid"])
    assert second["digest"] == digest(NEW_VALUE)
    assert second["at_import"] is True
    assert held["digest"] in (digest(VALUE), digest(NEW_VALUE))
    if held["pid"] != before["pid"]:  # a worker started after the update
        assert held["digest"] == digest(NEW_VALUE)

    # the function that does not name it is untouched by the update
    assert call(server, "plain")["output"]["digest"] is None


def test_an_update_reaches_a_function_once_its_old_worker_is_gone(
    make_server: Callable[..., Server],
) -> None:
    """With templates, the update must restart the template too: a worker forked later from
    the old one would carry the old value."""
    server = make_server(*UNSANDBOXED)  # pids compared
    put_secret(server, "hf", {"HF_TOKEN": VALUE})
    server.deploy(
        SOURCE.replace(
            '@app.function(secrets=["hf"])\ndef uses',
            '@app.function(secrets=["hf"], idle_timeout=0.5)\ndef uses',
        )
    )
    first = call(server, "uses")["output"]
    assert first["digest"] == digest(VALUE)

    def gone() -> bool:
        return not any(w.get("pid") == first["pid"] for w in server.workers())

    wait_for(gone, timeout=20, what="the idle worker to stop")
    put_secret(server, "hf", {"HF_TOKEN": NEW_VALUE})
    second = call(server, "uses")["output"]
    assert second["pid"] != first["pid"]
    assert second["digest"] == digest(NEW_VALUE)


# ----------------------------------------------------------------------------- refusals


def test_deploying_a_function_that_names_an_unknown_secret_is_refused(
    server: Server, tmp_path: Path
) -> None:
    path = tmp_path / "needs_missing.py"
    path.write_text(
        "import ember\n\napp = ember.App('needy')\n\n\n"
        "@app.function(secrets=['nope'])\ndef f() -> None: ...\n"
    )
    (app,), source = load_apps(path)
    resp = server.http("POST", "/v1/apps", json=manifest(app, path.name, source))
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["code"] == "invalid_deploy"
    assert "'nope'" in error["message"]
    assert "create it first" in error["message"]
    assert "ember secret set nope" in error["message"]
    assert server.http("GET", "/v1/apps/needy").status_code == 404

    put_secret(server, "nope", {"K": "some-value"})  # once it exists, the same deploy works
    resp = server.http("POST", "/v1/apps", json=manifest(app, path.name, source))
    assert resp.status_code == 201, resp.text


def test_a_secret_in_use_cannot_be_deleted(server: Server) -> None:
    put_secret(server, "hf", {"HF_TOKEN": VALUE})
    server.deploy(SOURCE)
    resp = server.http("DELETE", "/v1/secrets/hf")
    assert resp.status_code == 409, resp.text
    error = resp.json()["error"]
    assert error["code"] == "conflict"
    for user in ("sec/leak", "sec/slow", "sec/uses"):
        assert user in error["message"]
    assert server.http("GET", "/v1/secrets/hf").status_code == 200
    assert call(server, "uses")["output"]["digest"] == digest(VALUE)  # still served

    # redeployed without it, the secret can go
    server.deploy(
        """
        import ember

        app = ember.App("sec")


        @app.function()
        def plain() -> int:
            return 1
        """
    )
    resp = server.http("DELETE", "/v1/secrets/hf")
    assert resp.status_code == 200, resp.text
    assert server.http("GET", "/v1/secrets/hf").status_code == 404
    assert server.http("DELETE", "/v1/secrets/hf").status_code == 404
