"""The smaller findings of trying ember as an attacker would, against real servers and workers.

Job ids that leak other tenants' traffic, tokens that mint themselves a way out of their expiry or
policy, numbers JSON cannot carry, results and exceptions that cannot be serialised, and names
that would leave the data dir. Each test attacks through the API or from real user code.
"""

from __future__ import annotations

import json
import random
import re
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import Server, result, spawn
from ember.core.names import HANDLE_RE, UnsafePath, is_segment, under
from ember.sdk.deploy import load_apps, manifest


def ok(resp: httpx.Response, status: int = 200) -> Any:
    assert resp.status_code == status, f"{resp.status_code}: {resp.text}"
    return resp.json()


def refused(resp: httpx.Response, status: int, *needles: str) -> dict[str, Any]:
    """The error of a refused request: its status, a JSON error body, each needle in its text."""
    assert resp.status_code == status, f"{resp.status_code}: {resp.text}"
    err: dict[str, Any] = resp.json()["error"]
    assert set(err) >= {"code", "message"}, err
    for needle in needles:
        assert needle in err["message"], (needle, err["message"])
    return err


def token(server: Server, by: str, name: str, **fields: Any) -> httpx.Response:
    return server.http("POST", "/v1/tokens", token=by, json={"name": name, **fields})


# ----------------------------------------------------------------------------- job ids
def _untemper(y: int) -> int:
    """The Mersenne Twister state word behind one 32-bit output (the tempering undone)."""
    y ^= y >> 18
    y ^= (y << 15) & 0xEFC60000
    t = y
    for _ in range(5):
        t = y ^ ((t << 7) & 0x9D2C5680)
    y = t
    t = y
    for _ in range(3):
        t = y ^ (t >> 11)
    return t & 0xFFFFFFFF


def predictor(ids: list[int]) -> random.Random:
    """A generator that continues the one behind 208 consecutive `getrandbits(96)` values:
    each is three 32-bit outputs, least significant first; 624 outputs are the whole state."""
    words = [(v >> (32 * i)) & 0xFFFFFFFF for v in ids for i in range(3)]
    assert len(words) == 624
    clone = random.Random()
    clone.setstate((3, (*[_untemper(w) for w in words], 624), None))
    return clone


APP_IDS = """
import ember

app = ember.App("ids")


@app.function()
def noop() -> None:
    return None
"""


def test_job_ids_are_unpredictable_and_keep_their_shape(server: Server) -> None:
    # the attack works on a seeded generator: 208 ids give away every id after them, so the
    # gaps in one tenant's ids would count every other tenant's jobs
    seeded = random.Random(1234)
    seen = [seeded.getrandbits(96) for _ in range(208)]
    assert predictor(seen).getrandbits(96) == seeded.getrandbits(96)

    server.deploy(APP_IDS)
    ids = [spawn(server, "ids", "noop") for _ in range(209)]
    assert all(re.fullmatch(r"job-[0-9a-f]{24}", i) for i in ids), ids[:3]
    assert len(set(ids)) == len(ids)
    values = [int(i[4:], 16) for i in ids]
    assert predictor(values[:208]).getrandbits(96) != values[208]
    assert result(server, ids[-1])["status"] == "COMPLETED"


