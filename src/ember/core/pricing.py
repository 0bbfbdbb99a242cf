"""Prices and billing arithmetic: USD per second of GPU, CPU core and GiB of memory.

Defaults are public per-second prices of hosted serverless GPUs; a TOML file overrides them:

    billing = "second"            # or "ms" (default): per-second rounds each worker's life up
    cpu_core_second = 0.0000131
    memory_gib_second = 0.00000222
    [gpu]
    H100 = 0.001097
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_GPU_PRICES: dict[str, float] = {
    "H100": 0.001097,
    "A100-80GB": 0.000694,
    "A100-40GB": 0.000583,
    "L40S": 0.000542,
    "A10G": 0.000306,
    "L4": 0.000222,
    "T4": 0.000164,
}
BILLING = ("ms", "second")
DEFAULT_CPU = 1.0
"""Cores metered for a worker whose function sets no `cpu`."""
DEFAULT_MEMORY_GIB = 1.0
"""GiB metered for a worker whose function sets no `memory`."""


class PriceError(ValueError):
    """A price file that cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class PriceTable:
    gpu: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_GPU_PRICES))
    cpu_core_second: float = 0.0000131
    memory_gib_second: float = 0.00000222
    billing: str = "ms"


@dataclass(frozen=True)
class Resources:
    """What a worker holds while it lives: `gpu_count` may be a fraction for a packed GPU."""

    gpu_type: str | None = None
    gpu_count: float = 0.0
    cpu: float = DEFAULT_CPU
    memory_gib: float = DEFAULT_MEMORY_GIB


def _price(where: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise PriceError(f"{where} must be a non-negative number of USD per second, got {value!r}")
    return float(value)


def parse_prices(text: str, *, source: str = "price file") -> PriceTable:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PriceError(f"{source} is not valid TOML: {exc}") from None
    known = {"billing", "cpu_core_second", "memory_gib_second", "gpu"}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise PriceError(
            f"{source}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})"
        )
    gpus = doc.get("gpu", {})
    if not isinstance(gpus, dict):
        raise PriceError(f"{source}: [gpu] must be a table of TYPE = USD per second")
    billing = doc.get("billing", "ms")
    if billing not in BILLING:
        raise PriceError(f"{source}: billing must be 'ms' or 'second', got {billing!r}")
    defaults = PriceTable()
    return PriceTable(
        gpu={
            **DEFAULT_GPU_PRICES,
            **{k.upper(): _price(f"{source}: gpu.{k}", v) for k, v in gpus.items()},
        },
        cpu_core_second=_price(
            f"{source}: cpu_core_second", doc.get("cpu_core_second", defaults.cpu_core_second)
        ),
        memory_gib_second=_price(
            f"{source}: memory_gib_second", doc.get("memory_gib_second", defaults.memory_gib_second)
        ),
        billing=billing,
    )


def gpu_price(prices: PriceTable, gpu_type: str | None) -> float:
    """Unknown types cost nothing rather than a guess; `ember server` warns about them."""
    return prices.gpu.get(gpu_type, 0.0) if gpu_type else 0.0


def rate(resources: Resources, prices: PriceTable) -> float:
    """USD per second of a worker holding `resources`."""
    return (
        gpu_price(prices, resources.gpu_type) * resources.gpu_count
        + prices.cpu_core_second * resources.cpu
        + prices.memory_gib_second * resources.memory_gib
    )


def rounding_ms(lifetime_ms: float, billing: str) -> float:
    """Extra milliseconds billed when a worker stops: per-second billing rounds its life up."""
    if billing != "second" or not lifetime_ms > 0:
        return 0.0
    # Lifetimes come from differences of epoch seconds, exact only to about a microsecond: a life
    # of 2000.0002 ms is 2 s, not 3; and the result is never negative.
    seconds = math.ceil(round(lifetime_ms, 3) / 1000.0)
    return max(0.0, seconds * 1000.0 - lifetime_ms)
