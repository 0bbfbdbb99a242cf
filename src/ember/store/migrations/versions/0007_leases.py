"""leases: one server of several on one store schedules; a job row names the lease that owns it

`leases` holds one row per lease (today only "scheduler"): who holds it, its epoch (one more at
every change of holder: the fencing token), until when by the database's clock, and the address
the holder serves at (where the others forward what only it does). `jobs.owner` is the epoch of
the scheduler that took the job: NULL for a job a standby accepted and nobody took yet. A final
row is written only under the epoch that owns the job, so a scheduler that lost its lease cannot
overwrite what its successor decided (docs/architecture.md, "Several servers").

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "leases",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(64), nullable=False),
        sa.Column("epoch", sa.BigInteger, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("address", sa.String(255), nullable=False),
    )
    op.add_column("jobs", sa.Column("owner", sa.BigInteger))
    op.create_index("ix_jobs_owner_status", "jobs", ["owner", "status"])


def downgrade() -> None:
    op.drop_index("ix_jobs_owner_status", "jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("owner")
    op.drop_table("leases")
