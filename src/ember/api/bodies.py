"""A request's parts every endpoint reads the same way: the plane, a JSON body, a call's input,
and the audit trail's entry for what the request did."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from fastapi import Request
from pydantic import BaseModel

from ember.api.auth import Principal
from ember.api.errors import ApiException
from ember.api.schemas import MAX_OPTION_S
from ember.control.plane import ControlPlane
from ember.core.jobs import JobOptions
from ember.core.runpod import RequestError, check_webhook

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def plane(request: Request) -> ControlPlane:
    cp: ControlPlane = request.app.state.plane
    return cp


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def json_body(request: Request) -> Any:
    return parse_json(await request.body())


def parse_json(raw: bytes) -> Any:
    """A request body as JSON ({} when empty), or a 400 that says what is wrong with it."""
    if not raw:
        return {}
    try:
        value = json.loads(raw.decode("utf-8-sig"), parse_constant=_no_constant)
        if _SURROGATE_ESCAPE.search(raw):  # rare: only then look for a lone surrogate
            json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (UnicodeDecodeError, UnicodeEncodeError) as exc:
        raise ApiException(
            400, "invalid_json", f"request body is not valid UTF-8 text: {exc.reason}"
        ) from None
    except RecursionError:
        raise ApiException(400, "invalid_json", "request body is nested too deeply") from None
    except ValueError as exc:
        raise ApiException(400, "invalid_json", f"request body is not valid JSON: {exc}") from None
    return value


async def call_input(request: Request) -> Any:
    return input_of(await request.body())


def input_of(raw: bytes) -> Any:
    """The `input` of a call's body, or a 400 or 422 that says what is wrong with the body."""
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise ApiException(422, "invalid_input", 'the body must be a JSON object: {"input": {...}}')
    unknown = set(body) - {"input"}
    if unknown:
        raise ApiException(
            422,
            "invalid_input",
            f"unexpected field {sorted(unknown)[0]!r}: "
            'the body is {"input": {...keyword arguments...}}',
        )
    return body.get("input", {})


_OPTIONS = frozenset({"input", "webhook", "ttl", "timeout"})


def call_of_body(raw: bytes) -> tuple[Any, JobOptions | None]:
    """The `input` of a call's body and its options (`webhook`, `ttl`, `timeout`; None when
    it has none), or a 400 or 422 that says what is wrong with the body."""
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise ApiException(422, "invalid_input", 'the body must be a JSON object: {"input": {...}}')
    if body.keys() <= {"input"}:
        return body.get("input", {}), None
    unknown = set(body) - _OPTIONS
    if unknown:
        raise ApiException(
            422,
            "invalid_input",
            f"unexpected field {sorted(unknown)[0]!r}: the body is "
            '{"input": {...keyword arguments...}}, with "webhook", "ttl" and "timeout" if wanted',
        )
    webhook = body.get("webhook")
    if webhook is not None:
        try:
            webhook = check_webhook(webhook)
        except RequestError as exc:
            raise ApiException(422, "invalid_request", str(exc)) from None
    ttl, timeout = _seconds(body, "ttl"), _seconds(body, "timeout")
    if webhook is None and ttl is None and timeout is None:
        return body.get("input", {}), None
    return body.get("input", {}), JobOptions(webhook=webhook, ttl_s=ttl, timeout_s=timeout)


def _seconds(body: dict[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ApiException(
            422, "invalid_request", f"{name} must be a number of seconds, got {str(value)[:50]!r}"
        )
    if not 0 < value <= MAX_OPTION_S:
        raise ApiException(
            422,
            "invalid_request",
            f"{name} must be more than 0 and at most {MAX_OPTION_S:g} seconds (7 days), "
            f"got {value:g}",
        )
    return float(value)


def audit(
    request: Request,
    who: Principal | None,
    action: str,
    outcome: str,
    target: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    plane(request).audit.record(
        workspace=who.workspace if who else None,
        actor=who.actor if who else "anonymous",
        action=action,
        outcome=outcome,
        target=target,
        detail=detail,
        ip=request.client.host if request.client else None,
    )


_BAD_JSON: dict[str, Any] = {
    "description": "a request body that is not JSON, or not UTF-8",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
}


def openapi_body(model: type[BaseModel]) -> dict[str, Any]:
    """Document a JSON body that the handler parses itself (for its own 400/422 messages); it
    may be left out when none of its fields is required."""
    schema = model.model_json_schema()
    schema = _inline(schema, schema.get("$defs", {}))
    return {
        "requestBody": {
            "required": bool(schema.get("required")),
            "content": {"application/json": {"schema": schema}},
        },
        "responses": {"400": _BAD_JSON},
    }


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """The schema with its `#/$defs/...` references replaced by what they name: inside an
    OpenAPI document such a reference points at the document's root, where nothing is, and
    ReDoc refuses the whole document."""
    if isinstance(node, dict):
        ref = node.get("$ref", "")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            named = _inline(defs[ref.removeprefix("#/$defs/")], defs)
            return {**named, **{k: v for k, v in node.items() if k != "$ref"}}
        return {k: _inline(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node
