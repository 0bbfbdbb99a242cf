"""Which GPUs a new worker gets: a pure function over the inventory and what is already held.

Rules:
- a function without `gpu` needs no GPU;
- `gpu="H100:2"` takes two whole H100s that nobody else holds;
- `gpu_memory="8GiB"` (one GPU) packs: the worker reserves that much memory on one GPU that is not
  held whole, choosing the fullest GPU that still fits (best fit), so small workers share a card and
  big ones still find an empty one; the reservations on a GPU never add up to more than it has;
- a list (`["H100", "A100-80GB"]`) is a fallback order: the first type that fits now wins;
- a worker's GPUs are all on one node (`Gpu.node`; a one-machine inventory is one node): a
  `gpu="H100:2"` worker takes two free H100s of the first node that has two, never one of each;
- nothing fits now but something would on an idle machine: wait, saying why;
- nothing in the inventory could ever fit: fail at once, naming what exists.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from ember.core.spec import GpuRequest, parse_memory_mib

GIB = 1024
DEFAULT_MEMORY_MIB = {
    "H200": 141 * GIB,
    "H100": 80 * GIB,
    "A100-80GB": 80 * GIB,
    "A100-40GB": 40 * GIB,
    "A100": 40 * GIB,
    "L40S": 48 * GIB,
    "A10G": 24 * GIB,
    "L4": 24 * GIB,
    "T4": 16 * GIB,
}
MAX_DECLARED = 1024
"""Most simulated GPUs one `--gpus` entry may declare."""
_DECLARED_RE = re.compile(
    r"^(?P<type>[A-Za-z0-9][A-Za-z0-9_.-]*?)(?::(?P<count>[0-9]+))?(?::(?P<mem>[^:]+))?$"
)


@dataclass(frozen=True)
class Gpu:
    index: int
    type: str
    memory_mib: int
    simulated: bool = False
    uuid: str | None = None
    node: str = ""
    """The node it is in: "" on a one-machine backend, the cluster's node id on Ray."""


@dataclass(frozen=True)
class Allocation:
    """What one worker holds: whole GPUs (`memory_mib=None`) or a reservation on one GPU."""

    worker_id: str
    gpus: tuple[int, ...]
    memory_mib: int | None = None


@dataclass(frozen=True)
class Placed:
    gpus: tuple[int, ...]
    type: str | None
    memory_mib: int | None = None


@dataclass(frozen=True)
class Wait:
    reason: str


@dataclass(frozen=True)
class Never:
    reason: str


Placement = Placed | Wait | Never


def parse_declared(text: str) -> tuple[Gpu, ...]:
    """`--gpus "L4:2,H100:1"` (memory from the known types) or `"MYGPU:2:24GiB"`: simulated GPUs."""
    gpus: list[Gpu] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        m = _DECLARED_RE.fullmatch(part)
        if m is None:
            raise ValueError(
                f"--gpus entry {part!r} is not TYPE[:COUNT[:MEMORY]], e.g. 'L4:2' or 'X1:1:24GiB'"
            )
        gpu_type, count = m["type"].upper(), int(m["count"] or 1)
        if not 1 <= count <= MAX_DECLARED:
            raise ValueError(
                f"--gpus entry {part!r}: the count must be at least 1 and at most {MAX_DECLARED}"
            )
        if m["mem"]:
            try:
                memory = parse_memory_mib(m["mem"])
            except ValueError as exc:
                raise ValueError(f"--gpus entry {part!r}: {exc}") from None
        else:
            memory = DEFAULT_MEMORY_MIB.get(gpu_type)
        if memory is None:
            known = ", ".join(DEFAULT_MEMORY_MIB)
            raise ValueError(
                f"--gpus entry {part!r}: unknown GPU type; give its memory ('{gpu_type}:{count}:24GiB') "
                f"or use a known type: {known}"
            )
        base = len(gpus)
        gpus.extend(Gpu(base + i, gpu_type, memory, simulated=True) for i in range(count))
    return tuple(gpus)


def describe_inventory(inventory: Sequence[Gpu]) -> str:
    if not inventory:
        return "no GPUs"
    counts = Counter((g.type, g.memory_mib) for g in inventory)
    text = ", ".join(f"{n}x {t} ({mem / GIB:g} GiB)" for (t, mem), n in counts.items())
    simulated = sum(1 for g in inventory if g.simulated)
    if simulated:
        text += " (simulated)" if simulated == len(inventory) else f" ({simulated} simulated)"
    return text


def _wanted(requests: Sequence[GpuRequest], gpu_memory_mib: int | None) -> str:
    kinds = " or ".join(str(r) for r in requests)
    return f"{kinds} with {gpu_memory_mib / GIB:g} GiB free" if gpu_memory_mib else kinds


def place(
    requests: Sequence[GpuRequest],
    gpu_memory_mib: int | None,
    inventory: Sequence[Gpu],
    held: Sequence[Allocation],
) -> Placement:
    if not requests:
        return Placed((), None, None)
    if gpu_memory_mib is not None and (gpu_memory_mib < 1 or any(r.count != 1 for r in requests)):
        raise ValueError("gpu_memory packs onto one GPU: it needs requests of count 1 and >= 1 MiB")
    whole: set[int] = set()
    packed: set[int] = set()
    reserved: Counter[int] = Counter()
    for a in held:
        for i in a.gpus:
            if a.memory_mib is None:
                whole.add(i)
            else:
                packed.add(i)
                reserved[i] += a.memory_mib
    for req in requests:
        of_type = [g for g in inventory if g.type == req.type]
        if gpu_memory_mib is None:
            free = [g for g in of_type if g.index not in whole and g.index not in packed]
            for node in dict.fromkeys(g.node for g in free):  # nodes in inventory order
                on_node = [g for g in free if g.node == node]
                if len(on_node) >= req.count:
                    return Placed(tuple(g.index for g in on_node[: req.count]), req.type, None)
        else:
            fits = [
                g
                for g in of_type
                if g.index not in whole and g.memory_mib - reserved[g.index] >= gpu_memory_mib
            ]
            if fits:
                best = min(fits, key=lambda g: (g.memory_mib - reserved[g.index], g.index))
                return Placed((best.index,), req.type, gpu_memory_mib)
    could_ever = [
        r
        for r in requests
        if (n := [g for g in inventory if g.type == r.type])
        and (
            max(Counter(g.node for g in n).values()) >= r.count
            if gpu_memory_mib is None
            else any(g.memory_mib >= gpu_memory_mib for g in n)
        )
    ]
    if could_ever:
        busy = ", ".join(
            f"{sum(1 for g in inventory if g.type == r.type and (g.index in whole or g.index in packed))}"
            f" of {sum(1 for g in inventory if g.type == r.type)} {r.type} in use"
            for r in could_ever
        )
        return Wait(f"waiting for a free {_wanted(requests, gpu_memory_mib)} ({busy})")
    nodes = len({g.node for g in inventory})
    return Never(
        f"no GPU here can ever fit {_wanted(requests, gpu_memory_mib)}; this server has "
        f"{describe_inventory(inventory)}"
        + (f" on {nodes} nodes (a worker's GPUs are all on one node)" if nodes > 1 else "")
    )
