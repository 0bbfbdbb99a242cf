"""`ember jobs`: the workspace's jobs, newest first, filtered as `GET /v1/jobs` filters them."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from ember.cli.common import ago, err, money, out, print_json, request, when


def jobs(
    target: Annotated[
        str | None, typer.Argument(help="APP or APP/FUNCTION: only that app's (function's) jobs")
    ] = None,
    status: Annotated[
        str | None,
        typer.Option(
            help="IN_QUEUE, IN_PROGRESS, COMPLETED, FAILED, CANCELLED, TIMED_OUT (QUEUED and "
            "RUNNING too), several separated by commas"
        ),
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="created since: '7d', '12h', '30m' ago, epoch or ISO 8601")
    ] = None,
    id_: Annotated[str | None, typer.Option("--id", help="jobs whose id starts so")] = None,
    limit: Annotated[int, typer.Option(min=1, max=500, help="jobs on this page")] = 50,
    cursor: Annotated[
        str | None, typer.Option(help="the next page: the cursor a previous page printed")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="print the API's JSON: the jobs and next_cursor")
    ] = False,
) -> None:
    """The workspace's jobs, newest first: status, when, how long, what it cost.

    ember jobs hello/square --status FAILED --since 1h
    """
    app, _, fn = (target or "").partition("/")
    params = {
        "app": app or None,
        "function": fn or None,
        "status": status,
        "since": ago(since, "--since"),
        "id": id_,
        "limit": limit,
        "cursor": cursor,
    }
    page = request("GET", "/jobs", params={k: v for k, v in params.items() if v is not None})
    if as_json:
        print_json(page)
        return
    rows: list[dict[str, Any]] = page["jobs"]
    if not rows:
        out.print("no jobs match" if any(params[k] for k in params if k != "limit") else "no jobs")
        return
    table = Table("id", "function", "status", "created", "ms", "USD")
    for r in rows:
        table.add_row(
            r["id"],
            f"{r['app']}/{r['function']}",
            r["status"] + (f" ({escape(r['error_type'])})" if r.get("error_type") else ""),
            when(r["created_at"]),
            "-" if r["total_ms"] is None else f"{r['total_ms']:.1f}",
            "-" if r["cost_usd"] is None else money(r["cost_usd"]),
        )
    out.print(table)
    if page["next_cursor"]:
        err.print(f"more: add --cursor {page['next_cursor']}")
