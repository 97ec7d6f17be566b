"""Latency of ``results`` and ``status`` on a store of 10,000 trials x 50 epochs x 4 metrics.

The store is filled once per backend (SQLite in a temporary folder; PostgreSQL in a fresh schema of
``--pg-url``'s database, dropped afterwards): one transfer experiment of ``--trials`` trials with
realistic configs and provenance, 95 % completed (the rest failed, running or pending), each with
train/val loss and accuracy for every epoch and test loss and accuracy at the last one. Trials go in
through the store's own ``add_trials``; metric rows through ``Store.add_metrics`` would take minutes
(one upsert transaction per trial), so they are bulk-inserted with SQLAlchemy core, and the API's
rate is measured on a sample and reported beside.

Timed, each ``--repeat`` times after one untimed warm-up call (median reported; target < 1 s):

- ``results``: ``results_frame`` + ``pivot_results`` (what ``transferlab results EXP`` computes),
- ``results_cli``: ``transferlab results EXP`` in this process (table output),
- ``status``: ``transferlab status EXP`` in this process (table output), with the Ray job lookup
  (a call to a cluster, not the store) switched off,
- ``status_list``: ``transferlab status`` (every experiment with its trial counts).

    python -m benchmarks.store_queries                 # SQLite and PostgreSQL
    python -m benchmarks.store_queries --quick         # 1,000 trials
    python -m benchmarks.store_queries --backends sqlite
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random
import secrets
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

from sqlalchemy import create_engine, insert, update
from sqlalchemy.pool import NullPool

from benchmarks.record import write_record
from transferlab.service.store import Store, TrialRecord, resolve_url
from transferlab.service.store.models import Metric, Trial

TARGET_S = 1.0
DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
CONDITIONS = ("AnB", "AnB+", "BnB", "BnB+", "random")
DEPTHS = (1, 2, 3, 4, 5)
EPOCH_METRICS = (("train", "loss"), ("train", "accuracy"), ("val", "loss"), ("val", "accuracy"))
INSERT_CHUNK = 20_000
SPEC_TEXT = (Path(__file__).resolve().parent.parent / "experiments" / "yosinski-digits.yaml").read_text()


# -- filling ----------------------------------------------------------------------------------------


def trial_config(key: str, condition: str, depth: int, seed: int) -> dict[str, Any]:
    """A config shaped like the planner's and driver's (``PlannedTrial.config`` plus run paths)."""
    frozen = depth if condition in ("AnB", "BnB", "random") else 0
    return {
        "trial_key": key,
        "role": "base" if condition.startswith("base") else "transfer",
        "condition": condition,
        "depth": depth,
        "seed": seed,
        "split": "given",
        "classes": [5, 6, 7, 8, 9] if condition != "baseA" else [0, 1, 2, 3, 4],
        "freeze_depth": frozen,
        "copy_depth": 0 if condition in ("random", "baseA", "baseB") else depth,
        "bn_policy": "frozen",
        "fine_tune_lr_mult": 1.0,
        "backbone": {"name": "convnet", "options": {"widths": [16, 32, 64, 96, 128]}},
        "head": {"name": "classify", "options": {}},
        "task": {"name": "digits", "options": {"image_size": 32}},
        "primary_metric": "accuracy",
        "train": {
            "epochs": 50,
            "batch_size": 32,
            "eval_batch_size": 256,
            "optimizer": "sgd",
            "lr": 0.05,
            "momentum": 0.9,
            "weight_decay": 0.0005,
            "schedule": "cosine",
            "early_stopping_patience": None,
            "amp": True,
            "device": "auto",
        },
        "augment": [],
        "checkpoint_path": f"/runs/bench-1/checkpoints/{key.replace('/', '_')}/model.safetensors",
        "threads": 1,
        "experiment_id": 1,
        "tune_folder": "/runs/bench-1/tune",
    }


def planned_trials(n: int) -> list[TrialRecord]:
    """``n`` trials of a transfer study: per seed 2 base nets and 5 depths x 5 conditions."""
    provenance = {
        "code_version": "0.1.0+bench",
        "libraries": {"torch": "2.x", "timm": "1.x", "ray": "2.x", "sqlalchemy": "2.x", "numpy": "2.x"},
    }
    out: list[TrialRecord] = []
    seed = 0
    while len(out) < n:
        base = {c: f"given/s{seed}/{c}/d0" for c in ("baseA", "baseB")}
        plan = [(c, 0, None) for c in base]
        plan += [(c, d, base["baseA" if c.startswith("A") else "baseB"]) for d in DEPTHS for c in CONDITIONS]
        for condition, depth, base_key in plan:
            if condition == "random":
                base_key = None
            key = f"given/s{seed}/{condition}/d{depth}"
            out.append(
                TrialRecord(
                    key=key,
                    role="base" if depth == 0 else "transfer",
                    condition=condition,
                    depth=depth,
                    seed=seed,
                    split="given",
                    bn_policy="frozen",
                    config=trial_config(key, condition, depth, seed),
                    base_key=base_key,
                    provenance=provenance,
                )
            )
        seed += 1
    # a truncated last seed keeps its base nets: they come first in every seed
    return out[:n]


def metric_rows(trial_ids: list[int], epochs: int, rng: random.Random) -> Iterator[dict[str, Any]]:
    """Per-epoch train/val loss and accuracy, and test loss and accuracy at the last epoch."""
    for trial_id in trial_ids:
        for epoch in range(1, epochs + 1):
            for split, name in EPOCH_METRICS:
                value = rng.random() if name == "accuracy" else 2.0 * rng.random()
                yield {"trial_id": trial_id, "epoch": epoch, "split": split, "name": name, "value": value}
        for name in ("loss", "accuracy"):
            yield {
                "trial_id": trial_id,
                "epoch": epochs,
                "split": "test",
                "name": name,
                "value": rng.random(),
            }


def fill(store: Store, n_trials: int, epochs: int) -> tuple[int, dict[str, float]]:
    """Record one experiment with ``n_trials`` trials and their metrics; return its id and timings."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    exp_id = store.create_experiment(
        name="bench-yosinski",
        study="transfer",
        spec_text=SPEC_TEXT,
        spec_json={"name": "bench-yosinski", "study": "transfer"},
        spec_hash="0" * 64,
        primary_metric="accuracy",
        higher_is_better=True,
        storage_path="/runs",
        code_version="0.1.0+bench",
    )
    trials = planned_trials(n_trials)
    ids = store.add_trials(exp_id, trials)
    timings["add_trials_s"] = time.perf_counter() - started

    trial_ids = [ids[t.key] for t in trials]
    rng = random.Random(0)
    sample = trial_ids[:20]  # the store API's own rate, for the record
    started = time.perf_counter()
    for trial_id in sample:
        rows = metric_rows([trial_id], epochs, rng)
        store.add_metrics(trial_id, [(r["epoch"], r["split"], r["name"], r["value"]) for r in rows])
    api_s = time.perf_counter() - started
    timings["add_metrics_api_rows_per_s"] = len(sample) * (epochs * 4 + 2) / api_s

    started = time.perf_counter()
    rows = metric_rows(trial_ids[len(sample) :], epochs, rng)
    with store.engine.begin() as connection:
        chunk: list[dict[str, Any]] = []
        for row in rows:
            chunk.append(row)
            if len(chunk) >= INSERT_CHUNK:
                connection.execute(insert(Metric.__table__), chunk)
                chunk = []
        if chunk:
            connection.execute(insert(Metric.__table__), chunk)
        # 95 % completed; the rest failed, running or pending, as in a big study under way
        statuses = ["completed"] * 95 + ["failed"] * 3 + ["running", "pending"]
        for status in set(statuses):
            chosen = [i for i in trial_ids if statuses[i % len(statuses)] == status]
            for start in range(0, len(chosen), 5000):
                connection.execute(
                    update(Trial.__table__)
                    .where(Trial.__table__.c.id.in_(chosen[start : start + 5000]))
                    .values(status=status, error="RuntimeError: boom" if status == "failed" else None)
                )
    timings["bulk_metrics_s"] = time.perf_counter() - started
    if store.engine.url.get_backend_name() == "postgresql":
        with store.engine.begin() as connection:  # what autovacuum does within a minute of a big load
            connection.exec_driver_sql("ANALYZE")
    return exp_id, timings


