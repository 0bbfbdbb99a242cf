"""GPU discovery through NVML (the `nvidia-ml-py` package, imported as `pynvml`).

`discover()` lists this machine's GPUs as `Gpu`s in NVML order (PCI bus order) with ember's type
names, memory in MiB and the GPU's UUID. It never raises: without the package, the driver or a GPU
it returns `()` (the reason is logged at debug level), and the server falls back to declared GPUs
(`--gpus`) or to none.

NVML indexes follow the PCI bus; CUDA's default order may differ (fastest first). A worker's
`CUDA_VISIBLE_DEVICES` should therefore name GPUs by UUID, or be set with
`CUDA_DEVICE_ORDER=PCI_BUS_ID`.
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Any

from ember.core.placement import GIB, Gpu

log = logging.getLogger("ember.gpus")

_VENDOR_WORDS = re.compile(r"\b(?:NVIDIA|TESLA|GEFORCE)\b", re.ASCII)
_SIZE_GB = re.compile(r"\b(\d+)\s*GB\b", re.ASCII)
# Order matters: L40S before L40 before L4 (the word boundaries also keep "L4" off "L40").
_FAMILIES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\bH200\b", re.ASCII), "H200"),
    (re.compile(r"\bH100\b", re.ASCII), "H100"),
    (re.compile(r"\bL40S\b", re.ASCII), "L40S"),
    (re.compile(r"\bL4\b", re.ASCII), "L4"),
    (re.compile(r"\bA10G\b", re.ASCII), "A10G"),
    (re.compile(r"\bT4\b", re.ASCII), "T4"),
)
_A100 = re.compile(r"\bA100\b", re.ASCII)


def _text(value: Any) -> str:
    """NVML returns `str` in recent `nvidia-ml-py` releases and `bytes` in old ones."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def gpu_type_from_name(name: str, *, memory_mib: int | None = None) -> str:
    """ember's type name for an NVML device name, e.g. "NVIDIA A100-SXM4-80GB" -> "A100-80GB".

    Known families map to the names of the price table (H200, H100, A100-80GB, A100-40GB, L40S,
    A10G, L4, T4); any other name is kept, upper-cased, without the vendor words, with runs of other
    characters turned into single dashes ("NVIDIA GeForce RTX 4090" -> "RTX-4090"), so that
    `gpu="RTX-4090"` can ask for it. An A100 whose name gives no size is sized by `memory_mib`.
    """
    upper = name.upper()
    if _A100.search(upper):
        size = _SIZE_GB.search(upper)
        if size is not None:
            gb = int(size.group(1))
        elif memory_mib is not None:
            gb = 80 if memory_mib > 60 * GIB else 40
        else:
            gb = 40
        return "A100-80GB" if gb >= 60 else "A100-40GB"
    for pattern, gpu_type in _FAMILIES:
        if pattern.search(upper):
            return gpu_type
    cleaned = re.sub(r"[^A-Z0-9_.]+", "-", _VENDOR_WORDS.sub(" ", upper)).strip("-_.")
    return cleaned or "GPU"


def discover() -> tuple[Gpu, ...]:
    """This machine's GPUs through NVML; `()` when there is no package, driver or GPU."""
    try:
        import pynvml
    except ImportError:
        log.debug("GPU discovery: nvidia-ml-py (pynvml) is not installed")
        return ()
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        log.debug("GPU discovery: NVML is not available (%s)", exc)
        return ()
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = _text(pynvml.nvmlDeviceGetName(handle))
            memory_mib = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total) // 2**20
            uuid = _text(pynvml.nvmlDeviceGetUUID(handle))
            gpus.append(
                Gpu(
                    index=index,
                    type=gpu_type_from_name(name, memory_mib=memory_mib),
                    memory_mib=memory_mib,
                    simulated=False,
                    uuid=uuid,
                )
            )
        return tuple(gpus)
    except Exception as exc:
        log.debug("GPU discovery: NVML failed while listing devices (%s)", exc)
        return ()
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
