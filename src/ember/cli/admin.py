"""`ember workspace|token|policy|secret|audit|doctor`: who may call what, spend how much, read which
secret, and what was done. Thin commands over the admin endpoints (docs/security.md).

Kept apart from `main.py` (which only registers these) and importing nothing from it: run as
`python -m ember.cli.main`, main is `__main__`, and importing it back would load it twice.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
import time
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ember import config
from ember.errors import EmberError

out = Console()
err = Console(stderr=True)

Scope = Literal["admin", "deploy", "invoke", "read"]
Action = Literal["alert", "block"]

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


# ----------------------------------------------------------------------------- helpers


def duration(value: str, option: str | None = None) -> float:
    """'90s', '15m', '12h', '30d', '2w' or plain seconds -> seconds (> 0); `option` names the
    option in the error."""
    text = value.strip().lower()
    number, unit = (text[:-1], text[-1]) if text[-1:] in UNITS else (text, "s")
    try:
        seconds = float(number) * UNITS[unit]
    except ValueError:
        seconds = -1.0
    if not seconds > 0 or seconds == float("inf"):
        raise typer.BadParameter(
            f"{value!r} is not a duration: a number with s, m, h, d or w, e.g. 30d or 12h",
            param_hint=option,
        )
    return seconds


def ago(value: str | None, option: str | None = None) -> str | None:
    """'7d', '12h', '30m' ago -> epoch seconds; epoch seconds or ISO 8601 go to the server as given
    (the same forms as `ember usage --since`)."""
    if not value:
        return None
    text = value.strip()
    if text[-1:].lower() in UNITS and text[:-1].replace(".", "", 1).isdigit():
        return str(time.time() - duration(text, option))
    return text


def _client() -> Any:
    from ember.sdk.client import Client

    return Client()


def _fail(exc: Exception) -> NoReturn:
    # escaped: messages quote user text that is not markup; the same line as main.py's errors.
    # A 402 budget_exceeded message already names the budget, the spend and the reset time.
    err.print(f"[red]error:[/red] {escape(str(exc))}")
    raise typer.Exit(1)


def _request(method: str, path: str, **kw: Any) -> Any:
    """The response body of one API call; a server or connection error ends the command."""
    try:
        resp = _client().request(method, path, **kw)
    except EmberError as exc:
        _fail(exc)
    return resp.json() if resp.content else {}


def _when(value: Any) -> str:
    """Epoch seconds -> local 'YYYY-MM-DD HH:MM'; a string (ISO 8601) as given; None -> '-'."""
    if value is None or value == "":
        return "-"
    if isinstance(value, int | float):
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(value))
    return str(value)


def _show_token(body: dict[str, Any], what: str) -> None:
    """The token alone on stdout (so `$(ember token create ...)` captures it), the rest on stderr."""
    token = body["token"]
    out.print(token, markup=False, highlight=False, soft_wrap=True)
    err.print(f"[green]created[/green] {what}")
    err.print(
        "[yellow]this token is shown only now[/yellow]: the server keeps a hash of it, so store it "
        "somewhere safe (a password manager, your CI's secret store)"
    )
    err.print("use it:")
    err.print(f"  export EMBER_TOKEN={token}", markup=False, highlight=False, soft_wrap=True)


def _pairs(items: list[str], what: str) -> dict[str, str]:
    """['team=search', ...] -> {'team': 'search'}; the error names the item's position, not its
    text (a secret's value must never be echoed)."""
    result: dict[str, str] = {}
    for i, item in enumerate(items, 1):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise typer.BadParameter(f"{what} number {i} is not KEY=VALUE")
        result[key] = value
    return result


# ----------------------------------------------------------------------------- workspace

workspace_app = typer.Typer(
    name="workspace",
    help="Workspaces: separate apps, tokens, policies, secrets and audit trails on one server.\n\n"
    "Only an admin token of the `default` workspace (the server operator's) creates them.",
    no_args_is_help=True,
)


@workspace_app.command("create")
def workspace_create(
    name: Annotated[str, typer.Argument(help="the new workspace's name, e.g. search")],
) -> None:
    """Create a workspace and print its first admin token (shown only this once).

    Example:

        ember workspace create search

        export EMBER_TOKEN=ember_...   # now every command acts inside `search`

    See docs/security.md.
    """
    body = _request("POST", "/workspaces", json={"name": name})
    _show_token(
        body,
        f"workspace [bold]{escape(body.get('workspace', name))}[/bold] with an admin token "
        f"named {escape(body.get('token_name', 'admin'))}",
    )


@workspace_app.command("list")
def workspace_list() -> None:
    """List workspaces: all of them for the server operator, your own for everyone else.

    Example:

        ember workspace list

    See docs/security.md.
    """
    items = _request("GET", "/workspaces")["workspaces"]
    table = Table("workspace", "created")
    for w in items:
        table.add_row(w["name"], _when(w.get("created_at")))
    out.print(table)


# ----------------------------------------------------------------------------- token

token_app = typer.Typer(
    name="token",
    help="API tokens of your workspace: each has a scope (read < invoke < deploy < admin), "
    "may be bound to a policy, may expire, and is shown only once.",
    no_args_is_help=True,
)


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Argument(help="a name to tell it by, e.g. ci or search-frontend")],
    scope: Annotated[
        Scope,
        typer.Option(
            help="read: GET only; invoke: + call and cancel; deploy: + deploy, list secrets; "
            "admin: everything"
        ),
    ],
    policy: Annotated[
        str | None,
        typer.Option(
            help="bind it to this policy: its calls count against the policy's budget and limits, "
            "and carry its tags"
        ),
    ] = None,
    expires: Annotated[
        str | None,
        typer.Option(help="lifetime: 90s, 15m, 12h, 30d, 2w (no expiry when left out)"),
    ] = None,
) -> None:
    """Create a token and print it (shown only this once; the server stores a hash).

    The token alone goes to stdout, so `$(...)` captures it; how to use it goes to stderr.

    Examples:

        ember token create ci --scope deploy --expires 30d

        ember token create search-frontend --scope invoke --policy search

        TOKEN=$(ember token create bot --scope read)

    See docs/security.md.
    """
    expires_in = duration(expires, "--expires") if expires else None
    body = _request(
        "POST",
        "/tokens",
        json={
            "name": name,
            "scope": scope,
            "policy": policy,
            "expires_in": int(expires_in) if expires_in is not None else None,
        },
    )
    what = f"token [bold]{escape(body.get('name', name))}[/bold] (scope {body.get('scope', scope)}"
    if body.get("policy"):
        what += f", policy {escape(body['policy'])}"
    if body.get("expires_at") is not None:
        what += f", expires {_when(body['expires_at'])}"
    _show_token(body, what + ")")