# ----------------------------------------------------------------------------- tokens
def test_a_token_cannot_mint_one_that_outlives_it_or_drops_its_policy(server: Server) -> None:
    for name in ("team", "other"):
        ok(server.http("POST", "/v1/policies", json={"name": name, "tags": {"t": name}}), 201)
    brief = ok(token(server, server.token, "brief", scope="admin", expires_in=3600), 201)
    short = brief["token"]

    # no expiry, or a later one: refused, saying how long it may live
    refused(token(server, short, "forever", scope="read"), 403, "expires at", "expires_in")
    err = refused(
        token(server, short, "longer", scope="read", expires_in=7200), 403, "at most", "seconds"
    )
    assert err["code"] == "forbidden"
    limit = int(re.search(r"at most (\d+) seconds", err["message"]).group(1))  # type: ignore[union-attr]
    assert 3500 < limit <= 3600
    child = ok(token(server, short, "shorter", scope="read", expires_in=60), 201)
    assert child["expires_at"] <= brief["expires_at"]
    # an expiring operator cannot make a workspace, whose admin token would never expire
    refused(
        server.http("POST", "/v1/workspaces", token=short, json={"name": "escape"}),
        403,
        "never expires",
    )

    bound = ok(token(server, server.token, "bound", scope="admin", policy="team"), 201)["token"]
    refused(token(server, bound, "free", scope="invoke"), 403, "'team'", "no policy")
    refused(token(server, bound, "elsewhere", scope="invoke", policy="other"), 403, "'other'")
    same = ok(token(server, bound, "same", scope="invoke", policy="team"), 201)
    assert same["policy"] == "team"
    refused(
        server.http("POST", "/v1/workspaces", token=bound, json={"name": "escape"}),
        403,
        "policy 'team'",
    )

    names = [t["name"] for t in ok(server.http("GET", "/v1/tokens"))["tokens"]]
    assert not {"forever", "longer", "free", "elsewhere"} & set(names), names
    assert [w["name"] for w in ok(server.http("GET", "/v1/workspaces"))["workspaces"]] == [
        "default"
    ]
    events = ok(server.http("GET", "/v1/audit"))["events"]
    refusals = [e for e in events if e["action"] in ("token.create", "workspace.create")]
    assert sum(e["outcome"] == "refused" for e in refusals) == 6, refusals


# ----------------------------------------------------------------------------- numbers
APP_NUMBERS = """
import ember

app = ember.App("numbers")


@app.function()
def scale(x: float = 1.5) -> float:
    return x * 2
"""


MARK = 1.5e300
MARK_TEXT = json.dumps(MARK)
"""A number to stand in for one JSON cannot carry, swapped for `1e400` in the encoded text."""


def test_a_deploy_holding_a_non_finite_number_is_a_422(server: Server, tmp_path: Path) -> None:
    path = tmp_path / "numbers.py"
    path.write_text(APP_NUMBERS)
    [app], source = load_apps(path)
    body = manifest(app, path.name, source)
    # what a client may send: bounds, defaults and examples in the parameters' schema
    body["functions"][0]["params"]["schema"]["properties"]["x"].update(
        maximum=MARK, default=MARK, examples=[MARK]
    )
    text = json.dumps(body)
    for where in ("maximum", "default", "examples[0]"):
        for bad in ("1e400", "-1e400"):
            one = json.loads(text)
            prop = one["functions"][0]["params"]["schema"]["properties"]["x"]
            prop.update(maximum=1.0, default=1.0, examples=[1.0])
            if where == "examples[0]":
                prop["examples"] = [MARK]
            else:
                prop[where] = MARK
            resp = server.http(
                "POST",
                "/v1/apps",
                content=json.dumps(one).replace(MARK_TEXT, bad),
                headers={"content-type": "application/json"},
            )
            err = refused(resp, 422, "not a finite number", f"properties.x.{where}")
            assert err["code"] == "invalid_deploy"
    assert ok(server.http("GET", "/v1/apps"))["apps"] == []  # nothing half-written
    resp = server.http(
        "POST",
        "/v1/apps",
        content=text.replace(MARK_TEXT, "1e300"),
        headers={"content-type": "application/json"},
    )
    assert ok(resp, 201)["version"] == 1


