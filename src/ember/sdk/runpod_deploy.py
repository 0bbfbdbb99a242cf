"""`ember deploy --runpod FILE`: a RunPod handler file deployed as an ember app.

The file is imported here with `runpod.serverless.start` captured (`ember.sdk.runpod`); the app
(named after the file unless `name` says otherwise) has one function, `handler`, whose options
come from the settings (flags, or a small TOML file); the bundle is the file's directory, as any
deploy's, plus a generated wrapper module at its root, which is what the workers import.
"""

from __future__ import annotations

import re
import tempfile
import tomllib
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember.core.names import NAME_RE
from ember.core.runpod import HANDLER
from ember.envs.bundle import BundleError, collect, root_of
from ember.errors import InvalidSpec
from ember.sdk import runpod as shim
from ember.sdk.deploy import (
    _IMPORT_LOCK,
    EnvProgress,
    Plan,
    _import,
    _importing,
    build_envs,
    bundle_limit,
    deploy_plan,
    import_failed,
    upload,
)
from ember.sdk.env import Env
from ember.sdk.job import sync_client

if TYPE_CHECKING:
    from ember.sdk.client import Client

FUNCTION_OPTIONS = (
    "gpu_memory",
    "cpu",
    "memory",
    "min_workers",
    "max_workers",
    "buffer_workers",
    "idle_timeout",
    "concurrency",
    "timeout",
    "retries",
    "secrets",
    "block_network",
)
"""Settings passed to `@app.function(...)` as they are."""
ENV_SETTINGS = ("packages", "base", "requirements")
"""Settings that make the function's Env: `base` (standard or ai) plus packages."""
SETTINGS = ("name", "gpu", "gpus", *FUNCTION_OPTIONS, *ENV_SETTINGS)
"""What flags and a config file may set (a flag's dashes are underscores here)."""


