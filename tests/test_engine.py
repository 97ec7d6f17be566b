"""fit(), checkpoints and one trial run locally (no Ray)."""

from __future__ import annotations

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
from transferlab.engine.fit import FitConfig, NonFiniteLossError, build_optimizer, fit
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


def test_early_stopping_restores_the_best_epoch(task) -> None:
    result = fit(
        model_for(task), task, FitConfig(epochs=30, batch_size=64, lr=0.05, early_stopping_patience=1)
    )
    assert result.epochs_run < 30
    assert 1 <= result.best_epoch < result.epochs_run


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
    assert not torch.equal(base["backbone.stages.2.0.weight"], trained["backbone.stages.2.0.weight"])


def test_run_trial_without_base_checkpoint_is_an_error() -> None:
    with pytest.raises(ValueError, match="no base checkpoint"):
        run_trial(trial_config(copy_depth=1))
