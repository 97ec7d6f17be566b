"""``transferlab plugins check``: the contract checker passes good plugins and names what is wrong
with broken ones (each defined here and registered for one test)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from torch import Tensor, nn

from transferlab.backbones.base import Backbone, StageInfo
from transferlab.cli.main import cli
from transferlab.engine.contract import (
    AmbiguousPluginError,
    CheckResult,
    check_backbone,
    check_head,
    check_plugin,
    check_task,
    resolve_kind,
)
from transferlab.heads.base import Head
from transferlab.registry import REGISTRIES, TASKS, UnknownPluginError
from transferlab.tasks.base import InMemoryDataset

SOURCE = "transferlab-tests"


@pytest.fixture
def register() -> Iterator[Callable[[str, str, Callable[..., Any]], None]]:
    """Register a factory for one test: ``register(kind, name, factory)``."""
    added: list[tuple[str, str]] = []

    def add(kind: str, name: str, factory: Callable[..., Any]) -> None:
        REGISTRIES[kind].names()  # load built-ins and entry points first
        REGISTRIES[kind].add(name, factory, source=SOURCE)
        added.append((kind, name))

    yield add
    for kind, name in added:
        REGISTRIES[kind].remove(name)


def by_name(results: list[CheckResult]) -> dict[str, CheckResult]:
    return {r.name: r for r in results}


def failures(results: list[CheckResult]) -> dict[str, str]:
    return {r.name: r.detail for r in results if not r.ok}


# -- good plugins pass ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "kind", "source", "count"),
    [
        ("convnet", "backbone", "transferlab", 13),
        ("lenet5", "backbone", "transferlab", 13),
        ("twostage", "backbone", "transferlab-testplugins", 13),
        ("classify", "head", "transferlab", None),
        ("digits", "task", "transferlab", 8),
        ("shapes", "task", "transferlab", 8),
        ("nan_digits", "task", "transferlab-testplugins", 8),  # NaN only with class 0 in a subset
    ],
)
def test_good_plugins_pass(name: str, kind: str, source: str, count: int | None) -> None:
    report = check_plugin(name)
    assert (report.kind, report.source) == (kind, source)
    assert report.ok, failures(report.checks)
    if count is not None:
        assert len(report.checks) == count, [c.name for c in report.checks]


def test_backbone_report_says_what_it_verified() -> None:
    results = by_name(check_backbone("convnet", input_shape=(1, 16, 16), options={"widths": [4, 8, 8]}))
    assert results["factory builds with in_channels=1"].detail == "widths=[4, 8, 8]"
    assert results["stages match feature_info"].detail == "3 stages: conv1, conv2, conv3"
    assert results["forward returns one feature map per stage"].detail == "4x16x16, 8x8x8, 8x4x4"
    assert results["feature sizes match reduction"].detail == "reductions [1, 2, 4]"
    assert results["a training step runs at every depth 0..3"].ok
    assert (
        "depth 4 is deeper than backbone" in results["depth 4 (deeper than the backbone) is refused"].detail
    )


def test_checks_leave_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    check_backbone("twostage")
    assert torch.equal(torch.rand(3), expected)


def test_head_is_checked_with_every_label_task() -> None:
    results = check_head("classify")
    pairs = by_name(results)["pairs with tasks"].detail
    assert pairs.startswith("target_kinds ('label',); checked on ")
    for task in ("digits", "shapes", "nan_digits"):
        assert task in pairs
        assert by_name(results)[f"output on {task}"].ok
    assert by_name(results)["output on digits"].detail == "logits (4, 10)"
    assert by_name(results)["loss and metrics of digits accept the output"].detail.startswith("loss ")


def test_head_with_chosen_tasks() -> None:
    report = check_plugin("classify", tasks=["shapes"])
    names = [c.name for c in report.checks]
    assert report.ok and names[-2:] == [
        "loss and metrics of shapes accept the output",
        "evaluation on shapes: eval-mode outputs score",
    ]
    assert "digits" not in " ".join(c.name for c in report.checks)


# -- broken backbones --------------------------------------------------------------------------------
def conv(cin: int, cout: int, stride: int = 1) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


def test_wrong_feature_channels(register: Callable[..., None]) -> None:
    def wrongwidth(*, in_channels: int = 3) -> Backbone:
        """Says 8 channels where its second stage gives 16."""
        infos = [StageInfo("c1", 4, 1), StageInfo("c2", 8, 2)]
        return Backbone([conv(in_channels, 4), conv(4, 16, 2)], infos, in_channels)

    register("backbone", "wrongwidth", wrongwidth)
    report = check_plugin("wrongwidth")
    assert failures(report.checks) == {
        "feature channels match feature_info": "stage 2 'c2' gives 16 channels, feature_info says 8"
    }
    assert report.source == SOURCE


def test_wrong_reduction(register: Callable[..., None]) -> None:
    def wrongstride(*, in_channels: int = 3) -> Backbone:
        """Says reduction 2 where its second stage keeps the resolution."""
        infos = [StageInfo("c1", 4, 1), StageInfo("c2", 8, 2)]
        return Backbone([conv(in_channels, 4), conv(4, 8)], infos, in_channels)

    register("backbone", "wrongstride", wrongstride)
    assert failures(check_backbone("wrongstride")) == {
        "feature sizes match reduction": (
            "stage 2 'c2' gives 32x32 from a 32x32 input; reduction 2 allows at most 16x16"
        )
    }


def test_stage_missing_from_feature_info(register: Callable[..., None]) -> None:
    def extrastage(*, in_channels: int = 3) -> Backbone:
        """Appends a stage after building, without its StageInfo."""
        backbone = Backbone(
            [conv(in_channels, 4), conv(4, 8, 2)], [StageInfo("c1", 4, 1), StageInfo("c2", 8, 2)], in_channels
        )
        backbone.stages.append(conv(8, 16, 2))
        return backbone

    register("backbone", "extrastage", extrastage)
    results = check_backbone("extrastage")
    assert not results[-1].ok and results[-1].name == "stages match feature_info"
    assert results[-1].detail.startswith(
        "3 stages but 2 feature_info entries (c1, c2); give each stage exactly"
    )
    assert "the checks that need this one did not run" in results[-1].detail
    assert all(r.ok for r in results[:-1])


def test_computation_outside_the_stages(register: Callable[..., None]) -> None:
    class Rescaling(Backbone):
        def forward(self, x: Tensor) -> list[Tensor]:
            return super().forward(x * 2)  # TransferModel never calls this forward

    def rescaling(*, in_channels: int = 3) -> Backbone:
        """Scales its input outside the stages."""
        return Rescaling([conv(in_channels, 4)], [StageInfo("c1", 4, 1)], in_channels)

    register("backbone", "rescaling", rescaling)
    detail = failures(check_backbone("rescaling"))["forward is the stages run in order"]
    assert detail.startswith("the output of stage 1 'c1' differs from running `stages` in sequence")


class StubbornBatchNorm(nn.BatchNorm2d):
    """Forces training mode on every call, so its running statistics move even when frozen."""

    def forward(self, x: Tensor) -> Tensor:
        self.train()
        return super().forward(x)


def test_frozen_batchnorm_that_forces_train_mode(register: Callable[..., None]) -> None:
    def stubborn(*, in_channels: int = 3) -> Backbone:
        """BatchNorm that calls .train() on itself."""
        stages = [
            nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), StubbornBatchNorm(4), nn.ReLU()),
            conv(4, 8, 2),
        ]
        return Backbone(stages, [StageInfo("c1", 4, 1), StageInfo("c2", 8, 2)], in_channels)

    register("backbone", "stubborn", stubborn)
    found = failures(check_backbone("stubborn"))
    assert list(found) == ["frozen stages are bit-identical after training (bn: frozen)"]
    detail = found["frozen stages are bit-identical after training (bn: frozen)"]
    assert "depth 1: buffer stages.0.1.running_mean changed" in detail
    assert (
        "depth 1: StubbornBatchNorm stages.0.1 is in training mode after a step though its stage is frozen"
        in detail
    )
    assert "depth 2: buffer stages.0.1.running_var changed" in detail


class Leaky(Backbone):
    """A parameter outside the stages (``outside``), or one conv shared by two stages (``share``)."""

    def __init__(self, in_channels: int, *, outside: bool, share: bool) -> None:
        shared = nn.Conv2d(4, 4, 3, padding=1)
        first = nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), shared)
        second = nn.Sequential(shared if share else nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        super().__init__([first, second], [StageInfo("c1", 4, 1), StageInfo("c2", 4, 1)], in_channels)
        if outside:
            self.scale = nn.Parameter(torch.ones(1))


def test_parameters_outside_the_stages_or_shared_between_them(register: Callable[..., None]) -> None:
    def leaky(*, in_channels: int = 3, outside: bool = False, share: bool = False) -> Backbone:
        """Breaks freezing in one of two ways."""
        return Leaky(in_channels, outside=outside, share=share)

    register("backbone", "leaky", leaky)
    assert check_plugin("leaky").ok
    found = failures(check_backbone("leaky", options={"outside": True}))
    assert found == {
        "every depth k freezes exactly stages[0:k]": (
            "parameters outside `stages` are never frozen: scale; put every layer in a stage"
        )
    }
    found = failures(check_backbone("leaky", options={"share": True}))
    assert found["every depth k freezes exactly stages[0:k]"].startswith(
        "depth 1: stage 1 'c1' parameter 1.weight has requires_grad=True (is it shared with another stage?)"
    )
    frozen = found["frozen stages are bit-identical after training (bn: frozen)"]
    assert "depth 1: parameter stages.0.1.weight changed" in frozen


def test_factory_contract_failures_stop_early(register: Callable[..., None]) -> None:
    register("backbone", "nochannels", lambda: Backbone([conv(3, 4)], [StageInfo("c1", 4, 1)], 3))
    register("backbone", "plainmodule", lambda *, in_channels=3: nn.Sequential(conv(in_channels, 4)))
    [result] = check_backbone("nochannels")
    assert not result.ok and "has no 'in_channels' parameter" in result.detail
    results = check_backbone("plainmodule")
    assert [r.ok for r in results] == [True, True, False]
    assert results[-1].detail.startswith(
        "the factory returned torch.nn.modules.container.Sequential; return a transferlab.backbones.Backbone"
    )


# -- broken heads ------------------------------------------------------------------------------------
class OffByOneHead(Head):
    target_kinds = ("label",)

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, num_classes + 1)

    def forward(self, features: list[Tensor], batch: dict[str, Any]) -> dict[str, Tensor]:
        return {"logits": self.fc(features[-1].mean((2, 3)))}


def offbyone(feature_info: Any, target: Any) -> Head:
    """One logit too many."""
    return OffByOneHead(feature_info[-1].channels, target.num_classes)


def test_head_with_wrong_logits_shape(register: Callable[..., None]) -> None:
    register("head", "offbyone", offbyone)
    found = failures(check_head("offbyone"))
    assert found["output on digits"] == (
        "logits have shape (4, 11), expected (4, 10) = (N, num_classes) "
        "(the checks that need this one did not run)"
    )
    assert found["output on shapes"].startswith(
        "logits have shape (4, 7), expected (4, 6) = (N, num_classes)"
    )
    assert not any(name.startswith("loss and metrics") for name in found)  # they need the output


def test_head_that_declares_no_target_kinds_is_tried_with_every_task(register: Callable[..., None]) -> None:
    class Undeclared(OffByOneHead):
        target_kinds = ()

    def undeclared(feature_info, target, *, extra: int = 0):  # noqa: ANN001, ANN202 - a plain plugin signature
        if target.num_classes != 10:
            raise ValueError("only 10 classes")
        return Undeclared(feature_info[-1].channels, target.num_classes - 1)

    register("head", "undeclared", undeclared)
    results = by_name(check_head("undeclared"))
    assert results["pairs with tasks"].detail.startswith("declares no target_kinds, so every task is tried")
    assert results["output on digits"].ok
    assert not results["builds for shapes (label)"].ok
    assert (
        results["builds for shapes (label)"].detail
        == "factory(feature_info, target) raised ValueError: only 10 classes "
        "(the checks that need this one did not run)"
    )


def test_head_with_an_unknown_option_or_no_task(register: Callable[..., None]) -> None:
    [result] = check_head("classify", options={"hidden_size": 8})
    assert (
        not result.ok
        and "head 'classify' has no option 'hidden_size'; its options are: hidden, dropout" in result.detail
    )

    class KeypointHead(OffByOneHead):
        target_kinds = ("keypoints",)

    def keypoints_only(feature_info, target):  # noqa: ANN001, ANN202
        return KeypointHead(feature_info[-1].channels, 2)

    register("head", "keypoints_only", keypoints_only)
    results = check_head("keypoints_only")
    assert not results[-1].ok and results[-1].name == "pairs with tasks"
    assert results[-1].detail.startswith(
        "no task to check it with; target_kinds ('keypoints',); tried digits (label): built"
    )


def test_head_finds_the_target_variant_of_a_task() -> None:
    """``shapes`` gives labels by default; a mask head is checked on its ``target: mask`` variant."""
    results = check_head("unet")
    assert all(r.ok for r in results), [r for r in results if not r.ok]
    pairs = next(r for r in results if r.name == "pairs with tasks")
    assert "checked on shapes target=mask" in pairs.detail
    assert results[-1].name == "evaluation on shapes target=mask: eval-mode outputs score"
    assert results[-1].detail.startswith("miou ")


# -- broken tasks ------------------------------------------------------------------------------------
def digits_with(**changes: Callable[..., Any]) -> Callable[..., Any]:
    """A digits task factory whose task has some methods replaced."""

    def factory(*, classes: list[int] | None = None) -> Any:
        task = TASKS.get("digits")(classes=classes, image_size=8)
        original = {name: getattr(task, name) for name in changes}
        for name, change in changes.items():
            setattr(task, name, change(task, original[name]))
        return task

    return factory


def empty_val(task: Any, dataset: Callable[[str], Any]) -> Callable[[str], Any]:
    empty = InMemoryDataset({"image": torch.empty(0, 1, 8, 8), "label": torch.empty(0, dtype=torch.long)})
    return lambda split: empty if split == "val" else dataset(split)


def test_task_with_an_empty_split(register: Callable[..., None]) -> None:
    register("task", "emptyval", digits_with(dataset=empty_val))
    results = check_task("emptyval")
    assert not results[-1].ok and results[-1].name == "train, val and test data sets are non-empty"
    assert results[-1].detail.startswith(
        "split 'val' is empty (sizes {'train': 1077, 'val': 0, 'test': 450})"
    )
    assert all(r.ok for r in results[:-1])


def test_task_that_ignores_class_subsets(register: Callable[..., None]) -> None:
    def everything(*, classes: list[int] | None = None) -> Any:
        return TASKS.get("digits")(classes=None, image_size=8)  # ignores the subset it was asked for

    register("task", "everything", everything)
    assert failures(check_task("everything")) == {
        "class subset [0, 1] renumbers labels": "classes=[0, 1] gave a task of 10 classes, not 2"
    }


def test_task_with_unstable_fingerprint_and_bad_primary_metric(register: Callable[..., None]) -> None:
    counter = iter(range(100))

    def unstable(task: Any, fingerprint: Callable[[], str]) -> Callable[[], str]:
        return lambda: f"{fingerprint()}-{next(counter)}"

    def renamed(task: Any, metrics: Callable[[], dict]) -> Callable[[], dict]:
        return lambda: {"acc": metrics()["accuracy"]}

    register("task", "wobbly", digits_with(fingerprint=unstable, metrics=renamed))
    found = failures(check_task("wobbly"))
    assert found["primary_metric is among metrics()"] == "primary_metric 'accuracy' is not one of ['acc']"
    assert found["fingerprint is stable across constructions"].startswith(
        "two constructions gave fingerprints"
    )


def test_task_factory_without_classes_or_with_a_nan_loss(register: Callable[..., None]) -> None:
    register("task", "noclasses", lambda *, image_size=8: TASKS.get("digits")(image_size=image_size))
    [result] = check_task("noclasses")
    assert "has no 'classes' parameter; the planner passes the class subset" in result.detail

    def nan_loss(task: Any, loss: Callable[..., Tensor]) -> Callable[..., Tensor]:
        return lambda outputs, batch: loss(outputs, batch) * float("nan")

    register("task", "nanloss", digits_with(loss=nan_loss))
    assert failures(check_task("nanloss")) == {"loss and metrics on a dummy prediction": "loss is nan"}


# -- names and the CLI -------------------------------------------------------------------------------
def test_resolve_kind(register: Callable[..., None]) -> None:
    assert resolve_kind("convnet") == "backbone"
    assert resolve_kind("timm/resnet18") == "backbone"
    assert resolve_kind("classify") == "head"
    assert resolve_kind("digits", "task") == "task"
    with pytest.raises(
        UnknownPluginError, match=r"backbone 'convnett' is not registered; did you mean 'convnet'"
    ):
        resolve_kind("convnett")
    with pytest.raises(UnknownPluginError, match=r"task 'digts' is not registered; did you mean 'digits'"):
        resolve_kind("digts")
    with pytest.raises(UnknownPluginError, match=r"'zzqx' is not a registered backbone, head or task"):
        resolve_kind("zzqx")
    with pytest.raises(UnknownPluginError, match=r"head 'convnet' is not registered"):
        resolve_kind("convnet", "head")
    register("backbone", "digits", lambda *, in_channels=3: None)
    with pytest.raises(
        AmbiguousPluginError,
        match=r"'digits' is registered as a backbone and as a task; choose with --kind backbone\|task",
    ):
        resolve_kind("digits")


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, ["plugins", "check", *args])


def test_cli_check_passes_and_fails(register: Callable[..., None]) -> None:
    result = invoke("lenet5", "--input", "1x32x32")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(
        "backbone 'lenet5' from transferlab\n  PASS  factory accepts in_channels: lenet5("
    )
    assert result.output.endswith("all 13 checks passed\n")

    register("task", "emptyval", digits_with(dataset=empty_val))
    result = invoke("emptyval")
    assert result.exit_code == 1
    assert "  FAIL  train, val and test data sets are non-empty: split 'val' is empty" in result.stdout
    assert result.stderr.strip() == (
        "Error: task 'emptyval' failed 1 of 3 checks: train, val and test data sets are non-empty"
    )


def test_cli_check_json(register: Callable[..., None]) -> None:
    result = invoke("lenet5", "--output", "json", "-o", "activation=relu", "--input", "1x32x32")
    data = json.loads(result.stdout)
    assert result.exit_code == 0 and data["ok"] is True
    assert (data["name"], data["kind"], data["source"]) == ("lenet5", "backbone", "transferlab")
    assert data["checks"][1] == {
        "name": "factory builds with in_channels=1",
        "ok": True,
        "detail": "activation='relu'",
    }

    register("head", "offbyone", offbyone)
    result = invoke("offbyone", "--task", "digits", "-O", "json")
    data = json.loads(result.stdout)
    assert result.exit_code == 1 and data["ok"] is False
    assert [c["name"] for c in data["checks"] if not c["ok"]] == ["output on digits"]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["convnett"], 1, "backbone 'convnett' is not registered; did you mean 'convnet'?"),
        (["convnet", "--kind", "head"], 1, "head 'convnet' is not registered"),
        (["digits", "--kind", "backbone"], 1, "backbone 'digits' is not registered"),
        (
            ["convnet", "--input", "3xbig"],
            2,
            "expected CxHxW with positive integers, such as 3x32x32; got '3xbig'",
        ),
        (["convnet", "--input", "3x0x4"], 2, "got '3x0x4'"),
        (["digits", "--input", "1x8x8"], 2, "an input shape applies to backbones only; 'digits' is a task"),
        (
            ["convnet", "--task", "digits"],
            2,
            "tasks to pair with apply to heads only; 'convnet' is a backbone",
        ),
        (["convnet", "-o", "widths"], 2, "expected KEY=VALUE, got 'widths'"),
        (["convnet", "-o", "in_channels=1"], 2, "the input shape sets in_channels"),
        (
            ["classify", "--task", "digitz"],
            1,
            "task 'digitz' is not registered; did you mean 'digits'",
        ),
    ],
)
def test_cli_usage_errors(args: list[str], code: int, message: str) -> None:
    result = invoke(*args)
    assert result.exit_code == code, result.output
    assert message in result.stderr


def test_cli_ambiguous_name_asks_for_kind(register: Callable[..., None]) -> None:
    register("backbone", "digits", lambda *, in_channels=3: None)
    result = invoke("digits")
    assert result.exit_code == 2
    assert (
        "'digits' is registered as a backbone and as a task; choose with --kind backbone|task"
        in result.stderr
    )
    assert invoke("digits", "--kind", "task").exit_code == 0
