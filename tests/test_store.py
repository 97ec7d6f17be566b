"""Contracts of the results store on SQLite and PostgreSQL: schema, writes, reads, read-only SQL, errors."""

from __future__ import annotations

import math
import threading
from datetime import timezone
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from click.testing import CliRunner
from sqlalchemy import Column, Integer, MetaData, inspect, text
from store_helpers import add_later_revision, create_at_first_revision, make_experiment, revision_of, trial

from transferlab.cli.main import cli
from transferlab.service.store import METRICS_FRAME_COLUMNS, Store, StoreError, database, run_readonly_query
from transferlab.service.store.models import Base

pytest_plugins = ["store_fixtures"]  # db_url, pg_url and store fixtures

STORE_TABLES = {"alembic_version", "experiments", "trials", "metrics"}


def count_rows(store: Store, table: str) -> int:
    with store.engine.connect() as connection:
        return connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()


def execute(store: Store, sql: str) -> None:
    with store.engine.begin() as connection:
        connection.execute(text(sql))


# -- schema --------------------------------------------------------------------------------------


def test_empty_database_is_migrated_to_head(store: Store) -> None:
    head, known = database.schema_revisions()
    assert head == "0001_initial" and known == ["0001_initial"]
    with store.engine.connect() as connection:
        assert set(inspect(connection).get_table_names()) == STORE_TABLES
    assert revision_of(store) == head
    store.upgrade()  # a no-op at head
    assert revision_of(store) == head


def test_models_and_migration_agree(store: Store) -> None:
    with store.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
        # The comparison is not vacuous: a column the migration lacks is reported.
        changed = MetaData(naming_convention=Base.metadata.naming_convention)
        for table in Base.metadata.sorted_tables:
            table.to_metadata(changed)
        changed.tables["metrics"].append_column(Column("extra", Integer))
        diffs = compare_metadata(context, changed)
    assert [(d[0], d[3].name) for d in diffs] == [("add_column", "extra")]


def test_sqlite_connections_use_wal_foreign_keys_and_busy_timeout(tmp_path: Path) -> None:
    with Store.open(str(tmp_path / "s.db")) as store, store.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000


# -- writes and reads ----------------------------------------------------------------------------


def test_experiment_trials_and_metrics_round_trip(store: Store) -> None:
    exp_id = make_experiment(store)
    ids = store.add_trials(
        exp_id,
        [
            trial(
                "BnB-d1-s0", "BnB", depth=1, base_key="baseB-s0", config={"lr": 0.1}
            ),  # base later in batch
            trial("baseB-s0", "baseB", data_hash="f" * 64, provenance={"code": "0.1"}),
        ],
    )
    assert set(ids) == {"BnB-d1-s0", "baseB-s0"}
    store.set_experiment_status(exp_id, "running", started=True)
    store.start_trial(ids["baseB-s0"], ray_trial_id="ray-1")
    store.add_metrics(ids["baseB-s0"], [(0, "train", "loss", 1.5), (0, "test", "accuracy", 0.75)])
    store.finish_trial(
        ids["baseB-s0"], "completed", checkpoint_path="/ckpt/b", provenance_update={"torch": "2.6"}
    )

    info = store.find_experiment(exp_id)
    assert info.spec_text == "name: demo\nstudy: transfer  # as typed\n"
    assert info.spec_json == {"name": "demo", "study": "transfer", "seeds": [0, 1]}
    assert (info.status, info.primary_metric, info.higher_is_better) == ("running", "accuracy", True)
    assert info.started_at is not None and info.finished_at is None and info.n_trials == 2
    base, transfer = store.trials(exp_id)[::-1]
    assert (base.status, base.ray_trial_id, base.checkpoint_path) == ("completed", "ray-1", "/ckpt/b")
    assert base.provenance == {"code": "0.1", "torch": "2.6"} and base.data_hash == "f" * 64
    assert (transfer.base_trial_id, transfer.config, transfer.status) == (base.id, {"lr": 0.1}, "pending")
    for stamp in (info.created_at, info.started_at, base.created_at, base.started_at, base.finished_at):
        assert stamp is not None and stamp.tzinfo is not None and stamp.utcoffset().total_seconds() == 0
    assert base.started_at <= base.finished_at

    frame = store.metrics_frame(exp_id)
    assert tuple(frame.columns) == METRICS_FRAME_COLUMNS
    assert frame[["key", "split", "name", "value"]].values.tolist() == [
        ["baseB-s0", "test", "accuracy", 0.75],
        ["baseB-s0", "train", "loss", 1.5],
    ]
    assert frame.loc[0, "split_id"] == "given" and frame.loc[0, "role"] == "base"
    assert store.metrics_frame(exp_id, split="test", name="loss").empty


