"""Cross-task transfer: base net A learns a source task, the transfer nets another task and head.

Validation, planning and reporting are checked without training; one tiny study (shapes
classification -> shapes segmentation) runs through Ray and the CLI end to end.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import transferlab
from transferlab.cli.main import cli
from transferlab.engine.checkpoint import load_state
from transferlab.service.planner import plan_trials
from transferlab.service.report import pivot_results, results_frame
from transferlab.service.spec import validate_spec_text
from transferlab.service.spec_yaml import SpecError
from transferlab.service.store import Store

SOURCE_TASK = (
    "task: {name: shapes, target: label, image_size: 16, train_size: 64, val_size: 32, test_size: 32}"
)
CROSS = textwrap.dedent(
    """
    name: cross
    study: transfer
    backbone: {name: convnet, widths: [8, 8, 16]}
    head: {name: unet, decoder_channels: [8]}
    task: {name: shapes, target: mask, image_size: 16, train_size: 64, val_size: 32, test_size: 32}
    transfer:
      source:
        task: {name: shapes, target: label, image_size: 16, train_size: 64, val_size: 32, test_size: 32}
      depths: [1, 3]
      conditions: [AnB, AnB+, random]
    train: {epochs: 2, batch_size: 32, optimizer: adamw, lr: 0.003}
    seeds: [0]
    resources: {cpu: 1}
    """
)


def validate(text: str) -> object:
    return validate_spec_text(text, "cross.yaml")


def refused(text: str) -> str:
    with pytest.raises(SpecError) as info:
        validate(text)
    return str(info.value)


# -- validation and planning -------------------------------------------------------------------------


def test_plan_trains_base_net_a_on_the_source_task_and_head() -> None:
    vspec = validate(CROSS)
    assert (vspec.primary_metric, vspec.source_primary_metric) == ("miou", "accuracy")
    trials = plan_trials(vspec)
    assert len(trials) == 2 + 2 * 3  # baseA, baseB (the baseline line) + 2 depths x 3 conditions
    configs = {t.key: t.config(vspec) for t in trials}
    base_a = configs["all/s0/baseA/d0"]
    assert base_a["task"]["options"]["target"] == "label" and base_a["head"]["name"] == "classify"
    assert base_a["primary_metric"] == "accuracy" and base_a["classes"] is None
    for key, config in configs.items():
        if key != "all/s0/baseA/d0":
            assert config["task"]["options"]["target"] == "mask", key
            assert config["head"] == {"name": "unet", "options": {"decoder_channels": [8]}}
            assert config["primary_metric"] == "miou"
    anb = next(t for t in trials if t.condition == "AnB" and t.depth == 3)
    assert (anb.base_key, anb.copy_depth, anb.freeze_depth) == ("all/s0/baseA/d0", 3, 3)


def test_a_given_split_applies_a_to_the_source_task_and_b_to_the_target() -> None:
    text = CROSS.replace("  source:", "  split: {A: [0, 1, 2], B: [3, 4, 5]}\n  source:")
    trials = plan_trials(validate(text))
    classes = {t.condition: t.classes for t in trials}
    assert classes["baseA"] == (0, 1, 2) and classes["AnB"] == (3, 4, 5)


def test_transfer_needs_a_split_or_a_source() -> None:
    text = CROSS.replace("  source:\n", "  xsource:\n")
    assert "transfer.xsource: unknown key; did you mean 'source'?" in refused(text)
    text = "\n".join(
        line for line in CROSS.splitlines() if "source" not in line and "target: label" not in line
    )
    assert "needs a 'split' of the classes into A and B, or a 'source' task" in refused(text)


def test_source_errors_name_the_source_fields() -> None:
    assert "transfer.source.task.name: task 'shapez' is not registered; did you mean 'shapes'" in refused(
        CROSS.replace("task: {name: shapes, target: label", "task: {name: shapez, target: label")
    )
    message = refused(
        CROSS.replace(
            "    task: {name: shapes, target: label",
            "    head: fcn\n    task: {name: shapes, target: label",
        )
    )
    assert "transfer.source.head: head 'fcn' predicts mask targets, but the task provides 'label'" in message
    digits = "task: {name: digits, image_size: 16}"
    message = refused(CROSS.replace(SOURCE_TASK, digits))
    assert (
        "transfer.source.task: 'digits' feeds the backbone 1-channel 'image' inputs but 'shapes' 3-channel"
        in message
    )


def test_random_split_needs_the_same_classes_in_both_tasks() -> None:
    text = CROSS.replace(
        SOURCE_TASK,
        "task: {name: digits, image_size: 16}",
    ).replace("  source:", "  split: {random: true, seeds: [0]}\n  source:")
    message = refused(text)
    assert "transfer.split: a random split needs the same classes in both tasks" in message


# -- one tiny study end to end ---------------------------------------------------------------------


@pytest.mark.slow
def test_cross_task_study_end_to_end(ray_session, tmp_path: Path) -> None:
    spec = tmp_path / "cross.yaml"
    spec.write_text(CROSS)
    db = f"sqlite:///{tmp_path / 'store.db'}"
    exp_id = transferlab.submit(spec, db=db, runs_dir=tmp_path / "runs")

    with Store.open(db, create=False) as store:
        trials = {t.key: t for t in store.trials(exp_id)}
        assert {t.status for t in trials.values()} == {"completed"}
        frame = results_frame(store, exp_id)
    # baseA reports its own task's metric; every other trial the target task's.
    metrics = dict(zip(frame["condition"] + "/" + frame["depth"].astype(str), frame["metric"], strict=True))
    assert metrics.pop("baseA/0") == "accuracy" and set(metrics.values()) == {"miou"}
    assert frame["value"].between(0, 1).all() and len(frame) == 8
    assert frame.attrs["summary"].source_metric == "accuracy"
    pivot = pivot_results(frame, higher_is_better=True)
    assert set(pivot.columns.get_level_values("condition")) == {"baseA", "baseB", "AnB", "AnB+", "random"}

    # AnB at depth 3 holds base net A's first three stages bit for bit; its head is a U-Net.
    anb, base_a = trials["all/s0/AnB/d3"], trials["all/s0/baseA/d0"]
    mine, theirs = load_state(anb.checkpoint_path), load_state(base_a.checkpoint_path)
    stages = tuple(f"backbone.stages.{i}." for i in range(3))
    copied = [k for k in theirs if k.startswith(stages)]
    assert copied and all(torch.equal(mine[k], theirs[k]) for k in copied)
    assert any(k.startswith("head.blocks.") for k in mine) and not any(
        k.startswith("head.blocks.") for k in theirs
    )

    runner = CliRunner()
    result = runner.invoke(cli, ["results", str(exp_id), "--db", db])
    assert result.exit_code == 0, result.output
    assert "test miou" in result.output and "baseA: test accuracy on the source task" in result.output
    png = tmp_path / "cross.png"
    result = runner.invoke(cli, ["plot", str(exp_id), "--db", db, "--out", str(png)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_name_base_net_a_as_the_source_even_with_the_same_metric(tmp_path: Path) -> None:
    """A source task scored like the target (accuracy -> accuracy) is still marked as the source's."""
    from tests.store_helpers import trial

    with Store.open(str(tmp_path / "same.db")) as store:
        exp = store.create_experiment(
            name="same",
            study="transfer",
            spec_text="name: same\n",
            spec_json={"name": "same", "transfer": {"source": {"task": {"name": "digits"}}}},
            spec_hash="ab" * 32,
            primary_metric="accuracy",
            higher_is_better=True,
            storage_path=None,
            code_version="test",
        )
        config = {"primary_metric": "accuracy"}
        ids = store.add_trials(exp, [trial("a", "baseA", config=config), trial("b", "baseB", config=config)])
        for key, value in (("a", 0.9), ("b", 0.8)):
            store.add_metrics(ids[key], [(1, "test", "accuracy", value)])
            store.finish_trial(ids[key], "completed")
        summary = results_frame(store, exp).attrs["summary"]
        assert summary.source_metric == "accuracy"
        assert "(baseA: test accuracy on the source task)" in summary.line()
        plain = store.create_experiment(
            name="plain",
            study="transfer",
            spec_text="name: plain\n",
            spec_json={"name": "plain", "transfer": {"split": {"A": [0, 1], "B": [2, 3]}}},
            spec_hash="cd" * 32,
            primary_metric="accuracy",
            higher_is_better=True,
            storage_path=None,
            code_version="test",
        )
        ids = store.add_trials(plain, [trial("a", "baseA")])
        store.add_metrics(ids["a"], [(1, "test", "accuracy", 0.9)])
        store.finish_trial(ids["a"], "completed")
        assert results_frame(store, plain).attrs["summary"].source_metric is None
