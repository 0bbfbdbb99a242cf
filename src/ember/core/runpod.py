"""RunPod Serverless's job API in ember's terms: endpoint ids, request policies, status bodies.

Pure: the `/runpod/v2` router (`api/runpod.py`) and the webhook sender both shape what they
send here, so a status read, a stream's end and a webhook's body agree field for field.

An endpoint id names one function: `APP~FN` (`hello~add`, `hello~Counter.add`). `~` is in no
app or function name, so the id reads back unambiguously and needs no table. `APP` alone names
the app's function `handler` (what `ember deploy --runpod` deploys) or, failing that, its only
function.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ember.core.jobs import JobOptions

SEPARATOR = "~"
HANDLER = "handler"
"""The function `ember deploy --runpod` makes of a handler file, and the one `APP` alone names."""

MAX_WEBHOOK = 2048
MAX_POLICY_MS = 7 * 24 * 3600 * 1000
"""A week, RunPod's own ceiling on a job's lifetime: a longer `ttl` or timeout is refused."""

RUNSYNC_RETENTION_S = 60.0
"""How long a runsync's result is kept, as RunPod documents it (1 minute)."""
RUN_RETENTION_S = 30 * 60.0
"""How long a run's result is kept, as RunPod documents it (30 minutes)."""

STATUS = {
    "IN_QUEUE": "IN_QUEUE",
    "IN_PROGRESS": "IN_PROGRESS",
    "COMPLETED": "COMPLETED",
    "FAILED": "FAILED",
    "CANCELLED": "CANCELLED",
    "TIMED_OUT": "TIMED_OUT",
}
"""ember's job states are RunPod's, name for name."""


class RequestError(ValueError):
    """A RunPod request ember refuses: the message says what to fix."""


def endpoint_id(app: str, fn: str) -> str:
    return f"{app}{SEPARATOR}{fn}"


def parse_endpoint(endpoint: str) -> tuple[str, str | None]:
    """(app, function) of an endpoint id; function None for `APP` alone (see `resolve`)."""
    app, sep, fn = endpoint.partition(SEPARATOR)
    return (app, fn) if sep else (app, None)


def resolve(functions: Iterable[str]) -> str | None:
    """The function `APP` alone names among an app's: `handler`, else its only one."""
    names = list(functions)
    if HANDLER in names:
        return HANDLER
    return names[0] if len(names) == 1 else None


def _ms(policy: dict[str, Any], name: str) -> float | None:
    value = policy.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RequestError(f"policy.{name} must be a number of milliseconds, got {value!r}")
    if value <= 0 or value > MAX_POLICY_MS:
        raise RequestError(
            f"policy.{name} must be more than 0 and at most {MAX_POLICY_MS} ms (7 days), "
            f"got {value:g}"
        )
    return float(value) / 1000.0


def check_webhook(url: Any) -> str:
    """A webhook URL as sent, or RequestError: http(s), with a host, of a sane length."""
    if not isinstance(url, str):
        raise RequestError(f"webhook must be a URL string, got {type(url).__name__}")
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        raise RequestError(f"webhook must be an http:// or https:// URL, got {url[:100]!r}")
    host = rest.split("/", 1)[0].rsplit("@", 1)[-1]
    if not host or len(url) > MAX_WEBHOOK or any(c.isspace() or ord(c) < 32 for c in url):
        raise RequestError(
            f"webhook must be an http(s) URL with a host, without spaces, of at most "
            f"{MAX_WEBHOOK} characters"
        )
    return url


@dataclass(frozen=True, slots=True)
class Request:
    """A RunPod `run` or `runsync` body, checked."""

    input: Any
    options: JobOptions
    low_priority: bool = False


_FIELDS = {"input", "webhook", "policy", "s3Config"}
_POLICY = {"executionTimeout", "ttl", "lowPriority"}


def parse_request(body: Any, retain_s: float) -> Request:
    """`{"input", "webhook", "policy": {"executionTimeout", "ttl", "lowPriority"}}` as ember
    job options; RequestError names the field that is wrong. `retain_s`: how long the result is
    kept (RUN_RETENTION_S or RUNSYNC_RETENTION_S unless the server says otherwise)."""
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise RequestError(f"the body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise RequestError(
            f"unknown field {unknown[0]!r}: a request takes input, webhook and policy"
        )
    if "input" not in body:
        raise RequestError("the body must have an 'input' field")
    webhook = body.get("webhook")
    if webhook is not None:
        webhook = check_webhook(webhook)
    policy = body.get("policy")
    if policy is None:
        policy = {}
    if not isinstance(policy, dict):
        raise RequestError(f"policy must be an object, got {type(policy).__name__}")
    unknown = sorted(set(policy) - _POLICY)
    if unknown:
        raise RequestError(
            f"unknown policy field {unknown[0]!r}: a policy takes executionTimeout, ttl and "
            "lowPriority"
        )
    low = policy.get("lowPriority", False)
    if not isinstance(low, bool):
        raise RequestError(f"policy.lowPriority must be true or false, got {low!r}")
    options = JobOptions(
        webhook=webhook,
        ttl_s=_ms(policy, "ttl"),
        timeout_s=_ms(policy, "executionTimeout"),
        retain_s=retain_s,
        via="runpod",
    )
    return Request(body["input"], options, low)


