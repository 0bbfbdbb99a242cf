"""Workspaces and scoped tokens, against a real server.

Who may create a workspace (the operator only); that nothing of one workspace can be read or
touched from another, on every /v1 endpoint of the OpenAPI document (so an endpoint is covered the
day it is added); what each scope may do, per the table in docs/security.md; that a revoked or
expired token stops at once; and that jobs and usage belong to the workspace of the token that
made them.

One server serves the module; every test makes workspaces of its own, with random names.
"""

from __future__ import annotations

import re
import textwrap
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import Server, wait_for
from ember.envs.bundle import collect
from ember.sdk.deploy import load_apps, manifest

HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
PUBLIC = {"GET /v1/health"}
"""The only /v1 operations that need no token."""


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # one simulated GPU, so that a workspace's worker shows up on GET /v1/nodes
    server = Server(tmp_path_factory.mktemp("workspaces") / "data", ["--gpus", "L4:1"]).start()
    yield server
    server.shutdown(timeout=15)  # fails the module if a worker outlives the server
    log = server.log()
    assert "unhandled error" not in log, f"the server hit an unhandled error:\n{log}"


# ----------------------------------------------------------------------------- helpers


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def ok(resp: httpx.Response, status: int = 200) -> Any:
    assert resp.status_code == status, f"{resp.request.method} {resp.request.url}: {resp.text}"
    return resp.json()


def refused(resp: httpx.Response, status: int, code: str, *words: str) -> dict[str, Any]:
    """An error answer `{"error": {"code", "message"}}` whose message has every word."""
    assert resp.status_code == status, f"{resp.request.method} {resp.request.url}: {resp.text}"
    err: dict[str, Any] = resp.json()["error"]
    assert err["code"] == code, err
    for word in words:
        assert word in err["message"], err
    return err


def create_workspace(srv: Server, name: str) -> str:
    """A new workspace, by the operator; its admin token."""
    body = ok(srv.http("POST", "/v1/workspaces", json={"name": name}), 201)
    token: str = body["token"]
    return token


def create_token(srv: Server, admin: str, name: str, scope: str, **extra: Any) -> str:
    body = {"name": name, "scope": scope, **extra}
    token: str = ok(srv.http("POST", "/v1/tokens", token=admin, json=body), 201)["token"]
    return token


def app_source(app: str, fn: str, *, secret: str | None = None, gpu: bool = False) -> str:
    options = ["idle_timeout=300"]  # the worker stays up: it must show in /workers and /nodes
    if secret is not None:
        options.append(f"secrets=[{secret!r}]")
    if gpu:
        options.append('gpu="L4"')
    return textwrap.dedent(
        f"""
        import ember

        app = ember.App({app!r})


        @app.function({", ".join(options)})
        def {fn}(x: int = 2) -> int:
            return x * x
        """
    )


def deploy_body(tmp: Path, source: str) -> dict[str, Any]:
    """The body `ember deploy` would send for `source` (POST /v1/apps)."""
    path = tmp / f"{unique('app_')}.py"
    path.write_text(source)
    [app], text = load_apps(path)
    return manifest(app, path.name, text)


def built_env(srv: Server, token: str, variables: dict[str, str]) -> str:
    """The id of a new Env of the workspace (the standard base, nothing added: quick to build),
    once it is built."""
    resp = srv.http("POST", "/v1/envs", token=token, json={"spec": {"variables": variables}})
    assert resp.status_code in (200, 202), resp.text
    view = resp.json()
    path = f"/v1/envs/{view['id']}"

    def ready() -> bool:
        status = ok(srv.http("GET", path, token=token, params={"build": 1}))["status"]
        assert status != "failed"
        return bool(status == "ready")

    wait_for(ready, timeout=120, what=f"Env {view['id']} to build")
    return str(view["id"])


