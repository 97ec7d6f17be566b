"""``tinyvgg``: a few VGG-style stages (Simonyan & Zisserman 2015) for small images."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from transferlab.backbones import Backbone, StageInfo


def tinyvgg(
    *, in_channels: int = 3, widths: Sequence[int] = (16, 32, 64), convs: int = 2, batch_norm: bool = True
) -> Backbone:
    """VGG-style stages: 3x3 conv(-BN)-ReLU layers, then a 2x2 max-pool halving the resolution.

    Args:
        in_channels: Channels of the input images; transferlab passes the task's.
        widths: Output channels of each stage (one stage per width), e.g. ``[16, 32, 64]``.
        convs: 3x3 convolutions per stage (VGG-11's later stages use 2).
        batch_norm: Put BatchNorm after each convolution (VGG-BN).

    Stage i is named ``block<i>``; freeze depth k freezes ``block1`` .. ``block<k>``.
    """
    widths = [int(w) for w in widths]
    if not widths or min(widths) < 1:
        raise ValueError(f"tinyvgg: widths must be a non-empty list of positive integers, got {widths}")
    if convs < 1:
        raise ValueError(f"tinyvgg: convs must be >= 1, got {convs}")
    stages: list[nn.Module] = []
    infos: list[StageInfo] = []
    cin, reduction, rf = in_channels, 1, 1
    for i, width in enumerate(widths):
        layers: list[nn.Module] = []
        for _ in range(convs):
            layers.append(nn.Conv2d(cin, width, 3, padding=1, bias=not batch_norm))
            layers += [nn.BatchNorm2d(width)] if batch_norm else []
            layers.append(nn.ReLU(inplace=True))
            cin = width
            rf += 2 * reduction  # a 3x3 conv widens the receptive field by 2 input steps
        layers.append(nn.MaxPool2d(2))
        rf += reduction  # a 2x2 pool by one step, then doubles the step
        reduction *= 2
        stages.append(nn.Sequential(*layers))
        infos.append(StageInfo(f"block{i + 1}", width, reduction, rf))
    return Backbone(stages, infos, in_channels)
