"""Alembic environment of the quantgate store. It runs only through quantgate.store.open_store,
which hands in a connection (config.attributes["connection"]) already inside a transaction that
holds the store's write lock; every migration step joins that transaction."""

from alembic import context

from quantgate.store.schema import VERSION_TABLE, metadata


def run_migrations() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("the store's migrations run from quantgate.store.open_store, with a connection")
    # render_as_batch: SQLite alters tables by copying them (ALTER COLUMN does not exist there)
    context.configure(connection=connection, target_metadata=metadata, version_table=VERSION_TABLE,
                      render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


run_migrations()
