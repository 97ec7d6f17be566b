"""Results reports over a hand-built store: the per-trial frame, the pivot, its four formats and the plot."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pandas as pd
import pytest
from store_helpers import make_experiment, trial

from transferlab.service.report import (
    RESULT_COLUMNS,
    ReportError,
    ResultsSummary,
    format_results,
    pivot_results,
    plot_transfer,
    results_frame,
    results_summary,
    results_table,
)
from transferlab.service.store import Store

pytest_plugins = ["store_fixtures"]  # db_url, pg_url and store fixtures

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STD_OF_TWO_EIGHTHS = math.sqrt(0.03125)  # sample std (ddof=1) of two values 0.25 apart
# key: (condition, depth, seed, status, test accuracy by epoch)
TRIALS = {
    "baseA-s0": ("baseA", 0, 0, "completed", [0.5]),
    "baseA-s1": ("baseA", 0, 1, "completed", [0.75]),
    "baseB-s0": ("baseB", 0, 0, "completed", [0.875]),
    "baseB-s1": ("baseB", 0, 1, "completed", [0.625]),
    "AnB-d1-s0": ("AnB", 1, 0, "completed", [0.5]),
    "AnB-d1-s1": ("AnB", 1, 1, "completed", [0.5]),
    "BnB-d1-s0": ("BnB", 1, 0, "completed", [0.75]),
    "BnB-d1-s1": ("BnB", 1, 1, "completed", [0.875]),
    "BnB+-d2-s0": ("BnB+", 2, 0, "completed", [0.9]),
    "AnB-d2-s0": ("AnB", 2, 0, "completed", [0.1, 0.25]),  # the last epoch counts
    "AnB-d2-s1": ("AnB", 2, 1, "skipped", []),
    "random-d1-s0": ("random", 1, 0, "failed", [0.3]),  # failed: its metric is not a result
    "BnB-d2-s0": ("BnB", 2, 0, "pending", []),
    "BnB-d2-s1": ("BnB", 2, 1, "completed", []),  # completed without a test value
}


def fill_store(store: Store, *, higher_is_better: bool = True) -> int:
    exp_id = make_experiment(store, "yosinski", higher_is_better=higher_is_better)
    records = [trial(key, cond, depth, seed) for key, (cond, depth, seed, _, _) in TRIALS.items()]
    ids = store.add_trials(exp_id, records)
    for key, (_, _, _, status, values) in TRIALS.items():
        rows = [(epoch, "test", "accuracy", value) for epoch, value in enumerate(values, start=1)]
        rows += [(1, "val", "accuracy", 0.01), (1, "test", "loss", 9.0)]  # other splits and names are ignored
        store.add_metrics(ids[key], rows)
        if status != "pending":
            store.finish_trial(ids[key], status)
    return exp_id


@pytest.fixture
def frame(tmp_path: Path) -> pd.DataFrame:
    with Store.open(str(tmp_path / "report.db")) as sqlite_store:
        return results_frame(sqlite_store, fill_store(sqlite_store))


def cell(pivot: pd.DataFrame, depth: int, condition: str) -> tuple[float, float, int]:
    row = pivot.loc[depth]
    return row[(condition, "mean")], row[(condition, "std")], row[(condition, "n")]


def test_results_frame_keeps_completed_trials_with_a_test_value(store: Store) -> None:
    exp_id = fill_store(store)
    frame = results_frame(store, exp_id)
    assert tuple(frame.columns) == RESULT_COLUMNS
    assert sorted(frame["key"]) == sorted(k for k, v in TRIALS.items() if v[3] == "completed" and v[4])
    assert frame.set_index("key").loc["AnB-d2-s0", "value"] == 0.25
    assert frame.set_index("key").loc["BnB-d1-s1", ["role", "depth", "seed", "split_id"]].tolist() == [
        "transfer",
        1,
        1,
        "given",
    ]
    summary = frame.attrs["summary"]
    assert summary == results_summary(store, exp_id)
    assert summary == ResultsSummary(
        exp_id, "yosinski", "accuracy", True, 10, {"pending": 1, "failed": 1, "skipped": 1}, 1
    )
    assert (
        summary.line()
        == "10 trials with test accuracy; left out: 1 pending, 1 failed, 1 skipped, 1 completed without it"
    )


def test_pivot_means_stds_and_counts(frame: pd.DataFrame) -> None:
    pivot = pivot_results(frame, higher_is_better=True)
    assert pivot.index.tolist() == [0, 1, 2]
    assert list(pivot.columns.get_level_values("condition").unique()) == [
        "baseA",
        "baseB",
        "AnB",
        "BnB",
        "BnB+",
    ]
    assert cell(pivot, 0, "baseA") == (0.625, pytest.approx(STD_OF_TWO_EIGHTHS, abs=1e-15), 2)
    assert cell(pivot, 0, "baseB") == (0.75, pytest.approx(STD_OF_TWO_EIGHTHS, abs=1e-15), 2)
    assert cell(pivot, 1, "AnB") == (0.5, 0.0, 2)
    assert cell(pivot, 1, "BnB") == (0.8125, pytest.approx(STD_OF_TWO_EIGHTHS / 2, abs=1e-15), 2)
    mean, std, n = cell(pivot, 2, "BnB+")
    assert (mean, n) == (0.9, 1) and math.isnan(std)  # one value: no spread
    mean, _, n = cell(pivot, 2, "BnB")  # its only depth-2 trial has no test value
    assert math.isnan(mean) and n == 0


def test_csv_and_json_round_trip(frame: pd.DataFrame) -> None:
    pivot = pivot_results(frame, higher_is_better=True)
    records = json.loads(format_results(pivot, "json"))
    parsed = pd.read_csv(io.StringIO(format_results(pivot, "csv")))
    assert list(parsed.columns) == ["depth", "condition", "mean", "std", "n"]
    assert len(records) == len(parsed) == 6
    by_key = {(r["depth"], r["condition"]): r for r in records}
    assert by_key[(1, "BnB")] == {
        "depth": 1,
        "condition": "BnB",
        "mean": 0.8125,
        "std": pytest.approx(STD_OF_TWO_EIGHTHS / 2, abs=1e-15),
        "n": 2,
    }
    assert by_key[(2, "BnB+")]["std"] is None and (2, "BnB") not in by_key
    csv_row = parsed[(parsed.depth == 0) & (parsed.condition == "baseB")].iloc[0]
    assert (csv_row["mean"], csv_row["n"]) == (0.75, 2) and csv_row["std"] == pytest.approx(
        STD_OF_TWO_EIGHTHS
    )
    assert parsed[parsed.condition == "BnB+"]["std"].isna().all()


def test_table_and_markdown_show_mean_std_n_and_best(frame: pd.DataFrame) -> None:
    pivot = pivot_results(frame, higher_is_better=True)
    table = format_results(pivot, "table", title="yosinski: accuracy")
    assert "yosinski: accuracy" in table and "0.750 ± 0.177" in table and "0.812 ± 0.088 *" in table
    assert "0.900 (n=1) *" in table and "0.250 (n=1)" in table and "0.500 ± 0.000" in table
    assert "over n=2 seeds/splits" in table and "left out: 1 pending, 1 failed" in table
    assert results_table(pivot, "t").row_count == 3
    markdown = format_results(pivot, "markdown", title="yosinski")
    lines = markdown.splitlines()
    assert lines[:4] == [
        "### yosinski",
        "",
        "| depth | baseA | baseB | AnB | BnB | BnB+ |",
        "|---:|:---:|:---:|:---:|:---:|:---:|",
    ]
    assert lines[5] == "| 1 |  |  | 0.500 ± 0.000 | **0.812 ± 0.088** |  |"
    assert lines[6] == "| 2 |  |  | 0.250 (n=1) |  | **0.900 (n=1)** |"
    assert lines[-1].startswith("_mean ± std of test accuracy over n=2")


def test_best_follows_the_metric_direction(frame: pd.DataFrame) -> None:
    markdown = format_results(pivot_results(frame, higher_is_better=False), "markdown")
    assert "| 1 |  |  | **0.500 ± 0.000** | 0.812 ± 0.088 |  |" in markdown and "lower is better" in markdown


def test_empty_results_and_unknown_format(frame: pd.DataFrame) -> None:
    empty = pivot_results(frame.iloc[0:0], higher_is_better=True)
    assert json.loads(format_results(empty, "json")) == []
    assert format_results(empty, "csv") == "depth,condition,mean,std,n\n"
    assert "no completed trials" in format_results(empty, "table")
    with pytest.raises(
        ReportError, match="unknown results format 'xml'; choose one of table, csv, json, markdown"
    ):
        format_results(empty, "xml")


def test_plot_writes_a_png_atomically(frame: pd.DataFrame, tmp_path: Path) -> None:
    path = tmp_path / "plots" / "transfer.png"
    path.parent.mkdir()
    assert plot_transfer(frame, path, title="yosinski", metric_name="accuracy") == path
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert [p.name for p in path.parent.iterdir()] == ["transfer.png"]  # no temp file left behind


def test_plot_errors(frame: pd.DataFrame, tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="folder .*no_such_folder does not exist"):
        plot_transfer(frame, tmp_path / "no_such_folder" / "p.png", title="t", metric_name="accuracy")
    with pytest.raises(ReportError, match="nothing to plot"):
        plot_transfer(
            frame[frame.condition == "baseA"], tmp_path / "p.png", title="t", metric_name="accuracy"
        )
    assert not any(tmp_path.glob("*.png")) and not any(tmp_path.glob(".*.tmp"))


def test_plot_of_a_single_study(tmp_path: Path) -> None:
    with Store.open(str(tmp_path / "single.db")) as single_store:
        exp_id = make_experiment(single_store, "single", study="single")
        ids = single_store.add_trials(exp_id, [trial(f"s{seed}", "single", seed=seed) for seed in range(3)])
        for seed, trial_id in enumerate(ids.values()):
            single_store.add_metrics(trial_id, [(3, "test", "accuracy", 0.8 + seed / 100)])
            single_store.finish_trial(trial_id, "completed")
        frame = results_frame(single_store, exp_id)
    pivot = pivot_results(frame, higher_is_better=True)
    assert cell(pivot, 0, "single")[0] == pytest.approx(0.81) and cell(pivot, 0, "single")[2] == 3
    path = plot_transfer(frame, tmp_path / "single.png", title="single", metric_name="accuracy")
    assert path.read_bytes().startswith(PNG_MAGIC)
