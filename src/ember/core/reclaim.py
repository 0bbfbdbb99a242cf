"""Which idle workers give up their GPUs to pools whose jobs wait for one: a pure rule.

Without it, a job waiting for a GPU that an idle worker of another function holds waits until
that worker's `idle_timeout` runs out (a minute by default) while the GPU does nothing. With it,
that worker is drained at once and the waiting pool's worker is placed on the GPU it frees.

The rules:
- only an IDLE worker is drained: never a STARTING or BUSY one (nor one already DRAINING);
- a pool never reclaims from itself, and keeps the workers its scaling spec asks for (`keep`:
  `min_workers`, the pre-warm floor, `buffer_workers`, its own queued and running jobs); only its
  surplus idle workers, those that wait only for `idle_timeout`, may go;
- a worker is drained only where that makes the waiting request placeable (its type, fallback
  order, count and memory, by `placement.place`), and no more of them than that needs: the
  fewest drains win; among equals, the earlier type of the request's fallback order, then the
  GPUs whose workers have been idle longest (as `place` prefers a fallback type free now to
  the first choice later, a type that costs fewer drains wins over the first choice);
- a worker's GPUs are all on one node (as `place` has it), so are the GPUs freed for it;
- a GPU held by a worker already draining (or stopped) counts as free: it soon is, so nothing
  more is drained for it;
- waiting pools are served in the order given, each new worker seeing the GPUs of those planned
  before it. The answer depends on the facts only, not on their order: ties go by index and id.

The rule knows no backend: it reads the inventory, what each live worker holds and its state, and
the waiting demand; the control plane drains the workers it names through the backend protocol.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from ember.core.autoscaler import WorkerState
from ember.core.placement import Allocation, Gpu, Placed, place
from ember.core.spec import GpuRequest

LIVE = (WorkerState.STARTING, WorkerState.IDLE, WorkerState.BUSY)
"""States of a worker that counts towards its pool; any other is on its way out."""


@dataclass(frozen=True)
class Holder:
    """A worker that holds GPUs, as the rule needs to see it."""

    worker: str
    pool: str
    """Its pool's key (any string that names one pool)."""
    state: WorkerState
    gpus: tuple[int, ...]
    memory_mib: int | None = None
    """A reservation on its one GPU (`gpu_memory`); None: its GPUs are held whole."""
    idle_since: float | None = None
    """When it last became idle (None unless IDLE)."""

    @property
    def allocation(self) -> Allocation:
        return Allocation(self.worker, self.gpus, self.memory_mib)


@dataclass(frozen=True)
class Need:
    """Workers a pool wants now for its queued jobs but cannot place on a free GPU."""

    pool: str
    requests: tuple[GpuRequest, ...]
    memory_mib: int | None = None
    workers: int = 1


@dataclass(frozen=True)
class Served:
    """One new worker of a waiting pool: placed on `placed` once the workers of `drain` are
    gone (none when the GPUs are already on their way back)."""

    pool: str
    placed: Placed
    drain: tuple[str, ...]


def reclaim(
    inventory: Sequence[Gpu],
    holders: Sequence[Holder],
    keep: Mapping[str, int],
    needs: Sequence[Need],
) -> tuple[Served, ...]:
    """The workers to drain, and where each waiting worker then goes.

    `holders` are every worker that holds GPUs; `keep[pool]` is how many live workers that pool
    must keep (a pool missing from it gives up none). A need that draining cannot serve gets
    no drains, and a pool's later workers are not served once one of them is not.
    """
    gone = {h.worker for h in holders if h.state not in LIVE}
    live = Counter(h.pool for h in holders if h.state in LIVE)
    spare = {p: max(0, n - keep.get(p, n)) for p, n in live.items()}
    planned: list[Allocation] = []
    served: list[Served] = []
    for need in needs:
        for _ in range(need.workers):
            held = [h.allocation for h in holders if h.worker not in gone] + planned
            fit = place(need.requests, need.memory_mib, inventory, held)
            victims: tuple[Holder, ...] = ()
            if not isinstance(fit, Placed):
                found = _victims(need, inventory, holders, gone, spare, planned)
                if found is None:
                    break
                victims, fit = found
            for v in victims:
                gone.add(v.worker)
                spare[v.pool] -= 1
            served.append(Served(need.pool, fit, tuple(v.worker for v in victims)))
            if fit.gpus:
                planned.append(Allocation(f"(planned for {need.pool})", fit.gpus, fit.memory_mib))
    return tuple(served)


def _idle_key(h: Holder) -> tuple[float, str]:
    """Idle longest first; ties by id."""
    return (h.idle_since if h.idle_since is not None else math.inf, h.worker)


