"""bounds: usage rollups, aggregated refusals in the audit trail, finished jobs by time

`usage_rollup` starts empty with its mark at 0: the server's first start folds every existing
usage record into it (`ember.control.meter.fold_usage`), in the same code that folds new ones.
Audit rows gain `count` (1 for every existing event) and `last_ts`; on SQLite the trigger that
refuses UPDATE now lets exactly one kind through: raising the count and last time of a row of
aggregated refusals, every other column unchanged. DELETE stays refused. PostgreSQL gets the
same rule as a trigger function.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_SAME = " AND ".join(
    f"NEW.{c} IS OLD.{c}"
    for c in ("id", "ts", "workspace", "actor", "action", "target", "outcome", "detail", "ip")
)
COUNTER_ONLY = (
    "CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit "
    f"WHEN NOT ({_SAME} AND OLD.last_ts IS NOT NULL AND NEW.count >= OLD.count "
    "AND NEW.last_ts >= OLD.last_ts) "
    "BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END"
)
NO_UPDATE = (
    "CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit "
    "BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END"
)

PG_COUNTER_ONLY = (
    "CREATE FUNCTION audit_counter_only() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    "IF "
    + " AND ".join(
        f"NEW.{c} IS NOT DISTINCT FROM OLD.{c}"
        for c in ("id", "ts", "workspace", "actor", "action", "target", "outcome", "detail", "ip")
    )
    + " AND OLD.last_ts IS NOT NULL AND NEW.count >= OLD.count AND NEW.last_ts >= OLD.last_ts "
    "THEN RETURN NEW; END IF; RAISE EXCEPTION 'the audit trail is append-only'; END $$"
)
"""The same rule on PostgreSQL (0003 made its append-only triggers there)."""


def _pg_update_trigger(function: str) -> None:
    op.execute("DROP TRIGGER IF EXISTS audit_no_update ON audit")
    op.execute(
        "CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit "
        f"FOR EACH ROW EXECUTE FUNCTION {function}()"
    )


def upgrade() -> None:
    op.create_table(
        "usage_rollup",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("workspace", sa.String(64), nullable=False),
        sa.Column("span", sa.String(8), nullable=False),
        sa.Column("bucket", sa.BigInteger, nullable=False),
        sa.Column("app", sa.String(64), nullable=False),
        sa.Column("unit", sa.String(64), nullable=False),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("gpu_type", sa.String(32), nullable=False),
        sa.Column("gpu_count", sa.Float, nullable=False),
        sa.Column("cpu", sa.Float, nullable=False),
        sa.Column("policy", sa.String(64), nullable=False),
        sa.Column("tags", sa.Text, nullable=False),
        sa.Column("billed_us", sa.BigInteger, nullable=False),
        sa.Column("usd_pico", sa.BigInteger, nullable=False),
        sa.Column("starts", sa.Integer, nullable=False),
        sa.Column("records", sa.Integer, nullable=False),
        sa.Column("longest_s", sa.Float, nullable=False),
        sa.UniqueConstraint(
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
    marks = op.create_table(
        "marks",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.BigInteger, nullable=False),
    )
    op.bulk_insert(marks, [{"name": "usage_rollup", "value": 0}])
    op.create_index("ix_jobs_finished_at", "jobs", ["finished_at"])
    # A usage query's edges: a workspace's records by start (ix_usage_policy leads with policy).
    op.create_index("ix_usage_workspace_start", "usage", ["workspace", "start"])
    # Plain ALTER TABLE ADD COLUMN, not a batch copy: a copy of the table would drop its triggers.
    op.add_column("audit", sa.Column("count", sa.Integer, nullable=False, server_default="1"))
    op.add_column("audit", sa.Column("last_ts", sa.Float))
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS audit_no_update")
        op.execute(COUNTER_ONLY)
    elif op.get_bind().dialect.name == "postgresql":
        op.execute(PG_COUNTER_ONLY)
        _pg_update_trigger("audit_counter_only")


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS audit_no_update")
        op.execute(NO_UPDATE)
    elif op.get_bind().dialect.name == "postgresql":
        _pg_update_trigger("audit_append_only")
        op.execute("DROP FUNCTION audit_counter_only()")
    op.drop_column("audit", "last_ts")
    op.drop_column("audit", "count")
    op.drop_index("ix_usage_workspace_start", "usage")
    op.drop_index("ix_jobs_finished_at", "jobs")
    op.drop_table("marks")
    op.drop_table("usage_rollup")
