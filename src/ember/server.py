"""`ember server`: one process with the API, the control plane, the store and local workers."""

from __future__ import annotations

import gc
import logging
import os
from pathlib import Path
from typing import Any

import uvicorn

from ember.api import connections
from ember.api.app import create_app
from ember.backends.ray import RayUnavailable
from ember.config import TOKEN_FILE
from ember.control.settings import Settings
from ember.core.lease import DEFAULT_TTL_S
from ember.core.placement import GIB, Gpu, parse_declared
from ember.core.pricing import PriceError, PriceTable, parse_prices
from ember.core.quotas import Quotas, duration_text, parse_duration, parse_size, size_text
from ember.store.db import StoreUnavailable, env_url, shown


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


def describe_sandbox(mode: str, tenant_isolation: bool) -> str:
    """What user code can reach on this server, in a line; ServerConfigError if `--sandbox
    bwrap` cannot be had."""
    from ember.backends.sandbox import SANDBOX_MODES, find_bwrap, probe

    if mode not in SANDBOX_MODES:
        raise ServerConfigError(
            f"--sandbox must be one of {', '.join(SANDBOX_MODES)}, not {mode!r}"
        )
    reason = "--sandbox off" if mode == "off" else probe(find_bwrap())
    if reason is None:
        return "sandbox: bubblewrap (workers see their bundle, /tmp and their own processes only)"
    if mode == "bwrap":
        raise ServerConfigError(f"--sandbox bwrap: {reason}")
    if tenant_isolation:
        return (
            f"sandbox: none ({reason}); only the 'default' workspace's code runs "
            "(--no-tenant-isolation runs every workspace's, able to read the data dir)"
        )
    return (
        f"sandbox: none ({reason}); --no-tenant-isolation: every workspace's code runs as the "
        "server's user and can read the data dir, the token and master.key"
    )


def _housekeeping() -> dict[str, Any]:
    """Template and bundle limits from the environment (docs/environments.md)."""
    out: dict[str, Any] = {}
    try:
        if raw := os.environ.get("EMBER_TEMPLATE_IDLE"):
            out["template_idle_s"] = parse_duration(raw)
        if raw := os.environ.get("EMBER_TEMPLATE_MEMORY"):
            out["template_memory"] = parse_size(raw)
        if raw := os.environ.get("EMBER_BUNDLE_LIMIT"):
            out["bundle_limit"] = parse_size(raw)
        if raw := os.environ.get("EMBER_WEBHOOK_BACKOFF"):  # "1,5": the waits between attempts
            out["webhook_backoff_s"] = tuple(parse_duration(p) for p in raw.split(","))
    except ValueError as exc:
        raise ServerConfigError(str(exc)) from None
    return out


def store_line(db_url: str | None, durability: str) -> str:
    """What the store is and what an accepted job survives (docs/reliability.md,
    docs/scale-out.md)."""
    if db_url and not db_url.startswith("sqlite"):
        return (
            f"store: {shown(db_url)}\ndurability: an accepted job survives a server kill, and "
            "whatever PostgreSQL's commits survive (synchronous_commit=on; --durability is "
            "SQLite's setting)"
        )
    survives = (
        "a server kill" if durability == "normal" else "a server kill, an OS crash, power loss"
    )
    return f"durability: {durability} (an accepted job survives {survives})"


def _lease_ttl() -> float:
    """EMBER_LEASE_TTL: seconds a scheduler lease lasts unrenewed (servers on PostgreSQL)."""
    raw = os.environ.get("EMBER_LEASE_TTL", "")
    try:
        ttl = float(raw) if raw else DEFAULT_TTL_S
    except ValueError:
        raise ServerConfigError(f"EMBER_LEASE_TTL={raw!r} is not a number of seconds") from None
    if not 0.5 <= ttl <= 300:
        raise ServerConfigError(f"EMBER_LEASE_TTL={raw!r}: give between 0.5 and 300 seconds")
    return ttl


