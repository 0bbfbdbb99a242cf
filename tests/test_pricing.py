"""Prices and billing arithmetic (`ember.core.pricing`)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.core.pricing import (
    DEFAULT_CPU,
    DEFAULT_GPU_PRICES,
    DEFAULT_MEMORY_GIB,
    PriceError,
    PriceTable,
    Resources,
    gpu_price,
    parse_prices,
    rate,
    rounding_ms,
)

ISSUE_TABLE = {
    "H100": 0.001097,
    "A100-80GB": 0.000694,
    "A100-40GB": 0.000583,
    "L40S": 0.000542,
    "A10G": 0.000306,
    "L4": 0.000222,
    "T4": 0.000164,
}


def test_defaults_are_the_issue_table() -> None:
    prices = PriceTable()
    assert dict(prices.gpu) == ISSUE_TABLE == DEFAULT_GPU_PRICES
    assert prices.cpu_core_second == 0.0000131
    assert prices.memory_gib_second == 0.00000222
    assert prices.billing == "ms"
    assert (DEFAULT_CPU, DEFAULT_MEMORY_GIB) == (1.0, 1.0)
    assert Resources() == Resources(None, 0.0, 1.0, 1.0)


def test_default_tables_do_not_share_state() -> None:
    a, b = PriceTable(), PriceTable()
    assert a.gpu is not b.gpu and a.gpu is not DEFAULT_GPU_PRICES


def test_an_empty_file_is_the_defaults() -> None:
    assert parse_prices("") == PriceTable()
    assert parse_prices("# nothing to change\n") == PriceTable()


def test_overrides() -> None:
    prices = parse_prices(
        """
        billing = "second"
        cpu_core_second = 0.00002
        memory_gib_second = 0
        [gpu]
        H100 = 0.002
        l4 = 0.0001      # type names are upper-cased like gpu="l4" is
        MYGPU = 1        # integers are fine, and new types get a price
        """
    )
    assert prices.billing == "second"
    assert prices.cpu_core_second == 0.00002
    assert prices.memory_gib_second == 0.0
    assert prices.gpu["H100"] == 0.002
    assert prices.gpu["L4"] == 0.0001
    assert prices.gpu["MYGPU"] == 1.0 and isinstance(prices.gpu["MYGPU"], float)
    # what the file does not name keeps its default
    assert prices.gpu["A10G"] == ISSUE_TABLE["A10G"]
    assert parse_prices('billing = "ms"').billing == "ms"


def test_only_cpu_overridden() -> None:
    prices = parse_prices("cpu_core_second = 0.5")
    assert prices == PriceTable(cpu_core_second=0.5)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("H100 = ", ["prices.toml", "not valid TOML"]),
        ("[gpu\nH100 = 1", ["not valid TOML"]),
        ("billing = 'second'\nbilling = 'ms'", ["not valid TOML"]),
        ("gpus = {H100 = 1}", ["unknown key 'gpus'", "billing", "cpu_core_second", "gpu"]),
        ("cpu = 1", ["unknown key 'cpu'"]),
        ("gpu = 1", ["[gpu] must be a table"]),
        ("gpu = [1, 2]", ["[gpu] must be a table"]),
        ("[gpu]\nH100 = -0.001", ["gpu.H100", "non-negative", "-0.001"]),
        ("[gpu]\nH100 = nan", ["gpu.H100", "nan"]),
        ("[gpu]\nH100 = inf", ["gpu.H100", "inf"]),
        ("[gpu]\nH100 = '0.001'", ["gpu.H100", "'0.001'"]),
        ("[gpu]\nH100 = true", ["gpu.H100", "True"]),
        ("[gpu.H100]\nprice = 1", ["gpu.H100", "USD per second"]),
        ("cpu_core_second = -1", ["cpu_core_second", "non-negative"]),
        ("cpu_core_second = 'cheap'", ["cpu_core_second", "'cheap'"]),
        ("memory_gib_second = nan", ["memory_gib_second"]),
        ("memory_gib_second = -inf", ["memory_gib_second"]),
        ("billing = 'minute'", ["billing must be 'ms' or 'second'", "'minute'"]),
        ("billing = 1", ["billing must be 'ms' or 'second'"]),
        ("billing = ['ms']", ["billing must be 'ms' or 'second'"]),
        ("billing = 'Second'", ["billing"]),
    ],
)
def test_malformed_price_files_are_rejected_clearly(text: str, words: list[str]) -> None:
    with pytest.raises(PriceError) as info:
        parse_prices(text, source="prices.toml")
    message = str(info.value)
    assert message.startswith("prices.toml")
    for word in words:
        assert word in message, (word, message)


def test_price_error_is_a_value_error() -> None:
    assert issubclass(PriceError, ValueError)
    with pytest.raises(ValueError, match="price file"):
        parse_prices("[gpu]\nL4 = -1")


def test_rate_arithmetic() -> None:
    prices = PriceTable()
    h100 = Resources("H100", 1, cpu=2, memory_gib=4)
    assert rate(h100, prices) == pytest.approx(0.001097 + 2 * 0.0000131 + 4 * 0.00000222)
    two = Resources("A100-80GB", 2, cpu=8, memory_gib=32)
    assert rate(two, prices) == pytest.approx(2 * 0.000694 + 8 * 0.0000131 + 32 * 0.00000222)
    # a packed worker pays its share of the GPU
    half = Resources("L4", 0.5)
    assert rate(half, prices) == pytest.approx(0.5 * 0.000222 + 0.0000131 + 0.00000222)
    # no GPU: CPU and memory only, with the defaults of one core and one GiB
    assert rate(Resources(), prices) == pytest.approx(0.0000131 + 0.00000222)
    # a type without a price costs its CPU and memory only
    assert rate(Resources("MYGPU", 1), prices) == rate(Resources(), prices)
    assert gpu_price(prices, "MYGPU") == 0.0
    assert gpu_price(prices, None) == 0.0
    assert gpu_price(parse_prices("[gpu]\nmygpu = 0.01"), "MYGPU") == 0.01


def test_rate_per_hour_matches_the_table() -> None:
    # a sanity check users do: an H100 with no CPU or memory is about 3.95 USD an hour
    alone = Resources("H100", 1, cpu=0, memory_gib=0)
    assert rate(alone, PriceTable()) * 3600 == pytest.approx(3.9492)


@pytest.mark.parametrize(
    ("lifetime_ms", "extra"),
    [
        (1200, 800),
        (2000, 0),
        (0, 0),
        (1, 999),
        (999.5, 0.5),
        (1000, 0),
        (1000.5, 999.5),
        (59_999, 1),
        (-5, 0),
    ],
)
def test_rounding_per_second(lifetime_ms: float, extra: float) -> None:
    assert rounding_ms(lifetime_ms, "second") == pytest.approx(extra)
    assert rounding_ms(lifetime_ms, "ms") == 0.0


def test_rounding_ignores_float_noise_of_epoch_differences() -> None:
    start = 1_767_225_600.123
    lifetime_ms = (start + 2.0 - start) * 1000.0  # 2000 ms, give or take float noise
    extra = rounding_ms(lifetime_ms, "second")
    assert 0.0 <= extra < 0.01
    assert rounding_ms(2000.0002, "second") == 0.0
    assert rounding_ms(1999.9998, "second") == pytest.approx(0.0002)


@settings(max_examples=500, deadline=None)
@given(st.floats(0, 1e9, allow_nan=False))
def test_rounding_bills_whole_seconds_and_never_less(lifetime_ms: float) -> None:
    extra = rounding_ms(lifetime_ms, "second")
    assert 0.0 <= extra < 1000.0
    billed_s = (lifetime_ms + extra) / 1000.0
    assert math.isclose(billed_s, round(billed_s), abs_tol=1e-6)
