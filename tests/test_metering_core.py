"""Usage arithmetic (`ember.core.metering`): records, a job's cost, grouped totals."""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.core.metering import (
    Cost,
    Phase,
    UsageRecord,
    group_key,
    job_cost,
    make_record,
    summarize,
)
from ember.core.pricing import PriceTable, Resources, rate, rounding_ms

PRICES = PriceTable()
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z, a whole day
L4 = Resources("L4", 1, cpu=2, memory_gib=8)
CPU = Resources(None, 0, cpu=1, memory_gib=1)


def rec(
    phase: Phase,
    start: float,
    end: float,
    *,
    worker: str = "w1",
    app: str = "demo",
    unit: str = "f",
    resources: Resources = L4,
    tags: dict[str, str] | None = None,
    starts: int = 0,
    extra_billed_ms: float = 0.0,
    prices: PriceTable = PRICES,
) -> UsageRecord:
    return make_record(
        worker=worker,
        app=app,
        unit=unit,
        version=1,
        phase=phase,
        start=start,
        end=end,
        resources=resources,
        prices=prices,
        tags=tags or {},
        starts=starts,
        extra_billed_ms=extra_billed_ms,
    )


# --------------------------------------------------------------------------- make_record


def test_a_record_costs_its_rate_times_its_billed_seconds() -> None:
    r = rec(Phase.BUSY, T0, T0 + 2.5, tags={"team": "search"}, starts=1)
    assert r.ms == pytest.approx(2500)
    assert r.billed_ms == pytest.approx(2500)
    assert r.usd == pytest.approx(rate(L4, PRICES) * 2.5)
    assert r.usd == pytest.approx(2.5 * (0.000222 + 2 * 0.0000131 + 8 * 0.00000222))
    assert (r.worker, r.app, r.unit, r.version, r.phase, r.starts) == (
        "w1",
        "demo",
        "f",
        1,
        Phase.BUSY,
        1,
    )
    assert r.tags == {"team": "search"}


def test_a_record_bills_the_rounding_it_is_given() -> None:
    r = rec(Phase.IDLE, T0, T0 + 1.2, extra_billed_ms=800)
    assert r.ms == pytest.approx(1200)
    assert r.billed_ms == pytest.approx(2000)
    assert r.usd == pytest.approx(rate(L4, PRICES) * 2.0)


def test_a_record_has_millisecond_precision_and_its_usd_matches_its_billed_ms() -> None:
    r = rec(Phase.BUSY, T0, T0 + 0.0123456)
    assert r.billed_ms == pytest.approx(12.346, abs=1e-9)
    assert r.usd == rate(L4, PRICES) * r.billed_ms / 1000.0


def test_a_backwards_record_bills_nothing() -> None:
    r = rec(Phase.IDLE, T0 + 1, T0)
    assert r.billed_ms == 0.0 and r.usd == 0.0


def test_a_record_keeps_its_own_copy_of_the_tags() -> None:
    tags = {"team": "search"}
    r = rec(Phase.BUSY, T0, T0 + 1, tags=tags)
    tags["team"] = "ads"
    assert r.tags == {"team": "search"}


def test_a_workers_records_add_up_to_its_lifetime_and_round_once_per_worker() -> None:
    """Cut a 7.3 s life into phases; per-second billing rounds only the last record up."""
    cuts = [T0, T0 + 0.8, T0 + 2.0, T0 + 5.5, T0 + 7.3]
    phases = [Phase.COLD_START, Phase.IDLE, Phase.BUSY, Phase.IDLE]
    prices = PriceTable(billing="second")
    lifetime_ms = (cuts[-1] - cuts[0]) * 1000
    records = [
        rec(
            phase,
            a,
            b,
            starts=int(i == 0),
            extra_billed_ms=rounding_ms(lifetime_ms, prices.billing) if i == 3 else 0.0,
            prices=prices,
        )
        for i, (phase, a, b) in enumerate(zip(phases, cuts, cuts[1:], strict=False))
    ]
    assert sum(r.ms for r in records) == pytest.approx(lifetime_ms)
    assert sum(r.billed_ms for r in records) == pytest.approx(8000)
    assert sum(r.usd for r in records) == pytest.approx(rate(L4, prices) * 8)
    [group] = summarize(records, [], None, prices)
    assert group["cold_starts"] == 1
    assert group["gpu_seconds"] == pytest.approx(8.0)


