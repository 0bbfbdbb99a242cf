"""Engine set-up and migrations. SQLite by default (WAL, so readers never wait on the writer);
PostgreSQL (psycopg 3) where several servers share one store (docs/scale-out.md)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, make_url, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

MIGRATIONS = Path(__file__).parent / "migrations"
URL_ENV = ("EMBER_DATABASE_URL", "EMBER_DB_URL")
"""Where `ember server` and the `alembic` command line find the store's URL; the second is the
older name, still read."""


class StoreUnavailable(Exception):
    """The store's URL cannot be used: a bad URL, a missing driver, a database out of reach.
    The message says what to fix."""


def sqlite_url(data_dir: Path) -> str:
    return f"sqlite:///{data_dir / 'ember.db'}"


def env_url() -> str | None:
    """The store's URL from the environment (EMBER_DATABASE_URL, or EMBER_DB_URL), if set."""
    for name in URL_ENV:
        if value := os.environ.get(name):
            return value
    return None


DURABILITY = {"normal": "NORMAL", "full": "FULL"}
"""`ember server --durability`: SQLite's `synchronous` setting (docs/reliability.md). On
PostgreSQL both are `synchronous_commit=on`: a commit the server acknowledged is on its disk."""

PG_POOL = {"pool_size": 8, "max_overflow": 8, "pool_pre_ping": True, "pool_recycle": 1800}
"""At most 16 connections per ember server (the writer, request threads, usage queries): well
under PostgreSQL's default `max_connections` of 100, with room for a few replicas. Pre-ping, so
a connection the database closed (a restart, an idle timeout) is replaced, not failed on."""


def _normalize(url: str) -> URL:
    """`url` parsed; plain `postgresql://` and `postgres://` mean psycopg 3, the driver ember
    ships with (SQLAlchemy's default for them is psycopg2)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StoreUnavailable(
            f"cannot parse the database URL {url!r}: give sqlite:///PATH or "
            "postgresql+psycopg://USER:PASSWORD@HOST:PORT/DATABASE"
        ) from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise StoreUnavailable(
            f"{parsed.get_backend_name()} is not a store ember runs on: give sqlite:///PATH or "
            "postgresql+psycopg://USER:PASSWORD@HOST:PORT/DATABASE"
        )
    return parsed


def shown(url: str | URL) -> str:
    """`url` with its password hidden: for logs and messages."""
    parsed = url if isinstance(url, URL) else _normalize(url)
    return parsed.render_as_string(hide_password=True)


def make_engine(url: str, durability: str = "normal") -> Engine:
    """`durability`: on SQLite, "normal" survives a process kill; "full" also an OS crash or
    power loss, at the price of an fsync of the WAL per commit (one per batch of writes). On
    PostgreSQL a commit is durable once acknowledged either way (`synchronous_commit=on`)."""
    synchronous = DURABILITY[durability]
    parsed = _normalize(url)
    try:
        if parsed.get_backend_name() == "sqlite":
            engine = create_engine(parsed, pool_size=8, max_overflow=8)
        else:
            # Set per connection, whatever the database's default: an accepted job must survive
            # a kill of ember and of PostgreSQL alike, so no asynchronous commit.
            args = {
                "options": "-c synchronous_commit=on",
                "application_name": "ember",
                "connect_timeout": 10,
            }
            engine = create_engine(parsed, connect_args=args, **PG_POOL)
    except (NoSuchModuleError, ImportError) as exc:
        raise StoreUnavailable(
            f"no driver for {shown(parsed)} ({exc}): for PostgreSQL use "
            "postgresql+psycopg://... and install psycopg 3 (pip install 'psycopg[binary]')"
        ) from None
    if parsed.get_backend_name() == "sqlite":

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


def _reason(exc: DBAPIError) -> str:
    """The driver's message on one line, ending as a sentence."""
    reason = " ".join(str(exc.orig if exc.orig is not None else exc).split())
    return reason if reason.endswith((".", "?", "!")) else reason + "."


def check(engine: Engine) -> None:
    """Connect once, so that a database out of reach is a clear message at start rather than a
    traceback from the first query."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except DBAPIError as exc:
        hint = (
            "is PostgreSQL running and reachable there, does the database exist (createdb), and "
            "may this user connect (pg_hba.conf, password)?"
            if engine.dialect.name == "postgresql"
            else "is the path writable?"
        )
        raise StoreUnavailable(
            f"cannot connect to the database {shown(engine.url)}: {_reason(exc)} Check the URL "
            f"(--db or EMBER_DATABASE_URL): {hint}"
        ) from None


MIGRATION_LOCK = 0x656D626572
"""The PostgreSQL advisory lock a migration holds ("ember"): servers starting together on one
database migrate one after the other, the later ones finding nothing left to do."""


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (idempotent). On PostgreSQL the whole upgrade is
    one transaction (its DDL is transactional) under an advisory lock."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def open_store(url: str, durability: str = "normal") -> Engine:
    """The engine of a store that answers and is migrated to the newest revision; raises
    StoreUnavailable, with what to fix, where it cannot be."""
    engine = make_engine(url, durability)
    check(engine)
    try:
        migrate(engine)
    except DBAPIError as exc:
        engine.dispose()
        raise StoreUnavailable(
            f"cannot bring the schema of {shown(engine.url)} up to date: {_reason(exc)} The user "
            "needs to own the database, or to be allowed to create tables in it"
        ) from None
    return engine
