"""metering: workers, usage records, job cost

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("cost", sa.Text))
    op.create_table(
        "workers",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("app", sa.String(64), nullable=False),
        sa.Column("unit", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("gpus", sa.Text, nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("metered_until", sa.Float, nullable=False),
        sa.Column("ended_at", sa.Float),
        sa.Column("exit_code", sa.Integer),
        sa.Column("stop_reason", sa.Text),
    )
    op.create_table(
        "usage",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("worker", sa.String(40), nullable=False),
        sa.Column("app", sa.String(64), nullable=False),
        sa.Column("unit", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("start", sa.Float, nullable=False),
        sa.Column("end", sa.Float, nullable=False),
        sa.Column("billed_ms", sa.Float, nullable=False),
        sa.Column("gpu_type", sa.String(32)),
        sa.Column("gpu_count", sa.Float, nullable=False),
        sa.Column("cpu", sa.Float, nullable=False),
        sa.Column("memory_gib", sa.Float, nullable=False),
        sa.Column("usd", sa.Float, nullable=False),
        sa.Column("tags", sa.Text, nullable=False),
        sa.Column("starts", sa.Integer, nullable=False),
    )
    op.create_index("ix_usage_start", "usage", ["start"])
    op.create_index("ix_usage_worker", "usage", ["worker"])


def downgrade() -> None:
    op.drop_table("usage")
    op.drop_table("workers")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("cost")
