"""Helpers that fill a store in tests (an experiment with a small spec, trial records) and run store
workers in several processes at once."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path
from typing import Any

from alembic import command
from alembic.runtime.migration import MigrationContext

from transferlab.service.store import Store, TrialRecord, database


def make_experiment(
    store: Store, name: str = "demo", *, higher_is_better: bool = True, study: str = "transfer"
) -> int:
    """Record an experiment with a small spec and return its id."""
    return store.create_experiment(
        name=name,
        study=study,
        spec_text=f"name: {name}\nstudy: {study}  # as typed\n",
        spec_json={"name": name, "study": study, "seeds": [0, 1]},
        spec_hash="ab" * 32,
        primary_metric="accuracy",
        higher_is_better=higher_is_better,
        storage_path="/runs/demo",
        code_version="0.1.0+test",
    )


def trial(key: str, condition: str, depth: int = 0, seed: int = 0, **extra: Any) -> TrialRecord:
    """A trial record with the role that ``condition`` implies."""
    role = "base" if condition.startswith("base") else "single" if condition == "single" else "transfer"
    return TrialRecord(
        key=key,
        role=role,
        condition=condition,
        depth=depth,
        seed=seed,
        split="given",
        bn_policy="frozen",
        **extra,
    )


# -- schema revisions -------------------------------------------------------------------------------


def revision_of(store: Store) -> str | None:
    """The store's Alembic revision."""
    with store.engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


LATER_REVISION = "zzzz_test_later"


def add_later_revision(tmp_path: Path, monkeypatch: Any) -> str:
    """Make the code one revision newer than any store created so far: a copy of the bundled
    migrations plus a revision on top of their head (it indexes trials.seed). Returns its id."""
    head, _ = database.schema_revisions()
    newer = tmp_path / "migrations"
    shutil.copytree(database.MIGRATIONS_DIR, newer, ignore=shutil.ignore_patterns("__pycache__"))
    (newer / "versions" / f"{LATER_REVISION}.py").write_text(
        textwrap.dedent(
            f'''
            """a later revision"""
            from alembic import op

            revision = "{LATER_REVISION}"
            down_revision = "{head}"
            branch_labels = None
            depends_on = None


            def upgrade():
                op.create_index("ix_trials_seed", "trials", ["seed"])


            def downgrade():
                op.drop_index("ix_trials_seed", "trials")
            '''
        )
    )
    monkeypatch.setattr(database, "MIGRATIONS_DIR", newer)
    return LATER_REVISION


def create_at_first_revision(url: str) -> str:
    """Create a store at the FIRST revision of the bundled migrations (as the first release did), with
    an experiment, a trial and a metric in it. Returns that revision."""
    first = database.schema_revisions()[1][-1]
    engine = database.create_store_engine(database.resolve_url(url))
    try:
        with database.writer(engine).begin() as connection:
            command.upgrade(database.alembic_config(connection), first)
    finally:
        engine.dispose()
    store = Store(database.create_store_engine(database.resolve_url(url)), database.mask_url(url))
    with store:
        assert revision_of(store) == first
        trial_id = store.add_trials(make_experiment(store, "old"), [trial("baseB-s0", "baseB")])["baseB-s0"]
        store.add_metrics(trial_id, [(1, "test", "accuracy", 0.875)])
    return first


# -- several processes at once --------------------------------------------------------------------
# The workers below run in processes started with multiprocessing's "spawn" method (a fresh
# interpreter, like a second `transferlab submit`), so they live in this importable module.


def run_processes(target: Any, args: list[tuple[Any, ...]], *, timeout: float = 240.0) -> list[Any]:
    """Run ``target(barrier, *a)`` for each ``a`` in its own spawned process, all released at once.

    Returns:
        What each call returned, in the order of ``args``.

    Raises:
        AssertionError: a process raised (its traceback is in the message), died or ran past ``timeout``.
    """
    import multiprocessing as mp
    import queue as queue_module
    import time

    context = mp.get_context("spawn")
    barrier = context.Barrier(len(args))
    results = context.Queue()
    processes = [
        context.Process(target=_report, args=(results, i, target, barrier, a), daemon=True)
        for i, a in enumerate(args)
    ]
    for process in processes:
        process.start()
    outcomes: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outcomes) < len(args):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"processes still running after {timeout:g} s: {sorted(outcomes)} done")
            try:
                index, ok, value = results.get(timeout=min(left, 1.0))
            except queue_module.Empty:
                dead = [
                    i for i, p in enumerate(processes) if p.exitcode not in (None, 0) and i not in outcomes
                ]
                if dead:
                    raise AssertionError(
                        f"processes {dead} died: exit codes {[processes[i].exitcode for i in dead]}"
                    ) from None
                continue
            outcomes[index] = (ok, value)
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    failures = [f"process {i}:\n{value}" for i, (ok, value) in sorted(outcomes.items()) if not ok]
    assert not failures, "\n".join(failures)
    return [outcomes[i][1] for i in range(len(args))]


def _report(results: Any, index: int, target: Any, barrier: Any, args: tuple[Any, ...]) -> None:
    import traceback

    try:
        results.put((index, True, target(barrier, *args)))
    except BaseException:  # report everything, a KeyboardInterrupt included
        results.put((index, False, traceback.format_exc()))


def open_store_worker(barrier: Any, url: str) -> int:
    """Open the store at ``url`` once every process is ready; return how many migrations this one ran."""
    import logging

    ran: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("Running upgrade"):
                ran.append(record.getMessage())

    logger = logging.getLogger("alembic.runtime.migration")
    logger.setLevel(logging.INFO)
    logger.addHandler(Collect())
    barrier.wait(timeout=120)
    with Store.open(url) as store:
        store.experiments()  # the schema is usable
    return len(ran)


def driver_like_worker(barrier: Any, url: str, name: str, n_trials: int, n_epochs: int) -> int:
    """Write a study the way the driver's Tune callback does: many small transactions.

    One experiment with ``n_trials`` trials; every trial is started, gets ``n_epochs`` epochs of three
    metric rows (one ``add_metrics`` call, i.e. one transaction, per epoch and split) interleaved with
    the other trials and with reads, and is finished; returns the experiment id.
    """
    barrier.wait(timeout=120)
    with Store.open(url) as store:
        exp_id = make_experiment(store, name)
        keys = [f"{name}-t{i}" for i in range(n_trials)]
        ids = store.add_trials(exp_id, [trial(k, "BnB", 1, seed=i) for i, k in enumerate(keys)])
        store.set_experiment_status(exp_id, "running", started=True)
        for key in keys:
            store.start_trial(ids[key], ray_trial_id=f"ray-{key}")
        for epoch in range(n_epochs):
            for key in keys:
                store.add_metrics(ids[key], [(epoch, "train", "loss", 1.0 / (epoch + 1))])
                store.add_metrics(
                    ids[key],
                    [(epoch, "val", "loss", 2.0 / (epoch + 1)), (epoch, "val", "accuracy", epoch / n_epochs)],
                )
            store.trial_counts(exp_id)  # reads between the writes, as `status` would
        for key in keys:
            store.add_metrics(ids[key], [(n_epochs, "test", "accuracy", 0.5)])
            store.finish_trial(ids[key], "completed", checkpoint_path=f"/ckpt/{key}")
        store.set_experiment_status(exp_id, "completed", finished=True)
        return exp_id
