"""The schema. Changes here need an Alembic revision in `migrations/versions/`."""

from __future__ import annotations

from sqlalchemy import (
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

tokens = Table(
    "tokens",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(64), nullable=False),
    Column("hash", String(64), nullable=False, unique=True),
    Column("created_at", Float, nullable=False),
)

apps = Table(
    "apps",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("tags", Text, nullable=False, default="{}"),
    Column("current_version", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

versions = Table(
    "versions",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("app", String(64), ForeignKey("apps.name"), nullable=False),
    Column("version", Integer, nullable=False),
    Column("filename", String(255), nullable=False),
    Column("source", Text, nullable=False),
    Column("functions", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    UniqueConstraint("app", "version"),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("app", String(64), nullable=False),
    Column("function", String(130), nullable=False),
    Column("status", String(16), nullable=False),
    Column("input", Text, nullable=False),
    Column("output", Text),
    Column("error", Text),
    Column("timings", Text),
    Column("attempts", Integer, nullable=False, default=0),
    Column("version", Integer),
    Column("created_at", Float, nullable=False),
    Column("finished_at", Float),
    Column("cost", Text),
)
Index("ix_jobs_status", jobs.c.status)
Index("ix_jobs_app_function", jobs.c.app, jobs.c.function)

workers = Table(
    "workers",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("app", String(64), nullable=False),
    Column("unit", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("gpus", Text, nullable=False),
    Column("started_at", Float, nullable=False),
    Column("metered_until", Float, nullable=False),
    Column("ended_at", Float),
    Column("exit_code", Integer),
    Column("stop_reason", Text),
)

usage = Table(
    "usage",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("worker", String(40), nullable=False),
    Column("app", String(64), nullable=False),
    Column("unit", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("phase", String(16), nullable=False),
    Column("start", Float, nullable=False),
    Column("end", Float, nullable=False),
    Column("billed_ms", Float, nullable=False),
    Column("gpu_type", String(32)),
    Column("gpu_count", Float, nullable=False),
    Column("cpu", Float, nullable=False),
    Column("memory_gib", Float, nullable=False),
    Column("usd", Float, nullable=False),
    Column("tags", Text, nullable=False),
    Column("starts", Integer, nullable=False),
)
Index("ix_usage_start", usage.c.start)
Index("ix_usage_worker", usage.c.worker)
