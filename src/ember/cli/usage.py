"""`ember usage`: what was spent, grouped, as a table, CSV or the API's JSON."""

from __future__ import annotations

import sys
import time
from typing import Annotated, Any

import typer
from rich.table import Table

from ember.cli.common import ago, money, out, print_json, request


def usage(
    by: Annotated[
        str,
        typer.Option(
            "--by", help="group by: app, function, gpu, phase, policy, or a tag name (team)"
        ),
    ] = "app",
    since: Annotated[
        str | None, typer.Option(help="'7d', '12h', '30m' ago, epoch seconds or ISO 8601")
    ] = None,
    until: Annotated[str | None, typer.Option(help="same forms as --since")] = None,
    granularity: Annotated[str | None, typer.Option(help="hour or day: one row per bucket")] = None,
    csv_: Annotated[bool, typer.Option("--csv", help="print CSV instead of a table")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="print the API's JSON: a list of groups")
    ] = False,
) -> None:
    """What was spent, grouped: GPU and CPU seconds, cost, cold starts, and the idle fraction
    (the share of GPU money spent on workers that waited for work)."""
    groups = [
        g
        if g in ("app", "function", "gpu", "phase", "policy") or g.startswith("tag:")
        else f"tag:{g}"
        for g in (x.strip() for x in by.split(","))
        if g
    ]
    params = {
        "group_by": ",".join(groups),
        "since": ago(since, "--since"),
        "until": ago(until, "--until"),
        "granularity": granularity,
    }
    if csv_ and as_json:
        raise typer.BadParameter("use one of --csv and --json", param_hint="--json")
    rows = request("GET", "/usage", params={k: v for k, v in params.items() if v})["groups"]
    if as_json:
        print_json(rows)
        return
    names = [g[4:] if g.startswith("tag:") else g for g in groups]
    columns = [
        "gpu_seconds",
        "cpu_seconds",
        "cost_usd",
        "cold_starts",
        "busy_seconds",
        "idle_seconds",
        "idle_fraction",
    ]
    titles = ["GPU s", "CPU s", "USD", "cold starts", "busy s", "idle s", "idle %"]
    header = (["start"] if granularity else []) + names + (columns if csv_ else titles)

    def cells(row: dict[str, Any]) -> list[str]:
        start = [time.strftime("%Y-%m-%d %H:%M", time.gmtime(row["start"]))] if granularity else []
        keys = [str(row["key"].get(g, "")) or "-" for g in groups]
        return (
            start
            + keys
            + [
                f"{row['gpu_seconds']:.3f}",
                f"{row['cpu_seconds']:.3f}",
                # the server rounds cost to 9 decimals: CSV keeps them all
                f"{row['cost_usd']:.9f}" if csv_ else money(row["cost_usd"]),
                str(row["cold_starts"]),
                f"{row['busy_seconds']:.3f}",
                f"{row['idle_seconds']:.3f}",
                f"{row['idle_fraction']:.1%}" if not csv_ else f"{row['idle_fraction']:.6f}",
            ]
        )

    if csv_:
        import csv

        writer = csv.writer(sys.stdout)
        writer.writerow(header)
        writer.writerows(cells(r) for r in rows)
        return
    if not rows:
        out.print("no usage in that period")
        return
    table = Table(*header)
    for r in rows:
        table.add_row(*cells(r))
    out.print(table)
