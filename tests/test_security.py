"""Security: read-only `query` on both backends, secrets kept out of messages and logs, no unpickling.

1. ``run_readonly_query`` (what ``transferlab query`` runs) cannot change the store: every write, DDL,
   ``ATTACH``/``PRAGMA``/``VACUUM INTO`` (SQLite), ``COPY``/``DO``/role tricks (PostgreSQL) and
   multi-statement input is refused with ``query is read-only: ...``; a runaway statement is cancelled
   at its time limit; and the rows are still there afterwards.
2. Database passwords never appear in error messages, ``Store.url``, logs or CLI output.
3. A malicious pickle given to any loader of a user-supplied path is never executed, and no source file
   of the package can unpickle: a scan of its syntax trees finds no pickle/yaml/torch loading that
   could run code.
"""

from __future__ import annotations

import ast
import logging
import os
import pickle
import re
import secrets
import shlex
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from sqlalchemy import inspect, make_url, text
from store_helpers import make_experiment, trial

from transferlab.cli.main import cli
from transferlab.service.store import Store, StoreError, database, mask_url, run_readonly_query

pytest_plugins = ["store_fixtures"]  # db_url, pg_url, store

PACKAGE = Path(__file__).resolve().parent.parent / "transferlab"
READ_ONLY = "^query is read-only: "
TIMED_OUT = "^query timed out after "


# -- 1. read-only query ---------------------------------------------------------------------------


def snapshot(store: Store) -> dict[str, object]:
    """Everything a refused statement could have changed: row counts, values, tables, indexes."""
    with store.engine.connect() as connection:
        inspector = inspect(connection)
        tables = sorted(inspector.get_table_names())
        return {
            "tables": tables,
            "indexes": {t: sorted(ix["name"] for ix in inspector.get_indexes(t)) for t in tables},
            "columns": {t: [c["name"] for c in inspector.get_columns(t)] for t in tables},
            "rows": {t: connection.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() for t in tables},
            "trials": connection.execute(text("SELECT id, key, depth FROM trials ORDER BY id")).all(),
            "version": connection.execute(text("SELECT version_num FROM alembic_version")).all(),
        }


@pytest.fixture
def filled(store: Store) -> Iterator[Store]:
    """The store with an experiment, a base and a transfer trial, and metric rows."""
    exp_id = make_experiment(store)
    ids = store.add_trials(exp_id, [trial("b", "baseB"), trial("t", "BnB", 1, base_key="b")])
    store.add_metrics(ids["b"], [(1, "val", "accuracy", 0.5), (1, "test", "accuracy", 0.75)])
    store.add_metrics(ids["t"], [(1, "test", "accuracy", 0.625)])
    yield store


REFUSED_ON_BOTH = [
    "INSERT INTO trials (experiment_id, key) VALUES (1, 'x')",
    "INSERT INTO metrics (trial_id, epoch, split, name) SELECT trial_id, 9, split, name FROM metrics",
    "UPDATE trials SET depth = 7",
    "DELETE FROM trials",
    "DELETE FROM metrics WHERE value < 1",
    "DROP TABLE metrics",
    "DROP INDEX ix_metrics_trial_id_split_name",
    "CREATE TABLE trials_copy AS SELECT * FROM trials",
    "CREATE TABLE sneaky (x INTEGER)",
    "CREATE INDEX ix_sneaky ON trials (seed)",
    "CREATE VIEW v AS SELECT 1 AS one",
    "ALTER TABLE trials ADD COLUMN sneaky INTEGER",
    "ALTER TABLE trials RENAME TO trials_gone",
    "UPDATE alembic_version SET version_num = 'x'",
    "SELECT 1; DELETE FROM trials",
    "DELETE FROM trials; SELECT 1",
    "SELECT 1; SELECT 2",
    "SELECT 1;\nDROP TABLE metrics;",
    "BEGIN",
]


