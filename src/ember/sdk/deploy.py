"""`ember deploy FILE`: import the file here, describe its apps, upload source and description."""

from __future__ import annotations

import importlib.util
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember.errors import InvalidSpec
from ember.sdk.app import App
from ember.sdk.job import sync_client

if TYPE_CHECKING:
    from ember.sdk.client import Client


def load_apps(path: str | Path) -> tuple[list[App], str]:
    """Import `path` as a module and return the Apps it defines, with its source."""
    path = Path(path).resolve()
    if not path.is_file() or path.suffix != ".py":
        raise InvalidSpec(f"{path} is not a Python file")
    source = path.read_text()
    name = f"_ember_deploy_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's code failed: say where, without ember's frames
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == str(path)]
        where = f" (line {frames[-1].lineno})" if frames else ""
        raise InvalidSpec(f"importing {path} failed{where}: {type(exc).__name__}: {exc}") from exc
    finally:
        sys.path.remove(str(path.parent))
    apps = [v for v in vars(module).values() if isinstance(v, App)]
    if not apps:
        raise InvalidSpec(f'{path.name} defines no ember.App: add `app = ember.App("name")`')
    return apps, source


def manifest(app: App, filename: str, source: str) -> dict[str, Any]:
    return {
        "name": app.name,
        "tags": app.tags,
        "filename": filename,
        "source": source,
        "functions": app.manifest(),
    }


def deploy_file(path: str | Path, client: Client | None = None) -> list[dict[str, Any]]:
    """Deploy every App in the file; returns what the server answered for each."""
    apps, source = load_apps(path)
    http = sync_client(client)
    return [http.deploy(manifest(app, Path(path).name, source)) for app in apps]
