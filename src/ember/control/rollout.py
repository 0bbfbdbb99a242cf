"""Rollout: getting a staged version ready to serve, and telling the truth about its code.

Each unit of a new version gets its template (or, where templates are off, a check-only
import) before the version becomes current; a deploy that waits returns only once every unit's
code has imported where its workers will run, so an import error, a missing module or a failing
`snap=True` hook fails the deploy with its traceback, and the version before keeps serving.
Plain functions over the backend protocol: the plane passes in what they need.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Any

from ember.backends.base import Backend
from ember.control.manifest import DeployError
from ember.control.records import AppState, Pool

log = logging.getLogger("ember.control")

IMPORT_WAIT_S = 300.0
"""How long a deploy waits for a unit's code to import (a snap hook may load a model) before
it succeeds with a warning instead."""

TemplateLog = Callable[[Pool, list[list[Any]]], None]


async def prepare(backend: Backend, app: AppState, on_log: TemplateLog) -> None:
    """Start a template per unit; until one is ready, workers start plainly."""
    for unit, pool in app.pools.items():
        try:
            await backend.prepare(
                pool.bundle,
                app.name,
                unit,
                pool.env,
                workspace=app.workspace,
                block_network=pool.spec.block_network,
                on_log=functools.partial(on_log, pool),
                runtime=pool.runtime,
                root=pool.root,
            )
        except OSError as exc:
            log.warning("no template for %s/%s: %s", app.name, unit, exc)


async def check_imports(backend: Backend, app: AppState, timeout: float = IMPORT_WAIT_S) -> None:
    """Raise DeployError (each failing unit's traceback) unless every unit's code imported;
    the new version's templates are stopped first."""
    units = list(app.pools.items())
    errors = await asyncio.gather(
        *(backend.imported(pool.bundle, unit, timeout) for unit, pool in units)
    )
    failed = [(unit, error) for (unit, _), error in zip(units, errors, strict=True) if error]
    if not failed:
        return
    for unit, pool in units:
        backend.retire(pool.bundle, unit)
    text = "\n".join(
        f"{unit}: its code failed to import:\n{error.rstrip()}" for unit, error in failed
    )
    raise DeployError(
        f"app {app.name!r} was not deployed (the version before it keeps serving): {text}"
    )


async def secret_changed(
    backend: Backend,
    app: AppState,
    name: str,
    env_for: Callable[[tuple[str, ...]], dict[str, str]],
    template_lines: TemplateLog,
) -> None:
    """Secret `name` changed: the units of `app` that name it get its new environment in the
    workers they start from now on, and their templates start again with it."""
    touched = False
    for base in app.pools.values():
        if name not in base.spec.secrets:
            continue
        touched = True
        env = env_for(base.spec.secrets)
        for pool in app.all_pools():
            if pool.unit == base.unit:
                pool.env = env
        backend.retire(base.bundle, base.unit)
    if touched:
        await prepare(backend, app, template_lines)
