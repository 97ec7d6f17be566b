"""Read-only SQL over a store, enforced by the database connection, never by reading the SQL text.

SQLite: the file is opened with ``mode=ro``, ``PRAGMA query_only`` is on, ``ATTACH`` is disabled (an
attached file would be writable, and ``VACUUM INTO`` would write a new one), and an authorizer
(``sqlite3.Connection.set_authorizer``) lets the statement do nothing but read: SQLite asks it about
every action while it compiles the statement, and everything except ``SELECT``, reading a column,
calling a function (not ``load_extension``), a recursive CTE and the pragmas that only describe the
schema (``PRAGMA table_info(trials)``) is refused. The ``sqlite3`` module runs one statement per call
and refuses a second one.

PostgreSQL: the session has ``default_transaction_read_only=on``; the transaction is ``READ ONLY``, has a
``statement_timeout`` and has taken its snapshot (after which it cannot be switched to read-write); a
superuser's transaction drops to the predefined role ``pg_read_all_data`` (so no superuser-only
function, ``COPY ... TO`` a file or a program, or ``lo_export`` can run); and the statement is run
through a cursor, ``DECLARE ... CURSOR FOR <statement>`` sent as one prepared statement, which the server
accepts only for a single query (``SELECT``, ``WITH ... SELECT``, ``VALUES``, ``TABLE``): no ``COPY``,
``DO``, ``SET``, ``LOCK``, ``NOTIFY`` or a second command.

Either way the statement has a time limit, the transaction is rolled back and the connection is closed.
A superuser can still ``set_config('role', ...)`` back to itself inside a statement; SQL from people who
must not have the store's own rights should run as a PostgreSQL role that has only ``SELECT`` on it.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import Any

import pandas as pd
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from transferlab.service.store.database import (
    StoreError,
    create_store_engine,
    describe_error,
    mask_url,
    redact,
    resolve_url,
    sqlite_file,
)

DEFAULT_TIMEOUT_S = 30.0
CURSOR_NAME = "transferlab_query"
_DECLARE = f"DECLARE {CURSOR_NAME} NO SCROLL CURSOR FOR "

# SQLSTATE: read_only_sql_transaction, active_sql_transaction ("read-write mode must be set before any
# query", what switching a read-only transaction to read-write raises), insufficient_privilege.
_PG_READ_ONLY_STATES = {"25006", "25001", "42501"}
_PG_SYNTAX_ERROR = "42601"
_PG_QUERY_CANCELED = "57014"
_PG_NOT_SUPPORTED = "0A000"  # e.g. "DECLARE CURSOR must not contain data-modifying statements in WITH"

# What a read-only SQLite statement may do; every other authorizer action is denied.
_SQLITE_ALLOWED = {
    sqlite3.SQLITE_SELECT,
    sqlite3.SQLITE_READ,
    sqlite3.SQLITE_FUNCTION,
    sqlite3.SQLITE_RECURSIVE,
}
_SQLITE_DENIED_FUNCTIONS = {"load_extension"}
# Pragmas that only describe the schema and have no form that sets anything: analysts may run them.
_SQLITE_SCHEMA_PRAGMAS = {
    "table_info",
    "table_xinfo",
    "table_list",
    "index_list",
    "index_info",
    "index_xinfo",
    "foreign_key_list",
    "collation_list",
    "function_list",
    "module_list",
    "pragma_list",
}
# Authorizer action codes by name, for the message that says what was refused.
_SQLITE_ACTIONS = """CREATE_INDEX CREATE_TABLE CREATE_TEMP_INDEX CREATE_TEMP_TABLE CREATE_TEMP_TRIGGER
CREATE_TEMP_VIEW CREATE_TRIGGER CREATE_VIEW DELETE DROP_INDEX DROP_TABLE DROP_TEMP_INDEX DROP_TEMP_TABLE
DROP_TEMP_TRIGGER DROP_TEMP_VIEW DROP_TRIGGER DROP_VIEW INSERT PRAGMA READ SELECT TRANSACTION UPDATE ATTACH
DETACH ALTER_TABLE REINDEX ANALYZE CREATE_VTABLE DROP_VTABLE FUNCTION SAVEPOINT RECURSIVE""".split()
_SQLITE_ACTION_NAMES = {
    getattr(sqlite3, f"SQLITE_{name}"): name for name in _SQLITE_ACTIONS if hasattr(sqlite3, f"SQLITE_{name}")
}
_SQLITE_PROGRESS_STEPS = 10_000  # virtual-machine instructions between two looks at the clock


class _SqliteGuard:
    """The authorizer and the time limit of one read-only SQLite connection, and what they refused."""

    def __init__(self) -> None:
        self.denied: str | None = None
        self.deadline: float | None = None
        self.timed_out = False

    def authorize(self, action: int, arg1: str | None, arg2: str | None, *_: Any) -> int:
        if action in _SQLITE_ALLOWED and not (
            action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() in _SQLITE_DENIED_FUNCTIONS
        ):
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_PRAGMA and (arg1 or "").lower() in _SQLITE_SCHEMA_PRAGMAS:
            return sqlite3.SQLITE_OK
        if self.denied is None:
            what = _SQLITE_ACTION_NAMES.get(action, f"action {action}")
            target = " ".join(str(a) for a in (arg1, arg2) if a)
            self.denied = f"{what} {target}".strip()
        return sqlite3.SQLITE_DENY

    def progress(self) -> int:
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.timed_out = True
            return 1  # interrupts the statement
        return 0


def run_readonly_query(url: str | None, sql: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> pd.DataFrame:
    """Run one SQL statement on the store at ``url`` without any power to change it.

    Args:
        url: as for :meth:`Store.open`; a SQLite file must already exist (it is never created).
        sql: one statement; its ``%`` and ``:name`` are sent as they are, not as parameters.
        timeout_s: the statement is cancelled after this many seconds.

    Returns:
        The rows with the statement's column names; an empty frame when it returns no rows.

    Raises:
        StoreError: ``"query is read-only: <reason>"`` for any attempt to write or to run anything but
            one query, ``"query timed out after <n> s ..."`` past ``timeout_s``, otherwise the database's
            message for a bad statement or an unreachable store.
    """
    if not timeout_s > 0:
        raise StoreError(f"the query timeout must be a positive number of seconds, not {timeout_s!r}")
    parsed = resolve_url(url)
    masked = mask_url(parsed)
    path = sqlite_file(parsed)
    if parsed.get_backend_name() == "sqlite" and (path is None or not path.is_file()):
        raise StoreError(
            f"no transferlab store at {masked}: {path or 'an in-memory database'} has no data to query"
        )
    engine = create_store_engine(parsed, readonly=True)
    guard = _SqliteGuard()
    if engine.dialect.name == "sqlite":
        _guard_sqlite_connections(engine, guard)
    try:
        with engine.connect() as connection:
            dbapi_error = connection.dialect.loaded_dbapi.Error
            try:
                if connection.dialect.name == "postgresql":
                    return _execute_postgres(connection, sql, timeout_s)
                return _execute_sqlite(connection, sql, timeout_s, guard)
            except dbapi_error as exc:
                raise _query_error(exc, sql, guard, timeout_s, parsed) from exc
            finally:
                connection.rollback()
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot query {masked}: {describe_error(exc, parsed)}") from exc
    finally:
        engine.dispose()


def _guard_sqlite_connections(engine: Any, guard: _SqliteGuard) -> None:
    from sqlalchemy import event

    # Registered after create_store_engine's own "connect" listener (its pragmas run first), so the
    # authorizer governs everything the connection runs from then on.
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record: object) -> None:
        dbapi_connection.set_authorizer(guard.authorize)
        dbapi_connection.set_progress_handler(guard.progress, _SQLITE_PROGRESS_STEPS)


def _execute_sqlite(connection: Connection, sql: str, timeout_s: float, guard: _SqliteGuard) -> pd.DataFrame:
    guard.deadline = time.monotonic() + timeout_s
    cursor: Any = connection.connection.driver_connection.cursor()
    try:
        return _frame(cursor, lambda: cursor.execute(sql))  # sqlite3 runs one statement only
    finally:
        cursor.close()


def _execute_postgres(connection: Connection, sql: str, timeout_s: float) -> pd.DataFrame:
    connection.exec_driver_sql("SET TRANSACTION READ ONLY")
    connection.exec_driver_sql(f"SET LOCAL statement_timeout = {max(1, round(timeout_s * 1000))}")
    superuser = connection.exec_driver_sql(
        "SELECT rolsuper AND to_regrole('pg_read_all_data') IS NOT NULL FROM pg_roles "
        "WHERE rolname = current_user"
    ).scalar()
    if superuser:
        # Keep the schemas the statement resolves names in ("$user" would follow the new role).
        connection.exec_driver_sql(
            "SELECT set_config('search_path', "
            "coalesce((SELECT string_agg(quote_ident(s), ', ') FROM unnest(current_schemas(false)) s), "
            "''), true)"
        )
        connection.exec_driver_sql("SET LOCAL ROLE pg_read_all_data")
    connection.exec_driver_sql("SELECT 1")  # takes the snapshot: no switching to read-write after it
    # The DBAPI cursor runs the text verbatim; SQLAlchemy's text() would read ":name" as a parameter.
    cursor: Any = connection.connection.driver_connection.cursor()
    try:
        # Extended protocol (prepare=True): one command only, and DECLARE takes nothing but a query.
        cursor.execute(_DECLARE + sql, prepare=True)
        return _frame(cursor, lambda: cursor.execute(f"FETCH ALL FROM {CURSOR_NAME}"))
    finally:
        cursor.close()


def _frame(cursor: Any, run: Callable[[], Any]) -> pd.DataFrame:
    run()
    if cursor.description is None:
        return pd.DataFrame()
    columns = [column[0] for column in cursor.description]
    return pd.DataFrame(cursor.fetchall(), columns=columns)


def _query_error(exc: BaseException, sql: str, guard: _SqliteGuard, timeout_s: float, url: Any) -> StoreError:
    """The StoreError for a database error raised by the user's statement."""
    reason = redact(_pg_message(exc) or describe_error(exc), url)
    state = getattr(exc, "sqlstate", None)
    code = getattr(exc, "sqlite_errorcode", None)
    if state == _PG_QUERY_CANCELED or guard.timed_out:
        return StoreError(
            f"query timed out after {timeout_s:g} s and was cancelled ({reason}); "
            "narrow it (WHERE, LIMIT) or allow more time"
        )
    if state in _PG_READ_ONLY_STATES:
        return StoreError(f"query is read-only: {reason}")
    if state == _PG_NOT_SUPPORTED and reason.startswith("DECLARE CURSOR"):
        return StoreError(f"query is read-only: {reason.replace('DECLARE CURSOR', 'a query', 1)}")
    if guard.denied is not None:  # the authorizer refused something: a write, a PRAGMA, ATTACH, ...
        return StoreError(
            f"query is read-only: {reason} (refused: {guard.denied}); only a single SELECT may run"
        )
    if code is not None and code & 0xFF in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_AUTH):
        return StoreError(f"query is read-only: {reason}")
    if isinstance(exc, sqlite3.ProgrammingError) and "one statement" in reason:
        return StoreError(f"query is read-only: {reason}")
    if state == _PG_SYNTAX_ERROR and "multiple commands" in reason:
        return StoreError(f"query is read-only: one statement at a time ({reason})")
    if state == _PG_SYNTAX_ERROR and _error_at_first_word(exc, sql):
        first = sql.split()[0] if sql.split() else ""
        return StoreError(
            "query is read-only: only a single query (SELECT, WITH ... SELECT, VALUES or TABLE) may run, "
            f"not {first!r} ({reason})"
        )
    return StoreError(f"query failed: {reason}")


def _pg_message(exc: BaseException) -> str | None:
    """A PostgreSQL error's primary message and hint, without the DECLARE the query was wrapped in."""
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None)
    if not primary:
        return None
    hint = getattr(diag, "message_hint", None)
    return " ".join(f"{primary}{f' (hint: {hint})' if hint else ''}".split())


def _error_at_first_word(exc: BaseException, sql: str) -> bool:
    """Whether a PostgreSQL syntax error points at the first word of the user's statement."""
    position = getattr(getattr(exc, "diag", None), "statement_position", None)
    if not position:
        return False
    return int(position) - 1 == len(_DECLARE) + len(sql) - len(sql.lstrip())