def _metrics_port() -> int | None:
    """`EMBER_METRICS_PORT`: also serve `GET /metrics`, no token, on 127.0.0.1 (docs/metrics.md)."""
    raw = os.environ.get("EMBER_METRICS_PORT", "").strip()
    if not raw:
        return None
    if not (raw.isascii() and raw.isdigit()) or not 0 < int(raw) < 65536:
        raise ServerConfigError(f"EMBER_METRICS_PORT={raw!r}: give a TCP port, 1 to 65535")
    return int(raw)


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
    sandbox: str = "auto",
    tenant_isolation: bool = True,
    durability: str = "normal",
    quotas: Quotas | None = None,
    max_connections: int | None = None,
    header_timeout: float = connections.HEADER_TIMEOUT,
    backend: str = "local",
    ray_address: str | None = None,
    advertise_url: str | None = None,
    metrics_port: int | None = None,
) -> None:
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if (tls_cert is None) != (tls_key is None):
        raise ServerConfigError("give both --tls-cert and --tls-key, or neither")
    for path in (tls_cert, tls_key):
        if path is not None and not path.is_file():
            raise ServerConfigError(f"cannot read {path}: no such file")
    try:
        limits = connections.limits(max_connections, header_timeout)
    except ValueError as exc:
        raise ServerConfigError(str(exc)) from None
    # TLS is done by the connection guard, so that a handshake counts against its deadline and cap
    tls = connections.tls_context(str(tls_cert), str(tls_key)) if tls_cert and tls_key else None
    housekeeping = _housekeeping()
    if backend == "ray" and gpus:
        raise ServerConfigError(
            "--gpus declares GPUs of the local backend; on Ray, declare them to Ray "
            "(ray start --num-gpus 2 --resources '{\"accelerator_type:L4\": 1}')"
        )
    settings = Settings(
        data_dir=data_dir,
        inventory=inventory(gpus) if backend == "local" else (),
        backend=backend,
        ray_address=ray_address,
        prices=prices(price_file),
        templates=templates,
        host=host,
        tls=tls_cert is not None,
        durability=durability,
        quotas=quotas or Quotas(),
        sandbox=sandbox,
        tenant_isolation=tenant_isolation,
        advertise_url=advertise_url or f"{'https' if tls else 'http'}://{host}:{port}",
        lease_ttl_s=_lease_ttl(),
        **housekeeping,
    )
    isolation = describe_sandbox(sandbox, tenant_isolation)
    db_url = db_url or env_url()
    metrics_port = metrics_port if metrics_port is not None else _metrics_port()
    try:
        served = create_app(
            settings, max_payload=max_payload, db_url=db_url, metrics_port=metrics_port
        )
    except (StoreUnavailable, RayUnavailable, ValueError) as exc:
        raise ServerConfigError(str(exc)) from None
    config = uvicorn.Config(
        served.app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
        http=connections.http_protocol(limits, tls, served.direct),
        timeout_keep_alive=limits.keep_alive,
    )
    server = uvicorn.Server(config)
    print(
        f"ember server on {'https' if settings.tls else 'http'}://{host}:{port}  (data dir {data_dir}, token in {data_dir / TOKEN_FILE})",
        flush=True,
    )
    if backend == "ray":
        print(
            f"backend: ray ({ray_address or 'auto'}): workers are Ray actors, GPUs come from "
            "the cluster's nodes, read again every second (`ember nodes`; docs/scale-out.md)",
            flush=True,
        )
    else:
        for line in describe(settings.inventory, settings.prices):
            print(line, flush=True)
    print(limits.describe(), flush=True)
    if metrics_port is not None:
        print(
            f"metrics: http://127.0.0.1:{metrics_port}/metrics, no token (--metrics-port)",
            flush=True,
        )
    print(
        f"billing: per {'second, rounded up per worker' if settings.prices.billing == 'second' else 'millisecond'}",
        flush=True,
    )
    print(store_line(db_url, durability), flush=True)
    print(settings.quotas.describe(), flush=True)
    print(isolation, flush=True)
    print(
        f"templates: each stops after {duration_text(settings.template_idle_s)} unused, "
        f"{size_text(settings.template_memory)} across all (EMBER_TEMPLATE_IDLE, "
        f"EMBER_TEMPLATE_MEMORY); bundles up to {size_text(settings.bundle_limit)} "
        "(EMBER_BUNDLE_LIMIT)",
        flush=True,
    )
    tune_gc()
    server.run()