def read_config(path: str | Path) -> dict[str, Any]:
    """A TOML file of settings: top-level keys, or a `[tool.ember.runpod]` table (so that they
    may live in a pyproject.toml). Paths in it are relative to the file."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InvalidSpec(f"cannot read {path}: {exc}") from None
    table = doc.get("tool", {}).get("ember", {}).get("runpod") if "tool" in doc else doc
    if not isinstance(table, dict):
        raise InvalidSpec(f"{path}: no settings (top-level keys or [tool.ember.runpod])")
    settings = {k.replace("-", "_"): v for k, v in table.items()}
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise InvalidSpec(
            f"{path}: unknown setting {unknown[0]!r}; the settings are "
            + ", ".join(s.replace("_", "-") for s in SETTINGS)
        )
    if isinstance(settings.get("requirements"), str):
        settings["requirements"] = str(path.parent / settings["requirements"])
    return settings


def _gpu(gpu: Any, gpus: Any) -> Any:
    """`--gpu H100 --gpus 2` is `gpu="H100:2"`; `--gpu A100,H100` a fallback order."""
    if gpus is not None and gpu is None:
        raise InvalidSpec("--gpus needs --gpu TYPE: the number of GPUs of which type")
    if isinstance(gpu, str):
        gpu = [g.strip() for g in gpu.split(",") if g.strip()]
    if gpus is None or gpu is None:
        return gpu
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise InvalidSpec(f"--gpus must be an integer >= 1, got {gpus!r}")
    return [g if ":" in str(g) else f"{g}:{gpus}" for g in gpu]


def _env(settings: Mapping[str, Any]) -> Env | None:
    base, packages = settings.get("base"), settings.get("packages") or []
    requirements = settings.get("requirements")
    if base is None and not packages and requirements is None:
        return None  # the server's own Python
    if base not in (None, "standard", "ai"):
        raise InvalidSpec(f"base must be 'standard' or 'ai', got {base!r}")
    if isinstance(packages, str) or not isinstance(packages, list):
        raise InvalidSpec(f"packages must be a list of requirements, got {packages!r}")
    env = Env.ai() if base == "ai" else Env.standard()
    if packages:
        env = env.pip_install(*packages)
    if requirements is not None:
        env = env.pip_install_from_requirements(Path(requirements).resolve())
    return env


def function_options(
    settings: Mapping[str, Any], config: Mapping[str, Any], filename: str
) -> dict[str, Any]:
    """`@app.function(...)`'s options from the settings and the handler's config: without a
    concurrency setting, `concurrency_modifier(1)` gives it."""
    options = {k: settings[k] for k in FUNCTION_OPTIONS if settings.get(k) is not None}
    gpu = _gpu(settings.get("gpu"), settings.get("gpus"))
    if gpu:
        options["gpu"] = gpu
    if "concurrency" not in options:
        concurrency = shim.concurrency_of(config, filename)
        if concurrency is not None:
            options["concurrency"] = concurrency
    env = _env(settings)
    if env is not None:
        options["env"] = env
    return options


def _module_name(app: str) -> str:
    return "_ember_runpod_" + re.sub(r"[^A-Za-z0-9_]", "_", app)


def plan_runpod(
    path: str | Path, settings: Mapping[str, Any] | None = None, *, limit: int | None = None
) -> Plan:
    """Import the handler file (its `start` captured), make its App, collect its bundle with the
    wrapper module; InvalidSpec says what to fix."""
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise InvalidSpec(f"unknown setting {unknown[0]!r}; the settings are {', '.join(SETTINGS)}")
    path = Path(path).resolve()
    if not path.is_file() or path.suffix != ".py":
        raise InvalidSpec(f"{path} is not a Python file")
    try:
        root, module = root_of(path)
    except BundleError as exc:
        raise InvalidSpec(str(exc)) from None
    with _IMPORT_LOCK, _importing(root), shim.capturing() as configs:
        try:
            _import(path, module)
        except Exception as exc:
            error = import_failed(path, root, exc)
            if isinstance(exc, ImportError) and "runpod" in str(exc):
                error = InvalidSpec(
                    f"{error}; here `runpod` is ember's stand-in (the package is not installed "
                    "where you deploy from), which has only serverless.start and "
                    "progress_update: `pip install runpod` here, and add it to the Env "
                    "(--packages runpod) if the workers need more of it"
                )
            raise error from exc
        config = shim.the_config(list(configs), path.name)
        name = settings.get("name") or path.stem
        if not settings.get("name") and not NAME_RE.fullmatch(name):
            raise InvalidSpec(
                f"the app is named after {path.name}, but {name!r} is not an app name (1-64 "
                "letters, digits, '_', '.', '-'): give it one with --name"
            )
        app = shim.make_app(name, config, function_options(settings, config, path.name))
    filename = path.relative_to(root).as_posix()
    wrapper = _module_name(app.name)
    env = app.env_of(HANDLER)
    with tempfile.TemporaryDirectory(prefix="ember-runpod-") as tmp:
        source = Path(tmp) / f"{wrapper}.py"
        source.write_text(shim.wrapper_source(app.name, module, filename))
        include = [(source, f"{wrapper}.py")]
        if env is not None:
            include += list(env.local_dirs)
        try:
            bundle = collect(path, include, limit=limit or bundle_limit())
        except BundleError as exc:
            raise InvalidSpec(str(exc)) from None
    bundle = replace(bundle, module=wrapper, filename=f"{wrapper}.py")
    return Plan(app, bundle, {HANDLER: env} if env is not None else {})


def deploy_runpod(
    path: str | Path,
    client: Client | None = None,
    *,
    wait: bool = True,
    on_progress: EnvProgress | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Deploy a RunPod handler file (see `plan_runpod`); what the server answered."""
    http = sync_client(client)
    p = plan_runpod(path, settings)
    upload(http, p.bundle)
    env_ids = build_envs(http, p.envs, on_progress)
    return deploy_plan(http, p, env_ids, wait=wait)
