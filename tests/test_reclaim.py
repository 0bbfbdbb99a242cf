"""Reclaiming idle GPUs for waiting pools (`ember.core.reclaim`): examples, then properties.

The properties run the rule over random inventories, holdings (built by `place`, so they are
valid), worker states, pools' floors and waiting requests, and check it against `place` itself:
after the drains it names, each served worker places exactly where it said; nothing busy,
starting, of the waiting pool itself or below a pool's floor is drained; and no drain is spare.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ember.control.records import Job, Pool, Worker
from ember.control.scaling import Facts, Scaler
from ember.core.autoscaler import WorkerState
from ember.core.placement import GIB, Allocation, Gpu, Placed, Wait, parse_declared, place
from ember.core.reclaim import LIVE, Holder, Need, Served, reclaim
from ember.core.spec import GpuRequest, make_spec, parse_gpu

IDLE, BUSY, STARTING, DRAINING = (
    WorkerState.IDLE,
    WorkerState.BUSY,
    WorkerState.STARTING,
    WorkerState.DRAINING,
)


def need(pool: str, *gpu: str, memory: int | None = None, workers: int = 1) -> Need:
    return Need(pool, parse_gpu(list(gpu)), memory, workers)


def idle(worker: str, pool: str, *gpus: int, since: float = 0.0, mib: int | None = None) -> Holder:
    return Holder(worker, pool, IDLE, gpus, mib, since)


def drains(result: Sequence[Served]) -> list[str]:
    return [w for s in result for w in s.drain]


L4_1 = parse_declared("L4:1")
L4_2 = parse_declared("L4:2")


# --------------------------------------------------------------------------- examples
def test_the_idle_holder_of_the_only_gpu_gives_it_to_the_waiting_pool() -> None:
    [served] = reclaim(L4_1, [idle("a1", "A", 0)], {"A": 0}, [need("B", "L4")])
    assert served == Served("B", Placed((0,), "L4"), ("a1",))


def test_busy_starting_and_draining_workers_are_never_drained() -> None:
    for state in (BUSY, STARTING):
        holder = Holder("a1", "A", state, (0,))
        assert reclaim(L4_1, [holder], {"A": 0}, [need("B", "L4")]) == ()
    # a draining holder's GPU is on its way back: the waiting worker gets it, nothing more goes
    holders = [Holder("a1", "A", DRAINING, (0,)), idle("c1", "C", 1)]
    [served] = reclaim(L4_2, holders, {"A": 0, "C": 0}, [need("B", "L4")])
    assert served == Served("B", Placed((0,), "L4"), ())


def test_a_pool_never_reclaims_from_itself() -> None:
    assert reclaim(L4_1, [idle("b1", "B", 0)], {"B": 0}, [need("B", "L4")]) == ()


def test_a_pool_keeps_its_floor_and_gives_only_its_surplus() -> None:
    holders = [idle("a1", "A", 0, since=1), idle("a2", "A", 1, since=2)]
    assert reclaim(L4_2, holders, {"A": 2}, [need("B", "L4")]) == ()
    assert drains(reclaim(L4_2, holders, {"A": 1}, [need("B", "L4", workers=2)])) == ["a1"]
    assert reclaim(L4_2, holders, {}, [need("B", "L4")]) == (), "an unknown pool gives up none"


def test_only_as_many_as_needed_and_the_one_idle_longest() -> None:
    holders = [idle("a1", "A", 0, since=50), idle("c1", "C", 1, since=10)]
    [served] = reclaim(L4_2, holders, {"A": 0, "C": 0}, [need("B", "L4")])
    assert served.drain == ("c1",) and served.placed.gpus == (1,)
    both = reclaim(L4_2, holders, {"A": 0, "C": 0}, [need("B", "L4", workers=3)])
    assert [s.drain for s in both] == [("c1",), ("a1",)], "two GPUs serve two of the three"


def test_the_fallback_order_holds() -> None:
    inventory = parse_declared("H100:1,L4:1")
    holders = [Holder("a1", "A", BUSY, (0,)), idle("c1", "C", 1)]
    [served] = reclaim(inventory, holders, {"A": 0, "C": 0}, [need("B", "H100", "L4")])
    assert served == Served("B", Placed((1,), "L4"), ("c1",)), "the H100 is busy: the L4"
    holders = [idle("a1", "A", 0, since=99), idle("c1", "C", 1, since=1)]
    [served] = reclaim(inventory, holders, {"A": 0, "C": 0}, [need("B", "H100", "L4")])
    assert served == Served("B", Placed((0,), "H100"), ("a1",)), "the first choice among equals"
    # as `place` takes a fallback free now over the first choice later, one drain beats two
    holders = [idle("a1", "A", 0), idle("c1", "C", 1)]
    [served] = reclaim(L4_2, holders, {"A": 0, "C": 0}, [need("B", "L4:2", "L4")])
    assert served == Served("B", Placed((0,), "L4"), ("a1",))


def test_whole_gpus_of_a_count() -> None:
    inventory = parse_declared("H100:3")
    holders = [idle("a1", "A", 0), Holder("c1", "C", BUSY, (1,)), idle("d1", "D", 2)]
    keep = {"A": 0, "C": 0, "D": 0}
    [served] = reclaim(inventory, holders, keep, [need("B", "H100:2")])
    assert served.placed.gpus == (0, 2) and sorted(served.drain) == ["a1", "d1"]
    assert reclaim(inventory, holders, keep, [need("B", "H100:3")]) == (), "one is busy"
    # one worker on two GPUs frees both at once
    two = [Holder("a1", "A", IDLE, (0, 1), None, 5.0)]
    [served] = reclaim(inventory, two, {"A": 0}, [need("B", "H100:3")])
    assert served.drain == ("a1",) and served.placed.gpus == (0, 1, 2)


def test_the_gpus_freed_for_one_worker_are_on_one_node() -> None:
    inventory = tuple(Gpu(i, "H100", 80 * GIB, node=n) for i, n in enumerate("xyyx"))
    holders = [idle("a1", "A", 0, since=1), idle("c1", "C", 1, since=2), idle("d1", "D", 2)]
    [served] = reclaim(inventory, holders, {"A": 0, "C": 0, "D": 0}, [need("B", "H100:2")])
    assert served.placed.gpus == (0, 3) and served.drain == ("a1",), "one drain on node x"


def test_packed_gpus_drain_the_fewest_reservations_that_make_room() -> None:
    mib = 8 * GIB
    holders = [idle(f"a{i}", "A", 0, since=i, mib=mib) for i in range(3)]
    [served] = reclaim(L4_1, holders, {"A": 0}, [need("B", "L4", memory=16 * GIB)])
    assert served.drain == ("a0", "a1") and served.placed == Placed((0,), "L4", 16 * GIB)
    # a busy reservation stays: 16 GiB cannot be freed next to it on a 24 GiB L4 ...
    holders[0] = Holder("a0", "A", BUSY, (0,), 12 * GIB)
    assert reclaim(L4_1, holders, {"A": 0}, [need("B", "L4", memory=16 * GIB)]) == ()
    # ... but 8 GiB can, by draining one of the two idle ones
    [served] = reclaim(L4_1, holders, {"A": 0}, [need("B", "L4", memory=4 * GIB)])
    assert served.drain == ("a1",)


def test_fewest_drains_first_then_idle_longest() -> None:
    holders = [
        idle("a1", "A", 0, since=1, mib=8 * GIB),
        idle("a2", "A", 0, since=2, mib=8 * GIB),
        idle("c1", "C", 1, since=30),
    ]
    [served] = reclaim(L4_2, holders, {"A": 0, "C": 0}, [need("B", "L4", memory=20 * GIB)])
    assert served.drain == ("c1",) and served.placed.gpus == (1,)


def test_waiting_pools_are_served_in_order_each_seeing_the_one_before() -> None:
    holders = [idle("a1", "A", 0)]
    first, *rest = reclaim(L4_1, holders, {"A": 0}, [need("B", "L4"), need("C", "L4")])
    assert first == Served("B", Placed((0,), "L4"), ("a1",)) and rest == []


def test_nothing_is_drained_when_nothing_could_ever_fit() -> None:
    assert reclaim(L4_1, [idle("a1", "A", 0)], {"A": 0}, [need("B", "H100")]) == ()
    assert reclaim(L4_1, [idle("a1", "A", 0)], {"A": 0}, [need("B", "L4:2")]) == ()


# --------------------------------------------------------------------------- properties
TYPES = ("L4", "H100")
POOLS = ("P0", "P1", "P2", "P3")
STATES = (IDLE, IDLE, BUSY, STARTING, DRAINING)


@st.composite
def inventories(draw: st.DrawFn) -> tuple[Gpu, ...]:
    specs = draw(
        st.lists(
            st.tuples(
                st.sampled_from(TYPES),
                st.sampled_from([16 * GIB, 24 * GIB]),
                st.sampled_from(["", "", "n1"]),
            ),
            min_size=1,
            max_size=5,
        )
    )
    return tuple(Gpu(i, t, m, simulated=True, node=n) for i, (t, m, n) in enumerate(specs))


@st.composite
def asks(draw: st.DrawFn) -> tuple[tuple[GpuRequest, ...], int | None]:
    memory = draw(st.none() | st.sampled_from([4 * GIB, 8 * GIB, 12 * GIB, 20 * GIB]))
    counts = st.just(1) if memory is not None else st.integers(1, 2)
    requests = draw(
        st.lists(st.builds(GpuRequest, st.sampled_from(TYPES), counts), min_size=1, max_size=2)
    )
    return tuple(requests), memory


@st.composite
def holdings(draw: st.DrawFn, inventory: tuple[Gpu, ...]) -> list[Holder]:
    """Valid holdings (each placed by `place` after the ones before), in random states."""
    holders: list[Holder] = []
    for n in range(draw(st.integers(0, 9))):
        requests, memory = draw(asks())
        fit = place(requests, memory, inventory, [h.allocation for h in holders])
        if isinstance(fit, Placed) and fit.gpus:
            state = draw(st.sampled_from(STATES))
            since = draw(st.integers(0, 5)) if state is IDLE else None
            pool = draw(st.sampled_from(POOLS))
            holders.append(Holder(f"w{n}", pool, state, fit.gpus, fit.memory_mib, since))
    return holders


@st.composite
def cases(draw: st.DrawFn) -> tuple[tuple[Gpu, ...], list[Holder], dict[str, int], list[Need]]:
    inventory = draw(inventories())
    holders = draw(holdings(inventory))
    live = Counter(h.pool for h in holders if h.state in LIVE)
    keep = {p: draw(st.integers(0, live[p] + 1)) for p in POOLS if draw(st.booleans()) or live[p]}
    needs = []
    for pool in draw(st.lists(st.sampled_from(POOLS), min_size=1, max_size=2, unique=True)):
        requests, memory = draw(asks())
        needs.append(Need(pool, requests, memory, draw(st.integers(1, 2))))
    return inventory, holders, keep, needs


def replay(
    inventory: Sequence[Gpu],
    holders: Sequence[Holder],
    needs: Sequence[Need],
    out: Sequence[Served],
) -> None:
    """Apply the drains in order: after each served worker's, `place` puts it where it says;
    without any one of them, it could not be placed; a need is served from its first worker on."""
    by_id = {h.worker: h for h in holders}
    gone = {h.worker for h in holders if h.state not in LIVE}
    planned: list[Allocation] = []
    served = iter(out)
    pending = next(served, None)
    for nd in needs:
        for _ in range(nd.workers):
            if pending is None or pending.pool != nd.pool:
                break
            before = [h.allocation for h in holders if h.worker not in gone] + planned
            if not pending.drain:
                assert place(nd.requests, nd.memory_mib, inventory, before) == pending.placed
            for w in pending.drain:
                victim = by_id[w]
                assert victim.state is IDLE and victim.pool != nd.pool and w not in gone
                one_less = [
                    a for a in before if a.worker_id == w or a.worker_id not in pending.drain
                ]
                assert not isinstance(
                    place(nd.requests, nd.memory_mib, inventory, one_less), Placed
                ), f"draining {w} was not needed"
            gone |= set(pending.drain)
            after = [h.allocation for h in holders if h.worker not in gone] + planned
            assert place(nd.requests, nd.memory_mib, inventory, after) == pending.placed
            if pending.placed.gpus:
                placed = pending.placed
                planned.append(Allocation(f"planned{len(planned)}", placed.gpus, placed.memory_mib))
            pending = next(served, None)
    assert pending is None, f"served out of order: {pending}"


@settings(max_examples=800, deadline=None)
@given(cases())
def test_drains_follow_the_rules(
    case: tuple[tuple[Gpu, ...], list[Holder], dict[str, int], list[Need]],
) -> None:
    inventory, holders, keep, needs = case
    out = reclaim(inventory, holders, keep, needs)
    replay(inventory, holders, needs, out)
    drained = [w for s in out for w in s.drain]
    assert len(drained) == len(set(drained)), "no worker is drained twice"
    live = Counter(h.pool for h in holders if h.state in LIVE)
    lost = Counter(h.pool for h in holders if h.worker in set(drained))
    for pool, n in lost.items():
        assert live[pool] - n >= keep.get(pool, live[pool]), f"{pool} went below its floor"
    assert len(out) <= sum(n.workers for n in needs)
    # deterministic, whatever order the facts come in
    shuffled = list(holders)
    random.Random(len(holders)).shuffle(shuffled)
    assert reclaim(inventory, shuffled, keep, needs) == out


@settings(max_examples=500, deadline=None)
@given(cases())
def test_a_gpu_that_draining_could_free_is_found(
    case: tuple[tuple[Gpu, ...], list[Holder], dict[str, int], list[Need]],
) -> None:
    """One worker of one pool, one GPU type: where draining every movable worker on some GPU
    of that type would make room (within the pools' surplus), the rule serves the need."""
    inventory, holders, keep, needs = case
    nd = Need(needs[0].pool, needs[0].requests[:1], needs[0].memory_mib)
    if nd.requests[0].count != 1:
        return
    live = Counter(h.pool for h in holders if h.state in LIVE)
    spare = {p: n - keep.get(p, n) for p, n in live.items()}
    gone = {h.worker for h in holders if h.state not in LIVE}
    held = [h.allocation for h in holders if h.worker not in gone]
    out = reclaim(inventory, holders, keep, [nd])
    if isinstance(place(nd.requests, nd.memory_mib, inventory, held), Placed):
        assert len(out) == 1 and out[0].drain == ()
        return
    could = False
    for g in (g for g in inventory if g.type == nd.requests[0].type):
        on = [h for h in holders if h.worker not in gone and g.index in h.gpus]
        movable = [h for h in on if h.state is IDLE and h.pool != nd.pool]
        if any(n > spare.get(p, 0) for p, n in Counter(h.pool for h in movable).items()):
            continue
        rest = [h.allocation for h in holders if h.worker not in gone and h not in movable]
        if isinstance(place(nd.requests, nd.memory_mib, [g], rest), Placed):
            could = True
    if could:
        assert len(out) == 1, out


def test_a_wait_with_nothing_movable_drains_nothing() -> None:
    inventory = parse_declared("L4:2")
    holders = [Holder("a1", "A", BUSY, (0,)), Holder("a2", "A", STARTING, (1,))]
    assert isinstance(
        place(parse_gpu("L4"), None, inventory, [h.allocation for h in holders]), Wait
    )
    assert reclaim(inventory, holders, {"A": 0}, [need("B", "L4")]) == ()


# --------------------------------------------------------------------------- the scaler's use of it
def scaler_with(workers: list[Worker]) -> Scaler:
    facts = Facts(
        rules_of=lambda pool: None,
        blocked=lambda ws, rules: False,
        gpu_request=lambda spec, rules: spec.gpu,
        live=lambda: list(workers),
        gpus_held=lambda ws, policy: set(),
    )
    return Scaler(facts, L4_1)


def pool_of(unit: str, workspace: str = "default", **scaling: Any) -> Pool:
    spec = make_spec(gpu="L4", idle_timeout=60, **scaling)
    return Pool("app", 1, unit, spec, Path("/nonexistent"), workspace=workspace)


def idle_worker(pool: Pool) -> Worker:
    w = Worker(f"w-{pool.unit}", pool, "secret", 0.0, WorkerState.IDLE, gpus=(0,))
    w.idle_since = 1.0
    pool.workers[w.id] = w
    return w


def queue_job(pool: Pool) -> None:
    pool.queue.append(Job("j1", pool.app, pool.unit, pool.unit, {}, 0.0, 0.0))


def test_the_scaler_drains_another_pools_idle_worker_only_for_queued_jobs() -> None:
    a, b = pool_of("a"), pool_of("b", buffer_workers=1)
    victim = idle_worker(a)
    scaler = scaler_with([victim])
    plan = scaler.plan(b)  # b wants a buffer worker, but no job waits: nothing is reclaimed
    assert plan.start == [] and plan.drain == [] and b.wait_reason is not None
    queue_job(b)
    plan = scaler.plan(b)
    assert plan.start == [] and plan.drain == [(victim, "idle; GPU reclaimed for app/b")]
    assert b.wait_reason is not None and "giving one up" in b.wait_reason
    assert b.queue[0].reason == b.wait_reason
    victim.state = WorkerState.DRAINING  # as the plane's drain leaves it: nothing more goes
    assert scaler.plan(b).drain == []
    victim.state, a.spec = WorkerState.IDLE, make_spec(gpu="L4", min_workers=1)
    assert scaler.plan(b).drain == [], "a's min worker stays"


def test_a_victim_in_another_workspace_is_told_no_names() -> None:
    a, b = pool_of("a", workspace="other"), pool_of("b")
    victim = idle_worker(a)
    queue_job(b)
    [(w, why)] = scaler_with([victim]).plan(b).drain
    assert w is victim and why == "idle; GPU reclaimed for a job of another workspace"