def strict(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def test_no_stored_record_makes_a_listing_answer_500(make_server: Callable[..., Server]) -> None:
    server = make_server()
    server.deploy(APP_NUMBERS)
    job = spawn(server, "numbers", "scale", x=1.5)
    assert result(server, job)["output"] == 3.0
    server.stop()

    # records written by an older server, or by hand: numbers JSON cannot carry, a lone surrogate
    with sqlite3.connect(server.data_dir / "ember.db") as db:
        [stored] = db.execute("SELECT functions FROM versions").fetchone()
        functions = json.loads(stored)
        functions[0]["params"]["schema"]["properties"]["x"]["default"] = MARK
        text = json.dumps(functions).replace(MARK_TEXT, "1e400")
        db.execute("UPDATE versions SET functions = ?", (text,))
        db.execute(
            "UPDATE jobs SET output = ?, cost = ? WHERE id = ?",
            ('[Infinity, NaN, -Infinity, "\\ud800"]', '{"usd": Infinity}', job),
        )
    server.start()

    apps = ok(server.http("GET", "/v1/apps"))["apps"]
    [fn] = apps[0]["functions"]
    assert fn["params"]["schema"]["properties"]["x"]["default"] is None
    assert ok(server.http("GET", "/v1/apps/numbers"))["name"] == "numbers"
    body = ok(server.http("GET", f"/v1/jobs/{job}"))
    assert body["output"][:3] == [None, None, None]
    assert body["cost"] == {"usd": None}
    events = server.http("GET", f"/v1/jobs/{job}/stream")
    assert events.status_code == 200, events.text
    data = [ln[6:] for ln in events.text.splitlines() if ln.startswith("data: ")]
    assert [json.loads(d, parse_constant=strict) for d in data][:3] == [None, None, None]
    # and the app still serves
    assert server.function("numbers", "scale").remote(2.0) == 4.0


# ----------------------------------------------------------------------------- results
APP_RESULTS = """
import os

import ember

app = ember.App("results")


class BadStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no message for you")


class BadNotes(Exception):
    @property
    def __notes__(self) -> list[str]:
        raise RuntimeError("no notes for you")


def bad(kind: str):
    if kind == "deep":
        value: list = []
        for _ in range(100_000):
            value = [value]
        return value
    if kind == "str":
        raise BadStr()
    if kind == "notes":
        raise BadNotes("formatting my traceback raises")
    if kind == "set":
        return {1, 2}
    return os.getpid()


@app.function(timeout=300)
def sync(kind: str):
    return bad(kind)


@app.function(timeout=300)
async def coro(kind: str):
    return bad(kind)
"""


@pytest.mark.parametrize("fn", ["sync", "coro"])
def test_a_result_or_exception_that_cannot_be_serialised_fails_at_once(
    server: Server, fn: str
) -> None:
    server.deploy(APP_RESULTS)
    f = server.function("results", fn)
    pid = f.remote("ok")
    expect = {
        "deep": ("TypeError", "nested more than"),
        "set": ("TypeError", "not JSON-serialisable"),
        "str": ("BadStr", "could not be read"),
        "notes": ("BadNotes", "formatting my traceback raises"),
    }
    for kind, (type_, needle) in expect.items():
        start = time.monotonic()
        body = result(server, spawn(server, "results", fn, kind=kind), timeout=60)
        took = time.monotonic() - start
        assert body["status"] == "FAILED", body
        assert body["error"]["type"] == type_, body["error"]
        assert needle in body["error"]["message"], body["error"]
        assert body["error"]["traceback"], body["error"]
        assert took < 30, f"{kind}: held its worker {took:.1f} s (timeout is 300)"
        # the same worker serves the next call
        assert f.remote("ok") == pid


# ----------------------------------------------------------------------------- names
def test_names_are_safe_path_segments(server: Server) -> None:
    for name in (".", ".."):
        assert not HANDLE_RE.fullmatch(name)
        refused(
            server.http("POST", "/v1/workspaces", json={"name": name}),
            422,
            "not '.' or '..'",
        )
        refused(token(server, server.token, name), 422, "not '.' or '..'")
        resp = server.http("PUT", f"/v1/secrets/{name}", json={"values": {"K": "v"}})
        assert resp.status_code in (404, 405, 422), resp.text  # '..' never reaches a name
    for name in ("...", ".hidden", "a..b"):
        assert HANDLE_RE.fullmatch(name)
    assert [w["name"] for w in ok(server.http("GET", "/v1/workspaces"))["workspaces"]] == [
        "default"
    ]
    # every path built from names stays under its root
    root = server.data_dir
    assert under(root, "bundles", "ws", "app", "v1", "app.py") == root / "bundles/ws/app/v1/app.py"
    for parts in ((".",), ("..",), ("ws", ".."), ("a/b",), ("",), ("x\x00",), ("/etc",)):
        with pytest.raises(UnsafePath):
            under(root, *parts)
    assert is_segment("template-ws-app-Unit-v1.log") and not is_segment("..")
