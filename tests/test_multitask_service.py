"""The multitask study in the service: spec errors, the plan and its trial configs, the results frame,
its formats and the three figures over a hand-filled store, and one tiny study through Ray."""

from __future__ import annotations

import io
import json
import math
import textwrap
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from store_helpers import make_experiment

import transferlab
from transferlab.cli.main import cli
from transferlab.service.planner import plan_trials
from transferlab.service.plot_multitask import figure_paths, plot_multitask, weights_frame
from transferlab.service.report_multitask import MULTITASK_COLUMNS, format_multitask, multitask_frame
from transferlab.service.spec import CONDITION_MAX_LENGTH, validate_spec_text
from transferlab.service.spec_yaml import SpecError
from transferlab.service.store import Store, TrialRecord

pytest_plugins = ["store_fixtures"]  # db_url, pg_url and store fixtures

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SHAPES = "{name: shapes, target: %s, image_size: 16, train_size: 16, val_size: 16, test_size: 16}"
MULTITASK = textwrap.dedent(
    f"""
    name: mt
    study: multitask
    backbone: {{name: convnet, widths: [8, 8, 16]}}
    multitask:
      tasks:
        cls: {{task: {SHAPES % "label"}, head: classify}}
        seg: {{task: {SHAPES % "mask"}, head: {{name: unet, decoder_channels: [8]}}}}
      weightings: [equal, uncertainty]
    train: {{epochs: 1, batch_size: 8, optimizer: adamw, lr: 0.003}}
    seeds: [0]
    resources: {{cpu: 1}}
    """
)
CONTRACT_KEYS = {
    "study", "trial_key", "role", "condition", "depth", "seed", "split", "classes", "freeze_depth",
    "copy_depth", "bn_policy", "backbone", "tasks", "weighting", "train", "primary_metric",
}  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


def edited(**sections: Any) -> str:
    """``MULTITASK`` with top-level keys replaced (``multitask`` entries merge into its section)."""
    data = yaml.safe_load(MULTITASK)
    for key, value in sections.items():
        if key == "multitask":
            data["multitask"].update(value)
        else:
            data[key] = value
    return yaml.safe_dump(data, sort_keys=False)


def refused(text: str) -> str:
    with pytest.raises(SpecError) as info:
        validate_spec_text(text, "mt.yaml")
    return str(info.value)


# -- spec errors -------------------------------------------------------------------------------------


def test_top_level_task_or_head_is_refused_and_points_at_the_tasks() -> None:
    message = refused(edited(task="digits", head="classify"))
    assert "multitask.tasks" in message and "remove the top-level task and head" in message


def test_a_transfer_study_still_needs_its_task() -> None:
    text = "name: t\nstudy: single\nbackbone: convnet\n"
    assert "study 'single' needs a 'task'" in refused(text)


def test_unknown_weighting_gets_a_close_match() -> None:
    message = refused(edited(multitask={"weightings": ["equal", "uncertainity"]}))
    assert "multitask.weightings.1.name: weighting 'uncertainity' is not registered" in message
    assert "did you mean 'uncertainty'" in message


@pytest.mark.parametrize(
    ("key", "fragment"),
    [
        ("my-task", "task keys ['my-task'] are not allowed"),
        ("1st", "task keys ['1st'] are not allowed"),
        ("much_too_long", "task keys ['much_too_long'] are not allowed"),
        ("score", "task keys ['score'] are reserved"),
        ("weight", "task keys ['weight'] are reserved"),
    ],
)
def test_bad_task_keys(key: str, fragment: str) -> None:
    data = yaml.safe_load(MULTITASK)
    data["multitask"]["tasks"][key] = data["multitask"]["tasks"].pop("cls")
    message = refused(yaml.safe_dump(data))
    assert f"multitask.tasks: {fragment}" in message


def test_one_task_is_refused() -> None:
    data = yaml.safe_load(MULTITASK)
    del data["multitask"]["tasks"]["seg"]
    assert "needs at least 2 tasks, got 1 (cls); one task alone is a 'single' study" in refused(
        yaml.safe_dump(data)
    )


