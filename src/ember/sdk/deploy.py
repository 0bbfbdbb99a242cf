"""`ember deploy FILE`: import the file here, bundle its code, build its Envs, deploy its apps.

The steps, each of which the CLI shows: the file is imported as the worker will import it (its
package's root on `sys.path`, its dotted module name), so a missing module fails here first; the
bundle (the package or directory the file lives in) is uploaded unless the server already has
its digest; each distinct Env is built on the server, or found built; then the manifest names
the bundle, the module and each function's Env id, and the server answers once every function's
code has been imported there (or at once, with `wait=False`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember.core.quotas import parse_size
from ember.envs.bundle import DEFAULT_LIMIT, Bundle, BundleError, collect, root_of
from ember.errors import InvalidSpec
from ember.sdk.app import App
from ember.sdk.env import Env
from ember.sdk.job import sync_client

if TYPE_CHECKING:
    from ember.sdk.client import Client

EnvProgress = Callable[[str, dict[str, Any]], None]
"""(the Env's label, the server's view of its build: status, phase, detail) on each change."""


def bundle_limit() -> int:
    """The largest bundle a deploy uploads: EMBER_BUNDLE_LIMIT (`128MiB`, `1GiB`, bytes)."""
    raw = os.environ.get("EMBER_BUNDLE_LIMIT", "").strip()
    if not raw:
        return DEFAULT_LIMIT
    try:
        return parse_size(raw)
    except ValueError as exc:
        raise InvalidSpec(f"EMBER_BUNDLE_LIMIT: {exc}") from None


_IMPORT_LOCK = threading.Lock()
"""`sys.path` and `sys.modules` are the process's: one deploy's import at a time."""


@contextmanager
def _importing(root: Path) -> Iterator[None]:
    """Import from `root` as a worker would, and leave this process's modules as they were: a
    second deploy in one process (tests, notebooks) must see the new code, not a cached one."""
    before = dict(sys.modules)
    sys.path.insert(0, str(root))
    try:
        yield
    finally:
        sys.path.remove(str(root))
        for name, mod in list(sys.modules.items()):
            if before.get(name) is not mod and _is_under(mod, root):
                del sys.modules[name]
        sys.modules.update(before)


def _is_under(module: Any, root: Path) -> bool:
    """The module's code lives in the bundle (a third-party package it imported does not)."""
    file = getattr(module, "__file__", None)
    paths = [file] if file else list(getattr(module, "__path__", None) or ())
    return any(Path(p).resolve().is_relative_to(root.resolve()) for p in paths)


def _import(path: Path, module: str) -> Any:
    """A file in a package is imported by its dotted name (its relative imports work); a
    top-level file from its path under a private name, as before bundles (a file named like a
    standard module, `json.py`, must not replace that module in this process)."""
    if "." in module:
        top = module.split(".")[0]
        for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
            sys.modules.pop(name, None)  # put back on leaving `_importing`
        return importlib.import_module(module)
    name = f"_ember_deploy_{module}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[name] = loaded
    spec.loader.exec_module(loaded)
    return loaded


def import_failed(path: Path, root: Path, exc: BaseException) -> InvalidSpec:
    """The user's code failed at import: say where, without ember's frames."""
    frames = [
        f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).is_relative_to(root)
    ]
    where = f" ({Path(frames[-1].filename).name}, line {frames[-1].lineno})" if frames else ""
    return InvalidSpec(f"importing {path} failed{where}: {type(exc).__name__}: {exc}")


def load_apps(path: str | Path) -> tuple[list[App], str]:
    """Import `path` as the worker will (its package's root on sys.path, its dotted module name)
    and return the Apps it defines, with the file's source."""
    path = Path(path).resolve()
    if not path.is_file() or path.suffix != ".py":
        raise InvalidSpec(f"{path} is not a Python file")
    source = path.read_text()
    try:
        root, module = root_of(path)
    except BundleError as exc:
        raise InvalidSpec(str(exc)) from None
    with _IMPORT_LOCK, _importing(root):
        try:
            loaded = _import(path, module)
        except Exception as exc:
            raise import_failed(path, root, exc) from exc
    apps = [v for v in vars(loaded).values() if isinstance(v, App)]
    if not apps:
        raise InvalidSpec(f'{path.name} defines no ember.App: add `app = ember.App("name")`')
    return apps, source


def manifest(app: App, filename: str, source: str) -> dict[str, Any]:
    """A one-file manifest (the file's source inline), as deploys sent before bundles."""
    return {
        "name": app.name,
        "tags": app.tags,
        "filename": filename,
        "source": source,
        "functions": app.manifest(),
    }