def status_body(body: dict[str, Any], worker_id: str | None = None) -> dict[str, Any]:
    """A job as RunPod's `status` answers it, from ember's job body: `delayTime` is the wait
    before the code ran (queue, cold start and load), `executionTime` the run itself, in ms.
    A failed job's `error` is its message, as RunPod's workers report one."""
    out: dict[str, Any] = {"id": body["id"], "status": STATUS.get(body["status"], body["status"])}
    timings = body.get("timings")
    if timings:
        delay = timings["queue_ms"] + timings["cold_start_ms"] + timings["load_ms"]
        out["delayTime"] = round(delay)
        out["executionTime"] = round(timings["exec_ms"])
    if worker_id is not None:
        out["workerId"] = worker_id
    if body["status"] == "COMPLETED":
        out["output"] = body.get("output")
    elif body.get("error"):
        error = body["error"]
        out["error"] = error.get("message") if isinstance(error, dict) else str(error)
    elif body["status"] == "IN_PROGRESS" and body.get("progress") is not None:
        out["output"] = body["progress"]
    return out


RUNSYNC_WAIT_MS = 90_000
"""How long `runsync` waits for the job by default, as RunPod does (90 s)."""
RUNSYNC_MAX_WAIT_MS = 300_000
"""The longest `?wait=` RunPod takes (5 minutes)."""


def parse_wait(text: str | None, default_ms: int, max_ms: int) -> float:
    """`?wait=` (milliseconds, RunPod's unit) as seconds; RequestError when it is no whole
    number from 0 to `max_ms`."""
    if text is None or text == "":
        return default_ms / 1000.0
    try:
        ms = int(text)
    except ValueError:
        raise RequestError(
            f"wait must be a whole number of milliseconds, got {text[:40]!r}"
        ) from None
    if ms < 0 or ms > max_ms:
        raise RequestError(f"wait must be from 0 to {max_ms} ms, got {ms}")
    return ms / 1000.0


def health_body(health: dict[str, Any]) -> dict[str, Any]:
    """RunPod's `health` from ember's (`jobs` by state, `workers` by state). A timed-out job
    counts as failed, as RunPod counts it; a starting worker is `initializing`."""
    jobs, workers = health["jobs"], health["workers"]
    return {
        "jobs": {
            "completed": jobs.get("completed", 0),
            "failed": jobs.get("failed", 0) + jobs.get("timed_out", 0),
            "inProgress": jobs.get("in_progress", 0),
            "inQueue": jobs.get("in_queue", 0),
            "retried": jobs.get("retried", 0),
        },
        "workers": {
            "idle": workers.get("idle", 0),
            "running": workers.get("busy", 0),
            "initializing": workers.get("starting", 0),
        },
    }


def endpoints(apps: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every function's endpoint, from `GET /v1/apps`' app bodies: its id, app, function, and
    `aliases` (`APP` alone, for the function that names)."""
    out = []
    for app in apps:
        names = [f["name"] for f in app.get("functions", [])]
        alias = resolve(names)
        for fn in names:
            out.append(
                {
                    "endpoint_id": endpoint_id(app["name"], fn),
                    "app": app["name"],
                    "function": fn,
                    "aliases": [app["name"]] if fn == alias else [],
                }
            )
    return out


def chunks(status: str, output: Any, outputs: list[Any] | None, generator: bool) -> list[Any]:
    """Everything a job has streamed so far, in order: a generator's values (`outputs` while it
    lives; its stored output, their list, once it has ended), else its output as one chunk once
    it completed."""
    if generator:
        if outputs:
            return outputs
        return output if status == "COMPLETED" and isinstance(output, list) else []
    return [output] if status == "COMPLETED" else []


def stream_body(body: dict[str, Any], new: list[Any]) -> dict[str, Any]:
    """RunPod's `stream` answer: the status and the chunks not sent before, each
    `{"output": value}`; a failed job's error as `status` shows it."""
    out: dict[str, Any] = {
        "status": STATUS.get(body["status"], body["status"]),
        "stream": [{"output": value} for value in new],
    }
    if body.get("error") and body["status"] != "COMPLETED":
        error = body["error"]
        out["error"] = error.get("message") if isinstance(error, dict) else str(error)
    return out
