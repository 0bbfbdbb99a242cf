"""job listing: an index for a workspace's jobs, newest first

`GET /v1/jobs` pages through one workspace's jobs by `created_at` (then id); without this index
each page would sort every job of the workspace.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04
"""

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_jobs_workspace_created", "jobs", ["workspace", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_workspace_created", table_name="jobs")
