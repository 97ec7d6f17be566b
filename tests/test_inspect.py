"""``inspect``: complexity against hand counts, published figures and brute-force receptive fields."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from transferlab.backbones.base import Backbone, StageInfo
from transferlab.cli.inspect_cmd import si
from transferlab.cli.main import cli
from transferlab.engine.assembly import build_backbone
from transferlab.engine.complexity import (
    HEAD_NAME,
    InspectError,
    count_model,
    inspect_backbone,
    measure_backbone,
    parse_input_shape,
)
from transferlab.registry import BACKBONES, BUILTIN_SOURCE
from transferlab.tasks.base import TargetSpec


def invoke(*args: str):
    return CliRunner().invoke(cli, ["inspect", *args])


# -- hand counts --------------------------------------------------------------------------------

# LeNet-5 on one 1x32x32 image, worked by hand. A 5x5 conv from c_in to c_out channels has
# c_out * (25 * c_in + 1) parameters and H_out * W_out * c_out * 25 * c_in MACs; pooling has none.
LENET5 = [  # name, output shape, stride, receptive field, params, MACs
    ("c1", (6, 28, 28), 1, 5, 6 * (25 * 1 + 1), 28 * 28 * 6 * 25 * 1),
    ("s2", (6, 14, 14), 2, 6, 0, 0),
    ("c3", (16, 10, 10), 2, 14, 16 * (25 * 6 + 1), 10 * 10 * 16 * 25 * 6),
    ("s4", (16, 5, 5), 4, 16, 0, 0),
    ("c5", (120, 1, 1), 4, 32, 120 * (25 * 16 + 1), 1 * 1 * 120 * 25 * 16),
]


def test_lenet5_matches_hand_counts() -> None:
    report = inspect_backbone("lenet5", (1, 32, 32))
    assert [s.name for s in report.stages] == [row[0] for row in LENET5]
    for stage, (_, shape, stride, rf, params, macs) in zip(report.stages, LENET5, strict=True):
        assert stage.output_shape == shape
        assert stage.channels == shape[0]
        assert stage.stride == stride
        assert stage.receptive_field == (rf, rf)
        assert (stage.params, stage.macs, stage.flops) == (params, macs, 2 * macs)
        assert stage.activation_bytes == 4 * shape[0] * shape[1] * shape[2]  # float32, batch 1
    assert report.total.params == 50_692 == sum(r[4] for r in LENET5)
    assert report.total.macs == 405_600 == sum(r[5] for r in LENET5)
    assert report.total.flops == 811_200
    assert report.total.activation_bytes == 4 * (4704 + 1176 + 1600 + 400 + 120)


def test_convnet_options_change_the_counts() -> None:
    report = inspect_backbone("convnet", "3x32x32", {"widths": [8, 16]})
    conv1, conv2 = report.stages
    # 3x3 convs without bias (BatchNorm follows: 2 parameters per channel).
    assert conv1.params == 8 * 3 * 9 + 2 * 8 and conv1.macs == 32 * 32 * 8 * 3 * 9
    assert conv2.params == 16 * 8 * 9 + 2 * 16 and conv2.macs == 16 * 16 * 16 * 8 * 9
    assert (conv1.output_shape, conv2.output_shape) == ((8, 32, 32), (16, 16, 16))
    assert report.options == {"widths": [8, 16]}


def test_counter_counts_only_convolutions_and_matrix_products() -> None:
    """FlopCounterMode ignores bias, normalisation, activation, pooling and addition, as the tables do."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.rest = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.AvgPool2d(2))
            self.fc = nn.Linear(4 * 4 * 4, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.rest(self.conv(x) + x).sigmoid() * 2
            return self.fc(y.flatten(1)).softmax(1)

    totals, output = count_model(Block(), (4, 16, 16))
    assert totals.macs == 16 * 16 * 4 * 4 * 9 + 64 * 10
    assert totals.params == 4 * 4 * 9 + 4 + 2 * 4 + 64 * 10 + 10
    assert output.shape == (1, 10)


# -- published figures ---------------------------------------------------------------------------

# Parameters and MACs as published (the lecture's table at 224 x 224; torchvision's model docs give
# AlexNet 0.714 GMACs for its one-GPU variant, which the lecture rounds to 0.71; GoogLeNet from
# torchvision's docs; ResNet-20's 0.27 M parameters from He et al. 2016, table 6, on 32 x 32 CIFAR
# images, its MACs worked by hand: 16 * 27 * 32^2 + 6 * 16 * 144 * 32^2 + 32 * 144 * 16^2
# + 5 * 32 * 288 * 16^2 + 64 * 288 * 8^2 + 5 * 64 * 576 * 8^2 + 64 * 10 = 40,551,040).
PUBLISHED = [  # registered name, input, torchvision builder (None: no torchvision twin), params, MACs
    ("alexnet", "3x224x224", "alexnet", 61.1e6, 0.714e9),
    ("vgg16", "3x224x224", "vgg16", 138.4e6, 15.5e9),
    ("resnet50", "3x224x224", "resnet50", 25.6e6, 4.1e9),
    ("mobilenetv2", "3x224x224", "mobilenet_v2", 3.5e6, 0.30e9),
    ("googlenet", "3x224x224", None, 6.6e6, 1.5e9),
    ("resnet20", "3x32x32", None, 0.27e6, 40_551_040),
]
TOLERANCE = 0.005
FOUR = [row for row in PUBLISHED if row[2] is not None]


@pytest.mark.parametrize(("name", "shape", "builder", "params", "macs"), FOUR, ids=[r[0] for r in FOUR])
def test_counter_agrees_with_published_reference_models(
    name: str, shape: str, builder: str, params: float, macs: float
) -> None:
    """The counting itself, on torchvision's reference implementations (built on the meta device)."""
    import torchvision

    with torch.device("meta"):
        totals, output = count_model(getattr(torchvision.models, builder)(), parse_input_shape(shape))
    assert totals.params == pytest.approx(params, rel=TOLERANCE)
    assert totals.macs == pytest.approx(macs, rel=TOLERANCE)
    assert output.shape == (1, 1000)


@pytest.mark.parametrize(
    ("name", "shape", "builder", "params", "macs"), PUBLISHED, ids=[r[0] for r in PUBLISHED]
)
def test_inspect_totals_as_published(name: str, shape: str, builder: str, params: float, macs: float) -> None:
    """``inspect NAME`` reports the published totals (stages + head as published) within 0.5%."""
    report = inspect_backbone(name, shape)
    assert report.published is not None, report.notes
    assert report.published.params == pytest.approx(params, rel=TOLERANCE)
    assert report.published.macs == pytest.approx(macs, rel=TOLERANCE)
    assert report.head is not None and report.head.name == HEAD_NAME
    assert report.head.params + report.total.params == report.published.params
    assert report.head.macs + report.total.macs == report.published.macs
    assert report.head.macs > 0 and all(s.receptive_field is not None for s in report.stages)


# inspect measures image backbones; the 1-D ones (transferlab.backbones.sequence) are checked elsewhere.
BUILTIN = [
    e.name
    for e in BACKBONES.entries()
    if e.source == BUILTIN_SOURCE
    and e.name != "timm"
    and e.factory.__module__ != "transferlab.backbones.sequence"
]


@pytest.mark.parametrize("name", BUILTIN)
def test_every_builtin_backbone_is_inspected_consistently(name: str) -> None:
    """Every stage's field is followed, and what was measured agrees with ``feature_info``."""
    report = inspect_backbone(name, (3, 224, 224))
    assert all(s.receptive_field is not None for s in report.stages), report.stages
    fields = [s.receptive_field[0] for s in report.stages]
    assert fields == sorted(fields) and fields[0] > 1
    assert not [n for n in report.notes if "feature_info says" in n]
    assert report.total.params == sum(s.params for s in report.stages)
    assert report.total.macs == sum(s.macs for s in report.stages) > 0


def test_head_row_is_the_reference_minus_the_stages() -> None:
    """A backbone whose reference is torchvision's ResNet-50: the head row is its fc layer (2048 -> 1000)."""
    import torchvision

    with torch.device("meta"):
        backbone = build_backbone("timm/resnet50", {}, TargetSpec(kind="image"))
        backbone.reference = torchvision.models.resnet50
        report = measure_backbone(backbone, (3, 224, 224), name="resnet50")
    assert report.head is not None and report.published is not None
    assert (report.head.params, report.head.macs) == (2048 * 1000 + 1000, 2048 * 1000)
    assert report.head.output_shape == (1000,)
    assert report.published.params == 25_557_032
    assert report.total.params == 25_557_032 - 2_049_000
    assert [s.receptive_field[0] for s in report.stages] == [7, 35, 91, 267, 427]
    assert report.to_dict()["head_as_published"]["flops"] == 2 * 2048 * 1000


def test_reference_that_cannot_run_is_a_note_not_an_error() -> None:
    backbone = build_backbone("lenet5", {}, TargetSpec(kind="image", in_channels=1))
    backbone.reference = lambda: nn.Sequential(nn.Flatten(), nn.Linear(36 * 36, 10))  # 36 x 36 only
    report = measure_backbone(backbone, (1, 32, 32), name="lenet5")
    assert report.head is None and report.published is None
    assert any("does not run on a 1x32x32 input" in n for n in report.notes), report.notes

    backbone.reference = lambda: nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 10))  # 10,250 parameters
    smaller = measure_backbone(backbone, (1, 32, 32), name="lenet5")
    assert smaller.head is None and smaller.published.params == 32 * 32 * 10 + 10
    assert any("smaller than these stages" in n for n in smaller.notes), smaller.notes


