"""workspaces, scoped tokens, usage policies, secrets, audit trail

Apps are now named within a workspace, so `apps` and `versions` are rebuilt with the workspace in
their keys; everything that existed before belongs to the `default` workspace.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

import time

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


PG_REFUSE = (
    "CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ "
    "BEGIN RAISE EXCEPTION 'the audit trail is append-only'; END $$"
)
"""PostgreSQL's triggers call a function: this one refuses whatever it is called for."""


def _ws() -> sa.Column[str]:
    return sa.Column("workspace", sa.String(64), nullable=False, server_default="default")


def upgrade() -> None:
    workspaces = op.create_table(
        "workspaces",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.bulk_insert(workspaces, [{"name": "default", "created_at": time.time()}])

    with op.batch_alter_table("tokens") as batch:
        batch.add_column(_ws())
        batch.add_column(sa.Column("scope", sa.String(16), nullable=False, server_default="admin"))
        batch.add_column(sa.Column("policy", sa.String(64)))
        batch.add_column(sa.Column("expires_at", sa.Float))
        batch.add_column(sa.Column("revoked_at", sa.Float))
        batch.add_column(sa.Column("bootstrap", sa.Boolean, nullable=False, server_default="0"))
    tokens = sa.table("tokens", sa.column("name", sa.String), sa.column("bootstrap", sa.Boolean))
    op.execute(tokens.update().where(tokens.c.name == "admin").values(bootstrap=True))

    op.create_table(
        "apps_v3",
        _ws(),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("tags", sa.Text, nullable=False),
        sa.Column("current_version", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("workspace", "name"),
    )
    op.create_table(
        "versions_v3",
        sa.Column("id", sa.Integer, primary_key=True),
        _ws(),
        sa.Column("app", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("functions", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.UniqueConstraint("workspace", "app", "version"),
        sa.ForeignKeyConstraint(["workspace", "app"], ["apps_v3.workspace", "apps_v3.name"]),
    )
    op.execute(
        "INSERT INTO apps_v3 (workspace, name, tags, current_version, created_at, updated_at) "
        "SELECT 'default', name, tags, current_version, created_at, updated_at FROM apps"
    )
    op.execute(
        "INSERT INTO versions_v3 (id, workspace, app, version, filename, source, functions, "
        "created_at) SELECT id, 'default', app, version, filename, source, functions, created_at "
        "FROM versions"
    )
    op.drop_table("versions")
    op.drop_table("apps")
    op.rename_table("apps_v3", "apps")
    op.rename_table("versions_v3", "versions")
    if op.get_bind().dialect.name == "postgresql":  # the ids copied over: new ones follow them
        op.execute(
            "SELECT setval(pg_get_serial_sequence('versions', 'id'), COALESCE(MAX(id), 0) + 1, "
            "false) FROM versions"
        )

    with op.batch_alter_table("jobs") as batch:
        batch.add_column(_ws())
        batch.add_column(sa.Column("policy", sa.String(64)))
        batch.add_column(sa.Column("token", sa.String(64)))
        batch.add_column(sa.Column("tags", sa.Text))
    op.create_index("ix_jobs_workspace", "jobs", ["workspace"])
    for table in ("workers", "usage"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(_ws())
            batch.add_column(sa.Column("policy", sa.String(64)))
    op.create_index("ix_usage_policy", "usage", ["workspace", "policy", "start"])

    op.create_table(
        "policies",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("workspace", sa.String(64), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("alerted_period", sa.Float),
        sa.UniqueConstraint("workspace", "name"),
    )
    op.create_table(
        "secrets",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("workspace", sa.String(64), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("keys", sa.Text, nullable=False),
        sa.Column("ciphertext", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.UniqueConstraint("workspace", "name"),
    )
    op.create_table(
        "audit",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("workspace", sa.String(64)),
        sa.Column("actor", sa.String(140), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(255)),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("detail", sa.Text),
        sa.Column("ip", sa.String(64)),
    )
    op.create_index("ix_audit_ts", "audit", ["ts"])
    # Append-only below the API too: a stray UPDATE or DELETE fails instead of rewriting history.
    if op.get_bind().dialect.name == "sqlite":
        for verb in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER audit_no_{verb.lower()} BEFORE {verb} ON audit "
                "BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END"
            )
    elif op.get_bind().dialect.name == "postgresql":
        op.execute(PG_REFUSE)
        for verb in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER audit_no_{verb.lower()} BEFORE {verb} ON audit "
                "FOR EACH ROW EXECUTE FUNCTION audit_append_only()"
            )
        op.execute(
            "CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit "
            "FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only()"
        )


def downgrade() -> None:
    raise NotImplementedError("0003 rebuilt apps/versions with workspaces; restore a backup")
