"""`ember policy`: usage policies, i.e. a budget per period (alert or block when spent), a cap on
GPUs, the GPU types allowed, and tags stamped on the usage of the tokens bound to them.

Thin commands over the admin endpoints (docs/security.md).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import typer
from rich.markup import escape
from rich.table import Table

from ember.cli.common import money, out, parse_pairs, print_json, request, when

Action = Literal["alert", "block"]


policy_app = typer.Typer(
    name="policy",
    help="Usage policies: a budget per day, week or month (alert or block when spent), a cap on "
    "GPUs, the GPU types allowed, and tags stamped on the usage of the tokens bound to them.",
    no_args_is_help=True,
)


@policy_app.command("create")
def policy_create(
    name: Annotated[str, typer.Argument(help="the policy's name, e.g. search")],
    tag: Annotated[
        list[str] | None,
        typer.Option(help="KEY=VALUE stamped on the jobs and usage of its tokens; repeat it"),
    ] = None,
    budget: Annotated[
        str | None,
        typer.Option(help="AMOUNT USD per day, week or month, e.g. 50USD/month or 5USD/day"),
    ] = None,
    action: Annotated[
        Action,
        typer.Option(
            help="when the budget is spent: alert (webhook and log line) or block (new calls "
            "get HTTP 402 until the period resets)"
        ),
    ] = "alert",
    max_gpus: Annotated[
        int | None, typer.Option(help="at most this many GPUs held at once by its calls")
    ] = None,
    allowed_gpus: Annotated[
        str | None, typer.Option(help="comma-separated GPU types its calls may use, e.g. L4,A10G")
    ] = None,
    webhook: Annotated[
        str | None, typer.Option(help="URL that gets a JSON POST when the budget is reached")
    ] = None,
) -> None:
    """Create a policy; bind tokens to it with `ember token create --policy NAME`.

    Examples:

        ember policy create search --tag team=search --budget 50USD/month --action block

        ember policy create research --max-gpus 4 --allowed-gpus L4,A10G --budget 200USD/week --webhook https://hooks.example.com/ember

        ember token create search-frontend --scope invoke --policy search

    See docs/security.md.
    """
    from ember.core.budgets import parse_budget

    budget_usd, period = None, "month"
    if budget:
        try:
            budget_usd, period = parse_budget(budget)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--budget") from None
    if max_gpus is not None and max_gpus < 0:
        raise typer.BadParameter("must be 0 or more", param_hint="--max-gpus")
    gpus = [g.strip() for g in allowed_gpus.split(",") if g.strip()] if allowed_gpus else None
    if allowed_gpus is not None and not gpus:
        raise typer.BadParameter("name at least one GPU type", param_hint="--allowed-gpus")
    body = request(
        "POST",
        "/policies",
        json={
            "name": name,
            "tags": parse_pairs(tag or [], "--tag"),
            "budget_usd": budget_usd,
            "period": period,
            "action": action,
            "max_gpus": max_gpus,
            "allowed_gpus": gpus,
            "webhook": webhook,
        },
    )
    out.print(f"[green]created[/green] policy [bold]{escape(body.get('name', name))}[/bold]")
    _print_policy(body)
    out.print(f"bind a token to it: ember token create NAME --scope invoke --policy {escape(name)}")


def _budget_cell(p: dict[str, Any]) -> str:
    if p.get("budget_usd") is None:
        return "-"
    spent = p.get("spent_usd")
    head = f"{money(spent)} / " if spent is not None else ""
    return f"{head}{money(p['budget_usd'])} USD per {p.get('period') or 'month'}"


def _limits_cell(p: dict[str, Any]) -> str:
    parts = []
    if p.get("max_gpus") is not None:
        held = f" ({p['gpus_held']} held)" if p.get("gpus_held") is not None else ""
        parts.append(f"max {p['max_gpus']} GPUs{held}")
    if p.get("allowed_gpus"):
        parts.append("only " + ",".join(p["allowed_gpus"]))
    return ", ".join(parts) or "-"


def _tags_cell(p: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in (p.get("tags") or {}).items()) or "-"


def _print_policy(p: dict[str, Any]) -> None:
    rows = [
        ("tags", _tags_cell(p)),
        ("budget", _budget_cell(p)),
        ("action", p.get("action") or "-"),
        ("gpus", _limits_cell(p)),
        ("webhook", p.get("webhook") or "-"),
    ]
    if "period_start" in p:
        rows.append(("period start", when(p["period_start"])))
    if "reset_at" in p:
        rows.append(("resets", when(p["reset_at"])))
    if "blocked" in p:
        rows.append(("blocked", "[red]yes[/red]" if p["blocked"] else "no"))
    for key, value in rows:
        out.print(f"  {key + ':':<14}{value if key == 'blocked' else escape(str(value))}")


@policy_app.command("list")
def policy_list(
    as_json: Annotated[bool, typer.Option("--json", help="print the API's JSON")] = False,
) -> None:
    """List policies with what each has spent this period, when it resets, and whether it blocks.

    Example:

        ember policy list

        ember policy list --json

    See docs/security.md.
    """
    items = request("GET", "/policies")["policies"]
    if as_json:
        print_json(items)
        return
    if not items:
        out.print("no policies yet: `ember policy create NAME --budget 50USD/month`")
        return
    table = Table("policy", "tags", "spent / budget", "action", "resets", "blocked", "gpus")
    for p in items:
        table.add_row(
            escape(p["name"]),
            escape(_tags_cell(p)),
            _budget_cell(p),
            p.get("action") or "-",
            when(p.get("reset_at")) if p.get("budget_usd") is not None else "-",
            "[red]yes[/red]" if p.get("blocked") else "no",
            escape(_limits_cell(p)),
        )
    out.print(table)


@policy_app.command("show")
def policy_show(name: Annotated[str, typer.Argument(help="the policy's name")]) -> None:
    """Show one policy: tags, budget and spend, action, GPU limits, webhook.

    Example:

        ember policy show search

    See docs/security.md.
    """
    body = request("GET", f"/policies/{name}")
    out.print(f"policy [bold]{escape(body.get('name', name))}[/bold]")
    _print_policy(body)


@policy_app.command("delete")
def policy_delete(name: Annotated[str, typer.Argument(help="the policy's name")]) -> None:
    """Delete a policy.

    Example:

        ember policy delete search

    See docs/security.md.
    """
    request("DELETE", f"/policies/{name}")
    out.print(f"deleted policy [bold]{escape(name)}[/bold]")