def bundle_body(
    srv: Server, token: str, tmp: Path, source: str, env_id: str
) -> tuple[dict[str, Any], str]:
    """The bundle of `source` uploaded, and the body `ember deploy` then sends for it, its
    function in the Env `env_id`; (body, the bundle's digest)."""
    code = tmp / unique("code_")
    code.mkdir()
    path = code / "main.py"
    path.write_text(source)
    bundle = collect(path)
    headers = {"content-type": "application/zip"}
    url = f"/v1/bundles/{bundle.digest}"
    ok(srv.http("PUT", url, token=token, content=bundle.data, headers=headers), 201)
    [app], _ = load_apps(path)
    body = {
        "name": app.name,
        "tags": app.tags,
        "filename": bundle.filename,
        "bundle": bundle.digest,
        "module": bundle.module,
        "functions": app.manifest({unit: env_id for unit in app.units}),
    }
    return body, bundle.digest


def finished(srv: Server, token: str, job_id: str) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        body: dict[str, Any] = ok(
            srv.http("GET", f"/v1/jobs/{job_id}", token=token, params={"wait": 5})
        )
        return None if body["status"] in ("IN_QUEUE", "IN_PROGRESS") else body

    done = wait_for(ended, timeout=60, what=f"job {job_id} to end")
    assert done is not None
    return done


def v1_operations(srv: Server) -> list[tuple[str, str, dict[str, Any]]]:
    """(METHOD, path, operation) for every operation under /v1 in the server's OpenAPI document."""
    doc = ok(srv.http("GET", "/openapi.json", token=None))
    ops = []
    for path, item in doc["paths"].items():
        if not path.startswith("/v1/"):
            continue
        for method, op in item.items():
            if method in HTTP_METHODS:
                ops.append((method.upper(), path, op))
    assert len(ops) > 20, ops  # the document is the whole API, not a part of it
    return ops


def path_params(path: str) -> list[str]:
    return re.findall(r"\{(\w+)\}", path)


@dataclass
class Tenant:
    """A workspace with one of everything: an app (its function names a secret), a finished
    job, a token, a policy, a secret."""

    workspace: str
    admin: str
    app: str
    fn: str
    token_name: str
    token: str
    policy: str
    secret: str
    secret_key: str
    job: str
    bundle: str = ""
    env: str = ""

    def identifiers(self) -> dict[str, str]:
        """What must never show up in another workspace's answers."""
        return {
            "workspace": self.workspace,
            "app": self.app,
            "function": self.fn,
            "token": self.token_name,
            "policy": self.policy,
            "secret": self.secret,
            "secret key": self.secret_key,
            "job": self.job,
            "bundle": self.bundle,
            "env": self.env,
        }


def populate(srv: Server, tmp: Path, tag: str) -> Tenant:
    s = uuid.uuid4().hex[:10]
    workspace = f"ws{tag}{s}"
    admin = create_workspace(srv, workspace)
    t = Tenant(
        workspace=workspace,
        admin=admin,
        app=f"app{tag}{s}",
        fn=f"fn{tag}{s}",
        token_name=f"tok{tag}{s}",
        token="",
        policy=f"pol{tag}{s}",
        secret=f"sec{tag}{s}",
        secret_key=f"KEY{tag.upper()}{s.upper()}",
        job="",
    )
    t.token = create_token(srv, admin, t.token_name, "read")
    ok(
        srv.http("POST", "/v1/policies", token=admin, json={"name": t.policy, "budget_usd": 100}),
        201,
    )
    values = {"values": {t.secret_key: f"value-{s}"}}
    ok(srv.http("PUT", f"/v1/secrets/{t.secret}", token=admin, json=values))
    t.env = built_env(srv, admin, {"TENANT": s})
    source = app_source(t.app, t.fn, secret=t.secret, gpu=True)
    body, t.bundle = bundle_body(srv, admin, tmp, source, t.env)
    ok(srv.http("POST", "/v1/apps", token=admin, json=body), 201)
    run = {"input": {"x": 3}}
    t.job = ok(srv.http("POST", f"/v1/apps/{t.app}/{t.fn}/run", token=admin, json=run), 202)["id"]
    done = finished(srv, admin, t.job)
    assert done["status"] == "COMPLETED" and done["output"] == 9, done
    return t


