"""Options of `ember server` with more to say than fits in its signature (cli/main.py)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer


class Durability(StrEnum):
    """`ember server --durability`: SQLite's `synchronous` setting for the store."""

    normal = "normal"
    full = "full"


DurabilityOption = Annotated[
    Durability,
    typer.Option(
        help="normal: an accepted job survives a kill of the server; full: also an OS crash "
        "or power loss, at an fsync per commit (docs/reliability.md). SQLite only: on "
        "PostgreSQL a commit is durable once acknowledged, either way"
    ),
]

DbOption = Annotated[
    str | None,
    typer.Option(
        "--db",
        help="the store's SQLAlchemy URL, e.g. postgresql+psycopg://USER:PASSWORD@HOST:5432/DB "
        "to share one PostgreSQL database (docs/scale-out.md) [default: $EMBER_DATABASE_URL, "
        "else SQLite in the data dir]",
        show_default=False,
    ),
]


class BackendName(StrEnum):
    """`ember server --backend`: what runs the workers."""

    local = "local"
    ray = "ray"


BackendOption = Annotated[
    BackendName,
    typer.Option(
        envvar="EMBER_BACKEND",
        help="local: worker processes on this machine; ray: each worker a Ray actor on the "
        "nodes of a Ray cluster, GPUs from its nodes (pip install 'ember[ray]'; "
        "docs/scale-out.md)",
    ),
]

AdvertiseOption = Annotated[
    str | None,
    typer.Option(
        envvar="EMBER_ADVERTISE_URL",
        help="with several servers on one PostgreSQL store: the URL the others reach this one "
        "at, e.g. http://10.0.0.5:8765 (set it when --host is 0.0.0.0) [default: "
        "http(s)://HOST:PORT]",
        show_default=False,
    ),
]

RayAddressOption = Annotated[
    str | None,
    typer.Option(
        envvar="EMBER_RAY_ADDRESS",
        help="with --backend ray: the cluster to join, e.g. 127.0.0.1:6379 (the head's "
        "`ray start --head` address) [default: $RAY_ADDRESS, else a cluster on this machine]",
        show_default=False,
    ),
]

RunpodRunRetentionOption = Annotated[
    str,
    typer.Option(
        envvar="EMBER_RUNPOD_RUN_RETENTION",
        help="how long the result of a RunPod-API `run` stays readable (/runpod/v2; RunPod "
        "keeps it 30 minutes), e.g. 30m, 2h or seconds",
    ),
]

RunpodRunsyncRetentionOption = Annotated[
    str,
    typer.Option(
        envvar="EMBER_RUNPOD_RUNSYNC_RETENTION",
        help="how long the result of a RunPod-API `runsync` stays readable (RunPod keeps it "
        "1 minute), e.g. 1m or seconds",
    ),
]

MetricsPortOption = Annotated[
    int | None,
    typer.Option(
        "--metrics-port",
        min=1,
        max=65535,
        help="also serve GET /metrics (Prometheus) without a token on 127.0.0.1:PORT only; on "
        "the main port it needs the operator's admin token (docs/metrics.md) "
        "[default: $EMBER_METRICS_PORT, else none]",
        show_default=False,
    ),
]
