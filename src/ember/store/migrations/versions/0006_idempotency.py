"""idempotency: a job remembers the `Idempotency-Key` it was submitted with

`idempotency_key` (NULL for a job submitted without one) is unique per workspace, so that a
repeat of a submit, to this server or another one on the same database, finds the job instead of
making a second; `request_digest` tells a repeat (the same function and input) from a different
request that reuses the key (a 409). A key lives as long as its job's row: the retention period.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("idempotency_key", sa.String(255)))
    op.add_column("jobs", sa.Column("request_digest", sa.String(64)))
    op.create_index("ux_jobs_idempotency", "jobs", ["workspace", "idempotency_key"], unique=True)


def downgrade() -> None:
    op.drop_index("ux_jobs_idempotency", "jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("request_digest")
        batch.drop_column("idempotency_key")