@dataclass
class Plan:
    """What deploying one App takes: its bundle and the Envs of its units."""

    app: App
    bundle: Bundle
    envs: dict[str, Env] = field(default_factory=dict)
    """unit -> the Env it runs in (units on the server's Python are absent)."""


def plan(path: str | Path, *, limit: int | None = None) -> list[Plan]:
    """Import the file and collect each App's bundle; raises InvalidSpec saying what to fix."""
    path = Path(path).resolve()
    apps, _ = load_apps(path)
    out = []
    for app in apps:
        envs = {unit: env for unit in app.units if (env := app.env_of(unit)) is not None}
        try:
            here = path.parent.relative_to(root_of(path)[0])
        except BundleError as exc:
            raise InvalidSpec(str(exc)) from None
        include = [(path.parent / p, _remote(p, here)) for p in app.include]
        for env in {id(e): e for e in envs.values()}.values():
            include += [(local, remote) for local, remote in env.local_dirs]
        try:
            bundle = collect(path, include, limit=limit or bundle_limit())
        except BundleError as exc:
            raise InvalidSpec(str(exc)) from None
        out.append(Plan(app, bundle, envs))
    return out


def _remote(p: Path, here: Path) -> str:
    """Where an `include=` path lands in the bundle: where it is relative to the app's file
    (`here` is that file's directory in the bundle), or, for an absolute path or one outside
    the app's directory, under its own name next to the app's file."""
    inside = p.name if p.is_absolute() or ".." in p.parts else p.as_posix()
    return (here / inside).as_posix()


def upload(http: Client, bundle: Bundle) -> bool:
    """Send the bundle unless the server has it; True when it was sent."""
    if http.has_bundle(bundle.digest):
        return False
    http.put_bundle(bundle.digest, bundle.data)
    return True


def build_envs(
    http: Client, envs: dict[str, Env], on_progress: EnvProgress | None = None
) -> dict[str, str]:
    """Build (or find built) each distinct Env; unit -> Env id. Raises InvalidSpec with the
    resolver's message when a build fails."""
    specs = {unit: env.resolve() for unit, env in envs.items()}
    ids: dict[str, str] = {}
    started: dict[str, dict[str, Any]] = {}
    for spec in {s.digest(): s for s in specs.values()}.values():
        view = http.build_env(spec.to_dict())
        started[spec.digest()] = view
    for key, view in started.items():
        label = _label(view)
        last: tuple[Any, ...] = ()
        while True:
            now = (view.get("status"), view.get("phase"), view.get("detail"))
            if now != last and on_progress is not None:
                on_progress(label, view)
            last = now
            if view["status"] != "building":
                break
            time.sleep(0.2)
            view = http.get_env(view["id"], build=True)
        if view["status"] == "failed":
            raise EnvBuildFailed(label, view.get("error") or "the build failed", view.get("log"))
        started[key] = view
    for unit, spec in specs.items():
        ids[unit] = started[spec.digest()]["id"]
    return ids


class EnvBuildFailed(InvalidSpec):
    """An Env the server could not build: `log` is the builder's whole output."""

    def __init__(self, label: str, reason: str, log: str | None) -> None:
        super().__init__(f"building {label} failed: {reason}")
        self.log = log or ""


def _label(view: dict[str, Any]) -> str:
    spec = view.get("spec") or {}
    extra = spec.get("packages") or []
    what = f"Env {view['id']} ({spec.get('base', 'standard')}"
    if spec.get("lock"):
        what += ", from a lock"
    elif extra:
        what += " + " + ", ".join(extra[:3]) + (", ..." if len(extra) > 3 else "")
    return what + ")"


def deploy_plan(http: Client, p: Plan, env_ids: dict[str, str], *, wait: bool) -> dict[str, Any]:
    b = p.bundle
    body = {
        "name": p.app.name,
        "tags": p.app.tags,
        "filename": b.filename,
        "bundle": b.digest,
        "module": b.module,
        "functions": p.app.manifest(env_ids),
        "wait": wait,
    }
    return http.deploy(body)


def deploy_file(
    path: str | Path,
    client: Client | None = None,
    *,
    wait: bool = True,
    on_progress: EnvProgress | None = None,
) -> list[dict[str, Any]]:
    """Deploy every App in the file; returns what the server answered for each."""
    http = sync_client(client)
    results = []
    for p in plan(path):
        upload(http, p.bundle)
        env_ids = build_envs(http, p.envs, on_progress)
        results.append(deploy_plan(http, p, env_ids, wait=wait))
    return results
