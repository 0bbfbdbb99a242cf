"""Tenants cannot reach each other or the server from their own code.

Each test plays an attacker with a deploy token in one workspace of a shared server: its function
tries what the red team did (read the data dir, the operator token and `master.key`, another
tenant's bundle and processes, the server's environment; speak on the control channel as another
worker) and reports what it got. Everything is a real server, real workers and real user code.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import Server, wait_for
from ember.backends.sandbox import probe

needs_bwrap = pytest.mark.skipif(probe() is not None, reason=f"no worker sandbox: {probe()}")

CANARY = "server-only-canary-5f1c"

VICTIM = """
import os, ember

app = ember.App("victim")
SECRET_AT_IMPORT = os.environ.get("API_KEY")

@app.function(min_workers=1, idle_timeout=300, secrets=["vault"])
def serve(note: str = "") -> dict:
    with open("/tmp/victim-note", "w") as f:
        f.write(note)
    try:  # a process that dropped root is not even readable by itself here
        environ = open("/proc/self/environ", "rb").read().split(b"\\0")
    except PermissionError:
        environ = []
    cmdline = open("/proc/self/cmdline", "rb").read()
    return {
        "pid": os.getpid(),
        "secret_in_environ": any(b"EMBER_WORKER_SECRET" in v for v in environ),
        "id_in_argv": b"w-" in cmdline,
    }
"""

ATTACKER = """
import glob, json, os, socket, struct, ember

app = ember.App("attack")

def _try(fn):
    try:
        return {"ok": True, "value": fn()}
    except Exception as exc:
        return {"ok": False, "error": type(exc).__name__}

def _read(path):
    with open(path, "rb") as f:
        return f.read(200).decode(errors="replace")

def _hello(worker, secret):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(3)
    s.connect(os.environ["EMBER_CONTROL"][5:])
    body = json.dumps({"t": "hello", "worker": worker, "secret": secret, "pid": 1}).encode()
    s.sendall(struct.pack("!I", len(body)) + body)
    try:
        return s.recv(1024).decode()
    except TimeoutError:
        return "<still open>"
    finally:
        s.close()

def _links():
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the directory's own descriptor, gone once listed
            pass
    return out

def _sockets():
    names = []
    for fd, link in _links().items():
        if not link.startswith("socket:"):
            continue
        try:
            s = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            names.append(str(s.getsockname()))
        except OSError:
            pass
        finally:
            s.close()
    return names

@app.function()
def probe(data_dir: str, victim_bundle: str, server_pid: int, victim_id: str) -> dict:
    procs = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    cmdlines = {}
    for p in procs:
        try:
            cmdlines[p] = _read(f"/proc/{p}/cmdline")
        except OSError:
            pass
    return {
        "uid": os.getuid(),
        "token": _try(lambda: _read(os.path.join(data_dir, "token"))),
        "master_key": _try(lambda: _read(os.path.join(data_dir, "master.key"))),
        "database": _try(lambda: _read(os.path.join(data_dir, "ember.db"))),
        "data_dir_listing": _try(lambda: os.listdir(data_dir)),
        "victim_bundle": _try(lambda: _read(victim_bundle)),
        "server_environ": _try(lambda: _read(f"/proc/{server_pid}/environ")),
        "canary_in_env": any("canary" in v for v in os.environ.values()),
        "env_keys": sorted(os.environ),
        "procs": procs,
        "cmdlines": cmdlines,
        "victim_note": _try(lambda: _read("/tmp/victim-note")),
        "write_own_bundle": _try(lambda: open(__file__, "a").write("# rewritten")),
        "home": _try(lambda: os.listdir("/root")),
        "etc_shadow": _try(lambda: _read("/etc/shadow")),
        "hello_as_victim": _try(lambda: _hello(victim_id, "0" * 32)),
        "sockets": _sockets(),
        "log_fds": sorted(fd for fd, p in _links().items() if p.endswith(".log")),
    }

@app.function(block_network=True)
def offline(port: int) -> dict:
    def connect():
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return "connected"
    return {"loopback": _try(connect), "control": _try(lambda: _hello("w-x", "y"))}

@app.function()
def online(port: int) -> dict:
    def connect():
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return "connected"
    return {"loopback": _try(connect)}
