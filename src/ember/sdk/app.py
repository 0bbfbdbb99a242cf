"""`ember.App` and its decorators: where a user's file declares what to deploy."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypedDict, Unpack

from ember.core.names import NAME_RE
from ember.core.spec import FunctionSpec, SpecError, make_spec, parse_tags
from ember.errors import InvalidSpec, UnknownOption
from ember.sdk.cls import Cls
from ember.sdk.env import Env
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
    env: Env | None
    secrets: list[str] | None
    block_network: bool


def _spec(options: Mapping[str, Any], where: str) -> tuple[FunctionSpec, Env | None]:
    """Options are checked where they are written, so a typo fails at import, not at deploy.
    The Env stays with the handle: the spec names it by id once the server has built it."""
    options = dict(options)
    env = options.pop("env", None)
    if env is not None and not isinstance(env, Env):
        raise InvalidSpec(f"{where}: env must be an ember.Env (ember.Env.standard()), got {env!r}")
    unknown = sorted(set(options) - set(Options.__annotations__))
    if unknown:
        raise UnknownOption(
            f"{where}: unknown option {unknown[0]!r}; the options are "
            + ", ".join(Options.__annotations__)
        )
    try:
        return make_spec(**options), env
    except SpecError as exc:
        raise InvalidSpec(f"{where}: {exc}") from None


class App:
    """A named group of functions deployed together, with the code of the package their file
    lives in (its bundle) and, optionally, a Python environment of their own (`env=`)."""

    def __init__(
        self,
        name: str,
        tags: dict[str, str] | None = None,
        *,
        env: Env | None = None,
        include: list[str | Path] | None = None,
    ) -> None:
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise InvalidSpec(
                f"app name {name!r} must be 1-64 characters of letters, digits, '_', '.', '-'"
            )
        try:
            self.tags = parse_tags(tags)
        except SpecError as exc:
            raise InvalidSpec(f"App({name!r}): {exc}") from None
        if env is not None and not isinstance(env, Env):
            raise InvalidSpec(f"App({name!r}): env must be an ember.Env, got {env!r}")
        if include is not None and (
            not isinstance(include, list) or not all(isinstance(p, (str, Path)) for p in include)
        ):
            raise InvalidSpec(f"App({name!r}): include must be a list of paths")
        self.name = name
        self.env = env
        """The default Env of its functions; None is the server's own Python."""
        self.include = [Path(p) for p in include or ()]
        """More files or directories for the bundle, relative to the app's file."""
        self.envs: dict[str, Env | None] = {}
        """unit -> the Env it names (`@app.function(env=...)`), where it names one."""
        self.units: dict[str, Function | Cls] = {}
        _APPS[name] = self

    def __repr__(self) -> str:
        return f"<ember.App {self.name}>"

    def function(self, fn: Callable[..., Any] | None = None, /, **options: Unpack[Options]) -> Any:
        """Deploy a function; usable bare (`@app.function`) or with options (see `Options`)."""
        spec, env = _spec(options, "@app.function")

        def wrap(f: Callable[..., Any]) -> Function:
            if not callable(f) or inspect.isclass(f):
                raise InvalidSpec(
                    f"@app.function decorates a function, got {f!r}; use @app.cls for classes"
                )
            self._claim(f.__name__)
            handle = Function(self.name, f.__name__, kind=kind_of(f), local=f, spec=spec)
            self.units[f.__name__] = handle
            self.envs[f.__name__] = env
            return handle

        return wrap(fn) if fn is not None else wrap

    def cls(self, **options: Unpack[Options]) -> Callable[[type], Cls]:
        """Deploy a class: `@ember.enter` hooks run once per worker, `@ember.method`s are callable;
        the options (see `Options`) apply to the class's workers."""
        spec, env = _spec(options, "@app.cls")

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
            self.envs[user_cls.__name__] = env
            return handle

        return wrap

    def _claim(self, name: str) -> None:
        if name in self.units:
            raise InvalidSpec(f"app {self.name!r} already has a function or class named {name!r}")

    def env_of(self, unit: str) -> Env | None:
        """The Env a unit runs in: its own, else the App's, else None (the server's Python)."""
        return self.envs.get(unit) or self.env

    def manifest(self, env_ids: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        """What the server needs to know of each callable, without the code itself;
        `env_ids` names the built Env of each unit that has one."""
        out = []
        for unit_name, unit in self.units.items():
            handles = [unit] if isinstance(unit, Function) else list(unit.methods.values())
            for h in handles:
                assert h.spec is not None
                spec = h.spec.to_dict()
                if env_ids and unit_name in env_ids:
                    spec["env"] = env_ids[unit_name]
                out.append(
                    {
                        "name": h.name,
                        "unit": unit_name,
                        "kind": h.kind,
                        "params": h.params,
                        "spec": spec,
                    }
                )
        return out
