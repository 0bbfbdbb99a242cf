"""The series room: the last hour of calls and workers, per function, in memory.

Fed by the plane: `record` once per ended job (on the warm path, so O(1): one dict lookup and a
reservoir step), `sample` every tick (it counts the live workers once a second). Read by
`GET /v1/series`. Kept only in memory, on the server that schedules: a restart starts an empty
hour, which the UI shows as such; the store keeps each job and the usage for longer views.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

from ember.control.records import Job, Worker
from ember.core import series
from ember.core.jobs import JobStatus
from ember.core.series import STATES, STEP_S, WINDOW_S, BadQuery, Bucket, slot_of

Key = tuple[str, str, str]
"""(workspace, app, name): a function's calls, or a unit's workers (a class's, for its methods;
a plain function's unit is its own name)."""

FAILED = frozenset({JobStatus.FAILED, JobStatus.TIMED_OUT})
SAMPLE_EVERY_S = 1.0
_STATE_INDEX = {s: i for i, s in enumerate(STATES)}


class Series:
    def __init__(self, seed: int = 0x5EED) -> None:
        self._slots: dict[int, dict[Key, Bucket]] = {}
        """Bucket start -> its buckets, one per key that had calls or workers then."""
        self._samples: dict[int, int] = {}
        """Bucket start -> how many times the workers were counted in it."""
        self._draw = random.Random(seed).random
        self._slot = -1
        self._current: dict[Key, Bucket] = {}
        self._sampled = 0.0
        self.durations = series.Durations()
        """Every call's terms since start, for `/metrics`."""

    def _buckets(self, slot: int) -> dict[Key, Bucket]:
        if slot == self._slot:
            return self._current
        found = self._slots.get(slot)
        if found is None:
            found = self._slots[slot] = {}
            self._drop_before(slot - WINDOW_S - STEP_S)
        if slot > self._slot:
            self._slot, self._current = slot, found
        return found

    def _drop_before(self, oldest: int) -> None:
        for slot in [s for s in self._slots if s < oldest]:
            del self._slots[slot]
            self._samples.pop(slot, None)

    def record(self, job: Job) -> None:
        """An ended job, in the bucket of its end."""
        at = job.finished_at
        if at is None:
            return
        buckets = self._buckets(slot_of(at))
        key = (job.workspace, job.app, job.function)
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = Bucket(slot_of(at))
        bucket.add(job.timings, job.status in FAILED, self._draw)
        if job.timings is not None:
            self.durations.add(job.timings)

    def sample(self, workers: Iterable[Worker], now: float) -> None:
        """Count the live workers by state, at most once a second (called every tick)."""
        if now - self._sampled < SAMPLE_EVERY_S:
            return
        self._sampled = now
        slot = slot_of(now)
        counts: dict[Key, list[int]] = {}
        for w in workers:
            i = _STATE_INDEX.get(w.state.value)
            if i is None:
                continue
            key = (w.pool.workspace, w.pool.app, w.pool.unit)
            n = counts.get(key)
            if n is None:
                n = counts[key] = [0] * len(STATES)
            n[i] += 1
        buckets = self._buckets(slot)
        for key, n in counts.items():
            bucket = buckets.get(key)
            if bucket is None:
                bucket = buckets[key] = Bucket(slot)
            bucket.count(n)
        self._samples[slot] = self._samples.get(slot, 0) + 1

    def view(
        self,
        workspace: str,
        app: str | None,
        function: str | None,
        window: int,
        step: int,
        now: float,
    ) -> dict[str, Any]:
        """The workspace's series (an app's, a function's); BadQuery for a bad window or step."""
        series.check_query(window, step)
        if function is not None and app is None:
            raise BadQuery("function= needs app=: name the app the function belongs to")
        unit = None if function is None else function.split(".")[0]
        merged: list[Bucket] = []
        oldest = now - window - STEP_S
        for slot, buckets in self._slots.items():
            if slot < oldest:
                continue
            into = Bucket(slot)
            for (ws, a, name), bucket in buckets.items():
                if ws != workspace or (app is not None and a != app):
                    continue
                if function is None:
                    into.merge_calls(bucket)
                    into.merge_workers(bucket)
                    continue
                if name == function or name.startswith(function + "."):
                    into.merge_calls(bucket)
                if name == unit:
                    into.merge_workers(bucket)
            merged.append(into)
        found = series.points(merged, self._samples, now, window, step)
        return {
            "window": window,
            "step": step,
            "now": now,
            "points": found,
            "totals": series.totals(found),
        }
