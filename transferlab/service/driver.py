"""Run a planned study with Ray Tune and record everything in the store.

The driver is the only writer of the store: Ray workers report metrics with ``tune.report`` and a
Tune callback in this process writes them. The whole trial graph is one Tune experiment: a searcher
hands Tune each transfer net once the base net it copies has completed (so worker processes stay warm
from base nets to transfer nets); a transfer trial whose base failed is marked ``skipped`` with the
reason.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transferlab.service.planner import PlannedTrial, plan_trials
from transferlab.service.provenance import code_version, library_versions
from transferlab.service.spec import ValidatedSpec

DEFAULT_RUNS_DIR = "transferlab-runs"
SPLITS = ("train", "val", "test")
SHARED_RUNS_ENV = "TRANSFERLAB_SHARED_RUNS"
#: What a trial's frozen-prefix feature cache did (``FeatureCache.report``), kept in its provenance.
FEATURE_CACHE_FACTS = (
    "feature_cache",
    "feature_cache_reason",
    "feature_cache_dtype",
    "feature_cache_hits",
    "feature_cache_misses",
    "feature_cache_seconds_saved",
    "feature_cache_mb",
)
#: Where a trial ran (``FitResult.device``): its device, whether its data sat on the GPU, its peak.
DEVICE_FACTS = (
    "device",
    "data_on_device",
    "data_on_device_mb",
    "data_on_device_reason",
    "cuda_peak_mb",
    "cuda_held_at_start_mb",
)


class DriverError(RuntimeError):
    """The study cannot be run as asked (resources, cluster, store)."""


def runs_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """Where checkpoints and Tune's files go: ``--runs-dir``, ``TRANSFERLAB_RUNS`` or ./transferlab-runs."""
    return Path(path or os.environ.get("TRANSFERLAB_RUNS") or DEFAULT_RUNS_DIR).resolve()


def ensure_ray(address: str | None = None) -> None:
    """Connect to the Ray cluster at ``address``, or start a local Ray sized to this machine.

    An address is probed first (``probe_ray_address``), so a wrong host or port fails within seconds
    instead of after Ray's minutes of retries.
    """
    from transferlab.service.jobs import probe_ray_address, use_ray_token

    if address and address != "local":
        use_ray_token()
    import ray

    if ray.is_initialized():
        return
    if address:
        probe_ray_address(address)
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            # address="local" starts a fresh instance even when RAY_ADDRESS points elsewhere; Ray sizes
            # it to the CPUs and GPUs this process may use (cgroup and affinity limits included).
            ray.init(address="local", log_to_driver=False)
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError, ...
        if not address:
            raise DriverError(f"could not start a local Ray instance: {exc}") from exc
        hint = ""
        if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
            hint = (
                "; if the cluster uses token authentication (`transferlab cluster up` does), make its "
                "token available here as RAY_AUTH_TOKEN or in ~/.ray/auth_token"
            )
        raise DriverError(f"could not connect to the Ray cluster at {address}: {exc}{hint}") from exc


def check_resources(vspec: ValidatedSpec) -> None:
    """Refuse a trial that no node of this Ray cluster could ever schedule."""
    import ray

    need = vspec.spec.resources
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    for key, name, asked in (("CPU", "cpu", need.cpu), ("GPU", "gpu", need.gpu)):
        largest = max((n.get(key, 0.0) for n in nodes), default=0.0)
        if asked > largest:
            raise DriverError(
                f"resources.{name}: each trial asks for {asked:g} {key}s; the largest node of the Ray "
                f"cluster has {largest:g}"
            )


