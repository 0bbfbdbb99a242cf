"""The audit trail and `ember doctor`, against real servers.

Audit: every security-relevant request appends one event (actor, action, target, outcome, time),
`ember audit` lists them, nothing can edit or delete one (neither the API nor SQL on the
database), and no secret value is ever written into one. Doctor: each server-side finding appears
when its risky setting does, and goes away with its fix. The CLI's own rendering, flags and
client-side token-file check are tested in test_cli_admin.py; the rules themselves in
test_posture.py.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import Server, spawn, wait_for
from ember.control.audit import MAX_SOURCES, OTHERS, AuditLog
from ember.sdk.deploy import load_apps, manifest
from ember.store.db import make_engine, migrate
from test_cli import ember, plain

SECRET_VALUE = "sk-audit-S3cret-value-94c1e7"
WRONG_TOKEN = "ember_not-a-real-token-but-maybe-a-typo-of-one"

APP = """
import time

import ember

app = ember.App("aud")


@app.function()
def nap(s: float) -> float:
    time.sleep(s)  # sleep-ok: the deployed function's simulated work
    return s
"""


def ok(resp: httpx.Response, status: int = 200) -> Any:
    assert resp.status_code == status, (resp.status_code, resp.text)
    return resp.json()


def events(server: Server, **params: Any) -> list[dict[str, Any]]:
    body = ok(server.http("GET", "/v1/audit", params=params))
    found: list[dict[str, Any]] = body["events"]
    return found


def one(found: list[dict[str, Any]], action: str, **match: Any) -> dict[str, Any]:
    hits = [
        e for e in found if e["action"] == action and all(e.get(k) == v for k, v in match.items())
    ]
    assert len(hits) == 1, (action, match, [(e["action"], e["target"]) for e in found])
    return hits[0]


def unknown_secret_manifest(tmp_path: Path) -> dict[str, Any]:
    path = tmp_path / "needs_missing.py"
    path.write_text(
        "import ember\n\napp = ember.App('needy')\n\n\n"
        "@app.function(secrets=['missing'])\ndef f() -> None: ...\n"
    )
    (app,), source = load_apps(path)
    return manifest(app, path.name, source)


# ----------------------------------------------------------------------------- audit


def test_each_security_relevant_request_appends_one_event(server: Server, tmp_path: Path) -> None:
    start = time.time()
    op = "token:default/admin"  # the operator's bootstrap token

    server.deploy(APP)
    ok(server.http("POST", "/v1/apps", json=unknown_secret_manifest(tmp_path)), 422)
    job = spawn(server, "aud", "nap", s=30)
    ok(server.http("POST", f"/v1/jobs/{job}/cancel"))
    reader = ok(server.http("POST", "/v1/tokens", json={"name": "reader", "scope": "read"}), 201)[
        "token"
    ]
    ok(server.http("DELETE", "/v1/tokens/reader"))
    ci = ok(server.http("POST", "/v1/tokens", json={"name": "ci", "scope": "read"}), 201)["token"]
    ok(server.http("PUT", "/v1/secrets/api", json={"values": {"API_KEY": SECRET_VALUE}}))
    ok(server.http("DELETE", "/v1/secrets/api"))
    rules = {"name": "cap", "budget_usd": 25.0, "period": "week", "action": "block"}
    ok(server.http("POST", "/v1/policies", json=rules), 201)
    ok(server.http("DELETE", "/v1/policies/cap"))
    ok(server.http("POST", "/v1/workspaces", json={"name": "team"}), 201)
    ok(server.http("GET", "/v1/apps", token=WRONG_TOKEN), 401)
    ok(server.http("GET", "/v1/apps", token=reader), 401)  # revoked
    ok(server.http("GET", "/v1/apps", token=None), 401)
    ok(server.http("POST", "/v1/tokens", token=ci, json={"name": "x", "scope": "admin"}), 403)
    end = time.time()

    found = events(server)
    for e in found:
        assert set(e) == {
            "id",
            "ts",
            "workspace",
            "actor",
            "action",
            "target",
            "outcome",
            "detail",
            "ip",
            "count",
            "last_ts",
        }
        assert start - 1 <= e["ts"] <= end + 1, e
        assert e["actor"] and e["action"] and e["outcome"], e
        assert e["ip"] == "127.0.0.1", e
    assert [e["id"] for e in found] == sorted(e["id"] for e in found)  # oldest first

    deployed = one(found, "app.deploy", outcome="ok")
    assert (deployed["actor"], deployed["target"], deployed["workspace"]) == (op, "aud", "default")
    assert deployed["detail"] == {"version": 1}
    refused = one(found, "app.deploy", outcome="invalid")
    assert refused["target"] == "needy" and "missing" in refused["detail"]["error"]
    cancelled = one(found, "job.cancel", target=job)
    assert (cancelled["actor"], cancelled["outcome"]) == (op, "ok")
    created = one(found, "token.create", target="reader")
    assert (created["actor"], created["outcome"]) == (op, "ok")
    assert created["detail"] == {"scope": "read", "policy": None}
    assert one(found, "token.revoke", target="reader")["outcome"] == "ok"
    secret_set = one(found, "secret.set", target="api")
    assert (secret_set["outcome"], secret_set["detail"]) == ("ok", {"keys": ["API_KEY"]})
    assert one(found, "secret.delete", target="api")["outcome"] == "ok"
    policy = one(found, "policy.create", target="cap")
    assert policy["outcome"] == "ok" and policy["detail"]["budget_usd"] == 25.0
    assert one(found, "policy.delete", target="cap")["outcome"] == "ok"
    workspace = one(found, "workspace.create", target="team")
    assert (workspace["actor"], workspace["outcome"]) == (op, "ok")

    # refusals without a valid token are counted per source, reason and minute: the wrong and
    # the revoked token share a row (unless a minute ended between them)
    failed = [e for e in found if e["action"] == "auth.failed"]
    assert 2 <= len(failed) <= 3 and sum(e["count"] for e in failed) == 3, failed
    assert all(e["last_ts"] >= e["ts"] for e in failed)
    assert all((e["count"], e["last_ts"]) == (1, None) for e in found if e not in failed)
    for e in failed:
        assert (e["actor"], e["outcome"], e["workspace"]) == ("anonymous", "refused", None)
        assert e["target"] == "GET /v1/apps"
        assert e["detail"]["why"]
    assert any("missing bearer token" in e["detail"]["why"] for e in failed)
    forbidden = one(found, "auth.forbidden")
    assert forbidden["actor"] == "token:default/ci" and forbidden["workspace"] == "default"
    assert (forbidden["target"], forbidden["outcome"]) == ("POST /v1/tokens", "refused")
    assert "admin" in forbidden["detail"]["why"]

    # nothing a caller sent as a credential or a secret value is kept
    text = json.dumps(found)
    for never in (SECRET_VALUE, WRONG_TOKEN, reader, ci, server.token):
        assert never not in text

    # the CLI lists them
    proc = ember(server, "audit", "--since", "1d")
    assert proc.returncode == 0, proc.stderr
    out = plain(proc.stdout)
    for action in (
        "app.deploy",
        "job.cancel",
        "token.create",
        "token.revoke",
        "secret.set",
        "secret.delete",
        "policy.create",
        "policy.delete",
        "workspace.create",
        "auth.failed",
        "auth.forbidden",
    ):
        assert action in out, action
    assert "anonymous" in out and op in out and job in out
    listed = json.loads(ember(server, "audit", "--since", "1d", "--json").stdout)
    assert [e["id"] for e in listed] == [e["id"] for e in found]
    assert (
        ember(server, "audit", "--until", "1d").stdout.strip() == "no audit events in that period"
    )


def test_each_workspace_reads_its_own_trail(server: Server) -> None:
    team = ok(server.http("POST", "/v1/workspaces", json={"name": "team"}), 201)["token"]
    ok(server.http("PUT", "/v1/secrets/theirs", token=team, json={"values": {"K": "v-long"}}))
    ok(server.http("PUT", "/v1/secrets/ours", json={"values": {"K": "v-long"}}))
    ok(server.http("GET", "/v1/apps", token=WRONG_TOKEN), 401)

    theirs = ok(server.http("GET", "/v1/audit", token=team))["events"]
    assert {(e["action"], e["target"]) for e in theirs} == {("secret.set", "theirs")}
    assert theirs[0]["actor"] == "token:team/admin" and theirs[0]["workspace"] == "team"
    operator = events(server)
    targets = {e["target"] for e in operator}
    assert "ours" in targets and "theirs" not in targets
    assert any(e["action"] == "auth.failed" for e in operator)  # no workspace: the operator's


def test_since_until_and_limit(server: Server) -> None:
    for i in range(5):
        ok(server.http("PUT", f"/v1/secrets/s{i}", json={"values": {"K": "value"}}))
    found = events(server)
    assert len(found) == 5
    assert [e["target"] for e in events(server, limit=2)] == ["s3", "s4"]  # the newest, in order
    middle = found[2]["ts"]
    assert [e["target"] for e in events(server, since=middle)] == ["s2", "s3", "s4"]
    assert [e["target"] for e in events(server, until=middle)] == ["s0", "s1"]
    iso = datetime.datetime.fromtimestamp(middle, datetime.UTC).isoformat()
    assert [e["target"] for e in events(server, since=iso)][-2:] == ["s3", "s4"]
    assert events(server, since=time.time() + 60) == []


def test_no_api_edits_or_deletes_an_event(server: Server) -> None:
    paths = ok(server.http("GET", "/openapi.json", token=None))["paths"]
    audit_paths = {p: set(ops) for p, ops in paths.items() if p.startswith("/v1/audit")}
    assert audit_paths == {"/v1/audit": {"get"}}

    ok(server.http("PUT", "/v1/secrets/s", json={"values": {"K": "value"}}))
    before = events(server)
    assert before
    event_id = before[0]["id"]
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        for path in ("/v1/audit", f"/v1/audit/{event_id}"):
            resp = server.http(method, path, json={"outcome": "ok"})
            assert resp.status_code in (404, 405), (method, path, resp.status_code)
    assert events(server) == before


def write_fails(db_path: Path) -> None:
    db = sqlite3.connect(db_path, timeout=10)
    try:
        (count,) = db.execute("SELECT count(*) FROM audit").fetchone()
        assert count > 0
        for statement in (
            "UPDATE audit SET outcome = 'ok', actor = 'nobody'",
            "DELETE FROM audit",
            "DELETE FROM audit WHERE id = (SELECT max(id) FROM audit)",
        ):
            with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                db.execute(statement)
            db.rollback()
        assert db.execute("SELECT count(*) FROM audit").fetchone() == (count,)
        # appending is what it is for
        db.execute(
            "INSERT INTO audit (ts, actor, action, outcome) VALUES (?, 'test', 'test.insert', 'ok')",
            (time.time(),),
        )
        db.commit()
        assert db.execute("SELECT count(*) FROM audit").fetchone() == (count + 1,)
    finally:
        db.close()


def test_sql_cannot_update_or_delete_an_event(server: Server) -> None:
    ok(server.http("PUT", "/v1/secrets/s", json={"values": {"K": "value"}}))
    ok(server.http("GET", "/v1/apps", token=WRONG_TOKEN), 401)
    wait_for(lambda: len(events(server)) >= 2, what="the events to be written")
    db_path = server.data_dir / "ember.db"
    write_fails(db_path)  # while the server runs
    server.shutdown(timeout=15)
    write_fails(db_path)  # and after it stopped


def test_secret_values_never_reach_the_trail(server: Server) -> None:
    values = {"API_KEY": SECRET_VALUE, "OTHER": "second-" + SECRET_VALUE[::-1]}
    ok(server.http("PUT", "/v1/secrets/api", json={"values": values}))
    ok(server.http("PUT", "/v1/secrets/api", json={"values": {"API_KEY": SECRET_VALUE + "2"}}))
    # refused sets: a bad key next to a good value, a value that is not a string
    bad = {"values": {"bad key": SECRET_VALUE, "GOOD": SECRET_VALUE}}
    resp = server.http("PUT", "/v1/secrets/api", json=bad)
    assert resp.status_code == 422 and SECRET_VALUE not in resp.text
    resp = server.http("PUT", "/v1/secrets/api", json={"values": {"K": [SECRET_VALUE]}})
    assert resp.status_code == 422 and SECRET_VALUE not in resp.text
    # a secret value used where a token goes, and in a name
    ok(server.http("GET", "/v1/apps", token=SECRET_VALUE), 401)
    server.deploy(
        """
        import ember

        app = ember.App("withsecret")


        @app.function(secrets=["api"])
        def f() -> int:
            return 1
        """
    )
    ok(server.http("DELETE", "/v1/secrets/api"), 409)

    found = events(server)
    actions = [(e["action"], e["outcome"]) for e in found]
    assert actions.count(("secret.set", "ok")) == 2
    assert actions.count(("secret.set", "invalid")) == 2
    assert ("secret.delete", "conflict") in actions
    assert SECRET_VALUE not in json.dumps(found)
    assert SECRET_VALUE[::-1] not in json.dumps(found)
    with sqlite3.connect(f"file:{server.data_dir / 'ember.db'}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT * FROM audit").fetchall()
    assert rows and SECRET_VALUE not in repr(rows)


def test_a_flood_of_refused_requests_is_a_handful_of_counted_rows(server: Server) -> None:
    flood, threads = 5000, 8
    sent: list[int] = []

    def send(i: int) -> None:
        headers = [{}, {"Authorization": f"Bearer {WRONG_TOKEN}"}][i % 2]
        with httpx.Client(base_url=server.url, timeout=30, headers=headers) as client:
            for _ in range(flood // threads):
                sent.append(client.get("/v1/apps").status_code)

    started = time.time()
    workers = [threading.Thread(target=send, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    minutes = int(time.time() // 60 - started // 60) + 1
    assert sent == [401] * flood
    ok(server.http("PUT", "/v1/secrets/s", json={"values": {"K": "value"}}))  # one row, as ever

    found = events(server)  # written up to now
    failed = [e for e in found if e["action"] == "auth.failed"]
    assert sum(e["count"] for e in failed) == flood
    assert len(failed) <= 2 * minutes, failed  # per source, reason and minute
    assert {e["ip"] for e in failed} == {"127.0.0.1"}
    assert {e["detail"]["why"].split(":")[0] for e in failed} == {
        "invalid or revoked token",
        "missing bearer token",
    }
    for e in failed:
        assert e["ts"] <= e["last_ts"] and e["last_ts"] - e["ts"] < 60, e
        assert (e["actor"], e["outcome"], e["workspace"]) == ("anonymous", "refused", None)
    assert one(found, "secret.set", target="s")["count"] == 1
    with sqlite3.connect(f"file:{server.data_dir / 'ember.db'}?mode=ro", uri=True) as db:
        (rows,) = db.execute("SELECT count(*) FROM audit").fetchone()
    assert rows == len(failed) + 1

    # the CLI lists them with their count; the counters only grow, below the API too
    out = plain(ember(server, "audit", "--since", "1h").stdout)
    assert "auth.failed" in out and f"x{max(e['count'] for e in failed)}" in out
    db = sqlite3.connect(server.data_dir / "ember.db", timeout=10)
    try:
        for statement in (
            "UPDATE audit SET count = 1 WHERE last_ts IS NOT NULL",
            "UPDATE audit SET count = count + 1, ip = '10.0.0.1' WHERE last_ts IS NOT NULL",
            "UPDATE audit SET count = count + 1 WHERE last_ts IS NULL",
            "DELETE FROM audit WHERE last_ts IS NOT NULL",
        ):
            with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                db.execute(statement)
            db.rollback()
    finally:
        db.close()

    # counted across a restart: later refusals add rows of their own minute, none is lost
    server.restart()
    ok(server.http("GET", "/v1/apps", token=WRONG_TOKEN), 401)
    again = [e for e in events(server) if e["action"] == "auth.failed"]
    assert sum(e["count"] for e in again) == flood + 1


def test_refusals_from_more_sources_than_counters_share_one(store_url: str) -> None:
    """Past MAX_SOURCES counters in a minute the rest share one row: memory and rows stay
    bounded however many addresses a flood comes from (driven on the room itself, on a real
    store, SQLite and PostgreSQL, since every request of a test comes from 127.0.0.1)."""
    engine = make_engine(store_url)
    migrate(engine)
    log = AuditLog(engine)
    sources = MAX_SOURCES + 500
    for i in range(sources):
        for _ in range(2):
            log.record(
                workspace=None,
                actor="anonymous",
                action="auth.failed",
                outcome="refused",
                target="GET /v1/apps",
                detail={"why": "invalid or revoked token"},
                ip=f"10.{i // 65536}.{i // 256 % 256}.{i % 256}",
            )
    log.checkpoint(time.time())
    found = log.read("default", None, None, 100_000, unattributed=True)
    engine.dispose()
    assert sum(e["count"] for e in found) == 2 * sources
    # one row per source, and one more for the rest (two if a minute ended meanwhile)
    assert MAX_SOURCES + 1 <= len(found) <= 2 * MAX_SOURCES + 2
    shared = [e for e in found if e["ip"] == OTHERS]
    assert shared and all(e["count"] <= 2 for e in found if e["ip"] != OTHERS)
    assert "more than" in shared[0]["detail"]["why"]


# ----------------------------------------------------------------------------- doctor


def findings(server: Server, *, token: str | None = "default", **kw: Any) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = ok(server.http("GET", "/v1/doctor", token=token, **kw))[
        "findings"
    ]
    for f in found:
        assert set(f) == {"code", "severity", "message", "fix"} and f["fix"], f
    return found


def codes(found: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return sorted((f["code"], f["severity"]) for f in found)


def test_listening_on_every_interface_without_tls_is_high(
    make_server: Callable[..., Server],
) -> None:
    loopback = make_server()
    assert "no_tls" not in {f["code"] for f in findings(loopback)}

    exposed = make_server("--host", "0.0.0.0")  # reached here through 127.0.0.1
    (no_tls,) = [f for f in findings(exposed) if f["code"] == "no_tls"]
    assert no_tls["severity"] == "high"
    assert "0.0.0.0" in no_tls["message"] and "--tls-cert" in no_tls["fix"]
    proc = ember(exposed, "doctor")
    assert proc.returncode == 1 and "--tls-cert" in plain(proc.stdout)


def test_a_workspace_admin_is_not_told_the_servers_address(
    make_server: Callable[..., Server],
) -> None:
    exposed = make_server("--host", "0.0.0.0")
    team = ok(exposed.http("POST", "/v1/workspaces", json={"name": "team"}), 201)["token"]
    assert "no_tls" not in {f["code"] for f in findings(exposed, token=team)}


def test_tokens_timeouts_and_budgets(server: Server) -> None:
    # a fresh server: only the default workspace without a budget
    assert codes(findings(server)) == [("no_budget", "low")]

    ok(server.http("POST", "/v1/tokens", json={"name": "ops", "scope": "admin"}), 201)
    ok(
        server.http(
            "POST",
            "/v1/tokens",
            json={"name": "ops-brief", "scope": "admin", "expires_in": 3600},
        ),
        201,
    )
    ok(server.http("POST", "/v1/tokens", json={"name": "ci", "scope": "deploy"}), 201)
    server.deploy(
        """
        import ember

        app = ember.App("slowpoke")


        @app.function(timeout=7200)
        def crawl() -> None: ...


        @app.function(timeout=3600)
        def hour() -> None: ...
        """
    )
    found = findings(server)
    assert codes(found) == [
        ("admin_token_no_expiry", "medium"),
        ("long_timeout", "medium"),
        ("no_budget", "low"),
    ]
    by_code = {f["code"]: f for f in found}
    assert "'ops'" in by_code["admin_token_no_expiry"]["message"]
    assert "--expires" in by_code["admin_token_no_expiry"]["fix"]
    assert "slowpoke.crawl" in by_code["long_timeout"]["message"]
    assert "7200" in by_code["long_timeout"]["message"]
    assert "'default'" in by_code["no_budget"]["message"]

    # each goes with its fix
    ok(server.http("POST", "/v1/policies", json={"name": "nobudget", "tags": {"t": "x"}}), 201)
    assert "no_budget" in {f["code"] for f in findings(server)}  # a policy without a budget
    ok(server.http("POST", "/v1/policies", json={"name": "cap", "budget_usd": 100.0}), 201)
    ok(server.http("DELETE", "/v1/tokens/ops"))
    server.deploy(
        """
        import ember

        app = ember.App("slowpoke")


        @app.function(timeout=3600)
        def crawl() -> None: ...
        """
    )
    assert findings(server) == []

    # a new workspace: its admin token never expires and it has no budget yet
    team = ok(server.http("POST", "/v1/workspaces", json={"name": "team"}), 201)["token"]
    everything = findings(server)  # the operator sees every workspace
    assert codes(everything) == [("admin_token_no_expiry", "medium"), ("no_budget", "low")]
    assert all("'team'" in f["message"] for f in everything)
    assert codes(findings(server, token=team)) == codes(everything)


def test_open_file_modes_are_high(server: Server) -> None:
    token_file = server.data_dir / "token"
    key_file = server.data_dir / "master.key"
    database = server.data_dir / "ember.db"
    assert "file_permissions" not in {f["code"] for f in findings(server)}
    team = ok(server.http("POST", "/v1/workspaces", json={"name": "team"}), 201)["token"]
    try:
        for path in (token_file, key_file, database):
            path.chmod(0o644)
        server.data_dir.chmod(0o755)
        found = [f for f in findings(server) if f["code"] == "file_permissions"]
        assert {f["severity"] for f in found} == {"high"}
        fixes = sorted(f["fix"] for f in found)
        assert fixes == sorted(
            [
                f"chmod 600 {token_file}",
                f"chmod 600 {key_file}",
                f"chmod 600 {database}",
                f"chmod 700 {server.data_dir}",
            ]
        )
        assert any("master key" in f["message"] and "0644" in f["message"] for f in found)
        # the server's files are the operator's business, not a workspace admin's
        assert "file_permissions" not in {f["code"] for f in findings(server, token=team)}
    finally:
        for path in (token_file, key_file, database):
            path.chmod(0o600)
        server.data_dir.chmod(0o700)
    assert "file_permissions" not in {f["code"] for f in findings(server)}


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ember-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


class TlsServer(Server):
    """A server behind its own self-signed certificate: https, not verified by the client."""

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"the server exited:\n{self.log()[-5000:]}")
        try:
            return httpx.get(self.url + "/v1/health", timeout=1, verify=False).status_code == 200
        except httpx.TransportError:
            return False

    def http(
        self, method: str, path: str, *, token: str | None = "default", **kw: Any
    ) -> httpx.Response:
        return super().http(method, path, token=token, verify=False, **kw)


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[TlsServer]:
    cert, key = self_signed(tmp_path)
    args = ["--host", "0.0.0.0", "--tls-cert", str(cert), "--tls-key", str(key)]
    server = TlsServer(tmp_path / "data", args)
    try:
        yield server.start()
    finally:
        server.shutdown(timeout=15)


def test_tls_makes_the_no_tls_finding_go_away(tls_server: TlsServer) -> None:
    assert "https://" in tls_server.log()
    assert "no_tls" not in {f["code"] for f in findings(tls_server)}
    assert codes(findings(tls_server)) == [("no_budget", "low")]
    # the API is served over TLS only
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{tls_server.port}/v1/health", timeout=5)
