"""The FastAPI application and its lifespan: store, token, control plane."""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from starlette.types import ASGIApp

from ember import __version__, web
from ember.api import admin, browse, environments, errors, metrics, runpod, tenancy
from ember.api.auth import Auth, Principal, ensure_token
from ember.api.bodies import audit
from ember.api.forward import Forward
from ember.api.invoke import DirectCalls, Invoke
from ember.api.limits import PayloadLimit
from ember.api.routes import public, router
from ember.control.lease import shared
from ember.control.plane import ControlPlane
from ember.control.settings import Settings
from ember.store.db import open_store, sqlite_url

log = logging.getLogger("ember.server")

# FastAPI 0.142 and newer asks OpenTelemetry on every request whether a provider is configured,
# about a tenth of the server's CPU per warm call; ember's server emits no telemetry.
_NO_TELEMETRY: dict[str, Any] = (
    {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    if "telemetry" in inspect.signature(FastAPI).parameters
    else {}
)


@dataclass(frozen=True, slots=True)
class Served:
    """What `ember server` serves: the ASGI app, and the calls its HTTP protocol answers itself."""

    app: ASGIApp
    direct: DirectCalls


def create_app(
    settings: Settings,
    *,
    max_payload: int,
    db_url: str | None = None,
    metrics_port: int | None = None,
) -> Served:
    """`db_url`: the store (default: SQLite in the data dir); raises `StoreUnavailable` where it
    cannot be opened or migrated. `metrics_port`: also serve `GET /metrics`, without a token, on
    127.0.0.1 at that port (docs/metrics.md)."""
    # Inputs, outputs and deployed code live here: readable by the server's user alone.
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    settings.data_dir.chmod(0o700)
    engine = open_store(db_url or sqlite_url(settings.data_dir), settings.durability)
    for name in ("ember.db", "ember.db-wal", "ember.db-shm"):  # the umask may have been loose
        if (settings.data_dir / name).exists():
            (settings.data_dir / name).chmod(0o600)
    ensure_token(engine, settings.data_dir, shared=shared(engine))
    cp = ControlPlane(settings, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await cp.start()
        listener = None
        try:
            if metrics_port is not None:
                listener = await metrics.listen(cp, metrics_port)
            yield
        finally:
            if listener is not None:
                listener.close()
            await cp.stop()
            await forward.aclose()
            engine.dispose()

    app = FastAPI(
        title="ember",
        version=__version__,
        lifespan=lifespan,
        description="Deploy a Python function, call it over HTTP, scale to zero.",
        # /docs and /redoc come from ember.web, with vendored scripts instead of FastAPI's CDN ones
        docs_url=None,
        redoc_url=None,
        **_NO_TELEMETRY,
    )
    app.state.plane = cp

    def refused(request: Request, action: str, message: str) -> None:
        who: Principal | None = getattr(request.state, "principal", None)
        audit(
            request,
            who,
            action,
            "refused",
            f"{request.method} {request.url.path}",
            {"why": message},
        )

    app.state.auth = Auth(cp.tokens, refused)
    errors.install(app)
    app.include_router(public)
    app.include_router(router)
    app.include_router(browse.router)  # what the dashboard browses: series, job pages
    app.include_router(tenancy.router)
    app.include_router(admin.router)
    app.include_router(environments.router)
    app.include_router(runpod.router)  # RunPod's client API, /runpod/v2
    app.include_router(metrics.router)  # GET /metrics, for the operator (docs/metrics.md)
    app.include_router(web.router)  # the dashboard (/ui) and the API reference (/docs, /redoc)
    # Calls skip FastAPI's stack (`Invoke`); the payload limit applies to every request, but
    # a bundle upload, whose own limit is the bundle's (checked again as it is unpacked).
    bundle_max = max(max_payload, settings.bundle_limit + (1 << 20))
    # On a standby, what only the scheduler does goes to it (several servers, one store).
    forward = Forward(Invoke(app), cp.cluster.forward_to)  # closed by the lifespan above
    asgi = PayloadLimit(
        forward,
        max_bytes=max_payload,
        overrides={"/v1/bundles/": (bundle_max, "EMBER_BUNDLE_LIMIT on the server")},
    )
    return Served(asgi, DirectCalls(app, max_payload))
