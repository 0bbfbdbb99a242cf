"""`ember workspace` and `ember token`: workspaces, and the API tokens that act inside one.

Thin commands over the admin endpoints (docs/security.md). A token is shown only when it is
created, alone on stdout; the server keeps a hash of it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import typer
from rich.markup import escape
from rich.table import Table

from ember.cli.common import duration, err, out, print_json, request, when

Scope = Literal["admin", "deploy", "invoke", "read"]


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
    body = request("POST", "/workspaces", json={"name": name})
    _show_token(
        body,
        f"workspace [bold]{escape(body.get('workspace', name))}[/bold] with an admin token "
        f"named {escape(body.get('token_name', 'admin'))}",
    )


@workspace_app.command("list")
def workspace_list(
    as_json: Annotated[bool, typer.Option("--json", help="print the API's JSON")] = False,
) -> None:
    """List workspaces: all of them for the server operator, your own for everyone else.

    Example:

        ember workspace list

    See docs/security.md.
    """
    items = request("GET", "/workspaces")["workspaces"]
    if as_json:
        print_json(items)
        return
    table = Table("workspace", "created")
    for w in items:
        table.add_row(w["name"], when(w.get("created_at")))
    out.print(table)


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
    body = request(
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
        what += f", expires {when(body['expires_at'])}"
    _show_token(body, what + ")")


@token_app.command("list")
def token_list(
    as_json: Annotated[bool, typer.Option("--json", help="print the API's JSON")] = False,
) -> None:
    """List your workspace's tokens (never their values).

    Example:

        ember token list

    See docs/security.md.
    """
    items = request("GET", "/tokens")["tokens"]
    if as_json:
        print_json(items)
        return
    table = Table("name", "scope", "policy", "created", "expires", "revoked")
    for t in items:
        table.add_row(
            t["name"],
            t["scope"],
            t.get("policy") or "-",
            when(t.get("created_at")),
            when(t.get("expires_at")),
            when(t.get("revoked_at")),
        )
    out.print(table)


@token_app.command("revoke")
def token_revoke(name: Annotated[str, typer.Argument(help="the token's name")]) -> None:
    """Revoke a token: it stops working at once; its name and history stay listed.

    Example:

        ember token revoke ci

    See docs/security.md.
    """
    body = request("DELETE", f"/tokens/{name}")
    out.print(f"revoked token [bold]{escape(body.get('name', name))}[/bold]")
