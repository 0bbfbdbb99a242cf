"""Usage policies: budgets per UTC calendar period, and limits on which GPUs and how many.

A policy is bound to tokens; their calls are tagged with its tags, their spend counts against its
budget, and their workers obey its GPU limits.

The budget rule: admission is checked before a job is accepted, against the spend already
metered in the current period (day, ISO week from Monday, or calendar month, all in UTC). A job
that was admitted runs to the end, even if the budget is crossed while it runs; so a `block`
policy's overspend is bounded by the cost of the jobs already admitted when the limit was
reached (plus the moments its idle workers take to stop), and nothing new starts until the period resets. An `alert` policy never refuses a call;
both kinds notify (webhook, log) once per period when the spend reaches the budget.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from ember.core.names import NAME_RE
from ember.core.spec import GpuRequest, ScalingSpec, SpecError, parse_tags

PERIODS = ("day", "week", "month")
ACTIONS = ("alert", "block")
DAY_S = 86400
_PERIOD_ALIASES = {
    "day": "day",
    "days": "day",
    "daily": "day",
    "week": "week",
    "weeks": "week",
    "weekly": "week",
    "month": "month",
    "months": "month",
    "monthly": "month",
}
_ADJECTIVE = {"day": "daily", "week": "weekly", "month": "monthly"}
_GPU_TYPE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_AMOUNT_RE = re.compile(
    r"^\s*(?P<dollar>\$)?\s*(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?P<cur>[^\s0-9.]+)?\s*$"
)
_EPOCH = date(1970, 1, 1)
_MAX_WEBHOOK = 2048


class PolicyError(ValueError):
    """A policy option that cannot work; the message names the field and says how to fix it."""


@dataclass(frozen=True)
class Policy:
    name: str
    tags: Mapping[str, str] = field(default_factory=dict)
    budget_usd: float | None = None
    period: str = "month"
    """day | week | month: the UTC calendar period the budget applies to."""
    action: str = "alert"
    """alert: notify only; block: also refuse new calls once the period's spend reaches the budget."""
    max_gpus: int | None = None
    """Most GPUs the policy's workers may hold at once."""
    allowed_gpus: tuple[str, ...] | None = None
    """GPU types the policy's functions may run on (upper case); None: any."""
    webhook: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tags": dict(self.tags),
            "budget_usd": self.budget_usd,
            "period": self.period,
            "action": self.action,
            "max_gpus": self.max_gpus,
            "allowed_gpus": None if self.allowed_gpus is None else list(self.allowed_gpus),
            "webhook": self.webhook,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Policy:
        """Validate a policy as sent over the API or stored: unknown keys are an error."""
        if not isinstance(d, Mapping):
            raise PolicyError(f"a policy must be an object, got {type(d).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(str(k) for k in d if k not in known)
        if unknown:
            raise PolicyError(
                f"policy: unknown field(s) {', '.join(unknown)}; the fields are {', '.join(known)}"
            )
        if "name" not in d:
            raise PolicyError('policy: \'name\' is required, e.g. {"name": "search"}')
        return make_policy(
            d["name"],
            tags=d.get("tags"),
            budget_usd=d.get("budget_usd"),
            period=d.get("period", "month"),
            action=d.get("action", "alert"),
            max_gpus=d.get("max_gpus"),
            allowed_gpus=d.get("allowed_gpus"),
            webhook=d.get("webhook"),
        )


@dataclass(frozen=True)
class Blocked:
    """Why a call is refused: the answer of a 402 `budget_exceeded`."""

    budget_usd: float
    spent_usd: float
    reset_at: float
    message: str


def _period(value: Any, *, what: str = "period") -> str:
    period = _PERIOD_ALIASES.get(value.strip().lower()) if isinstance(value, str) else None
    if period is None:
        raise PolicyError(f"{what} must be day, week or month, got {value!r}")
    return period


def _gpu_types(value: Any) -> tuple[str, ...]:
    items: Any = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, Sequence):
        raise PolicyError(
            f"allowed_gpus must be a list of GPU types like ['L4', 'A10G'], got {value!r}"
        )
    out: list[str] = []
    for item in items:
        name = item.strip().upper() if isinstance(item, str) else None
        if not name or not _GPU_TYPE_RE.fullmatch(name):
            raise PolicyError(
                f"allowed_gpus: {item!r} is not a GPU type; give type names without counts, "
                "e.g. ['L4', 'A10G']"
            )
        if name not in out:
            out.append(name)
    return tuple(out)


