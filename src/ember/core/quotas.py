"""What a tenant may grow, and the rules that bound it: queued jobs and bytes per workspace, log
bytes per job and per app, how long finished jobs are kept.

Pure: the job room keeps the counts in memory and asks `admit` on every call; the log store
asks `log_room`; the server's pruning task asks `prune_every`. Every limit has a default that
a single server on a laptop or a GPU box can hold, and an `ember server` flag.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from ember.core.runpod import RUN_RETENTION_S, RUNSYNC_RETENTION_S

_T = TypeVar("_T")
KIB, MIB, GIB = 2**10, 2**20, 2**30
DAY = 86_400.0

RETRY_AFTER_S = 1
"""What a 429 asks a client to wait: a refused call costs the server almost nothing, and a queue
that is full now usually has room a second later (its jobs leave as workers take them)."""


@dataclass(frozen=True, slots=True)
class Quotas:
    """The bounds of one server, the same for every workspace."""

    max_queued_jobs: int = 10_000
    """Jobs waiting for a worker (IN_QUEUE), per workspace."""
    max_queued_bytes: int = GIB
    """The encoded inputs of a workspace's queued jobs, together."""
    job_retention_s: float = 7 * DAY
    """How long a finished job's record (input, output, error) is kept before it is pruned."""
    max_job_log_bytes: int = MIB
    """Printed output kept per job (and per worker, for lines outside any job)."""
    max_app_log_bytes: int = 64 * MIB
    """Each of an app's two log files (the current one and the one before)."""
    runpod_run_retention_s: float = RUN_RETENTION_S
    """How long the result of a RunPod `run` (`/runpod/v2/.../run`) stays readable."""
    runpod_runsync_retention_s: float = RUNSYNC_RETENTION_S
    """How long the result of a RunPod `runsync` stays readable."""

    def describe(self) -> str:
        """One line for the server's start-up banner."""
        return (
            f"limits per workspace: {self.max_queued_jobs:,} queued jobs, "
            f"{size_text(self.max_queued_bytes)} of queued inputs; finished jobs kept "
            f"{duration_text(self.job_retention_s)}; logs: {size_text(self.max_job_log_bytes)} "
            f"per job, {size_text(self.max_app_log_bytes)} x 2 files per app; RunPod results "
            f"kept {duration_text(self.runpod_run_retention_s)} (run), "
            f"{duration_text(self.runpod_runsync_retention_s)} (runsync)"
        )


@dataclass(frozen=True, slots=True)
class Queued:
    """A workspace's queue, as the job room counts it."""

    jobs: int = 0
    bytes: int = 0


@dataclass(frozen=True, slots=True)
class QueueFull:
    """Why a call was refused: which limit, its value, and what to do."""

    limit: str
    """"max_queued_jobs" or "max_queued_bytes"."""
    value: int
    queued: int
    """What is queued now, in the limit's unit."""
    retry_after_s: int
    never: bool
    """The input alone is larger than the bytes limit: waiting will not help."""
    message: str

    def to_dict(self) -> dict[str, int | str]:
        return {"limit": self.limit, "value": self.value, "queued": self.queued}


def admit(queued: Queued, size: int, limits: Quotas) -> QueueFull | None:
    """None if a job whose input encodes to `size` bytes may join the workspace's queue."""
    if queued.jobs + 1 > limits.max_queued_jobs:
        return QueueFull(
            "max_queued_jobs",
            limits.max_queued_jobs,
            queued.jobs,
            RETRY_AFTER_S,
            False,
            f"the workspace has {queued.jobs:,} jobs queued, its limit "
            f"(max_queued_jobs = {limits.max_queued_jobs:,}): retry after {RETRY_AFTER_S} s, "
            "once workers have taken some, or cancel queued jobs you no longer need",
        )
    if queued.bytes + size > limits.max_queued_bytes:
        never = size > limits.max_queued_bytes
        if never:
            message = (
                f"this input is {size_text(size)}, more than a workspace may have queued "
                f"(max_queued_bytes = {size_text(limits.max_queued_bytes)}): send a smaller "
                "input, e.g. a path or URL of the data instead of the data"
            )
        else:
            message = (
                f"the workspace's queued inputs take {size_text(queued.bytes)}; with this one "
                f"({size_text(size)}) they would pass its limit (max_queued_bytes = "
                f"{size_text(limits.max_queued_bytes)}): retry after {RETRY_AFTER_S} s, or "
                "send smaller inputs (a path or URL of the data instead of the data)"
            )
        return QueueFull(
            "max_queued_bytes",
            limits.max_queued_bytes,
            queued.bytes,
            RETRY_AFTER_S,
            never,
            message,
        )
    return None