def assert_refused(
    url: str, store: Store, statements: list[str], check: Callable[[], list[str]] | None = None
) -> None:
    """Each statement is refused as read-only and leaves the store (and ``check``) as it was."""
    problems = []
    before = snapshot(store)
    for statement in statements:
        try:
            run_readonly_query(url, statement)
            problems.append(f"{statement!r} ran")
        except StoreError as exc:
            if not re.match(READ_ONLY, str(exc)):
                problems.append(f"{statement!r} was not refused as read-only: {exc}")
        after = snapshot(store)
        if after != before:
            problems.append(f"{statement!r} changed the store")
            before = after
        problems += [f"{statement!r}: {problem}" for problem in (check() if check else [])]
    assert not problems, "\n".join(problems)


def test_query_refuses_writes_and_several_statements(filled: Store, db_url: str) -> None:
    assert_refused(db_url, filled, REFUSED_ON_BOTH)


def test_query_still_reads_joins_ctes_and_values(filled: Store, db_url: str) -> None:
    joined = run_readonly_query(
        db_url,
        "WITH best AS (SELECT trial_id, max(value) AS top FROM metrics WHERE split = 'test' "
        "GROUP BY trial_id) "
        "SELECT t.key, e.name, b.top FROM best b JOIN trials t ON t.id = b.trial_id "
        "JOIN experiments e ON e.id = t.experiment_id LEFT JOIN trials base ON base.id = t.base_trial_id "
        "ORDER BY t.key",
    )
    assert joined.to_dict("list") == {"key": ["b", "t"], "name": ["demo", "demo"], "top": [0.75, 0.625]}
    counted = run_readonly_query(
        db_url,
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 10) "
        "SELECT sum(n) AS s FROM r",
    )
    assert counted["s"].tolist() == [55]
    assert run_readonly_query(db_url, "VALUES (1, 'a')").shape == (1, 2)
    assert run_readonly_query(db_url, "SELECT count(*) AS n FROM metrics -- a trailing comment")[
        "n"
    ].tolist() == [3]


def test_query_timeout_must_be_positive(filled: Store, db_url: str) -> None:
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(StoreError, match="timeout must be a positive number"):
            run_readonly_query(db_url, "SELECT 1", timeout_s=bad)


# SQLite ------------------------------------------------------------------------------------------


def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    with Store.open(url) as store:
        exp_id = make_experiment(store)
        store.add_trials(exp_id, [trial("b", "baseB")])
    return url


SQLITE_REFUSED = [
    "ATTACH DATABASE '{dir}/attached.db' AS other",
    "VACUUM INTO '{dir}/copy.db'",
    "VACUUM",
    "PRAGMA journal_mode = DELETE",
    "PRAGMA user_version = 7",
    "PRAGMA query_only = OFF",
    "PRAGMA writable_schema = ON",
    "PRAGMA foreign_keys = OFF",
    "PRAGMA wal_checkpoint(TRUNCATE)",
    "PRAGMA database_list",
    "REINDEX",
    "ANALYZE",
    "SAVEPOINT s",
    "CREATE TEMP TABLE t AS SELECT 1",
    "CREATE TEMP VIEW v AS SELECT 1",
    "CREATE TRIGGER tr AFTER INSERT ON trials BEGIN SELECT 1; END",
    "CREATE VIRTUAL TABLE vt USING fts5(x)",
    "SELECT load_extension('{dir}/evil')",
    "DETACH DATABASE main",
]


