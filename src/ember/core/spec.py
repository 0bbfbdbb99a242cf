"""Function specs: what a user asked for in `@app.function(...)`, validated once.

Validation lives here, in the core, because the SDK checks options at decoration time and the
server checks them again at deploy time (a client may send anything); both must agree.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ember.core.cron import parse_cron
from ember.core.names import HANDLE_RE

_GPU_RE = re.compile(r"^(?P<type>[A-Za-z0-9][A-Za-z0-9_.-]*?)(?::(?P<count>[0-9]+))?$")
_MEMORY_RE = re.compile(r"^\s*(?P<num>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>[KMGT]i?B?|B)?\s*$", re.I)
_UNIT_MIB = {
    "": 1.0,
    "B": 1 / 2**20,
    "K": 1 / 1024,
    "KB": 1 / 1024,
    "KI": 1 / 1024,
    "KIB": 1 / 1024,
    "M": 1.0,
    "MB": 1.0,
    "MI": 1.0,
    "MIB": 1.0,
    "G": 1024.0,
    "GB": 1024.0,
    "GI": 1024.0,
    "GIB": 1024.0,
    "T": 1024.0**2,
    "TB": 1024.0**2,
    "TI": 1024.0**2,
    "TIB": 1024.0**2,
}
_TAG_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,62}$")


KINDS = ("function", "generator", "async", "async_generator")
"""How a callable runs: plain, generator (streams), coroutine (a task), async generator."""


class SpecError(ValueError):
    """An option of `@app.function` / `@app.cls` that cannot work; the message says how to fix it."""


@dataclass(frozen=True)
class GpuRequest:
    type: str
    count: int = 1

    def __str__(self) -> str:
        return self.type if self.count == 1 else f"{self.type}:{self.count}"


@dataclass(frozen=True)
class ScalingSpec:
    min_workers: int = 0
    max_workers: int = 10
    buffer_workers: int = 0
    idle_timeout: float = 60.0
    concurrency: int = 1
    prewarm: str | None = None
    """None: a fixed keep-alive of idle_timeout; "auto": the hybrid histogram policy (prewarm.py)."""
    warm_schedule: str | None = None
    """Cron expression of the minutes in which min_workers are kept; None: always."""


@dataclass(frozen=True)
class FunctionSpec:
    """Everything the platform needs to know to run a function, apart from its code."""

    scaling: ScalingSpec = field(default_factory=ScalingSpec)
    gpu: tuple[GpuRequest, ...] = ()
    gpu_memory_mib: int | None = None
    """Pack onto one GPU reserving this much of its memory, instead of taking whole GPUs."""
    cpu: float | None = None
    memory_mib: int | None = None
    timeout: float = 300.0
    retries: int = 0
    tags: Mapping[str, str] = field(default_factory=dict)
    env: str | None = None
    secrets: tuple[str, ...] = ()
    """Names of workspace secrets whose KEY=VALUE pairs go into this function's environment."""
    block_network: bool = False
    """Its workers have no network at all (a sandbox with only a loopback device of its own)."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gpu"] = [str(g) for g in self.gpu]
        d["tags"] = dict(self.tags)
        d["secrets"] = list(self.secrets)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FunctionSpec:
        if not isinstance(d, Mapping):
            raise SpecError(f"'spec' must be an object, got {type(d).__name__}")
        scaling = d.get("scaling") or {}
        if not isinstance(scaling, Mapping):
            raise SpecError("'scaling' must be an object")
        return make_spec(
            gpu=d.get("gpu") or None,
            gpu_memory=d.get("gpu_memory_mib"),
            cpu=d.get("cpu"),
            memory=d.get("memory_mib"),
            timeout=d.get("timeout", 300.0),
            retries=d.get("retries", 0),
            tags=d.get("tags"),
            env=d.get("env"),
            secrets=d.get("secrets"),
            block_network=d.get("block_network", False),
            **scaling,
        )


def _int(name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise SpecError(f"{name} must be >= {minimum}, got {value}")
    return value


def _seconds(name: str, value: Any, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SpecError(f"{name} must be a number of seconds, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise SpecError(f"{name} must be {'> 0' if positive else '>= 0'} seconds, got {value}")
    return float(value)


def parse_gpu(value: Any) -> tuple[GpuRequest, ...]:
    """`"H100"`, `"H100:2"` or a list of those as a fallback order."""
    if value is None:
        return ()
    items: Sequence[Any] = [value] if isinstance(value, str) else value
    if not isinstance(items, Sequence) or not items:
        raise SpecError(
            f"gpu must be a string like 'H100' or 'H100:2', or a list of them, got {value!r}"
        )
    out = []
    for item in items:
        m = _GPU_RE.fullmatch(item) if isinstance(item, str) else None
        if m is None:
            raise SpecError(
                f"gpu {item!r} is not of the form TYPE or TYPE:COUNT (e.g. 'L4', 'H100:2')"
            )
        count = int(m["count"]) if m["count"] else 1
        if count < 1:
            raise SpecError(f"gpu {item!r}: the count must be at least 1")
        out.append(GpuRequest(m["type"].upper(), count))
    return tuple(out)


def parse_memory_mib(value: Any, *, what: str = "memory") -> int | None:
    """An int is MiB; a string may carry a unit: '512MiB', '8GiB', '2G'."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise SpecError(f"{what} must be MiB as an integer or a string like '8GiB', got {value!r}")
    if isinstance(value, int | float):
        mib = float(value) if abs(value) < 2**53 else math.inf
    elif isinstance(value, str) and (m := _MEMORY_RE.fullmatch(value)):
        unit = (m["unit"] or "").upper()
        mib = float(m["num"]) * _UNIT_MIB[unit]
    else:
        raise SpecError(f"{what} must be MiB as an integer or a string like '8GiB', got {value!r}")
    if not 0 < mib < 2**53:
        raise SpecError(f"{what} must be positive and finite, got {value!r}")
    return max(1, round(mib))


