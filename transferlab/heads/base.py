"""The head contract: built from ``FeatureInfo`` and ``TargetSpec``; ``forward(features, batch) -> dict``."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


class Head(nn.Module):
    """Base class of heads; ``target_kinds`` lists the task targets a head can predict."""

    target_kinds: tuple[str, ...] = ()

    def forward(self, features: list[Tensor], batch: dict[str, Any]) -> dict[str, Tensor]:  # pragma: no cover
        raise NotImplementedError


def require_target(head_name: str, kinds: tuple[str, ...], target_kind: str) -> None:
    """Raise ``ValueError`` when a head cannot predict a task's target kind."""
    if target_kind not in kinds:
        raise ValueError(
            f"head '{head_name}' predicts {' or '.join(kinds)} targets, but the task provides '{target_kind}'"
        )
