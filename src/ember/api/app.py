"""The FastAPI application and its lifespan: store, token, control plane."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from ember import __version__
from ember.api import errors
from ember.api.auth import TokenCheck, ensure_token
from ember.api.limits import PayloadLimit
from ember.api.routes import public, router
from ember.config import TOKEN_FILE
from ember.control.plane import ControlPlane, Settings
from ember.store.db import make_engine, migrate, sqlite_url

log = logging.getLogger("ember.server")


def create_app(settings: Settings, *, max_payload: int, db_url: str | None = None) -> FastAPI:
    # Inputs, outputs and deployed code live here: readable by the server's user alone.
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    settings.data_dir.chmod(0o700)
    engine = make_engine(db_url or sqlite_url(settings.data_dir))
    migrate(engine)
    hashes = ensure_token(engine, settings.data_dir)
    cp = ControlPlane(settings, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await cp.start()
        try:
            yield
        finally:
            await cp.stop()
            engine.dispose()

    app = FastAPI(
        title="ember",
        version=__version__,
        lifespan=lifespan,
        description="Deploy a Python function, call it over HTTP, scale to zero.",
    )
    app.state.plane = cp
    errors.install(app)
    check = TokenCheck(hashes, settings.data_dir / TOKEN_FILE)
    app.include_router(public)
    app.include_router(router, dependencies=[Depends(check)])
    app.add_middleware(PayloadLimit, max_bytes=max_payload)
    return app
