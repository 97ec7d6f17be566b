"""``bbox``: one box per image (and optionally its class) from the last stage, as in the lecture's
"classification + localisation": a fully connected layer on the feature map gives four numbers.

The last stage is average-pooled to a ``grid`` x ``grid`` map and flattened, so the layers after it
still know *where* in the image a feature fired; ``grid: 1`` is global average pooling, which keeps
only *what* fired (position survives only as far as zero padding leaks it into the channels).
A hidden ReLU layer follows; one linear layer gives the box, squashed by a sigmoid into [0, 1]
(normalised cx, cy, w, h), and another the class logits when asked for.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from transferlab.backbones.base import FeatureInfo
from transferlab.heads.base import Head, require_target
from transferlab.heads.classify import GlobalAvgPool
from transferlab.registry import HEADS
from transferlab.tasks.base import TargetSpec
from transferlab.tasks.splits import check_dropout, check_int

MAX_GRID = 8


class BoxHead(Head):
    """Pool the last stage to a grid, one hidden layer, then a box (and class logits).

    Args:
        in_channels: Channels of the backbone's last stage.
        grid: Side of the pooled map (1: global average pooling).
        hidden: Width of the hidden layer (0: none).
        num_classes: Class logits to predict besides the box (0: the box alone).
        dropout: Dropout before the output layers.
    """

    target_kinds = ("box",)

    def __init__(self, in_channels: int, *, grid: int, hidden: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.pool = GlobalAvgPool() if grid == 1 else nn.Sequential(nn.AdaptiveAvgPool2d(grid), nn.Flatten())
        width = in_channels * grid * grid
        layers: list[nn.Module] = []
        if hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
            width = hidden
        if dropout:
            layers.append(nn.Dropout(dropout))
        self.trunk = nn.Sequential(*layers)
        self.box = nn.Linear(width, 4)
        self.classes = nn.Linear(width, num_classes) if num_classes else None

    def forward(self, features: list[Tensor], batch: dict[str, Any]) -> dict[str, Tensor]:
        last = features[-1]
        if last.ndim != 4:
            raise ValueError(
                f"head 'bbox' needs 2-D feature maps (N x C x H x W), got shape {tuple(last.shape)}"
            )
        z = self.trunk(self.pool(last))
        out = {"box": torch.sigmoid(self.box(z))}
        if self.classes is not None:
            out["logits"] = self.classes(z)
        return out


@HEADS.register("bbox")
def bbox(
    feature_info: FeatureInfo,
    target: TargetSpec,
    *,
    grid: int = 2,
    hidden: int | None = 256,
    classify: bool = True,
    dropout: float = 0.0,
) -> Head:
    """A box (normalised cx, cy, w, h) and, if the task has 2+ classes, the class, from the last stage.

    ``grid``: side of the average-pooled map that is flattened (1..8; 1 is global average pooling);
    ``hidden``: width of the hidden ReLU layer (0 or null: none, as for ``classify``); ``classify``:
    also predict the class (needs a task with at least 2 classes; ignored with fewer); ``dropout``:
    before the output layers.
    """
    require_target("bbox", BoxHead.target_kinds, target.kind)
    owner = "head 'bbox'"
    grid = check_int(owner, "grid", grid, minimum=1, maximum=MAX_GRID)
    hidden = check_int(owner, "hidden", 0 if hidden is None else hidden, minimum=0)
    if not isinstance(classify, bool):
        raise ValueError(f"{owner}: classify must be true or false, got {classify!r}")
    dropout = check_dropout(owner, dropout)
    num_classes = target.num_classes if classify and (target.num_classes or 0) >= 2 else 0
    return BoxHead(
        feature_info[-1].channels, grid=grid, hidden=hidden, num_classes=num_classes, dropout=dropout
    )
