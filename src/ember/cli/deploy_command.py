"""`ember deploy FILE`, and `ember deploy --runpod FILE` for a RunPod handler file, whose
function options come as flags or a small TOML file (a native app's come from its code)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ember.cli.common import fail

_RUNPOD = "RunPod handler files (--runpod)"


def _opt(help: str, *names: str) -> Any:
    return typer.Option(*names, help=help, rich_help_panel=_RUNPOD)


def deploy(
    file: Annotated[
        Path,
        typer.Argument(
            help="a Python file that defines an ember.App (or, with --runpod, "
            "that calls runpod.serverless.start)"
        ),
    ],
    no_wait: Annotated[
        bool,
        typer.Option(
            "--no-wait", help="return once the version is stored, before its code is imported"
        ),
    ] = False,
    runpod: Annotated[
        bool, _opt("FILE is a RunPod handler file: deploy its handler as APP/handler", "--runpod")
    ] = False,
    config: Annotated[
        Path | None,
        _opt(
            "a TOML file of the settings below (or a pyproject.toml with a tool.ember.runpod table)"
        ),
    ] = None,
    name: Annotated[str | None, _opt("the app's name (default: the file's name)")] = None,
    gpu: Annotated[str | None, _opt("GPU type, e.g. H100, or a fallback order: A100,H100")] = None,
    gpus: Annotated[int | None, _opt("GPUs per worker (of --gpu's type)")] = None,
    gpu_memory: Annotated[
        str | None, _opt("share one GPU, reserving this much (e.g. 20GiB)")
    ] = None,
    cpu: Annotated[float | None, _opt("CPUs per worker")] = None,
    memory: Annotated[str | None, _opt("memory per worker (e.g. 16GiB)")] = None,
    min_workers: Annotated[
        int | None, _opt("workers kept running (RunPod's active workers)")
    ] = None,
    max_workers: Annotated[int | None, _opt("the most workers")] = None,
    idle_timeout: Annotated[float | None, _opt("seconds an idle worker is kept")] = None,
    concurrency: Annotated[
        int | None, _opt("jobs per worker at once (default: concurrency_modifier(1), else 1)")
    ] = None,
    timeout: Annotated[float | None, _opt("a job's execution timeout, in seconds")] = None,
    retries: Annotated[int | None, _opt("retries of a failed job")] = None,
    secret: Annotated[
        list[str] | None, _opt("a workspace secret for the workers' environment (repeat)")
    ] = None,
    packages: Annotated[
        list[str] | None, _opt("a package for the function's Env, e.g. runpod (repeat)")
    ] = None,
    base: Annotated[str | None, _opt("the Env's base: standard or ai")] = None,
    requirements: Annotated[Path | None, _opt("a requirements file for the function's Env")] = None,
) -> None:
    """Deploy the apps a Python file defines, as a new version of each.

    Uploads the code of the package or directory the file lives in (less what .emberignore
    excludes), builds each function's ember.Env on the server (once per content; a progress
    line per Env), and returns once every function's code has imported there: an import error
    fails the deploy with its traceback and the version before keeps serving. See
    docs/environments.md. With --runpod, FILE is a RunPod Serverless worker file, deployed
    unchanged as the function `handler` of an app named after it (docs/runpod.md).
    """
    from ember.cli.deploying import report, run_deploy

    flags: dict[str, Any] = {
        "name": name,
        "gpu": gpu,
        "gpus": gpus,
        "gpu_memory": gpu_memory,
        "cpu": cpu,
        "memory": memory,
        "min_workers": min_workers,
        "max_workers": max_workers,
        "idle_timeout": idle_timeout,
        "concurrency": concurrency,
        "timeout": timeout,
        "retries": retries,
        "secrets": secret or None,
        "packages": packages or None,
        "base": base,
        "requirements": None if requirements is None else str(requirements),
    }
    given = {k: v for k, v in flags.items() if v is not None}
    if not runpod:
        if given or config is not None:
            first = "--config" if config is not None else "--" + next(iter(given)).replace("_", "-")
            fail(
                ValueError(
                    f"{first} is for `ember deploy --runpod FILE`: an ember app sets its "
                    "options in @app.function(...)"
                )
            )
        report(run_deploy(file, wait=not no_wait), wait=not no_wait)
        return
    from ember.errors import EmberError
    from ember.sdk.runpod_deploy import read_config

    try:
        settings = {**(read_config(config) if config is not None else {}), **given}
    except EmberError as exc:
        fail(exc)
    report(run_deploy(file, wait=not no_wait, runpod=settings), wait=not no_wait)
