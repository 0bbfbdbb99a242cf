"""Persistence: SQLAlchemy tables, Alembic migrations, and a batching writer."""
