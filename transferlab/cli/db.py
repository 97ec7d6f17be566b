"""``db upgrade``: bring a store's schema to this transferlab's revision (Alembic migrations)."""

from __future__ import annotations

import click

from transferlab.cli.options import console, db_option


@click.group()
def db() -> None:
    """Manage the store's schema."""


@db.command()
@db_option
def upgrade(db: str | None) -> None:
    """Apply every pending migration to the store (creating the schema in an empty database)."""
    from transferlab.service.store import Store
    from transferlab.service.store.database import current_revision

    store = Store.open(db, create=True, upgrade=True)
    try:
        with store.engine.connect() as connection:
            revision, _ = current_revision(connection)
    finally:
        store.close()
    console().print(f"store at {store.url} is at schema revision [bold]{revision}[/] (the newest)")