def state_of(srv: Server, t: Tenant) -> dict[str, Any]:
    """What the tenant itself sees of its objects: compared before and after the other
    workspace has tried everything on them."""
    a = t.admin
    job = ok(srv.http("GET", f"/v1/jobs/{t.job}", token=a))
    app = ok(srv.http("GET", f"/v1/apps/{t.app}", token=a))
    tokens = ok(srv.http("GET", "/v1/tokens", token=a))["tokens"]
    return {
        "app": (app["version"], app["updated_at"], [f["name"] for f in app["functions"]]),
        "job": (job["status"], job["output"]),
        "token": [(x["name"], x["revoked_at"]) for x in tokens if x["name"] == t.token_name],
        "token works": srv.http("GET", "/v1/apps", token=t.token).status_code,
        "policy": ok(srv.http("GET", f"/v1/policies/{t.policy}", token=a))["name"],
        "secret": ok(srv.http("GET", f"/v1/secrets/{t.secret}", token=a)),
        "workspaces": ok(srv.http("GET", "/v1/workspaces"))["workspaces"],
        "bundle": srv.http("HEAD", f"/v1/bundles/{t.bundle}", token=a).status_code,
        "envs": [e["id"] for e in ok(srv.http("GET", "/v1/envs", token=a))["envs"]],
        "lock": srv.http("GET", f"/v1/envs/{t.env}/lock", token=a).text,
    }


# ----------------------------------------------------------------------------- creating workspaces


def test_the_operator_creates_a_workspace_with_an_admin_token(srv: Server) -> None:
    name = unique("search-")
    resp = srv.http("POST", "/v1/workspaces", json={"name": name})
    body = ok(resp, 201)
    assert set(body) == {"workspace", "token_name", "scope", "token"}
    assert body["workspace"] == name
    assert body["token_name"] == "admin" and body["scope"] == "admin"
    token = body["token"]
    assert token.startswith("ember_") and len(token) >= 32
    # the new admin works, in an empty workspace of its own
    assert ok(srv.http("GET", "/v1/apps", token=token)) == {"apps": []}
    tokens = ok(srv.http("GET", "/v1/tokens", token=token))["tokens"]
    assert [(t["name"], t["scope"], t["expires_at"]) for t in tokens] == [("admin", "admin", None)]
    # the operator sees every workspace, the new admin its own
    everyone = [w["name"] for w in ok(srv.http("GET", "/v1/workspaces"))["workspaces"]]
    assert "default" in everyone and name in everyone
    mine = ok(srv.http("GET", "/v1/workspaces", token=token))["workspaces"]
    assert [w["name"] for w in mine] == [name]
    assert isinstance(mine[0]["created_at"], float)


def test_only_the_operator_creates_workspaces(srv: Server) -> None:
    admin = create_workspace(srv, unique("team-"))
    name = unique("sneaky-")
    refused(
        srv.http("POST", "/v1/workspaces", token=admin, json={"name": name}),
        403,
        "forbidden",
        "only an admin of the default workspace",
    )
    # an admin token of the default workspace other than the bootstrap one is an operator too;
    # a lower scope of the default workspace is not
    for scope in ("read", "invoke", "deploy"):
        token = create_token(srv, srv.token, unique(f"{scope}-"), scope)
        refused(
            srv.http("POST", "/v1/workspaces", token=token, json={"name": name}),
            403,
            "forbidden",
            "scope admin",
        )
    other_admin = create_token(srv, srv.token, unique("ops-"), "admin")
    ok(srv.http("POST", "/v1/workspaces", token=other_admin, json={"name": name}), 201)
    refused(srv.http("POST", "/v1/workspaces", token=None, json={"name": "x"}), 401, "unauthorized")