def test_backbone_that_needs_real_values_is_measured_on_the_cpu() -> None:
    """A forward pass that reads a value (``.item()``) cannot run on the meta device: retried on the CPU."""

    class DataDependent(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2 if x.abs().sum().item() >= 0 else x

    def data_dependent(*, in_channels: int = 3) -> Backbone:
        stages = [nn.Conv2d(in_channels, 4, 3), DataDependent()]
        return Backbone(stages, [StageInfo("conv", 4, 1), StageInfo("scale", 4, 1)], in_channels)

    BACKBONES.add("data_dependent", data_dependent, source="tests")
    try:
        report = inspect_backbone("data_dependent", "3x8x8")
    finally:
        BACKBONES.remove("data_dependent")
    assert [s.receptive_field for s in report.stages] == [(3, 3), (3, 3)]
    assert report.total.macs == 6 * 6 * 4 * 27


# -- receptive fields ----------------------------------------------------------------------------


class Branches(nn.Module):
    """An inception-style block: branches with different, partly off-centre fields, concatenated."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.one = nn.Conv2d(c, c, 1)
        self.dilated = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=2, dilation=2))
        self.wide = nn.Conv2d(c, c, (1, 5), padding=(0, 2))  # widens the field along W only
        self.pool = nn.MaxPool2d(3, stride=1, padding=1)
        # Padded on the right/bottom only: output i sees inputs i..i+4, off-centre to the others.
        self.shifted = nn.Sequential(nn.ZeroPad2d((0, 4, 0, 4)), nn.Conv2d(c, c, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.one(x), self.dilated(x), self.wide(x), self.pool(x), self.shifted(x)], 1)


class Residual(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def branched() -> Backbone:
    """Stem, an inception block, a strided residual stage: fields 3, 3 + 8 - 1 = 10, then 10 + 2 + 4*2."""
    stages = [
        nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()),
        nn.Sequential(Branches(4), nn.Conv2d(20, 4, 1)),
        nn.Sequential(
            nn.Conv2d(4, 4, 3, stride=2, padding=1),
            Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))),
        ),
    ]
    infos = [StageInfo("stem", 4, 1), StageInfo("inception", 4, 1), StageInfo("down", 4, 2)]
    return Backbone(stages, infos, in_channels=3)


def positive_linear_copy(backbone: Backbone) -> Backbone:
    """A copy whose every path passes gradient: positive weights, identity BatchNorm, max -> average pool.

    Max pooling routes the gradient to one input per window, so it would hide most of its field;
    average pooling with the same kernel, stride and padding has the same field and passes it all.
    """
    model = copy.deepcopy(backbone).float().eval()
    for parent in list(model.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, nn.MaxPool2d):
                pool = nn.AvgPool2d(child.kernel_size, child.stride, child.padding, child.ceil_mode)
                setattr(parent, child_name, pool)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.fill_(1.0 / m.weight[0].numel())
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_parameters()  # weight 1, bias 0, running mean 0, running variance 1
    return model


def brute_force_fields(backbone: Backbone, size: int, stages: int) -> list[tuple[int, int]]:
    """Height and width of the input region whose gradient reaches each stage's centre output pixel."""
    model = positive_linear_copy(backbone)
    x = torch.ones(1, backbone.in_channels, size, size, requires_grad=True)
    fields, h = [], x
    for stage in model.stages[:stages]:
        h = stage(h)
        centre = h[0, :, h.shape[2] // 2, h.shape[3] // 2].sum()
        (grad,) = torch.autograd.grad(centre, x, retain_graph=True)
        reached = grad[0].abs().sum(0) > 0
        rows, cols = reached.any(1).nonzero().flatten(), reached.any(0).nonzero().flatten()
        # A field cut by the image border would be too small: the test's input must be large enough.
        assert rows.min() > 0 and cols.min() > 0 and rows.max() < size - 1 and cols.max() < size - 1
        fields.append((int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)))
    return fields


RF_CASES = [  # backbone, input size, stages checked (those whose field fits)
    ("lenet5", 48, 5),
    ("convnet", 64, 5),
    ("resnet20", 96, 4),  # fields 3, 15, 37, 81; option-A shortcuts subsample by slicing
    ("timm/resnet18", 112, 3),  # fields 7, 43, 99
    ("vgg11", 40, 3),  # fields 3, 8, 26
    ("googlenet", 80, 3),  # inception branches; fields 7, 19, 59
    ("branched", 32, 3),
]


@pytest.mark.parametrize(("name", "size", "stages"), RF_CASES, ids=[c[0] for c in RF_CASES])
def test_receptive_fields_match_brute_force(name: str, size: int, stages: int) -> None:
    torch.manual_seed(0)
    target = TargetSpec(kind="image", in_channels=3, image_size=(size, size))
    backbone = branched() if name == "branched" else build_backbone(name, {}, target)
    computed = measure_backbone(copy.deepcopy(backbone).to("meta"), (3, size, size), name=name).stages
    fields = brute_force_fields(backbone, size, stages)
    assert [s.receptive_field for s in computed[:stages]] == fields
    for stage, info in zip(computed, backbone.feature_info, strict=True):
        if info.receptive_field is not None:  # lenet5 and convnet declare theirs
            assert stage.receptive_field == (info.receptive_field, info.receptive_field)


def test_branched_fields_take_the_widest_and_off_centre_branches() -> None:
    report = measure_backbone(branched(), (3, 32, 32), name="branched")
    # Inception block: centred branches reach 3 px either side, the shifted one 4 px to one side,
    # so the union spans 3 + 1 + 4 = 8 input steps on top of the stem's 3.
    assert [s.receptive_field for s in report.stages] == [(3, 3), (10, 10), (20, 20)]
    assert not report.notes[:-1]  # only "no published reference"


def test_squeeze_excitation_marks_global_context() -> None:
    class SqueezeExcite(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.conv = nn.Conv2d(c, c, 3, padding=1)
            self.fc = nn.Conv2d(c, c, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return y * self.fc(y.mean((2, 3), keepdim=True)).sigmoid()

    stages = [nn.Conv2d(3, 4, 3, padding=1), SqueezeExcite(4), nn.AdaptiveAvgPool2d(1)]
    backbone = Backbone(stages, [StageInfo("a", 4, 1), StageInfo("se", 4, 1), StageInfo("pool", 4, 16)], 3)
    a, se, pool = measure_backbone(backbone, (3, 16, 16)).stages
    assert (a.receptive_field, a.global_context) == ((3, 3), False)
    assert (se.receptive_field, se.global_context) == ((5, 5), True)  # the conv path's field, plus context
    assert (pool.receptive_field, pool.global_context) == (None, True)  # every value sees the whole input


# -- inputs, errors and the command --------------------------------------------------------------


@pytest.mark.parametrize("text", ["3x224", "3x224x224x2", "axbxc", "0x32x32", "", "3*224*224"])
def test_bad_input_shapes_are_rejected(text: str) -> None:
    with pytest.raises(InspectError, match="expected CxHxW, e.g. 3x224x224"):
        parse_input_shape(text)
    assert parse_input_shape(" 1X28x28") == (1, 28, 28)


def test_command_json_has_raw_numbers() -> None:
    result = invoke("lenet5", "--input", "1x32x32", "--output", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["input_shape"] == [1, 32, 32]
    assert [s["params"] for s in data["stages"]] == [r[4] for r in LENET5]
    assert [s["macs"] for s in data["stages"]] == [r[5] for r in LENET5]
    assert [s["receptive_field"] for s in data["stages"]] == [[r[3], r[3]] for r in LENET5]
    assert data["total"] == {"params": 50_692, "macs": 405_600, "flops": 811_200, "activation_bytes": 32_000}
    assert data["conventions"]["flops"] == "2 FLOPs per MAC"


def test_command_table_has_human_numbers() -> None:
    result = invoke("convnet", "--input", "3x64x64", "--option", "widths=[8, 16]", "--option", "blocks=2")
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines() if line.strip()}
    # conv2: 3x3 convs 8->16 and 16->16 at 32x32 without bias (3,456 weights), 2 BatchNorms (64).
    assert "16x32x32" in lines["conv2"] and "3.52 k" in lines["conv2"]
    assert "3.54 M" in lines["conv2"] and "7.08 M" in lines["conv2"]  # MACs and FLOPs
    assert "65.5 kB" in lines["conv2"]  # 16 * 32 * 32 float32 values


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["lenett5"], "backbone 'lenett5' is not registered; did you mean 'lenet5'"),
        (["timm/resnet5o"], "timm has no model 'resnet5o'"),
        (["lenet5", "--input", "3x224"], "expected CxHxW, e.g. 3x224x224, got '3x224'"),
        (["lenet5", "--input", "1x16x16"], "input 1x16x16 is too small for lenet5: stage 'c5' (5 of 5)"),
        (["lenet5", "--option", "widths"], "Invalid value for --option: expected KEY=VALUE, got 'widths'"),
        (["lenet5", "--option", "widths=[8]"], "backbone 'lenet5' has no option 'widths'"),
        (
            ["convnet", "--option", "widths=[8"],
            "Invalid value for --option: 'widths=[8': the value is not YAML",
        ),
    ],
)
def test_command_errors_are_clear(args: list[str], message: str) -> None:
    result = invoke(*args)
    usage_error = "Invalid value" in message  # click's exit status for a malformed option is 2
    assert result.exit_code == (2 if usage_error else 1), result.output
    assert "Traceback" not in result.output
    assert message in result.output


def test_si_prefixes() -> None:
    assert [si(25_557_032), si(4_089_184_256), si(9_232_384, "B"), si(156), si(0)] == [
        "25.6 M",
        "4.09 G",
        "9.23 MB",
        "156",
        "0",
    ]
    assert si(999_600) == "1.00 M" and si(138_357_544) == "138 M" and si(1.5e12) == "1.50 T"
