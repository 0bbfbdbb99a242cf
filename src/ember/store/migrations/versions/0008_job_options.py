"""job options: what a caller asked of one job beyond its input

`webhook` (an http(s) URL the server POSTs the job's body to once it ends), `ttl_s` (a job still
queued this long after it was submitted ends TIMED_OUT without running), `timeout_s` (the job's
own execution timeout, in place of its function's), `retain_s` (how long the ended job is kept,
in place of the server's --job-retention) and `via` (the API it came through: NULL for the
native one, `runpod`), as `core.jobs.JobOptions` holds them. All NULL for a plain job. Stored so
that a job keeps them across a restart and when another server takes it in.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def _columns() -> list[sa.Column[object]]:
    return [
        sa.Column("webhook", sa.Text),
        sa.Column("ttl_s", sa.Float),
        sa.Column("timeout_s", sa.Float),
        sa.Column("retain_s", sa.Float),
        sa.Column("via", sa.String(16)),
    ]


def upgrade() -> None:
    for column in _columns():
        op.add_column("jobs", column)


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        for column in reversed(_columns()):
            batch.drop_column(column.name)
