"""`ember audit`: the audit trail, who did what to which target and whether it was allowed.

A thin command over the admin endpoint (docs/security.md).
"""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ember.cli.common import ago, out, print_json, request


def audit(
    since: Annotated[
        str | None, typer.Option(help="'7d', '12h', '30m' ago, epoch seconds or ISO 8601")
    ] = None,
    until: Annotated[str | None, typer.Option(help="same forms as --since")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="at most this many events")] = None,
    json_: Annotated[bool, typer.Option("--json", help="print the events as JSON")] = False,
) -> None:
    """The audit trail: who did what to which target, and whether it was allowed.

    Examples:

        ember audit --since 1d

        ember audit --since 2024-06-01T00:00:00Z --until 2024-06-02T00:00:00Z --limit 50

        ember audit --since 7d --json | jq '.[] | select(.outcome != "ok")'

    See docs/security.md.
    """
    params = {
        "since": ago(since, "--since"),
        "until": ago(until, "--until"),
        "limit": limit,
    }
    events = request("GET", "/audit", params={k: v for k, v in params.items() if v})["events"]
    if json_:
        print_json(events)
        return
    if not events:
        out.print("no audit events in that period")
        return
    table = Table("time", "workspace", "actor", "action", "target", "outcome")
    for e in events:
        ts = e.get("ts")
        when = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
            if isinstance(ts, int | float)
            else str(ts)
        )
        outcome = str(e.get("outcome") or "-")
        count = e.get("count") or 1
        table.add_row(
            when,
            escape(str(e.get("workspace") or "-")),
            escape(str(e.get("actor") or "-")),
            escape(str(e.get("action") or "-")),
            escape(str(e.get("target") or "-")),
            (
                escape(outcome)
                if outcome in ("ok", "allowed", "success")
                else f"[red]{escape(outcome)}[/red]"
            )
            + (f" x{count}" if count > 1 else ""),
        )
    out.print(table)
