"""A backbone and a head as one model, with a frozen prefix and a trainable suffix.

The first ``freeze_depth`` stages are frozen: no parameter of theirs requires a gradient, they run
under ``torch.no_grad()`` so no activation is kept for backward, and with ``bn_policy="frozen"``
they stay in eval mode after ``model.train()`` (BatchNorm keeps its running statistics, dropout is
off), which makes the frozen prefix a fixed function of its input. ``bn_policy="train"`` lets the
frozen stages follow ``train()``, so BatchNorm statistics adapt to the new data while weights stay.
(``torch.no_grad`` rather than ``torch.inference_mode``: the trainable stages save the prefix's
output for their weights' gradients, which autograd refuses for inference-mode tensors.)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from transferlab.backbones.base import Backbone, check_depth

BN_POLICIES = ("frozen", "train")
#: Batch fields ``frozen_features.<i>`` carry frozen stage i's output precomputed by the feature cache.
FROZEN_FEATURES_PREFIX = "frozen_features."


def frozen_feature_keys(depth: int) -> list[str]:
    """The batch fields of the cached outputs of frozen stages 1..depth (see ``engine.feature_cache``)."""
    return [f"{FROZEN_FEATURES_PREFIX}{i}" for i in range(depth)]


class TransferModel(nn.Module):
    """``backbone -> head`` with an explicit frozen prefix.

    Args:
        backbone: A ``Backbone``.
        head: A head built from ``backbone.feature_info``.
        freeze_depth: Number of leading stages to freeze (0 = none, ``len(stages)`` = all).
        bn_policy: "frozen" or "train", see the module docstring.
        input_key: The batch field fed to the backbone (the task's ``target.input_key``).
    """

    def __init__(
        self,
        backbone: Backbone,
        head: nn.Module,
        *,
        freeze_depth: int = 0,
        bn_policy: str = "frozen",
        input_key: str = "image",
    ):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.input_key = input_key
        self.freeze_depth = 0
        self.bn_policy = "frozen"
        self.set_freeze(freeze_depth, bn_policy)

    def set_freeze(self, depth: int, bn_policy: str = "frozen") -> None:
        """Freeze ``stages[0:depth]`` and unfreeze the rest."""
        check_depth(depth, self.backbone.feature_info, type(self.backbone).__name__)
        if bn_policy not in BN_POLICIES:
            raise ValueError(f"bn_policy must be one of {BN_POLICIES}, got {bn_policy!r}")
        self.freeze_depth, self.bn_policy = depth, bn_policy
        for i, stage in enumerate(self.backbone.stages):
            stage.requires_grad_(i >= depth)
        self.train(self.training)

    @property
    def frozen_stages(self) -> nn.ModuleList:
        return self.backbone.stages[: self.freeze_depth]

    def train(self, mode: bool = True) -> TransferModel:
        super().train(mode)
        if self.bn_policy == "frozen":
            for stage in self.frozen_stages:
                stage.eval()
        return self

    def forward_frozen(self, x: Tensor) -> list[Tensor]:
        """Features of the frozen prefix, computed without building an autograd graph."""
        features: list[Tensor] = []
        with torch.no_grad():
            for stage in self.frozen_stages:
                x = stage(x)
                features.append(x)
        return features

    def forward_trainable(self, x: Tensor, features: list[Tensor]) -> list[Tensor]:
        """Continue from the frozen prefix's last output ``x`` through the trainable stages."""
        features = list(features)
        for stage in self.backbone.stages[self.freeze_depth :]:
            x = stage(x)
            features.append(x)
        return features

    def forward_features(self, x: Tensor) -> list[Tensor]:
        frozen = self.forward_frozen(x)
        return self.forward_trainable(frozen[-1] if frozen else x, frozen)

    def batch_features(self, batch: dict[str, Any]) -> list[Tensor]:
        """Backbone features of a batch; one that carries its frozen prefix's cached outputs
        (``frozen_features.<i>``) skips the prefix and runs the trainable stages only."""
        keys = frozen_feature_keys(self.freeze_depth)
        if keys and all(k in batch for k in keys):
            cached = [batch[k] for k in keys]
            return self.forward_trainable(cached[-1], cached)
        return self.forward_features(batch[self.input_key])

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        return self.head(self.batch_features(batch), batch)

    def head_modules(self) -> nn.Module:
        """The module holding every head parameter (the one head here; subclasses may hold several)."""
        return self.head

    def stage_parameter_groups(self) -> list[tuple[str, list[nn.Parameter]]]:
        """Trainable parameters grouped as ("stage:<i>", params) per stage and ("head", params of
        :meth:`head_modules`)."""
        groups = []
        for i, stage in enumerate(self.backbone.stages):
            params = [p for p in stage.parameters() if p.requires_grad]
            if params:
                groups.append((f"stage:{i}", params))
        head = [p for p in self.head_modules().parameters() if p.requires_grad]
        if head:
            groups.append(("head", head))
        return groups