def test_fixed_weights_must_name_every_task() -> None:
    message = refused(edited(multitask={"weightings": [{"name": "fixed", "weights": {"cls": 1}}]}))
    assert "multitask.weightings.0: weighting 'fixed': weights lacks task 'seg'" in message


def test_weighting_options_are_checked() -> None:
    message = refused(edited(multitask={"weightings": [{"name": "dwa", "temp": 2}]}))
    assert "multitask.weightings.0: weighting 'dwa' has no option 'temp'" in message


def test_a_frozen_trunk_needs_trunk_weights() -> None:
    message = refused(edited(multitask={"freeze_depths": [0, 2]}))
    assert "multitask.freeze_depths: depths [2] freeze the first stages of the shared trunk" in message
    assert "weights: PATH" in message
    assert "depth 4 is deeper than backbone 'convnet'" in refused(
        edited(multitask={"freeze_depths": [4]}, backbone={"name": "convnet", "widths": [8, 8, 16]})
    )


def test_frozen_trunk_from_a_weights_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from transferlab.registry import BACKBONES

    path = tmp_path / "trunk.safetensors"
    save_file(BACKBONES.get("convnet")(in_channels=3, widths=[8, 8, 16]).state_dict(), str(path))
    backbone = {"name": "convnet", "widths": [8, 8, 16], "weights": str(path)}
    vspec = validate_spec_text(edited(backbone=backbone, multitask={"freeze_depths": [0, 2]}), "mt.yaml")
    assert vspec.depths == (0, 2)
    configs = [t.config(vspec) for t in plan_trials(vspec)]
    assert {(c["depth"], c["freeze_depth"]) for c in configs} == {(0, 0), (2, 2)}
    assert all(c["backbone"]["options"]["weights"] == str(path) for c in configs)


def test_a_head_that_cannot_predict_its_target_is_named() -> None:
    data = yaml.safe_load(MULTITASK)
    data["multitask"]["tasks"]["seg"]["head"] = "classify"
    message = refused(yaml.safe_dump(data))
    assert "multitask.tasks.seg.head: " in message and "mask" in message


def test_tasks_must_feed_the_trunk_the_same_input() -> None:
    data = yaml.safe_load(MULTITASK)
    data["multitask"]["tasks"]["dig"] = {"task": {"name": "digits", "image_size": 16}}
    message = refused(yaml.safe_dump(data))
    assert "multitask.tasks.dig.task: 'digits' feeds the backbone 1-channel 'image' inputs" in message


def test_augment_is_refused() -> None:
    assert "augment: a multitask study does not augment" in refused(edited(augment=["HorizontalFlip"]))


# -- the plan ----------------------------------------------------------------------------------------


def test_plan_counts_keys_and_configs() -> None:
    text = edited(
        seeds=[0, 1],
        multitask={"weightings": ["equal", {"name": "fixed", "weights": {"cls": 1, "seg": 2}},
                                  {"name": "fixed", "weights": {"cls": 2, "seg": 1}}]},
    )  # fmt: skip
    vspec = validate_spec_text(text, "mt.yaml")
    assert (vspec.primary_metric, vspec.higher_is_better) == ("score", True)
    trials = plan_trials(vspec)
    assert len(trials) == 2 * (3 + 2)  # seeds x (weightings + one baseline per task)
    assert [t.condition for t in trials[:5]] == ["equal", "fixed-1", "fixed-2", "single:cls", "single:seg"]
    assert {t.key for t in trials} >= {"all/s1/fixed-2/d0", "all/s0/single:seg/d0"}
    assert all(len(t.condition) <= CONDITION_MAX_LENGTH for t in trials)
    configs = {t.key: t.config(vspec) for t in trials}

    multi = configs["all/s1/fixed-2/d0"]
    assert set(multi) == CONTRACT_KEYS | {"task_metrics"}
    assert multi["study"] == "multitask" and multi["role"] == "multitask" and multi["seed"] == 1
    assert (multi["split"], multi["classes"], multi["copy_depth"], multi["primary_metric"]) == (
        "all", None, 0, "score",
    )  # fmt: skip
    assert multi["weighting"] == {"name": "fixed", "options": {"weights": {"cls": 2, "seg": 1}}}
    assert multi["tasks"]["seg"]["head"] == {"name": "unet", "options": {"decoder_channels": [8]}}
    assert multi["tasks"]["cls"]["task"]["options"]["target"] == "label"
    assert multi["task_metrics"] == {
        "cls": {"primary_metric": "accuracy", "higher_is_better": True},
        "seg": {"primary_metric": "miou", "higher_is_better": True},
    }
    json.dumps(multi)  # the store keeps it as JSON

    single = configs["all/s0/single:seg/d0"]
    assert "study" not in single  # run_trial must not hand it to the multitask engine
    assert single["role"] == "single" and single["primary_metric"] == "miou"
    assert single["task"] == multi["tasks"]["seg"]["task"] and single["head"] == multi["tasks"]["seg"]["head"]
    assert single["train"] == multi["train"] and single["backbone"] == multi["backbone"]