# -- backends ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def sqlite_url() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="tl-bench-store-") as folder:
        yield f"sqlite:///{folder}/bench.db"


@contextlib.contextmanager
def postgres_url(base_url: str) -> Iterator[str]:
    """A URL whose connections use a fresh schema of ``base_url``'s database; dropped afterwards."""
    base = resolve_url(base_url)
    admin = create_engine(base, poolclass=NullPool)
    schema = f"tl_bench_{secrets.token_hex(4)}"
    with admin.begin() as connection:
        connection.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    try:
        yield base.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
            hide_password=False
        )
    finally:
        with admin.begin() as connection:
            connection.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.dispose()


# -- queries ----------------------------------------------------------------------------------------


def run_cli(args: list[str]) -> str:
    """Run a ``transferlab`` command in this process and return its output (it must succeed)."""
    from click.testing import CliRunner

    from transferlab.cli.main import cli

    # rich sizes tables to the terminal; give it a wide one, as a user's
    with mock.patch.dict("os.environ", {"COLUMNS": "160"}):
        result = CliRunner().invoke(cli, args, catch_exceptions=False)
    if result.exit_code != 0:
        raise RuntimeError(f"transferlab {' '.join(args)} failed: {result.output}")
    return result.output


def queries(url: str, exp_id: int) -> dict[str, Callable[[], Any]]:
    from transferlab.service.report import pivot_results, results_frame

    def results() -> Any:
        store = Store.open(url, create=False)
        try:
            frame = results_frame(store, exp_id)
            return pivot_results(frame, True)
        finally:
            store.close()

    def status() -> str:
        with mock.patch("transferlab.cli.reports.find_jobs", return_value=None):
            return run_cli(["status", str(exp_id), "--db", url])

    return {
        "results": results,
        "results_cli": lambda: run_cli(["results", str(exp_id), "--db", url]),
        "status": status,
        "status_list": lambda: run_cli(["status", "--db", url]),
    }


