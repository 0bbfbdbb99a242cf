"""Schemathesis over the server's own OpenAPI document: no 5xx, and every answer as documented.

One live `ember server` (module scope) answers every generated request, with the bootstrap
(operator) token as bearer auth, so the admin endpoints are fuzzed too. The checks are
schemathesis' defaults: no server error; a documented status code, content type and body schema;
input that the schema forbids is refused (and allowed input accepted, where the schema can say
what is allowed: see `SEMANTIC`).

Two passes over the document: one with every parameter generated (so mostly unknown apps, jobs
and names: the 404s and 422s), and one over the operations with path parameters, with those
pinned to objects that exist (an app and function, a finished job, a token, a policy and a secret
all named `fuzzed`), so that the success answers of those operations are checked too.

Nothing is excluded: the job stream (server-sent events) is fuzzed as well, its 200 answer is
checked for its content type only (an event stream has no JSON Schema), its 404 like any other.

The cases sent are counted (all, those the schema forbids, those answered 4xx) and the count is
printed at the end of the module; `EMBER_FUZZ_EXAMPLES` (default 20) sets the examples per
operation and pass, and `EMBER_FUZZ_REPORT` names a file to write the count to as JSON
(`bench/durability.py` runs this module longer, that way).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import CheckFunction

from conftest import Server, result, spawn, wait_for

APP = """
import ember

app = ember.App("fuzz")


@app.function()
def square(x: int = 2) -> int:
    return x * x
"""

PINNED = "fuzzed"
"""The name of the token, the policy and the secret that the second pass aims at."""

SEMANTIC = {
    "POST /v1/apps": "a deploy must hold Python source that defines the functions it lists",
    "POST /v1/apps/{app}/{fn}/run": "the input must fit the function's parameters",
    "POST /v1/apps/{app}/{fn}/runsync": "the input must fit the function's parameters",
    "POST /v1/tokens": "a token's policy must exist in the workspace",
    "POST /v1/policies": "a block policy needs a budget; a webhook must be an http(s) URL",
    "PUT /v1/secrets/{name}": "the name in the path is checked like the other names; some "
    "keys are reserved (EMBER_*, PATH, HOME, ...)",
    "GET /v1/usage": "since/until are epoch seconds or ISO 8601; group_by names known fields",
    "GET /v1/audit": "since/until are epoch seconds or ISO 8601",
    "PUT /v1/bundles/{digest}": "the body must be a zip archive whose sha256 is the digest",
    "POST /v1/envs": "packages must be requirements of packages the index has, with wheels",
    "GET /v1/series": "step is at most half the window",
    "GET /v1/jobs": "a cursor is one that a page of the listing gave",
}
"""Operations whose input the server checks for meaning beyond what a JSON Schema can say, so
that some schema-valid requests get a deliberate 422: `positive_data_acceptance` is off for
them (and on for every other operation). All other checks stay on everywhere."""


TRIED: Counter[str] = Counter()
"""Cases sent in this module: `cases`, `negative` (input the schema forbids), `refused_4xx`."""


@pytest.fixture(scope="module", autouse=True)
def _count_cases(request: pytest.FixtureRequest) -> Iterator[None]:
    """Say, once the module is done, how many cases were sent and how many were bad input."""
    TRIED.clear()
    yield
    counts = {k: TRIED[k] for k in ("cases", "negative", "refused_4xx")}
    if report := os.environ.get("EMBER_FUZZ_REPORT"):
        Path(report).write_text(json.dumps(counts))
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is not None and counts["cases"]:
        with capture.global_and_fixture_disabled():
            print(
                f"\nopenapi fuzz: {counts['cases']} requests sent, {counts['negative']} of them "
                f"with input the schema forbids, {counts['refused_4xx']} answered 4xx, none 5xx"
            )


def call(case: schemathesis.Case) -> None:
    """Send one case and check its answer, counting it."""
    TRIED["cases"] += 1
    meta = case.meta
    if meta is not None and (
        meta.generation.mode.is_negative
        or any(c.mode.is_negative for c in meta.components.values())
    ):
        TRIED["negative"] += 1
    response = case.call_and_validate(excluded_checks=excluded(case))
    if 400 <= response.status_code < 500:
        TRIED["refused_4xx"] += 1


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(tmp_path_factory.mktemp("fuzz") / "data").start()
    server.deploy(APP, filename="fuzz_app.py")
    yield server
    server.shutdown(timeout=15)  # fails the module if a worker outlives the server
    log = server.log()
    assert "unhandled error" not in log, f"the server hit an unhandled error:\n{log}"


@pytest.fixture(scope="module")
def job_id(live: Server) -> str:
    """A finished job of `fuzz/square`, for the operations on one job."""
    job = spawn(live, "fuzz", "square", x=3)
    assert result(live, job)["status"] == "COMPLETED"
    return job


@pytest.fixture(scope="module")
def api_schema(live: Server) -> schemathesis.BaseSchema:
    schema = schemathesis.openapi.from_url(live.url + "/openapi.json")
    schema.config.update(
        base_url=live.url,
        headers={"Authorization": f"Bearer {live.token}"},
        request_timeout=30,
    )
    return schema


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request: pytest.FixtureRequest) -> None:
    """schemathesis 4 reads `item._nodeid`, which pytest 9.2 no longer has (it is `nodeid`)."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