def test_plan_without_baselines() -> None:
    text = edited(multitask={"single_task_baselines": False})
    trials = plan_trials(validate_spec_text(text, "mt.yaml"))
    assert [t.role for t in trials] == ["multitask", "multitask"]


def test_validate_prints_the_tasks_and_the_weighting_by_depth_table(tmp_path: Path) -> None:
    spec = tmp_path / "mt.yaml"
    spec.write_text(MULTITASK)
    runner = CliRunner(env={"COLUMNS": "200"})
    result = runner.invoke(cli, ["validate", str(spec)])
    assert result.exit_code == 0, result.output
    assert "mt (multitask study): 4 trials" in result.output
    assert "seg: task shapes (mask), head unet (primary metric miou)" in result.output
    assert "single:cls" in result.output and "uncertainty" in result.output
    data = json.loads(runner.invoke(cli, ["validate", "-O", "json", str(spec)]).output)
    assert data["role"] == {"multitask": 2, "single": 2}
    assert data["tasks"]["cls"] == {"task": "shapes", "head": "classify", "primary_metric": "accuracy"}


def test_progress_lines_show_each_trials_own_metrics() -> None:
    from transferlab.cli.experiments import ProgressPrinter

    vspec = validate_spec_text(MULTITASK, "mt.yaml")
    printer = ProgressPrinter(vspec.primary_metric, {t.key: t.config(vspec) for t in plan_trials(vspec)})
    data = {"test/score": 0.5, "test/cls/accuracy": 0.75, "test/seg/miou": 0.25, "test/seg/loss": 1.0}
    assert printer._test_line("all/s0/equal/d0", data) == (
        "test score 0.5000 (cls accuracy 0.7500, seg miou 0.2500)"
    )
    assert printer._test_line("all/s0/single:seg/d0", {"test/miou": 0.125}) == "test miou 0.1250"
    assert printer._test_line("all/s0/single:cls/d0", {}) == "test accuracy n/a"


# -- reports over a hand-filled store ----------------------------------------------------------------

TASK_METRICS = {
    "cls": {"primary_metric": "accuracy", "higher_is_better": True},
    "rec": {"primary_metric": "mse", "higher_is_better": False},
}
# condition, seed, status, {task: test value} (a multitask trial) or value (a baseline)
HAND_TRIALS: list[tuple[str, int, str, Any]] = [
    ("equal", 0, "completed", {"cls": 0.84, "rec": 0.25}),
    ("equal", 1, "completed", {"cls": 0.92, "rec": 0.25}),
    ("uncertainty", 0, "completed", {"cls": 0.6, "rec": 0.1}),
    ("uncertainty", 1, "failed", {"cls": 0.99, "rec": 0.01}),  # failed: not a result
    ("single:cls", 0, "completed", 0.75),
    ("single:cls", 1, "completed", 0.85),
    ("single:rec", 0, "completed", 0.2),
    ("single:rec", 1, "completed", 0.2),
]