@dataclass(frozen=True, slots=True)
class LogRoom:
    """What to do with one printed line of a job (or of a worker outside any job)."""

    keep: bool
    marker: bool
    """The line that passes the cap: write the marker line once, instead of it."""


def log_room(used: int, size: int, cap: int) -> LogRoom:
    """`used` bytes already kept for this job (past the cap: a marker was written)."""
    if used + size <= cap:
        return LogRoom(True, False)
    return LogRoom(False, used <= cap)


def log_marker(cap: int, owner: str) -> str:
    """The line that says the rest of a job's (or a worker's) output was dropped."""
    return f"[ember] log limit of {size_text(cap)} reached for {owner}: further output dropped"


def prune_every(retention_s: float) -> float:
    """How often finished jobs past their retention are looked for: a quarter of the retention
    (so a job outlives it by at most that), at least 0.25 s and at most a minute."""
    return min(60.0, max(0.25, retention_s / 4))


PRUNE_BATCH = 500
"""Rows deleted per store transaction: short enough not to hold up the writes behind it."""


# ----------------------------------------------------------------------------- the flags' forms
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": KIB,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": MIB,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": GIB,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 2**40,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*")
_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": DAY, "w": 7 * DAY}
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*")


def parse_size(text: str) -> int:
    """'1GiB', '512MiB', '64MB', '1000000' -> bytes (> 0); ValueError says the forms."""
    m = _SIZE.fullmatch(text.lower())
    unit = _UNITS.get(m.group(2)) if m else None
    value = float(m.group(1)) * unit if m and unit else 0.0
    if not (m and unit) or not 1 <= value < 2**63:
        raise ValueError(
            f"{text!r} is not a size: a number of bytes, or with KiB, MiB, GiB (or KB, MB, GB), "
            "e.g. 1GiB or 512MiB"
        )
    return int(value)


def parse_duration(text: str) -> float:
    """'7d', '12h', '30m', '90s', '2w' or plain seconds -> seconds (> 0)."""
    m = _DURATION.fullmatch(text.lower())
    seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)] if m else 0.0
    if not seconds > 0 or not math.isfinite(seconds):
        raise ValueError(
            f"{text!r} is not a duration: a number with s, m, h, d or w (or plain seconds), "
            "e.g. 7d, 12h or 3600"
        )
    return seconds


def size_text(n: int) -> str:
    """Bytes for people: '1 MiB', '1.5 GiB', '900 bytes'."""
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"


def duration_text(seconds: float) -> str:
    """Seconds for people: '7 days', '12 hours', '1 s'."""
    for unit, size in (("day", DAY), ("hour", 3600.0), ("minute", 60.0)):
        if seconds >= size and seconds % size == 0:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return f"{seconds:g} s"


def from_flags(
    *,
    max_queued_jobs: int,
    max_queued_bytes: str,
    job_retention: str,
    max_job_log: str,
    max_app_log: str,
    runpod_run_retention: str = "30m",
    runpod_runsync_retention: str = "1m",
) -> Quotas:
    """The `ember server` flags as Quotas; ValueError names the flag and the forms it takes."""

    def parse(flag: str, parser: Callable[[str], _T], text: str) -> _T:
        try:
            return parser(text)
        except ValueError as exc:
            raise ValueError(f"--{flag}: {exc}") from None

    if max_queued_jobs < 1:
        raise ValueError(f"--max-queued-jobs: {max_queued_jobs} is not a count of at least 1")
    return Quotas(
        max_queued_jobs=max_queued_jobs,
        max_queued_bytes=parse("max-queued-bytes", parse_size, max_queued_bytes),
        job_retention_s=parse("job-retention", parse_duration, job_retention),
        max_job_log_bytes=parse("max-job-log", parse_size, max_job_log),
        max_app_log_bytes=parse("max-app-log", parse_size, max_app_log),
        runpod_run_retention_s=parse("runpod-run-retention", parse_duration, runpod_run_retention),
        runpod_runsync_retention_s=parse(
            "runpod-runsync-retention", parse_duration, runpod_runsync_retention
        ),
    )
