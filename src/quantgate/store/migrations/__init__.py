"""Alembic migrations of the quantgate store, run by quantgate.store.open_store (no alembic.ini)."""
