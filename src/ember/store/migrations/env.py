"""Alembic environment: runs on the connection `ember.store.db.migrate` hands it."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from ember.store.tables import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # `alembic` on the command line: EMBER_DB_URL or ./.ember
    import os

    from ember import config

    url = os.environ.get("EMBER_DB_URL") or f"sqlite:///{config.data_dir() / 'ember.db'}"
    connection = create_engine(url).connect()

context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
