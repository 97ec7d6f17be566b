"""``classify``: global average pooling of the last feature map and a linear classifier."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from transferlab.backbones.base import FeatureInfo
from transferlab.heads.base import Head, require_target
from transferlab.registry import HEADS
from transferlab.tasks.base import TargetSpec
from transferlab.tasks.splits import check_dropout


class GlobalAvgPool(nn.Module):
    """Mean over every position of an N x C x ... map (2-D images and 1-D sequences alike) -> N x C."""

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(2).mean(-1)


class ClassifyHead(Head):
    """Pool the last stage, optionally one hidden layer, then logits over the task's classes."""

    target_kinds = ("label",)

    def __init__(self, in_channels: int, num_classes: int, *, hidden: int | None, dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = [GlobalAvgPool(), nn.Flatten()]
        width = in_channels
        if hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
            width = hidden
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, features: list[Tensor], batch: dict[str, Any]) -> dict[str, Tensor]:
        return {"logits": self.net(features[-1])}


@HEADS.register("classify")
def classify(
    feature_info: FeatureInfo, target: TargetSpec, *, hidden: int | None = None, dropout: float = 0.0
) -> Head:
    """Global average pool + linear layer (optionally a hidden layer) over the task's classes."""
    require_target("classify", ClassifyHead.target_kinds, target.kind)
    if not target.num_classes or target.num_classes < 2:
        raise ValueError(f"head 'classify' needs at least 2 classes, the task has {target.num_classes}")
    dropout = check_dropout("head 'classify'", dropout)
    return ClassifyHead(feature_info[-1].channels, target.num_classes, hidden=hidden, dropout=dropout)