"""


def workspace(server: Server, name: str) -> str:
    resp = server.http("POST", "/v1/workspaces", json={"name": name})
    assert resp.status_code == 201, resp.text
    token: str = resp.json()["token"]
    return token


def deploy_as(server: Server, token: str, source: str, filename: str) -> dict[str, Any]:
    from ember.sdk.client import Client
    from ember.sdk.deploy import deploy_file

    path = server.data_dir.parent / filename
    path.write_text(textwrap.dedent(source))
    return deploy_file(path, client=Client(url=server.url, token=token))[0]


def call(server: Server, token: str, app: str, fn: str, **input: Any) -> dict[str, Any]:
    resp = server.http("POST", f"/v1/apps/{app}/{fn}/runsync", token=token, json={"input": input})
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


def output(server: Server, token: str, app: str, fn: str, **input: Any) -> Any:
    body = call(server, token, app, fn, **input)
    assert body["status"] == "COMPLETED", json.dumps(body)[:3000]
    return body["output"]


def workers_of(server: Server, token: str, unit: str) -> list[dict[str, Any]]:
    resp = server.http("GET", "/v1/workers", token=token)
    return [w for w in resp.json()["workers"] if w["unit"] == unit]


@pytest.fixture(params=[(), ("--no-templates",)], ids=["forked", "plain"])
def shared(
    make_server: Callable[..., Server],
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> tuple[Server, str, str]:
    """A server with two tenants: `victim` (a secret, a warm worker) and `mallory`; workers
    forked from templates, or started as plain processes."""
    monkeypatch.setenv("EMBER_TEST_CANARY", CANARY)
    server = make_server("--sandbox", "bwrap", *request.param)
    victim, mallory = workspace(server, "victim"), workspace(server, "mallory")
    resp = server.http(
        "PUT", "/v1/secrets/vault", token=victim, json={"values": {"API_KEY": "sk-victim-123"}}
    )
    assert resp.status_code in (200, 201), resp.text
    deploy_as(server, victim, VICTIM, "victim_app.py")
    deploy_as(server, mallory, ATTACKER, "attack_app.py")
    return server, victim, mallory


@needs_bwrap
def test_a_tenant_sees_nothing_of_the_server_or_another_tenant(
    shared: tuple[Server, str, str],
) -> None:
    server, victim, mallory = shared
    mine = output(server, victim, "victim", "serve", note="private to the victim")
    assert mine["secret_in_environ"] is False  # its credential is in no environment
    assert mine["id_in_argv"] is False
    victim_worker = wait_for(lambda: workers_of(server, victim, "serve"), what="victim's worker")
    bundles = list((server.data_dir / "bundles" / "victim").rglob("victim_app.py"))
    assert bundles
    assert server.proc is not None
    got = output(
        server,
        mallory,
        "attack",
        "probe",
        data_dir=str(server.data_dir),
        victim_bundle=str(bundles[0]),
        server_pid=server.proc.pid,
        victim_id=victim_worker[0]["id"],
    )
    for what in ("token", "master_key", "database", "victim_bundle"):
        assert got[what] == {"ok": False, "error": "FileNotFoundError"}, (what, got[what])
    # its own bundle is mounted at its path, so the data dir is there as a bare skeleton
    assert got["data_dir_listing"] == {"ok": True, "value": ["bundles"]}
    assert got["server_environ"]["ok"] is False
    assert got["canary_in_env"] is False
    assert not [k for k in got["env_keys"] if k.startswith("EMBER_TEST")]
    assert "EMBER_WORKER_SECRET" not in got["env_keys"]
    # its own processes only: the sandbox's init, and the template or worker and its forks
    assert len(got["procs"]) <= 4, got["cmdlines"]
    assert not any("ember.cli.main" in c for c in got["cmdlines"].values()), got["cmdlines"]
    assert not any("victim" in c for c in got["cmdlines"].values())
    assert got["victim_note"] == {"ok": False, "error": "FileNotFoundError"}  # a /tmp of its own
    assert got["write_own_bundle"]["ok"] is False  # read-only
    assert got["home"]["ok"] is False or got["home"]["value"] in ([], [".pyenv"])
    assert got["etc_shadow"] == {"ok": False, "error": "FileNotFoundError"}
    assert got["hello_as_victim"] == {"ok": True, "value": ""}  # hung up on, nothing sent
    # nothing inherited from the server: not its listening socket, not its log files
    assert not [n for n in got["sockets"] if f", {server.port})" in n], got["sockets"]
    assert got["log_fds"] == [1, 2], got["log_fds"]  # its own output, on no other descriptor
    if os.geteuid() == 0:
        assert got["uid"] == 65534  # not root, even in its sandbox
    # the victim's worker still serves its own calls, and its secret was never shown
    assert output(server, victim, "victim", "serve")["pid"] == mine["pid"]
    assert "sk-victim-123" not in json.dumps(got)


@needs_bwrap
def test_block_network_cuts_a_worker_off_the_network(shared: tuple[Server, str, str]) -> None:
    server, _, mallory = shared
    online = output(server, mallory, "attack", "online", port=server.port)
    assert online["loopback"] == {"ok": True, "value": "connected"}
    offline = output(server, mallory, "attack", "offline", port=server.port)
    assert offline["loopback"]["ok"] is False
    assert offline["control"]["ok"] is True  # the control socket still reaches it (a file)


WITH_TEMPLATE = """
import os, ember

app = ember.App("tpl")
print("imported with", os.environ.get("API_KEY"))

