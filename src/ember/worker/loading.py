"""Importing the user's file and finding what this process serves: a function, or a class
instance with its hooks. A template does it once for all its forks; a plain worker itself."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Loaded:
    """A unit imported and ready to serve: what a template keeps and every fork inherits."""

    targets: dict[str, tuple[Callable[..., Any], str]]
    snap_hooks: list[Callable[[], Any]]
    """`@ember.enter(snap=True)`: CPU-side loading a template runs once for all its forks."""
    enter_hooks: list[Callable[[], Any]]
    """`@ember.enter()`: run in each worker (GPU set-up goes here)."""
    exit_hooks: list[Callable[[], Any]]


def module_name(bundle: Path, root: Path) -> str:
    """The dotted name the deployed file has below its bundle's root: `pkg.main`."""
    parts = list(bundle.relative_to(root).with_suffix("").parts)
    if parts and parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def load_unit(bundle: Path, app_name: str, unit_name: str, root: Path | None = None) -> Loaded:
    """Import the user's file, as the developer's own code imports it (the bundle's root on
    sys.path, its dotted name: sibling modules and relative imports work), and find the
    function or class this process serves."""
    from ember.sdk.app import registered_app
    from ember.sdk.cls import Cls
    from ember.sdk.hooks import ENTER, hooks_of

    root = root or Path(os.environ.get("EMBER_ROOT") or bundle.parent)
    sys.path.insert(0, str(root))
    name = module_name(bundle, root)
    if "." in name:
        importlib.import_module(name)
    else:  # a top-level file loads from its path, even where its name is a stdlib module's
        spec = importlib.util.spec_from_file_location(name, bundle)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    try:
        app = registered_app(app_name)
    except KeyError:
        raise RuntimeError(f"{bundle.name} no longer defines ember.App({app_name!r})") from None
    unit = app.units.get(unit_name)
    if unit is None:
        raise RuntimeError(f"app {app_name!r} has no function or class {unit_name!r}")
    if not isinstance(unit, Cls):
        assert unit._local is not None
        return Loaded({unit.name: (unit._local, unit.kind)}, [], [], [])
    assert unit.user_cls is not None
    instance = unit.user_cls()
    enters, exits, _ = hooks_of(unit.user_cls)
    snap = [h for h in enters if getattr(getattr(unit.user_cls, h), ENTER)["snap"]]
    return Loaded(
        targets={h.name: (getattr(instance, m), h.kind) for m, h in unit.methods.items()},
        snap_hooks=[getattr(instance, h) for h in snap],
        enter_hooks=[getattr(instance, h) for h in enters if h not in snap],
        exit_hooks=[getattr(instance, h) for h in exits],
    )


async def run_hooks(hooks: list[Callable[[], Any]]) -> None:
    for hook in hooks:
        result = hook()
        if asyncio.iscoroutine(result):
            await result
