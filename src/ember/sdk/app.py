"""`ember.App` and its decorators: where a user's file declares what to deploy."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypedDict, Unpack

from ember.core.names import NAME_RE
from ember.core.spec import FunctionSpec, SpecError, make_spec, parse_tags
from ember.errors import InvalidSpec, UnknownOption
from ember.sdk.cls import Cls
from ember.sdk.function import Function
from ember.sdk.hooks import hooks_of
from ember.sdk.kinds import kind_of

_APPS: dict[str, App] = {}
"""Every App constructed in this process, by name: how a worker finds the app its bundle defines."""


def registered_app(name: str) -> App:
    return _APPS[name]


class Options(TypedDict, total=False):
    """Options of `@app.function(...)` and `@app.cls(...)`; the README's table says what each does."""

    gpu: str | list[str] | None
    gpu_memory: int | str | None
    cpu: float | None
    memory: int | str | None
    min_workers: int
    max_workers: int
    buffer_workers: int
    idle_timeout: float
    concurrency: int
    prewarm: Literal["auto"] | None
    warm_schedule: str | None
    timeout: float
    retries: int
    tags: dict[str, str] | None
    env: str | None
    secrets: list[str] | None
    block_network: bool


def _spec(options: Mapping[str, Any], where: str) -> FunctionSpec:
    """Options are checked where they are written, so a typo fails at import, not at deploy."""
    unknown = sorted(set(options) - set(Options.__annotations__))
    if unknown:
        raise UnknownOption(
            f"{where}: unknown option {unknown[0]!r}; the options are "
            + ", ".join(Options.__annotations__)
        )
    try:
        return make_spec(**options)
    except SpecError as exc:
        raise InvalidSpec(f"{where}: {exc}") from None


class App:
    """A named group of functions deployed together from one Python file."""

    def __init__(self, name: str, tags: dict[str, str] | None = None) -> None:
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
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

    def function(self, fn: Callable[..., Any] | None = None, /, **options: Unpack[Options]) -> Any:
        """Deploy a function; usable bare (`@app.function`) or with options (see `Options`)."""
        spec = _spec(options, "@app.function")

        def wrap(f: Callable[..., Any]) -> Function:
            if not callable(f) or inspect.isclass(f):
                raise InvalidSpec(
                    f"@app.function decorates a function, got {f!r}; use @app.cls for classes"
                )
            self._claim(f.__name__)
            handle = Function(self.name, f.__name__, kind=kind_of(f), local=f, spec=spec)
            self.units[f.__name__] = handle
            return handle

        return wrap(fn) if fn is not None else wrap

    def cls(self, **options: Unpack[Options]) -> Callable[[type], Cls]:
        """Deploy a class: `@ember.enter` hooks run once per worker, `@ember.method`s are callable;
        the options (see `Options`) apply to the class's workers."""
        spec = _spec(options, "@app.cls")

        def wrap(user_cls: type) -> Cls:
            if not inspect.isclass(user_cls):
                raise InvalidSpec(f"@app.cls decorates a class, got {user_cls!r}")
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
