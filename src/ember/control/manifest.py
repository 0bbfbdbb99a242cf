"""Deploy manifests: what `ember deploy` sends, checked completely before anything is written.

A client may send anything, so every field is checked here again, with the same spec rules the
SDK applied at decoration time (`ember.core.spec`).
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from ember.core.names import NAME_RE
from ember.core.spec import KINDS, FunctionSpec, SpecError, parse_tags

FN_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}(\.[A-Za-z_][A-Za-z0-9_]{0,63})?$")
"""A function, or a class and its method, each at most 64 characters: the store's columns
(`unit`, `function`), which PostgreSQL enforces."""
MAX_PATH = 255
"""The longest deployed file name and module (the store's `filename` and `module` columns)."""
FILENAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\.py$")
PATH_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*/){0,16}[A-Za-z_][A-Za-z0-9_]*\.py$")
"""The deployed file's path inside a bundle: `main.py`, `pkg/sub/app.py`."""
MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*){0,16}$")
DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
ENV_ID_RE = re.compile(r"^env-[0-9a-f]{16}$")
SERVER_ENV = "server"
"""The environment a function that names none runs in: the server's own Python."""


class DeployError(ValueError):
    """A deploy manifest that cannot be served (HTTP 422)."""


def non_finite(value: Any) -> str | None:
    """Where `value` holds a number JSON cannot carry (`1e400` parses to inf), as a path such as
    `functions[0].params.schema.properties.x.default`, or None. Such a number, stored, would make
    every answer that lists it fail to encode, so it is refused at the door. Iterative: a deeply
    nested document cannot exhaust the stack here."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        v, path = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            return path or "the body"
        if isinstance(v, dict):
            stack.extend((x, f"{path}.{k}" if path else str(k)) for k, x in v.items())
        elif isinstance(v, list):
            stack.extend((x, f"{path}[{i}]") for i, x in enumerate(v))
    return None


def validate_manifest(m: Any) -> dict[str, Any]:
    """Check a deploy manifest completely before anything is written."""
    if not isinstance(m, dict):
        raise DeployError("the deploy body must be a JSON object")
    if (where := non_finite(m)) is not None:
        raise DeployError(
            f"{where} is not a finite number (JSON numbers such as 1e400 overflow to infinity): "
            "use a number between -1.8e308 and 1.8e308"
        )
    name, filename, source, fns = (
        m.get("name"),
        m.get("filename"),
        m.get("source"),
        m.get("functions"),
    )
    bundle, module, wait = m.get("bundle"), m.get("module"), m.get("wait", True)
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise DeployError("'name' must be 1-64 characters of letters, digits, '_', '.', '-'")
    if not isinstance(wait, bool):
        raise DeployError("'wait' must be true or false")
    if bundle is None:
        if (
            not isinstance(filename, str)
            or not FILENAME_RE.fullmatch(filename)
            or len(filename) > MAX_PATH
        ):
            raise DeployError("'filename' must be a Python module file name such as 'hello.py'")
        if not isinstance(source, str):
            raise DeployError("'source' must be the text of the file (or send a 'bundle')")
        module = filename.removesuffix(".py")
    else:
        if not isinstance(bundle, str) or not DIGEST_RE.fullmatch(bundle):
            raise DeployError("'bundle' must be the sha256 (64 hex digits) of an uploaded bundle")
        if not isinstance(filename, str) or not PATH_RE.fullmatch(filename):
            raise DeployError("'filename' must be the deployed file's path in the bundle")
        if len(filename) > MAX_PATH:
            raise DeployError(f"'filename' must be at most {MAX_PATH} characters")
        if not isinstance(module, str) or not MODULE_RE.fullmatch(module) or len(module) > MAX_PATH:
            raise DeployError("'module' must be a dotted module name such as 'pkg.main'")
        if source is not None:
            raise DeployError("send either 'source' (one file) or 'bundle', not both")
    try:
        tags = parse_tags(m.get("tags"))
    except SpecError as exc:
        raise DeployError(str(exc)) from None
    if not isinstance(fns, list) or not fns:
        raise DeployError(f"app {name!r} has no functions: decorate some with @app.function")
    seen: dict[str, str] = {}
    clean: list[dict[str, Any]] = []
    for f in fns:
        if not isinstance(f, dict):
            raise DeployError("each entry of 'functions' must be an object")
        fname, unit, kind, params = f.get("name"), f.get("unit"), f.get("kind"), f.get("params")
        if not isinstance(fname, str) or not FN_NAME_RE.fullmatch(fname):
            raise DeployError(
                f"function name {fname!r} must be NAME or Class.method (each at most 64 characters)"
            )
        if fname in seen:
            raise DeployError(f"function {fname!r} appears twice")
        if not isinstance(unit, str) or fname.split(".")[0] != unit:
            raise DeployError(f"function {fname!r}: 'unit' must be {fname.split('.')[0]!r}")
        if kind not in KINDS:
            raise DeployError(f"function {fname!r}: 'kind' must be one of {', '.join(KINDS)}")
        if not isinstance(params, dict) or not isinstance(params.get("names"), list):
            raise DeployError(f"function {fname!r}: 'params' must describe its parameters")
        try:
            Draft202012Validator.check_schema(params.get("schema") or {})
            spec = FunctionSpec.from_dict(f.get("spec") or {})
        except SchemaError as exc:
            raise DeployError(f"function {fname!r}: bad parameter schema: {exc.message}") from None
        except (SpecError, TypeError) as exc:
            raise DeployError(f"function {fname!r}: {exc}") from None
        if spec.env == SERVER_ENV:
            spec = replace(spec, env=None)
        if spec.env is not None and not ENV_ID_RE.fullmatch(spec.env):
            raise DeployError(
                f"function {fname!r}: env must name an environment built here (an Env id, "
                f"env-..., from POST /v1/envs) or {SERVER_ENV!r}; got {spec.env!r}"
            )
        if unit in seen.values() and any(
            c["unit"] == unit and c["spec"] != spec.to_dict() for c in clean
        ):
            raise DeployError(f"methods of {unit!r} must share one spec")
        seen[fname] = unit
        clean.append(
            {
                "name": fname,
                "unit": unit,
                "kind": kind,
                "params": params,
                "spec": spec.to_dict(),
            }
        )
    return {
        "name": name,
        "filename": filename,
        "source": source,
        "bundle": bundle,
        "module": module,
        "wait": wait,
        "tags": tags,
        "functions": clean,
    }