# --------------------------------------------------------------------------- job_cost


def test_job_cost_is_exec_plus_cold_start_plus_idle_before() -> None:
    cost = job_cost(
        exec_ms=1500,
        cold_start_ms=400,
        idle_before_ms=100,
        concurrency=1,
        resources=L4,
        prices=PRICES,
    )
    assert cost.usd == pytest.approx(rate(L4, PRICES) * 2.0)
    assert cost.gpu_seconds == pytest.approx(2.0)
    assert cost.cpu_seconds == pytest.approx(4.0)


def test_job_cost_is_divided_by_concurrency() -> None:
    one = job_cost(
        exec_ms=2000, cold_start_ms=0, idle_before_ms=0, concurrency=1, resources=L4, prices=PRICES
    )
    four = job_cost(
        exec_ms=2000, cold_start_ms=0, idle_before_ms=0, concurrency=4, resources=L4, prices=PRICES
    )
    assert four.usd == pytest.approx(one.usd / 4)
    assert four.gpu_seconds == pytest.approx(0.5)
    assert four.cpu_seconds == pytest.approx(1.0)
    # a concurrency below 1 is treated as 1, not a division by zero
    zero = job_cost(
        exec_ms=2000, cold_start_ms=0, idle_before_ms=0, concurrency=0, resources=L4, prices=PRICES
    )
    assert zero == one


def test_job_cost_of_a_packed_worker_and_of_a_cpu_worker() -> None:
    packed = Resources("L4", 8 / 24, cpu=1, memory_gib=1)
    cost = job_cost(
        exec_ms=3000,
        cold_start_ms=0,
        idle_before_ms=0,
        concurrency=1,
        resources=packed,
        prices=PRICES,
    )
    assert cost.gpu_seconds == pytest.approx(1.0)
    assert cost.usd == pytest.approx(3 * (0.000222 / 3 + 0.0000131 + 0.00000222))
    cpu = job_cost(
        exec_ms=1000, cold_start_ms=0, idle_before_ms=0, concurrency=1, resources=CPU, prices=PRICES
    )
    assert cpu.gpu_seconds == 0.0
    assert cpu.usd == pytest.approx(0.0000131 + 0.00000222)


def test_cost_to_dict() -> None:
    assert Cost(0.0000000012345, 1.23456789, 2.0).to_dict() == {
        "usd": 0.000000001,
        "gpu_seconds": 1.234568,
        "cpu_seconds": 2.0,
    }


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.floats(0, 10_000), min_size=1, max_size=10),
    st.floats(0, 5_000),
    st.floats(0, 5_000),
)
def test_one_at_a_time_jobs_cost_what_their_worker_metered(
    execs: list[float], cold_ms: float, gap_ms: float
) -> None:
    """concurrency=1, jobs back to back with `gap_ms` idle between them: the job costs add up to
    the worker's cold start, busy and idle-between-jobs records (no tail idle)."""
    costs = [
        job_cost(
            exec_ms=e,
            cold_start_ms=cold_ms if i == 0 else 0.0,
            idle_before_ms=gap_ms if i > 0 else 0.0,
            concurrency=1,
            resources=L4,
            prices=PRICES,
        )
        for i, e in enumerate(execs)
    ]
    metered_ms = cold_ms + sum(execs) + gap_ms * (len(execs) - 1)
    assert sum(c.usd for c in costs) == pytest.approx(rate(L4, PRICES) * metered_ms / 1000)
    assert sum(c.gpu_seconds for c in costs) == pytest.approx(metered_ms / 1000)


# --------------------------------------------------------------------------- summarize