def _victims(
    need: Need,
    inventory: Sequence[Gpu],
    holders: Sequence[Holder],
    gone: set[str],
    spare: Mapping[str, int],
    planned: Sequence[Allocation],
) -> tuple[tuple[Holder, ...], Placed] | None:
    """The fewest drains that make `need` placeable (the earlier type of its fallback order
    among equals); None if none do."""
    occupants: dict[int, list[tuple[Allocation, Holder | None]]] = {}
    for h in holders:
        if h.worker not in gone:
            for i in h.gpus:
                occupants.setdefault(i, []).append((h.allocation, h))
    for a in planned:  # workers about to start: never drained
        for i in a.gpus:
            occupants.setdefault(i, []).append((a, None))

    def movable(h: Holder | None) -> bool:
        return (
            h is not None
            and h.state is WorkerState.IDLE
            and h.pool != need.pool
            and spare.get(h.pool, 0) > 0
        )

    def within_spare(victims: Sequence[Holder]) -> bool:
        counts = Counter(v.pool for v in victims)
        return all(n <= spare.get(p, 0) for p, n in counts.items())

    def rank(victims: Sequence[Holder], g: Gpu) -> tuple[int, float, tuple[str, ...], int]:
        """Fewest drains, then idle longest (its most recently idle one), then by id and index."""
        newest = max((_idle_key(v)[0] for v in victims), default=-math.inf)
        return (len(victims), newest, tuple(sorted(v.worker for v in victims)), g.index)

    best: tuple[tuple[Holder, ...], Placed] | None = None
    for option in need.requests:  # the fewest drains win; among equals, the fallback order
        choices: list[tuple[tuple[Holder, ...], Gpu]] = []
        for g in (g for g in inventory if g.type == option.type):
            occ = occupants.get(g.index, [])
            victims: tuple[Holder, ...] | None = None
            if need.memory_mib is not None:
                victims = _packed_victims(need.memory_mib, g, occ, movable)
            elif all(movable(h) for _, h in occ):  # a whole GPU: everyone on it goes
                victims = tuple(sorted({h for _, h in occ if h is not None}, key=_idle_key))
            if victims is not None and within_spare(victims):
                choices.append((victims, g))
        for node in dict.fromkeys(g.node for g in inventory):  # a worker's GPUs share a node
            left = [c for c in choices if c[1].node == node]
            chosen: list[Holder] = []
            for _ in range(option.count):  # each next GPU: the fewest drains beyond the chosen
                fits = [
                    (rank([v for v in on_gpu if v not in chosen], g), on_gpu, g)
                    for on_gpu, g in left
                    if within_spare(chosen + [v for v in on_gpu if v not in chosen])
                ]
                if not fits:
                    break
                _, on_gpu, g = min(fits, key=lambda f: f[0])
                chosen += [v for v in on_gpu if v not in chosen]
                left = [c for c in left if c[1] is not g]
            else:
                found = _fit(need, inventory, holders, gone, planned, chosen)
                if found is not None and (best is None or len(found[0]) < len(best[0])):
                    best = found
    return best


def _fit(
    need: Need,
    inventory: Sequence[Gpu],
    holders: Sequence[Holder],
    gone: set[str],
    planned: Sequence[Allocation],
    chosen: Sequence[Holder],
) -> tuple[tuple[Holder, ...], Placed] | None:
    """Where `need` places once `chosen` are drained, less any of them it does not need (the
    most recently idle dropped first); None if it does not place."""

    def placed(victims: Sequence[Holder]) -> Placed | None:
        drained = gone | {v.worker for v in victims}
        held = [h.allocation for h in holders if h.worker not in drained] + list(planned)
        fit = place(need.requests, need.memory_mib, inventory, held)
        return fit if isinstance(fit, Placed) else None

    victims = sorted(chosen, key=_idle_key)
    if (fit := placed(victims)) is None:
        return None
    for v in reversed(list(victims)):
        fewer = [u for u in victims if u is not v]
        if (smaller := placed(fewer)) is not None:
            victims, fit = fewer, smaller
    return tuple(victims), fit


def _packed_victims(
    memory_mib: int,
    g: Gpu,
    occ: Sequence[tuple[Allocation, Holder | None]],
    movable: Callable[[Holder | None], bool],
) -> tuple[Holder, ...] | None:
    """The fewest movable workers on `g` whose going leaves `memory_mib` free on it: whoever
    holds it whole, then the largest reservations first (idle longest among equals)."""
    fixed = [(a, h) for a, h in occ if not movable(h)]
    if any(a.memory_mib is None for a, _ in fixed):
        return None
    free = g.memory_mib - sum(a.memory_mib or 0 for a, _ in fixed)
    if free < memory_mib:
        return None
    moving = [(a, h) for a, h in occ if movable(h) and h is not None]
    victims = [h for a, h in moving if a.memory_mib is None]
    packed = [(a, h) for a, h in moving if a.memory_mib is not None]
    packed.sort(key=lambda ah: (-(ah[0].memory_mib or 0), _idle_key(ah[1])))
    if victims:  # held whole: nobody packs on it, but should someone, all of them go
        return tuple(sorted({*victims, *(h for _, h in packed)}, key=_idle_key))
    reserved = sum(a.memory_mib or 0 for a, _ in packed)
    out: list[Holder] = []
    for a, h in packed:
        if free - reserved >= memory_mib:
            break
        out.append(h)
        reserved -= a.memory_mib or 0
    return tuple(sorted(out, key=_idle_key))
