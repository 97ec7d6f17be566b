"""The multitask engine: one trunk with classify, unet and bbox heads on shapes, every weighting.

Checks the epoch rows and test keys of the contract, frozen trunk stages staying bit-identical, tasks
with other inputs being refused, tasks of different data sets training on their own batches (the
shorter set cycled), a multitask checkpoint seeding a transfer trial, and exact resumption.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from transferlab.engine.assembly import build_backbone, build_model, build_task
from transferlab.engine.checkpoint import load_backbone_stages, load_state, read_checkpoint_metadata
from transferlab.engine.fit import FitConfig, FitResult, NonFiniteLossError, fit
from transferlab.engine.multitask import MultitaskModel, build_multitask_model, fit_multitask
from transferlab.engine.trial import run_trial
from transferlab.engine.weightings import Weighting, build_weighting
from transferlab.tasks.base import Task

SMALL = {"train_size": 32, "val_size": 16, "test_size": 16, "image_size": 32}
BACKBONE = ("convnet", {"widths": [8, 16, 16]})
HEADS = {"cls": ("classify", {}), "seg": ("unet", {}), "box": ("bbox", {"hidden": 32})}
TARGETS = {"cls": "label", "seg": "mask", "box": "box"}
WEIGHTINGS = {
    "equal": {},
    "fixed": {"weights": {"cls": 1.0, "seg": 2.0, "box": 0.5}},
    "uncertainty": {},
    "dwa": {},
    "gradnorm": {},
    "pcgrad": {"seed": 0},
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tasks() -> dict[str, Task]:
    return {k: build_task("shapes", {**SMALL, "target": t}) for k, t in TARGETS.items()}


def model_for(tasks: dict[str, Task], depth: int = 0, seed: int = 0, bn: str = "frozen") -> MultitaskModel:
    torch.manual_seed(seed)
    heads = {k: HEADS.get(k, ("classify", {})) for k in tasks}
    return build_multitask_model(BACKBONE, heads, tasks, freeze_depth=depth, bn_policy=bn)


def config(**overrides: object) -> FitConfig:
    return FitConfig(**{"epochs": 2, "batch_size": 16, "lr": 0.05, **overrides})  # type: ignore[arg-type]


def expected_keys(tasks: dict[str, Task]) -> tuple[set[str], set[str]]:
    row, test = {"train/loss", "lr", "val/score"}, {"score"}
    for key, task in tasks.items():
        # A box head that also classifies adds the class accuracy to the box metrics, as in fit().
        names = ["loss", *task.metrics(), *(["accuracy"] if key == "box" else [])]
        row |= {f"{split}/{key}/{n}" for split in ("train", "val") for n in names} | {f"train/weight/{key}"}
        test |= {f"{key}/{n}" for n in names}
    return row, test


@pytest.mark.parametrize("name", list(WEIGHTINGS))
def test_three_heads_train_with_every_weighting(name: str, tasks: dict[str, Task], tmp_path: Path) -> None:
    model = model_for(tasks)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    weighting = build_weighting(name, list(tasks), WEIGHTINGS[name])
    rows: list[tuple[int, dict[str, float]]] = []
    result = fit_multitask(
        model,
        tasks,
        weighting,
        config(),
        on_epoch=lambda e, r: rows.append((e, r)),
        checkpoint_path=tmp_path / "mt.safetensors",
    )
    row_keys, test_keys = expected_keys(tasks)
    assert [e for e, _ in rows] == [1, 2] and result.epochs_run == 2 and result.steps == 4
    assert all(set(row) == row_keys for _, row in rows) and set(result.test) == test_keys
    assert all(torch.isfinite(torch.tensor(list(row.values()))).all() for _, row in rows)
    score = (rows[-1][1]["val/cls/accuracy"] + rows[-1][1]["val/seg/miou"] + rows[-1][1]["val/box/iou"]) / 3
    assert rows[-1][1]["val/score"] == pytest.approx(score)  # every primary metric is higher-is-better
    weights = [rows[-1][1][f"train/weight/{k}"] for k in tasks]
    if name in ("equal", "pcgrad"):
        assert weights == [1.0, 1.0, 1.0]
    elif name == "fixed":
        assert weights == [1.0, 2.0, 0.5]
    elif name == "dwa":
        assert weights == [1.0, 1.0, 1.0]  # DWA's weights are 1 in the first two epochs
    elif name == "gradnorm":
        assert sum(weights) == pytest.approx(3.0, abs=1e-5)
        assert max(abs(w - 1.0) for w in weights) > 0.01  # and they moved from 1
    else:
        assert weights != [1.0, 1.0, 1.0]  # uncertainty's log-variances are trained
    state = load_state(result.checkpoint)
    assert {k.split(".")[0] for k in state} == {"backbone", "heads"}
    assert {k.split(".")[1] for k in state if k.startswith("heads.")} == set(tasks)
    trained = [k for k in state if k.endswith("weight") and not torch.equal(state[k], start[k])]
    assert any(k.startswith("backbone.stages.0.") for k in trained)
    assert {k.split(".")[1] for k in trained if k.startswith("heads.")} == set(tasks)


def test_one_task_at_weight_zero_trains_exactly_like_fit_on_the_other(tasks: dict[str, Task]) -> None:
    # The whole loop pinned against fit(): same data order, trunk pass, optimiser groups, schedule,
    # evaluation and model selection. The seg head runs and gets zero gradients.
    torch.manual_seed(3)
    single = build_model(BACKBONE, ("classify", {}), tasks["cls"])
    two = {"cls": tasks["cls"], "seg": tasks["seg"]}
    multi = model_for(two)
    multi.backbone.load_state_dict(single.backbone.state_dict())
    multi.heads["cls"].load_state_dict(single.head.state_dict())
    settings = config(epochs=3, device="cpu")  # bit-exact on the CPU (cuDNN may pick other kernels)
    alone = fit(single, tasks["cls"], settings)
    joint = fit_multitask(
        multi, two, build_weighting("fixed", list(two), {"weights": {"cls": 1.0, "seg": 0.0}}), settings
    )
    assert len(alone.history) == len(joint.history) == 3
    for a, j in zip(alone.history, joint.history, strict=True):
        for split, name in [("train", "loss"), ("train", "accuracy"), ("val", "loss"), ("val", "accuracy")]:
            assert j[f"{split}/cls/{name}"] == a[f"{split}/{name}"], (split, name)
        assert j["lr"] == a["lr"] and j["train/weight/seg"] == 0.0
    assert joint.test["cls/accuracy"] == alone.test["accuracy"]
    assert joint.test["cls/loss"] == alone.test["loss"]
    assert joint.steps == alone.steps  # (the best epochs may differ: val/score counts seg too)


@pytest.mark.parametrize("name", ["uncertainty", "gradnorm", "dwa"])
def test_the_logged_weight_is_the_mean_of_the_weights_each_step_applied(
    name: str, tasks: dict[str, Task]
) -> None:
    weighting = build_weighting(name, list(tasks))
    applied: list[dict[str, float]] = []
    backward = weighting.backward

    def spy(losses: dict[str, torch.Tensor], shared: list[torch.nn.Parameter]) -> torch.Tensor:
        applied.append(weighting.weights())  # what this step's backward pass uses
        return backward(losses, shared)

    weighting.backward = spy  # type: ignore[method-assign]
    result = fit_multitask(model_for(tasks), tasks, weighting, config(epochs=3))
    assert len(applied) == 6  # 2 steps per epoch
    for epoch, row in enumerate(result.history):
        steps = applied[2 * epoch : 2 * epoch + 2]
        for key in tasks:
            assert row[f"train/weight/{key}"] == pytest.approx(sum(w[key] for w in steps) / 2, abs=1e-7)
    if name == "dwa":  # constant within an epoch: the weights of epoch 3 from epochs 1 and 2
        assert applied[4] == applied[5] != applied[0]
    else:  # these change every step, so the mean differs from the weights at the epoch's end
        assert weighting.weights() != applied[-1]


def test_frozen_trunk_stages_stay_bit_identical(tasks: dict[str, Task]) -> None:
    model = model_for(tasks, depth=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit_multitask(model, tasks, build_weighting("pcgrad", list(tasks)), config(epochs=1))
    after = model.state_dict()
    frozen = [k for k in before if k.startswith(("backbone.stages.0.", "backbone.stages.1."))]
    assert any("running_mean" in k for k in frozen)  # buffers are checked too
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["backbone.stages.2.0.weight"], after["backbone.stages.2.0.weight"])
    groups = dict(model.stage_parameter_groups())
    assert set(groups) == {"stage:2", "head"}
    assert {id(p) for p in model.shared_parameters()} == {id(p) for p in groups["stage:2"]}


def test_tasks_with_other_inputs_are_refused(tasks: dict[str, Task]) -> None:
    digits = build_task("digits", {"image_size": 16})
    with pytest.raises(
        ValueError, match=r"task 'digits' feeds the backbone 1-channel 'image' inputs, but task"
    ):
        build_multitask_model(
            BACKBONE,
            {"cls": HEADS["cls"], "digits": ("classify", {})},
            {"cls": tasks["cls"], "digits": digits},
        )
    with pytest.raises(ValueError, match="one head per task"):
        build_multitask_model(BACKBONE, {"cls": HEADS["cls"]}, tasks)
    with pytest.raises(ValueError, match=r"task keys differ: tasks \['box', 'cls', 'seg'\]"):
        fit_multitask(model_for(tasks), tasks, build_weighting("equal", ["cls", "seg"]), config())


def trunk_batch_sizes(model: MultitaskModel) -> list[int]:
    """Record the batch size of every trunk pass (training and evaluation)."""
    sizes: list[int] = []
    original = model.forward_features

    def spy(x: torch.Tensor) -> list[torch.Tensor]:
        sizes.append(len(x))
        return original(x)

    model.forward_features = spy  # type: ignore[method-assign]
    return sizes


def test_tasks_with_the_same_inputs_share_one_trunk_pass(tasks: dict[str, Task]) -> None:
    model = model_for(tasks)
    sizes = trunk_batch_sizes(model)
    fit_multitask(model, tasks, build_weighting("equal", list(tasks)), config(epochs=1, eval_batch_size=16))
    # 2 training steps of 16 samples for all three tasks, then val and test (16 each) once.
    assert sizes == [16, 16, 16, 16]


def test_tasks_of_different_data_train_with_their_own_batches() -> None:
    two = {
        "a": build_task("shapes", {**SMALL, "train_size": 32, "seed": 1}),
        "b": build_task("shapes", {**SMALL, "train_size": 40, "seed": 2}),
    }
    model = model_for(two)
    sizes = trunk_batch_sizes(model)
    result = fit_multitask(
        model, two, build_weighting("equal", list(two)), config(epochs=1, eval_batch_size=16)
    )
    # b has batches 16, 16, 8; a has 16, 16 and starts over: one pass over each concatenation.
    assert sizes[:3] == [32, 32, 24] and result.steps == 3
    assert sizes[3:] == [16, 16, 16, 16]  # evaluation: each task's val, then test, on their own

    other_size = {"a": two["a"], "c": build_task("shapes", {**SMALL, "image_size": 24, "seed": 3})}
    model = model_for(other_size)
    sizes = trunk_batch_sizes(model)
    fit_multitask(model, other_size, build_weighting("equal", ["a", "c"]), config(epochs=1))
    assert sizes[:4] == [16, 16, 16, 16]  # 32 px and 24 px inputs cannot be concatenated


def test_a_multitask_checkpoint_seeds_a_transfer_trial(tasks: dict[str, Task], tmp_path: Path) -> None:
    model = model_for(tasks)
    ckpt = tmp_path / "mt.safetensors"
    result = fit_multitask(
        model, tasks, build_weighting("uncertainty", list(tasks)), config(epochs=1), checkpoint_path=ckpt
    )
    assert read_checkpoint_metadata(ckpt)["epoch"] == 1 and result.checkpoint == ckpt
    trunk = {k: v for k, v in load_state(ckpt).items() if k.startswith("backbone.")}

    torch.manual_seed(7)
    single = build_model(BACKBONE, ("classify", {}), tasks["cls"])
    copied = load_backbone_stages(single, ckpt, 2)
    prefixes = ("backbone.stages.0.", "backbone.stages.1.")
    assert copied and all(k.startswith(prefixes) for k in copied)
    assert {k for k in trunk if k.startswith(prefixes)} == set(copied)
    state = single.state_dict()
    assert all(torch.equal(state[k], trunk[k]) for k in copied)
    assert not torch.equal(state["backbone.stages.2.0.weight"], trunk["backbone.stages.2.0.weight"])

    loaded = build_backbone(BACKBONE[0], {**BACKBONE[1], "weights": str(ckpt)}, tasks["seg"].target)
    assert all(torch.equal(v, trunk[f"backbone.{k}"]) for k, v in loaded.state_dict().items())

    transfer = {
        "trial_key": "AnB",
        "seed": 0,
        "classes": None,
        "freeze_depth": 2,
        "copy_depth": 2,
        "bn_policy": "frozen",
        "base_checkpoint": str(ckpt),
        "backbone": {"name": BACKBONE[0], "options": BACKBONE[1]},
        "head": {"name": "unet", "options": {}},
        "task": {"name": "shapes", "options": {**SMALL, "target": "mask"}},
        "train": config(epochs=1).__dict__ | {"stage_lr_mult": None},
    }
    out = tmp_path / "anb.safetensors"
    _, facts = run_trial(transfer, checkpoint_path=out)
    assert facts["copied_tensors"] == len(copied)
    after = load_state(out)
    assert all(torch.equal(after[k], trunk[k]) for k in copied)  # copied and frozen: bit-identical


def multitask_trial(weighting: str, **overrides: object) -> dict:
    return {
        "study": "multitask",
        "trial_key": "mt",
        "role": "multitask",
        "condition": weighting,
        "depth": 1,
        "seed": 0,
        "split": "all",
        "classes": None,
        "freeze_depth": 1,
        "copy_depth": 0,
        "bn_policy": "frozen",
        "backbone": {"name": BACKBONE[0], "options": BACKBONE[1]},
        "tasks": {
            k: {
                "task": {"name": "shapes", "options": {**SMALL, "target": t}},
                "head": {"name": HEADS[k][0], "options": HEADS[k][1]},
            }
            for k, t in TARGETS.items()
        },
        "weighting": {"name": weighting, "options": {}},
        "train": config(epochs=1).__dict__ | {"stage_lr_mult": None},
        "primary_metric": "score",
        **overrides,
    }


def single_trial() -> dict:
    """A single-task trial config of the same tasks' kind (``run_trial``'s own path)."""
    trial = multitask_trial("equal", freeze_depth=0, depth=0)
    for key in ("study", "tasks", "weighting"):
        del trial[key]
    trial.update(
        role="single",
        condition="single:cls",
        task={"name": "shapes", "options": {**SMALL, "target": "label"}},
        head={"name": "classify", "options": {}},
        primary_metric="accuracy",
    )
    return trial


def test_run_trial_dispatches_a_multitask_trial(tmp_path: Path) -> None:
    rows: list[dict[str, float]] = []
    result, facts = run_trial(
        multitask_trial("dwa"),
        checkpoint_path=tmp_path / "m.safetensors",
        on_epoch=lambda e, r: rows.append(r),
    )
    # The same facts as a single-task trial (whose feature cache is off here: nothing frozen).
    _, single_facts = run_trial(single_trial(), checkpoint_path=tmp_path / "single" / "s.safetensors")
    assert set(facts) == set(single_facts)
    assert facts["feature_cache"] == "off" and facts["feature_cache_reason"].startswith("multitask")
    assert facts["torch_threads"] == torch.get_num_threads()
    assert facts["num_stages"] == 3 and facts["copied_tensors"] == 0 and len(facts["data_hash"]) == 16
    assert len(rows) == 1 and "train/weight/seg" in rows[0] and "seg/miou" in result.test
    assert not (tmp_path / "resume.pt").exists()  # the training state goes once the checkpoint exists
    with pytest.raises(ValueError, match="copies 1 stages but has no base checkpoint"):
        run_trial(multitask_trial("equal", copy_depth=1))
    with pytest.raises(ValueError, match="weighting 'fixed' needs option weights"):
        run_trial(multitask_trial("fixed"))


def test_a_non_finite_task_loss_fails_the_run(tasks: dict[str, Task]) -> None:
    broken = build_task("shapes", {**SMALL, "target": "label"})
    broken.loss = lambda outputs, batch: outputs["logits"].sum() * float("nan")  # type: ignore[method-assign]
    two = {"cls": broken, "seg": tasks["seg"]}
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss nan at epoch 1, step 1"):
        fit_multitask(model_for(two), two, build_weighting("equal", list(two)), config())


def test_early_stopping_follows_the_validation_score(tasks: dict[str, Task]) -> None:
    two = {"cls": tasks["cls"], "box": tasks["box"]}
    result = fit_multitask(
        model_for(two), two, build_weighting("equal", list(two)), config(epochs=12, early_stopping_patience=1)
    )
    scores = [row["val/score"] for row in result.history]
    assert result.epochs_run < 12 and result.test_epoch == result.best_epoch
    assert scores[result.best_epoch - 1] == max(scores)


def assert_same_state(ours: object, theirs: object, where: str) -> None:
    """Exact equality of a state entry: tensors by ``torch.equal``, containers item by item."""
    if isinstance(ours, torch.Tensor):
        assert isinstance(theirs, torch.Tensor) and ours.dtype == theirs.dtype, where
        assert torch.equal(ours, theirs), where
    elif isinstance(ours, dict):
        assert isinstance(theirs, dict) and ours.keys() == theirs.keys(), where
        for key in ours:
            assert_same_state(ours[key], theirs[key], f"{where}.{key}")
    elif isinstance(ours, (list, tuple)):
        assert type(ours) is type(theirs) and len(ours) == len(theirs), where  # type: ignore[arg-type]
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):  # type: ignore[call-overload]
            assert_same_state(a, b, f"{where}[{i}]")
    else:
        assert ours == theirs, where


class Crash(Exception):
    """Stands for a worker dying after an epoch."""


@pytest.mark.parametrize("name", ["uncertainty", "dwa", "gradnorm", "pcgrad"])
def test_resume_continues_exactly(name: str, tmp_path: Path) -> None:
    # Data sets of different sizes: shorter ones are cycled, so the data order is in the state too.
    # Three tasks, so that PCGrad's random projection order matters.
    three = {
        "a": build_task("shapes", {**SMALL, "train_size": 32, "seed": 1}),
        "b": build_task("shapes", {**SMALL, "train_size": 40, "seed": 2, "target": "box"}),
        "c": build_task("shapes", {**SMALL, "train_size": 24, "seed": 3}),
    }
    heads = {"a": ("classify", {}), "b": ("bbox", {"hidden": 16}), "c": ("classify", {})}
    settings = config(epochs=4)

    weightings: list[Weighting] = []

    def run(seed: int, **kwargs: object) -> FitResult:
        model = build_multitask_model(BACKBONE, heads, three)
        torch.manual_seed(seed)  # a different start for the resumed model: the state must override it
        for p in model.parameters():
            p.data.normal_(0, 0.1)
        weightings.append(build_weighting(name, list(three)))
        return fit_multitask(model, three, weightings[-1], settings, **kwargs)  # type: ignore[arg-type]

    straight = run(0)

    def crash_at_2(epoch: int, row: dict) -> None:
        if epoch == 2:
            raise Crash

    state = tmp_path / "resume.pt"
    with pytest.raises(Crash):
        run(0, on_epoch=crash_at_2, resume_path=state)
    seen: list[int] = []
    resumed = run(9, on_epoch=lambda e, r: seen.append(e), resume_path=state)
    assert resumed.resumed_from == 2 and seen == [1, 2, 3, 4] and resumed.steps == straight.steps
    for mine, theirs in zip(resumed.history, straight.history, strict=True):
        assert mine == pytest.approx(theirs)
    assert resumed.test == pytest.approx(straight.test)
    # The weighting's own state continued too (uncertainty's and GradNorm's weights, DWA's loss
    # history, PCGrad's generator), whatever a fresh one started from.
    ours, theirs = weightings[-1].state_dict(), weightings[0].state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert_same_state(ours[key], theirs[key], key)
    if name == "pcgrad":
        assert torch.equal(weightings[-1].generator.get_state(), weightings[0].generator.get_state())
    else:  # pcgrad's weights are always 1
        assert len({row["train/weight/a"] for row in straight.history}) > 1  # the weights did move


def test_multitask_arms_share_their_initial_trunk() -> None:
    """Every weighting and every single-task baseline of a seed and depth starts from one trunk."""
    from transferlab.engine.trial import init_seed

    arm = {"seed": 3, "split": "all", "depth": 0}
    seeds = {
        init_seed({**arm, "study": "multitask", "condition": "equal"}),
        init_seed({**arm, "study": "multitask", "condition": "pcgrad"}),
        init_seed({**arm, "condition": "single:seg", "role": "single"}),
    }
    assert len(seeds) == 1
    assert init_seed({**arm, "study": "multitask", "condition": "equal", "seed": 4}) not in seeds
    # transfer studies keep independent initialisations per condition (Yosinski et al.)
    assert init_seed({**arm, "condition": "AnB"}) != init_seed({**arm, "condition": "BnB"})
