"""Database URLs, engines and schema revisions of the results store.

URLs: ``None`` means ``$TRANSFERLAB_DB`` or ``sqlite:///transferlab.db`` in the working directory; a bare
path (``results.db``) is a SQLite file; ``postgresql://`` and ``postgres://`` use psycopg 3. To keep a
store in its own PostgreSQL schema, name it in the URL's ``options`` (libpq's ``-c`` settings), e.g.
``postgresql://user@host/db?options=-csearch_path%3Dmy_schema``; the schema must exist.

SQLite connections run in WAL mode with foreign keys on and a 30 s busy timeout, and transactions are
begun explicitly (``BEGIN``; ``BEGIN IMMEDIATE`` for writes), so that migrations (DDL) are transactional
too and concurrent writers wait for each other instead of failing.

Schema migrations are serialised between processes: on SQLite by ``BEGIN IMMEDIATE`` (one writer at a
time), on PostgreSQL by a transaction-level advisory lock taken before Alembic runs; either way the
revision is read again once the lock is held, so several processes opening an empty database at once
end with one schema, created once.

Passwords never leave this module in text: :func:`mask_url` hides the URL's password (and a
``password=`` query parameter), and every :class:`StoreError` built from a database message is passed
through :func:`redact` first.
"""

from __future__ import annotations

import os
import re
import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import URL, Engine, create_engine, event, inspect, make_url, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.pool import NullPool

DB_ENV_VAR = "TRANSFERLAB_DB"
DEFAULT_URL = "sqlite:///transferlab.db"
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000
VERSION_TABLE = "alembic_version"
_IMMEDIATE_OPTION = "transferlab_sqlite_immediate"
# pg_advisory_xact_lock(MIGRATION_LOCK_CLASS, hashtext(schema)): one migration at a time per schema.
MIGRATION_LOCK_CLASS = 0x7472_616E  # "tran"
# Query parameters that libpq (and so psycopg) reads as secrets.
_SECRET_QUERY_KEYS = ("password", "sslpassword")


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
        reason = redact(str(exc), raw)
        raise StoreError(f"malformed database URL {mask_url(raw)}: {reason}") from exc
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def mask_url(url: str | URL) -> str:
    """The URL as text with its password, and any ``password=`` query parameter, replaced by ``***``."""
    if isinstance(url, URL):
        text_url = url.render_as_string(hide_password=True)
    else:
        # Up to the last "@" of the authority: a password may hold characters a URL should escape.
        text_url = re.sub(r"^([^:/?#]*://[^:/?#@]*:)[^?#]*@", r"\1***@", url)
    keys = "|".join(_SECRET_QUERY_KEYS)
    return re.sub(rf"([?&](?:{keys})=)[^&#]*", r"\1***", text_url, flags=re.IGNORECASE)


def _secrets(url: str | URL) -> list[str]:
    """The secret values a URL carries, as given and URL-encoded, longest first."""
    values: list[str] = []
    if isinstance(url, str):
        try:
            url = make_url(url)
        except (ArgumentError, ValueError):  # unparsable: take what looks like a password
            found = re.match(r"^[^:/?#]*://[^:/?#@]*:([^?#]*)@", url)
            values = [found.group(1)] if found else []
            url = None
    if url is not None:
        if url.password:
            values.append(str(url.password))
        for key in _SECRET_QUERY_KEYS:
            value = url.query.get(key)
            values.extend([value] if isinstance(value, str) else list(value or ()))
    encoded = [f(v) for v in values for f in (quote, quote_plus)]
    return sorted({v for v in values + encoded if v}, key=len, reverse=True)


def redact(message: str, url: str | URL) -> str:
    """``message`` with every secret of ``url`` (its password, plain or URL-encoded) replaced by ``***``.

    A secret of fewer than four characters is replaced only where it stands alone, so that a one-letter
    password does not garble the rest of the message.
    """
    for secret in _secrets(url):
        if len(secret) >= 4:
            message = message.replace(secret, "***")
        else:
            message = re.sub(rf"(?<![\w]){re.escape(secret)}(?![\w])", "***", message)
    return message


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
            f"cannot open {masked}: driver missing ({redact(str(exc), url)}); "
            "for PostgreSQL install 'transferlab[postgres]'"
        ) from exc
    except (ArgumentError, TypeError, ValueError) as exc:
        raise StoreError(f"cannot open {masked}: {describe_error(exc, url)}") from exc
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

    if readonly:
        # Read-only connections run each statement in autocommit mode: the one statement a read-only
        # query runs is consistent by itself, and the authorizer it runs under allows no BEGIN.
        return

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


def describe_error(exc: BaseException, url: str | URL | None = None) -> str:
    """The database's own message for ``exc`` on one line (SQLAlchemy wraps it in ``orig``).

    With ``url``, the URL's secrets are redacted from the message (see :func:`redact`).
    """
    cause = getattr(exc, "orig", None) or exc
    message = " ".join(str(cause).split())
    return message if url is None else redact(message, url)


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


def _older_refused(revision: str | None, masked: str) -> StoreError:
    return StoreError(
        f"the store at {masked} is at schema revision {revision!r}, older than this "
        f"transferlab's; upgrade it with: transferlab db upgrade --db {masked}"
    )


def upgrade_to_head(engine: Engine, masked: str | None = None, *, older: bool = True) -> bool:
    """Run ``alembic upgrade head`` in one transaction, serialised against other processes.

    On PostgreSQL a transaction-level advisory lock (per schema) is taken first; on SQLite the
    transaction begins ``IMMEDIATE``, i.e. holding the database's write lock. The revision is then read
    again under the lock, so a process that waited for another's migration finds the schema ready and
    does nothing. Returns whether this call ran any migration.

    Args:
        engine: the store's engine.
        masked: the URL for messages (default: the engine's, masked).
        older: migrate a store at an older revision; when false only an empty database is migrated
            (``Store.open`` without ``upgrade``) and an older one is refused.

    Raises:
        StoreError: the database holds other tables or an unknown revision (see ``check_revision``), or
            an older revision and ``older`` is false.
    """
    from alembic import command

    masked = masked or mask_url(engine.url)
    with writer(engine).begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(
                text(
                    "SELECT pg_advisory_xact_lock(CAST(:cls AS integer), "
                    "hashtext(coalesce(current_schema(), '')))"
                ),
                {"cls": MIGRATION_LOCK_CLASS},
            )
        revision, tables = current_revision(connection)
        state = check_revision(revision, tables, masked)
        if state == "ready":
            return False
        if state == "older" and not older:
            raise _older_refused(revision, masked)
        command.upgrade(alembic_config(connection), "head")
        return True


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
            raise _older_refused(revision, masked)
        if state != "ready":
            upgrade_to_head(engine, masked, older=upgrade)
        return engine, masked
    except SQLAlchemyError as exc:
        engine.dispose()
        reason = describe_error(exc, parsed)
        if "no schema has been selected" in reason:
            reason += " (does the schema named by search_path in the URL's options exist?)"
        raise StoreError(f"cannot open transferlab store at {masked}: {reason}") from exc
    except BaseException:
        engine.dispose()
        raise