def test_a_workspace_name_is_taken_once(srv: Server) -> None:
    name = unique("dup-")
    create_workspace(srv, name)
    refused(srv.http("POST", "/v1/workspaces", json={"name": name}), 409, "conflict", name)
    refused(srv.http("POST", "/v1/workspaces", json={"name": "default"}), 409, "conflict")
    names = [w["name"] for w in ok(srv.http("GET", "/v1/workspaces"))["workspaces"]]
    assert names.count(name) == 1


@pytest.mark.parametrize(
    "body",
    [
        {"name": ""},
        {"name": "has space"},
        {"name": "x" * 65},
        {"name": "a/b"},
        {"name": "../etc"},
        {"name": "ü"},
        {"name": 3},
        {"name": None},
        {},
        {"name": "ok", "extra": 1},
        {"name": "trailing\n"},
    ],
    ids=repr,
)
def test_a_bad_workspace_name_is_refused(srv: Server, body: dict[str, Any]) -> None:
    refused(srv.http("POST", "/v1/workspaces", json=body), 422, "invalid_request")


def test_a_body_that_is_not_an_object_is_refused(srv: Server) -> None:
    body: Any
    for body in ([], "name", 3):
        refused(srv.http("POST", "/v1/workspaces", json=body), 422, "invalid_request")
    resp = srv.http("POST", "/v1/workspaces", content=b"{not json")
    refused(resp, 400, "invalid_json")


# ----------------------------------------------------------------------------- isolation


BODIES = {
    "POST /v1/apps/{app}/{fn}/run": {"input": {"x": 3}},
    "POST /v1/apps/{app}/{fn}/runsync": {"input": {"x": 3}},
    "PUT /v1/secrets/{name}": {"values": {"INTRUDER_KEY": "intruder-value"}},
}
"""Valid bodies for the operations on one object that take one."""
COUNTS_ONLY = {"/v1/series"}
"""Lists whose answer holds numbers, no names: what they count is compared instead."""


