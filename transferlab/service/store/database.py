"""Database URLs, engines and schema revisions of the results store.

URLs: ``None`` means ``$TRANSFERLAB_DB`` or ``sqlite:///transferlab.db`` in the working directory; a bare
path (``results.db``) is a SQLite file; ``postgresql://`` and ``postgres://`` use psycopg 3. To keep a
store in its own PostgreSQL schema, name it in the URL's ``options`` (libpq's ``-c`` settings), e.g.
``postgresql://user@host/db?options=-csearch_path%3Dmy_schema``; the schema must exist.

SQLite connections run in WAL mode with foreign keys on and a 30 s busy timeout, and transactions are
begun explicitly (``BEGIN``; ``BEGIN IMMEDIATE`` for writes), so that migrations (DDL) are transactional
too and concurrent writers wait for each other instead of failing.
"""

from __future__ import annotations

import os
import re
import sqlite3
from pathlib import Path
from typing import Any

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import URL, Engine, create_engine, event, inspect, make_url
from sqlalchemy.engine import Connection
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.pool import NullPool

DB_ENV_VAR = "TRANSFERLAB_DB"
DEFAULT_URL = "sqlite:///transferlab.db"
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000
VERSION_TABLE = "alembic_version"
_IMMEDIATE_OPTION = "transferlab_sqlite_immediate"


class StoreError(Exception):
    """The store cannot be opened, is at the wrong schema revision, or refused an operation."""


def resolve_url(url: str | None = None) -> URL:
    """Turn a ``--db`` value into a SQLAlchemy URL.

    Args:
        url: a SQLAlchemy URL, a bare SQLite file path, or ``None`` for ``$TRANSFERLAB_DB`` or the
            default ``sqlite:///transferlab.db``.

    Raises:
        StoreError: the URL cannot be parsed.
    """
    raw = (url or os.environ.get(DB_ENV_VAR) or DEFAULT_URL).strip()
    if "://" not in raw:
        return URL.create("sqlite", database=str(Path(raw).expanduser()))
    try:
        parsed = make_url(raw)
    except (ArgumentError, ValueError) as exc:  # a bad port is a ValueError
        raise StoreError(f"malformed database URL {mask_url(raw)}: {exc}") from exc
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def mask_url(url: str | URL) -> str:
    """The URL as text with its password replaced by ``***``."""
    if isinstance(url, URL):
        return url.render_as_string(hide_password=True)
    return re.sub(r"(://[^/@:]*:)[^/@]*@", r"\1***@", url)


def sqlite_file(url: URL) -> Path | None:
    """The file of a file-backed SQLite URL; ``None`` for an in-memory or non-SQLite database."""
    if url.get_backend_name() != "sqlite":
        return None
    database = url.database or ""
    if database.startswith("file:"):
        database = database[len("file:") :]
    if database in ("", ":memory:") or url.query.get("mode") == "memory":
        return None
    return Path(database).expanduser().resolve()


def create_store_engine(url: URL, *, readonly: bool = False) -> Engine:
    """An engine for the store; ``readonly`` engines are refused writes by the connection itself.

    Read-only SQLite opens the file with ``mode=ro``, sets ``query_only`` and allows no ``ATTACH`` (an
    attached file would be writable); read-only PostgreSQL sets ``default_transaction_read_only``.
    Read-only engines never pool connections, so a session setting cannot outlive one query.

    Raises:
        StoreError: the URL names an unknown dialect or a driver that is not installed.
    """
    masked = mask_url(url)
    kwargs: dict[str, Any] = {"poolclass": NullPool} if readonly else {"pool_pre_ping": True}
    backend = url.get_backend_name()
    if backend == "sqlite" and readonly:
        path = sqlite_file(url)
        if path is None:
            raise StoreError(f"a read-only query needs a SQLite file, not {masked}")
        url = URL.create("sqlite+pysqlite", database=f"file:{path}", query={"mode": "ro", "uri": "true"})
    elif backend == "postgresql":
        connect_args: dict[str, Any] = {}
        if "connect_timeout" not in url.query:
            connect_args["connect_timeout"] = 10
        if readonly:
            # connect_args replaces the URL's own options, so keep those (a search_path, say).
            options = url.query.get("options", "")
            options = " ".join(options) if isinstance(options, tuple) else options
            connect_args["options"] = f"{options} -c default_transaction_read_only=on".strip()
        kwargs["connect_args"] = connect_args
    try:
        engine = create_engine(url, **kwargs)
    except ImportError as exc:
        raise StoreError(
            f"cannot open {masked}: driver missing ({exc}); for PostgreSQL install 'transferlab[postgres]'"
        ) from exc
    except ArgumentError as exc:
        raise StoreError(f"cannot open {masked}: {exc}") from exc
    if backend == "sqlite":
        _configure_sqlite(engine, readonly=readonly)
    return engine