def test_trial_table_has_the_facts_of_trials_without_their_configs(store: Store) -> None:
    exp_id = make_experiment(store)
    ids = store.add_trials(
        exp_id,
        [trial("baseB-s0", "baseB", config={"primary_metric": "miou"}), trial("AnB-d2-s1", "AnB", 2, 1)],
    )
    store.finish_trial(ids["AnB-d2-s1"], "failed", error="boom")
    table = store.trial_table(exp_id)
    assert table.values.tolist() == [
        [ids["baseB-s0"], "baseB-s0", "base", "baseB", 0, 0, "given", "pending", None, "miou"],
        [ids["AnB-d2-s1"], "AnB-d2-s1", "transfer", "AnB", 2, 1, "given", "failed", "boom", None],
    ]
    assert store.trial_table(exp_id, status="failed")["key"].tolist() == ["AnB-d2-s1"]


def test_base_key_may_name_a_trial_recorded_earlier(store: Store) -> None:
    exp_id = make_experiment(store)
    first = store.add_trials(exp_id, [trial("baseA-s0", "baseA")])
    second = store.add_trials(exp_id, [trial("AnB-d2-s0", "AnB", depth=2, base_key="baseA-s0")])
    assert store.trials(exp_id)[1].base_trial_id == first["baseA-s0"] and list(second) == ["AnB-d2-s0"]


def test_add_trials_writes_all_or_nothing(store: Store) -> None:
    exp_id = make_experiment(store)
    store.add_trials(exp_id, [trial("baseB-s0", "baseB")])
    with pytest.raises(StoreError, match="unknown base trial keys.*baseZ"):
        store.add_trials(exp_id, [trial("ok", "BnB", 1), trial("bad", "BnB", 1, base_key="baseZ")])
    with pytest.raises(StoreError, match="repeated in one batch: twice"):
        store.add_trials(exp_id, [trial("twice", "BnB", 1), trial("twice", "BnB", 2)])
    with pytest.raises(StoreError, match="already recorded"):
        store.add_trials(exp_id, [trial("new", "BnB", 1), trial("baseB-s0", "baseB")])
    with pytest.raises(StoreError, match="no experiment with id 999"):
        store.add_trials(999, [trial("x", "baseB")])
    assert [t.key for t in store.trials(exp_id)] == ["baseB-s0"]
    assert store.add_trials(exp_id, []) == {}


def test_metrics_upsert_overwrites_and_never_duplicates(store: Store) -> None:
    exp_id = make_experiment(store)
    trial_id = store.add_trials(exp_id, [trial("baseB-s0", "baseB")])["baseB-s0"]
    store.add_metrics(trial_id, [(1, "val", "accuracy", 0.5), (1, "val", "loss", 2.0)])
    store.add_metrics(
        trial_id, [(1, "val", "accuracy", 0.6), (1, "val", "accuracy", 0.7), (2, "val", "accuracy", 0.8)]
    )
    store.add_metrics(trial_id, iter([(1, "val", "loss", float("nan"))]))  # any iterable; NaN -> NULL
    store.add_metrics(trial_id, [])
    frame = store.metrics_frame(exp_id, split="val")
    assert count_rows(store, "metrics") == 3
    values = {(row.epoch, row.name): row.value for row in frame.itertuples()}
    assert (
        values[(1, "accuracy")] == 0.7 and values[(2, "accuracy")] == 0.8 and math.isnan(values[(1, "loss")])
    )