def sample() -> list[UsageRecord]:
    search = {"team": "search", "project": "rag"}
    ads = {"team": "ads"}
    h100 = Resources("H100", 1, cpu=4, memory_gib=16)
    return [
        # demo/f on an L4 for team search: 1 s cold start, 2 s busy, 3 s idle
        rec(Phase.COLD_START, T0, T0 + 1, tags=search, starts=1),
        rec(Phase.BUSY, T0 + 1, T0 + 3, tags=search),
        rec(Phase.IDLE, T0 + 3, T0 + 6, tags=search),
        # demo/g on an H100 for team ads, an hour later: 0.5 s cold start, 10 s busy
        rec(
            Phase.COLD_START,
            T0 + 3600,
            T0 + 3600.5,
            worker="w2",
            unit="g",
            resources=h100,
            tags=ads,
            starts=1,
        ),
        rec(Phase.BUSY, T0 + 3600.5, T0 + 3610.5, worker="w2", unit="g", resources=h100, tags=ads),
        # other/cpu without a GPU and without tags, the next day: 1 s busy, 1 s idle
        rec(Phase.COLD_START, T0 + 86400, T0 + 86400.25, worker="w3", app="other", unit="cpu",
            resources=CPU, starts=1),
        rec(Phase.BUSY, T0 + 86400.25, T0 + 86401.25, worker="w3", app="other", unit="cpu",
            resources=CPU),
        rec(Phase.IDLE, T0 + 86401.25, T0 + 86402.25, worker="w3", app="other", unit="cpu",
            resources=CPU),
    ]  # fmt: skip


def by_key(groups: list[dict[str, object]], name: str) -> dict[object, dict[str, object]]:
    return {g["key"][name]: g for g in groups}  # type: ignore[index]


def test_summarize_by_team() -> None:
    records = sample()
    groups = by_key(summarize(records, ["tag:team"], None, PRICES), "tag:team")
    assert set(groups) == {"search", "ads", ""}  # untagged usage is its own group, not lost
    search = groups["search"]
    assert search["key"] == {"tag:team": "search"}
    assert search["gpu_seconds"] == pytest.approx(6.0)
    assert search["cpu_seconds"] == pytest.approx(12.0)
    assert search["cost_usd"] == pytest.approx(sum(r.usd for r in records[:3]))
    assert search["cold_starts"] == 1
    assert search["busy_seconds"] == pytest.approx(2.0)
    assert search["idle_seconds"] == pytest.approx(3.0)
    assert search["cold_start_seconds"] == pytest.approx(1.0)
    assert search["idle_usd"] == pytest.approx(records[2].usd)
    # idle fraction: GPU money spent idle over all GPU money (CPU and memory left out)
    assert search["idle_fraction"] == pytest.approx(3 / 6)
    assert groups["ads"]["idle_fraction"] == 0.0
    assert groups["ads"]["gpu_seconds"] == pytest.approx(10.5)
    assert groups["ads"]["cpu_seconds"] == pytest.approx(42.0)
    # without GPUs: idle money over all money
    assert groups[""]["gpu_seconds"] == 0.0
    assert groups[""]["idle_fraction"] == pytest.approx(1 / 2.25)


def test_summarize_by_app_function_gpu_and_phase() -> None:
    records = sample()
    apps = by_key(summarize(records, ["app"], None, PRICES), "app")
    assert set(apps) == {"demo", "other"}
    assert apps["demo"]["cold_starts"] == 2
    functions = by_key(summarize(records, ["function"], None, PRICES), "function")
    assert set(functions) == {"demo/f", "demo/g", "other/cpu"}
    gpus = by_key(summarize(records, ["gpu"], None, PRICES), "gpu")
    assert set(gpus) == {"L4", "H100", ""}
    assert gpus["H100"]["gpu_seconds"] == pytest.approx(10.5)
    phases = by_key(summarize(records, ["phase"], None, PRICES), "phase")
    assert set(phases) == {"cold_start", "busy", "idle"}
    assert phases["cold_start"]["cold_starts"] == 3
    assert phases["idle"]["idle_fraction"] == 1.0
    assert phases["busy"]["idle_fraction"] == 0.0
    assert phases["busy"]["busy_seconds"] == pytest.approx(2 + 10 + 1)