def fill_store(
    store: Store, *, baselines: bool = True, trials: list[tuple[str, int, str, Any]] = HAND_TRIALS
) -> int:
    exp_id = make_experiment(store, "mt-hand", study="multitask")
    records, values = [], {}
    for condition, seed, status, value in trials:
        if condition.startswith("single:") and not baselines:
            continue
        multi = not condition.startswith("single:")
        metric = "score" if multi else TASK_METRICS[condition[7:]]["primary_metric"]
        config = {"primary_metric": metric, **({"task_metrics": TASK_METRICS} if multi else {})}
        key = f"all/s{seed}/{condition}/d0"
        records.append(
            TrialRecord(key, "multitask" if multi else "single", condition, 0, seed, "all", "frozen", config)
        )
        values[key] = (status, multi, value, metric)
    ids = store.add_trials(exp_id, records)
    for key, (status, multi, value, metric) in values.items():
        if multi:
            rows = [
                (2, "test", f"{task}/{TASK_METRICS[task]['primary_metric']}", v) for task, v in value.items()
            ]
            rows += [
                (1, "test", "cls/accuracy", 0.0),
                (2, "test", "cls/loss", 9.0),
                (2, "test", "score", 0.5),
            ]
            rows += [
                (e, "train", f"weight/{t}", w * e) for e in (1, 2) for t, w in (("cls", 1.0), ("rec", 0.5))
            ]
        else:
            rows = [(2, "test", metric, value), (2, "test", "loss", 7.0)]
        store.add_metrics(ids[key], rows)
        store.finish_trial(ids[key], status)
    return exp_id


def by_task_and_weighting(frame: pd.DataFrame) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["task"], r["weighting"]): r for r in frame.to_dict("records")}


def test_relative_change_negative_transfer_and_delta_m(store: Store, db_url: str) -> None:
    frame = multitask_frame(store, fill_store(store))
    assert tuple(frame.columns) == MULTITASK_COLUMNS
    assert list(zip(frame["weighting"], frame["task"], strict=True)) == [
        ("equal", "cls"), ("equal", "rec"), ("uncertainty", "cls"), ("uncertainty", "rec"),
    ]  # fmt: skip
    rows = by_task_and_weighting(frame)
    cls = rows[("cls", "equal")]
    assert (cls["mean"], cls["n"], cls["single_mean"], cls["single_n"]) == (
        pytest.approx(0.88), 2, pytest.approx(0.8), 2,
    )  # fmt: skip
    assert cls["change_pct"] == pytest.approx(10.0) and not cls["negative_transfer"]
    # rec: lower is better, so a higher error is a negative change.
    rec = rows[("rec", "equal")]
    assert rec["change_pct"] == pytest.approx(-25.0) and rec["negative_transfer"]
    assert rows[("rec", "uncertainty")]["change_pct"] == pytest.approx(50.0)
    # Seed 1 of uncertainty failed: its change compares seed 0 with seed 0's baseline (0.75), not with
    # the mean of both baseline seeds (0.8).
    cls = rows[("cls", "uncertainty")]
    assert (cls["n"], cls["single_n"], cls["single_mean"]) == (1, 1, pytest.approx(0.75))
    assert cls["change_pct"] == pytest.approx(-20.0)
    assert rows[("cls", "equal")]["delta_m_pct"] == pytest.approx(-7.5)
    assert rows[("rec", "uncertainty")]["delta_m_pct"] == pytest.approx(15.0)
    assert "left out: 1 failed" in frame.attrs["summary"]
    assert frame.attrs["unpaired"] == [
        "cls under uncertainty at depth 0: seed 1 has no multitask value",
        "rec under uncertainty at depth 0: seed 1 has no multitask value",
    ]
    assert transferlab.results("mt-hand", db=db_url).equals(frame)


