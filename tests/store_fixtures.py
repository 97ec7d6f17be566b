"""Store fixtures shared by the store, concurrency, security and report tests: a fresh store per test,
SQLite and PostgreSQL.

Test modules load them with ``pytest_plugins = ["store_fixtures"]`` (so pytest rewrites their asserts).

PostgreSQL isolation: each test session creates its own schema ``tl_test_<random hex>`` in the database
of ``$TRANSFERLAB_TEST_PG_URL`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``), empties
it before every test, hands tests a URL whose ``options=-csearch_path=<schema>`` points every connection
at it, and drops it at the end. An unreachable server skips the PostgreSQL tests, unless
``TRANSFERLAB_REQUIRE_POSTGRES=1`` (CI), which fails them.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import URL, Engine, create_engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from transferlab.service.store import Store, mask_url, resolve_url

PG_URL_ENV = "TRANSFERLAB_TEST_PG_URL"
REQUIRE_PG_ENV = "TRANSFERLAB_REQUIRE_POSTGRES"
DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@dataclass(frozen=True)
class PgSchema:
    """The session's own PostgreSQL schema and a URL that points connections at it."""

    admin: Engine
    name: str
    url: URL

    def reset(self) -> None:
        """Drop everything in the schema."""
        with self.admin.begin() as connection:
            connection.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{self.name}" CASCADE')
            connection.exec_driver_sql(f'CREATE SCHEMA "{self.name}"')


@pytest.fixture(scope="session")
def pg_schema() -> Iterator[PgSchema]:
    """Create this session's schema, or skip (fail under TRANSFERLAB_REQUIRE_POSTGRES=1) without a server."""
    base = resolve_url(os.environ.get(PG_URL_ENV, DEFAULT_PG_URL))
    admin = create_engine(base, poolclass=NullPool, connect_args={"connect_timeout": 5})
    schema = PgSchema(admin, f"tl_test_{secrets.token_hex(6)}", base)
    try:
        schema.reset()
    except SQLAlchemyError as exc:
        admin.dispose()
        reason = " ".join(str(getattr(exc, "orig", None) or exc).split())
        message = f"PostgreSQL not reachable at {mask_url(base)}: {reason}"
        if os.environ.get(REQUIRE_PG_ENV) == "1":
            pytest.fail(message)
        pytest.skip(message)
    url = base.update_query_dict({"options": f"-csearch_path={schema.name}"})
    yield PgSchema(admin, schema.name, url)
    with admin.begin() as connection:
        connection.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema.name}" CASCADE')
    admin.dispose()


@pytest.fixture
def pg_url(pg_schema: PgSchema) -> str:
    """A URL of an empty PostgreSQL schema, emptied again for every test."""
    pg_schema.reset()
    return pg_schema.url.render_as_string(hide_password=False)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty database: a SQLite file in tmp_path, or the session's PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    """A freshly created store."""
    with Store.open(db_url) as opened:
        yield opened