def test_summarize_by_several_keys_and_a_string() -> None:
    records = sample()
    groups = summarize(records, ["tag:team", "phase"], None, PRICES)
    keys = {(g["key"]["tag:team"], g["key"]["phase"]) for g in groups}
    assert ("search", "idle") in keys and ("ads", "busy") in keys
    assert len(keys) == len(groups) == 8
    # one group_by given as a plain string is one key, not its letters
    assert summarize(records, "app", None, PRICES) == summarize(records, ["app"], None, PRICES)


def test_summarize_everything_in_one_group() -> None:
    records = sample()
    [total] = summarize(records, [], None, PRICES)
    assert total["key"] == {}
    assert total["cost_usd"] == pytest.approx(sum(r.usd for r in records))
    assert total["cold_starts"] == 3


def test_summarize_empty() -> None:
    assert summarize([], ["tag:team"], "hour", PRICES) == []


def test_summarize_by_hour_and_day() -> None:
    records = sample()
    hours = summarize(records, [], "hour", PRICES)
    assert [g["start"] for g in hours] == [T0, T0 + 3600, T0 + 86400]
    assert all(g["key"] == {} for g in hours)
    assert hours[0]["gpu_seconds"] == pytest.approx(6.0)
    assert hours[1]["gpu_seconds"] == pytest.approx(10.5)
    days = summarize(records, [], "day", PRICES)
    assert [g["start"] for g in days] == [T0, T0 + 86400]
    assert days[0]["cold_starts"] == 2
    by_team = summarize(records, ["tag:team"], "day", PRICES)
    assert {(g["key"]["tag:team"], g["start"]) for g in by_team} == {
        ("", T0 + 86400),
        ("ads", T0),
        ("search", T0),
    }


def test_buckets_come_out_in_time_order() -> None:
    # 7200 and 10800: in time order, not in string order ("10800" < "7200")
    records = [rec(Phase.BUSY, t, t + 1) for t in (10800.0, 7200.0, 3600.0)]
    assert [g["start"] for g in summarize(records, [], "hour", PRICES)] == [3600, 7200, 10800]


def test_a_record_counts_in_the_bucket_of_its_start() -> None:
    r = rec(Phase.BUSY, T0 + 3599, T0 + 3601)
    [group] = summarize([r], [], "hour", PRICES)
    assert group["start"] == T0 and group["busy_seconds"] == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("group_by", "granularity", "words"),
    [
        (["team"], None, ["'team'", "tag:NAME"]),
        (["tag:"], None, ["'tag:'"]),
        (["app", "bogus"], None, ["'bogus'"]),
        ([], "week", ["'week'", "hour or day"]),
        (["app"], "minute", ["'minute'"]),
    ],
)
def test_summarize_rejects_bad_arguments_clearly(
    group_by: list[str], granularity: str | None, words: list[str]
) -> None:
    with pytest.raises(ValueError) as info:
        summarize(sample(), group_by, granularity, PRICES)
    for word in words:
        assert word in str(info.value)


def test_group_key_names() -> None:
    r = rec(Phase.BUSY, T0, T0 + 1, tags={"team": "x"})
    assert group_key("tag:team")(r) == ("tag:team", "x")
    assert group_key("tag:missing")(r) == ("tag:missing", "")
    assert group_key("function")(r) == ("function", "demo/f")


@st.composite
def records(draw: st.DrawFn) -> list[UsageRecord]:
    out = []
    for i in range(draw(st.integers(0, 12))):
        start = T0 + draw(st.floats(0, 3 * 86400))
        gpu = draw(st.sampled_from([None, "L4", "H100", "MYGPU"]))
        out.append(
            rec(
                draw(st.sampled_from(list(Phase))),
                start,
                start + draw(st.floats(0, 7200)),
                worker=f"w{i}",
                app=draw(st.sampled_from(["a", "b"])),
                unit=draw(st.sampled_from(["f", "g"])),
                resources=Resources(
                    gpu,
                    draw(st.sampled_from([1.0, 2.0, 0.25])) if gpu else 0.0,
                    cpu=draw(st.sampled_from([0.5, 1.0, 4.0])),
                    memory_gib=draw(st.sampled_from([1.0, 16.0])),
                ),
                tags=draw(
                    st.dictionaries(st.sampled_from(["team", "project"]), st.sampled_from("xyz"))
                ),
                starts=draw(st.integers(0, 1)),
                extra_billed_ms=draw(st.sampled_from([0.0, 250.0])),
            )
        )
    return out


