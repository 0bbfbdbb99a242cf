"""Alembic environment: runs on the connection `ember.store.db.migrate` hands it."""

from __future__ import annotations

from alembic import context

from ember.store.tables import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # the `alembic` command line: EMBER_DATABASE_URL, else ./.ember
    from ember import config
    from ember.store.db import env_url, make_engine, sqlite_url

    connection = make_engine(env_url() or sqlite_url(config.data_dir())).connect()

context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