def _webhook(value: Any) -> str:
    ok = (
        isinstance(value, str)
        and 0 < len(value) <= _MAX_WEBHOOK
        and not any(c.isspace() for c in value)
    )
    if ok:
        try:
            parts = urlsplit(value)
            ok = parts.scheme in ("http", "https") and bool(parts.hostname)
        except ValueError:
            ok = False
    if not ok:
        raise PolicyError(
            f"webhook must be an http(s) URL such as 'https://hooks.example.com/ember', got {value!r}"
        )
    return str(value)


def make_policy(
    name: Any,
    tags: Any = None,
    budget_usd: Any = None,
    period: Any = "month",
    action: Any = "alert",
    max_gpus: Any = None,
    allowed_gpus: Any = None,
    webhook: Any = None,
) -> Policy:
    """Build a Policy from user options, or raise PolicyError saying what to change."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise PolicyError(
            f"policy name {name!r} must be 1-64 characters of letters, digits, '_', '.', '-' "
            "(starting with a letter or digit)"
        )
    try:
        clean_tags = parse_tags(tags, what="policy tags")
    except SpecError as exc:
        raise PolicyError(str(exc)) from None
    if budget_usd is not None:
        if (
            isinstance(budget_usd, bool)
            or not isinstance(budget_usd, int | float)
            or not math.isfinite(budget_usd)
            or budget_usd < 0
        ):
            raise PolicyError(
                f"budget_usd must be a finite number of US dollars >= 0, got {budget_usd!r} "
                "(on the command line: --budget 50USD/month)"
            )
        budget_usd = float(budget_usd)
    clean_period = _period(period)
    if action not in ACTIONS:
        raise PolicyError(f"action must be 'alert' or 'block', got {action!r}")
    if action == "block" and budget_usd is None:
        raise PolicyError(
            "action 'block' needs a budget to block at: give budget_usd (--budget 50USD/month) "
            "or use action 'alert'"
        )
    if max_gpus is not None and (
        isinstance(max_gpus, bool) or not isinstance(max_gpus, int) or max_gpus < 0
    ):
        raise PolicyError(f"max_gpus must be an integer >= 0 (0: no GPUs), got {max_gpus!r}")
    return Policy(
        name=name,
        tags=clean_tags,
        budget_usd=budget_usd,
        period=clean_period,
        action=action,
        max_gpus=max_gpus,
        allowed_gpus=None if allowed_gpus is None else _gpu_types(allowed_gpus),
        webhook=None if webhook is None else _webhook(webhook),
    )


def parse_budget(text: str) -> tuple[float, str]:
    """`"50USD/month"`, `"50 USD/month"`, `"$50/month"`, `"12.5usd/day"` -> (amount, period)."""
    example = "e.g. 50USD/month, $12.5/day or 100USD/week"
    if not isinstance(text, str):
        raise PolicyError(f"budget must be a string like 50USD/month, got {text!r}")
    quoted = f'budget "{text}"'
    amount_text, slash, period_text = text.partition("/")
    if not slash:
        raise PolicyError(f"{quoted}: give a period after a slash, {example}")
    m = _AMOUNT_RE.match(amount_text)
    if m is None:
        raise PolicyError(f"{quoted}: the amount must be a number of US dollars, {example}")
    if m["cur"] is not None and m["cur"].upper() != "USD":
        raise PolicyError(f"{quoted}: amounts are in USD, {example}")
    amount = float(m["num"])
    if not math.isfinite(amount):
        raise PolicyError(f"{quoted}: the amount is too large, {example}")
    if period_text.strip().lower() not in _PERIOD_ALIASES:
        raise PolicyError(f"{quoted}: the period must be day, week or month, {example}")
    return amount, _PERIOD_ALIASES[period_text.strip().lower()]


def day_index(t: float) -> int:
    """The UTC day number of epoch second `t` (day 0 is 1970-01-01), exact at midnight."""
    if not math.isfinite(t):
        raise ValueError(f"time must be a finite number of epoch seconds, got {t!r}")
    d = math.floor(t / DAY_S)
    if d * DAY_S > t:  # float division rounded up across midnight
        d -= 1
    elif (d + 1) * DAY_S <= t:
        d += 1
    return d


def period_bounds(period: str, now: float) -> tuple[float, float]:
    """Start and reset (the next period's start) of the UTC calendar period containing `now`.

    Weeks are ISO weeks (Monday 00:00 UTC); months are calendar months. Computed from the day
    number, never from a rounded datetime, so `start <= now < reset` holds for every float.
    """
    p = _period(period)
    d = day_index(now)
    if p == "day":
        start, end = d, d + 1
    elif p == "week":
        start = d - (d + 3) % 7  # day 0 was a Thursday
        end = start + 7
    else:
        try:
            first = (_EPOCH + timedelta(days=d)).replace(day=1)
            after = (
                date(first.year + 1, 1, 1)
                if first.month == 12
                else date(first.year, first.month + 1, 1)
            )
        except (OverflowError, ValueError):
            raise ValueError(f"time {now!r} is outside the calendar this supports") from None
        start, end = (first - _EPOCH).days, (after - _EPOCH).days
    return float(start * DAY_S), float(end * DAY_S)


def spent_in_period(daily: Mapping[int, float], period_start: float) -> float:
    """Sum of the daily spend buckets (day_index -> USD) from the period's first day on."""
    first = day_index(period_start)
    return math.fsum(v for d, v in daily.items() if d >= first)


def _utc(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def admit(policy: Policy, spent_usd: float, now: float) -> Blocked | None:
    """None admits the call; Blocked when a `block` policy's period spend has reached its budget."""
    if policy.action != "block" or policy.budget_usd is None or spent_usd < policy.budget_usd:
        return None
    _, reset = period_bounds(policy.period, now)
    message = (
        f"policy {policy.name!r} has spent ${spent_usd:,.2f} of its ${policy.budget_usd:,.2f} "
        f"{_ADJECTIVE[policy.period]} budget; calls are blocked until {_utc(reset)}"
    )
    return Blocked(policy.budget_usd, spent_usd, reset, message)


def alert_due(
    policy: Policy, spent_usd: float, now: float, last_alert_period: float | None
) -> bool:
    """Notify once per period when the spend reaches the budget (both alert and block policies).

    `last_alert_period` is the period start recorded with the last alert sent, or None.
    """
    if policy.budget_usd is None or spent_usd < policy.budget_usd:
        return False
    start, _ = period_bounds(policy.period, now)
    return last_alert_period is None or last_alert_period < start


def allowed_request(
    policy: Policy | None, request: tuple[GpuRequest, ...]
) -> tuple[GpuRequest, ...]:
    """The function's GPU fallback list, keeping only the types the policy allows, in order."""
    if policy is None or policy.allowed_gpus is None or not request:
        return request
    allowed = {t.upper() for t in policy.allowed_gpus}
    kept = tuple(r for r in request if r.type.upper() in allowed)
    if not kept:
        asked = ", ".join(str(r) for r in request)
        allows = (
            f"allows GPUs {', '.join(policy.allowed_gpus)}"
            if policy.allowed_gpus
            else "allows no GPUs (CPU-only functions)"
        )
        raise PolicyError(
            f"policy {policy.name!r} {allows}; this function asks for {asked}: "
            "ask for an allowed type in gpu=, or add the type to the policy's allowed_gpus"
        )
    return kept


def gpu_cap(policy: Policy | None, held: int, need: int) -> str | None:
    """Why a new worker needing `need` GPUs must wait under max_gpus, or None when it may start."""
    if policy is None or policy.max_gpus is None or need <= 0 or held + need <= policy.max_gpus:
        return None
    return (
        f"policy {policy.name!r} holds {held} of its {policy.max_gpus} GPUs (max_gpus); "
        f"this worker needs {need} more"
    )


def gpu_cap_never(policy: Policy | None, need: int) -> str | None:
    """Why a worker needing `need` GPUs can never start under max_gpus, or None if it could."""
    if policy is None or policy.max_gpus is None or need <= policy.max_gpus:
        return None
    return (
        f"policy {policy.name!r} allows at most {policy.max_gpus} GPUs at once (max_gpus) and "
        f"one worker of this function needs {need}: raise the policy's max_gpus to at least "
        f"{need}, or ask for fewer GPUs in gpu="
    )


def policy_request(
    policy: Policy | None, request: tuple[GpuRequest, ...]
) -> tuple[GpuRequest, ...]:
    """The GPU options a function keeps under a policy: the allowed types, each small enough for
    its max_gpus. PolicyError when none is left: such a call could never run, so it is refused
    instead of waiting forever."""
    kept = allowed_request(policy, request)
    if policy is None or not kept:
        return kept
    within = tuple(g for g in kept if gpu_cap_never(policy, g.count) is None)
    if not within:
        raise PolicyError(str(gpu_cap_never(policy, min(g.count for g in kept))))
    return within


def pool_scaling(scaling: ScalingSpec) -> ScalingSpec:
    """The scaling of a function's pool for one policy's calls: from zero, no `min_workers`,
    buffer or warm schedule kept warm on every policy's account; the rest as the function says."""
    return replace(scaling, min_workers=0, buffer_workers=0, warm_schedule=None)
