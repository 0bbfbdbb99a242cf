"""Which templates to stop: scale to zero should mean memory near zero too.

A template holds a function version's imported code (and whatever its `snap=True` hooks loaded:
a model's weights, say) so that workers fork from it in milliseconds. Held forever, every
version ever called would keep its memory. Two rules, over plain facts the backend reads:

- a template unused (no fork) for `idle_s` stops; the next worker start brings it back;
- the templates together stay within `budget_bytes` of resident memory: over it, the least
  recently used stop first, those with no live workers before those with some.

A stopped template is started again on demand, so what this costs is one slower cold start
after a long idle, never a failed call.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class TemplateFacts:
    key: Hashable
    rss_bytes: int
    idle_s: float
    """Since it last forked a worker (or became ready)."""
    workers: int
    """Its forks still alive."""


def to_stop(templates: Sequence[TemplateFacts], idle_s: float, budget_bytes: int) -> list[Hashable]:
    """The keys of the templates to stop now, in the order to stop them."""
    stop = [t for t in templates if t.idle_s >= idle_s and t.workers == 0]
    chosen = {t.key for t in stop}
    kept = [t for t in templates if t.key not in chosen]
    total = sum(t.rss_bytes for t in kept)
    # least recently used first; a template serving no worker before one that does
    for t in sorted(kept, key=lambda t: (t.workers > 0, -t.idle_s)):
        if total <= budget_bytes:
            break
        stop.append(t)
        total -= t.rss_bytes
    return [t.key for t in stop]