def check_cluster(store_url: Any, storage: Path, *, shared_runs: bool | None = None) -> None:
    """Refuse a run on a multi-node Ray cluster that its store or its runs dir cannot serve.

    Args:
        store_url: the store's SQLAlchemy URL (``Store.engine.url``; ``store.database.resolve_url``).
        storage: the runs dir (checkpoints and Tune files).
        shared_runs: the user says every node sees ``storage``; ``None`` reads ``TRANSFERLAB_SHARED_RUNS``.
    """
    import ray

    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if nodes < 2:
        return
    if store_url.get_backend_name() == "sqlite":
        raise DriverError(
            f"this Ray cluster has {nodes} nodes but the store is a SQLite file "
            f"({store_url.render_as_string(hide_password=True)}): a store shared by a cluster must be "
            "PostgreSQL. A SQLite file lives on one machine (a job's driver or a reader on another node "
            "cannot open it) and its locking does not work over a network file system; give "
            "--db postgresql://user@host/dbname (a server every node can reach)"
        )
    if shared_runs is None:
        shared_runs = os.environ.get(SHARED_RUNS_ENV, "").lower() in ("1", "true", "yes")
    if not shared_runs:
        raise DriverError(
            f"this Ray cluster has {nodes} nodes: trials run on any of them and transfer trials read their "
            f"base net's checkpoint, so every node must see the runs dir {storage} at that path (a network "
            f"file system). Put --runs-dir on one and say so with --shared-runs-dir (or {SHARED_RUNS_ENV}=1)"
        )


def _dirname(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text.replace("+", "plus"))


def ray_trainable(config: dict[str, Any]) -> None:
    """The Ray Tune function trainable: run one trial and report every epoch, then the test metrics."""
    from ray import tune

    from transferlab.engine.fit import NonFiniteLossError
    from transferlab.engine.trial import run_trial

    trial = config["trial"]

    def on_epoch(epoch: int, row: dict[str, float]) -> None:
        tune.report({"epoch": epoch, **row})

    try:
        result, facts = run_trial(
            trial, checkpoint_path=trial["checkpoint_path"], on_epoch=on_epoch, threads=trial.get("threads")
        )
    except (NonFiniteLossError, torch_oom_error()) as exc:
        # Deterministic failures: retrying cannot help, so end the trial as failed with the reason
        # instead of raising (which Tune would retry up to max_failures times).
        tune.report({"epoch": getattr(exc, "epoch", 0), "final": 1, "failed": f"{type(exc).__name__}: {exc}"})
        return
    final = {f"test/{k}": v for k, v in result.test.items()}
    tune.report(
        {
            "epoch": result.test_epoch,
            "final": 1,
            "best_epoch": result.best_epoch,
            "steps": result.steps,
            "fit_seconds": result.seconds,
            "checkpoint_path": str(result.checkpoint),
            **facts,
            **final,
        }
    )


def torch_oom_error() -> type[BaseException]:
    """torch's out-of-memory exception type."""
    import torch

    return torch.OutOfMemoryError


def metric_rows(result: dict[str, Any]) -> list[tuple[int, str, str, float]]:
    """(epoch, split, name, value) rows from a reported result dict."""
    epoch = int(result["epoch"])
    rows = []
    for key, value in result.items():
        split, _, name = key.partition("/")
        if split in SPLITS and name and isinstance(value, (int, float)):
            rows.append((epoch, split, name, float(value)))
    if isinstance(result.get("lr"), (int, float)):
        rows.append((epoch, "train", "lr", float(result["lr"])))
    return rows


def error_message(trial: Any) -> str:
    """A one-line reason from a failed Tune trial: the worker exception's last traceback line."""
    text = ""
    error_file = getattr(trial, "error_file", None)
    if error_file and Path(error_file).is_file():
        text = Path(error_file).read_text(errors="replace")
    else:
        error = trial.get_error()
        text = str(error) if error is not None else ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return "the trial failed without an error message (see the Ray logs)"
    # Ray's text ends with the worker's "package.module.ExceptionType: message"; drop the module path.
    kind, sep, message = lines[-1].partition(": ")
    return f"{kind.rsplit('.', 1)[-1]}: {message}" if sep and " " not in kind else lines[-1]


@dataclass
class StudyRun:
    """State shared by the driver and its Tune callback."""

    store: Any
    experiment_id: int
    trial_ids: dict[str, int]
    on_event: Callable[[str, PlannedTrial, dict[str, Any]], None] | None = None
    status: dict[str, str] = field(default_factory=dict)
    final: dict[str, dict[str, Any]] = field(default_factory=dict)


