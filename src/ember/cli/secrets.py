"""`ember secret`: named sets of KEY=VALUE, encrypted at rest, put into the environment of the
workers of the functions that name them. Values are never printed, only the key names.

Thin commands over the admin endpoints (docs/security.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from ember.cli.common import err, out, parse_pairs, print_json, request, when

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
    values.update(parse_pairs(pairs or [], "argument"))
    if not values:
        raise typer.BadParameter("give KEY=VALUE pairs, --from-dotenv FILE, or both")
    for key in too_short(values):
        err.print(
            f"[yellow]warning:[/yellow] the value of {escape(key)} is shorter than "
            f"{MIN_REDACT_LEN} characters: it cannot be redacted reliably from logs and outputs"
        )
    body = request("PUT", f"/secrets/{name}", json={"values": values})
    keys = body.get("keys") or sorted(values)
    out.print(
        f"[green]set[/green] secret [bold]{escape(body.get('name', name))}[/bold]: "
        + escape(", ".join(keys))
    )


@secret_app.command("list")
def secret_list(
    as_json: Annotated[bool, typer.Option("--json", help="print the API's JSON")] = False,
) -> None:
    """List secrets: names, key names and the functions that use them (values never leave the
    server).

    Example:

        ember secret list

    See docs/security.md.
    """
    items = request("GET", "/secrets")["secrets"]
    if as_json:
        print_json(items)
        return
    if not items:
        out.print("no secrets yet: `ember secret set NAME KEY=VALUE`")
        return
    table = Table("secret", "keys", "used by", "updated")
    for s in items:
        table.add_row(
            escape(s["name"]),
            escape(", ".join(s.get("keys") or [])),
            escape(", ".join(s.get("used_by") or [])) or "-",
            when(s.get("updated_at") or s.get("created_at")),
        )
    out.print(table)


@secret_app.command("delete")
def secret_delete(name: Annotated[str, typer.Argument(help="the secret's name")]) -> None:
    """Delete a secret. Workers already running keep the environment they started with.

    Example:

        ember secret delete hf

    See docs/security.md.
    """
    request("DELETE", f"/secrets/{name}")
    out.print(f"deleted secret [bold]{escape(name)}[/bold]")
