"""`ember server`: one process with the API, the control plane, SQLite and local workers."""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import uvicorn

from ember.api.app import create_app
from ember.config import TOKEN_FILE
from ember.control.settings import Settings
from ember.core.placement import GIB, Gpu, parse_declared
from ember.core.pricing import PriceError, PriceTable, parse_prices


class ServerConfigError(ValueError):
    """A server flag that cannot work; the message says how to fix it."""


def inventory(declared: str | None) -> tuple[Gpu, ...]:
    """`--gpus` declares simulated GPUs; otherwise NVML tells what this machine has."""
    if declared:
        try:
            return parse_declared(declared)
        except ValueError as exc:
            raise ServerConfigError(str(exc)) from None
    from ember.backends.gpus import discover

    return discover()


def prices(path: Path | None) -> PriceTable:
    if path is None:
        return PriceTable()
    try:
        text = path.read_text()
    except OSError as exc:
        raise ServerConfigError(f"cannot read the price file {path}: {exc.strerror}") from None
    try:
        return parse_prices(text, source=str(path))
    except PriceError as exc:
        raise ServerConfigError(str(exc)) from None


def describe(gpus: tuple[Gpu, ...], table: PriceTable) -> list[str]:
    if not gpus:
        return ["GPUs: none (CPU functions only; declare simulated ones with --gpus 'L4:2,H100:1')"]
    lines = ["GPUs:"]
    for g in gpus:
        label = " (simulated)" if g.simulated else ""
        price = table.gpu.get(g.type)
        cost = f"${price:.6f}/s" if price is not None else "no price: add it to a --prices file"
        lines.append(f"  {g.index}: {g.type} {g.memory_mib / GIB:g} GiB{label}, {cost}")
    return lines


GC_YOUNG_THRESHOLD = 7000
"""Allocations between young-generation collections (CPython's default: 700)."""


def tune_gc() -> None:
    """Fit the cyclic GC to a server: each call allocates a few thousand short-lived objects,
    so the default threshold collects several times per call, and every full collection walks
    everything built at startup (the app, its schemas, SQLAlchemy's tables). Freezing what exists
    now and collecting the young generation a tenth as often cut the server's CPU per warm call
    by about a quarter (`bench/core.py`, docs/benchmarks.md)."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def serve(
    *,
    host: str,
    port: int,
    data_dir: Path,
    max_payload: int,
    log_level: str = "info",
    db_url: str | None = None,
    gpus: str | None = None,
    price_file: Path | None = None,
    templates: bool = True,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
) -> None:
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if (tls_cert is None) != (tls_key is None):
        raise ServerConfigError("give both --tls-cert and --tls-key, or neither")
    for path in (tls_cert, tls_key):
        if path is not None and not path.is_file():
            raise ServerConfigError(f"cannot read {path}: no such file")
    settings = Settings(
        data_dir=data_dir,
        inventory=inventory(gpus),
        prices=prices(price_file),
        templates=templates,
        host=host,
        tls=tls_cert is not None,
    )
    app = create_app(settings, max_payload=max_payload, db_url=db_url)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
        ssl_certfile=str(tls_cert) if tls_cert else None,
        ssl_keyfile=str(tls_key) if tls_key else None,
    )
    server = uvicorn.Server(config)
    print(
        f"ember server on {'https' if settings.tls else 'http'}://{host}:{port}  (data dir {data_dir}, token in {data_dir / TOKEN_FILE})",
        flush=True,
    )
    for line in describe(settings.inventory, settings.prices):
        print(line, flush=True)
    print(
        f"billing: per {'second, rounded up per worker' if settings.prices.billing == 'second' else 'millisecond'}",
        flush=True,
    )
    tune_gc()
    server.run()