GROUP_BY = st.lists(
    st.sampled_from(["tag:team", "tag:project", "app", "function", "gpu", "phase"]),
    max_size=3,
    unique=True,
)


@settings(max_examples=150, deadline=None)
@given(records(), GROUP_BY, st.sampled_from([None, "hour", "day"]))
def test_groups_partition_the_records_and_totals_add_up(
    rs: list[UsageRecord], group_by: list[str], granularity: str | None
) -> None:
    groups = summarize(rs, group_by, granularity, PRICES)
    assert sum(g["cost_usd"] for g in groups) == pytest.approx(
        sum(r.usd for r in rs), rel=1e-6, abs=1e-6
    )
    assert sum(g["gpu_seconds"] for g in groups) == pytest.approx(
        sum(r.resources.gpu_count * r.billed_ms / 1000 for r in rs), rel=1e-6, abs=1e-4
    )
    assert sum(g["cpu_seconds"] for g in groups) == pytest.approx(
        sum(r.resources.cpu * r.billed_ms / 1000 for r in rs), rel=1e-6, abs=1e-4
    )
    assert sum(g["cold_starts"] for g in groups) == sum(r.starts for r in rs)
    # every record lands in exactly one group: the one of its key (and bucket of its start)
    step = {"hour": 3600, "day": 86400}.get(granularity or "")
    expected: dict[tuple[object, ...], float] = defaultdict(float)
    for r in rs:
        key = tuple(sorted(dict(group_key(k)(r) for k in group_by).items()))
        bucket = math.floor(r.start / step) * step if step else None
        expected[(key, bucket)] += r.billed_ms / 1000
    got: dict[tuple[object, ...], float] = {
        (tuple(sorted(g["key"].items())), g.get("start")): g["busy_seconds"]
        + g["idle_seconds"]
        + g["cold_start_seconds"]
        for g in groups
    }
    assert len(got) == len(groups)  # no key twice
    assert got.keys() == expected.keys()
    for k, seconds in expected.items():
        assert got[k] == pytest.approx(seconds, rel=1e-6, abs=1e-4)
    for g in groups:
        assert 0.0 <= g["idle_fraction"] <= 1.0
        assert set(g["key"]) == set(group_by)
        assert ("start" in g) == (granularity is not None)
    # groups come out sorted: by key, then in time order
    order = [(tuple(g["key"].values()), g.get("start") or 0) for g in groups]
    assert order == sorted(order)


@settings(max_examples=100, deadline=None)
@given(records())
def test_idle_fraction_is_idle_gpu_money_over_gpu_money(rs: list[UsageRecord]) -> None:
    [g] = summarize(rs, [], None, PRICES) or [None]  # type: ignore[list-item]
    if g is None:
        return
    gpu_usd = [
        (r, PRICES.gpu.get(r.resources.gpu_type or "", 0.0) * r.resources.gpu_count * r.billed_ms)
        for r in rs
    ]
    total_gpu = sum(u for _, u in gpu_usd)
    if total_gpu > 0:
        idle_gpu = sum(u for r, u in gpu_usd if r.phase is Phase.IDLE)
        assert g["idle_fraction"] == pytest.approx(idle_gpu / total_gpu, abs=1e-6)
    else:
        total = sum(r.usd for r in rs)
        idle = sum(r.usd for r in rs if r.phase is Phase.IDLE)
        assert g["idle_fraction"] == pytest.approx(idle / total if total > 0 else 0.0, abs=1e-6)
