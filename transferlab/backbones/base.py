"""The backbone contract.

A backbone is an ``nn.Module`` whose ``stages`` (an ``nn.ModuleList``) run one after another;
``forward(x)`` returns one feature map per stage and ``feature_info`` describes each of them.
Freeze depth is one backbone-independent index: depth 0 freezes nothing, depth k freezes
``stages[0:k]`` (the stem is stage 1) and depth ``len(stages)`` freezes the whole backbone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from torch import Tensor, nn


@dataclass(frozen=True)
class StageInfo:
    """Metadata of one stage's output.

    Attributes:
        name: Short stage name shown in messages ("stem", "conv2", ...).
        channels: Output channels.
        reduction: Total stride of the output relative to the input.
        receptive_field: Receptive field in input pixels, when known.
    """

    name: str
    channels: int
    reduction: int
    receptive_field: int | None = None


class FeatureInfo(Sequence[StageInfo]):
    """Per-stage metadata in stage order; heads are built from this, never from the backbone."""

    def __init__(self, stages: Sequence[StageInfo]) -> None:
        self._stages = tuple(stages)

    def __getitem__(self, index):  # type: ignore[override]
        return self._stages[index]

    def __len__(self) -> int:
        return len(self._stages)

    def __iter__(self) -> Iterator[StageInfo]:
        return iter(self._stages)

    def __repr__(self) -> str:
        parts = ", ".join(f"{s.name}({s.channels}ch, /{s.reduction})" for s in self._stages)
        return f"FeatureInfo[{parts}]"

    @property
    def channels(self) -> list[int]:
        return [s.channels for s in self._stages]

    @property
    def reductions(self) -> list[int]:
        return [s.reduction for s in self._stages]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self._stages]


class Backbone(nn.Module):
    """Base class: subclasses fill ``stages`` and ``feature_info``; forward runs the stages in order.

    Args:
        stages: The stages, stem first.
        feature_info: One ``StageInfo`` per stage.
        in_channels: Channels of the input the backbone was built for.
    """

    def __init__(
        self, stages: Sequence[nn.Module], feature_info: Sequence[StageInfo], in_channels: int
    ) -> None:
        super().__init__()
        if len(stages) != len(feature_info):
            raise ValueError(f"{len(stages)} stages but {len(feature_info)} feature_info entries")
        self.stages = nn.ModuleList(stages)
        self.feature_info = FeatureInfo(feature_info)
        self.in_channels = in_channels
        # Builds the architecture as published (classifier included), for `inspect`'s totals; None
        # when the backbone has no such reference. Not a submodule: it is never trained or saved.
        self.reference: Callable[[], nn.Module] | None = None
        # The input a pretrained version expects ({"mean", "std", "input_size"}, as timm's
        # pretrained_cfg); tasks follow it when the spec loads pretrained weights. None if unknown.
        self.data_config: dict | None = None

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def forward(self, x: Tensor) -> list[Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features

    def describe_depth(self, depth: int) -> str:
        """Human-readable description of what ``depth`` freezes."""
        if depth == 0:
            return "nothing frozen"
        return "frozen: " + ", ".join(self.feature_info.names[:depth])


def check_depth(depth: int, feature_info: FeatureInfo, backbone_name: str) -> None:
    """Raise ``ValueError`` if ``depth`` is not a freeze depth ``feature_info``'s backbone can honour."""
    n = len(feature_info)
    if not 0 <= depth <= n:
        names = ", ".join(feature_info.names)
        raise ValueError(
            f"depth {depth} is deeper than backbone '{backbone_name}' ({n} stages: {names})"
            if depth > n
            else f"depth {depth} is negative; depths run from 0 to {n}"
        )
