"""The pure side of the RunPod-compatible API (`ember.core.runpod`): endpoint ids, request
bodies and policies, status, stream and health bodies, the endpoint list."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ember.core import runpod as rp
from ember.core.jobs import JobOptions
from ember.core.names import NAME

names = st.from_regex(NAME, fullmatch=True)


# ----------------------------------------------------------------------------- endpoint ids


@given(names, st.one_of(names, st.tuples(names, names).map(".".join)))
def test_an_endpoint_id_reads_back_as_its_app_and_function(app: str, fn: str) -> None:
    assert rp.SEPARATOR not in app + fn
    assert rp.parse_endpoint(rp.endpoint_id(app, fn)) == (app, fn)


@given(names)
def test_an_app_alone_is_an_endpoint_without_a_function(app: str) -> None:
    assert rp.parse_endpoint(app) == (app, None)


def test_an_app_alone_names_its_handler_or_its_only_function() -> None:
    assert rp.resolve(["handler", "other"]) == "handler"
    assert rp.resolve(["square"]) == "square"
    assert rp.resolve(["a", "b"]) is None
    assert rp.resolve([]) is None


def test_the_endpoint_list_names_every_function_and_the_alias_where_one_applies() -> None:
    apps = [
        {"name": "hello", "functions": [{"name": "add"}, {"name": "Counter.add"}]},
        {"name": "rp", "functions": [{"name": "handler"}, {"name": "warm"}]},
        {"name": "one", "functions": [{"name": "square"}]},
    ]
    got = {e["endpoint_id"]: e for e in rp.endpoints(apps)}
    assert got == {
        "hello~add": {"endpoint_id": "hello~add", "app": "hello", "function": "add", "aliases": []},
        "hello~Counter.add": {
            "endpoint_id": "hello~Counter.add",
            "app": "hello",
            "function": "Counter.add",
            "aliases": [],
        },
        "rp~handler": {
            "endpoint_id": "rp~handler",
            "app": "rp",
            "function": "handler",
            "aliases": ["rp"],
        },
        "rp~warm": {"endpoint_id": "rp~warm", "app": "rp", "function": "warm", "aliases": []},
        "one~square": {
            "endpoint_id": "one~square",
            "app": "one",
            "function": "square",
            "aliases": ["one"],
        },
    }


# ----------------------------------------------------------------------------- requests


def test_a_request_becomes_job_options() -> None:
    req = rp.parse_request(
        {
            "input": {"x": 1},
            "webhook": "https://example.com/hook",
            "policy": {"executionTimeout": 5000, "ttl": 60_000, "lowPriority": True},
        },
        rp.RUN_RETENTION_S,
    )
    assert req.input == {"x": 1}
    assert req.low_priority is True
    assert req.options == JobOptions(
        webhook="https://example.com/hook",
        ttl_s=60.0,
        timeout_s=5.0,
        retain_s=rp.RUN_RETENTION_S,
        via="runpod",
    )


def test_a_bare_input_is_a_plain_job_kept_as_long_as_asked() -> None:
    req = rp.parse_request({"input": {}}, 7.0)
    assert req.options == JobOptions(retain_s=7.0, via="runpod")
    assert req.low_priority is False


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ([1], "JSON object"),
        ({}, "'input'"),
        ({"input": {}, "inputs": {}}, "unknown field 'inputs'"),
        ({"input": {}, "webhook": "ftp://x/y"}, "http:// or https://"),
        ({"input": {}, "webhook": "file:///etc/passwd"}, "http:// or https://"),
        ({"input": {}, "webhook": "http://"}, "with a host"),
        ({"input": {}, "webhook": "http://a b/"}, "without spaces"),
        ({"input": {}, "webhook": 3}, "URL string"),
        ({"input": {}, "policy": []}, "policy must be an object"),
        ({"input": {}, "policy": {"ttl": -1}}, "policy.ttl must be more than 0"),
        ({"input": {}, "policy": {"ttl": 0}}, "policy.ttl must be more than 0"),
        ({"input": {}, "policy": {"executionTimeout": -5}}, "policy.executionTimeout"),
        ({"input": {}, "policy": {"ttl": "60s"}}, "number of milliseconds"),
        ({"input": {}, "policy": {"ttl": True}}, "number of milliseconds"),
        ({"input": {}, "policy": {"ttl": 8 * 24 * 3600 * 1000}}, "7 days"),
        ({"input": {}, "policy": {"lowPriority": "yes"}}, "true or false"),
        ({"input": {}, "policy": {"priority": 1}}, "unknown policy field 'priority'"),
    ],
)
def test_a_bad_request_names_what_is_wrong(body: Any, words: str) -> None:
    with pytest.raises(rp.RequestError, match=None) as caught:
        rp.parse_request(body, 60.0)
    assert words in str(caught.value)


@given(st.floats(allow_nan=True, allow_infinity=True) | st.integers())
def test_a_policy_time_is_taken_only_when_positive_finite_and_at_most_a_week(value: Any) -> None:
    try:
        req = rp.parse_request({"input": {}, "policy": {"ttl": value}}, 60.0)
    except rp.RequestError:
        assert not (0 < value <= rp.MAX_POLICY_MS)
    else:
        assert 0 < value <= rp.MAX_POLICY_MS
        assert req.options.ttl_s == pytest.approx(value / 1000.0)


@pytest.mark.parametrize(
    ("text", "seconds"), [(None, 90.0), ("", 90.0), ("0", 0.0), ("1500", 1.5), ("300000", 300.0)]
)
def test_wait_is_milliseconds(text: str | None, seconds: float) -> None:
    assert rp.parse_wait(text, rp.RUNSYNC_WAIT_MS, rp.RUNSYNC_MAX_WAIT_MS) == seconds


@pytest.mark.parametrize("text", ["-1", "300001", "1.5", "soon", "1e3"])
def test_a_bad_wait_is_refused(text: str) -> None:
    with pytest.raises(rp.RequestError, match="wait must be"):
        rp.parse_wait(text, rp.RUNSYNC_WAIT_MS, rp.RUNSYNC_MAX_WAIT_MS)


# ----------------------------------------------------------------------------- answers

TIMINGS = {"queue_ms": 1.2, "cold_start_ms": 30.0, "load_ms": 4.0, "exec_ms": 12.6}


def body(status: str, **kw: Any) -> dict[str, Any]:
    return {"id": "job-1", "status": status, "output": None, "error": None, **kw}


def test_a_completed_job_as_runpod_shows_it() -> None:
    got = rp.status_body(body("COMPLETED", output={"y": 2}, timings=TIMINGS), "w-1")
    assert got == {
        "id": "job-1",
        "status": "COMPLETED",
        "delayTime": 35,
        "executionTime": 13,
        "workerId": "w-1",
        "output": {"y": 2},
    }


def test_a_failed_job_shows_its_message_and_a_running_one_its_progress() -> None:
    failed = body("FAILED", error={"type": "ValueError", "message": "boom", "traceback": "..."})
    assert rp.status_body(failed) == {"id": "job-1", "status": "FAILED", "error": "boom"}
    running = body("IN_PROGRESS", progress={"step": 3})
    assert rp.status_body(running) == {
        "id": "job-1",
        "status": "IN_PROGRESS",
        "output": {"step": 3},
    }
    assert rp.status_body(body("IN_QUEUE")) == {"id": "job-1", "status": "IN_QUEUE"}


def test_stream_chunks_are_a_generators_values_or_the_output_once_at_the_end() -> None:
    assert rp.chunks("IN_PROGRESS", None, [1, 2], generator=True) == [1, 2]
    assert rp.chunks("COMPLETED", [1, 2, 3], None, generator=True) == [1, 2, 3]
    assert rp.chunks("FAILED", None, None, generator=True) == []
    assert rp.chunks("IN_PROGRESS", None, [], generator=False) == []
    assert rp.chunks("COMPLETED", [1, 2], [], generator=False) == [[1, 2]]
    assert rp.stream_body(body("IN_PROGRESS"), [1, "a"]) == {
        "status": "IN_PROGRESS",
        "stream": [{"output": 1}, {"output": "a"}],
    }
    failed = body("FAILED", error={"message": "boom"})
    assert rp.stream_body(failed, []) == {"status": "FAILED", "stream": [], "error": "boom"}


def test_health_as_runpod_counts_it() -> None:
    ember_health = {
        "jobs": {
            "in_queue": 2,
            "in_progress": 1,
            "completed": 5,
            "failed": 1,
            "cancelled": 3,
            "timed_out": 2,
            "retried": 4,
        },
        "workers": {"starting": 1, "idle": 2, "busy": 1, "draining": 0},
        "version": 3,
    }
    assert rp.health_body(ember_health) == {
        "jobs": {"completed": 5, "failed": 3, "inProgress": 1, "inQueue": 2, "retried": 4},
        "workers": {"idle": 2, "running": 1, "initializing": 1},
    }
