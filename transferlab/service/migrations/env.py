"""Alembic environment for the transferlab store.

transferlab runs Alembic programmatically (``transferlab.service.store.database.alembic_config``): the
caller opens a connection and passes it in ``config.attributes["connection"]``, so the store's engine
settings (SQLite pragmas, PostgreSQL ``search_path``) apply to migrations too. With no connection, the
URL comes from the ``sqlalchemy.url`` option; offline mode (``--sql``) renders the SQL for a DBA.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.engine import Connection

from transferlab.service.store.models import Base

config = context.config
target_metadata = Base.metadata


def run_with_connection(connection: Connection) -> None:
    """Run the migrations on an open connection, inside its transaction if it has one."""
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def run_offline() -> None:
    """Render the migrations as SQL without a database."""
    context.configure(
        url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata, literal_binds=True
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    """Run the migrations on the caller's connection, or on one opened from ``sqlalchemy.url``."""
    connection = config.attributes.get("connection")
    if connection is not None:
        run_with_connection(connection)
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url"))
    try:
        with engine.begin() as connection:
            run_with_connection(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