def excluded(case: schemathesis.Case) -> list[CheckFunction]:
    checks: list[CheckFunction] = []
    if case.operation.label in SEMANTIC:
        checks.append(schemathesis.checks.positive_data_acceptance)
    return checks


def spare_the_operator(case: schemathesis.Case) -> None:
    """Revoking the bootstrap token would turn every later case into a 401."""
    if case.operation.label == "DELETE /v1/tokens/{name}" and case.path_parameters == {
        "name": "admin"
    }:
        case.path_parameters = {"name": "not-admin"}


def test_405_names_the_allowed_methods(live: Server) -> None:
    resp = live.http("PATCH", "/v1/apps")
    assert resp.status_code == 405
    assert set(resp.headers.get("allow", "").replace(" ", "").split(",")) == {"GET", "POST"}


def test_a_token_policy_that_is_not_a_string_is_refused(live: Server) -> None:
    resp = live.http("POST", "/v1/tokens", json={"name": "p", "scope": "read", "policy": {}})
    assert resp.status_code == 422, resp.text


schema = schemathesis.pytest.from_fixture("api_schema")
EXAMPLES = int(os.environ.get("EMBER_FUZZ_EXAMPLES", "20"))
BOUNDED = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))


@schema.parametrize()
@BOUNDED
def test_the_api_answers_as_documented(case: schemathesis.Case) -> None:
    spare_the_operator(case)
    call(case)


@pytest.fixture(scope="module")
def pinned(live: Server, job_id: str) -> dict[str, str]:
    """Path parameter values that name real objects, the token bound to the policy (so that
    deleting the policy is refused with 409 until the token is revoked)."""
    for method, path, body in (
        ("POST", "/v1/policies", {"name": PINNED, "budget_usd": 100}),
        ("POST", "/v1/tokens", {"name": PINNED, "scope": "read", "policy": PINNED}),
        ("PUT", f"/v1/secrets/{PINNED}", {"values": {"FUZZ_KEY": "fuzz-value"}}),
    ):
        resp = live.http(method, path, json=body)
        assert resp.status_code < 300, resp.text
    env = live.http("POST", "/v1/envs", json={"spec": {"variables": {"FUZZ": "1"}}}).json()
    wait_for(
        lambda: live.http("GET", f"/v1/envs/{env['id']}").status_code == 200,
        timeout=120,
        what="the pinned Env to build",
    )
    return {
        "app": "fuzz",
        "fn": "square",
        "job_id": job_id,
        "name": PINNED,
        "digest": live.http("GET", "/v1/apps/fuzz").json()["bundle"],
        "env_id": env["id"],
    }


@schema.include(path_regex=r"\{").parametrize()
@BOUNDED
def test_the_api_answers_as_documented_about_objects_that_exist(
    case: schemathesis.Case, pinned: dict[str, str]
) -> None:
    unknown = set(case.path_parameters or {}) - set(pinned)
    assert not unknown, f"{case.operation.label}: pin {unknown} to an object in `pinned`"
    case.path_parameters = {k: pinned[k] for k in case.path_parameters or {}}
    call(case)
