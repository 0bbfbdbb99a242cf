"""The kind of a user's function: how it is called and how its results come back.

One of `ember.core.spec.KINDS`: a plain function, a generator (streams its values), a coroutine
function, or an async generator. Both `@app.function` and `@app.cls` methods are read with it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any


def kind_of(fn: Callable[..., Any]) -> str:
    if inspect.isasyncgenfunction(fn):
        return "async_generator"
    if inspect.iscoroutinefunction(fn):
        return "async"
    if inspect.isgeneratorfunction(fn):
        return "generator"
    return "function"
