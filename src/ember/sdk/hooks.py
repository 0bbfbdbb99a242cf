"""Lifecycle markers for methods of an `@app.cls` class."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

ENTER = "__ember_enter__"
EXIT = "__ember_exit__"
METHOD = "__ember_method__"


def enter(*, snap: bool = False) -> Callable[[F], F]:
    """Run once per worker before its first job (model loading goes here).

    `snap=True` marks CPU-side work that a template may run once and share with every fork.
    """

    def mark(fn: F) -> F:
        setattr(fn, ENTER, {"snap": bool(snap)})
        return fn

    return mark


def exit() -> Callable[[F], F]:
    """Run when the worker drains (scale-down, redeploy, server stop)."""

    def mark(fn: F) -> F:
        setattr(fn, EXIT, True)
        return fn

    return mark


def method() -> Callable[[F], F]:
    """Expose a method of an `@app.cls` class as a callable function (`Class.method`)."""

    def mark(fn: F) -> F:
        setattr(fn, METHOD, True)
        return fn

    return mark


def hooks_of(cls: type) -> tuple[list[str], list[str], list[str]]:
    """(enter hooks, snap ones first; exit hooks; methods), by attribute name in definition order."""
    enters: list[tuple[bool, str]] = []
    exits: list[str] = []
    methods: list[str] = []
    for name, value in _members(cls):
        if getattr(value, ENTER, None) is not None:
            enters.append((not getattr(value, ENTER)["snap"], name))
        if getattr(value, EXIT, False):
            exits.append(name)
        if getattr(value, METHOD, False):
            methods.append(name)
    return [n for _, n in sorted(enters, key=lambda e: e[0])], exits, methods


def _members(cls: type) -> list[tuple[str, Any]]:
    seen: dict[str, Any] = {}
    for klass in reversed(cls.__mro__[:-1]):
        for name, value in vars(klass).items():
            seen[name] = value
    return list(seen.items())