def test_nothing_of_one_workspace_is_seen_or_touched_from_another(
    srv: Server, tmp_path: Path
) -> None:
    """Every /v1 operation of the OpenAPI document, made by workspace A's admin on B's objects:
    on one object (a path parameter) the answer is 404, as if it did not exist; a list shows
    none of B's names; a create with B's names makes A's own object and leaves B's alone."""
    a = create_workspace(srv, unique("wsa"))
    b = populate(srv, tmp_path, "b")
    ids = b.identifiers()
    before = state_of(srv, b)
    # B's secret is named by B's function: B's list shows it in use
    [item] = ok(srv.http("GET", "/v1/secrets", token=b.admin))["secrets"]
    assert item["used_by"] == [f"{b.app}/{b.fn}"] and item["keys"] == [b.secret_key]

    def b_value(path: str, param: str) -> str:
        if param == "app":
            return b.app
        if param == "fn":
            return b.fn
        if param == "job_id":
            return b.job
        if param == "digest":
            return b.bundle
        if param == "env_id":
            return b.env
        kind = path.split("/")[2]
        named = {"tokens": b.token_name, "policies": b.policy, "secrets": b.secret}
        if param == "name" and kind in named:
            return named[kind]
        pytest.fail(f"{path}: no object of B for {{{param}}}; teach this test what it names")

    lists, on_one, creates = [], [], []
    for method, path, op in v1_operations(srv):
        label = f"{method} {path}"
        placeholder = path.format(**{p: "x" for p in path_params(path)})
        if srv.http(method, placeholder, token=None).status_code != 401:
            assert label in PUBLIC, f"{label} answers without a token"
            continue
        if method not in ("GET", "HEAD", "POST", "PUT", "DELETE"):
            pytest.fail(f"{label}: a method this test does not know; teach it")
        if path_params(path):
            on_one.append((method, path, op))
        elif method == "GET":
            lists.append(path)
        else:
            creates.append(label)

    # PUT (create-or-replace) makes A a secret of B's secret's name: the other operations on
    # that name go first. And lists before all: later steps give A objects with B's names.
    on_one.sort(key=lambda op: op[0] == "PUT")
    for path in lists:
        mine = srv.http("GET", path, token=b.admin)
        if path in COUNTS_ONLY:  # names nothing: B's answer counts B's job, A's counts none
            assert ok(mine)["totals"]["calls"] >= 1, f"GET {path}: {mine.text[:500]}"
            assert ok(srv.http("GET", path, token=a))["totals"]["calls"] == 0, path
            continue
        assert any(v in mine.text for v in ids.values()), (
            f"GET {path}: B's own answer shows none of B's objects, so this test proves nothing "
            f"about it; give B something that shows there: {mine.text[:500]}"
        )
        theirs = srv.http("GET", path, token=a)
        assert theirs.status_code == 200, f"GET {path}: {theirs.text}"
        leaked = {what: v for what, v in ids.items() if v in theirs.text}
        assert not leaked, f"GET {path} by A shows B's {leaked}: {theirs.text[:2000]}"

    for method, path, op in on_one:
        label = f"{method} {path}"
        url = path.format(**{p: b_value(path, p) for p in path_params(path)})
        body = None
        if label == "PUT /v1/bundles/{digest}":
            # A cannot overwrite B's code under B's digest: bytes that are not it are refused
            resp = srv.http(method, url, token=a, content=b"PK\x05\x06" + bytes(18))
            assert resp.status_code == 422 and "sha256" in resp.text, resp.text
            assert srv.http("HEAD", url, token=a).status_code == 404
            continue
        if "requestBody" in op:
            assert label in BODIES, f"{label} takes a body: add a valid one to BODIES"
            body = BODIES[label]
        resp = srv.http(method, url, token=a, json=body)
        if label == "PUT /v1/secrets/{name}":
            # create-or-replace: A gets a secret of its own under that name
            assert ok(resp)["keys"] == ["INTRUDER_KEY"]
            mine = ok(srv.http("GET", url, token=a))
            assert mine["keys"] == ["INTRUDER_KEY"] and mine["used_by"] == []
            continue
        assert resp.status_code == 404, f"{label} on B's object by A: {resp.text[:1000]}"
        leaked = {what: v for what, v in ids.items() if v in resp.text and v not in url}
        assert not leaked, f"{label} by A shows B's {leaked}: {resp.text}"

    creates_with_b_names = {
        "POST /v1/workspaces": ({"name": b.workspace}, 403),  # not 409: that would say it exists
        "POST /v1/tokens": ({"name": b.token_name, "scope": "read"}, 201),
        "POST /v1/policies": ({"name": b.policy}, 201),
        "POST /v1/apps": (deploy_body(tmp_path, app_source(b.app, b.fn)), 201),
        # an Env of the same content: A's own record (content-addressed, so the same id)
        "POST /v1/envs": ({"spec": {"variables": {"TENANT": b.env}}}, 202),
        "DELETE /v1/envs": (None, 200),  # prunes A's, never B's
    }
    for label in creates:
        assert label in creates_with_b_names, f"{label}: teach this test what it creates"
        body, status = creates_with_b_names[label]
        resp = srv.http(*label.split(" "), token=a, json=body)
        assert resp.status_code in (status, 200), f"{label} by A with B's names: {resp.text}"
        assert b.workspace not in resp.text and b.job not in resp.text, resp.text
    # A's app is an app of its own: a first version, not B's second
    assert ok(srv.http("GET", f"/v1/apps/{b.app}", token=a))["version"] == 1

    assert state_of(srv, b) == before
    # a build of B's in flight or failed (its spec, its log) is B's alone as well
    spec = {"packages": ["ember-no-such-package-xyz==1.0"], "variables": {"OWNER": b.workspace}}
    failing = ok(srv.http("POST", "/v1/envs", token=b.admin, json={"spec": spec}), 202)["id"]
    url = f"/v1/envs/{failing}"
    wait_for(
        lambda: ok(srv.http("GET", url, token=b.admin, params={"build": 1}))["status"] == "failed",
        timeout=60,
        what="B's build to fail",
    )
    theirs = srv.http("GET", url, token=a, params={"build": 1})
    assert theirs.status_code == 404 and b.workspace not in theirs.text, theirs.text
    # and B's job still streams for B
    stream = srv.http("GET", f"/v1/jobs/{b.job}/stream", token=b.token)
    assert stream.status_code == 200 and "event: done" in stream.text


