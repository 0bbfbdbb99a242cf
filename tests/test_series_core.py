"""`ember.core.series`: buckets, their sample, and the points a series is read as."""

from __future__ import annotations

import random

import pytest

from ember.core.series import (
    SAMPLE,
    STATES,
    BadQuery,
    Bucket,
    at_rank,
    check_query,
    points,
    slot_of,
    totals,
)


def call(total: float, cold: float = 0.0) -> dict[str, float]:
    queue = total - cold - 1.0
    return {
        "queue_ms": queue,
        "cold_start_ms": cold,
        "load_ms": 0.0,
        "exec_ms": 1.0,
        "post_ms": 0.0,
        "total_ms": total,
    }


def test_at_rank_picks_one_real_call_by_nearest_rank() -> None:
    sample = [call(float(t)) for t in (50, 10, 40, 20, 30, 60, 70, 80, 90, 100)]
    assert at_rank([], 0.5) is None
    assert at_rank(sample, 0.5) == call(50.0)  # the 5th of 10
    assert at_rank(sample, 0.95) == call(100.0)
    assert at_rank(sample, 0.99) == call(100.0)
    assert at_rank(sample, 0.0) == call(10.0)
    assert at_rank([call(7.0)], 0.99) == call(7.0)
    picked = at_rank(sample, 0.5)
    assert picked is not None
    assert sum(v for k, v in picked.items() if k != "total_ms") == picked["total_ms"]


def test_a_bucket_counts_every_call_and_samples_at_most_64() -> None:
    draw = random.Random(1).random
    bucket = Bucket(0)
    for i in range(1000):
        bucket.add(call(float(i), cold=1.0 if i < 3 else 0.0), i % 10 == 0, draw)
    assert bucket.calls == 1000 and bucket.failed == 100 and bucket.cold_starts == 3
    assert len(bucket.sample) == SAMPLE
    # uniform: the sample is not just the first (or the last) calls
    totals_seen = sorted(t["total_ms"] for t in bucket.sample)
    assert totals_seen[0] < 300 and totals_seen[-1] > 700
    small = Bucket(0)
    small.add(None, True, draw)  # a job without timings still counts
    assert small.calls == small.failed == 1 and small.sample == []


def test_reservoir_is_uniform_enough() -> None:
    draw = random.Random(7).random
    hits = [0] * 200
    for _ in range(300):
        bucket = Bucket(0)
        for i in range(200):
            bucket.add(call(float(i)), False, draw)
        for t in bucket.sample:
            hits[int(t["total_ms"])] += 1
    early, late = sum(hits[:100]), sum(hits[100:])
    assert abs(early - late) < 0.1 * (early + late)


def test_points_are_continuous_oldest_first_and_merge_steps() -> None:
    now = 10_000.0 + 5  # inside the slot starting at 10_000
    draw = random.Random(2).random
    a, b, c = Bucket(slot_of(now)), Bucket(slot_of(now) - 10), Bucket(slot_of(now) - 200)
    a.add(call(5.0), False, draw)
    b.add(call(9.0, cold=3.0), True, draw)
    b.add(call(1.0), False, draw)
    c.add(call(2.0), False, draw)
    old = Bucket(slot_of(now) - 4000)
    old.add(call(3.0), False, draw)
    found = points([a, b, c, old], {}, now, 60, 10)
    assert [p["t"] for p in found] == [9950, 9960, 9970, 9980, 9990, 10_000]
    assert [p["calls"] for p in found] == [0, 0, 0, 0, 2, 1]
    assert found[0]["p50"] is None and found[0]["workers"] == dict.fromkeys(STATES, 0.0)
    assert found[-2]["failed"] == 1 and found[-2]["cold_starts"] == 1
    assert found[-2]["p99"]["total_ms"] == 9.0 and found[-2]["p50"]["total_ms"] == 1.0

    merged = points([a, b, c], {}, now, 600, 60)
    assert len(merged) == 10 and merged[-1]["t"] == 9960
    assert merged[-1]["calls"] == 3  # 9960..10_019: both last buckets, ranked together
    assert merged[-1]["p50"]["total_ms"] == 5.0
    assert sum(p["calls"] for p in merged) == 4
    assert totals(merged) == {"calls": 4, "failed": 1, "cold_starts": 1}


def test_worker_means_divide_by_the_samples_of_the_step() -> None:
    now = 1000.0
    first, second = Bucket(990), Bucket(1000)
    first.count([1, 0, 2, 0])  # one sample: 1 STARTING, 2 BUSY
    second.count([0, 1, 0, 0])
    second.count([0, 1, 0, 0])
    samples = {990: 4, 1000: 2}  # the key had no workers in 3 of 990's samples
    found = points([first, second], samples, now, 60, 20)
    assert found[-1]["t"] == 1000 and found[-1]["workers"]["IDLE"] == 1.0
    assert found[-2]["t"] == 980
    assert found[-2]["workers"] == {"STARTING": 0.25, "IDLE": 0.0, "BUSY": 0.5, "DRAINING": 0.0}


@pytest.mark.parametrize(
    ("window", "step", "words"),
    [
        (59, 10, "window=59"),
        (3601, 10, "window=3601"),
        (600, 15, "multiple of 10"),
        (600, 0, "step=0"),
        (600, 310, "from 10 to 300"),
        (60, 40, "step=40"),
    ],
)
def test_check_query_says_what_to_fix(window: int, step: int, words: str) -> None:
    with pytest.raises(BadQuery, match=words):
        check_query(window, step)


def test_check_query_takes_the_edges() -> None:
    for window, step in ((60, 10), (60, 30), (3600, 10), (3600, 1800)):
        check_query(window, step)
    assert len(points([], {}, 123.0, 3600, 1800)) == 2