def _make_callback(run: StudyRun, by_key: dict[str, PlannedTrial]) -> Any:
    from ray import tune

    class StoreCallback(tune.Callback):
        """Writes trial starts, per-epoch metrics and outcomes to the store (driver process)."""

        # Tune pickles its run config (callbacks included) to restore experiments; ours holds a live
        # database connection and is never restored that way (the store itself drives resumption).
        def __reduce__(self) -> tuple:
            return (tune.Callback, ())

        def _key(self, trial: Any) -> str:
            return trial.config["trial"]["trial_key"]

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            key = self._key(trial)
            run.store.start_trial(run.trial_ids[key], ray_trial_id=trial.trial_id)
            run.status[key] = "running"
            if run.on_event:
                run.on_event("start", by_key[key], {})

        def on_trial_result(
            self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
        ) -> None:
            key = self._key(trial)
            run.store.add_metrics(run.trial_ids[key], metric_rows(result))
            if result.get("final"):
                run.final[key] = dict(result)
            elif run.on_event:
                run.on_event("epoch", by_key[key], result)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            key = self._key(trial)
            final = run.final.get(key)
            if final is None:  # the trainable returned without its final report
                self._fail(key, "trial ended without reporting test metrics")
                return
            if final.get("failed"):
                self._fail(key, str(final["failed"]))
                return
            run.store.finish_trial(
                run.trial_ids[key],
                "completed",
                checkpoint_path=final["checkpoint_path"],
                data_hash=final.get("data_hash"),
                provenance_update={
                    k: final.get(k)
                    for k in (
                        "data_hash",
                        "best_epoch",
                        "steps",
                        "fit_seconds",
                        "copied_tensors",
                        "resumed_from_epoch",
                        "num_stages",
                        "torch_threads",
                        *FEATURE_CACHE_FACTS,
                        *DEVICE_FACTS,
                    )
                },
            )
            run.status[key] = "completed"
            if run.on_event:
                run.on_event("completed", by_key[key], final)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._fail(self._key(trial), error_message(trial))

        def _fail(self, key: str, reason: str) -> None:
            run.store.finish_trial(run.trial_ids[key], "failed", error=reason)
            run.status[key] = "failed"
            if run.on_event:
                run.on_event("failed", by_key[key], {"error": reason})

    return StoreCallback()


def skip_trial(run: StudyRun, trial: PlannedTrial, reason: str) -> None:
    """Mark ``trial`` skipped (its base net did not complete) in the store and tell ``on_event``."""
    run.store.finish_trial(run.trial_ids[trial.key], "skipped", error=reason)
    run.status[trial.key] = "skipped"
    if run.on_event:
        run.on_event("skipped", trial, {"error": reason})


def run_graph(
    run: StudyRun,
    vspec: ValidatedSpec,
    trials: list[PlannedTrial],
    configs: dict[str, dict[str, Any]],
    storage: Path,
    name: str,
) -> None:
    """Run ``trials`` (plan order: base nets first) as one Tune experiment; see ``GraphSearcher``."""
    from ray import tune

    from transferlab.service.graph_search import GRAPHS, GraphSearcher

    # Tune's per-trial CSV/JSON/TensorBoard loggers duplicate what the store keeps; skip them.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # Tune's newer console output prints a banner per experiment whatever `verbose` says; the older
    # reporter honours verbose=0. Our own progress bar and per-trial lines replace both.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    by_key = {t.key: t for t in trials}
    experiment = vspec.spec.name
    res = vspec.spec.resources
    trainable = tune.with_resources(ray_trainable, {"cpu": res.cpu, "gpu": res.gpu})
    graph = f"{run.experiment_id}-{name}"
    GRAPHS[graph] = (run, by_key, configs)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=GraphSearcher(graph, [t.key for t in trials]),
            num_samples=len(trials),
            # Tune asks a custom searcher for one trial at a time unless told how many may run at
            # once; every trial may (Ray's resources are the limit).
            max_concurrent_trials=len(trials),
            trial_name_creator=lambda t: by_key[t.config["trial"]["trial_key"]].display_name(experiment),
            trial_dirname_creator=lambda t: _dirname(
                by_key[t.config["trial"]["trial_key"]].display_name(experiment)
            ),
            # Reusing worker processes saves importing torch and loading data for every trial.
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(storage),
            callbacks=[_make_callback(run, by_key)],
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=vspec.spec.max_failures),
        ),
    )
    # Tune logs its bookkeeping at INFO/WARNING (including that the per-trial result files we turned
    # off are missing); the store and our progress output say what matters.
    tune_logger = logging.getLogger("ray.tune")
    level = tune_logger.level
    tune_logger.setLevel(logging.ERROR)
    # ...but keep Tune's warning that a trial waits for resources the cluster does not have.
    logging.getLogger("ray.tune.execution.insufficient_resources_manager").setLevel(logging.WARNING)
    # Tune installs its own Ctrl-C handler and never restores ours; put it back afterwards.
    in_main = threading.current_thread() is threading.main_thread()
    sigint = signal.getsignal(signal.SIGINT) if in_main else None
    try:
        tuner.fit()
    finally:
        GRAPHS.pop(graph, None)
        tune_logger.setLevel(level)
        if in_main:
            signal.signal(signal.SIGINT, sigint)


