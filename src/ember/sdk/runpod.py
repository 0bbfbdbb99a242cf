"""RunPod handler files as ember functions: what `ember deploy --runpod FILE` deploys.

A RunPod worker file imports `runpod` and, at import, calls
`runpod.serverless.start({"handler": handler, ...})`. ember imports that file itself (at deploy
on the client, then in each worker) with `start` capturing its config instead of starting
RunPod's polling loop, and with `progress_update` reporting to ember; the handler then runs as
the ember function `handler`, in ember's own workers, which give it templates, metering,
streaming, cancel and timeouts as they give any function. docs/runpod.md says what each
handler feature becomes.

Where the real `runpod` package is importable its `serverless.start` and `progress_update` are
patched; elsewhere (an Env without it) a stand-in `runpod` module holds just those two.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import json
import logging
import sys
import types
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ember.core.runpod import HANDLER
from ember.errors import InvalidSpec
from ember.sdk.app import App
from ember.sdk.kinds import kind_of
from ember.worker import output as worker_output

STAND_IN = "__ember_stand_in__"
"""Set (True) on the stand-in `runpod` module: the real package was not importable."""
_STAND_IN_NAMES = (
    "runpod",
    "runpod.serverless",
    "runpod.serverless.modules",
    "runpod.serverless.modules.rp_progress",
)
_configs: list[dict[str, Any]] = []
"""What `runpod.serverless.start` was called with since the last `capturing()` began."""


class HandlerError(Exception):
    """A RunPod handler returned (or yielded) `{"error": ...}`: its job fails with that message."""


# ----------------------------------------------------------------- the `runpod` ember provides
def start(config: dict[str, Any]) -> None:
    """`runpod.serverless.start` inside ember: remember the config; ember serves the handler."""
    if not isinstance(config, Mapping):
        raise TypeError(f"runpod.serverless.start takes a dict, got {type(config).__name__}")
    _configs.append(dict(config))


def progress_update(job: Any, progress: Any) -> None:
    """`runpod.serverless.progress_update` inside ember: the job's status shows `progress` while
    it runs. Outside a worker (a local call) it does nothing."""
    job_id = job.get("id") if isinstance(job, Mapping) else None
    job_id = job_id or worker_output.current_job.get()
    sink = worker_output.progress_sink
    if sink is not None and job_id:
        sink(str(job_id), progress)


def _missing(name: str) -> Any:
    raise AttributeError(
        f"runpod.{name} is not available here: ember runs this handler with a stand-in `runpod` "
        "module that has only serverless.start and serverless.progress_update. Add the runpod "
        "package to the function's Env (`ember deploy --runpod FILE --packages runpod`)"
    )


def _stand_in() -> dict[str, types.ModuleType]:
    mods = {name: types.ModuleType(name) for name in _STAND_IN_NAMES}
    for name, mod in mods.items():
        mod.__path__ = []  # a package: `import runpod.serverless.utils` is a plain ImportError
        mod.__dict__[STAND_IN] = True
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(mods[parent], child, mod)
    mods["runpod"].__dict__["__getattr__"] = _missing
    mods["runpod.serverless"].__dict__.update(start=start, progress_update=progress_update)
    mods["runpod.serverless.modules.rp_progress"].__dict__["progress_update"] = progress_update
    return mods


def _install() -> Callable[[], None]:
    """Patch the real `runpod`, or put the stand-in in sys.modules; returns what undoes it."""
    try:
        if importlib.util.find_spec("runpod") is None:
            raise ImportError("no runpod")
        serverless = importlib.import_module("runpod.serverless")
        rp_progress = importlib.import_module("runpod.serverless.modules.rp_progress")
    except Exception:  # absent, or broken in this environment: the stand-in does
        before = {name: sys.modules.get(name) for name in _STAND_IN_NAMES}
        sys.modules.update(_stand_in())

        def undo_stand_in() -> None:
            for name, mod in before.items():
                if mod is None:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = mod

        return undo_stand_in
    patches = [
        (serverless, "start", start),
        (serverless, "progress_update", progress_update),
        (rp_progress, "progress_update", progress_update),
    ]
    saved = [(obj, attr, getattr(obj, attr, None)) for obj, attr, _ in patches]
    for obj, attr, value in patches:
        setattr(obj, attr, value)

    def undo_patch() -> None:
        for obj, attr, value in saved:
            setattr(obj, attr, value)

    return undo_patch


@contextmanager
def capturing(*, keep: bool = False) -> Iterator[list[dict[str, Any]]]:
    """Inside, `runpod.serverless.start` records its config in the list yielded. `keep`: leave
    `runpod` patched on leaving (a worker: its handler reports progress while it serves).
    Without `keep`, the root logger is left as it was: importing `runpod` configures it (INFO,
    to stderr), which a deploying process must not inherit."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    undo = _install()
    _configs.clear()
    try:
        yield _configs
    finally:
        if not keep:
            undo()
            root.handlers[:] = handlers
            root.setLevel(level)


def the_config(configs: list[dict[str, Any]], filename: str) -> dict[str, Any]:
    """The one config the file started with, or InvalidSpec saying what to change."""
    if not configs:
        raise InvalidSpec(
            f"{filename} never called runpod.serverless.start({{'handler': ...}}) when imported: "
            "call it at the top level of the file, as RunPod's docs show (not under "
            "`if __name__ == '__main__':`, which an import does not run)"
        )
    config = configs[-1]
    if not callable(config.get("handler")):
        raise InvalidSpec(
            f"{filename}: runpod.serverless.start got no callable 'handler', got "
            f"{config.get('handler')!r}"
        )
    return config


