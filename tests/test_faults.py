"""Trial faults through Ray: transient errors retry from the last checkpoint; past max_failures they fail."""

from __future__ import annotations

from pathlib import Path

import pytest

import transferlab
from transferlab.service.store import Store

pytestmark = pytest.mark.slow

SPEC = """
name: {name}
study: single
backbone: {{name: convnet, widths: [4, 8, 8]}}
task: {{name: flaky_digits, image_size: 16, marker: "{marker}"}}
single: {{classes: [5, 6, 7, 8, 9]}}
train: {{epochs: 3, batch_size: 64, lr: 0.05}}
max_failures: {max_failures}
"""


def run(tmp_path: Path, name: str, max_failures: int):
    marker = tmp_path / f"{name}.marker"
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(SPEC.format(name=name, marker=marker, max_failures=max_failures))
    db = f"sqlite:///{tmp_path / 'store.db'}"
    exp = transferlab.submit(spec, db=db, runs_dir=tmp_path / "runs")
    store = Store.open(db, create=False)
    (trial,) = store.trials(exp)
    info = store.find_experiment(exp)
    store.close()
    return info, trial, marker, transferlab.metrics(exp, db=db)


def test_a_transient_error_is_retried_from_the_last_epoch(ray_session, tmp_path: Path) -> None:
    info, trial, marker, metrics = run(tmp_path, "flaky-retried", max_failures=1)
    assert marker.exists()  # the fault did happen
    assert (info.status, trial.status, trial.error) == ("completed", "completed", None)
    assert trial.provenance["resumed_from_epoch"] == 1  # epoch 1 was not trained again
    assert not metrics.duplicated(["trial_id", "epoch", "split", "name"]).any()
    assert set(metrics[metrics.split == "val"].epoch) == {1, 2, 3}
    assert set(metrics[metrics.split == "test"].name) == {"loss", "accuracy"}


def test_an_error_past_max_failures_fails_the_trial_with_its_reason(ray_session, tmp_path: Path) -> None:
    info, trial, marker, _ = run(tmp_path, "flaky-failed", max_failures=0)
    assert marker.exists()
    assert (info.status, trial.status) == ("failed", "failed")
    assert trial.error == "RuntimeError: transient failure (test)"
    assert trial.checkpoint_path is None


def test_out_of_memory_fails_the_trial_at_once_without_retries(ray_session, tmp_path: Path) -> None:
    attempts = tmp_path / "attempts.txt"
    spec = tmp_path / "oom.yaml"
    spec.write_text(
        SPEC.format(name="oom", marker="", max_failures=3).replace(
            '{name: flaky_digits, image_size: 16, marker: ""}',
            f'{{name: oom_digits, image_size: 16, attempts: "{attempts}"}}',
        )
    )
    db = f"sqlite:///{tmp_path / 'store.db'}"
    exp = transferlab.submit(spec, db=db, runs_dir=tmp_path / "runs")
    store = Store.open(db, create=False)
    (trial,) = store.trials(exp)
    store.close()
    assert trial.status == "failed" and trial.error.startswith("OutOfMemoryError: CUDA out of memory")
    assert attempts.read_text().count("attempt") == 1  # max_failures: 3, yet no retry