def _record(
    vspec: ValidatedSpec, store: Any, trials: list[PlannedTrial], storage: Path
) -> tuple[int, dict[str, dict[str, Any]], dict[str, int]]:
    """Write the experiment and its planned trials; return its id, the trial configs and trial ids by key."""
    from transferlab.service.store import TrialRecord

    spec = vspec.spec
    exp_id = store.create_experiment(
        name=spec.name,
        study=spec.study,
        spec_text=vspec.text,
        spec_json=spec.model_dump(mode="json"),
        spec_hash=vspec.spec_hash,
        primary_metric=vspec.primary_metric,
        higher_is_better=vspec.higher_is_better,
        storage_path=str(storage),
        code_version=code_version(),
    )
    folder = storage / f"{_dirname(spec.name)}-{exp_id}"
    provenance = {"code_version": code_version(), "libraries": library_versions()}
    configs: dict[str, dict[str, Any]] = {}
    records = []
    for t in trials:
        cfg = t.config(vspec)
        cfg.update(
            checkpoint_path=str(folder / "checkpoints" / _dirname(t.key) / "model.safetensors"),
            threads=max(1, int(spec.resources.cpu)),
            experiment_id=exp_id,
            tune_folder=str(folder / "tune"),
        )
        if t.base_key is not None:  # planned before its dependents, so its path is known
            cfg["base_checkpoint"] = configs[t.base_key]["checkpoint_path"]
        configs[t.key] = cfg
        records.append(
            TrialRecord(
                key=t.key,
                role=t.role,
                condition=t.condition,
                depth=t.depth,
                seed=t.seed,
                split=t.split,
                bn_policy=t.bn_policy,
                config=cfg,
                base_key=t.base_key,
                provenance=provenance,
            )
        )
    return exp_id, configs, store.add_trials(exp_id, records)


def record_study(vspec: ValidatedSpec, store: Any, runs: Path | None = None) -> int:
    """Record the experiment and its planned trials, all ``pending``, without running them.

    ``resume_study`` (``transferlab resume EXP``) runs them later: ``submit --detach`` records the
    study here, then submits that resume as a Ray Job.
    """
    exp_id, _, _ = _record(vspec, store, plan_trials(vspec), runs_dir(runs))
    return exp_id


def run_study(
    vspec: ValidatedSpec,
    store: Any,
    *,
    address: str | None = None,
    runs: Path | None = None,
    on_event: Callable[[str, PlannedTrial, dict[str, Any]], None] | None = None,
    on_created: Callable[[int, list[PlannedTrial]], None] | None = None,
    shared_runs: bool | None = None,
) -> int:
    """Record the experiment and its planned trials, run them through Ray Tune, and return its id.

    Nothing is written before Ray is reached and the cluster can serve the study (``check_resources``,
    ``check_cluster``; ``shared_runs`` as there). Ctrl-C or SIGTERM stops the study: unfinished trials
    are marked ``cancelled`` (never ``completed``), the experiment ``cancelled``, and
    ``StudyInterrupted`` is raised.
    """
    trials = plan_trials(vspec)
    storage = runs_dir(runs)
    ensure_ray(address)
    check_resources(vspec)
    check_cluster(store.engine.url, storage, shared_runs=shared_runs)
    exp_id, configs, trial_ids = _record(vspec, store, trials, storage)
    run = StudyRun(store, exp_id, trial_ids, on_event=on_event)
    _execute(run, vspec, trials, configs, on_created)
    return exp_id


FINAL_STATUSES = ("completed", "failed", "skipped")


