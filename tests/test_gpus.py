"""GPU discovery: NVML device names to ember's type names, and discovery on a machine without GPUs."""

from __future__ import annotations

import logging
import re
import shutil
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.backends.gpus import discover, gpu_type_from_name
from ember.core.placement import DEFAULT_MEMORY_MIB
from ember.core.pricing import DEFAULT_GPU_PRICES
from ember.core.spec import parse_gpu

GPU_TYPE_RE = re.compile(r"^[A-Z0-9][A-Z0-9_.-]*$")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H100 PCIe", "H100"),
        ("NVIDIA H100 NVL", "H100"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA H200 NVL", "H200"),
        ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
        ("NVIDIA A100 80GB PCIe", "A100-80GB"),
        ("NVIDIA A100-SXM4-40GB", "A100-40GB"),
        ("NVIDIA A100-PCIE-40GB", "A100-40GB"),
        ("A100-PCIE-40GB", "A100-40GB"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA A10G", "A10G"),
        ("Tesla T4", "T4"),
        ("nvidia l4", "L4"),
    ],
)
def test_known_names_map_to_price_table_types(name: str, expected: str) -> None:
    assert gpu_type_from_name(name) == expected
    assert expected in DEFAULT_MEMORY_MIB


def test_every_priced_type_is_reachable_from_some_name() -> None:
    names = [
        "NVIDIA H100 80GB HBM3",
        "NVIDIA A100-SXM4-80GB",
        "NVIDIA A100-PCIE-40GB",
        "NVIDIA L40S",
        "NVIDIA A10G",
        "NVIDIA L4",
        "Tesla T4",
    ]
    assert {gpu_type_from_name(n) for n in names} == set(DEFAULT_GPU_PRICES)


def test_families_do_not_swallow_their_neighbours() -> None:
    # L40 and A10 are different cards from L4/L40S and A10G: they keep their own names.
    assert gpu_type_from_name("NVIDIA L40") == "L40"
    assert gpu_type_from_name("NVIDIA A10") == "A10"
    assert gpu_type_from_name("NVIDIA H800") == "H800"


def test_an_a100_without_a_size_in_its_name_is_sized_by_its_memory() -> None:
    assert gpu_type_from_name("NVIDIA A100", memory_mib=81920) == "A100-80GB"
    assert gpu_type_from_name("NVIDIA A100", memory_mib=40960) == "A100-40GB"
    assert gpu_type_from_name("NVIDIA A100") == "A100-40GB"
    # the name wins over the memory NVML reports (which is a little under the label)
    assert gpu_type_from_name("NVIDIA A100-SXM4-80GB", memory_mib=81559) == "A100-80GB"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("NVIDIA GeForce RTX 4090", "RTX-4090"),
        ("NVIDIA RTX A6000", "RTX-A6000"),
        ("Tesla V100-SXM2-16GB", "V100-SXM2-16GB"),
        ("Quadro RTX 8000", "QUADRO-RTX-8000"),
        ("  NVIDIA   B200  ", "B200"),
        ("", "GPU"),
        ("NVIDIA", "GPU"),
        ("???", "GPU"),
    ],
)
def test_unknown_names_are_kept_cleaned_and_upper_case(name: str, expected: str) -> None:
    assert gpu_type_from_name(name) == expected


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=40))
def test_any_name_gives_a_type_a_function_can_ask_for(name: str) -> None:
    gpu_type = gpu_type_from_name(name)
    assert GPU_TYPE_RE.match(gpu_type), gpu_type
    # `gpu="<that type>"` parses back to the same type, so placement can match it
    assert parse_gpu(gpu_type)[0].type == gpu_type
    assert gpu_type_from_name(gpu_type) == gpu_type


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has a GPU driver")
def test_discover_finds_nothing_and_does_not_raise_without_a_driver() -> None:
    assert discover() == ()
    assert discover() == ()  # a second call (init after a failed init) is just as quiet


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has a GPU driver")
def test_discover_says_why_at_debug_level(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="ember.gpus"):
        assert discover() == ()
    assert any("GPU discovery" in r.getMessage() for r in caplog.records)
    assert all(r.levelno == logging.DEBUG for r in caplog.records if r.name == "ember.gpus")


def test_discover_without_the_package_finds_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    # `None` in sys.modules makes `import pynvml` raise ImportError, as if it were not installed.
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert discover() == ()


@pytest.mark.skipif(shutil.which("nvidia-smi") is None, reason="needs an NVIDIA driver")
def test_discover_on_a_gpu_machine() -> None:  # pragma: no cover - runs only where a GPU is
    gpus = discover()
    assert gpus
    assert [g.index for g in gpus] == list(range(len(gpus)))
    for g in gpus:
        assert not g.simulated
        assert g.uuid and g.uuid.startswith(("GPU-", "MIG-"))
        assert g.memory_mib > 1024
        assert GPU_TYPE_RE.match(g.type)
