"""environments: code bundles, built Envs, and what each version runs on

`bundles` holds each workspace's uploaded code, content-addressed (the digest of its files);
`envs` the Envs built on this server, each with its lock. A version gains the bundle and module
it runs (both NULL for versions deployed as one file, whose `source` stays as it was).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "bundles",
        sa.Column("workspace", sa.String(64), nullable=False),
        sa.Column("digest", sa.String(80), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("files", sa.Integer, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("workspace", "digest"),
    )
    op.create_table(
        "envs",
        sa.Column("workspace", sa.String(64), nullable=False),
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("spec", sa.Text, nullable=False),
        sa.Column("python_version", sa.String(16), nullable=False),
        sa.Column("lock", sa.Text, nullable=False),
        sa.Column("disk_bytes", sa.BigInteger, nullable=False),
        sa.Column("own_bytes", sa.BigInteger, nullable=False),
        sa.Column("build_s", sa.Float, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("workspace", "id"),
    )
    with op.batch_alter_table("versions") as batch:
        batch.add_column(sa.Column("bundle", sa.String(80)))
        batch.add_column(sa.Column("module", sa.String(255)))


def downgrade() -> None:
    with op.batch_alter_table("versions") as batch:
        batch.drop_column("module")
        batch.drop_column("bundle")
    op.drop_table("envs")
    op.drop_table("bundles")