def concurrency_of(config: Mapping[str, Any], filename: str) -> int | None:
    """The concurrency a `concurrency_modifier` asks for, evaluated once (at deploy) at 1: ember
    runs a fixed number of jobs per worker. None without a modifier."""
    modifier = config.get("concurrency_modifier")
    if modifier is None:
        return None
    if not callable(modifier):
        raise InvalidSpec(f"{filename}: concurrency_modifier must be a function, got {modifier!r}")
    try:
        value = modifier(1)
    except Exception as exc:
        raise InvalidSpec(
            f"{filename}: concurrency_modifier(1) raised {type(exc).__name__}: {exc}"
        ) from exc
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidSpec(
            f"{filename}: concurrency_modifier(1) must return an integer >= 1, got {value!r}"
        )
    return value


# ----------------------------------------------------------------- the handler as a function
def _job(input: dict[str, Any]) -> dict[str, Any]:
    """RunPod's job dict: the ember job's id and its input."""
    return {"id": worker_output.current_job.get() or f"local-{uuid.uuid4().hex}", "input": input}


def _refresh() -> None:
    sink = worker_output.refresh_sink
    if sink is not None:
        sink()


def _message(error: Any) -> str:
    if isinstance(error, str):
        return error
    try:
        return json.dumps(error, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(error)


def _returned(output: Any) -> Any:
    """A handler's return value as RunPod's rp_job reads it: a dict's "error" fails the job,
    its "refresh_worker" stops the worker after the job, and what is left is the output."""
    if not isinstance(output, dict):
        return output
    output = dict(output)
    error = output.pop("error", None)
    if output.pop("refresh_worker", None):
        _refresh()
    if error:
        raise HandlerError(_message(error))
    return output or None  # as RunPod: nothing left is no output


def _chunk(value: Any) -> Any:
    """A yielded value: a dict with an "error" ends the stream and fails the job, as RunPod's."""
    if isinstance(value, dict) and value.get("error"):
        raise HandlerError(_message(value["error"]))
    return value


def handler_function(config: Mapping[str, Any]) -> Callable[..., Any]:
    """The ember function `handler` serving a RunPod handler: of the handler's kind (a plain
    function, a coroutine, a generator, an async generator), taking any keyword input."""
    handler: Callable[..., Any] = config["handler"]
    refresh = bool(config.get("refresh_worker"))
    kind = kind_of(handler)

    def function(**input: Any) -> Any:
        try:
            result = handler(_job(input))
            if inspect.isawaitable(result):  # a sync callable that returned a coroutine
                result = asyncio.run(_awaited(result))
            return _returned(result)
        finally:
            if refresh:
                _refresh()

    async def coroutine(**input: Any) -> Any:
        try:
            return _returned(await handler(_job(input)))
        finally:
            if refresh:
                _refresh()

    def generator(**input: Any) -> Iterator[Any]:
        try:
            for value in handler(_job(input)):
                yield _chunk(value)
        finally:
            if refresh:
                _refresh()

    async def async_generator(**input: Any) -> AsyncIterator[Any]:
        try:
            async for value in handler(_job(input)):
                yield _chunk(value)
        finally:
            if refresh:
                _refresh()

    chosen: Callable[..., Any] = {
        "function": function,
        "async": coroutine,
        "generator": generator,
        "async_generator": async_generator,
    }[kind]
    chosen.__name__ = chosen.__qualname__ = HANDLER
    chosen.__doc__ = inspect.getdoc(handler)
    return chosen


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def make_app(name: str, config: Mapping[str, Any], options: Mapping[str, Any] | None = None) -> App:
    """An App with the one function `handler` (see `handler_function`), with `options` as
    `@app.function(...)` takes them."""
    app = App(name)
    app.function(**dict(options or {}))(handler_function(config))
    return app


# ----------------------------------------------------------------- in the worker
def import_handler(root: Path, module: str, filename: str) -> None:
    """Import the handler file as the developer runs it: a file in a package by its dotted name
    (root on sys.path), a top-level file from its path."""
    if "." in module:
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        importlib.import_module(module)
        return
    spec = importlib.util.spec_from_file_location(module, root / filename)
    assert spec is not None and spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[module] = loaded
    spec.loader.exec_module(loaded)


def serve(app_name: str, module: str, filename: str, here: str) -> App:
    """What the wrapper module `ember deploy --runpod` writes into the bundle calls, in each
    worker: import the handler file with `runpod` patched for good, and make the App. `here`:
    the wrapper's `__file__`, at the bundle's root."""
    root = Path(here).resolve().parent
    with capturing(keep=True) as configs:
        import_handler(root, module, filename)
    return make_app(app_name, the_config(configs, filename))


WRAPPER = '''"""Written by `ember deploy --runpod` into the bundle: {filename}'s RunPod handler as the
ember function `handler` of app {app!r} (see ember.sdk.runpod)."""

from ember.sdk.runpod import serve

app = serve({app!r}, {module!r}, {filename!r}, __file__)
'''
"""The module a RunPod deploy's workers import (the manifest's `module`)."""


def wrapper_source(app: str, module: str, filename: str) -> str:
    return WRAPPER.format(app=app, module=module, filename=filename)