def test_add_metrics_rejects_bad_rows(store: Store) -> None:
    exp_id = make_experiment(store)
    trial_id = store.add_trials(exp_id, [trial("baseB-s0", "baseB")])["baseB-s0"]
    with pytest.raises(StoreError, match="unknown metric split 'dev'"):
        store.add_metrics(trial_id, [(0, "dev", "accuracy", 0.5)])
    with pytest.raises(StoreError, match="not a number"):
        store.add_metrics(trial_id, [(0, "val", "accuracy", "high")])  # type: ignore[list-item]
    with pytest.raises(StoreError, match="trial 12345"):
        store.add_metrics(12345, [(0, "val", "accuracy", 0.5)])
    assert count_rows(store, "metrics") == 0


def test_status_changes_are_checked(store: Store) -> None:
    exp_id = make_experiment(store)
    trial_id = store.add_trials(exp_id, [trial("baseB-s0", "baseB")])["baseB-s0"]
    with pytest.raises(StoreError, match="unknown experiment status 'done'.*completed"):
        store.set_experiment_status(exp_id, "done")
    with pytest.raises(StoreError, match="unknown trial status"):
        store.finish_trial(trial_id, "exploded")
    with pytest.raises(StoreError, match="no trial with id 777"):
        store.start_trial(777)
    store.add_metrics(trial_id, [(1, "train", "loss", 2.0), (2, "train", "loss", float("nan"))])
    store.finish_trial(trial_id, "failed", error="loss is nan at epoch 3")
    store.start_trial(trial_id)  # a retried trial forgets its old end and the failed attempt's rows
    (row,) = store.trials(exp_id)
    assert (row.status, row.error, row.finished_at) == ("running", None, None)
    assert count_rows(store, "metrics") == 0
    store.set_experiment_status(exp_id, "completed", finished=True)
    assert store.find_experiment(exp_id).finished_at is not None


def test_find_experiment_by_id_or_latest_name(store: Store) -> None:
    with pytest.raises(StoreError, match="no experiment 'demo'.*no experiments yet"):
        store.find_experiment("demo")
    first = make_experiment(store, "demo")
    other = make_experiment(store, "other")
    latest = make_experiment(store, "demo")
    assert store.find_experiment(first).id == first
    assert store.find_experiment(str(other)).name == "other"
    assert store.find_experiment("demo").id == latest
    with pytest.raises(StoreError) as error:
        store.find_experiment("nope")
    assert f"{latest} (demo), {other} (other), {first} (demo)" in str(error.value)
    with pytest.raises(StoreError, match="no experiment '99'"):
        store.find_experiment("99")


def test_experiment_listing_and_trial_counts(store: Store) -> None:
    older = make_experiment(store, "older")
    newer = make_experiment(store, "newer")
    ids = store.add_trials(newer, [trial(f"t{i}", "BnB", 1, seed=i) for i in range(4)])
    store.finish_trial(ids["t0"], "completed")
    store.finish_trial(ids["t1"], "completed")
    store.finish_trial(ids["t2"], "failed", error="boom")
    assert store.trial_counts(newer) == {"pending": 1, "completed": 2, "failed": 1}
    assert list(store.trial_counts(newer)) == ["pending", "completed", "failed"]  # TRIAL_STATUSES order
    assert store.trial_counts(older) == {}
    listing = store.experiments()
    assert [e.id for e in listing] == [newer, older]
    assert listing[0].trial_counts == {"pending": 1, "completed": 2, "failed": 1} and listing[1].n_trials == 0


def test_deleting_an_experiment_cascades(store: Store) -> None:
    exp_id = make_experiment(store)
    ids = store.add_trials(exp_id, [trial("b", "baseB"), trial("t", "BnB", 1, base_key="b")])
    store.add_metrics(ids["t"], [(0, "test", "accuracy", 0.9)])
    execute(store, f"DELETE FROM experiments WHERE id = {exp_id}")
    assert count_rows(store, "trials") == 0 and count_rows(store, "metrics") == 0


