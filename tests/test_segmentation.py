"""Segmentation: the shapes mask target, its objective, and the ``fcn`` and ``unet`` heads.

Heads are checked on every kind of 2-D backbone at 32 px (a plain convnet, LeNet-5 without padding,
a timm ResNet-18, a CIFAR ResNet-20 with two full-resolution stages, VGG-11 with a parameter-free
last stage); each backbone is built once per module. A two-epoch run on tiny data must beat the
trivial all-background prediction.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from transferlab.backbones.base import Backbone
from transferlab.engine.assembly import build_backbone, build_head, build_model, build_task
from transferlab.engine.fit import FitConfig, fit
from transferlab.engine.model import TransferModel
from transferlab.heads.fcn import bilinear_kernel, bilinear_upsampling, pyramid
from transferlab.registry import HEADS
from transferlab.service.spec import validate_spec_text
from transferlab.service.spec_yaml import SpecError
from transferlab.tasks.base import SPLITS, Task
from transferlab.tasks.objectives import SegmentationObjective
from transferlab.tasks.shapes import KINDS, subset_mask

SIZE = 32
BACKBONES = ["convnet", "lenet5", "resnet18", "resnet20", "vgg11"]
HEADS_UNDER_TEST = [("fcn", {"variant": "8s"}), ("fcn", {"variant": "32s"}), ("unet", {})]
SMALL = {"train_size": 48, "val_size": 16, "test_size": 16}


pytestmark = pytest.mark.usefixtures("one_thread")


def shapes(classes: list[int] | None = None, **options: object) -> Task:
    return build_task("shapes", {**SMALL, "target": "mask", **options}, classes=classes)


@pytest.fixture(scope="module")
def mask_task() -> Task:
    return shapes()


# -- objective --------------------------------------------------------------------------------------


def one_hot_logits(mask: torch.Tensor, num_classes: int) -> torch.Tensor:
    return F.one_hot(mask, num_classes).permute(0, 3, 1, 2).float() * 10.0


def scores(objective: SegmentationObjective, logits: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    metrics = objective.metrics()
    objective.update_metrics(metrics, {"mask_logits": logits}, {"mask": mask})
    return {name: float(m.compute()) for name, m in metrics.items()}


def test_objective_perfect_and_all_background() -> None:
    objective = SegmentationObjective(num_classes=7)
    mask = torch.zeros(2, 8, 8, dtype=torch.long)
    mask[0, :2, :4] = 3  # 8 pixels of class 3
    mask[1, 4:, 4:] = 5  # 16 pixels of class 5; classes 1, 2, 4, 6 never occur
    perfect = scores(objective, one_hot_logits(mask, 7), mask)
    assert perfect == {"miou": pytest.approx(1.0), "pixel_accuracy": pytest.approx(1.0)}
    background = scores(objective, one_hot_logits(torch.zeros_like(mask), 7), mask)
    # Background IoU = 104 / 128, classes 3 and 5 score 0, absent classes are not averaged.
    assert background["miou"] == pytest.approx((104 / 128 + 0 + 0) / 3)
    assert background["pixel_accuracy"] == pytest.approx(104 / 128)
    loss = objective.loss({"mask_logits": one_hot_logits(mask, 7)}, {"mask": mask})
    assert float(loss) < 1e-3 and objective.primary_metric == "miou" and objective.higher_is_better


def test_objective_rejects_logits_of_the_wrong_size() -> None:
    objective = SegmentationObjective(num_classes=3)
    with pytest.raises(ValueError, match=r"mask_logits of shape \(1, 3, 4, 4\) do not fit masks"):
        objective.loss({"mask_logits": torch.zeros(1, 3, 4, 4)}, {"mask": torch.zeros(1, 8, 8).long()})


# -- bilinear initialisation ------------------------------------------------------------------------


def test_transposed_conv_starts_as_bilinear_interpolation() -> None:
    grid = torch.linspace(0, 1, 12)
    smooth = (torch.sin(3 * grid)[:, None] * torch.cos(2 * grid)[None, :]).expand(1, 2, 12, 12).clone()
    smooth[:, 1] *= -0.5  # a second channel: the init maps each channel to itself only
    up = bilinear_upsampling(2, 2)
    with torch.no_grad():
        ours = up(smooth)
    reference = F.interpolate(smooth, scale_factor=2, mode="bilinear", align_corners=False)
    assert ours.shape == reference.shape == (1, 2, 24, 24)
    # Inside the map the two agree to rounding; at the border the transposed conv sees zero padding.
    torch.testing.assert_close(ours[..., 1:-1, 1:-1], reference[..., 1:-1, 1:-1], atol=1e-6, rtol=0)
    assert up.weight.requires_grad and torch.equal(up.weight[0, 1], torch.zeros(4, 4))
    assert bilinear_kernel(2)[0].tolist() == pytest.approx([0.0625, 0.1875, 0.1875, 0.0625])


@pytest.mark.parametrize("factor", [1, 3, 4, 8])
def test_bilinear_upsampling_scales_exactly(factor: int) -> None:
    fixed = bilinear_upsampling(3, factor, learnable=False)
    assert not fixed.weight.requires_grad and fixed.groups == 3
    x = torch.ones(1, 3, 5, 5)
    with torch.no_grad():
        out = fixed(x)
    assert out.shape == (1, 3, 5 * factor, 5 * factor)
    inner = out[..., factor:-factor, factor:-factor]
    torch.testing.assert_close(inner, torch.ones_like(inner))  # a constant stays constant inside


# -- heads over backbones ---------------------------------------------------------------------------


class Built:
    def __init__(self, name: str, task: Task) -> None:
        torch.manual_seed(0)
        self.backbone = build_backbone(name, {}, task.target)
        self.initial = {k: v.clone() for k, v in self.backbone.state_dict().items()}

    def fresh(self) -> Backbone:
        self.backbone.load_state_dict(self.initial)
        return self.backbone


@pytest.fixture(scope="module", params=BACKBONES)
def built(request: pytest.FixtureRequest, mask_task: Task) -> Built:
    return Built(request.param, mask_task)


@pytest.mark.parametrize(("head", "options"), HEADS_UNDER_TEST, ids=["fcn8s", "fcn32s", "unet"])
def test_head_output_loss_and_freezing(built: Built, mask_task: Task, head: str, options: dict) -> None:
    backbone = built.fresh()
    model = TransferModel(backbone, build_head(head, options, backbone.feature_info, mask_task.target))
    model.set_freeze(1)
    model.train()
    batch = mask_task.dataset("train").batch(torch.arange(4))
    frozen = {k: v.clone() for k, v in backbone.stages[0].state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    outputs = model(batch)
    assert outputs["mask_logits"].shape == (4, 7, SIZE, SIZE)
    loss = mask_task.loss(outputs, batch)
    assert torch.isfinite(loss)
    loss.backward()
    head_grads = [p.grad for p in model.head.parameters() if p.requires_grad]
    assert head_grads and all(g is not None for g in head_grads)
    assert any(float(g.abs().sum()) > 0 for g in head_grads)
    optimizer.step()
    after = backbone.stages[0].state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # parameters and BN buffers
    model.eval()  # the spec check's call: no input in the batch, so the target's size is used
    with torch.no_grad():
        alone = model.head(model.forward_features(batch["image"][:1]), {})["mask_logits"]
    assert alone.shape == (1, 7, SIZE, SIZE)


def test_skips_follow_the_strides() -> None:
    target = shapes().target
    info = build_backbone("vgg11", {}, target).feature_info  # /1 .. /32
    assert build_head("fcn", {"variant": "8s"}, info, target).stages == [5, 4, 3]  # /32, /16, /8
    assert build_head("fcn", {"variant": "16s"}, info, target).stages == [5, 4]
    lenet = build_backbone("lenet5", {}, target).feature_info  # c1 /1, s2 /2, c3 /2, s4 /4, c5 /4
    assert pyramid(lenet) == [0, 2, 4]  # the deepest stage of each stride
    small = build_backbone("convnet", {"widths": [8, 16]}, target).feature_info
    with pytest.raises(ValueError, match="variant '8s' fuses 2 stages .* use variant 32s or 16s"):
        build_head("fcn", {"variant": "8s"}, small, target)
    unet = build_head("unet", {"decoder_channels": [24, 12]}, info, target)
    assert [b.conv2[0].out_channels for b in unet.blocks] == [24, 12, 12, 12, 12]
    with pytest.raises(ValueError, match="decoder_channels lists 3 widths, but its decoder has 1 block"):
        build_head("unet", {"decoder_channels": [8, 8, 8]}, small, target)


@pytest.mark.parametrize("head", ["fcn", "unet"])
def test_head_refuses_a_label_target(head: str) -> None:
    task = shapes(target="label")
    info = build_backbone("convnet", {}, task.target).feature_info
    message = f"head '{head}' predicts mask targets, but the task provides 'label'"
    with pytest.raises(ValueError, match=message):
        build_head(head, {}, info, task.target)
    assert HEADS.entry(head).source == "transferlab"


def test_spec_with_a_mismatched_head_is_rejected() -> None:
    spec = """