@token_app.command("list")
def token_list() -> None:
    """List your workspace's tokens (never their values).

    Example:

        ember token list

    See docs/security.md.
    """
    items = _request("GET", "/tokens")["tokens"]
    table = Table("name", "scope", "policy", "created", "expires", "revoked")
    for t in items:
        table.add_row(
            t["name"],
            t["scope"],
            t.get("policy") or "-",
            _when(t.get("created_at")),
            _when(t.get("expires_at")),
            _when(t.get("revoked_at")),
        )
    out.print(table)


@token_app.command("revoke")
def token_revoke(name: Annotated[str, typer.Argument(help="the token's name")]) -> None:
    """Revoke a token: it stops working at once; its name and history stay listed.

    Example:

        ember token revoke ci

    See docs/security.md.
    """
    body = _request("DELETE", f"/tokens/{name}")
    out.print(f"revoked token [bold]{escape(body.get('name', name))}[/bold]")


# ----------------------------------------------------------------------------- policy

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
    body = _request(
        "POST",
        "/policies",
        json={
            "name": name,
            "tags": _pairs(tag or [], "--tag"),
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
    head = f"{float(spent):.2f} / " if spent is not None else ""
    return f"{head}{float(p['budget_usd']):.2f} USD per {p.get('period') or 'month'}"


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
        rows.append(("period start", _when(p["period_start"])))
    if "reset_at" in p:
        rows.append(("resets", _when(p["reset_at"])))
    if "blocked" in p:
        rows.append(("blocked", "[red]yes[/red]" if p["blocked"] else "no"))
    for key, value in rows:
        out.print(f"  {key + ':':<14}{value if key == 'blocked' else escape(str(value))}")


@policy_app.command("list")
def policy_list() -> None:
    """List policies with what each has spent this period, when it resets, and whether it blocks.

    Example:

        ember policy list

    See docs/security.md.
    """
    items = _request("GET", "/policies")["policies"]
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
            _when(p.get("reset_at")) if p.get("budget_usd") is not None else "-",
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
    body = _request("GET", f"/policies/{name}")
    out.print(f"policy [bold]{escape(body.get('name', name))}[/bold]")
    _print_policy(body)


@policy_app.command("delete")
def policy_delete(name: Annotated[str, typer.Argument(help="the policy's name")]) -> None:
    """Delete a policy.

    Example:

        ember policy delete search

    See docs/security.md.
    """
    _request("DELETE", f"/policies/{name}")
    out.print(f"deleted policy [bold]{escape(name)}[/bold]")


# ----------------------------------------------------------------------------- secret

secret_app = typer.Typer(
    name="secret",
    help="Secrets: named sets of KEY=VALUE, encrypted at rest, put into the environment of the "
    "workers of functions that name them (`@app.function(secrets=['hf'])`), redacted from logs.",
    no_args_is_help=True,
)


@secret_app.command("set")
def secret_set(
    name: Annotated[str, typer.Argument(help="the secret's name, e.g. hf")],
    pairs: Annotated[
        list[str] | None,
        typer.Argument(help="KEY=VALUE pairs (they win over the same keys from --from-dotenv)"),
    ] = None,
    from_dotenv: Annotated[
        Path | None,
        typer.Option(
            help="read KEY=VALUE lines from a .env file (keeps values out of shell history)"
        ),
    ] = None,
) -> None:
    """Create or replace a secret. Values are never printed, only the key names.

    Examples:

        ember secret set hf --from-dotenv .env

        ember secret set db PGUSER=search PGPASSWORD="$PGPASSWORD"

    Then name it in code, @app.function(secrets=["hf"]); workers started after a change see the
    new values. See docs/security.md.
    """
    from ember.core.secrets import MIN_REDACT_LEN, parse_dotenv, too_short

    values: dict[str, str] = {}
    if from_dotenv is not None:
        try:
            text = from_dotenv.read_text()
        except OSError as exc:
            raise typer.BadParameter(
                f"cannot read {from_dotenv}: {exc.strerror}", param_hint="--from-dotenv"
            ) from None
        try:
            values.update(parse_dotenv(text))
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--from-dotenv") from None
    values.update(_pairs(pairs or [], "argument"))
    if not values:
        raise typer.BadParameter("give KEY=VALUE pairs, --from-dotenv FILE, or both")
    for key in too_short(values):
        err.print(
            f"[yellow]warning:[/yellow] the value of {escape(key)} is shorter than "
            f"{MIN_REDACT_LEN} characters: it cannot be redacted reliably from logs and outputs"
        )
    body = _request("PUT", f"/secrets/{name}", json={"values": values})
    keys = body.get("keys") or sorted(values)
    out.print(
        f"[green]set[/green] secret [bold]{escape(body.get('name', name))}[/bold]: "
        + escape(", ".join(keys))
    )


@secret_app.command("list")
def secret_list() -> None:
    """List secrets: names, key names and the functions that use them (values never leave the
    server).

    Example:

        ember secret list

    See docs/security.md.
    """
    items = _request("GET", "/secrets")["secrets"]
    if not items:
        out.print("no secrets yet: `ember secret set NAME KEY=VALUE`")
        return
    table = Table("secret", "keys", "used by", "updated")
    for s in items:
        table.add_row(
            escape(s["name"]),
            escape(", ".join(s.get("keys") or [])),
            escape(", ".join(s.get("used_by") or [])) or "-",
            _when(s.get("updated_at") or s.get("created_at")),
        )
    out.print(table)


@secret_app.command("delete")
def secret_delete(name: Annotated[str, typer.Argument(help="the secret's name")]) -> None:
    """Delete a secret. Workers already running keep the environment they started with.

    Example:

        ember secret delete hf

    See docs/security.md.
    """
    _request("DELETE", f"/secrets/{name}")
    out.print(f"deleted secret [bold]{escape(name)}[/bold]")


# ----------------------------------------------------------------------------- audit, doctor


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
    events = _request("GET", "/audit", params={k: v for k, v in params.items() if v})["events"]
    if json_:
        out.print_json(json.dumps(events))
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
        table.add_row(
            when,
            escape(str(e.get("workspace") or "-")),
            escape(str(e.get("actor") or "-")),
            escape(str(e.get("action") or "-")),
            escape(str(e.get("target") or "-")),
            escape(outcome)
            if outcome in ("ok", "allowed", "success")
            else f"[red]{escape(outcome)}[/red]",
        )
    out.print(table)


_SEVERITY_STYLE = {"high": "red", "medium": "yellow", "low": "cyan"}
_RANK = {"high": 0, "medium": 1, "low": 2}


def token_file_findings() -> list[dict[str, str]]:
    """Client side: the token file this client reads (EMBER_TOKEN_FILE, or the data dir's token
    file when EMBER_TOKEN is unset) must be open to its owner only, as the server's own check
    wants of the files it guards (a client may read a copy on another machine)."""
    if os.environ.get("EMBER_TOKEN"):
        return []
    named = os.environ.get("EMBER_TOKEN_FILE")
    path = Path(named).expanduser() if named else config.data_dir() / config.TOKEN_FILE
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return []
    if not mode & 0o077:
        return []
    return [
        {
            "code": "client_token_file_permissions",
            "severity": "high",
            "message": f"token file {path} (read by this client) has mode {mode:04o}, open to "
            "group or other users: any local user can read the token and act with its scope",
            "fix": f"chmod 600 {shlex.quote(str(path))}",
        }
    ]


def _print_finding(f: dict[str, Any]) -> None:
    severity = str(f.get("severity") or "info")
    style = _SEVERITY_STYLE.get(severity.lower(), "cyan")
    out.print(f"[{style}]{escape(severity):<6}[/{style}] {escape(str(f.get('message', '')))}")
    if f.get("fix"):
        out.print(f"       [dim]fix:[/dim] {escape(str(f['fix']))}")


def doctor() -> None:
    """Check the server (and the token file this client reads) for risky settings: each finding
    with its severity, why it is risky and the fix. Exits 1 when any is high-severity, so it can
    gate a script. Needs an admin token.

    Example:

        ember doctor && ember deploy app.py

    See docs/security.md.
    """
    try:
        findings = list(_client().request("GET", "/doctor").json()["findings"])
    except EmberError as exc:
        for f in token_file_findings():  # still worth knowing when the server cannot answer
            _print_finding(f)
        _fail(exc)
    for f in token_file_findings():
        # the server reports its own token file; the same file read here is reported once
        if not any(f["fix"] == g.get("fix") for g in findings):
            findings.append(f)
    findings.sort(key=lambda f: _RANK.get(str(f.get("severity", "")).lower(), len(_RANK)))
    for f in findings:
        _print_finding(f)
    if not findings:
        out.print("[green]no risky settings found[/green]")
    if any(str(f.get("severity", "")).lower() == "high" for f in findings):
        raise typer.Exit(1)


PANEL = "Access, budgets, secrets"


def register(app: typer.Typer) -> None:
    """Add these commands to the `ember` app, in a help panel of their own."""
    for sub in (workspace_app, token_app, policy_app, secret_app):
        app.add_typer(sub, rich_help_panel=PANEL)
    app.command(rich_help_panel=PANEL)(audit)
    app.command(rich_help_panel=PANEL)(doctor)
