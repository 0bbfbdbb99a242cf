"""`ember server`: one process with the API, the control plane, SQLite and local workers."""

from __future__ import annotations

import logging
from pathlib import Path

import uvicorn

from ember.api.app import create_app
from ember.config import TOKEN_FILE
from ember.control.plane import Settings


def serve(
    *,
    host: str,
    port: int,
    data_dir: Path,
    max_payload: int,
    log_level: str = "info",
    db_url: str | None = None,
) -> None:
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = create_app(Settings(data_dir=data_dir), max_payload=max_payload, db_url=db_url)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    print(
        f"ember server on http://{host}:{port}  (data dir {data_dir}, token in {data_dir / TOKEN_FILE})",
        flush=True,
    )
    server.run()
