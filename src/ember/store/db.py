"""Engine set-up and migrations. SQLite by default (WAL, so readers never wait on the writer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event

MIGRATIONS = Path(__file__).parent / "migrations"


def sqlite_url(data_dir: Path) -> str:
    return f"sqlite:///{data_dir / 'ember.db'}"


DURABILITY = {"normal": "NORMAL", "full": "FULL"}
"""`ember server --durability`: SQLite's `synchronous` setting (docs/reliability.md)."""


def make_engine(url: str, durability: str = "normal") -> Engine:
    """`durability`: "normal" survives a process kill; "full" also an OS crash or power loss,
    at the price of an fsync of the WAL per commit (one per batch of writes)."""
    synchronous = DURABILITY[durability]
    engine = (
        create_engine(url, pool_size=8, max_overflow=8)
        if url.startswith("sqlite")
        else create_engine(url)
    )
    if url.startswith("sqlite"):

        @event.listens_for(engine, "connect")
        def _pragmas(conn: Any, _record: Any) -> None:
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a commit survives the process being killed; an OS crash or
            # power loss can take the commits since the WAL was last synced. FULL syncs the WAL
            # at every commit, so those survive too.
            cur.execute(f"PRAGMA synchronous={synchronous}")
            cur.execute("PRAGMA busy_timeout=10000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

    return engine


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (idempotent)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