def test_changes_compare_the_same_seeds(store: Store) -> None:
    extra = [
        ("equal", 2, "completed", {"cls": 0.5, "rec": 0.5}),  # no baseline at seed 2
        ("single:cls", 3, "completed", 0.1),  # no multitask trial at seed 3
        ("dwa", 5, "completed", {"cls": 0.7, "rec": 0.3}),  # pairs with no baseline seed
    ]
    frame = multitask_frame(store, fill_store(store, trials=[*HAND_TRIALS, *extra]))
    rows = by_task_and_weighting(frame)
    cls = rows[("cls", "equal")]  # seeds 0 and 1 on both sides; seeds 2 and 3 left out
    assert (cls["mean"], cls["n"], cls["single_mean"], cls["single_n"]) == (
        pytest.approx(0.88), 2, pytest.approx(0.8), 2,
    )  # fmt: skip
    assert cls["change_pct"] == pytest.approx(10.0)
    assert rows[("rec", "equal")]["n"] == 2 and rows[("rec", "equal")]["change_pct"] == pytest.approx(-25.0)
    dwa = rows[("cls", "dwa")]  # no seed pairs up: the multitask value alone, no comparison
    assert (dwa["mean"], dwa["n"], dwa["single_n"]) == (pytest.approx(0.7), 1, 0)
    assert math.isnan(dwa["change_pct"]) and math.isnan(dwa["delta_m_pct"])
    assert frame.attrs["unpaired"] == [
        "cls under equal at depth 0: seed 3 has no multitask value, seed 2 has no single-task value",
        "rec under equal at depth 0: seed 2 has no single-task value",
        "cls under uncertainty at depth 0: seeds 1, 3 have no multitask value",
        "rec under uncertainty at depth 0: seed 1 has no multitask value",
        "cls under dwa at depth 0: seeds 0, 1, 3 have no multitask value, seed 5 has no single-task value",
        "rec under dwa at depth 0: seeds 0, 1 have no multitask value, seed 5 has no single-task value",
    ]
    summary = frame.attrs["summary"]
    assert "; unpaired seeds, left out of the comparison: cls under equal at depth 0: seed 3" in summary
    table = format_multitask(frame, "table", title="t")
    assert "rec under equal at depth 0: seed 2 has no single-task value" in table


def test_formats(store: Store) -> None:
    frame = multitask_frame(store, fill_store(store))
    table = format_multitask(frame, "table", title="hand")
    assert "0.880 ± 0.057 (+10.0%)" in table and "0.250 ± 0.000 (-25.0%!)" in table
    assert "mse ↓" in table and "Δm" in table and "-7.5%" in table and "*+15.0%*" in table
    # One seed of uncertainty: compared with that seed's baseline, which the cell names.
    assert "0.600 (n=1) (-20.0%! vs 0.750)" in table and "'vs x'" in table
    markdown = format_multitask(frame, "markdown", title="hand").splitlines()
    assert markdown[2] == "| depth | task | metric | single | equal | uncertainty |"
    assert "| 0 | Δm | mean change |  | -7.5% | **+15.0%** |" in markdown
    records = json.loads(format_multitask(frame, "json", title="hand"))
    assert (
        len(records) == 4
        and records[0]["task"] == "cls"
        and records[0]["std"] == pytest.approx(0.0566, abs=1e-4)
    )
    assert records[2]["std"] is None  # one seed: no spread
    parsed = pd.read_csv(io.StringIO(format_multitask(frame, "csv", title="hand")))
    assert tuple(parsed.columns) == MULTITASK_COLUMNS and parsed["negative_transfer"].tolist() == [
        False, True, True, False,
    ]  # fmt: skip


def test_without_baselines_there_is_no_change(store: Store) -> None:
    frame = multitask_frame(store, fill_store(store, baselines=False))
    assert frame["change_pct"].isna().all() and frame["negative_transfer"].isna().all()
    assert (frame["single_n"] == 0).all()
    assert "no single-task baselines" in format_multitask(frame, "table", title="t")
    assert json.loads(format_multitask(frame, "json", title="t"))[0]["negative_transfer"] is None