# ----------------------------------------------------------------------------- scopes

SCOPES = ("read", "invoke", "deploy", "admin")
SCOPE_TABLE: list[tuple[str, str, str]] = [
    # (method, path, the least scope), as docs/security.md has it
    ("GET", "/v1/apps", "read"),
    ("GET", "/v1/apps/{app}", "read"),
    ("GET", "/v1/apps/{app}/{fn}/health", "read"),
    ("GET", "/v1/apps/{app}/{fn}/logs", "read"),
    ("GET", "/v1/jobs/{job_id}", "read"),
    ("GET", "/v1/jobs/{job_id}/stream", "read"),
    ("GET", "/v1/jobs/{job_id}/input", "read"),
    ("GET", "/v1/jobs", "read"),
    ("GET", "/v1/series", "read"),
    ("GET", "/v1/whoami", "read"),
    ("GET", "/v1/usage", "read"),
    ("GET", "/v1/nodes", "read"),
    ("GET", "/v1/workers", "read"),
    ("GET", "/v1/policies", "read"),
    ("GET", "/v1/policies/{name}", "read"),
    ("HEAD", "/v1/bundles/{digest}", "read"),
    ("GET", "/v1/bundles/{digest}", "read"),
    ("GET", "/v1/envs", "read"),
    ("GET", "/v1/envs/{env_id}", "read"),
    ("GET", "/v1/envs/{env_id}/lock", "read"),
    ("PUT", "/v1/bundles/{digest}", "deploy"),
    ("POST", "/v1/envs", "deploy"),
    ("DELETE", "/v1/envs", "deploy"),
    ("POST", "/v1/apps/{app}/{fn}/run", "invoke"),
    ("POST", "/v1/apps/{app}/{fn}/runsync", "invoke"),
    ("POST", "/v1/jobs/{job_id}/cancel", "invoke"),
    ("POST", "/v1/jobs/{job_id}/retry", "invoke"),
    ("POST", "/v1/apps/{app}/{fn}/purge-queue", "invoke"),
    ("POST", "/v1/apps", "deploy"),
    ("GET", "/v1/secrets", "deploy"),
    ("GET", "/v1/secrets/{name}", "deploy"),
    ("POST", "/v1/tokens", "admin"),
    ("GET", "/v1/tokens", "admin"),
    ("DELETE", "/v1/tokens/{name}", "admin"),
    ("POST", "/v1/policies", "admin"),
    ("DELETE", "/v1/policies/{name}", "admin"),
    ("PUT", "/v1/secrets/{name}", "admin"),
    ("DELETE", "/v1/secrets/{name}", "admin"),
    ("GET", "/v1/audit", "admin"),
    ("GET", "/v1/doctor", "admin"),
    ("GET", "/v1/workspaces", "admin"),
]
"""POST /v1/workspaces (the operator only) is tested above; GET /v1/health needs no token."""


