"""Job id benchmark: what drawing one id costs, the seeded generator ember used against the OS's
cryptographic source it uses now.

A job id is drawn on every call (the warm path), so the change from a seeded generator to a
cryptographic one is measured here, interleaved (the machine is shared and noisy): rounds of
each way in turn, best and median per id. Prints JSON and writes bench/results/job_ids.json.

    .venv/bin/python bench/job_ids.py

This is a benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import os
import random
import secrets
import statistics
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stats import emit, log, machine

RESULTS = Path(__file__).resolve().parent / "results" / "job_ids.json"
_seeded = random.Random(secrets.randbits(128))

WAYS: dict[str, Callable[[], str]] = {
    "seeded getrandbits(96) (before)": lambda: f"job-{_seeded.getrandbits(96):024x}",
    "secrets.token_hex(12)": lambda: "job-" + secrets.token_hex(12),
    "os.urandom(12).hex() (now)": lambda: "job-" + os.urandom(12).hex(),
}


def main(rounds: int = 15, number: int = 200_000) -> None:
    ns: dict[str, list[float]] = {name: [] for name in WAYS}
    for i in range(rounds):
        for name, way in WAYS.items():
            ns[name].append(timeit.timeit(way, number=number) / number * 1e9)
        log(f"round {i + 1}/{rounds}")
    emit(
        {
            "benchmark": "job_ids",
            "machine": machine(),
            "rounds": rounds,
            "ids_per_round": number,
            "ns_per_id": {
                name: {"best": round(min(v)), "median": round(statistics.median(v))}
                for name, v in ns.items()
            },
        },
        RESULTS,
    )


if __name__ == "__main__":
    main()