def resume_study(
    experiment: str | int,
    store: Any,
    *,
    address: str | None = None,
    on_event: Callable[[str, PlannedTrial, dict[str, Any]], None] | None = None,
    on_created: Callable[[int, list[PlannedTrial]], None] | None = None,
    shared_runs: bool | None = None,
) -> int:
    """Finish an interrupted experiment: run every trial that is not completed, failed or skipped.

    Completed trials are untouched and never run again; trials left ``running`` by a driver that died,
    ``pending`` or ``cancelled`` run again (continuing from their last saved epoch when there is one),
    with the configs stored when the experiment was submitted.
    """
    from transferlab.service.spec import validate_spec_text

    info = store.find_experiment(experiment)
    vspec = validate_spec_text(info.spec_text, f"experiment {info.id} ({info.name})")
    trials = plan_trials(vspec)
    stored = {t.key: t for t in store.trials(info.id)}
    if set(stored) != {t.key for t in trials}:
        raise DriverError(
            f"experiment {info.id}'s stored trials no longer match its spec's plan under this transferlab "
            f"({len(stored)} stored, {len(trials)} planned); it cannot be resumed with this version"
        )
    ensure_ray(address)
    check_resources(vspec)
    check_cluster(store.engine.url, Path(info.storage_path or runs_dir()), shared_runs=shared_runs)
    run = StudyRun(store, info.id, {k: t.id for k, t in stored.items()}, on_event=on_event)
    run.status = {k: t.status for k, t in stored.items() if t.status in FINAL_STATUSES}
    _execute(run, vspec, trials, {k: dict(t.config) for k, t in stored.items()}, on_created)
    return info.id


def _execute(
    run: StudyRun,
    vspec: ValidatedSpec,
    trials: list[PlannedTrial],
    configs: dict[str, dict[str, Any]],
    on_created: Callable[[int, list[PlannedTrial]], None] | None,
) -> None:
    """Run the trials without a final status as one Tune experiment and set the experiment's status."""
    store, exp_id = run.store, run.experiment_id
    try:
        if on_created:
            on_created(exp_id, [t for t in trials if t.key not in run.status])
        store.set_experiment_status(exp_id, "running", started=True)
        with _sigterm_as_interrupt():
            todo = sorted((t for t in trials if t.key not in run.status), key=lambda t: t.level)
            if todo:
                tune_folder = Path(configs[todo[0].key]["tune_folder"])
                # A fresh Tune experiment name per attempt: a resumed study never reuses a dead one's files.
                name = f"study-{time.strftime('%Y%m%d-%H%M%S')}"
                run_graph(run, vspec, todo, configs, tune_folder, name)
                # Tune answers Ctrl-C by stopping its trials and returning normally; notice that here.
                unfinished = [t.key for t in todo if run.status.get(t.key) not in FINAL_STATUSES]
                if unfinished:
                    raise StudyInterrupted(
                        f"the study was interrupted with {len(unfinished)} trials unfinished"
                    )
    except BaseException as exc:
        cancelled = _cancel_unfinished(run, trials)
        store.set_experiment_status(exp_id, "cancelled", finished=True)
        if isinstance(exc, (KeyboardInterrupt, StudyInterrupted)):
            raise StudyInterrupted(
                f"experiment {exp_id} was interrupted: {cancelled} unfinished trials were marked cancelled; "
                f"`transferlab resume {exp_id}` finishes it"
            ) from None
        raise
    _cancel_unfinished(run, trials)
    done = all(run.status.get(t.key) == "completed" for t in trials)
    store.set_experiment_status(exp_id, "completed" if done else "failed", finished=True)


class StudyInterrupted(DriverError):
    """The study was stopped (Ctrl-C, SIGTERM) before every trial finished."""


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C while the study runs (main thread only).

    The handler re-raises it as SIGINT, so whoever handles Ctrl-C at that moment acts: Tune's
    handler (stop the running trials cleanly) while Tune runs, Python's (``KeyboardInterrupt``) before
    and after.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        signal.raise_signal(signal.SIGINT)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _cancel_unfinished(run: StudyRun, trials: list[PlannedTrial]) -> int:
    """Mark every trial that neither finished nor was skipped as cancelled; return how many."""
    count = 0
    for t in trials:
        if run.status.get(t.key) in (None, "running"):
            run.store.finish_trial(
                run.trial_ids[t.key], "cancelled", error="the study stopped before this trial finished"
            )
            run.status[t.key] = "cancelled"
            count += 1
    return count