def parse_tags(value: Any, *, what: str = "tags") -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SpecError(f"{what} must be a dict of str to str, got {type(value).__name__}")
    out = {}
    for k, v in value.items():
        if not isinstance(k, str) or not _TAG_KEY_RE.fullmatch(k):
            raise SpecError(f"{what}: key {k!r} must be 1-63 characters of letters, digits, _.:/-")
        if not isinstance(v, str) or len(v) > 256:
            raise SpecError(f"{what}: value of {k!r} must be a string of at most 256 characters")
        out[k] = v
    return out


def parse_secret_names(value: Any) -> tuple[str, ...]:
    """`secrets=["hf", "db"]`: names of secrets made with `ember secret set`."""
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise SpecError(f"secrets must be a list of secret names like ['hf'], got {value!r}")
    out: list[str] = []
    for name in value:
        if not isinstance(name, str) or not HANDLE_RE.fullmatch(name):
            raise SpecError(
                f"secret name {name!r} must be 1-64 characters of letters, digits, '_', '.', '-'"
            )
        if name not in out:
            out.append(name)
    return tuple(out)


def parse_warm_schedule(value: Any) -> str | None:
    """A cron expression (`minute hour day-of-month month day-of-week`), whitespace normalised."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise SpecError(
            f"warm_schedule must be a cron expression like '* 9-16 * * 1-5', got {value!r}"
        )
    try:
        return parse_cron(value).expr
    except ValueError as exc:
        raise SpecError(f"warm_schedule: {exc}") from None


def make_spec(
    *,
    gpu: Any = None,
    gpu_memory: Any = None,
    cpu: Any = None,
    memory: Any = None,
    min_workers: Any = 0,
    max_workers: Any = 10,
    buffer_workers: Any = 0,
    idle_timeout: Any = 60,
    concurrency: Any = 1,
    prewarm: Any = None,
    warm_schedule: Any = None,
    timeout: Any = 300,
    retries: Any = 0,
    tags: Any = None,
    env: Any = None,
    secrets: Any = None,
    block_network: Any = False,
) -> FunctionSpec:
    """Build a FunctionSpec from user options, or raise SpecError saying what to change."""
    mn = _int("min_workers", min_workers, minimum=0)
    mx = _int("max_workers", max_workers, minimum=1)
    if mn > mx:
        raise SpecError(f"min_workers ({mn}) must not exceed max_workers ({mx})")
    if cpu is not None and (
        isinstance(cpu, bool) or not isinstance(cpu, int | float) or not cpu > 0 or cpu == math.inf
    ):
        raise SpecError(f"cpu must be a positive number of cores, got {cpu!r}")
    if env is not None and (not isinstance(env, str) or not env):
        raise SpecError(f"env must be the name of an environment, got {env!r}")
    if not isinstance(block_network, bool):
        raise SpecError(f"block_network must be True or False, got {block_network!r}")
    if prewarm not in (None, "auto"):
        raise SpecError(f"prewarm must be None or 'auto', got {prewarm!r}")
    schedule = parse_warm_schedule(warm_schedule)
    if schedule is not None and mn == 0:
        raise SpecError(
            "warm_schedule keeps min_workers warm inside its windows: give min_workers >= 1 with it"
        )
    gpus = parse_gpu(gpu)
    gpu_memory_mib = parse_memory_mib(gpu_memory, what="gpu_memory")
    if gpu_memory_mib is not None and (not gpus or any(g.count != 1 for g in gpus)):
        raise SpecError("gpu_memory packs a worker onto one GPU: give gpu='TYPE' (count 1) with it")
    return FunctionSpec(
        scaling=ScalingSpec(
            min_workers=mn,
            max_workers=mx,
            buffer_workers=_int("buffer_workers", buffer_workers, minimum=0),
            idle_timeout=_seconds("idle_timeout", idle_timeout, positive=False),
            concurrency=_int("concurrency", concurrency, minimum=1),
            prewarm=prewarm,
            warm_schedule=schedule,
        ),
        gpu=gpus,
        gpu_memory_mib=gpu_memory_mib,
        cpu=None if cpu is None else float(cpu),
        memory_mib=parse_memory_mib(memory),
        timeout=_seconds("timeout", timeout, positive=True),
        retries=_int("retries", retries, minimum=0),
        tags=parse_tags(tags),
        env=env,
        secrets=parse_secret_names(secrets),
        block_network=block_network,
    )
