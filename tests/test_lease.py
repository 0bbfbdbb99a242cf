"""The scheduler lease (`ember.core.lease`): examples, then properties over random histories.

The properties play many servers stepping the lease in a random order at random times, each
step decided by `decide` and applied as `control/lease.py` applies it (under the row's lock), and
check what several servers on one store rest on: at no instant do two servers hold a live lease;
epochs only grow, and a holder's epoch is never reused by another; a live lease is never taken.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ember.core.lease import MARGIN, Follow, Held, Lead, decide, renew_every, still_held

TTL = 5.0


def test_the_first_server_takes_an_empty_lease() -> None:
    assert decide(None, "a", None, 100.0, TTL) == Lead(epoch=1, expires_at=105.0, took=True)


def test_a_live_lease_of_another_is_followed() -> None:
    held = Held("a", 3, 105.0, "http://a")
    assert decide(held, "b", None, 101.0, TTL) == Follow(address="http://a", lost=False)


def test_an_expired_lease_is_taken_with_the_next_epoch() -> None:
    held = Held("a", 3, 105.0, "http://a")
    assert decide(held, "b", None, 105.0, TTL) == Lead(epoch=4, expires_at=110.0, took=True)


def test_the_holder_renews_under_its_epoch() -> None:
    held = Held("a", 3, 105.0, "http://a")
    assert decide(held, "a", 3, 102.0, TTL) == Lead(epoch=3, expires_at=107.0, took=False)


def test_a_holder_whose_lease_moved_on_has_lost_it() -> None:
    taken = Held("b", 4, 110.0, "http://b")
    assert decide(taken, "a", 3, 106.0, TTL) == Follow(address="http://b", lost=True)
    # its own id back under a later epoch (a restart of it elsewhere) is still not its lease
    assert decide(Held("a", 4, 110.0, "http://a"), "a", 3, 106.0, TTL).lost  # type: ignore[union-attr]


def test_a_holder_that_let_its_lease_expire_has_lost_it() -> None:
    held = Held("a", 3, 105.0, "http://a")
    assert decide(held, "a", 3, 105.5, TTL) == Follow(address=None, lost=True)


def test_a_restarted_server_takes_its_own_lease_back_at_once() -> None:
    held = Held("a", 3, 105.0, "http://a")
    assert decide(held, "a", None, 101.0, TTL) == Lead(epoch=4, expires_at=106.0, took=True)


def test_a_holder_stops_before_the_store_can_hand_its_lease_on() -> None:
    assert renew_every(TTL) < TTL * MARGIN + 1e-9
    assert still_held(10.0, 10.0 + TTL * (1 - MARGIN) - 0.01, TTL)
    assert not still_held(10.0, 10.0 + TTL * (1 - MARGIN), TTL)


SERVERS = ["a", "b", "c"]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(SERVERS),
            st.floats(min_value=0.0, max_value=3.0),  # time passing before the step
            st.booleans(),  # the server restarts (forgets its epoch) before it
        ),
        min_size=1,
        max_size=60,
    )
)
def test_never_two_live_holders_and_epochs_only_grow(steps: list[tuple[str, float, bool]]) -> None:
    now = 0.0
    row: Held | None = None
    mine: dict[str, int | None] = dict.fromkeys(SERVERS)
    epoch_holder: dict[int, str] = {}
    for server, elapsed, restart in steps:
        now += elapsed
        if restart:
            mine[server] = None
        before = row
        step = decide(row, server, mine[server], now, TTL)
        if isinstance(step, Lead):
            if before is not None and before.holder != server:
                assert before.expires_at <= now, "a live lease of another server was taken"
            if step.took:
                assert step.epoch == (0 if before is None else before.epoch) + 1
            else:
                assert before is not None and step.epoch == before.epoch
            row = Held(server, step.epoch, step.expires_at, server)
            mine[server] = step.epoch
            assert epoch_holder.setdefault(step.epoch, server) == server
        else:
            if step.lost:
                mine[server] = None
            assert row is not None
        # at this instant, the servers that think they hold a live lease: at most one
        live = [
            s
            for s, e in mine.items()
            if e is not None and row is not None and row.epoch == e and row.expires_at > now
        ]
        assert len(live) <= 1
        # a server that believes it holds an older epoch holds nothing the store honours
        for s, e in mine.items():
            if e is not None and row is not None and e != row.epoch:
                assert decide(row, s, e, now, TTL).lost  # type: ignore[union-attr]
