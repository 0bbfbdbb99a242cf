"""A function's parameters as JSON Schema, computed where the annotations are live (deploy time).

The server validates inputs against this schema without importing user code, so a wrong type is
a 422 at the door rather than a failed job later.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, get_type_hints


def describe(fn: Callable[..., Any], *, skip_self: bool = False) -> dict[str, Any]:
    sig = inspect.signature(fn)
    try:
        hints = get_type_hints(fn)
    except Exception:  # unresolvable forward references: validate names only
        hints = {}
    names: list[str] = []
    required: list[str] = []
    properties: dict[str, Any] = {}
    defs: dict[str, Any] = {}
    var_kwargs = False
    params = list(sig.parameters.values())
    if skip_self and params:
        params = params[1:]
    for p in params:
        if p.kind is p.VAR_KEYWORD:
            var_kwargs = True
            continue
        if p.kind is p.VAR_POSITIONAL:
            continue
        names.append(p.name)
        if p.default is p.empty:
            required.append(p.name)
        schema = _schema_for(hints.get(p.name, p.annotation), defs)
        properties[p.name] = schema
    schema_doc: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": var_kwargs,
    }
    if defs:
        schema_doc["$defs"] = defs
    return {"names": names, "required": required, "var_kwargs": var_kwargs, "schema": schema_doc}


def _schema_for(annotation: Any, defs: dict[str, Any]) -> dict[str, Any]:
    if annotation is inspect.Parameter.empty or annotation is Any:
        return {}
    try:
        from pydantic import TypeAdapter

        schema = TypeAdapter(annotation).json_schema()
    except Exception:  # a type pydantic cannot describe (numpy arrays, user classes): accept any
        return {}
    defs.update(schema.pop("$defs", {}))
    return schema


def bind(
    names: list[str], args: tuple[Any, ...], kwargs: dict[str, Any], fn: str
) -> dict[str, Any]:
    """Turn a Python call's positional arguments into the keyword object the API takes."""
    if len(args) > len(names):
        raise TypeError(
            f"{fn}() takes {len(names)} positional arguments but {len(args)} were given"
        )
    out = dict(zip(names, args, strict=False))
    for k, v in kwargs.items():
        if k in out:
            raise TypeError(f"{fn}() got multiple values for argument '{k}'")
        out[k] = v
    return out
