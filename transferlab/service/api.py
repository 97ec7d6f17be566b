"""The Python API the CLI is built on: validate, submit, and read results back.

Example:
    >>> import transferlab
    >>> exp = transferlab.submit("experiments/quickstart.yaml")
    >>> transferlab.results(exp).head()
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from transferlab.service.spec import ValidatedSpec, load_spec, validate_spec_text

QUICKSTART = "quickstart.yaml"


def embedded_spec_text(name: str = QUICKSTART) -> str:
    """The text of a spec shipped inside the package (``demo`` runs the quickstart)."""
    return resources.files("transferlab.specs").joinpath(name).read_text()


def validate(spec: str | Path | ValidatedSpec) -> ValidatedSpec:
    """Validate a spec file (or pass a validated spec through)."""
    return spec if isinstance(spec, ValidatedSpec) else load_spec(spec)


def open_store(db: str | None = None, *, create: bool = True) -> Any:
    """The store at ``db`` (default: ``TRANSFERLAB_DB`` or ./transferlab.db)."""
    from transferlab.service.store import Store

    return Store.open(db, create=create)


def submit(
    spec: str | Path | ValidatedSpec,
    *,
    db: str | None = None,
    address: str | None = None,
    runs_dir: str | Path | None = None,
    on_event: Callable[..., None] | None = None,
    on_created: Callable[..., None] | None = None,
    shared_runs_dir: bool | None = None,
) -> int:
    """Validate ``spec``, record it, run its trials with Ray Tune, and return the experiment id.

    ``shared_runs_dir`` says every node of a multi-node cluster sees ``runs_dir`` (default: the
    ``TRANSFERLAB_SHARED_RUNS`` environment variable).
    """
    from transferlab.service.driver import run_study

    vspec = validate(spec)
    store = open_store(db)
    try:
        return run_study(
            vspec,
            store,
            address=address,
            runs=Path(runs_dir) if runs_dir else None,
            on_event=on_event,
            on_created=on_created,
            shared_runs=shared_runs_dir,
        )
    finally:
        store.close()


def submit_detached(
    spec: str | Path | ValidatedSpec,
    *,
    db: str | None = None,
    address: str | None = None,
    runs_dir: str | Path | None = None,
    shared_runs_dir: bool | None = None,
) -> Any:
    """Record ``spec`` and run it as a Ray Job that outlives this process; returns the job's facts."""
    from transferlab.service.jobs import submit_detached as submit_job

    return submit_job(validate(spec), db=db, address=address, runs=runs_dir, shared_runs=shared_runs_dir)


def resume(
    experiment: str | int,
    *,
    db: str | None = None,
    address: str | None = None,
    on_event: Callable[..., None] | None = None,
    on_created: Callable[..., None] | None = None,
    shared_runs_dir: bool | None = None,
) -> int:
    """Finish an interrupted experiment (see ``transferlab.service.driver.resume_study``)."""
    from transferlab.service.driver import resume_study

    store = open_store(db, create=False)
    try:
        return resume_study(
            experiment,
            store,
            address=address,
            on_event=on_event,
            on_created=on_created,
            shared_runs=shared_runs_dir,
        )
    finally:
        store.close()


def submit_text(text: str, source: str = "<spec>", **kwargs: Any) -> int:
    """Like ``submit`` for spec text instead of a file."""
    return submit(validate_spec_text(text, source), **kwargs)


def results(experiment: str | int, *, db: str | None = None) -> Any:
    """One row per completed trial with its primary test metric, as a pandas DataFrame."""
    from transferlab.service.report import results_frame

    store = open_store(db, create=False)
    try:
        return results_frame(store, store.find_experiment(experiment).id)
    finally:
        store.close()


def metrics(experiment: str | int, *, db: str | None = None) -> Any:
    """Every metric row of an experiment (long format) as a pandas DataFrame."""
    store = open_store(db, create=False)
    try:
        return store.metrics_frame(store.find_experiment(experiment).id)
    finally:
        store.close()


def query(sql: str, *, db: str | None = None, timeout_s: float = 30.0) -> Any:
    """Run read-only SQL against the store; writes are refused by the database connection.

    A statement running longer than ``timeout_s`` seconds is stopped.
    """
    from transferlab.service.store import run_readonly_query

    return run_readonly_query(db, sql, timeout_s=timeout_s)


def plot(experiment: str | int, path: str | Path, *, db: str | None = None) -> Path:
    """Write the experiment's figure (accuracy against depth for a transfer study) as a PNG."""
    from transferlab.service.report import plot_transfer, results_frame

    store = open_store(db, create=False)
    try:
        info = store.find_experiment(experiment)
        frame = results_frame(store, info.id)
    finally:
        store.close()
    plot_transfer(frame, path, title=f"{info.name} (experiment {info.id})", metric_name=info.primary_metric)
    return Path(path)


def inspect(name: str, input_shape: str = "3x224x224", options: dict[str, Any] | None = None) -> Any:
    """Per-stage and total complexity of a backbone (``transferlab inspect``); see ``ComplexityReport``."""
    from transferlab.engine.complexity import inspect_backbone

    return inspect_backbone(name, input_shape, options)