def time_queries(url: str, exp_id: int, repeat: int) -> dict[str, dict[str, Any]]:
    out = {}
    for name, query in queries(url, exp_id).items():
        seconds = []
        with contextlib.redirect_stdout(io.StringIO()):
            query()  # warm-up: imports and first connections are not what is measured
        for _ in range(repeat):
            started = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                query()
            seconds.append(time.perf_counter() - started)
        median = statistics.median(seconds)
        out[name] = {"seconds": seconds, "median_s": median, "target_s": TARGET_S, "met": median < TARGET_S}
    return out


def bench_backend(backend: str, url: str, n_trials: int, epochs: int, repeat: int) -> dict[str, Any]:
    store = Store.open(url)
    try:
        exp_id, fill_timings = fill(store, n_trials, epochs)
    finally:
        store.close()
    print(f"  filled in {fill_timings['add_trials_s'] + fill_timings['bulk_metrics_s']:.1f} s", flush=True)
    timings = time_queries(url, exp_id, repeat)
    for name, t in timings.items():
        print(
            f"  {name:12s} median {t['median_s']:.3f} s (runs {', '.join(f'{s:.3f}' for s in t['seconds'])}; "
            f"target < {TARGET_S:g} s: {'met' if t['met'] else 'MISSED'})",
            flush=True,
        )
    return {
        "backend": backend,
        "trials": n_trials,
        "metric_rows": n_trials * (epochs * len(EPOCH_METRICS) + 2),
        "fill": fill_timings,
        "queries": timings,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=None, help="trials in the store (default 10000)")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=5, help="timed runs of each query")
    parser.add_argument("--quick", action="store_true", help="1,000 trials")
    parser.add_argument("--backends", default="sqlite,postgresql", help="comma-separated: sqlite,postgresql")
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL, help="PostgreSQL server and database to use")
    parser.add_argument("--out", default=None, help="JSON record path (default benchmarks/results/...)")
    args = parser.parse_args(argv)
    n_trials = args.trials or (1000 if args.quick else 10_000)
    results = []
    for backend in args.backends.split(","):
        print(f"[store_queries] {backend}: {n_trials} trials x {args.epochs} epochs x 4 metrics", flush=True)
        if backend == "sqlite":
            context = sqlite_url()
        elif backend == "postgresql":
            context = postgres_url(args.pg_url)
        else:
            parser.error(f"--backends: unknown backend {backend!r}; allowed: sqlite, postgresql")
        with context as url:
            results.append(bench_backend(backend, url, n_trials, args.epochs, args.repeat))
    name = "store_queries" + ("_quick" if args.quick else "")
    path = write_record(name, {"quick": args.quick, "target_s": TARGET_S, "backends": results}, args.out)
    print(f"[store_queries] record written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