def test_concurrent_sqlite_writers_wait_instead_of_failing(tmp_path: Path) -> None:
    # Read-then-write transactions (finish_trial) used to fail with "database is locked" at once.
    with Store.open(str(tmp_path / "s.db")) as first, Store.open(str(tmp_path / "s.db")) as second:
        exp_id = make_experiment(first)
        ids = list(first.add_trials(exp_id, [trial(f"t{i}", "BnB", 1, seed=i) for i in range(6)]).values())

        def work(store: Store, trial_id: int) -> None:
            for epoch in range(10):
                store.add_metrics(trial_id, [(epoch, "val", "loss", 1.0 / (epoch + 1))])
                store.trial_counts(exp_id)
            store.finish_trial(trial_id, "completed")

        threads = [
            threading.Thread(target=work, args=(s, i)) for s, i in zip([first, second] * 3, ids, strict=True)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert first.trial_counts(exp_id) == {"completed": 6} and count_rows(first, "metrics") == 60


# -- read-only SQL -------------------------------------------------------------------------------


def test_readonly_query_reads_and_refuses_writes(store: Store, db_url: str) -> None:
    # The full catalogue of refused statements is in test_security.py.
    exp_id = make_experiment(store)
    store.add_trials(exp_id, [trial("b", "baseB"), trial("t", "BnB", 1)])
    frame = run_readonly_query(
        db_url, "SELECT key, depth, '100%' AS pct, '10:30' AS t FROM trials ORDER BY id"
    )
    assert frame.to_dict("list") == {
        "key": ["b", "t"],
        "depth": [0, 1],
        "pct": ["100%"] * 2,
        "t": ["10:30"] * 2,
    }
    empty = run_readonly_query(db_url, "SELECT key FROM trials WHERE depth > 99")
    assert empty.empty and list(empty.columns) == ["key"]
    joined = run_readonly_query(
        db_url,
        "WITH deep AS (SELECT id, key FROM trials WHERE depth > 0) "
        "SELECT e.name, d.key FROM deep d JOIN trials t ON t.id = d.id "
        "JOIN experiments e ON e.id = t.experiment_id ORDER BY d.key",
    )
    assert joined.to_dict("list") == {"name": ["demo"], "key": ["t"]}
    for statement in (
        "DELETE FROM trials",
        "UPDATE trials SET depth = 7",
        "DROP TABLE metrics",
        "CREATE TABLE sneaky (x INTEGER)",
    ):
        with pytest.raises(StoreError, match="^query is read-only: "):
            run_readonly_query(db_url, statement)
    with pytest.raises(StoreError, match="^query failed: "):
        run_readonly_query(db_url, "SELECT * FROM no_such_table")
    assert count_rows(store, "trials") == 2 and {t.depth for t in store.trials(exp_id)} == {0, 1}


def test_readonly_query_on_a_missing_sqlite_file_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "missing.db"
    with pytest.raises(StoreError, match="no transferlab store at sqlite:///.*missing.db"):
        run_readonly_query(f"sqlite:///{missing}", "SELECT 1")
    assert list(tmp_path.iterdir()) == []


# -- opening: URLs, empty databases, revisions ---------------------------------------------------


def test_create_false_refuses_an_empty_database(db_url: str, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no transferlab store at"):
        Store.open(db_url, create=False)
    assert not (tmp_path / "store.db").exists()  # SQLite: the missing file was not created
    Store.open(db_url).close()
    with Store.open(db_url, create=False) as store:
        assert revision_of(store) == "0001_initial"


def test_unknown_revision_is_refused(db_url: str) -> None:
    with Store.open(db_url) as store:
        execute(store, "UPDATE alembic_version SET version_num = 'ffff_from_future'")
    with pytest.raises(StoreError, match="revision 'ffff_from_future', which this transferlab does not know"):
        Store.open(db_url)


def test_tables_without_a_revision_are_refused(db_url: str) -> None:
    with Store.open(db_url) as store:
        execute(store, "DROP TABLE alembic_version")
    with pytest.raises(
        StoreError, match=r"has tables \(experiments, metrics, trials\) but no transferlab schema"
    ):
        Store.open(db_url)


def assert_upgraded(url: str, revision: str) -> None:
    """The store at ``url`` is at ``revision``, has the later revision's index, and kept its rows."""
    with Store.open(url, create=False) as store:
        assert revision_of(store) == revision
        with store.engine.connect() as connection:
            assert "ix_trials_seed" in {ix["name"] for ix in inspect(connection).get_indexes("trials")}
        (info,) = store.experiments()
        assert (info.name, info.n_trials) == ("old", 1)
        assert store.metrics_frame(info.id)["value"].tolist() == [0.875]


def test_older_revision_is_refused_with_the_command_and_upgraded(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = create_at_first_revision(db_url)
    assert first == "0001_initial"
    later = add_later_revision(tmp_path, monkeypatch)
    masked = database.mask_url(database.resolve_url(db_url))
    for create in (True, False):  # neither opening for writing nor for reading migrates silently
        with pytest.raises(StoreError) as error:
            Store.open(db_url, create=create)
        assert f"revision '{first}', older than" in str(error.value)
        assert str(error.value).endswith(f"upgrade it with: transferlab db upgrade --db {masked}")
    with Store.open(db_url, upgrade=True) as store:
        assert revision_of(store) == later
        assert store.upgrade() is False  # already at head
    assert_upgraded(db_url, later)


def test_db_upgrade_command_upgrades_a_store_created_by_the_first_revision(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    create_at_first_revision(db_url)
    later = add_later_revision(tmp_path, monkeypatch)
    with pytest.raises(StoreError) as error:
        Store.open(db_url)
    # Run the very command the refusal names (the URL has no password, so it is the real one).
    suggested = str(error.value).split("upgrade it with: ", 1)[1].split()
    assert suggested[:3] == ["transferlab", "db", "upgrade"]
    for _ in range(2):  # idempotent
        result = CliRunner().invoke(cli, suggested[1:])
        assert result.exit_code == 0, result.output
        assert f"schema revision {later}" in result.output
    assert_upgraded(db_url, later)


def test_bad_urls_are_named_with_the_password_masked(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"postgresql\+psycopg://u:\*\*\*@127.0.0.1:1/x: .*refused") as error:
        Store.open("postgresql://u:secret@127.0.0.1:1/x")
    assert "secret" not in str(error.value)
    with pytest.raises(StoreError, match="cannot open nosuchdb://h/x: .*nosuchdb"):
        Store.open("nosuchdb://h/x")
    with pytest.raises(StoreError, match="malformed database URL"):
        Store.open("postgresql://u:secret@h:notaport/x")
    with pytest.raises(StoreError, match="folder .*no_such_folder does not exist"):
        Store.open(str(tmp_path / "no_such_folder" / "s.db"))


def test_url_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(database.DB_ENV_VAR, raising=False)
    assert database.resolve_url(None).render_as_string() == "sqlite:///transferlab.db"
    assert database.resolve_url("postgres://u:p@h/db").drivername == "postgresql+psycopg"
    assert database.resolve_url("postgresql+psycopg2://h/db").drivername == "postgresql+psycopg2"
    with Store.open("results.db") as store:  # a bare path is a SQLite file
        assert store.url == "sqlite:///results.db"
    assert (tmp_path / "results.db").is_file()
    monkeypatch.setenv(database.DB_ENV_VAR, str(tmp_path / "from_env.db"))
    Store.open().close()
    assert (tmp_path / "from_env.db").is_file() and not (tmp_path / "transferlab.db").exists()
    assert database.sqlite_file(database.resolve_url("sqlite://")) is None
    assert timezone.utc  # keeps the import honest for readers: every timestamp above is UTC
