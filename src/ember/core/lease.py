"""Who schedules when several servers share one store: a lease with an epoch, decided purely.

One server at a time holds the scheduler lease and runs workers, queues and scaling; the others
stand by, accept calls into the store and forward the rest to it. The holder renews its lease
well before it runs out; when it stops renewing (killed, cut off), any standby takes the lease
once it has expired, with the next epoch. The epoch is the fencing token: every job a scheduler
takes is marked with its epoch, and its writes of a job's end count only under that mark, so a
scheduler that lost its lease without knowing cannot undo what the next one decided.

Time here is the store's clock, read in the same transaction as the lease, so that servers whose
clocks disagree still agree on when a lease ends. A holder also keeps its own monotonic deadline
(`still_held`): past it, it stops scheduling before anyone else may have started.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_TTL_S = 5.0
"""How long a lease lasts unrenewed: a dead scheduler's pools move within about this long."""

RENEWALS_PER_TTL = 5
"""The holder renews this many times per TTL: a few slow store round trips do not lose it."""

MARGIN = 0.2
"""The part of the TTL a holder gives up early on its own clock (`still_held`), so that it has
stopped before a standby, on the store's clock, can take over."""


@dataclass(frozen=True, slots=True)
class Held:
    """The lease's row: who holds it, under which epoch, until when (the store's clock)."""

    holder: str
    epoch: int
    expires_at: float
    address: str


@dataclass(frozen=True, slots=True)
class Lead:
    """This server holds the lease under `epoch` until `expires_at`: write that row."""

    epoch: int
    expires_at: float
    took: bool
    """True when this step took the lease (a new epoch): the scheduler starts; False: renewed."""


@dataclass(frozen=True, slots=True)
class Follow:
    """Another server holds the lease: stand by, forwarding to `address` (None: nobody leads)."""

    address: str | None
    lost: bool
    """True when this server held the lease under its epoch and no longer does: stop at once."""


Step = Lead | Follow


def decide(held: Held | None, me: str, mine: int | None, now: float, ttl: float) -> Step:
    """The lease's next step for server `me`, which holds it under epoch `mine` (None: it does
    not think it leads), given the row `held` (None: no row yet) read at `now`.

    A live lease of another holder is followed. An expired one is taken, with the next epoch.
    A server renews its own lease only under the epoch it holds: a restarted server of the same
    id (its `mine` is None) takes its old lease at once, with a new epoch, since the process that
    held it is gone; and a holder whose epoch moved on has lost it, even if its id is back.
    """
    if held is None:
        return Lead(epoch=1, expires_at=now + ttl, took=True)
    if mine is not None and held.holder == me and held.epoch == mine and held.expires_at > now:
        return Lead(epoch=mine, expires_at=now + ttl, took=False)
    if mine is not None:
        return Follow(address=_live(held, now), lost=True)
    if held.holder == me or held.expires_at <= now:
        return Lead(epoch=held.epoch + 1, expires_at=now + ttl, took=True)
    return Follow(address=held.address, lost=False)


def _live(held: Held, now: float) -> str | None:
    return held.address if held.expires_at > now else None


def renew_every(ttl: float) -> float:
    return ttl / RENEWALS_PER_TTL


def still_held(renewed_at: float, now: float, ttl: float) -> bool:
    """On the holder's own monotonic clock: whether a lease last renewed at `renewed_at` (the
    moment the renewal was sent) still holds, less a margin for clocks and transit."""
    return now - renewed_at < ttl * (1.0 - MARGIN)
