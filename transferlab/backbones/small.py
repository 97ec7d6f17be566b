"""Small backbones from the CNN lecture: LeNet-5 and a configurable plain ``convnet``."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from transferlab.backbones.base import Backbone, StageInfo
from transferlab.registry import BACKBONES


def receptive_fields(stages: Sequence[nn.Module]) -> list[int]:
    """Receptive field (input pixels) after each stage of a purely sequential conv/pool net.

    Walks the stages' convolution and pooling layers in order: ``rf += (k - 1) * dilation * jump``
    and ``jump *= stride``. Only valid for nets without parallel branches.
    """
    rf, jump, out = 1, 1, []
    for stage in stages:
        for m in stage.modules():
            if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
                k = m.kernel_size if isinstance(m.kernel_size, int) else m.kernel_size[0]
                s = m.stride if isinstance(m.stride, int) else m.stride[0]
                d = getattr(m, "dilation", 1)
                d = d if isinstance(d, int) else d[0]
                rf += (k - 1) * d * jump
                jump *= s
        out.append(rf)
    return out


def _with_receptive_fields(stages: list[nn.Module], infos: list[StageInfo]) -> list[StageInfo]:
    return [
        StageInfo(i.name, i.channels, i.reduction, rf)
        for i, rf in zip(infos, receptive_fields(stages), strict=True)
    ]


@BACKBONES.register("lenet5")
def lenet5(*, in_channels: int = 1, activation: str = "tanh") -> Backbone:
    """LeNet-5 (LeCun et al. 1998): C1, S2, C3, S4, C5 as five stages; needs inputs of at least 32 px."""
    activations: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU}
    if activation not in activations:
        raise ValueError(f"lenet5: activation must be 'tanh' or 'relu', got {activation!r}")
    act = activations[activation]
    stages: list[nn.Module] = [
        nn.Sequential(nn.Conv2d(in_channels, 6, 5), act()),
        nn.AvgPool2d(2),
        nn.Sequential(nn.Conv2d(6, 16, 5), act()),
        nn.AvgPool2d(2),
        nn.Sequential(nn.Conv2d(16, 120, 5), act()),
    ]
    infos = [
        StageInfo("c1", 6, 1),
        StageInfo("s2", 6, 2),
        StageInfo("c3", 16, 2),
        StageInfo("s4", 16, 4),
        StageInfo("c5", 120, 4),
    ]
    return Backbone(stages, _with_receptive_fields(stages, infos), in_channels)


def _conv_bn_relu(cin: int, cout: int, stride: int, batch_norm: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.ReLU(inplace=True))
    return layers


@BACKBONES.register("convnet")
def convnet(
    *,
    in_channels: int = 3,
    widths: Sequence[int] = (16, 32, 64, 96, 128),
    blocks: int = 1,
    batch_norm: bool = True,
) -> Backbone:
    """Plain 3x3 conv net: a stem at full resolution, then one stride-2 stage per extra width."""
    if not widths or any(int(w) < 1 for w in widths):
        raise ValueError(f"widths must be a non-empty list of positive channel counts, got {list(widths)}")
    if blocks < 1:
        raise ValueError(f"blocks must be >= 1, got {blocks}")
    stages: list[nn.Module] = []
    infos: list[StageInfo] = []
    cin, reduction = in_channels, 1
    for i, width in enumerate(widths):
        stride = 1 if i == 0 else 2
        reduction *= stride
        layers = _conv_bn_relu(cin, width, stride, batch_norm)
        for _ in range(blocks - 1):
            layers += _conv_bn_relu(width, width, 1, batch_norm)
        stages.append(nn.Sequential(*layers))
        # Named by freeze depth: conv1 (the stem) is stage 1, so depth n freezes conv1..convn.
        infos.append(StageInfo(f"conv{i + 1}", width, reduction))
        cin = width
    for module in stages:
        for m in module.modules():
            if isinstance(m, nn.Conv2d):  # He init, as torchvision's ResNets: keeps activations' scale
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return Backbone(stages, _with_receptive_fields(stages, infos), in_channels)
