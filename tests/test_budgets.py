"""Usage policies and budget checks (`ember.core.budgets`): examples, then hypothesis properties."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ember.core.budgets import (
    Blocked,
    Policy,
    PolicyError,
    admit,
    alert_due,
    allowed_request,
    day_index,
    gpu_cap,
    gpu_cap_never,
    make_policy,
    parse_budget,
    period_bounds,
    policy_request,
    pool_scaling,
    spent_in_period,
)
from ember.core.spec import GpuRequest, ScalingSpec, parse_gpu


def ts(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp()


# --- parse_budget ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("50USD/month", (50.0, "month")),
        ("50 USD/month", (50.0, "month")),
        ("$50/month", (50.0, "month")),
        ("12.5usd/day", (12.5, "day")),
        ("100USD/week", (100.0, "week")),
        (" 7 usd / Weekly ", (7.0, "week")),
        ("$0.5/daily", (0.5, "day")),
        ("20USD/monthly", (20.0, "month")),
        ("3USD/days", (3.0, "day")),
        ("0USD/month", (0.0, "month")),
        ("$.25/day", (0.25, "day")),
    ],
)
def test_parse_budget_accepts(text: str, expected: tuple[float, str]) -> None:
    assert parse_budget(text) == expected


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("50EUR/month", "amounts are in USD"),
        ("€50/month", "amount must be a number"),
        ("50USD", "give a period after a slash"),
        ("50USD/year", "period must be day, week or month"),
        ("50USD/mo", "period must be day, week or month"),
        ("-5USD/month", "amount must be a number"),
        ("fiftyUSD/month", "amount must be a number"),
        ("", "give a period"),
        ("USD/month", "amount must be a number"),
        ("1" * 400 + "USD/month", "too large"),
    ],
)
def test_parse_budget_rejects_with_fix(text: str, needle: str) -> None:
    with pytest.raises(PolicyError) as err:
        parse_budget(text)
    msg = str(err.value)
    assert needle in msg
    assert f'budget "{text}"' in msg
    assert "50USD/month" in msg  # every message shows a valid example


def test_parse_budget_eur_message_exact() -> None:
    with pytest.raises(
        PolicyError, match=r'^budget "50EUR/month": amounts are in USD, e\.g\. 50USD/month'
    ):
        parse_budget("50EUR/month")


def test_parse_budget_rejects_non_string() -> None:
    with pytest.raises(PolicyError, match="string like 50USD/month"):
        parse_budget(50)  # type: ignore[arg-type]


@given(
    st.decimals(min_value=0, max_value=10**9, places=2, allow_nan=False, allow_infinity=False),
    st.sampled_from(["day", "week", "month"]),
)
def test_parse_budget_round_trips_amounts(amount: object, period: str) -> None:
    assert parse_budget(f"{amount}USD/{period}") == (float(str(amount)), period)


# --- make_policy / Policy ---------------------------------------------------------------------


def test_make_policy_defaults() -> None:
    p = make_policy("search")
    assert p == Policy("search", {}, None, "month", "alert", None, None, None)


def test_make_policy_normalises() -> None:
    p = make_policy(
        "team-a.search_1",
        tags={"team": "search"},
        budget_usd=50,
        period="Weekly",
        action="block",
        max_gpus=4,
        allowed_gpus=["l4", " a10g", "L4"],
        webhook="https://hooks.example.com/x?y=1",
    )
    assert p.budget_usd == 50.0 and isinstance(p.budget_usd, float)
    assert p.period == "week"
    assert p.allowed_gpus == ("L4", "A10G")
    assert p.tags == {"team": "search"}
    assert make_policy("x", allowed_gpus="L4, h100").allowed_gpus == ("L4", "H100")
    assert make_policy("x", allowed_gpus=[]).allowed_gpus == ()
    assert make_policy("x", max_gpus=0).max_gpus == 0
    assert make_policy("x", budget_usd=0, action="block").budget_usd == 0.0


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"name": ""}, "policy name"),
        ({"name": "has space"}, "1-64 characters"),
        ({"name": "-lead"}, "1-64 characters"),
        ({"name": "x" * 65}, "1-64 characters"),
        ({"name": 3}, "policy name"),
        ({"tags": {"": "x"}}, "policy tags"),
        ({"tags": {"team": 1}}, "policy tags"),
        ({"tags": ["team"]}, "policy tags"),
        ({"budget_usd": -1}, "budget_usd"),
        ({"budget_usd": math.nan}, "budget_usd"),
        ({"budget_usd": math.inf}, "budget_usd"),
        ({"budget_usd": True}, "budget_usd"),
        ({"budget_usd": "50USD/month"}, "--budget 50USD/month"),
        ({"period": "year"}, "period must be day, week or month"),
        ({"period": None}, "period must be day, week or month"),
        ({"action": "stop"}, "action must be 'alert' or 'block'"),
        ({"action": "block"}, "needs a budget"),
        ({"max_gpus": -1}, "max_gpus"),
        ({"max_gpus": True}, "max_gpus"),
        ({"max_gpus": 1.5}, "max_gpus"),
        ({"allowed_gpus": ["H100:2"]}, "without counts"),
        ({"allowed_gpus": [""]}, "allowed_gpus"),
        ({"allowed_gpus": [3]}, "allowed_gpus"),
        ({"allowed_gpus": 3}, "list of GPU types"),
        ({"webhook": "ftp://example.com/x"}, "webhook must be an http(s) URL"),
        ({"webhook": "https://"}, "webhook"),
        ({"webhook": "not a url"}, "webhook"),
        ({"webhook": "https://exa mple.com"}, "webhook"),
        ({"webhook": "https://[::1"}, "webhook"),
        ({"webhook": 5}, "webhook"),
    ],
)
def test_make_policy_rejects(kwargs: dict[str, object], needle: str) -> None:
    args: dict[str, object] = {"name": "search", **kwargs}
    name = args.pop("name")
    with pytest.raises(PolicyError) as err:
        make_policy(name, **args)
    assert needle in str(err.value)


def test_policy_dict_round_trip_is_json_safe() -> None:
    p = make_policy(
        "search",
        tags={"team": "s"},
        budget_usd=12.5,
        period="day",
        action="block",
        max_gpus=2,
        allowed_gpus=["L4"],
        webhook="http://127.0.0.1:9/hook",
    )
    d = json.loads(json.dumps(p.to_dict()))
    assert d["allowed_gpus"] == ["L4"]
    assert Policy.from_dict(d) == p
    bare = make_policy("bare")
    assert Policy.from_dict(json.loads(json.dumps(bare.to_dict()))) == bare


def test_policy_from_dict_errors() -> None:
    with pytest.raises(PolicyError, match=r"unknown field.*budget.*the fields are"):
        Policy.from_dict({"name": "x", "budget": 5})
    with pytest.raises(PolicyError, match="'name' is required"):
        Policy.from_dict({})
    with pytest.raises(PolicyError, match="must be an object"):
        Policy.from_dict([])  # type: ignore[arg-type]


@given(
    name=st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z"),
    budget=st.none() | st.floats(min_value=0, max_value=1e12),
    period=st.sampled_from(["day", "week", "month"]),
    max_gpus=st.none() | st.integers(min_value=0, max_value=10_000),
    allowed=st.none() | st.lists(st.sampled_from(["L4", "A10G", "H100", "T4"]), unique=True),
)
def test_policy_round_trip_property(
    name: str, budget: float | None, period: str, max_gpus: int | None, allowed: list[str] | None
) -> None:
    action = "alert" if budget is None else "block"
    p = make_policy(
        name,
        budget_usd=budget,
        period=period,
        action=action,
        max_gpus=max_gpus,
        allowed_gpus=allowed,
    )
    assert Policy.from_dict(json.loads(json.dumps(p.to_dict()))) == p


# --- periods ------------------------------------------------------------------------------


def test_day_index() -> None:
    assert day_index(0) == 0
    assert day_index(86399.999) == 0
    assert day_index(86400) == 1
    assert day_index(-0.001) == -1
    assert day_index(ts(2026, 3, 5, 12)) == (datetime(2026, 3, 5, tzinfo=UTC).timestamp() // 86400)
    with pytest.raises(ValueError):
        day_index(math.nan)
    with pytest.raises(ValueError):
        day_index(math.inf)


@given(st.integers(min_value=-(2**32), max_value=2**32))
def test_day_index_at_midnight(k: int) -> None:
    midnight = k * 86400.0
    assert day_index(midnight) == k
    assert day_index(math.nextafter(midnight, -math.inf)) == k - 1
    assert day_index(math.nextafter(midnight, math.inf)) == k


def test_period_bounds_day() -> None:
    now = ts(2026, 11, 18, 13, 45, 7)
    assert period_bounds("day", now) == (ts(2026, 11, 18), ts(2026, 11, 19))
    assert period_bounds("day", ts(2026, 11, 18)) == (ts(2026, 11, 18), ts(2026, 11, 19))
    assert period_bounds("day", ts(2026, 12, 31, 23, 59, 59)) == (ts(2026, 12, 31), ts(2027, 1, 1))


def test_period_bounds_week_starts_monday() -> None:
    # 2026-11-18 is a Wednesday; its ISO week starts Monday 2026-11-16.
    assert period_bounds("week", ts(2026, 11, 18, 9)) == (ts(2026, 11, 16), ts(2026, 11, 23))
    # Sunday night still belongs to the week that started on Monday.
    assert period_bounds("week", ts(2026, 11, 22, 23, 59)) == (ts(2026, 11, 16), ts(2026, 11, 23))
    # Monday 00:00 opens a new week.
    assert period_bounds("week", ts(2026, 11, 23)) == (ts(2026, 11, 23), ts(2026, 11, 30))
    # A week across the new year: 2026-12-28 (Monday) to 2027-01-04.
    assert period_bounds("week", ts(2027, 1, 2)) == (ts(2026, 12, 28), ts(2027, 1, 4))
    # 1970-01-01 was a Thursday: its week began on Monday 1969-12-29.
    assert period_bounds("week", 0) == (ts(1969, 12, 29), ts(1970, 1, 5))


def test_period_bounds_month() -> None:
    assert period_bounds("month", ts(2026, 11, 18, 9)) == (ts(2026, 11, 1), ts(2026, 12, 1))
    # December rolls over into January of the next year.
    assert period_bounds("month", ts(2026, 12, 31, 23, 59, 59)) == (ts(2026, 12, 1), ts(2027, 1, 1))
    # Leap-year February has 29 days; a common-year one has 28.
    start, reset = period_bounds("month", ts(2028, 2, 29, 12))
    assert (start, reset) == (ts(2028, 2, 1), ts(2028, 3, 1))
    assert reset - start == 29 * 86400
    start, reset = period_bounds("month", ts(2027, 2, 14))
    assert reset - start == 28 * 86400
    assert period_bounds("monthly", ts(2026, 1, 1)) == (ts(2026, 1, 1), ts(2026, 2, 1))


def test_period_bounds_rejects_unknown_period() -> None:
    with pytest.raises(PolicyError, match="period must be day, week or month"):
        period_bounds("year", 0)


_NOW = st.floats(min_value=-(2**35), max_value=2**37, allow_nan=False, allow_infinity=False)


@given(st.sampled_from(["day", "week", "month"]), _NOW)
def test_period_bounds_properties(period: str, now: float) -> None:
    start, reset = period_bounds(period, now)
    assert start <= now < reset
    assert period_bounds(period, start) == (start, reset)
    assert period_bounds(period, reset)[0] == reset  # periods tile time without gaps
    assert start % 86400 == 0 and reset % 86400 == 0
    begin = datetime.fromtimestamp(start, UTC)
    days = (reset - start) / 86400
    if period == "day":
        assert days == 1
    elif period == "week":
        assert days == 7 and begin.isoweekday() == 1
    else:
        assert begin.day == 1 and 28 <= days <= 31
        assert datetime.fromtimestamp(reset, UTC).day == 1


@given(st.integers(min_value=-(2**30), max_value=2**31))
def test_period_bounds_agree_with_datetime(now: int) -> None:
    dt = datetime.fromtimestamp(now, UTC)
    day = datetime(dt.year, dt.month, dt.day, tzinfo=UTC)
    assert period_bounds("day", now)[0] == day.timestamp()
    assert period_bounds("month", now)[0] == datetime(dt.year, dt.month, 1, tzinfo=UTC).timestamp()
    week = day.timestamp() - (dt.isoweekday() - 1) * 86400
    assert period_bounds("week", now)[0] == week


# --- spend ------------------------------------------------------------------------------


def test_spent_in_period_sums_from_the_first_day() -> None:
    start, _ = period_bounds("month", ts(2026, 11, 18))
    first = day_index(start)
    daily = {first - 1: 100.0, first: 1.25, first + 10: 2.5, first + 17: 0.25}
    assert spent_in_period(daily, start) == 4.0
    assert spent_in_period(daily, period_bounds("day", ts(2026, 11, 18))[0]) == 0.25
    assert spent_in_period({}, start) == 0.0


@given(
    st.dictionaries(
        st.integers(min_value=0, max_value=1000), st.floats(min_value=0, max_value=1e6), max_size=40
    ),
    st.integers(min_value=0, max_value=1000),
)
def test_spent_in_period_matches_a_filter(daily: dict[int, float], first: int) -> None:
    expected = math.fsum(v for d, v in daily.items() if d >= first)
    assert spent_in_period(daily, first * 86400.0) == expected
    assert spent_in_period(daily, first * 86400.0 + 3600) == expected  # any instant of the day


# --- admission and alerts ----------------------------------------------------------------

NOW = ts(2026, 11, 18, 10)


def test_admit_block_policy() -> None:
    p = make_policy("search", budget_usd=50, action="block")
    assert admit(p, 0.0, NOW) is None
    assert admit(p, 49.99, NOW) is None
    at = admit(p, 50.0, NOW)
    assert isinstance(at, Blocked)
    assert at.budget_usd == 50.0 and at.spent_usd == 50.0
    over = admit(p, 50.02, NOW)
    assert over == Blocked(
        50.0,
        50.02,
        ts(2026, 12, 1),
        "policy 'search' has spent $50.02 of its $50.00 monthly budget; "
        "calls are blocked until 2026-12-01T00:00:00Z",
    )


def test_admit_alert_policy_never_blocks() -> None:
    p = make_policy("search", budget_usd=50, action="alert")
    assert admit(p, 10_000.0, NOW) is None
    assert admit(make_policy("nobudget"), 10_000.0, NOW) is None


def test_admit_reset_follows_the_period() -> None:
    daily = make_policy("d", budget_usd=1, period="day", action="block")
    blocked = admit(daily, 1.5, NOW)
    assert blocked is not None
    assert blocked.reset_at == ts(2026, 11, 19)
    assert "daily budget" in blocked.message and "2026-11-19T00:00:00Z" in blocked.message
    weekly = admit(make_policy("w", budget_usd=1, period="week", action="block"), 2, NOW)
    assert weekly is not None and weekly.reset_at == ts(2026, 11, 23)
    assert "weekly budget" in weekly.message


def test_admit_zero_budget_blocks_everything() -> None:
    assert admit(make_policy("z", budget_usd=0, action="block"), 0.0, NOW) is not None


def test_alert_due_once_per_period() -> None:
    p = make_policy("search", budget_usd=50, action="alert")
    start, reset = period_bounds("month", NOW)
    assert not alert_due(p, 49.0, NOW, None)  # under budget
    assert alert_due(p, 50.0, NOW, None)  # reached, never alerted
    assert not alert_due(p, 80.0, NOW, start)  # already alerted this period
    assert not alert_due(p, 80.0, reset - 1, start)  # ... until the very end of it
    previous, _ = period_bounds("month", start - 1)
    assert alert_due(p, 80.0, NOW, previous)  # last alert was last month
    assert alert_due(p, 80.0, reset, start)  # next period, still over (e.g. fresh spend)
    assert not alert_due(make_policy("nobudget"), 1e9, NOW, None)


def test_alert_due_for_block_policies_too() -> None:
    p = make_policy("search", budget_usd=5, action="block")
    assert alert_due(p, 5.0, NOW, None)
    assert not alert_due(p, 5.0, NOW, period_bounds("month", NOW)[0])


# --- GPU limits ---------------------------------------------------------------------------


def test_allowed_request_filters_in_order() -> None:
    p = make_policy("search", allowed_gpus=["l4", "A10G"])
    request = parse_gpu(["H100", "a10g", "L4:2"])
    assert allowed_request(p, request) == (GpuRequest("A10G"), GpuRequest("L4", 2))
    # A type written in lower case by whoever built the request still matches.
    assert allowed_request(p, (GpuRequest("l4"),)) == (GpuRequest("l4"),)


def test_allowed_request_passes_through() -> None:
    request = parse_gpu(["H100"])
    assert allowed_request(None, request) == request
    assert allowed_request(make_policy("any"), request) == request
    assert allowed_request(make_policy("p", allowed_gpus=["L4"]), ()) == ()
    assert allowed_request(make_policy("p", allowed_gpus=[]), ()) == ()


def test_allowed_request_error_names_both_sides() -> None:
    p = make_policy("x", allowed_gpus=["L4", "A10G"])
    with pytest.raises(PolicyError) as err:
        allowed_request(p, parse_gpu(["H100"]))
    assert str(err.value).startswith("policy 'x' allows GPUs L4, A10G; this function asks for H100")
    with pytest.raises(PolicyError, match="allows no GPUs"):
        allowed_request(make_policy("cpu", allowed_gpus=[]), parse_gpu("T4"))


def test_gpu_cap() -> None:
    p = make_policy("search", max_gpus=4)
    assert gpu_cap(p, 0, 4) is None
    assert gpu_cap(p, 3, 1) is None
    assert gpu_cap(p, 4, 0) is None  # CPU-only workers are not capped
    reason = gpu_cap(p, 4, 1)
    assert reason is not None
    assert reason.startswith("policy 'search' holds 4 of its 4 GPUs (max_gpus)")
    assert gpu_cap(p, 3, 2) is not None
    assert gpu_cap(None, 100, 100) is None
    assert gpu_cap(make_policy("uncapped"), 100, 100) is None


def test_gpu_cap_never() -> None:
    p = make_policy("search", max_gpus=2)
    assert gpu_cap_never(p, 2) is None
    assert gpu_cap_never(p, 0) is None
    reason = gpu_cap_never(p, 4)
    assert reason is not None
    assert "at most 2 GPUs" in reason and "needs 4" in reason and "max_gpus" in reason
    assert gpu_cap_never(None, 100) is None
    assert gpu_cap_never(make_policy("uncapped"), 100) is None
    zero = make_policy("cpu", max_gpus=0)
    assert gpu_cap_never(zero, 1) is not None and gpu_cap_never(zero, 0) is None


@given(
    st.integers(min_value=0, max_value=16),
    st.integers(min_value=0, max_value=16),
    st.integers(min_value=0, max_value=16),
)
def test_gpu_cap_property(cap: int, held: int, need: int) -> None:
    p = make_policy("p", max_gpus=cap)
    assert (gpu_cap(p, held, need) is None) == (need == 0 or held + need <= cap)
    assert (gpu_cap_never(p, need) is None) == (need <= cap)
    if gpu_cap_never(p, need) is not None:
        assert gpu_cap(p, held, need) is not None  # never fits: never admitted by the cap either


def test_policy_request_keeps_allowed_types_that_fit_the_cap() -> None:
    request = parse_gpu(["H100:4", "L4:2", "L4"])
    p = make_policy("p", allowed_gpus=["L4"], max_gpus=1)
    assert policy_request(p, request) == (GpuRequest("L4"),)
    assert policy_request(None, request) == request
    assert policy_request(p, ()) == ()
    with pytest.raises(PolicyError, match="max_gpus"):
        policy_request(make_policy("q", max_gpus=1), parse_gpu("L4:2"))
    with pytest.raises(PolicyError, match="allows GPUs L4"):
        policy_request(p, parse_gpu("H100"))


def test_a_policy_pool_scales_from_zero_and_keeps_the_rest() -> None:
    scaling = ScalingSpec(
        min_workers=2,
        max_workers=6,
        buffer_workers=1,
        idle_timeout=9,
        concurrency=3,
        prewarm="auto",
        warm_schedule="* 9-16 * * 1-5",
    )
    assert pool_scaling(scaling) == ScalingSpec(
        min_workers=0,
        max_workers=6,
        buffer_workers=0,
        idle_timeout=9,
        concurrency=3,
        prewarm="auto",
        warm_schedule=None,
    )
