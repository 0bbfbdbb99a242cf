"""`ember.App` and its decorators: where a user's file declares what to deploy."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

from ember.core.spec import FunctionSpec, SpecError, make_spec, parse_tags
from ember.errors import InvalidSpec
from ember.sdk.cls import Cls
from ember.sdk.function import Function
from ember.sdk.hooks import hooks_of

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

_APPS: dict[str, App] = {}
"""Every App constructed in this process, by name: how a worker finds the app its bundle defines."""


def registered_app(name: str) -> App:
    return _APPS[name]


def kind_of(fn: Callable[..., Any]) -> str:
    if inspect.isasyncgenfunction(fn):
        return "async_generator"
    if inspect.iscoroutinefunction(fn):
        return "async"
    if inspect.isgeneratorfunction(fn):
        return "generator"
    return "function"


def _spec(options: dict[str, Any], where: str) -> FunctionSpec:
    try:
        return make_spec(**options)
    except SpecError as exc:
        raise InvalidSpec(f"{where}: {exc}") from None


class App:
    """A named group of functions deployed together from one Python file."""

    def __init__(self, name: str, tags: dict[str, str] | None = None) -> None:
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise InvalidSpec(
                f"app name {name!r} must be 1-64 characters of letters, digits, '_', '.', '-'"
            )
        try:
            self.tags = parse_tags(tags)
        except SpecError as exc:
            raise InvalidSpec(f"App({name!r}): {exc}") from None
        self.name = name
        self.units: dict[str, Function | Cls] = {}
        _APPS[name] = self

    def __repr__(self) -> str:
        return f"<ember.App {self.name}>"

    def function(
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        gpu: str | list[str] | None = None,
        gpu_memory: int | str | None = None,
        cpu: float | None = None,
        memory: int | str | None = None,
        min_workers: int = 0,
        max_workers: int = 10,
        buffer_workers: int = 0,
        idle_timeout: float = 60,
        concurrency: int = 1,
        timeout: float = 300,
        retries: int = 0,
        tags: dict[str, str] | None = None,
        env: str | None = None,
    ) -> Any:
        """Deploy a function; usable bare (`@app.function`) or with options."""
        options = dict(
            gpu=gpu,
            gpu_memory=gpu_memory,
            cpu=cpu,
            memory=memory,
            min_workers=min_workers,
            max_workers=max_workers,
            buffer_workers=buffer_workers,
            idle_timeout=idle_timeout,
            concurrency=concurrency,
            timeout=timeout,
            retries=retries,
            tags=tags,
            env=env,
        )

        def wrap(f: Callable[..., Any]) -> Function:
            if not callable(f) or inspect.isclass(f):
                raise InvalidSpec(
                    f"@app.function decorates a function, got {f!r}; use @app.cls for classes"
                )
            spec = _spec(options, f"@app.function on {f.__name__}")
            self._claim(f.__name__)
            handle = Function(self.name, f.__name__, kind=kind_of(f), local=f, spec=spec)
            self.units[f.__name__] = handle
            return handle

        return wrap(fn) if fn is not None else wrap

    def cls(
        self,
        *,
        gpu: str | list[str] | None = None,
        gpu_memory: int | str | None = None,
        cpu: float | None = None,
        memory: int | str | None = None,
        min_workers: int = 0,
        max_workers: int = 10,
        buffer_workers: int = 0,
        idle_timeout: float = 60,
        concurrency: int = 1,
        timeout: float = 300,
        retries: int = 0,
        tags: dict[str, str] | None = None,
        env: str | None = None,
    ) -> Callable[[type], Cls]:
        """Deploy a class: `@ember.enter` hooks run once per worker, `@ember.method`s are callable."""
        options = dict(
            gpu=gpu,
            gpu_memory=gpu_memory,
            cpu=cpu,
            memory=memory,
            min_workers=min_workers,
            max_workers=max_workers,
            buffer_workers=buffer_workers,
            idle_timeout=idle_timeout,
            concurrency=concurrency,
            timeout=timeout,
            retries=retries,
            tags=tags,
            env=env,
        )

        def wrap(user_cls: type) -> Cls:
            if not inspect.isclass(user_cls):
                raise InvalidSpec(f"@app.cls decorates a class, got {user_cls!r}")
            spec = _spec(options, f"@app.cls on {user_cls.__name__}")
            _, _, methods = hooks_of(user_cls)
            if not methods:
                raise InvalidSpec(
                    f"@app.cls on {user_cls.__name__}: no method is marked @ember.method(), "
                    "so nothing could be called"
                )
            self._claim(user_cls.__name__)
            handle = Cls(self.name, user_cls, spec)
            self.units[user_cls.__name__] = handle
            return handle

        return wrap

    def _claim(self, name: str) -> None:
        if name in self.units:
            raise InvalidSpec(f"app {self.name!r} already has a function or class named {name!r}")

    def manifest(self) -> list[dict[str, Any]]:
        """What the server needs to know of each callable, without the code itself."""
        out = []
        for unit_name, unit in self.units.items():
            if isinstance(unit, Function):
                assert unit.spec is not None
                out.append(
                    {
                        "name": unit.name,
                        "unit": unit_name,
                        "kind": unit.kind,
                        "params": unit.params,
                        "spec": unit.spec.to_dict(),
                    }
                )
            else:
                for m in unit.methods.values():
                    assert m.spec is not None
                    out.append(
                        {
                            "name": m.name,
                            "unit": unit_name,
                            "kind": m.kind,
                            "params": m.params,
                            "spec": m.spec.to_dict(),
                        }
                    )
        return out
