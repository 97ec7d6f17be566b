"""``pooled_mlp``: pooled features through a small MLP to class logits."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from transferlab.backbones import FeatureInfo
from transferlab.heads import Head
from transferlab.heads.base import require_target
from transferlab.tasks import TargetSpec


class PooledMLPHead(Head):
    """Average- and max-pool the last feature map, concatenate, one hidden layer, then logits."""

    target_kinds = ("label",)

    def __init__(self, channels: int, num_classes: int, *, hidden: int, dropout: float) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(2 * channels, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, features: list[Tensor], batch: dict[str, Any]) -> dict[str, Tensor]:
        last = features[-1].flatten(2)  # N x C x positions
        pooled = torch.cat([last.mean(-1), last.amax(-1)], dim=1)
        return {"logits": self.mlp(pooled)}


def pooled_mlp(
    feature_info: FeatureInfo, target: TargetSpec, *, hidden: int = 64, dropout: float = 0.1
) -> Head:
    """Avg+max pooled last stage -> hidden layer -> logits, for label targets.

    Args:
        feature_info: The backbone's per-stage metadata; only the last stage's channels are used.
        target: The task's target; must be a label target with at least 2 classes.
        hidden: Width of the hidden layer.
        dropout: Dropout before the output layer, in [0, 1).
    """
    require_target("pooled_mlp", PooledMLPHead.target_kinds, target.kind)
    if not target.num_classes or target.num_classes < 2:
        raise ValueError(f"head 'pooled_mlp' needs at least 2 classes, the task has {target.num_classes}")
    if hidden < 1:
        raise ValueError(f"head 'pooled_mlp': hidden must be >= 1, got {hidden}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"head 'pooled_mlp': dropout must be in [0, 1), got {dropout}")
    return PooledMLPHead(feature_info[-1].channels, target.num_classes, hidden=hidden, dropout=dropout)
