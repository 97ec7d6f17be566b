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