def test_three_figures(store: Store, tmp_path: Path) -> None:
    exp_id = fill_store(store)
    tmp_path = tmp_path / "figures"
    tmp_path.mkdir()
    frame, weights = multitask_frame(store, exp_id), weights_frame(store, exp_id)
    assert set(weights["task"]) == {"cls", "rec"} and weights["weight"].max() == 2.0
    assert len(weights) == 3 * 2 * 2  # completed multitask trials x epochs x tasks
    paths = plot_multitask(frame, weights, tmp_path / "mt.png", title="hand")
    assert (
        paths
        == figure_paths(tmp_path / "mt.png")
        == [tmp_path / n for n in ("mt.png", "mt-weights.png", "mt-change.png")]
    )
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mt-change.png", "mt-weights.png", "mt.png"]


def test_cli_results_and_plot(store: Store, db_url: str, tmp_path: Path) -> None:
    exp_id = fill_store(store)
    db = db_url
    runner = CliRunner(env={"COLUMNS": "250"})
    result = runner.invoke(cli, ["results", str(exp_id), "--db", db])
    assert result.exit_code == 0, result.output
    assert "multitask vs single-task" in result.output and "(+50.0% vs 0.200)" in result.output
    result = runner.invoke(cli, ["results", str(exp_id), "--db", db, "-O", "json"])
    assert len(json.loads(result.output)) == 4
    result = runner.invoke(cli, ["plot", str(exp_id), "--db", db, "-o", str(tmp_path / "f.png")])
    assert result.exit_code == 0, result.output
    assert "figures written to" in result.output and (tmp_path / "f-change.png").is_file()


def test_cli_results_says_what_is_missing_when_every_multitask_trial_failed(
    store: Store, db_url: str
) -> None:
    failed = [
        (c, seed, "failed" if c in ("equal", "uncertainty") else st, v) for c, seed, st, v in HAND_TRIALS
    ]
    exp_id = fill_store(store, trials=failed)
    frame = multitask_frame(store, exp_id)
    assert frame.empty and list(frame.columns) == list(MULTITASK_COLUMNS)
    result = CliRunner(env={"COLUMNS": "250"}).invoke(cli, ["results", str(exp_id), "--db", db_url])
    assert result.exit_code == 1
    message = " ".join(result.output.split())
    assert "has no completed multitask trial with a test value, so there is nothing to compare" in message
    assert "(0 multitask and 4 single-task trials with test values; left out: 4 failed;" in message


# -- one tiny study through Ray ----------------------------------------------------------------------


@pytest.mark.slow
def test_multitask_study_end_to_end(ray_session, tmp_path: Path) -> None:
    spec = tmp_path / "mt.yaml"
    spec.write_text(MULTITASK)
    db = f"sqlite:///{tmp_path / 'store.db'}"
    exp_id = transferlab.submit(spec, db=db, runs_dir=tmp_path / "runs")
    with Store.open(db, create=False) as store:
        trials = {t.key: t for t in store.trials(exp_id)}
        assert {t.status for t in trials.values()} == {"completed"}, {k: t.error for k, t in trials.items()}
        metrics = store.metrics_frame(exp_id)
    frame = transferlab.results(exp_id, db=db)
    assert len(frame) == 4 and frame["mean"].between(0, 1).all() and (frame["single_n"] == 1).all()
    assert frame["change_pct"].notna().all() and frame["delta_m_pct"].notna().all()
    names = set(metrics.loc[metrics["condition"] == "uncertainty", "name"])
    assert {"weight/cls", "weight/seg", "cls/accuracy", "seg/miou", "score"} <= names
    assert "miou" in set(metrics.loc[metrics["condition"] == "single:seg", "name"])
    paths = transferlab.plot(exp_id, tmp_path / "mt.png", db=db)
    assert all(p.read_bytes().startswith(PNG_MAGIC) for p in paths) and len(paths) == 3

    # A multitask checkpoint seeds a later study's frozen trunk.
    checkpoint = trials["all/s0/equal/d0"].checkpoint_path
    backbone = {"name": "convnet", "widths": [8, 8, 16], "weights": checkpoint}
    vspec = validate_spec_text(edited(backbone=backbone, multitask={"freeze_depths": [2]}), "again.yaml")
    assert vspec.depths == (2,)
