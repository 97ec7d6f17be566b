"""Read-only SQL over a store, enforced by the database connection, never by reading the SQL text.

SQLite: the file is opened with ``mode=ro``, ``PRAGMA query_only`` is on and ``ATTACH`` is disabled (an
attached file would be writable, and ``VACUUM INTO`` would write a new one). PostgreSQL: the session
has ``default_transaction_read_only=on``, the transaction is ``READ ONLY`` and has taken its snapshot
(after which it cannot be switched to read-write), and the statement is sent as a prepared statement,
which the server refuses to hold several commands (so ``SET TRANSACTION READ WRITE; DELETE ...`` fails).
The transaction is always rolled back and the connection is never reused.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import pandas as pd
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from transferlab.service.store.database import (
    StoreError,
    create_store_engine,
    describe_error,
    mask_url,
    resolve_url,
    sqlite_file,
)

# SQLSTATE: read_only_sql_transaction, and active_sql_transaction ("read-write mode must be set
# before any query"), which is what switching a read-only transaction to read-write raises.
_PG_READ_ONLY_STATES = {"25006", "25001"}


def run_readonly_query(url: str | None, sql: str) -> pd.DataFrame:
    """Run one SQL statement on the store at ``url`` without any power to change it.

    Args:
        url: as for :meth:`Store.open`; a SQLite file must already exist (it is never created).
        sql: one statement; its ``%`` and ``:name`` are sent as they are, not as parameters.

    Returns:
        The rows with the statement's column names; an empty frame when it returns no rows.

    Raises:
        StoreError: ``"query is read-only: <database message>"`` for any attempt to write, otherwise
            the database's message for a bad statement or an unreachable store.
    """
    parsed = resolve_url(url)
    masked = mask_url(parsed)
    path = sqlite_file(parsed)
    if parsed.get_backend_name() == "sqlite" and (path is None or not path.is_file()):
        raise StoreError(
            f"no transferlab store at {masked}: {path or 'an in-memory database'} has no data to query"
        )
    engine = create_store_engine(parsed, readonly=True)
    try:
        with engine.connect() as connection:
            dbapi_error = connection.dialect.loaded_dbapi.Error
            try:
                return _execute(connection, sql)
            except dbapi_error as exc:
                if _is_write_refusal(exc):
                    raise StoreError(f"query is read-only: {describe_error(exc)}") from exc
                raise StoreError(f"query failed: {describe_error(exc)}") from exc
            finally:
                connection.rollback()
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot query {masked}: {describe_error(exc)}") from exc
    finally:
        engine.dispose()


def _execute(connection: Connection, sql: str) -> pd.DataFrame:
    postgres = connection.dialect.name == "postgresql"
    if postgres:
        connection.exec_driver_sql("SET TRANSACTION READ ONLY")
        connection.exec_driver_sql("SELECT 1")  # takes the snapshot: no switching to read-write after it
    # The DBAPI cursor runs the text verbatim; SQLAlchemy's text() would read ":name" as a parameter.
    cursor: Any = connection.connection.driver_connection.cursor()
    try:
        if postgres:
            cursor.execute(sql, prepare=True)  # extended protocol: one statement only
        else:
            cursor.execute(sql)  # sqlite3 runs one statement only
        if cursor.description is None:
            return pd.DataFrame()
        columns = [column[0] for column in cursor.description]
        return pd.DataFrame(cursor.fetchall(), columns=columns)
    finally:
        cursor.close()


def _is_write_refusal(exc: BaseException) -> bool:
    if getattr(exc, "sqlstate", None) in _PG_READ_ONLY_STATES:
        return True
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF == sqlite3.SQLITE_READONLY
