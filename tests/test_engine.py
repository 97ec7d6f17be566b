"""fit(), checkpoints and one trial run locally (no Ray)."""

from __future__ import annotations

import contextlib
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from transferlab.engine.assembly import build_model, build_task
from transferlab.engine.checkpoint import (
    load_backbone_stages,
    load_state,
    read_checkpoint_metadata,
    save_checkpoint,
)
from transferlab.engine.fit import FitConfig, NonFiniteLossError, build_optimizer, evaluate, fit
from transferlab.engine.trial import run_trial

BACKBONE = ("convnet", {"widths": [4, 8, 8]})
HEAD = ("classify", {})


@pytest.fixture(scope="module")
def task():
    return build_task("digits", {"image_size": 16}, classes=[5, 6, 7, 8, 9])


def model_for(task, depth: int = 0, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(BACKBONE, HEAD, task, freeze_depth=depth)


def test_fit_learns_and_reports_every_epoch(task, tmp_path: Path) -> None:
    rows = []
    result = fit(
        model_for(task),
        task,
        FitConfig(epochs=3, batch_size=64, lr=0.05),
        on_epoch=lambda e, r: rows.append((e, r)),
        checkpoint_path=tmp_path / "m.safetensors",
    )
    assert [e for e, _ in rows] == [1, 2, 3] and result.epochs_run == 3
    assert set(rows[0][1]) >= {"train/loss", "train/accuracy", "val/loss", "val/accuracy", "lr"}
    assert rows[-1][1]["train/loss"] < rows[0][1]["train/loss"]
    assert result.test["accuracy"] > 0.5  # 5 classes: chance is 0.2
    assert result.checkpoint == tmp_path / "m.safetensors" and result.checkpoint.is_file()
    assert list(tmp_path.iterdir()) == [tmp_path / "m.safetensors"]  # no temp files left behind
    assert read_checkpoint_metadata(result.checkpoint)["epoch"] == 3


def test_non_finite_loss_fails_with_epoch_step_and_value(task) -> None:
    nan_task = build_task("digits", {"image_size": 16}, classes=[0, 1])
    assert -(-len(nan_task.dataset("train")) // 64) == 4  # 4 steps per epoch: step 8 ends epoch 2
    calls = {"n": 0}
    original = nan_task.loss

    def loss(outputs, batch):  # the 8th training step (evaluation runs without grad) goes NaN
        calls["n"] += torch.is_grad_enabled()
        value = original(outputs, batch)
        return value * float("nan") if calls["n"] == 8 and torch.is_grad_enabled() else value

    nan_task.loss = loss
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss nan at epoch 2, step \d+") as info:
        fit(model_for(nan_task), nan_task, FitConfig(epochs=3, batch_size=64))
    assert info.value.epoch == 2 and info.value.step == 8


def test_stage_lr_multipliers_make_parameter_groups(task) -> None:
    model = model_for(task, depth=1)
    opt = build_optimizer(model, FitConfig(lr=0.1, stage_lr_mult=[0.0, 0.1, 0.01], head_lr_mult=2.0))
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == pytest.approx({"stage:1": 0.01, "stage:2": 0.001, "head": 0.2})  # stage 0 is frozen
    # Biases and BatchNorm weights (1-D tensors) get no weight decay, conv and linear weights do.
    for group in opt.param_groups:
        assert all((p.ndim > 1) == (group["weight_decay"] > 0) for p in group["params"])


def test_train_spec_and_fit_config_have_the_same_fields() -> None:
    from transferlab.service.spec import TrainSpec

    assert set(TrainSpec.model_fields) == {f.name for f in fields(FitConfig)} - {"seed"}
    defaults = FitConfig()
    for name, field in TrainSpec.model_fields.items():
        assert field.default == getattr(defaults, name), name


def test_fine_tune_multiplier_applies_only_to_copied_trainable_stages() -> None:
    from transferlab.engine.trial import fit_config

    config = trial_config(copy_depth=3, freeze_depth=1, fine_tune_lr_mult=0.1)
    config["train"]["stage_lr_mult"] = [1.0, 1.0, 0.5, 1.0]
    assert fit_config(config, 4).stage_lr_mult == pytest.approx([1.0, 0.1, 0.05, 1.0])


def test_trials_start_from_independent_weights() -> None:
    from transferlab.engine.trial import init_seed

    seeds = {
        init_seed(trial_config(condition=c, depth=d, split="given"))
        for c, d in [("baseA", 0), ("baseB", 0), ("AnB", 1), ("AnB", 2), ("BnB", 1), ("random", 1)]
    }
    assert len(seeds) == 6
    assert init_seed(trial_config(condition="AnB", depth=1)) == init_seed(
        trial_config(condition="AnB", depth=1)
    )


def test_early_stopping_restores_the_best_epoch(task) -> None:
    result = fit(
        model_for(task), task, FitConfig(epochs=30, batch_size=64, lr=0.05, early_stopping_patience=1)
    )
    assert result.epochs_run < 30
    assert 1 <= result.best_epoch < result.epochs_run
    assert result.test_epoch == result.best_epoch


def test_early_stopping_tests_the_best_weights(task, tmp_path: Path) -> None:
    model = model_for(task)
    config = FitConfig(epochs=30, batch_size=64, lr=0.05, early_stopping_patience=1)
    result = fit(model, task, config, checkpoint_path=tmp_path / "m.safetensors")
    # The model now holds the best epoch's weights: its val score is that epoch's, not the last's.
    again = evaluate(model, task, task.dataset("val"), config, torch.device("cpu"), contextlib.nullcontext)
    assert again["accuracy"] == pytest.approx(result.history[result.best_epoch - 1]["val/accuracy"])
    assert read_checkpoint_metadata(result.checkpoint)["epoch"] == result.best_epoch


def test_checkpoint_copies_exactly_the_first_stages(task, tmp_path: Path) -> None:
    base = model_for(task, seed=1)
    path = save_checkpoint(base, tmp_path / "base.safetensors", {"role": "base"})
    assert read_checkpoint_metadata(path) == {"role": "base"}
    target = model_for(task, seed=2)
    copied = load_backbone_stages(target, path, 2)
    assert copied and all(k.startswith(("backbone.stages.0.", "backbone.stages.1.")) for k in copied)
    state, base_state = target.state_dict(), base.state_dict()
    for key in state:
        same = torch.equal(state[key], base_state[key])
        if key.startswith(("backbone.stages.0.", "backbone.stages.1.")):
            assert same, key
        elif key.endswith("weight") and "bn" not in key and state[key].dim() > 1:
            assert not same, key  # the rest keeps its own initialisation


def test_checkpoint_from_another_backbone_is_refused(task, tmp_path: Path) -> None:
    other = build_model(("convnet", {"widths": [6, 8, 8]}), HEAD, task)
    path = save_checkpoint(other, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="other shapes"):
        load_backbone_stages(model_for(task), path, 1)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_state(tmp_path / "missing.safetensors")


def trial_config(**overrides):
    config = {
        "trial_key": "t",
        "seed": 0,
        "classes": [5, 6, 7, 8, 9],
        "freeze_depth": 0,
        "copy_depth": 0,
        "bn_policy": "frozen",
        "fine_tune_lr_mult": 1.0,
        "backbone": {"name": BACKBONE[0], "options": BACKBONE[1]},
        "head": {"name": "classify", "options": {}},
        "task": {"name": "digits", "options": {"image_size": 16}},
        "train": FitConfig(epochs=1, batch_size=64).__dict__ | {"stage_lr_mult": None},
    }
    config.update(overrides)
    return config


def test_run_trial_freezes_copied_stages_bit_identically(tmp_path: Path) -> None:
    base_path = tmp_path / "base.safetensors"
    run_trial(trial_config(classes=[0, 1, 2, 3, 4]), checkpoint_path=base_path)
    out = tmp_path / "anb.safetensors"
    _, facts = run_trial(
        trial_config(freeze_depth=2, copy_depth=2, base_checkpoint=str(base_path), seed=3),
        checkpoint_path=out,
    )
    assert facts["copied_tensors"] > 0 and len(facts["data_hash"]) == 16
    base, trained = load_state(base_path), load_state(out)
    frozen = [k for k in base if k.startswith(("backbone.stages.0.", "backbone.stages.1."))]
    assert frozen and all(torch.equal(base[k], trained[k]) for k in frozen)


def test_run_trial_without_base_checkpoint_is_an_error() -> None:
    with pytest.raises(ValueError, match="no base checkpoint"):
        run_trial(trial_config(copy_depth=1))


class Crash(Exception):
    """Stands for a worker dying after an epoch."""


def test_fit_resumes_after_the_last_finished_epoch_and_matches_an_uninterrupted_run(
    task, tmp_path: Path
) -> None:
    config = FitConfig(epochs=4, batch_size=64, lr=0.05)
    straight = fit(model_for(task), task, config)

    def crash_at_2(epoch: int, row: dict) -> None:
        if epoch == 2:
            raise Crash

    state = tmp_path / "resume.pt"
    with pytest.raises(Crash):
        fit(model_for(task), task, config, on_epoch=crash_at_2, resume_path=state)
    assert state.is_file()
    seen: list[int] = []
    resumed = fit(
        model_for(task, seed=9), task, config, on_epoch=lambda e, r: seen.append(e), resume_path=state
    )
    assert resumed.resumed_from == 2 and seen == [1, 2, 3, 4]  # earlier rows are reported again
    assert resumed.steps == straight.steps and resumed.epochs_run == 4
    for mine, theirs in zip(resumed.history, straight.history, strict=True):
        assert mine == pytest.approx(theirs)
    assert resumed.test == pytest.approx(straight.test)


def test_an_interrupted_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    from transferlab.atomic import atomic_path

    target = tmp_path / "state.pt"
    target.write_text("old")
    with pytest.raises(Crash), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise Crash
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and list(tmp_path.iterdir()) == [target]
