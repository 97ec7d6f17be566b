"""CIFAR-style ResNet and its plain twin (He et al. 2016, "Deep Residual Learning", section 4.2).

A 3x3 convolution with 16 filters, then three stages of n basic blocks (two 3x3 convolutions each)
with 16, 32 and 64 filters on 32, 16 and 8 pixel maps for a 32 px input: 6n + 2 weighted layers
counting the final classifier. Where a stage halves the map and doubles the width, the shortcut is
the paper's option A for CIFAR: identity on every other pixel with the new channels zero-padded, so
it adds no parameters (ResNet-20: 0.27 M). Option B (a 1x1 projection) is available. The plain
nets are the same stacks without shortcuts.
"""

from __future__ import annotations

import functools

import torch.nn.functional as F
from torch import Tensor, nn

from transferlab.backbones.base import Backbone, StageInfo
from transferlab.backbones.small import receptive_fields
from transferlab.registry import BACKBONES

WIDTHS = (16, 32, 64)
SHORTCUTS = ("A", "B")


class ZeroPadShortcut(nn.Module):
    """Option A: subsample by ``stride`` and zero-pad the new channels (no parameters)."""

    def __init__(self, stride: int, extra_channels: int) -> None:
        super().__init__()
        self.stride, self.extra_channels = stride, extra_channels

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn, plus the shortcut unless ``shortcut`` is None, then relu."""

    def __init__(self, cin: int, cout: int, stride: int, shortcut: str | None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module | None = None
        if shortcut is not None:
            self.shortcut = nn.Identity()
            if stride != 1 or cin != cout:
                self.shortcut = (
                    ZeroPadShortcut(stride, cout - cin)
                    if shortcut == "A"
                    else nn.Sequential(
                        nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
                    )
                )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return F.relu(out)


def cifar_stages(depth: int, in_channels: int, shortcut: str | None) -> list[nn.Module]:
    """The stem and the three stages of a (6n + 2)-layer CIFAR net, He-initialised."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth}")
    if shortcut is not None and shortcut not in SHORTCUTS:
        raise ValueError(
            f"shortcut must be 'A' (zero-padding identity) or 'B' (projection), got {shortcut!r}"
        )
    n = (depth - 2) // 6
    stem = nn.Sequential(
        nn.Conv2d(in_channels, WIDTHS[0], 3, padding=1, bias=False), nn.BatchNorm2d(WIDTHS[0]), nn.ReLU()
    )
    stages: list[nn.Module] = [stem]
    cin = WIDTHS[0]
    for i, width in enumerate(WIDTHS):
        stride = 1 if i == 0 else 2
        blocks = [
            BasicBlock(cin if b == 0 else width, width, stride if b == 0 else 1, shortcut) for b in range(n)
        ]
        stages.append(nn.Sequential(*blocks))
        cin = width
    for m in nn.ModuleList(stages).modules():
        if isinstance(m, nn.Conv2d):  # He et al. 2015 init, as the paper
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return stages


def cifar_classifier(depth: int, in_channels: int, shortcut: str | None, num_classes: int = 10) -> nn.Module:
    """The published CIFAR-10 net: the stages, global average pooling and a 10-way linear layer."""
    stages = cifar_stages(depth, in_channels, shortcut)
    return nn.Sequential(*stages, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(WIDTHS[-1], num_classes))


def _cifar_backbone(depth: int, in_channels: int, shortcut: str | None) -> Backbone:
    stages = cifar_stages(depth, in_channels, shortcut)
    rfs = receptive_fields([_conv_path(stage) for stage in stages])
    names = ("stem", "stage1", "stage2", "stage3")
    channels, reductions = (WIDTHS[0], *WIDTHS), (1, 1, 2, 4)
    infos = [StageInfo(*info) for info in zip(names, channels, reductions, rfs, strict=True)]
    backbone = Backbone(stages, infos, in_channels)
    backbone.reference = functools.partial(cifar_classifier, depth, in_channels, shortcut)
    return backbone


def _conv_path(stage: nn.Module) -> nn.Module:
    """The stage's convolutions outside the shortcuts, in order: its longest path, which sets the RF."""
    blocks = [m for m in stage.modules() if isinstance(m, BasicBlock)]
    return nn.Sequential(*(conv for b in blocks for conv in (b.conv1, b.conv2))) if blocks else stage


@BACKBONES.register("resnet20")
def resnet20(*, in_channels: int = 3, depth: int = 20, shortcut: str = "A") -> Backbone:
    """CIFAR ResNet (He et al. 2016, 4.2), 6n+2 layers: stem, stage1, stage2, stage3 (16/32/64 ch)."""
    return _cifar_backbone(depth, in_channels, shortcut)


@BACKBONES.register("plain20")
def plain20(*, in_channels: int = 3, depth: int = 20) -> Backbone:
    """CIFAR plain net (He et al. 2016, 4.2): resnet20 without shortcuts; stem, stage1, stage2, stage3."""
    return _cifar_backbone(depth, in_channels, None)