name: wrong-head
study: single
backbone: {name: convnet, widths: [8, 16]}
head: {name: fcn, variant: 16s}
task: {name: shapes, train_size: 16, val_size: 8, test_size: 8}
"""
    with pytest.raises(SpecError, match="head 'fcn' predicts mask targets, but the task provides 'label'"):
        validate_spec_text(spec)
    validated = validate_spec_text(spec.replace("test_size: 8}", "test_size: 8, target: mask}"))
    assert validated.primary_metric == "miou" and validated.higher_is_better


# -- the shapes mask target -------------------------------------------------------------------------


def test_mask_target_data(mask_task: Task) -> None:
    target = mask_task.target
    assert target.kind == "mask" and target.num_classes == 7
    assert target.class_names == ("background", *KINDS)
    assert mask_task.primary_metric == "miou" and set(mask_task.metrics()) == {"miou", "pixel_accuracy"}
    labelled = shapes(target="label")
    for split in SPLITS:
        t, same = mask_task.dataset(split).tensors, labelled.dataset(split).tensors
        assert t["mask"].dtype == torch.int64 and t["mask"].shape == (len(t["image"]), SIZE, SIZE)
        assert 0 <= int(t["mask"].min()) and int(t["mask"].max()) <= 6
        assert torch.equal(t["mask"], same["mask"]) and torch.equal(t["image"], same["image"])
        # The largest shape (the label) is in the mask.
        assert all(bool((m == y + 1).any()) for m, y in zip(t["mask"], t["label"], strict=True))
    assert shapes().fingerprint() == mask_task.fingerprint() != labelled.fingerprint()


def test_mask_class_subset_renumbers_and_backgrounds_other_kinds(mask_task: Task) -> None:
    classes = [4, 1]
    subset = shapes(classes=classes)
    assert subset.target.num_classes == 3
    assert subset.target.class_names == ("background", "cross", "square")
    for split in SPLITS:
        full, sub = mask_task.dataset(split).tensors, subset.dataset(split).tensors
        keep = torch.isin(full["label"], torch.tensor(classes))
        assert torch.equal(sub["index"], full["index"][keep])  # the label task's images
        expected = torch.zeros_like(full["mask"][keep])
        for i, kind in enumerate(classes):
            expected[full["mask"][keep] == kind + 1] = i + 1
        assert torch.equal(sub["mask"], expected)
        assert torch.equal(subset_mask(full["mask"][keep], classes), expected)
    assert set(subset.dataset("train").tensors["mask"].unique().tolist()) == {0, 1, 2}


def test_unknown_target_lists_every_target() -> None:
    with pytest.raises(
        ValueError, match=r"target must be one of \['label', 'mask', 'box', 'caption', 'image'\], got 'masks'"
    ):
        build_task("shapes", {"target": "masks"})


# -- training ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "lr"), [(("fcn", {"variant": "8s"}), 0.01), (("unet", {"decoder_channels": [16]}), 0.003)]
)
def test_two_epochs_beat_all_background(head: tuple[str, dict], lr: float) -> None:
    task = build_task(
        "shapes", {"target": "mask", "train_size": 512, "val_size": 128, "test_size": 16, "seed": 3}
    )
    torch.manual_seed(0)
    model = build_model(("convnet", {"widths": [8, 16, 32, 32]}), head, task)
    config = FitConfig(epochs=2, batch_size=16, optimizer="adamw", lr=lr, weight_decay=0.0, device="cpu")
    result = fit(model, task, config)
    val = task.dataset("val").tensors["mask"]
    objective = SegmentationObjective(num_classes=7)
    baseline = scores(objective, one_hot_logits(torch.zeros_like(val), 7), val)["miou"]
    assert baseline == pytest.approx(float((val == 0).float().mean()) / 7)  # every class occurs
    assert result.history[-1]["val/miou"] > baseline + 0.04, (result.history, baseline)


def test_mask_class_subsets_are_validated_against_the_shape_kinds(tmp_path) -> None:
    from transferlab.service.spec import validate_spec_text
    from transferlab.service.spec_yaml import SpecError

    text = (
        "name: seg\nstudy: single\nbackbone: {name: convnet, widths: [4, 8]}\nhead: unet\n"
        "task: {name: shapes, target: mask, image_size: 16, train_size: 16, val_size: 8, test_size: 8}\n"
    )
    assert validate_spec_text(text + "single: {classes: [4, 5]}\n").num_classes == 6
    with pytest.raises(SpecError, match=r"classes \[6\] do not exist; the task has classes 0..5"):
        validate_spec_text(text + "single: {classes: [5, 6]}\n")
