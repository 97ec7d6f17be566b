"""The store under real contention: several processes create, migrate and write one store at once.

Each test starts fresh interpreters (multiprocessing "spawn", like separate `transferlab` commands) that
wait at a barrier and then hit the same SQLite file or PostgreSQL schema together.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import inspect, text
from store_helpers import (
    add_later_revision,
    create_at_first_revision,
    driver_like_worker,
    open_store_worker,
    revision_of,
    run_processes,
)

from transferlab.service.store import Store, database

pytest_plugins = ["store_fixtures"]  # db_url, pg_url

STORE_TABLES = {"alembic_version", "experiments", "trials", "metrics"}


def test_concurrent_first_use_creates_one_schema(db_url: str) -> None:
    migrations_run = run_processes(open_store_worker, [(db_url,)] * 4)
    assert sorted(migrations_run) == [0, 0, 0, 1], "exactly one process migrates; the others find it done"
    head, _ = database.schema_revisions()
    with Store.open(db_url, create=False) as store, store.engine.connect() as connection:
        assert set(inspect(connection).get_table_names()) == STORE_TABLES
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [head]
        if connection.dialect.name == "postgresql":  # one of each table, in this session's schema only
            tables = connection.execute(
                text("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
            )
            assert sorted(tables.scalars()) == sorted(STORE_TABLES)


def test_sqlite_migration_waits_for_the_write_lock(tmp_path: Path) -> None:
    # BEGIN IMMEDIATE is what serialises SQLite migrations: while another connection holds the write
    # lock, opening the empty file waits for it (busy_timeout) and then migrates, instead of failing.
    path = tmp_path / "s.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("PRAGMA journal_mode = WAL")
    holder.execute("BEGIN IMMEDIATE")
    opened: list[float] = []
    errors: list[BaseException] = []

    def open_store() -> None:
        started = time.monotonic()
        try:
            Store.open(str(path)).close()
            opened.append(time.monotonic() - started)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=open_store)
    thread.start()
    time.sleep(1.0)
    assert thread.is_alive() and not opened, "the migration must wait while the write lock is held"
    holder.execute("COMMIT")
    holder.close()
    thread.join(timeout=30)
    assert not errors and opened and opened[0] >= 0.9
    with Store.open(str(path), create=False) as store:
        assert store.experiments() == []


def _check_study(store: Store, exp_id: int, name: str, n_trials: int, n_epochs: int) -> None:
    info = store.find_experiment(exp_id)
    assert (info.name, info.status, info.trial_counts) == (name, "completed", {"completed": n_trials})
    trials = store.trials(exp_id)
    assert sorted(t.key for t in trials) == sorted(f"{name}-t{i}" for i in range(n_trials))
    assert all(t.ray_trial_id == f"ray-{t.key}" and t.checkpoint_path == f"/ckpt/{t.key}" for t in trials)
    frame = store.metrics_frame(exp_id)
    per_trial = n_epochs * 3 + 1  # train loss, val loss, val accuracy per epoch; one test accuracy
    assert len(frame) == n_trials * per_trial
    assert not frame.duplicated(["trial_id", "epoch", "split", "name"]).any()
    for _, rows in frame.groupby("trial_id"):
        assert len(rows) == per_trial
        val_loss = rows[(rows["split"] == "val") & (rows["name"] == "loss")]
        assert sorted(val_loss["epoch"]) == list(range(n_epochs))
        assert val_loss["value"].tolist() == [2.0 / (e + 1) for e in sorted(val_loss["epoch"])]


def _count(store: Store, table: str) -> int:
    with store.engine.connect() as connection:
        return connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()


def test_two_drivers_write_one_sqlite_file_at_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    Store.open(url).close()
    n_trials, n_epochs = 4, 50  # 2 x 408 small write transactions, 2 x 604 metric rows
    names = ["first", "second"]
    exp_ids = run_processes(driver_like_worker, [(url, name, n_trials, n_epochs) for name in names])
    with Store.open(url, create=False) as store:
        for name, exp_id in zip(names, exp_ids, strict=True):
            _check_study(store, exp_id, name, n_trials, n_epochs)
        assert _count(store, "trials") == 2 * n_trials
        assert _count(store, "metrics") == 2 * n_trials * (n_epochs * 3 + 1)


@pytest.mark.postgres
def test_four_processes_write_postgres_at_once(pg_url: str) -> None:
    Store.open(pg_url).close()
    n_trials, n_epochs = 4, 40
    names = [f"writer{i}" for i in range(4)]
    exp_ids = run_processes(driver_like_worker, [(pg_url, name, n_trials, n_epochs) for name in names])
    assert len(set(exp_ids)) == 4
    with Store.open(pg_url, create=False) as store:
        for name, exp_id in zip(names, exp_ids, strict=True):
            _check_study(store, exp_id, name, n_trials, n_epochs)
        assert _count(store, "trials") == 4 * n_trials
        assert _count(store, "metrics") == 4 * n_trials * (n_epochs * 3 + 1)


def test_concurrent_upgrades_of_an_older_store_migrate_once(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Several `transferlab db upgrade` at once on a store one revision behind (threads, each with its
    # own engine and connections): one runs the migration, the others wait for it and find it done.
    create_at_first_revision(db_url)
    later = add_later_revision(tmp_path, monkeypatch)
    errors: list[BaseException] = []

    def upgrade() -> None:
        try:
            Store.open(db_url, upgrade=True).close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=upgrade) for _ in range(4)]
    with caplog.at_level(logging.INFO, logger="alembic.runtime.migration"):
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert not errors, errors
    ran = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Running upgrade")]
    assert len(ran) == 1 and later in ran[0]
    with Store.open(db_url, create=False) as store:
        assert revision_of(store) == later and len(store.experiments()) == 1
