"""The pure decision of which HTTP connection gives way to a newcomer, and the derived cap."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ember.core.connections import (
    EVICT_BATCH_SHARE,
    FD_RESERVE_MIN,
    MIN_CAP,
    Admission,
    ConnectionState,
    admit,
    connection_cap,
    expired,
    sweep_interval,
)


def conn(id: int, idle_since: float, busy: bool = False) -> ConnectionState:
    return ConnectionState(id=id, busy=busy, idle_since=idle_since)


def test_below_the_cap_nothing_is_closed() -> None:
    assert admit([conn(1, 0.0), conn(2, 1.0)], cap=3) == Admission()
    assert admit([], cap=1) == Admission()


def test_at_the_cap_the_connection_idle_longest_gives_way() -> None:
    conns = [conn(1, 5.0), conn(2, 1.0), conn(3, 3.0)]
    assert admit(conns, cap=3) == Admission(evict=(2,))


def test_a_request_in_flight_is_never_evicted_even_if_oldest() -> None:
    conns = [conn(1, 0.0, busy=True), conn(2, 4.0), conn(3, 2.0, busy=True)]
    assert admit(conns, cap=3) == Admission(evict=(2,))


def test_when_every_connection_is_busy_the_newcomer_is_refused() -> None:
    conns = [conn(1, 0.0, busy=True), conn(2, 1.0, busy=True)]
    assert admit(conns, cap=2) == Admission(refuse=True)


def test_over_the_cap_enough_are_evicted_to_fit_one_more() -> None:
    conns = [conn(i, float(10 - i)) for i in range(6)]  # ids 5, 4, 3 idle longest
    assert admit(conns, cap=4) == Admission(evict=(5, 4, 3))


def test_at_a_large_cap_room_is_made_for_a_batch_of_newcomers_at_once() -> None:
    conns = [conn(i, float(i)) for i in range(160)]
    verdict = admit(conns, cap=160)
    assert verdict.evict == tuple(range(1 + 160 // EVICT_BATCH_SHARE))  # the 11 idle longest
    # the next newcomers find room without another pass
    kept = [c for c in conns if c.id not in verdict.evict]
    assert admit(kept, cap=160) == Admission()


def test_ties_break_by_id_so_the_answer_does_not_depend_on_order() -> None:
    a = admit([conn(2, 1.0), conn(1, 1.0)], cap=2)
    b = admit([conn(1, 1.0), conn(2, 1.0)], cap=2)
    assert a == b == Admission(evict=(1,))


def test_the_cap_leaves_a_reserve_under_the_fd_limit() -> None:
    assert connection_cap(1024) == 1024 - FD_RESERVE_MIN == 768
    assert connection_cap(65536) == 65536 - 65536 // 4
    assert connection_cap(100) == MIN_CAP
    assert connection_cap(1024, reserve=24) == 1000


def test_past_the_head_deadline_only_idle_connections_expire() -> None:
    conns = [conn(1, 0.0), conn(2, 0.0, busy=True), conn(3, 5.5), conn(4, 4.0)]
    assert expired(conns, now=10.0, header_timeout=6.0) == [1, 4]
    assert expired(conns, now=10.0, header_timeout=11.0) == []


def test_the_sweep_runs_often_enough_to_keep_a_deadline_and_no_more() -> None:
    assert sweep_interval(10.0) == 1.0
    assert sweep_interval(1.0) == 0.25
    assert sweep_interval(0.01) == 0.05


@given(
    st.lists(st.tuples(st.floats(0, 1e6), st.booleans()), max_size=40),
    st.integers(min_value=1, max_value=40),
)
def test_after_admission_the_newcomer_fits_and_only_idle_ones_went(
    specs: list[tuple[float, bool]], cap: int
) -> None:
    conns = [conn(i, t, busy) for i, (t, busy) in enumerate(specs)]
    verdict = admit(conns, cap)
    by_id = {c.id: c for c in conns}
    assert all(not by_id[i].busy for i in verdict.evict)
    if verdict.refuse:
        assert not verdict.evict and sum(not c.busy for c in conns) < len(conns) - cap + 1
    else:
        assert len(conns) - len(verdict.evict) + 1 <= cap
        assert len(verdict.evict) <= max(0, len(conns) - cap + 1) + cap // EVICT_BATCH_SHARE
        kept_idle = [c for c in conns if not c.busy and c.id not in verdict.evict]
        assert all(by_id[e].idle_since <= k.idle_since for e in verdict.evict for k in kept_idle)