def _configure_sqlite(engine: Engine, *, readonly: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record: object) -> None:
        # pysqlite's own transaction handling skips DDL; turn it off and BEGIN ourselves (below).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        if readonly:
            cursor.execute("PRAGMA query_only = ON")
            dbapi_connection.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
        else:
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        # A deferred transaction that reads and then writes fails at once with "database is locked"
        # when another connection wrote in between (its snapshot is stale, so busy_timeout cannot
        # help); writers therefore take the write lock up front (see `writer`).
        immediate = connection.get_execution_options().get(_IMMEDIATE_OPTION, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def writer(engine: Engine) -> Engine:
    """The engine for write transactions: on SQLite they begin ``IMMEDIATE``, i.e. with the write lock."""
    return engine.execution_options(**{_IMMEDIATE_OPTION: True})


def describe_error(exc: BaseException) -> str:
    """The database's own message for ``exc`` on one line (SQLAlchemy wraps it in ``orig``)."""
    cause = getattr(exc, "orig", None) or exc
    return " ".join(str(cause).split())


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config for the bundled migrations, running on ``connection`` when given."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    config.set_main_option("path_separator", "os")
    config.attributes["connection"] = connection
    return config


def schema_revisions() -> tuple[str, list[str]]:
    """The head revision of the bundled migrations and every revision they know, newest first."""
    script = ScriptDirectory.from_config(alembic_config())
    head = script.get_current_head()
    if head is None:
        raise StoreError(f"no migrations found in {MIGRATIONS_DIR}")
    return head, [rev.revision for rev in script.walk_revisions()]


def current_revision(connection: Connection) -> tuple[str | None, list[str]]:
    """The database's Alembic revision (``None`` when unstamped) and its other table names."""
    tables = inspect(connection).get_table_names()
    if VERSION_TABLE not in tables:
        return None, tables
    try:
        revision = MigrationContext.configure(connection).get_current_revision()
    except CommandError as exc:
        raise StoreError(f"cannot read the schema revision: {exc}") from exc
    return revision, [t for t in tables if t != VERSION_TABLE]


def upgrade_to_head(engine: Engine) -> None:
    """Run ``alembic upgrade head`` in one transaction."""
    from alembic import command

    with writer(engine).begin() as connection:
        command.upgrade(alembic_config(connection), "head")


def check_revision(revision: str | None, tables: list[str], masked: str) -> str:
    """Decide what to do with a database at ``revision``: ``"ready"``, ``"empty"`` or ``"older"``.

    Raises:
        StoreError: tables without a revision (not a transferlab store) or an unknown revision.
    """
    head, known = schema_revisions()
    if revision is None:
        if tables:
            shown = ", ".join(sorted(tables)[:6]) + (", ..." if len(tables) > 6 else "")
            raise StoreError(
                f"{masked} has tables ({shown}) but no transferlab schema revision (no {VERSION_TABLE} "
                "row): it is not a transferlab store; point --db at an empty database or a transferlab store"
            )
        return "empty"
    if revision == head:
        return "ready"
    if revision in known:
        return "older"
    raise StoreError(
        f"the store at {masked} is at schema revision {revision!r}, which this transferlab does not know "
        f"(known: {', '.join(known)}); it was probably written by a newer transferlab, so upgrade transferlab"
    )


def connect_store(url: str | None, *, create: bool, upgrade: bool) -> tuple[Engine, str]:
    """An engine on a store at the current schema revision, and the masked URL (see ``Store.open``).

    Raises:
        StoreError: as documented by ``Store.open``.
    """
    parsed = resolve_url(url)
    masked = mask_url(parsed)
    path = sqlite_file(parsed)
    if path is not None and not path.exists():
        if not create:
            raise StoreError(f"no transferlab store at {masked}: {path} does not exist")
        if not path.parent.is_dir():
            raise StoreError(f"cannot create a store at {masked}: folder {path.parent} does not exist")
    engine = create_store_engine(parsed)
    try:
        with engine.connect() as connection:
            revision, tables = current_revision(connection)
        state = check_revision(revision, tables, masked)
        if state == "empty" and not create:
            raise StoreError(f"no transferlab store at {masked}: the database is empty")
        if state == "older" and not upgrade:
            raise StoreError(
                f"the store at {masked} is at schema revision {revision!r}, older than this "
                f"transferlab's; upgrade it with: transferlab db upgrade --db {masked}"
            )
        if state != "ready":
            upgrade_to_head(engine)
        return engine, masked
    except SQLAlchemyError as exc:
        engine.dispose()
        reason = describe_error(exc)
        if "no schema has been selected" in reason:
            reason += " (does the schema named by search_path in the URL's options exist?)"
        raise StoreError(f"cannot open transferlab store at {masked}: {reason}") from exc
    except BaseException:
        engine.dispose()
        raise
