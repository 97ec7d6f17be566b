"""Driver pieces that need no Ray: metric rows, error messages, the quickstart spec copies."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from transferlab.service.api import embedded_spec_text
from transferlab.service.driver import error_message, metric_rows

ROOT = Path(__file__).resolve().parents[1]


def test_metric_rows_keep_split_metrics_and_lr_only() -> None:
    result = {
        "epoch": 3,
        "train/loss": 0.5,
        "val/accuracy": 0.9,
        "test/accuracy": 0.8,
        "lr": 0.01,
        "time_this_iter_s": 1.2,
        "trial_id": "x",
        "checkpoint_path": "/a",
        "final": 1,
    }
    assert sorted(metric_rows(result)) == [
        (3, "test", "accuracy", 0.8),
        (3, "train", "loss", 0.5),
        (3, "train", "lr", 0.01),
        (3, "val", "accuracy", 0.9),
    ]


def test_error_message_is_the_worker_exception_line(tmp_path: Path) -> None:
    error_file = tmp_path / "error.txt"
    error_file.write_text(
        'Failure # 1 (occurred at 2026-11-27)\nray::ImplicitFunc.train()\n  File "fit.py", line 3\n'
        "transferlab.engine.fit.NonFiniteLossError: non-finite loss nan at epoch 2, step 9\n"
    )
    trial = SimpleNamespace(error_file=str(error_file), get_error=lambda: None)
    assert error_message(trial) == "NonFiniteLossError: non-finite loss nan at epoch 2, step 9"
    silent = SimpleNamespace(error_file=None, get_error=lambda: None)
    assert "without an error message" in error_message(silent)


def test_experiments_quickstart_is_the_embedded_spec() -> None:
    assert (ROOT / "experiments" / "quickstart.yaml").read_text() == embedded_spec_text()


class RecordingStore:
    """The store calls the driver makes when it skips a trial."""

    def __init__(self) -> None:
        self.finished: list[tuple[int, str, str | None]] = []

    def finish_trial(self, trial_id: int, status: str, error: str | None = None, **kwargs: object) -> None:
        self.finished.append((trial_id, status, error))


def test_the_graph_searcher_hands_out_each_trial_once_its_base_completed() -> None:
    from ray.tune.search import Searcher

    from transferlab.service.driver import StudyRun
    from transferlab.service.graph_search import GRAPHS, GraphSearcher
    from transferlab.service.planner import plan_trials
    from transferlab.service.spec import validate_spec_text

    trials = plan_trials(validate_spec_text(embedded_spec_text()))
    bases = [t for t in trials if t.base_key is None]
    assert bases and len(bases) < len(trials)
    events: list[tuple[str, str]] = []
    store = RecordingStore()
    ids = {t.key: i for i, t in enumerate(trials)}
    run = StudyRun(store, 1, ids, on_event=lambda kind, t, info: events.append((kind, t.key)))
    GRAPHS["g"] = (run, {t.key: t for t in trials}, {t.key: {"trial_key": t.key} for t in trials})
    try:
        searcher = GraphSearcher("g", [t.key for t in trials])
        handed = [searcher.suggest(str(i))["trial"]["trial_key"] for i in range(len(bases))]
        assert handed == [t.key for t in bases]
        assert searcher.suggest("x") is None  # every other trial waits for a base net still running
        # baseA and baseB: the base nets that other trials copy.
        first, second = [b for b in bases if any(t.base_key == b.key for t in trials)]
        run.status[first.key] = "completed"
        ready = [t.key for t in trials if t.base_key == first.key]
        assert [searcher.suggest(str(i))["trial"]["trial_key"] for i in range(len(ready))] == ready
        assert searcher.suggest("y") is None
        run.status[second.key] = "failed"
        assert searcher.suggest("z") == Searcher.FINISHED  # the rest are skipped, none is run
        skipped = [t for t in trials if t.base_key == second.key]
        assert skipped and events == [("skipped", t.key) for t in skipped]
        assert [(i, s) for i, s, _ in store.finished] == [(ids[t.key], "skipped") for t in skipped]
        assert all(second.key in error and "failed" in error for _, _, error in store.finished)
        assert {run.status[t.key] for t in skipped} == {"skipped"}
    finally:
        GRAPHS.pop("g")
