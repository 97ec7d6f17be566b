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
    """The experiment's results as a pandas DataFrame.

    Transfer and single studies: one row per completed trial with its primary test metric
    (``transferlab.service.report.results_frame``). Multitask studies: one row per (task, weighting,
    freeze depth) with the multitask and single-task test values (mean, std, n over seeds), the
    relative change in percent (positive = better than the task alone), a negative-transfer flag and
    the weighting's mean change over tasks, Delta_m
    (``transferlab.service.report_multitask.multitask_frame``).
    """
    store = open_store(db, create=False)
    try:
        info = store.find_experiment(experiment)
        if info.study == "multitask":
            from transferlab.service.report_multitask import multitask_frame

            return multitask_frame(store, info.id)
        from transferlab.service.report import results_frame

        return results_frame(store, info.id)
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


def plot(experiment: str | int, path: str | Path, *, db: str | None = None) -> list[Path]:
    """Write the experiment's figures as PNGs and return their paths.

    A transfer or single study: one figure at ``path`` (accuracy against depth). A multitask study:
    three, ``path`` (each task's metric by weighting against the task alone), ``<stem>-weights.png``
    (the task weights over epochs) and ``<stem>-change.png`` (the relative-change heatmap).
    """
    from transferlab.service.report import plot_transfer, results_frame

    store = open_store(db, create=False)
    try:
        info = store.find_experiment(experiment)
        title = f"{info.name} (experiment {info.id})"
        if info.study == "multitask":
            from transferlab.service.plot_multitask import plot_multitask, weights_frame
            from transferlab.service.report_multitask import multitask_frame

            frame, weights = multitask_frame(store, info.id), weights_frame(store, info.id)
            return plot_multitask(frame, weights, path, title=title)
        frame = results_frame(store, info.id)
    finally:
        store.close()
    plot_transfer(frame, path, title=title, metric_name=info.primary_metric)
    return [Path(path)]


def inspect(name: str, input_shape: str = "3x224x224", options: dict[str, Any] | None = None) -> Any:
    """Per-stage and total complexity of a backbone (``transferlab inspect``); see ``ComplexityReport``."""
    from transferlab.engine.complexity import inspect_backbone

    return inspect_backbone(name, input_shape, options)


def samples(
    experiment: str | int,
    trial: str | int | None = None,
    *,
    db: str | None = None,
    split: str = "test",
    n: int = 8,
    out: str | Path | None = None,
    beam_size: int = 3,
) -> dict[str, Any]:
    """What a trained trial predicts for the first ``n`` samples of ``split``.

    Caption targets: reference, greedy and beam-search captions as text. Image targets (autoencoder,
    VAE): a PNG grid of inputs and reconstructions (and, for a VAE, samples from the prior) at ``out``
    (default ``<experiment>-<trial id>-samples.png``). ``trial`` is a trial id or key; by default the
    completed trial with the best test value of the experiment's primary metric.

    Returns:
        ``{"trial": TrialInfo, "kind": target kind, "captions": [...]}`` or ``{..., "figure": Path}``.

    Raises:
        ValueError: no such trial, the trial has no checkpoint, or its target has no sample view.
    """
    from transferlab.engine.restore import restore_trial
    from transferlab.tasks.base import SPLITS

    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    store = open_store(db, create=False)
    try:
        info = store.find_experiment(experiment)
        chosen = _pick_trial(store, info, trial)
    finally:
        store.close()
    if not chosen.checkpoint_path:
        raise ValueError(f"trial {chosen.id} ({chosen.key}) has no checkpoint (status {chosen.status})")
    if "task" not in chosen.config:
        raise ValueError(
            f"trial {chosen.id} ({chosen.key}) is a multitask trial; samples shows single-head trials "
            f"(e.g. a single-task baseline `single:<key>`; `transferlab status {info.id}` lists them)"
        )
    model, task = restore_trial(chosen.config, chosen.checkpoint_path, data_hash=chosen.data_hash)
    dataset = task.dataset(split)
    kind = task.target.kind
    if kind == "caption":
        from transferlab.engine.caption_samples import caption_samples

        rows = caption_samples(model, task, dataset, n, beam_size=beam_size)
        return {"trial": chosen, "kind": kind, "captions": rows}
    if kind == "image":
        from transferlab.engine.image_samples import write_image_samples

        path = Path(out) if out is not None else Path(f"{info.name}-{chosen.id}-samples.png")
        return {"trial": chosen, "kind": kind, "figure": write_image_samples(model, task, dataset, path, n)}
    raise ValueError(
        f"trial {chosen.id} ({chosen.key}) predicts '{kind}' targets; samples shows caption targets "
        "(as text) and image targets (a PNG grid of reconstructions)"
    )


def _pick_trial(store: Any, info: Any, trial: str | int | None) -> Any:
    """The trial named by id or key, or the best completed one of the experiment."""
    from transferlab.service.report import SOURCE_CONDITIONS, results_frame

    trials = store.trials(info.id)
    if trial is not None:
        ref = str(trial)
        found = [t for t in trials if str(t.id) == ref or t.key == ref]
        if not found:
            keys = ", ".join(t.key for t in trials[:5])
            raise ValueError(
                f"experiment {info.id} ({info.name}) has no trial {ref!r}; give a trial id or key "
                f"(e.g. {keys}; `transferlab status {info.id}` lists them)"
            )
        return found[0]
    frame = results_frame(store, info.id)
    single_head = {t.id for t in trials if "task" in t.config}
    frame = frame[~frame["condition"].isin(SOURCE_CONDITIONS) & frame["trial_id"].isin(single_head)]
    if frame.empty:
        raise ValueError(f"experiment {info.id} ({info.name}) has no completed trial with a test value")
    best = frame.sort_values("value", ascending=not info.higher_is_better).iloc[0]
    return next(t for t in trials if t.id == int(best["trial_id"]))
