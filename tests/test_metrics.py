"""`GET /metrics`: scraped from a real server and read back with prometheus-client's parser."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from conftest import Server, free_port, wait_for
from ember.api.metrics import OTHER, capped
from test_workspaces import create_token, create_workspace

SOURCE = """
import ember

app = ember.App("metered", tags={"team": "ml"})


@app.function(idle_timeout=300)
def square(x: int) -> int:
    return x * x


@app.function(idle_timeout=300)
def fail() -> None:
    raise ValueError("no good")
"""

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(srv: Server) -> tuple[Samples, dict[str, str]]:
    """Every sample by (name, labels), and every family's type."""
    resp = srv.http("GET", "/metrics")
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(resp.text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples, types


def one(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_metrics_count_jobs_workers_queues_and_usage(server: Server) -> None:
    server.deploy(SOURCE)
    for x in (1, 2, 3):
        body = server.http("POST", "/v1/apps/metered/square/runsync", json={"input": {"x": x}})
        assert body.json()["status"] == "COMPLETED", body.text
    body = server.http("POST", "/v1/apps/metered/fail/runsync", json={"input": {}})
    assert body.json()["status"] == "FAILED", body.text

    samples, types = scrape(server)
    fn = {"workspace": "default", "app": "metered"}
    assert types["ember_jobs"] == "counter"
    assert one(samples, "ember_jobs_total", **fn, function="square", status="COMPLETED") == 3
    assert one(samples, "ember_jobs_total", **fn, function="fail", status="FAILED") == 1
    assert (
        "ember_jobs_total",
        frozenset({**fn, "function": "square", "status": "FAILED"}.items()),
    ) not in samples
    assert one(samples, "ember_jobs_in_queue", **fn, function="square") == 0
    assert one(samples, "ember_jobs_in_progress", **fn, function="square") == 0
    # Two functions, a worker each, both idle (idle_timeout keeps them up).
    assert one(samples, "ember_workers", **fn, state="IDLE") == 2

    assert types["ember_job_duration_seconds"] == "histogram"
    for term in ("queue", "cold_start", "load", "exec", "post", "total"):
        count = one(samples, "ember_job_duration_seconds_count", term=term)
        assert count == 4, term
        assert one(samples, "ember_job_duration_seconds_bucket", term=term, le="+Inf") == 4
    assert one(samples, "ember_job_duration_seconds_sum", term="total") > 0

    # Usage is read as stored at the last checkpoint (once a second), not flushed by a scrape.
    key = ("ember_cold_starts_total", frozenset({**fn, "function": "square"}.items()))

    def metered() -> tuple[Samples, dict[str, str]] | None:
        found = scrape(server)
        return found if key in found[0] else None

    samples, types = wait_for(metered, timeout=10, what="the usage of the first checkpoint")
    assert types["ember_cost_usd"] == "counter"
    assert one(samples, "ember_cold_starts_total", **fn, function="square") >= 1
    assert one(samples, "ember_cost_usd_total", **fn, function="square") >= 0
    assert ("ember_gpu_seconds_total", frozenset({**fn, "function": "square"}.items())) in samples
    tag = {"workspace": "default", "tag": "team", "value": "ml"}
    assert one(samples, "ember_cost_usd_by_tag_total", **tag) >= 0


def test_metrics_show_each_policys_budget_and_spend(server: Server) -> None:
    for rules in ({"name": "capped", "budget_usd": 25.0}, {"name": "open", "tags": {"t": "x"}}):
        resp = server.http("POST", "/v1/policies", json=rules)
        assert resp.status_code == 201, resp.text
    samples, types = scrape(server)
    assert types["ember_budget_usd"] == types["ember_budget_spent_usd"] == "gauge"
    assert one(samples, "ember_budget_usd", workspace="default", policy="capped") == 25.0
    assert one(samples, "ember_budget_spent_usd", workspace="default", policy="capped") == 0.0
    assert one(samples, "ember_budget_spent_usd", workspace="default", policy="open") == 0.0
    assert (
        "ember_budget_usd",
        frozenset({"workspace": "default", "policy": "open"}.items()),
    ) not in samples


def test_metrics_need_the_operators_admin_token(server: Server) -> None:
    assert server.http("GET", "/metrics", token=None).status_code == 401
    assert server.http("GET", "/metrics", token="not-a-token").status_code == 401
    reader = create_token(server, server.token, "reader", "read")
    assert server.http("GET", "/metrics", token=reader).status_code == 403
    other_admin = create_workspace(server, "elsewhere")
    resp = server.http("GET", "/metrics", token=other_admin)
    assert resp.status_code == 403
    assert "default workspace" in resp.json()["error"]["message"]
    assert server.http("GET", "/metrics").status_code == 200


def test_metrics_port_serves_the_same_text_without_a_token_on_localhost(
    make_server: Callable[..., Server],
) -> None:
    port = free_port()
    srv = make_server("--metrics-port", str(port))
    srv.deploy(SOURCE)
    resp = srv.http("POST", "/v1/apps/metered/square/runsync", json={"input": {"x": 2}})
    assert resp.json()["status"] == "COMPLETED", resp.text
    plain = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30)
    assert plain.status_code == 200
    names = {f.name for f in text_string_to_metric_families(plain.text)}
    assert {"ember_jobs", "ember_workers", "ember_job_duration_seconds"} <= names
    assert 'ember_jobs_total{app="metered",function="square",status="COMPLETED"' in plain.text
    assert httpx.get(f"http://127.0.0.1:{port}/v1/apps", timeout=30).status_code == 404
    assert srv.http("GET", "/metrics", token=None).status_code == 401  # the main port still asks


def test_metrics_stay_out_of_the_openapi_document(server: Server) -> None:
    doc: dict[str, Any] = server.http("GET", "/openapi.json", token=None).json()
    assert "/metrics" not in doc["paths"]


def test_label_sets_are_capped_and_the_rest_folded_into_other() -> None:
    labels = ("app", "status")
    values = {(f"app{i}", "COMPLETED" if i % 2 else "FAILED"): float(i) for i in range(10)}
    shown = dict(capped(values, labels, keep=("status",), cap=3))
    assert {k: v for k, v in shown.items() if k[0] != OTHER} == {
        ("app9", "COMPLETED"): 9.0,
        ("app8", "FAILED"): 8.0,
        ("app7", "COMPLETED"): 7.0,
    }
    assert shown[(OTHER, "COMPLETED")] == 1 + 3 + 5
    assert shown[(OTHER, "FAILED")] == 0 + 2 + 4 + 6
    assert sum(shown.values()) == sum(values.values())
    assert dict(capped(values, labels, cap=3))[(OTHER, OTHER)] == sum(range(7))