@app.cls(secrets=["vault"])
class Model:
    @ember.enter(snap=True)
    def load(self):
        import logging
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        logging.getLogger("model").info("loaded with %s", os.environ.get("API_KEY"))
        self.template_pid = os.getpid()

    @ember.method()
    def info(self) -> dict:
        import logging
        logging.getLogger("model").info("called with %s", os.environ.get("API_KEY"))
        return {"pid": os.getpid(), "ppid": os.getppid(), "template": self.template_pid,
                "procs": sorted(int(p) for p in os.listdir("/proc") if p.isdigit())}
"""


@needs_bwrap
def test_forks_stay_in_their_templates_sandbox_and_its_output_is_redacted_and_served(
    make_server: Callable[..., Server],
) -> None:
    server = make_server("--sandbox", "bwrap")
    resp = server.http("PUT", "/v1/secrets/vault", json={"values": {"API_KEY": "sk-tpl-9876"}})
    assert resp.status_code in (200, 201), resp.text
    server.deploy(WITH_TEMPLATE, "tpl_app.py")
    out = server.function("tpl", "Model.info").remote()
    assert out["ppid"] == out["template"]  # forked by the template, in its PID namespace
    assert out["template"] in out["procs"] and len(out["procs"]) <= 4

    def lines() -> list[str] | None:
        resp = server.http("GET", "/v1/apps/tpl/Model/logs")
        got = [rec["line"] for rec in resp.json()["lines"]]
        return got if any("called with" in line for line in got) else None

    got = wait_for(lines, what="the class's log lines")
    assert "imported with [secret]" in got, got
    assert "loaded with [secret]" in got, got
    assert "called with [secret]" in got, got
    raw = "".join(p.read_text() for p in (server.data_dir / "logs").rglob("*") if p.is_file())
    assert "sk-tpl-9876" not in raw


def test_control_channel_reads_only_a_small_hello_within_a_deadline(server: Server) -> None:
    assert server.proc is not None
    port = next(p for p in listening_ports(server.proc.pid) if p != server.port)
    # a frame bigger than a hello is refused at once, before any of it is read
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(struct.pack("!I", 1 << 20))
        s.settimeout(5)
        assert s.recv(10) == b""
    # silence is cut at the deadline
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        t0 = time.monotonic()
        s.settimeout(10)
        assert s.recv(10) == b""
        assert time.monotonic() - t0 < 8
    assert httpx.get(server.url + "/v1/health").status_code == 200


def listening_ports(pid: int) -> list[int]:
    """The TCP ports process `pid` listens on (its sockets, matched in /proc/net/tcp)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = []
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
            ports.append(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_without_a_sandbox_only_the_default_workspace_runs_code(
    make_server: Callable[..., Server],
) -> None:
    server = make_server("--sandbox", "off")
    mallory = workspace(server, "mallory")
    deployed = deploy_as(server, mallory, ATTACKER, "attack_app.py")
    assert any("no worker sandbox" in w for w in deployed["warnings"]), deployed
    body = call(server, mallory, "attack", "online", port=server.port)
    assert body["status"] == "FAILED"
    assert "--no-tenant-isolation" in body["error"]["message"], body["error"]
    assert "without a sandbox" in body["error"]["message"]
    server.deploy(ATTACKER, "attack_app.py")  # the default workspace's own code still runs
    assert server.function("attack", "online").remote(port=server.port)["loopback"]["ok"]


def test_no_tenant_isolation_is_the_operators_explicit_choice(
    make_server: Callable[..., Server],
) -> None:
    server = make_server("--sandbox", "off", "--no-tenant-isolation")
    mallory = workspace(server, "mallory")
    deploy_as(server, mallory, ATTACKER, "attack_app.py")
    assert output(server, mallory, "attack", "online", port=server.port)["loopback"]["ok"]
    log = server.log()
    assert "--no-tenant-isolation" in log and "can read the data dir" in log


def doctor(server: Server) -> str:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "ember.cli.main", "doctor"],
        env={**server.env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.stdout + done.stderr


@needs_bwrap
def test_doctor_says_when_the_sandbox_is_unavailable(make_server: Callable[..., Server]) -> None:
    assert "sandbox" not in doctor(make_server("--sandbox", "bwrap"))
    text = doctor(make_server("--sandbox", "off"))
    assert "without the worker sandbox (the server runs with --sandbox off)" in text, text
    assert "apt-get install bubblewrap" in text
    text = doctor(make_server("--sandbox", "off", "--no-tenant-isolation"))
    assert "every workspace's" in text and "master.key" in text, text


def test_the_rule_of_whose_code_runs_without_a_sandbox() -> None:
    from ember.core.isolation import refusal

    def why(**kw: Any) -> str | None:
        return refusal(
            **{"sandboxed": False, "workspace": "default", "tenant_isolation": True, **kw}
        )

    assert why(sandboxed=True, workspace="mallory", block_network=True) is None
    assert why() is None  # the default workspace: a single user's own machine
    assert "--no-tenant-isolation" in (why(workspace="mallory") or "")
    assert why(workspace="mallory", tenant_isolation=False) is None  # the operator's choice
    assert "block_network" in (why(block_network=True, tenant_isolation=False) or "")