def test_sqlite_query_refuses_attach_pragma_vacuum_into_and_more(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    data = tmp_path / "data"
    data.mkdir()

    def unchanged() -> list[str]:
        problems = [f"wrote {p.name}" for p in data.iterdir()]
        raw = sqlite3.connect(tmp_path / "store.db")  # not through Store.open, which sets WAL itself
        try:
            if raw.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                problems.append("changed journal_mode")
            if raw.execute("PRAGMA user_version").fetchone()[0] != 0:
                problems.append("changed user_version")
        finally:
            raw.close()
        return problems

    with Store.open(url) as store:
        assert_refused(url, store, [statement.format(dir=data) for statement in SQLITE_REFUSED], unchanged)


def test_sqlite_query_names_what_it_refused(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    with pytest.raises(StoreError, match=r"refused: INSERT trials\)"):
        run_readonly_query(url, "INSERT INTO trials (key) VALUES ('x')")
    with pytest.raises(StoreError, match=r"refused: PRAGMA journal_mode"):
        run_readonly_query(url, "PRAGMA journal_mode = DELETE")
    with pytest.raises(StoreError, match="one statement at a time"):  # sqlite3's own refusal
        run_readonly_query(url, "SELECT 1; SELECT 2")


def test_sqlite_query_may_describe_the_schema(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    columns = run_readonly_query(url, "PRAGMA table_info(trials)")
    assert "experiment_id" in columns["name"].tolist()
    assert (
        "ix_trials_experiment_id_status"
        in run_readonly_query(url, "PRAGMA index_list(trials)")["name"].tolist()
    )
    master = run_readonly_query(url, "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
    assert master["name"].tolist() == ["alembic_version", "experiments", "metrics", "trials"]


def test_sqlite_query_is_cancelled_at_its_time_limit(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    started = time.monotonic()
    with pytest.raises(StoreError, match=TIMED_OUT + "0.3 s"):
        run_readonly_query(
            url,
            "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r",
            timeout_s=0.3,
        )
    assert time.monotonic() - started < 5
    assert run_readonly_query(url, "SELECT count(*) AS n FROM trials", timeout_s=0.3)["n"].tolist() == [1]


def test_sqlite_execute_runs_one_statement_only() -> None:
    # What the SQLite side relies on, checked on the module itself.
    connection = sqlite3.connect(":memory:")
    with pytest.raises(sqlite3.ProgrammingError, match="one statement at a time"):
        connection.execute("SELECT 1; SELECT 2")
    connection.close()


# PostgreSQL --------------------------------------------------------------------------------------


@pytest.fixture
def pg_store(pg_url: str) -> Iterator[Store]:
    with Store.open(pg_url) as store:
        exp_id = make_experiment(store)
        store.add_trials(exp_id, [trial("b", "baseB")])
        yield store


def is_superuser(store: Store) -> bool:
    with store.engine.connect() as connection:
        return bool(
            connection.exec_driver_sql("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").scalar()
        )


POSTGRES_REFUSED = [
    "COPY (SELECT 1) TO '{marker}'",
    "COPY (SELECT 1) TO PROGRAM 'touch {marker}'",
    "COPY trials FROM PROGRAM 'true'",
    "DO $$BEGIN EXECUTE 'COPY (SELECT 1) TO PROGRAM ''touch {marker}'''; END$$",
    "DO $$BEGIN DELETE FROM trials; END$$",
    "SET TRANSACTION READ WRITE",
    "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
    "SET default_transaction_read_only = off",
    "SET TRANSACTION READ WRITE; DELETE FROM trials",
    "RESET ROLE",
    "SELECT set_config('transaction_read_only', 'off', true)",
    "SELECT nextval('trials_id_seq')",
    "SELECT setval('trials_id_seq', 100)",
    "WITH gone AS (DELETE FROM trials RETURNING *) SELECT * FROM gone",
    "SELECT * FROM trials FOR UPDATE",
    "LOCK TABLE trials IN ACCESS EXCLUSIVE MODE",
    "TRUNCATE metrics",
    "VACUUM",
    "CHECKPOINT",
    "NOTIFY transferlab",
    "LISTEN transferlab",
    "PREPARE p AS DELETE FROM trials",
    "CALL nothing()",
    "EXPLAIN ANALYZE DELETE FROM trials",
    "CREATE TEMP TABLE t AS SELECT 1",
]


@pytest.mark.postgres
def test_postgres_query_refuses_copy_do_and_read_write_tricks(pg_store: Store, pg_url: str) -> None:
    marker = Path("/tmp") / f"transferlab-security-{secrets.token_hex(6)}"  # the server writes as itself

    def no_marker() -> list[str]:
        return [f"created {marker}"] if marker.exists() else []

    statements = [statement.format(marker=marker) for statement in POSTGRES_REFUSED]
    assert_refused(pg_url, pg_store, statements, no_marker)


@pytest.mark.postgres
def test_postgres_query_side_effects_the_server_allows_are_rolled_back(pg_store: Store, pg_url: str) -> None:
    # A few functions change state even in a read-only transaction; the query's transaction is always
    # rolled back and its connection closed, so nothing of theirs outlives the query.
    def large_objects() -> int:
        with pg_store.engine.connect() as connection:
            return connection.exec_driver_sql("SELECT count(*) FROM pg_largeobject_metadata").scalar_one()

    before = large_objects()
    assert run_readonly_query(pg_url, "SELECT lo_from_bytea(0, 'x') IS NOT NULL AS made")[
        "made"
    ].tolist() == [True]
    key = secrets.randbelow(2**31)  # advisory locks are database-wide: never share a key with other runs
    assert run_readonly_query(pg_url, f"SELECT pg_advisory_lock({key})").shape == (1, 1)
    assert large_objects() == before
    # The session lock dies with the query's connection; the server ends that backend asynchronously.
    deadline = time.monotonic() + 10
    with pg_store.engine.connect() as connection:
        while not connection.exec_driver_sql(f"SELECT pg_try_advisory_lock({key})").scalar():
            assert time.monotonic() < deadline, "the advisory lock outlived the query's connection"
            time.sleep(0.1)
        connection.exec_driver_sql(f"SELECT pg_advisory_unlock({key})")


@pytest.mark.postgres
def test_postgres_superuser_queries_run_without_superuser_rights(pg_store: Store, pg_url: str) -> None:
    # A superuser's query drops to pg_read_all_data; any other role keeps its own (lesser) rights.
    superuser = is_superuser(pg_store)
    user = run_readonly_query(pg_url, "SELECT current_user AS u, current_setting('statement_timeout') AS t")
    expected = "pg_read_all_data" if superuser else make_url(pg_url).username
    assert user.to_dict("list") == {"u": [expected], "t": ["30s"]}
    statements = [
        "SELECT pg_reload_conf()",
        "SELECT lo_export(1, '/tmp/transferlab-never')",
        "SELECT pg_read_file('/etc/hostname')",
    ]
    if superuser:  # any role may end its own session
        statements.append("SELECT pg_terminate_backend(pg_backend_pid())")
    for statement in statements:
        with pytest.raises(StoreError, match=READ_ONLY):
            run_readonly_query(pg_url, statement)
    # Names still resolve in the store's schema (search_path is kept when the role changes).
    assert run_readonly_query(pg_url, "SELECT count(*) AS n FROM trials")["n"].tolist() == [1]


@pytest.mark.postgres
def test_postgres_query_is_cancelled_at_its_time_limit(pg_store: Store, pg_url: str) -> None:
    for statement in (
        "SELECT pg_sleep(10)",
        # Lifting the limit from inside the statement does not lift it for the statement.
        "SELECT set_config('statement_timeout', '0', true), pg_sleep(10)",
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r",
    ):
        started = time.monotonic()
        with pytest.raises(StoreError, match=TIMED_OUT + r"0.3 s .*statement timeout"):
            run_readonly_query(pg_url, statement, timeout_s=0.3)
        assert time.monotonic() - started < 5, statement
    assert run_readonly_query(pg_url, "SELECT pg_sleep(0.05)", timeout_s=5).shape == (1, 1)


# -- 2. secrets ------------------------------------------------------------------------------------

SECRET = "s3cret"


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://user:{SECRET}@127.0.0.1:1/db",
        f"postgresql+psycopg://user:{SECRET}@127.0.0.1:1/db?connect_timeout=3",
        f"postgresql://user@127.0.0.1:1/db?password={SECRET}",
        f"postgresql://user@127.0.0.1:1/db?sslpassword={SECRET}&password={SECRET}",
        f"postgresql://user:{SECRET}@127.0.0.1:notaport/db",
        f"post gres://user:{SECRET}@127.0.0.1/db",
        f"postgresql://user:{SECRET}/x@127.0.0.1:1/db",
        f"postgresql://user:{SECRET}@127.0.0.1:1/db?sslmode=bogus",
        f"mysql://user:{SECRET}@127.0.0.1:1/db",
        f"sqlite://user:{SECRET}@/no/such/folder/x.db",
    ],
)
def test_errors_never_show_the_password(url: str) -> None:
    for attempt in (
        lambda: Store.open(url),
        lambda: Store.open(url, create=False),
        lambda: run_readonly_query(url, "SELECT 1"),
    ):
        with pytest.raises(StoreError) as error:
            attempt()
        assert SECRET not in str(error.value), str(error.value)
    assert SECRET not in mask_url(url) and "***" in mask_url(url)


def test_mask_url_keeps_everything_but_the_secrets() -> None:
    assert mask_url(f"postgresql://alice:{SECRET}@db.example:5432/results") == (
        "postgresql://alice:***@db.example:5432/results"
    )
    assert mask_url(f"postgresql://alice@h/db?sslmode=require&PASSWORD={SECRET}") == (
        "postgresql://alice@h/db?sslmode=require&PASSWORD=***"
    )
    assert mask_url(make_url(f"postgresql://alice:{SECRET}@h/db?password={SECRET}")) == (
        "postgresql://alice:***@h/db?password=***"
    )
    assert mask_url("sqlite:///runs/results.db") == "sqlite:///runs/results.db"
    assert database.redact(f"failed for {SECRET} and s%33cret", f"postgresql://u:{SECRET}@h/db") == (
        "failed for *** and s%33cret"  # only the real secret, in its given and URL-encoded forms
    )


@pytest.fixture
def pg_url_with_password(pg_url: str) -> str:
    """The test schema's URL with a password in it (the server trusts local connections, so it is
    accepted and ignored: a real password's path through the code without needing one)."""
    return make_url(pg_url).set(password=SECRET).render_as_string(hide_password=False)


@pytest.mark.postgres
def test_a_password_url_stays_out_of_store_logs_and_messages(
    pg_url_with_password: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = pg_url_with_password
    assert SECRET in url
    with caplog.at_level(logging.DEBUG):  # SQLAlchemy engine/pool, Alembic and psycopg at their most verbose
        for name in ("sqlalchemy.engine", "sqlalchemy.pool", "alembic", "psycopg"):
            logging.getLogger(name).setLevel(logging.DEBUG)
        try:
            with Store.open(url) as store:
                texts = [store.url, repr(store), str(store.engine.url), repr(store.engine)]
                assert not store.engine.echo
                exp_id = make_experiment(store)
                store.add_trials(exp_id, [trial("b", "baseB")])
                with pytest.raises(StoreError) as error:
                    store.find_experiment("missing")
                texts.append(str(error.value))
            for statement in ("DELETE FROM trials", "SELECT * FROM missing", "SELECT 1"):
                try:
                    run_readonly_query(url, statement)
                except StoreError as exc:
                    texts.append(str(exc))
            with pytest.raises(StoreError) as error:
                Store.open(
                    make_url(url).set(database="no_such_database").render_as_string(hide_password=False)
                )
            texts.append(str(error.value))
        finally:
            for name in ("sqlalchemy.engine", "sqlalchemy.pool", "alembic", "psycopg"):
                logging.getLogger(name).setLevel(logging.NOTSET)
    assert caplog.records, "the loggers were on"
    assert all(SECRET not in t for t in texts), texts
    assert "postgres:***@" in store.url
    assert SECRET not in caplog.text


@pytest.mark.postgres
def test_cli_output_never_shows_the_password(pg_url_with_password: str) -> None:
    url = pg_url_with_password
    runner = CliRunner()
    outputs = []
    for args in (
        ["db", "upgrade", "--db", url],
        ["status", "--db", url],
        ["status", "--db", url, "-O", "json"],
        ["query", "--db", url, "DELETE FROM trials"],
        ["query", "--db", url, "SELECT * FROM no_such_table"],
        ["status", "--db", f"postgresql://user:{SECRET}@127.0.0.1:1/db"],
        ["results", "nope", "--db", url],
    ):
        result = runner.invoke(cli, args, env={"TRANSFERLAB_DB": url})
        outputs.append((args[:2], result.exit_code, result.output))
        assert SECRET not in result.output, (args, result.output)
    assert outputs[0][1] == 0 and "postgres:***@" in outputs[0][2]
    assert outputs[1][1] == 0 and outputs[3][1] == 1 and "query is read-only" in outputs[3][2]


# -- 3. pickles ------------------------------------------------------------------------------------


class Payload:
    """Unpickling this runs a shell command that creates ``marker``: what a malicious file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


@pytest.fixture
def evil(tmp_path: Path) -> dict[str, Path]:
    """Malicious files under the names users hand to transferlab, and the marker they would create."""
    marker = tmp_path / "PWNED"
    raw = pickle.dumps({"state_dict": Payload(marker), "model": Payload(marker)})
    folder = tmp_path / "evil"
    folder.mkdir()
    files = {"marker": marker}
    for name in ("model.pt", "weights.pt", "resume.pt", "model.safetensors", "weights.bin"):
        (folder / name).write_bytes(raw)  # a plain pickle stream
        files[name] = folder / name
    zipped = folder / "zipped.pt"  # torch.save's zip format, with the same payload inside
    torch.save({"state_dict": Payload(marker)}, zipped)
    files["zipped.pt"] = zipped
    # The payload is live: plain pickle.loads would run it (in a folder of its own).
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(Payload(probe)))
    assert probe.exists(), "the payload must really execute when unpickled"
    return files


def test_weights_loader_never_unpickles_code(evil: dict[str, Path]) -> None:
    from transferlab.backbones.weights import WeightsError, load_backbone_weights, read_state_dict

    for name in ("model.pt", "weights.pt", "weights.bin", "zipped.pt", "model.safetensors"):
        with pytest.raises(WeightsError, match="cannot read weights file"):
            read_state_dict(evil[name])
        with pytest.raises(WeightsError):
            load_backbone_weights(torch.nn.Linear(2, 2), evil[name])
    assert not evil["marker"].exists()


def test_spec_weights_option_never_unpickles_code(evil: dict[str, Path]) -> None:
    # `weights: PATH` in a spec's backbone section, through the same code the trials use.
    from transferlab.backbones.weights import WeightsError
    from transferlab.engine.assembly import build_backbone
    from transferlab.tasks.base import TargetSpec

    target = TargetSpec(kind="label", num_classes=3, in_channels=3, image_size=(32, 32))
    for name in ("weights.pt", "zipped.pt", "model.safetensors"):
        with pytest.raises(WeightsError):
            build_backbone("convnet", {"widths": [4, 8, 8], "weights": str(evil[name])}, target)
    assert not evil["marker"].exists()


def test_training_state_loader_never_unpickles_code(evil: dict[str, Path]) -> None:
    from transferlab.engine.fit import load_training_state

    for name in ("resume.pt", "zipped.pt"):
        with pytest.raises(
            ValueError, match=f"cannot resume from .*{name}: UnpicklingError: Weights only load"
        ):
            load_training_state(evil[name])
    assert not evil["marker"].exists()


def test_checkpoint_loaders_do_not_parse_pickles(evil: dict[str, Path]) -> None:
    from transferlab.engine import checkpoint

    for name in ("model.safetensors", "model.pt", "zipped.pt"):
        with pytest.raises(Exception, match="(?i)header|deserializ|safetensor") as error:
            checkpoint.load_state(evil[name])
        assert not isinstance(error.value, pickle.UnpicklingError)
        with pytest.raises(Exception, match="(?i)header|deserializ|safetensor"):
            checkpoint.read_checkpoint_metadata(evil[name])
        with pytest.raises(Exception, match="(?i)header|deserializ|safetensor"):
            checkpoint.load_backbone_stages(torch.nn.Linear(2, 2), evil[name], 1)
    assert not evil["marker"].exists()


def test_timm_checkpoint_path_never_unpickles_code(evil: dict[str, Path]) -> None:
    # Backbone options go to timm.create_model, whose checkpoint_path loads with weights_only=True.
    from transferlab.backbones.timm_backbone import timm_backbone

    with pytest.raises(Exception, match="(?i)weights.only|unpickl"):
        timm_backbone(model_name="resnet18", checkpoint_path=str(evil["zipped.pt"]))
    assert not evil["marker"].exists()


# The source scan --------------------------------------------------------------------------------

UNPICKLERS = {
    "pickle",
    "cPickle",
    "_pickle",
    "dill",
    "cloudpickle",
    "joblib",
    "marshal",
    "shelve",
    "jsonpickle",
}
UNPICKLING_CALLS = {"load", "loads", "Unpickler", "open"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_loads(sources: dict[str, str]) -> list[str]:
    """Every place in ``sources`` (name -> Python text) that could unpickle or construct arbitrary objects."""
    trees = {name: ast.parse(text, filename=name) for name, text in sources.items()}
    # Classes deriving, directly or not, from a safe yaml loader (e.g. a strict SafeLoader subclass).
    bases = {
        node.name: {_dotted(b).rsplit(".", 1)[-1] for b in node.bases}
        for tree in trees.values()
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef)
    }
    safe_loaders = set(SAFE_YAML_LOADERS)
    while True:
        more = {name for name, parents in bases.items() if parents & safe_loaders} - safe_loaders
        if not more:
            break
        safe_loaders |= more

    found = []
    for name, tree in trees.items():
        for node in ast.walk(tree):
            where = f"{name}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.ImportFrom):
                module = (node.module or "").split(".")[0]
                names = {a.name for a in node.names}
                if (module in UNPICKLERS and names & UNPICKLING_CALLS) or (
                    module == "torch" and "load" in names
                ):
                    found.append(f"{where}: from {node.module} import {', '.join(sorted(names))}")
            if not isinstance(node, ast.Call):
                continue
            func = _dotted(node.func)
            head, _, attr = func.rpartition(".")
            if head.rsplit(".", 1)[-1] in UNPICKLERS and attr in UNPICKLING_CALLS:
                found.append(f"{where}: {func}(")
            elif attr == "read_pickle" or func in ("torch.hub.load", "hub.load"):
                found.append(f"{where}: {func}(")
            elif func == "torch.load" or func.endswith(".torch.load"):
                if not _is_true(_keyword(node, "weights_only")):
                    found.append(f"{where}: torch.load( without weights_only=True")
            elif func in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all"):
                found.append(f"{where}: {func}(")
            elif func in ("yaml.load", "yaml.load_all"):
                loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
                if loader is None or _dotted(loader).rsplit(".", 1)[-1] not in safe_loaders:
                    found.append(f"{where}: {func}( without a SafeLoader (subclass)")
            elif func.endswith(("np.load", "numpy.load")) and _is_true(_keyword(node, "allow_pickle")):
                found.append(f"{where}: {func}(allow_pickle=True)")
    return found


def test_the_scan_finds_unsafe_loading() -> None:
    bad = {
        "bad.py": "\n".join(
            [
                "import pickle, torch, yaml, numpy as np, pandas as pd, dill",
                "from pickle import loads",
                "pickle.load(open('f', 'rb'))",
                "pickle.loads(b'')",
                "dill.loads(b'')",
                "torch.load('m.pt')",
                "torch.load('m.pt', weights_only=False)",
                "yaml.load(text)",
                "yaml.load(text, Loader=yaml.Loader)",
                "yaml.unsafe_load(text)",
                "np.load('a.npy', allow_pickle=True)",
                "pd.read_pickle('f')",
                "torch.hub.load('repo', 'model')",
                "class Sneaky(yaml.FullLoader): pass",
                "yaml.load(text, Loader=Sneaky)",
            ]
        )
    }
    flagged = sorted(int(place.split(":")[1]) for place in unsafe_loads(bad))
    assert flagged == [*range(2, 14), 15]  # every line but the imports and the class
    good = {
        "good.py": "\n".join(
            [
                "import torch, yaml, numpy as np",
                "class Strict(yaml.SafeLoader): pass",
                "class Stricter(Strict): pass",
                "torch.load('m.pt', map_location='cpu', weights_only=True)",
                "yaml.load(text, Loader=Stricter)",
                "yaml.safe_load(text)",
                "np.load('a.npy')",
            ]
        )
    }
    assert unsafe_loads(good) == []


def test_no_source_file_unpickles_or_loads_unsafe_yaml() -> None:
    sources = {str(p.relative_to(PACKAGE.parent)): p.read_text() for p in sorted(PACKAGE.rglob("*.py"))}
    assert len(sources) > 20 and "transferlab/service/spec_yaml.py" in sources
    assert unsafe_loads(sources) == []
