"""`ember env`: the Python environments built on the server, their locks, and pruning them.

Thin commands over /v1/envs (docs/environments.md). Deploys build Envs; these commands show
what was built, export a lock to rebuild it exactly, and remove what no deployed version uses.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from ember.cli.common import api_client, fail, out, print_json, request, when
from ember.envs.bundle import human
from ember.errors import EmberError

env_app = typer.Typer(
    name="env",
    help="Environments: the Python environments functions run in (`ember.Env`), built at "
    "deploy with uv and locked. List them, show one with its lock, export a lock to rebuild it "
    "exactly (`ember.Env.from_lock(path)`), prune those no deployed version uses.",
    no_args_is_help=True,
)


def _base(view: dict[str, Any]) -> str:
    spec = view.get("spec") or {}
    base = spec.get("base", "standard")
    if spec.get("python"):
        base += f" (python {spec['python']})"
    if spec.get("lock"):
        base += ", from a lock"
    return base


@env_app.command("list")
def env_list(
    as_json: Annotated[bool, typer.Option("--json", help="print the API's JSON")] = False,
) -> None:
    """The workspace's built Envs: base, packages asked for, size, and who uses each."""
    envs = request("GET", "/envs")["envs"]
    if as_json:
        print_json(envs)
        return
    if not envs:
        out.print("no Envs built yet: name one in code, e.g. @app.function(env=ember.Env.ai())")
        return
    table = Table("ID", "BASE", "ASKED FOR", "PACKAGES", "OWN DISK", "BUILT", "USED BY")
    for e in envs:
        asked = ", ".join(e["spec"].get("packages") or []) or "-"
        table.add_row(
            e["id"],
            _base(e),
            escape(asked),
            str(len(e.get("packages") or [])),
            human(e.get("own_bytes") or 0),
            when(e.get("created_at")),
            escape("; ".join(e.get("used_by") or []) or "-"),
        )
    out.print(table)


@env_app.command("show")
def env_show(
    env_id: Annotated[str, typer.Argument(help="an Env id from `ember env list`")],
    as_json: Annotated[bool, typer.Option("--json", help="print the API's JSON")] = False,
) -> None:
    """One Env: its base, the packages asked for, its lock, size on disk, build time, and
    which deployed app versions use it."""
    e = request("GET", f"/envs/{env_id}")
    if as_json:
        print_json(e)
        return
    spec = e["spec"]
    out.print(f"[bold]{e['id']}[/bold]  Python {e.get('python_version', '?')}, base {_base(e)}")
    out.print(f"  asked for:  {escape(', '.join(spec.get('packages') or []) or '-')}")
    if spec.get("variables"):
        out.print(f"  variables:  {escape(', '.join(sorted(spec['variables'])))}")
    out.print(
        f"  disk:       {human(e.get('disk_bytes') or 0)} in all, "
        f"{human(e.get('own_bytes') or 0)} its own (the rest are hard links shared with uv's "
        "cache and other Envs)"
    )
    out.print(f"  built:      {when(e.get('created_at'))} in {e.get('build_s', 0):.1f} s")
    users = e.get("used_by") or []
    out.print(f"  used by:    {escape('; '.join(users)) if users else '- (ember env prune)'}")
    packages = e.get("packages") or []
    noun = "package" if len(packages) == 1 else "packages"
    out.print(f"  lock ({len(packages)} {noun}; `ember env export {e['id']}` for hashes):")
    for p in packages:
        out.print(f"    {escape(p)}")


@env_app.command("export")
def env_export(
    env_id: Annotated[str, typer.Argument(help="an Env id from `ember env list`")],
) -> None:
    """Print the Env's lock (every version and hash): save it and rebuild the same Env with
    `ember.Env.from_lock("env.lock")`.

    Example: ember env export env-1a2b3c4d5e6f7a8b > env.lock
    """
    try:
        text = api_client().export_env(env_id)
    except EmberError as exc:
        fail(exc)
    typer.echo(text, nl=False)


@env_app.command("prune")
def env_prune(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="say what would be removed, remove nothing")
    ] = False,
) -> None:
    """Remove the Envs no deployed version uses (the AI base stays while an Env stands on it)."""
    try:
        result = api_client().prune_envs(dry_run=dry_run)
    except EmberError as exc:
        fail(exc)
    removed = result["removed"]
    verb = "would remove" if dry_run else "removed"
    if not removed:
        out.print("nothing to prune: every Env is used by a deployed version")
        return
    out.print(f"{verb} {len(removed)} Env(s): {', '.join(removed)}")
