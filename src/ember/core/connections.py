"""Which HTTP connections the server keeps when it runs out of room for them.

Each open connection holds a file descriptor, and past the process's fd limit `accept()` fails for
everyone: a few hundred sockets that connect and send nothing would lock out a health check. So
the server keeps at most `cap` connections open, and a newcomer at the cap makes room by closing
the connections that have been idle longest (no request in flight), not by being refused: idle
sockets are cheap to lose (a client reconnects), a refused health check or call is not. A request
in flight is never cut; only when every connection has one is the newcomer turned away.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass

FD_RESERVE_MIN = 256
"""Descriptors kept back from HTTP connections at least: the database and its WAL, log files,
the event loop's own, one control connection per worker and template, and the control port's
unauthenticated connections (which have their own cap)."""

FD_RESERVE_SHARE = 4
"""...or a quarter of the limit, whichever is more."""

MIN_CAP = 16
"""The fewest HTTP connections allowed however low the fd limit is."""

EVICT_BATCH_SHARE = 16
"""At the cap, make room for a sixteenth of it at once: one pass over the open connections then
serves that many newcomers, so a flood costs the event loop a pass per batch, not per accept."""


@dataclass(frozen=True, slots=True)
class ConnectionState:
    """What eviction needs to know of one open connection."""

    id: int
    busy: bool
    """A request in flight (its head read, its response not yet sent): never evicted."""
    idle_since: float
    """When it last became idle: opened, or its last response ended. Bytes of a request head
    that is not complete yet do not count, so trickling one byte at a time keeps no one alive."""


@dataclass(frozen=True, slots=True)
class Admission:
    """What to do when a connection arrives: close `evict` first, or refuse the newcomer."""

    evict: tuple[int, ...] = ()
    refuse: bool = False


def connection_cap(fd_soft_limit: int, reserve: int | None = None) -> int:
    """How many HTTP connections fit under the fd soft limit, leaving `reserve` descriptors (by
    default the larger of FD_RESERVE_MIN and a quarter of the limit) for everything else."""
    if reserve is None:
        reserve = max(FD_RESERVE_MIN, fd_soft_limit // FD_RESERVE_SHARE)
    return max(MIN_CAP, fd_soft_limit - reserve)


def admit(open_connections: Iterable[ConnectionState], cap: int) -> Admission:
    """Room for one more connection beside `open_connections` (the newcomer not among them):
    below `cap`, nothing to do; at it, evict the longest-idle connections until one fits, and
    up to a sixteenth of `cap` more (room for the next newcomers); if too few are idle (every
    other connection has a request in flight), refuse the newcomer."""
    conns = list(open_connections)
    need = len(conns) - cap + 1
    if need <= 0:
        return Admission()
    idle = [c for c in conns if not c.busy]
    if len(idle) < need:
        return Admission(refuse=True)
    count = min(len(idle), need + cap // EVICT_BATCH_SHARE)
    oldest = heapq.nsmallest(count, idle, key=lambda c: (c.idle_since, c.id))
    return Admission(evict=tuple(c.id for c in oldest))


def expired(
    open_connections: Iterable[ConnectionState], now: float, header_timeout: float
) -> list[int]:
    """Connections past their head deadline: idle (no request in flight) for `header_timeout`
    seconds or more, whether silent, trickling a head, or kept alive after a response."""
    return [c.id for c in open_connections if not c.busy and now - c.idle_since >= header_timeout]


def sweep_interval(header_timeout: float) -> float:
    """How often to look for expired connections: a quarter of the deadline, between 50 ms and
    1 s, so that a deadline is kept to within a quarter of itself (or a second) for the cost of
    one pass over the open connections per interval, instead of a timer per request."""
    return max(0.05, min(1.0, header_timeout / 4))
