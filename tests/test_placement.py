"""Placement of workers on GPUs (`ember.core.placement`): examples, then hypothesis properties.

The properties check `place` against a small independent model of the rules (free whole GPUs,
free memory per GPU), one call at a time and over random sequences of allocations and releases.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    rule,
)

from ember.core.placement import (
    DEFAULT_MEMORY_MIB,
    GIB,
    MAX_DECLARED,
    Allocation,
    Gpu,
    Never,
    Placed,
    Placement,
    Wait,
    describe_inventory,
    parse_declared,
    place,
)
from ember.core.spec import GpuRequest, parse_gpu


def inv(text: str) -> tuple[Gpu, ...]:
    return parse_declared(text)


def req(*items: str) -> tuple[GpuRequest, ...]:
    return parse_gpu(list(items))


# --------------------------------------------------------------------------- parse_declared


def test_declared_gpus_get_known_memory_consecutive_indexes_and_the_simulated_label() -> None:
    gpus = inv("L4:2,H100:1")
    assert gpus == (
        Gpu(0, "L4", 24 * GIB, simulated=True),
        Gpu(1, "L4", 24 * GIB, simulated=True),
        Gpu(2, "H100", 80 * GIB, simulated=True),
    )


def test_declared_count_defaults_to_one_and_case_and_spaces_do_not_matter() -> None:
    assert inv(" h100 , a100-80gb:2 ") == (
        Gpu(0, "H100", 80 * GIB, simulated=True),
        Gpu(1, "A100-80GB", 80 * GIB, simulated=True),
        Gpu(2, "A100-80GB", 80 * GIB, simulated=True),
    )


def test_declared_unknown_type_with_its_memory() -> None:
    assert inv("MYGPU:2:12GiB") == (
        Gpu(0, "MYGPU", 12 * GIB, simulated=True),
        Gpu(1, "MYGPU", 12 * GIB, simulated=True),
    )
    assert inv("X1:1:512") == (Gpu(0, "X1", 512, simulated=True),)
    # a known type may be given another size
    assert inv("L4:1:20GiB")[0].memory_mib == 20 * GIB


def test_declared_every_known_type_has_a_memory() -> None:
    text = ",".join(DEFAULT_MEMORY_MIB)
    gpus = inv(text)
    assert [g.type for g in gpus] == list(DEFAULT_MEMORY_MIB)
    assert all(g.memory_mib == DEFAULT_MEMORY_MIB[g.type] for g in gpus)


@pytest.mark.parametrize("text", ["", " ", ",", " , ,"])
def test_declared_nothing(text: str) -> None:
    assert inv(text) == ()


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("MYGPU:2", ["'MYGPU:2'", "unknown GPU type", "MYGPU:2:24GiB", "H100", "L4"]),
        ("L4:0", ["'L4:0'", "at least 1"]),
        ("L4:0:24GiB", ["at least 1"]),
        (f"L4:{MAX_DECLARED + 1}", ["at most"]),
        ("L4:2:lots", ["'L4:2:lots'", "memory"]),
        ("X1:1:0GiB", ["'X1:1:0GiB'", "positive"]),
        ("L4:-1", ["'L4:-1'"]),
        ("!!", ["'!!'", "TYPE[:COUNT[:MEMORY]]"]),
        ("L4 2", ["'L4 2'", "TYPE[:COUNT[:MEMORY]]"]),
        ("L4:2,,H100:x:y", ["'H100:x:y'"]),
        (":2", ["':2'", "TYPE[:COUNT[:MEMORY]]"]),
    ],
)
def test_declared_errors_name_the_entry_and_what_to_write(text: str, words: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        parse_declared(text)
    message = str(info.value)
    for word in words:
        assert word in message, (word, message)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(sorted(DEFAULT_MEMORY_MIB)), st.integers(1, 5), st.booleans()),
        min_size=1,
        max_size=6,
    )
)
def test_declared_counts_and_indexes(entries: list[tuple[str, int, bool]]) -> None:
    text = ",".join((f"{t.lower()}:{n}" if lower else f"{t}:{n}") for t, n, lower in entries)
    gpus = parse_declared(text)
    assert len(gpus) == sum(n for _, n, _ in entries)
    assert [g.index for g in gpus] == list(range(len(gpus)))
    assert all(g.simulated and g.uuid is None for g in gpus)
    assert [g.type for g in gpus] == [t for t, n, _ in entries for _ in range(n)]


# --------------------------------------------------------------------------- describe_inventory


def test_describe_inventory() -> None:
    assert describe_inventory(()) == "no GPUs"
    assert describe_inventory(inv("L4:2")) == "2x L4 (24 GiB) (simulated)"
    assert (
        describe_inventory(inv("L4:2,H100:1,L4:1"))
        == "3x L4 (24 GiB), 1x H100 (80 GiB) (simulated)"
    )
    # same type, two sizes: told apart
    assert (
        describe_inventory(inv("X:1:12GiB,X:1:24GiB")) == "1x X (12 GiB), 1x X (24 GiB) (simulated)"
    )
    # real and simulated GPUs side by side: the simulated ones are counted
    real = Gpu(0, "H100", 80 * 1024, simulated=False)
    fake = Gpu(1, "L4", 24 * 1024, simulated=True)
    assert describe_inventory((real, fake)) == "1x H100 (80 GiB), 1x L4 (24 GiB) (1 simulated)"
    assert describe_inventory((real,)) == "1x H100 (80 GiB)"


# --------------------------------------------------------------------------- place: examples


def test_no_gpu_requested_needs_nothing_even_without_gpus() -> None:
    assert place((), None, (), ()) == Placed((), None, None)
    assert place((), None, inv("L4:1"), [Allocation("w", (0,))]) == Placed((), None, None)


def test_whole_gpus() -> None:
    gpus = inv("H100:3")
    assert place(req("H100:2"), None, gpus, ()) == Placed((0, 1), "H100", None)
    held = [Allocation("a", (0,))]
    assert place(req("H100:2"), None, gpus, held) == Placed((1, 2), "H100", None)
    held = [Allocation("a", (0, 2))]
    result = place(req("H100:2"), None, gpus, held)
    assert isinstance(result, Wait)
    assert "H100:2" in result.reason and "2 of 3 H100 in use" in result.reason


def test_a_whole_gpu_is_never_given_while_someone_packs_on_it() -> None:
    gpus = inv("L4:2")
    held = [Allocation("small", (0,), 1 * GIB)]
    assert place(req("L4"), None, gpus, held) == Placed((1,), "L4", None)
    held.append(Allocation("small2", (1,), 1))
    assert isinstance(place(req("L4"), None, gpus, held), Wait)


def test_a_gpu_held_whole_is_never_packed() -> None:
    gpus = inv("L4:2")
    held = [Allocation("big", (0,))]
    assert place(req("L4"), 4 * GIB, gpus, held) == Placed((1,), "L4", 4 * GIB)
    held = [Allocation("big", (0,)), Allocation("big2", (1,))]
    assert isinstance(place(req("L4"), 4 * GIB, gpus, held), Wait)


def test_packing_never_promises_more_memory_than_a_gpu_has() -> None:
    gpus = inv("L4:1")
    held: list[Allocation] = []
    for i in range(3):
        result = place(req("L4"), 8 * GIB, gpus, held)
        assert result == Placed((0,), "L4", 8 * GIB)
        held.append(Allocation(f"w{i}", result.gpus, result.memory_mib))
    # 24 GiB are taken: one more MiB does not fit, and the reason says what it waits for
    result = place(req("L4"), 1, gpus, held)
    assert isinstance(result, Wait)
    assert "L4" in result.reason and "1 of 1 L4 in use" in result.reason
    # releasing one makes room again
    assert place(req("L4"), 8 * GIB, gpus, held[1:]) == Placed((0,), "L4", 8 * GIB)


def test_packing_exactly_fills_a_gpu() -> None:
    gpus = inv("X:1:10GiB")
    held = [Allocation("a", (0,), 6 * GIB)]
    assert place(req("X"), 4 * GIB, gpus, held) == Placed((0,), "X", 4 * GIB)
    assert isinstance(place(req("X"), 4 * GIB + 1, gpus, held), Wait)


def test_packing_is_best_fit_the_fullest_gpu_that_still_fits() -> None:
    gpus = inv("L4:3")
    held = [
        Allocation("a", (0,), 4 * GIB),  # 20 GiB free
        Allocation("b", (1,), 16 * GIB),  # 8 GiB free
    ]  # GPU 2: 24 GiB free
    assert place(req("L4"), 8 * GIB, gpus, held) == Placed((1,), "L4", 8 * GIB)
    assert place(req("L4"), 10 * GIB, gpus, held) == Placed((0,), "L4", 10 * GIB)
    assert place(req("L4"), 21 * GIB, gpus, held) == Placed((2,), "L4", 21 * GIB)
    # ties go to the lowest index
    assert place(req("L4"), 1, inv("L4:3"), ()) == Placed((0,), "L4", 1)


def test_fallback_order_first_type_that_fits_now_wins() -> None:
    gpus = inv("A100-80GB:1,H100:1")
    both = req("H100", "A100-80GB")
    assert place(both, None, gpus, ()) == Placed((1,), "H100", None)
    held = [Allocation("a", (1,))]
    assert place(both, None, gpus, held) == Placed((0,), "A100-80GB", None)
    held = [Allocation("a", (1,)), Allocation("b", (0,))]
    result = place(both, None, gpus, held)
    assert isinstance(result, Wait)
    assert "H100 or A100-80GB" in result.reason
    # a type absent from the inventory is skipped
    assert place(req("T4", "A100-80GB"), None, gpus, ()) == Placed((0,), "A100-80GB", None)


def test_fallback_with_packing() -> None:
    gpus = inv("L4:1,A10G:1")
    held = [Allocation("a", (0,), 20 * GIB)]
    assert place(req("L4", "A10G"), 8 * GIB, gpus, held) == Placed((1,), "A10G", 8 * GIB)
    assert place(req("L4", "A10G"), 4 * GIB, gpus, held) == Placed((0,), "L4", 4 * GIB)


def test_fallback_count_too_large_for_one_type_falls_through() -> None:
    gpus = inv("H100:1,A100-80GB:2")
    assert place(req("H100:2", "A100-80GB:2"), None, gpus, ()) == Placed((1, 2), "A100-80GB", None)


def test_never_names_what_exists() -> None:
    gpus = inv("L4:2")
    for requests, memory, wanted in [
        (req("H100"), None, "H100"),
        (req("L4:3"), None, "L4:3"),
        (req("L4"), 30 * GIB, "L4 with 30 GiB free"),
        (req("H100", "A100-80GB"), None, "H100 or A100-80GB"),
    ]:
        result = place(requests, memory, gpus, ())
        assert isinstance(result, Never), result
        assert wanted in result.reason
        assert "2x L4 (24 GiB)" in result.reason
        # Never does not depend on what is held
        assert place(requests, memory, gpus, [Allocation("a", (0,)), Allocation("b", (1,))]) == (
            result
        )


def test_never_on_a_machine_without_gpus() -> None:
    result = place(req("L4"), None, (), ())
    assert isinstance(result, Never)
    assert "no GPUs" in result.reason


def test_wait_when_one_option_could_fit_and_another_never() -> None:
    gpus = inv("L4:1,T4:4")
    held = [Allocation("a", (0,))]
    result = place(req("H100", "L4"), None, gpus, held)
    assert isinstance(result, Wait)
    assert "1 of 1 L4 in use" in result.reason
    assert "H100" not in result.reason.split("(")[-1]  # busy counts only for types that exist


def test_held_allocations_on_unknown_indexes_are_ignored() -> None:
    assert place(req("L4"), None, inv("L4:1"), [Allocation("ghost", (7,))]) == Placed(
        (0,), "L4", None
    )


@pytest.mark.parametrize(("requests", "memory"), [(("L4:2",), GIB), (("L4",), 0)])
def test_packing_contract(requests: tuple[str, ...], memory: int) -> None:
    with pytest.raises(ValueError, match="gpu_memory"):
        place(req(*requests), memory, inv("L4:2"), ())


def test_place_is_pure() -> None:
    gpus = inv("L4:2,H100:1")
    held = [Allocation("a", (0,), GIB)]
    before = (gpus, list(held))
    first = place(req("L4"), GIB, gpus, held)
    assert place(req("L4"), GIB, gpus, held) == first
    assert (gpus, held) == before


# --------------------------------------------------------------------------- model and strategies

TYPES = ["L4", "H100", "X"]
ASKED_TYPES = [*TYPES, "T4"]  # T4 never exists in the generated inventories


def free_whole(inventory: Sequence[Gpu], held: Sequence[Allocation]) -> set[int]:
    taken = {i for a in held for i in a.gpus}
    return {g.index for g in inventory if g.index not in taken}


def free_memory(inventory: Sequence[Gpu], held: Sequence[Allocation]) -> dict[int, int | None]:
    """MiB left for packing on each GPU; None for a GPU held whole."""
    whole = {i for a in held if a.memory_mib is None for i in a.gpus}
    used: Counter[int] = Counter()
    for a in held:
        if a.memory_mib is not None:
            for i in a.gpus:
                used[i] += a.memory_mib
    return {g.index: None if g.index in whole else g.memory_mib - used[g.index] for g in inventory}


def fits_now(
    r: GpuRequest, memory: int | None, inventory: Sequence[Gpu], held: Sequence[Allocation]
) -> bool:
    if memory is None:
        free = free_whole(inventory, held)
        return sum(1 for g in inventory if g.type == r.type and g.index in free) >= r.count
    left = free_memory(inventory, held)
    return any(
        g.type == r.type and (m := left[g.index]) is not None and m >= memory for g in inventory
    )


def check_held(inventory: Sequence[Gpu], held: Sequence[Allocation]) -> None:
    """The invariants of what is held: whole GPUs are exclusive; packs fit in the memory."""
    by_index = {g.index: g for g in inventory}
    holders: dict[int, list[Allocation]] = {}
    for a in held:
        for i in a.gpus:
            holders.setdefault(i, []).append(a)
    for i, allocs in holders.items():
        if any(a.memory_mib is None for a in allocs):
            assert len(allocs) == 1, f"GPU {i} held whole and shared: {allocs}"
        else:
            assert sum(a.memory_mib or 0 for a in allocs) <= by_index[i].memory_mib
    for a in held:
        assert len(set(a.gpus)) == len(a.gpus)


def check_placement(
    result: Placement,
    requests: Sequence[GpuRequest],
    memory: int | None,
    inventory: Sequence[Gpu],
    held: Sequence[Allocation],
) -> None:
    """`result` is what the rules say for this call."""
    by_index = {g.index: g for g in inventory}
    fitting = [r for r in requests if fits_now(r, memory, inventory, held)]
    could_ever = [r for r in requests if fits_now(r, memory, inventory, ())]
    if isinstance(result, Placed):
        assert fitting, "placed although nothing fits"
        # fallback order: the first request that fits now is the one used
        first = fitting[0]
        assert result.type == first.type
        assert result.memory_mib == memory
        assert all(by_index[i].type == first.type for i in result.gpus)
        if memory is None:
            assert len(result.gpus) == len(set(result.gpus)) == first.count
            assert set(result.gpus) <= free_whole(inventory, held)
        else:
            assert len(result.gpus) == 1
            left = free_memory(inventory, held)
            chosen = left[result.gpus[0]]
            assert chosen is not None and chosen >= memory
            # best fit: no GPU of that type that fits has less room left
            candidates = [
                m
                for g in inventory
                if g.type == first.type and (m := left[g.index]) is not None and m >= memory
            ]
            assert chosen == min(candidates)
        check_held(inventory, [*held, Allocation("new", result.gpus, result.memory_mib)])
    elif isinstance(result, Wait):
        assert not fitting and could_ever
        assert isinstance(place(requests, memory, inventory, ()), Placed)
        assert "waiting for a free" in result.reason
    else:
        assert isinstance(result, Never)
        assert not could_ever
        assert describe_inventory(inventory) in result.reason


@st.composite
def inventories(draw: st.DrawFn) -> tuple[Gpu, ...]:
    specs = draw(
        st.lists(
            st.tuples(st.sampled_from(TYPES), st.sampled_from([8 * GIB, 16 * GIB, 24 * GIB])),
            max_size=6,
        )
    )
    return tuple(Gpu(i, t, m, simulated=True) for i, (t, m) in enumerate(specs))


@st.composite
def asks(draw: st.DrawFn) -> tuple[tuple[GpuRequest, ...], int | None]:
    memory = draw(st.none() | st.integers(1, 26 * GIB) | st.sampled_from([4 * GIB, 8 * GIB]))
    counts = st.just(1) if memory is not None else st.integers(1, 3)
    requests = draw(
        st.lists(
            st.builds(GpuRequest, st.sampled_from(ASKED_TYPES), counts),
            min_size=0,
            max_size=3,
        )
    )
    return tuple(requests), memory


@st.composite
def holdings(draw: st.DrawFn, inventory: tuple[Gpu, ...]) -> list[Allocation]:
    """A valid set of allocations, built by placing random asks one after another."""
    held: list[Allocation] = []
    for n in range(draw(st.integers(0, 8))):
        requests, memory = draw(asks())
        result = place(requests, memory, inventory, held)
        if isinstance(result, Placed) and result.gpus:
            held.append(Allocation(f"w{n}", result.gpus, result.memory_mib))
    return held


@settings(max_examples=600, deadline=None)
@given(st.data())
def test_any_single_placement_follows_the_rules(data: st.DataObject) -> None:
    inventory = data.draw(inventories())
    held = data.draw(holdings(inventory))
    requests, memory = data.draw(asks())
    result = place(requests, memory, inventory, held)
    if not requests:
        assert result == Placed((), None, None)
        return
    check_placement(result, requests, memory, inventory, held)


@settings(max_examples=300, deadline=None)
@given(inventories(), asks())
def test_never_and_wait_depend_on_the_idle_machine(
    inventory: tuple[Gpu, ...], ask: tuple[tuple[GpuRequest, ...], int | None]
) -> None:
    requests, memory = ask
    if not requests:
        return
    idle = place(requests, memory, inventory, ())
    # on an idle machine the answer is Placed or Never, never Wait
    assert not isinstance(idle, Wait)
    # if it is Never there, it is Never whatever is held
    everything = [Allocation(f"g{g.index}", (g.index,)) for g in inventory]
    busy = place(requests, memory, inventory, everything)
    if isinstance(idle, Never):
        assert busy == idle
    else:
        assert isinstance(busy, Wait)


class PlacementMachine(RuleBasedStateMachine):
    """Workers come and go; after every step what is held obeys the rules."""

    workers = Bundle("workers")

    def __init__(self) -> None:
        super().__init__()
        self.inventory: tuple[Gpu, ...] = ()
        self.held: dict[str, Allocation] = {}
        self.next_id = 0

    @initialize(inventory=inventories())
    def start(self, inventory: tuple[Gpu, ...]) -> None:
        self.inventory = inventory

    @rule(target=workers, ask=asks())
    def allocate(self, ask: tuple[tuple[GpuRequest, ...], int | None]) -> str:
        requests, memory = ask
        held = list(self.held.values())
        result = place(requests, memory, self.inventory, held)
        if not requests:
            assert result == Placed((), None, None)
        else:
            check_placement(result, requests, memory, self.inventory, held)
        self.next_id += 1
        worker = f"w{self.next_id}"
        if isinstance(result, Placed) and result.gpus:
            self.held[worker] = Allocation(worker, result.gpus, result.memory_mib)
        return worker

    @rule(worker=consumes(workers))
    def release(self, worker: str) -> None:
        self.held.pop(worker, None)

    @rule()
    def release_all_then_everything_that_could_ever_fit_fits(self) -> None:
        if not self.held:
            return
        self.held.clear()
        for g in self.inventory:
            assert place((GpuRequest(g.type),), None, self.inventory, ()) == Placed(
                (min(h.index for h in self.inventory if h.type == g.type),), g.type, None
            )

    @invariant()
    def held_gpus_obey_the_rules(self) -> None:
        check_held(self.inventory, list(self.held.values()))


PlacementMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=30, deadline=None
)
test_placement_over_allocations_and_releases = PlacementMachine.TestCase


# ----------------------------------------------------------------- nodes (the Ray backend)
def _two_nodes() -> tuple[Gpu, ...]:
    """Node a: an H100 and an L4; node b: two H100s (indexes as a cluster hands them out)."""
    return (
        Gpu(0, "H100", 80 * GIB, True, node="a"),
        Gpu(1, "L4", 24 * GIB, True, node="a"),
        Gpu(2, "H100", 80 * GIB, True, node="b"),
        Gpu(3, "H100", 80 * GIB, True, node="b"),
    )


def test_a_multi_gpu_worker_stays_on_one_node() -> None:
    """Three H100s are free, but only node b has two: a worker's GPUs share a machine."""
    assert place([GpuRequest("H100", 2)], None, _two_nodes(), ()) == Placed((2, 3), "H100")


def test_a_multi_gpu_worker_waits_rather_than_spanning_nodes() -> None:
    """With one H100 taken on node b, two free H100s remain, one per node: that is a wait."""
    held = [Allocation("w1", (3,))]
    assert isinstance(place([GpuRequest("H100", 2)], None, _two_nodes(), held), Wait)


def test_more_gpus_than_any_node_has_is_never_and_says_why() -> None:
    fit = place([GpuRequest("H100", 3)], None, _two_nodes(), ())
    assert isinstance(fit, Never)
    assert "all on one node" in fit.reason


def test_one_gpu_workers_fill_nodes_in_inventory_order() -> None:
    """A fallback list lands on the first type that fits, on whichever node has it."""
    assert place([GpuRequest("A100"), GpuRequest("L4")], None, _two_nodes(), ()) == Placed(
        (1,), "L4"
    )