def test_each_scope_does_what_the_table_says_and_no_more(srv: Server, tmp_path: Path) -> None:
    documented = {f"{m} {p}" for m, p, _ in SCOPE_TABLE} | {"POST /v1/workspaces"} | PUBLIC
    served = {f"{m} {p}" for m, p, _ in v1_operations(srv)}
    assert served == documented, (
        f"the scope table here (and in docs/security.md) misses {sorted(served - documented)}, "
        f"or names what is gone: {sorted(documented - served)}"
    )
    admin = create_workspace(srv, unique("scopes-"))
    app, fn = unique("app"), unique("fn")
    source = app_source(app, fn, secret=None)
    env_id = built_env(srv, admin, {"SCOPES": app})
    first, digest = bundle_body(srv, admin, tmp_path, source, env_id)
    other = tmp_path / "scopes" / "main.py"  # a second bundle, for PUT
    other.parent.mkdir()
    other.write_text(source)
    zipped = collect(other)
    ok(srv.http("POST", "/v1/apps", token=admin, json=first), 201)
    job = ok(srv.http("POST", f"/v1/apps/{app}/{fn}/run", token=admin, json={"input": {}}), 202)
    finished(srv, admin, job["id"])
    ok(srv.http("POST", "/v1/policies", token=admin, json={"name": "pol"}), 201)
    ok(srv.http("PUT", "/v1/secrets/sec", token=admin, json={"values": {"K": "value"}}))
    tokens = {scope: create_token(srv, admin, f"as-{scope}", scope) for scope in SCOPES}

    def request(method: str, path: str, scope: str) -> httpx.Response:
        # objects that exist for reads; fresh names for what a call creates or deletes
        fresh = f"{scope}-made"
        names = {"policies": "pol", "secrets": "sec"} if method == "GET" else {}
        url = path.format(
            app=app,
            fn=fn,
            job_id=job["id"],
            name=names.get(path.split("/")[2], fresh),
            digest=digest if method != "PUT" else zipped.digest,
            env_id=env_id,
        )
        if f"{method} {path}" == "PUT /v1/bundles/{digest}":
            headers = {"content-type": "application/zip"}
            return srv.http(method, url, token=tokens[scope], content=zipped.data, headers=headers)
        body: Any = {
            "POST /v1/apps/{app}/{fn}/run": {"input": {"x": 2}},
            "POST /v1/apps/{app}/{fn}/runsync": {"input": {"x": 2}},
            "POST /v1/apps": deploy_body(tmp_path, source),
            "POST /v1/tokens": {"name": fresh, "scope": "read"},
            "POST /v1/policies": {"name": fresh},
            "PUT /v1/secrets/{name}": {"values": {"K": "value"}},
            "POST /v1/envs": {"spec": {"variables": {"SCOPES": app}}},
        }.get(f"{method} {path}")
        return srv.http(method, url, token=tokens[scope], json=body)

    for method, path, least in SCOPE_TABLE:
        for scope in SCOPES:
            resp = request(method, path, scope)
            where = f"{method} {path} with a {scope} token: {resp.text[:300]}"
            if SCOPES.index(scope) >= SCOPES.index(least):
                assert resp.status_code not in (401, 403), where
                assert resp.status_code < 500, where
                if method != "DELETE":  # a fresh name to delete is a 404, past the scope check
                    # the job ended COMPLETED: a retry of it is a 409, past the scope check
                    retry = path.endswith("/retry") and resp.status_code == 409
                    assert resp.status_code < 300 or retry, where
            else:
                assert resp.status_code == 403, where
                err = resp.json()["error"]
                assert err["code"] == "forbidden", where
                assert f"needs a token with scope {least} or higher" in err["message"], where
                assert f"has scope {scope}" in err["message"], where


def test_a_revoked_token_is_refused_at_once(srv: Server) -> None:
    admin = create_workspace(srv, unique("revoke-"))
    token = create_token(srv, admin, "ci", "deploy")
    ok(srv.http("GET", "/v1/apps", token=token))
    revoked = ok(srv.http("DELETE", "/v1/tokens/ci", token=admin))
    assert revoked["name"] == "ci" and revoked["revoked_at"] <= time.time()
    refused(srv.http("GET", "/v1/apps", token=token), 401, "unauthorized")
    # it stays listed, revoked, and its name can be given to a new token
    [listed] = [
        t for t in ok(srv.http("GET", "/v1/tokens", token=admin))["tokens"] if t["name"] == "ci"
    ]
    assert listed["revoked_at"] == revoked["revoked_at"]
    refused(srv.http("DELETE", "/v1/tokens/ci", token=admin), 404, "token_not_found")
    again = create_token(srv, admin, "ci", "deploy")
    ok(srv.http("GET", "/v1/apps", token=again))
    refused(srv.http("GET", "/v1/apps", token=token), 401, "unauthorized")


