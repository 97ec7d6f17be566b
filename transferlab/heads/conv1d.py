"""``conv1d``: temporal convolutions over the last feature map, max-over-time pooling, logits.

The head of Kim (2014) and of frame-level audio classifiers. It reads the backbone's last map as a
sequence N x C x L. A 2-D map N x C x H x W (a 2-D backbone run over a spectrogram "image" whose
rows are frequency bands and whose columns are frames) is reduced to N x C x W first, pooling over H
(``frequency_pool``), so width is time. Pooling rather than folding H into the channels keeps the
head independent of the input's height: ``feature_info`` says nothing about H, and the same head
then fits any number of mel bands.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from transferlab.backbones.base import FeatureInfo
from transferlab.backbones.sequence import same_conv1d
from transferlab.heads.base import Head, require_target
from transferlab.registry import HEADS
from transferlab.tasks.base import TargetSpec
from transferlab.tasks.splits import check_dropout, check_int

FREQUENCY_POOLS = ("mean", "max")


class Conv1dHead(Head):
    """Conv1d-BN-ReLU layers ("same" length), max over time, optional dropout, a linear layer."""

    target_kinds = ("label",)

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        channels: Sequence[int],
        kernel_size: int,
        frequency_pool: str,
        dropout: float,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_channels
        for c in channels:
            layers += [
                same_conv1d(width, c, kernel_size, bias=False),
                nn.BatchNorm1d(c),
                nn.ReLU(inplace=True),
            ]
            width = c
        self.convs = nn.Sequential(*layers)
        self.frequency_pool = frequency_pool
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, features: list[Tensor], batch: dict[str, Any]) -> dict[str, Tensor]:
        x = features[-1]
        if x.ndim == 4:  # N x C x H x W: H is frequency, W is time
            x = x.mean(dim=2) if self.frequency_pool == "mean" else x.amax(dim=2)
        elif x.ndim != 3:
            raise ValueError(
                f"head 'conv1d' reads N x C x L (or N x C x H x W) feature maps, got {tuple(x.shape)}"
            )
        x = self.convs(x).amax(dim=-1)  # max over time: one value per filter, any length
        return {"logits": self.fc(self.dropout(x))}


@HEADS.register("conv1d")
def conv1d(
    feature_info: FeatureInfo,
    target: TargetSpec,
    *,
    channels: Sequence[int] = (128,),
    kernel_size: int = 3,
    frequency_pool: str = "mean",
    dropout: float = 0.0,
) -> Head:
    """Temporal 1-D convolutions + max-over-time pooling + linear, on 1-D or spectrogram features.

    Args:
        feature_info: The backbone's stages; the head reads the last one's channels.
        target: A label target (its ``num_classes``).
        channels: Output channels of each temporal convolution; ``[]`` pools the map directly.
        kernel_size: Width of the temporal convolutions, in steps of the last map.
        frequency_pool: "mean" or "max" over the height of a 2-D map (ignored for 1-D maps).
        dropout: Dropout before the linear layer (Kim 2014 used 0.5).
    """
    require_target("conv1d", Conv1dHead.target_kinds, target.kind)
    if not target.num_classes or target.num_classes < 2:
        raise ValueError(f"head 'conv1d' needs at least 2 classes, the task has {target.num_classes}")
    if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence):
        raise ValueError(f"head 'conv1d': channels must be a list of positive integers, got {channels!r}")
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in channels):
        raise ValueError(f"head 'conv1d': channels must be a list of positive integers, got {channels!r}")
    kernel_size = check_int("head 'conv1d'", "kernel_size", kernel_size, minimum=1)
    if frequency_pool not in FREQUENCY_POOLS:
        raise ValueError(
            f"head 'conv1d': frequency_pool must be one of {list(FREQUENCY_POOLS)}, got {frequency_pool!r}"
        )
    dropout = check_dropout("head 'conv1d'", dropout)
    return Conv1dHead(
        feature_info[-1].channels,
        target.num_classes,
        channels=list(channels),
        kernel_size=kernel_size,
        frequency_pool=frequency_pool,
        dropout=dropout,
    )
