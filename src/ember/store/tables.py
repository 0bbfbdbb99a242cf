"""The schema. Changes here need an Alembic revision in `migrations/versions/`."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()


def _workspace() -> Column[str]:
    return Column("workspace", String(64), nullable=False, server_default="default")


workspaces = Table(
    "workspaces",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("created_at", Float, nullable=False),
)

tokens = Table(
    "tokens",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(64), nullable=False),
    Column("hash", String(64), nullable=False, unique=True),
    Column("created_at", Float, nullable=False),
    _workspace(),
    Column("scope", String(16), nullable=False, server_default="admin"),
    Column("policy", String(64)),
    Column("expires_at", Float),
    Column("revoked_at", Float),
    Column("bootstrap", Boolean, nullable=False, server_default="0"),
)

apps = Table(
    "apps",
    metadata,
    _workspace(),
    Column("name", String(64), nullable=False),
    Column("tags", Text, nullable=False, default="{}"),
    Column("current_version", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    PrimaryKeyConstraint("workspace", "name"),
)

versions = Table(
    "versions",
    metadata,
    Column("id", Integer, primary_key=True),
    _workspace(),
    Column("app", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("filename", String(255), nullable=False),
    Column("source", Text, nullable=False),
    Column("functions", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("bundle", String(80)),
    # the digest of its code bundle (`bundles`); NULL for a version deployed as one file
    Column("module", String(255)),
    # the dotted module of the bundle that defines the app (`pkg.main`)
    UniqueConstraint("workspace", "app", "version"),
    ForeignKeyConstraint(["workspace", "app"], ["apps.workspace", "apps.name"]),
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
    _workspace(),
    Column("policy", String(64)),
    Column("token", String(64)),
    Column("tags", Text),
    Column("idempotency_key", String(255)),
    Column("request_digest", String(64)),
    Column("owner", BigInteger),
    # a caller's options (migration 0008, core.jobs.JobOptions): NULL for a plain job
    Column("webhook", Text),
    Column("ttl_s", Float),
    Column("timeout_s", Float),
    Column("retain_s", Float),
    Column("via", String(16)),
)
Index("ix_jobs_status", jobs.c.status)
Index("ix_jobs_owner_status", jobs.c.owner, jobs.c.status)
Index("ux_jobs_idempotency", jobs.c.workspace, jobs.c.idempotency_key, unique=True)
Index("ix_jobs_workspace", jobs.c.workspace)
Index("ix_jobs_app_function", jobs.c.app, jobs.c.function)
Index("ix_jobs_finished_at", jobs.c.finished_at)
Index("ix_jobs_workspace_created", jobs.c.workspace, jobs.c.created_at)  # listings (0009)

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
    _workspace(),
    Column("policy", String(64)),
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
    _workspace(),
    Column("policy", String(64)),
)
Index("ix_usage_start", usage.c.start)
Index("ix_usage_worker", usage.c.worker)
Index("ix_usage_policy", usage.c.workspace, usage.c.policy, usage.c.start)
Index("ix_usage_workspace_start", usage.c.workspace, usage.c.start)

usage_rollup = Table(
    # The usage records summed per workspace, span ("hour" or "day") bucket of their start and
    # shape (`core.metering.Shape`), in exact integers: `GET /v1/usage` sums these for whole
    # buckets and reads raw records only at a window's edges. Written with the records.
    "usage_rollup",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("workspace", String(64), nullable=False),
    Column("span", String(8), nullable=False),
    Column("bucket", BigInteger, nullable=False),
    Column("app", String(64), nullable=False),
    Column("unit", String(64), nullable=False),
    Column("phase", String(16), nullable=False),
    Column("gpu_type", String(32), nullable=False),
    Column("gpu_count", Float, nullable=False),
    Column("cpu", Float, nullable=False),
    Column("policy", String(64), nullable=False),
    Column("tags", Text, nullable=False),
    Column("billed_us", BigInteger, nullable=False),
    Column("usd_pico", BigInteger, nullable=False),
    Column("starts", Integer, nullable=False),
    Column("records", Integer, nullable=False),
    Column("longest_s", Float, nullable=False),
    UniqueConstraint(
        "workspace",
        "span",
        "bucket",
        "app",
        "unit",
        "phase",
        "gpu_type",
        "gpu_count",
        "cpu",
        "policy",
        "tags",
        name="uq_usage_rollup_cell",
    ),
)

marks = Table(
    # How far a derived table has folded its source: `usage_rollup` holds every usage record
    # up to id `value` of the row named "usage_rollup".
    "marks",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", BigInteger, nullable=False),
)

leases = Table(
    # Who schedules, when several servers share one store (migration 0007, core/lease.py).
    "leases",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("holder", String(64), nullable=False),
    Column("epoch", BigInteger, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("address", String(255), nullable=False),
)

policies = Table(
    "policies",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("workspace", String(64), nullable=False),
    Column("name", String(64), nullable=False),
    Column("body", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("alerted_period", Float),
    UniqueConstraint("workspace", "name"),
)

secrets = Table(
    "secrets",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("workspace", String(64), nullable=False),
    Column("name", String(64), nullable=False),
    # key names only (listing needs no master key); the values are in `ciphertext`
    Column("keys", Text, nullable=False),
    Column("ciphertext", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    UniqueConstraint("workspace", "name"),
)

audit = Table(
    "audit",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("ts", Float, nullable=False),
    Column("workspace", String(64)),
    Column("actor", String(140), nullable=False),
    Column("action", String(64), nullable=False),
    Column("target", String(255)),
    Column("outcome", String(32), nullable=False),
    Column("detail", Text),
    Column("ip", String(64)),
    # Refused unauthenticated requests are one row per source, reason and minute: `count` of
    # them, the last at `last_ts` (NULL on every other event, whose count is 1).
    Column("count", Integer, nullable=False, server_default="1"),
    Column("last_ts", Float),
)
Index("ix_audit_ts", audit.c.ts)

bundles = Table(
    "bundles",
    metadata,
    _workspace(),
    Column("digest", String(80), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("files", Integer, nullable=False),
    Column("data", LargeBinary, nullable=False),
    # the bundle as its client zipped it, checked (`ember.envs.bundle.open_bundle`)
    Column("created_at", Float, nullable=False),
    PrimaryKeyConstraint("workspace", "digest"),
)

envs = Table(
    "envs",
    metadata,
    _workspace(),
    Column("id", String(40), nullable=False),
    Column("spec", Text, nullable=False),
    Column("python_version", String(16), nullable=False),
    Column("lock", Text, nullable=False),
    Column("disk_bytes", BigInteger, nullable=False),
    Column("own_bytes", BigInteger, nullable=False),
    Column("build_s", Float, nullable=False),
    Column("created_at", Float, nullable=False),
    PrimaryKeyConstraint("workspace", "id"),
)
