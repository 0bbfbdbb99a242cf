"""The pure core, without any server: autoscaling decisions, latency terms, spec validation."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.core.autoscaler import (
    Decision,
    PoolView,
    WorkerState,
    WorkerView,
    decide,
    desired_workers,
    next_expiry,
)
from ember.core.jobs import JobStatus, should_retry, startup_backoff
from ember.core.spec import FunctionSpec, GpuRequest, ScalingSpec, SpecError, make_spec
from ember.core.timings import Timings, WorkerStart, job_timings

LIVE = (WorkerState.STARTING, WorkerState.IDLE, WorkerState.BUSY)


def idle(wid: str, since: float, last_used: float | None = None) -> WorkerView:
    return WorkerView(wid, WorkerState.IDLE, since, since if last_used is None else last_used)


def busy(wid: str, last_used: float = 0.0) -> WorkerView:
    return WorkerView(wid, WorkerState.BUSY, None, last_used)


def starting(wid: str) -> WorkerView:
    return WorkerView(wid, WorkerState.STARTING)


def scaling(**kw: float) -> ScalingSpec:
    return make_spec(**kw).scaling


# ----------------------------------------------------------------------------- autoscaler
class TestDecide:
    def test_starts_from_zero_at_once(self) -> None:
        assert decide(PoolView(1, 0, ()), scaling(), now=0.0) == Decision(start=1)

    def test_nothing_to_do_with_no_work_and_no_workers(self) -> None:
        assert decide(PoolView(0, 0, ()), scaling(), now=0.0) == Decision()

    def test_clamped_to_max_workers(self) -> None:
        assert decide(PoolView(100, 0, ()), scaling(max_workers=3), 0.0).start == 3
        pool = PoolView(100, 2, (busy("a"), busy("b")))
        assert decide(pool, scaling(max_workers=3), 0.0).start == 1
        full = PoolView(100, 3, (busy("a"), busy("b"), busy("c")))
        assert decide(full, scaling(max_workers=3), 0.0) == Decision()

    def test_min_workers_started_without_work(self) -> None:
        assert decide(PoolView(0, 0, ()), scaling(min_workers=2), 0.0).start == 2

    def test_min_workers_never_stopped_however_idle(self) -> None:
        pool = PoolView(0, 0, (idle("a", 0.0), idle("b", 0.0)))
        assert decide(pool, scaling(min_workers=2, idle_timeout=1), now=1e6) == Decision()
        three = PoolView(0, 0, (idle("a", 0.0), idle("b", 0.0), idle("c", 0.0)))
        assert len(decide(three, scaling(min_workers=2, idle_timeout=1), now=1e6).stop) == 1

    def test_buffer_workers_added_to_demand(self) -> None:
        assert decide(PoolView(1, 0, ()), scaling(buffer_workers=2), 0.0).start == 3
        # a buffer with no demand keeps warm workers ready for the next burst
        assert decide(PoolView(0, 0, ()), scaling(buffer_workers=1), 0.0).start == 1
        # ... but never beyond max_workers
        assert decide(PoolView(4, 0, ()), scaling(buffer_workers=5, max_workers=6), 0.0).start == 6

    def test_concurrency_divides_demand(self) -> None:
        assert decide(PoolView(4, 0, ()), scaling(concurrency=4), 0.0).start == 1
        assert decide(PoolView(5, 0, ()), scaling(concurrency=4), 0.0).start == 2
        pool = PoolView(3, 4, (busy("a"),))
        assert decide(pool, scaling(concurrency=4), 0.0).start == 1

    def test_starting_workers_count_as_capacity(self) -> None:
        pool = PoolView(2, 0, (starting("a"), starting("b")))
        assert decide(pool, scaling(), 0.0) == Decision()

    def test_draining_and_stopped_workers_are_not_capacity(self) -> None:
        gone = (
            WorkerView("a", WorkerState.DRAINING),
            WorkerView("b", WorkerState.STOPPED),
        )
        assert decide(PoolView(1, 0, gone), scaling(), 0.0) == Decision(start=1)

    def test_idle_worker_stopped_only_past_idle_timeout(self) -> None:
        pool = PoolView(0, 0, (idle("a", since=10.0),))
        spec = scaling(idle_timeout=5)
        assert decide(pool, spec, now=14.9) == Decision()
        assert decide(pool, spec, now=15.0) == Decision(stop=("a",))
        assert decide(pool, spec, now=100.0) == Decision(stop=("a",))

    def test_idle_timeout_zero_stops_at_once(self) -> None:
        pool = PoolView(0, 0, (idle("a", since=10.0),))
        assert decide(pool, scaling(idle_timeout=0), now=10.0) == Decision(stop=("a",))

    def test_least_recently_used_stopped_first(self) -> None:
        workers = (
            idle("recent", since=50.0, last_used=50.0),
            idle("oldest", since=10.0, last_used=10.0),
            idle("middle", since=30.0, last_used=30.0),
        )
        spec = scaling(min_workers=1, idle_timeout=1)
        assert decide(PoolView(0, 0, workers), spec, now=100.0).stop == ("oldest", "middle")
        spec2 = scaling(min_workers=2, idle_timeout=1)
        assert decide(PoolView(0, 0, workers), spec2, now=100.0).stop == ("oldest",)

    def test_only_surplus_idle_workers_stopped(self) -> None:
        workers = (idle("a", 0.0), idle("b", 0.0), busy("c"))
        # one job running, one queued: two workers are wanted, so one idle worker goes
        decision = decide(PoolView(1, 1, workers), scaling(idle_timeout=1), now=100.0)
        assert decision == Decision(stop=("a",))

    def test_never_stops_starting_or_busy_workers(self) -> None:
        workers = (starting("s1"), starting("s2"), busy("b1"), busy("b2"))
        assert decide(PoolView(0, 0, workers), scaling(idle_timeout=0), now=1e9) == Decision()
        mixed = (*workers, idle("i", 0.0))
        assert decide(PoolView(0, 0, mixed), scaling(idle_timeout=0), now=1e9).stop == ("i",)

    def test_desired_workers(self) -> None:
        spec = scaling(min_workers=1, max_workers=5, concurrency=2, buffer_workers=1)
        assert desired_workers(PoolView(0, 0, ()), spec) == 1
        assert desired_workers(PoolView(3, 0, ()), spec) == 3
        assert desired_workers(PoolView(50, 50, ()), spec) == 5

    def test_next_expiry(self) -> None:
        spec = scaling(idle_timeout=5)
        assert next_expiry(PoolView(0, 0, ()), spec) is None
        assert next_expiry(PoolView(0, 0, (busy("b"),)), spec) is None
        pool = PoolView(0, 0, (idle("a", 20.0), idle("b", 10.0), busy("c")))
        assert next_expiry(pool, spec) == 15.0


# hypothesis: any pool, any spec, any instant
states = st.sampled_from(list(WorkerState))


@st.composite
def pools(draw: st.DrawFn) -> tuple[PoolView, ScalingSpec, float]:
    mx = draw(st.integers(1, 12))
    spec = ScalingSpec(
        min_workers=draw(st.integers(0, mx)),
        max_workers=mx,
        buffer_workers=draw(st.integers(0, 4)),
        idle_timeout=draw(st.sampled_from([0.0, 0.5, 1.0, 60.0])),
        concurrency=draw(st.integers(1, 5)),
    )
    now = 1000.0
    workers = []
    for i in range(draw(st.integers(0, mx + 2))):
        state = draw(states)
        since = draw(st.floats(900.0, 1000.0)) if state is WorkerState.IDLE else None
        workers.append(WorkerView(f"w{i}", state, since, draw(st.floats(0.0, 1000.0))))
    busy_slots = sum(1 for w in workers if w.state is WorkerState.BUSY) * spec.concurrency
    running = draw(st.integers(0, busy_slots))
    queued = draw(st.integers(0, 40))
    return PoolView(queued, running, tuple(workers)), spec, now


def live_after(pool: PoolView, d: Decision) -> int:
    return sum(1 for w in pool.workers if w.state in LIVE) + d.start - len(d.stop)


@given(pools())
@settings(max_examples=400, deadline=None)
def test_decision_respects_min_and_max(case: tuple[PoolView, ScalingSpec, float]) -> None:
    pool, spec, now = case
    before = sum(1 for w in pool.workers if w.state in LIVE)
    d = decide(pool, spec, now)
    after = live_after(pool, d)
    assert d.start >= 0
    assert not (d.start and d.stop), "a decision either starts or stops"
    assert after >= spec.min_workers
    assert after <= max(spec.max_workers, before)
    if before <= spec.max_workers:
        assert after <= spec.max_workers


@given(pools())
@settings(max_examples=400, deadline=None)
def test_only_expired_idle_workers_are_stopped(case: tuple[PoolView, ScalingSpec, float]) -> None:
    pool, spec, now = case
    d = decide(pool, spec, now)
    by_id = {w.id: w for w in pool.workers}
    assert len(set(d.stop)) == len(d.stop)
    for wid in d.stop:
        w = by_id[wid]
        assert w.state is WorkerState.IDLE, f"stopped a {w.state} worker"
        assert w.idle_since is not None and now - w.idle_since >= spec.idle_timeout
    # least recently used first: every kept expired idle worker was used after every stopped one
    expired_kept = [
        w
        for w in pool.workers
        if w.state is WorkerState.IDLE
        and w.idle_since is not None
        and now - w.idle_since >= spec.idle_timeout
        and w.id not in d.stop
    ]
    for wid in d.stop:
        for kept in expired_kept:
            assert (by_id[wid].last_used, wid) <= (kept.last_used, kept.id)


@given(pools())
@settings(max_examples=400, deadline=None)
def test_queued_work_gets_a_worker_when_capacity_exists(
    case: tuple[PoolView, ScalingSpec, float],
) -> None:
    pool, spec, now = case
    d = decide(pool, spec, now)
    after = live_after(pool, d)
    needed = math.ceil((pool.queued + pool.running) / spec.concurrency)
    assert after >= min(spec.max_workers, needed)
    if pool.queued and spec.max_workers >= 1:
        assert after >= 1


@given(pools())
@settings(max_examples=200, deadline=None)
def test_decide_is_pure_and_deterministic(case: tuple[PoolView, ScalingSpec, float]) -> None:
    pool, spec, now = case
    assert decide(pool, spec, now) == decide(pool, spec, now)


# ----------------------------------------------------------------------------- timings
def total_of(t: Timings) -> float:
    return t.queue_ms + t.cold_start_ms + t.load_ms + t.exec_ms + t.post_ms


class TestTimings:
    def test_warm_job_has_no_cold_start_or_load(self) -> None:
        warm = WorkerStart(spawned=0.0, connected=0.5, ready=0.7)
        t = job_timings(created=10.0, dispatched=10.002, finished=10.1, exec_s=0.09, worker=warm)
        assert t.cold_start_ms == 0.0 and t.load_ms == 0.0
        assert t.queue_ms == pytest.approx(2.0)
        assert t.exec_ms == pytest.approx(90.0)
        assert t.post_ms == pytest.approx(8.0)
        assert t.total_ms == pytest.approx(100.0)
        assert total_of(t) == pytest.approx(t.total_ms, abs=0.01)

    def test_job_waiting_on_a_starting_worker_shows_cold_start_and_load(self) -> None:
        w = WorkerStart(spawned=1.1, connected=1.5, ready=1.8)
        t = job_timings(created=1.0, dispatched=1.8, finished=2.0, exec_s=0.15, worker=w)
        assert t.queue_ms == pytest.approx(100.0)
        assert t.cold_start_ms == pytest.approx(400.0)
        assert t.load_ms == pytest.approx(300.0)
        assert t.exec_ms == pytest.approx(150.0)
        assert t.post_ms == pytest.approx(50.0)
        assert t.total_ms == pytest.approx(1000.0)

    def test_job_arriving_mid_start_gets_only_the_rest_of_it(self) -> None:
        w = WorkerStart(spawned=0.0, connected=1.0, ready=2.0)
        t = job_timings(created=1.5, dispatched=2.0, finished=2.5, exec_s=0.4, worker=w)
        assert t.cold_start_ms == 0.0
        assert t.load_ms == pytest.approx(500.0)
        assert t.queue_ms == pytest.approx(0.0)

    def test_never_dispatched_is_all_queue(self) -> None:
        t = job_timings(created=0.0, dispatched=None, finished=3.0, exec_s=0.0, worker=None)
        assert t == Timings(3000.0, 0.0, 0.0, 0.0, 0.0, 3000.0)

    def test_exec_never_exceeds_the_time_on_the_worker(self) -> None:
        t = job_timings(created=0.0, dispatched=1.0, finished=1.5, exec_s=9.0, worker=None)
        assert t.exec_ms == pytest.approx(500.0)
        assert t.post_ms == 0.0
        assert total_of(t) == pytest.approx(t.total_ms, abs=0.01)

    def test_unreported_exec_is_the_whole_time_on_the_worker(self) -> None:
        """Cancelled, timed out or crashed: the worker never said, so it all ran as exec."""
        warm = WorkerStart(spawned=0.0, connected=0.1, ready=0.2)
        t = job_timings(created=1.0, dispatched=1.01, finished=3.01, exec_s=None, worker=warm)
        assert t.exec_ms == pytest.approx(2000.0)
        assert t.post_ms == 0.0 and t.queue_ms == pytest.approx(10.0)
        assert total_of(t) == pytest.approx(t.total_ms, abs=0.01)

    def test_to_dict_has_every_term(self) -> None:
        t = job_timings(created=0.0, dispatched=0.1, finished=0.2, exec_s=0.05, worker=None)
        assert set(t.to_dict()) == {
            "queue_ms",
            "cold_start_ms",
            "load_ms",
            "exec_ms",
            "post_ms",
            "total_ms",
        }


seconds = st.floats(0.0, 100.0, allow_nan=False)


@given(
    created=seconds,
    wait=seconds,
    run=seconds,
    exec_frac=st.one_of(st.none(), st.floats(0.0, 1.5)),
    worker=st.one_of(st.none(), st.tuples(seconds, seconds, seconds)),
)
@settings(max_examples=500, deadline=None)
def test_terms_always_sum_to_total(
    created: float,
    wait: float,
    run: float,
    exec_frac: float | None,
    worker: tuple[float, float, float] | None,
) -> None:
    start = None
    if worker is not None:
        a, b, c = sorted(worker)
        start = WorkerStart(a, b, c)
    t = job_timings(
        created=created,
        dispatched=created + wait,
        finished=created + wait + run,
        exec_s=None if exec_frac is None else run * exec_frac,
        worker=start,
    )
    for term in (t.queue_ms, t.cold_start_ms, t.load_ms, t.exec_ms, t.post_ms):
        assert term >= 0.0
    assert total_of(t) == pytest.approx(t.total_ms, abs=0.01)
    assert t.cold_start_ms + t.load_ms <= wait * 1000.0 + 0.01
    assert t.exec_ms <= run * 1000.0 + 0.01


# ----------------------------------------------------------------------------- jobs
def test_terminal_states() -> None:
    assert not JobStatus.IN_QUEUE.terminal and not JobStatus.IN_PROGRESS.terminal
    for s in ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"):
        assert JobStatus(s).terminal


def test_should_retry() -> None:
    assert not should_retry(1, 0)
    assert should_retry(1, 2) and should_retry(2, 2)
    assert not should_retry(3, 2)


def test_startup_backoff_grows_and_is_capped() -> None:
    assert startup_backoff(0) == 0.0
    steps = [startup_backoff(n) for n in range(1, 12)]
    assert steps == sorted(steps) and steps[0] > 0
    assert max(steps) == 30.0


# ----------------------------------------------------------------------------- spec
class TestSpec:
    def test_defaults(self) -> None:
        spec = make_spec()
        assert spec.scaling == ScalingSpec(0, 10, 0, 60.0, 1)
        assert spec.timeout == 300.0 and spec.retries == 0 and spec.gpu == ()

    def test_full_spec_round_trips_through_a_dict(self) -> None:
        spec = make_spec(
            gpu=["h100:2", "A100-80GB"],
            cpu=2,
            memory="8GiB",
            min_workers=1,
            max_workers=4,
            buffer_workers=1,
            idle_timeout=1.5,
            concurrency=3,
            timeout=2,
            retries=2,
            tags={"team": "search"},
            env="server",
        )
        assert spec.gpu == (GpuRequest("H100", 2), GpuRequest("A100-80GB", 1))
        assert spec.memory_mib == 8192 and spec.cpu == 2.0
        assert FunctionSpec.from_dict(spec.to_dict()) == spec

    @pytest.mark.parametrize(
        ("memory", "mib"),
        [(512, 512), ("512MiB", 512), ("2G", 2048), ("1.5GiB", 1536), ("1TB", 1024**2)],
    )
    def test_memory_units(self, memory: object, mib: int) -> None:
        assert make_spec(memory=memory).memory_mib == mib

    @pytest.mark.parametrize(
        ("options", "message"),
        [
            ({"min_workers": 3, "max_workers": 2}, "must not exceed max_workers"),
            ({"min_workers": -1}, "min_workers must be >= 0"),
            ({"max_workers": 0}, "max_workers must be >= 1"),
            ({"max_workers": 2.5}, "max_workers must be an integer"),
            ({"max_workers": True}, "max_workers must be an integer"),
            ({"buffer_workers": -1}, "buffer_workers"),
            ({"concurrency": 0}, "concurrency must be >= 1"),
            ({"idle_timeout": -1}, "idle_timeout must be >= 0"),
            ({"idle_timeout": "60"}, "idle_timeout must be a number"),
            ({"timeout": 0}, "timeout must be > 0"),
            ({"retries": -1}, "retries must be >= 0"),
            ({"gpu": "H100:0"}, "count must be at least 1"),
            ({"gpu": "two H100s"}, "TYPE or TYPE:COUNT"),
            ({"gpu": []}, "gpu must be"),
            ({"gpu": [3]}, "TYPE or TYPE:COUNT"),
            ({"cpu": 0}, "cpu must be a positive number"),
            ({"cpu": "2"}, "cpu must be a positive number"),
            ({"memory": "lots"}, "memory must be"),
            ({"memory": 0}, "memory must be positive"),
            ({"tags": ["team"]}, "tags must be a dict"),
            ({"tags": {"": "x"}}, "key"),
            ({"tags": {"team": 1}}, "must be a string"),
            ({"env": ""}, "env must be the name"),
        ],
    )
    def test_invalid_options_say_what_is_wrong(self, options: dict, message: str) -> None:
        with pytest.raises(SpecError, match=message):
            make_spec(**options)

    def test_from_dict_rejects_bad_scaling(self) -> None:
        with pytest.raises(SpecError, match="'scaling' must be an object"):
            FunctionSpec.from_dict({"scaling": [1]})
        with pytest.raises(SpecError, match="max_workers"):
            FunctionSpec.from_dict({"scaling": {"max_workers": -2}})


def test_queued_jobs_fail_at_once_on_a_reported_startup_error_else_after_three() -> None:
    from ember.core.jobs import fail_queued_on_startup_failure

    assert fail_queued_on_startup_failure(1, reported_error=True)
    assert not fail_queued_on_startup_failure(1, reported_error=False)
    assert not fail_queued_on_startup_failure(2, reported_error=False)
    assert fail_queued_on_startup_failure(3, reported_error=False)
