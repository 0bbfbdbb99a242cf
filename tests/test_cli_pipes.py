"""`ember` with stdout a pipe: tables print whole (no `…`), every table command takes `--json`,
and a tiny cost prints non-zero."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import Server, result, spawn, wait_for
from ember.cli.common import money
from test_cli import ember

APP_NAME = "a-very-long-application-name-that-rich-cuts-at-eighty-columns"
FN_NAME = "an_equally_long_function_name_that_would_not_fit_either"
SOURCE = f"""
import ember

app = ember.App("{APP_NAME}", tags={{"team": "pipes"}})


@app.function()
def {FN_NAME}(x: int) -> int:
    return x * x
"""

PRICES = """
cpu_core_second = 0.00000001
memory_gib_second = 0.0
"""
"""So cheap that a job's cost is far below a millionth of a dollar: the old `.6f` said 0.000000."""


@pytest.fixture
def metered(make_server: Callable[..., Server], tmp_path: Path) -> Server:
    """A server at PRICES with the long-named app deployed and called once, its usage recorded."""
    prices = tmp_path / "prices.toml"
    prices.write_text(PRICES)
    server = make_server("--prices", str(prices))
    server.deploy(SOURCE)
    assert result(server, spawn(server, APP_NAME, FN_NAME, x=3))["output"] == 9

    def costed() -> list[dict[str, Any]] | None:
        resp = server.client.request("GET", "/usage", params={"group_by": "function"})
        assert resp.status_code == 200, resp.text
        groups = resp.json()["groups"]
        return groups if any(g["cost_usd"] > 0 for g in groups) else None

    wait_for(costed, timeout=30, what="the call's usage")
    return server


def piped(server: Server, *args: str) -> str:
    """stdout of `ember ARGS` run with stdout a pipe and no COLUMNS to widen it."""
    proc = ember(server, *args, env={"COLUMNS": ""})
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert "…" not in proc.stdout, proc.stdout
    return proc.stdout


def cell(table: str, column: str) -> str:
    """The one body row's cell under `column` in a Rich table as printed."""
    [header] = [line for line in table.splitlines() if "┃" in line]
    [row] = [line for line in table.splitlines() if "│" in line]
    titles = [t.strip() for t in header.split("┃")]
    return [c.strip() for c in row.split("│")][titles.index(column)]


def as_json(server: Server, *args: str) -> Any:
    return json.loads(piped(server, *args, "--json"))


def test_money_never_rounds_to_zero() -> None:
    assert money(0) == "0" and money(0.0) == "0"
    assert money(12.345) == "12.35" and money(1) == "1.00"
    assert money(0.5) == "0.500" and money(0.000123456) == "0.000123"
    assert money(1.5e-7) == "0.000000150" and money(3e-12) == "0.00000000000300"
    assert money(0.9996) == "1.00"
    for usd in (1e-9, 4.2e-8, 7.77e-5, 0.01, 0.3):
        shown = money(usd)
        assert float(shown) > 0 and math.isclose(float(shown), usd, rel_tol=5e-3), (usd, shown)


def test_tables_print_whole_when_piped(metered: Server) -> None:
    apps = piped(metered, "apps")
    assert APP_NAME in apps and FN_NAME in apps
    usage = piped(metered, "usage", "--by", "app,function")
    assert APP_NAME in usage and FN_NAME in usage
    assert "0.000000 " not in usage  # the tiny cost is shown with its digits
    [group] = as_json(metered, "usage", "--by", "app,function")
    assert group["key"] == {"app": APP_NAME, "function": f"{APP_NAME}/{FN_NAME}"}
    assert 0 < group["cost_usd"] < 1e-6
    shown = float(cell(usage, "USD"))  # the worker's idle time keeps adding to the cost
    assert 0 < shown <= group["cost_usd"] * 1.01, (shown, group)
    assert piped(metered, "endpoints").count(FN_NAME) >= 1


def test_every_table_command_has_json(metered: Server) -> None:
    ok = ember(metered, "policy", "create", "p" * 64, "--budget", "5USD/day", env={"COLUMNS": ""})
    assert ok.returncode == 0, ok.stderr
    ok = ember(metered, "secret", "set", "s" * 64, "KEY=value", env={"COLUMNS": ""})
    assert ok.returncode == 0, ok.stderr

    [app] = as_json(metered, "apps")
    assert app["name"] == APP_NAME and {"version", "functions", "tags"} <= app.keys()
    [group] = as_json(metered, "usage")
    assert {"key", "gpu_seconds", "cpu_seconds", "cost_usd", "idle_fraction"} <= group.keys()
    [policy] = as_json(metered, "policy", "list")
    assert policy["name"] == "p" * 64 and policy["budget_usd"] == 5
    assert "p" * 64 in piped(metered, "policy", "list")
    [secret] = as_json(metered, "secret", "list")
    assert secret["name"] == "s" * 64 and secret["keys"] == ["KEY"] and "value" not in str(secret)
    assert "s" * 64 in piped(metered, "secret", "list")
    workspaces = as_json(metered, "workspace", "list")
    assert workspaces and all("name" in w for w in workspaces)
    tokens = as_json(metered, "token", "list")
    assert isinstance(tokens, list) and all({"name", "scope"} <= t.keys() for t in tokens)
    events = as_json(metered, "audit")
    assert isinstance(events, list) and events
    [endpoint] = as_json(metered, "endpoints")
    assert endpoint["app"] == APP_NAME and endpoint["function"] == FN_NAME
    assert isinstance(as_json(metered, "env", "list"), list)

    both = ember(metered, "usage", "--csv", "--json")
    assert both.returncode != 0 and "--json" in both.stderr


def test_csv_keeps_every_digit_of_cost(metered: Server) -> None:
    proc = ember(metered, "usage", "--csv")
    assert proc.returncode == 0, proc.stderr
    header, row = proc.stdout.strip().splitlines()
    cost = row.split(",")[header.split(",").index("cost_usd")]
    assert float(cost) > 0, cost


def test_jobs_lists_filters_and_pages(metered: Server) -> None:
    more = [spawn(metered, APP_NAME, FN_NAME, x=x) for x in range(3)]
    for job in more:
        result(metered, job)
    table = piped(metered, "jobs", f"{APP_NAME}/{FN_NAME}")
    assert all(job in table for job in more) and "COMPLETED" in table
    page = as_json(metered, "jobs", APP_NAME, "--limit", "2")
    assert [j["id"] for j in page["jobs"]] == more[:0:-1]  # newest first
    rest = as_json(metered, "jobs", APP_NAME, "--limit", "2", "--cursor", page["next_cursor"])
    assert rest["jobs"][0]["id"] == more[0] and len(rest["jobs"]) == 2  # and the first call
    assert rest["next_cursor"] is None
    assert as_json(metered, "jobs", "--status", "FAILED")["jobs"] == []
    assert piped(metered, "jobs", "--id", more[1][:12]).count(more[1]) == 1
    bad = ember(metered, "jobs", "--status", "DONE")
    assert bad.returncode != 0 and "status" in bad.stderr