def test_concurrent_creates_of_one_token_name_make_one_token(srv: Server) -> None:
    admin = create_workspace(srv, unique("race-"))
    body = {"name": "racer", "scope": "read"}
    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(lambda _: srv.http("POST", "/v1/tokens", token=admin, json=body), range(8))
        )
    assert sorted(r.status_code for r in answers) == [201] + [409] * 7
    listed = ok(srv.http("GET", "/v1/tokens", token=admin))["tokens"]
    assert [t["name"] for t in listed].count("racer") == 1


def test_an_expired_token_is_refused_with_token_expired(srv: Server) -> None:
    admin = create_workspace(srv, unique("expire-"))
    body = ok(
        srv.http("POST", "/v1/tokens", token=admin, json={"name": "brief", "expires_in": 2}), 201
    )
    assert body["expires_at"] == pytest.approx(body["created_at"] + 2)
    token = body["token"]
    assert srv.http("GET", "/v1/apps", token=token).status_code in (200, 401)  # 2 s is short

    def expired() -> httpx.Response | None:
        resp = srv.http("GET", "/v1/apps", token=token)
        return resp if resp.status_code == 401 else None

    resp = wait_for(expired, timeout=10, interval=0.2, what="the token to expire")
    assert resp is not None and time.time() >= body["expires_at"]
    refused(resp, 401, "token_expired", "brief", "expired at")


# ----------------------------------------------------------------------------- jobs and usage


def test_jobs_and_usage_belong_to_the_workspace_of_the_token(srv: Server, tmp_path: Path) -> None:
    admins = {"c": create_workspace(srv, unique("c-")), "d": create_workspace(srv, unique("d-"))}
    jobs, apps, callers, readers = {}, {}, {}, {}
    for key, admin in admins.items():
        app, fn = unique(f"app{key}"), unique("fn")
        body = deploy_body(tmp_path, app_source(app, fn))
        ok(srv.http("POST", "/v1/apps", token=admin, json=body), 201)
        callers[key] = create_token(srv, admin, "caller", "invoke")
        readers[key] = create_token(srv, admin, "reader", "read")
        run = {"input": {"x": 4}}
        path = f"/v1/apps/{app}/{fn}/runsync"
        done = ok(srv.http("POST", path, token=callers[key], json=run))
        assert done["output"] == 16
        jobs[key], apps[key] = done["id"], app

    # the job made by C's invoke token is C's: any token of C reads it, nobody else finds it
    assert ok(srv.http("GET", f"/v1/jobs/{jobs['c']}", token=readers["c"]))["output"] == 16
    for method, path in (
        ("GET", f"/v1/jobs/{jobs['c']}"),
        ("GET", f"/v1/jobs/{jobs['c']}/stream"),
        ("POST", f"/v1/jobs/{jobs['c']}/cancel"),
    ):
        # D's tokens, and the operator, who acts in `default` like any other admin there
        for other in (callers["d"], admins["d"], srv.token):
            refused(srv.http(method, path, token=other), 404, "job_not_found")

    def usage_apps(token: str) -> set[str]:
        groups = ok(srv.http("GET", "/v1/usage", token=token, params={"group_by": "app"}))
        return {g["key"]["app"] for g in groups["groups"]}

    assert usage_apps(readers["c"]) == {apps["c"]}
    assert usage_apps(readers["d"]) == {apps["d"]}
    assert not usage_apps(srv.token) & set(apps.values())
