"""Losses and metrics per target kind, shared by every task that provides that kind of target.

A task that is not a plain classification holds an objective and forwards ``loss``, ``metrics`` and
``update_metrics`` to it; the objective's ``primary_metric`` and ``higher_is_better`` become the
task's. Like a task, an objective sees the head's output dict and the batch dict, never a model.
Label targets keep :class:`~transferlab.tasks.base.ClassificationTask`'s cross-entropy and accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor


class Objective(Protocol):
    """Loss and metrics of one target kind.

    Optional members a task looks for: ``prepare(dataset)`` adds fields derived from the targets to
    an ``InMemoryDataset`` (e.g. caption token ids); ``vocabulary`` and ``max_length`` go into the
    task's ``TargetSpec`` (caption targets).
    """

    primary_metric: str
    higher_is_better: bool

    def loss(self, outputs: dict[str, Tensor], batch: dict[str, Any]) -> Tensor: ...

    def metrics(self) -> dict[str, Any]: ...

    def update_metrics(
        self, metrics: dict[str, Any], outputs: dict[str, Tensor], batch: dict[str, Any]
    ) -> None: ...


def target_objective(
    kind: str,
    num_classes: int,
    normalization: tuple[Sequence[float], Sequence[float]],
    captions: Sequence[str] | None = None,
) -> Objective | None:
    """The objective of a target kind; ``None`` for "label" (the task's own cross-entropy).

    Args:
        kind: "label", "mask", "box", "caption" or "image".
        num_classes: Classes of the labels (box targets may predict the class too) or of the mask.
        normalization: (mean, std) of the input pixels, to score reconstructions in [0, 1] pixels.
        captions: Caption targets of a user data set, to build the vocabulary from (the shapes
            grammar's fixed vocabulary when ``None``).
    """
    if kind == "label":
        return None
    if kind == "mask":
        return SegmentationObjective(num_classes=num_classes)
    if kind == "box":
        from transferlab.tasks.localization import BoxObjective

        return BoxObjective(num_classes=num_classes)
    if kind == "caption":
        from transferlab.tasks.captioning import CaptionObjective

        return CaptionObjective.for_captions(captions)
    if kind == "image":
        from transferlab.tasks.reconstruction import ReconstructionObjective

        return ReconstructionObjective(mean=tuple(normalization[0]), std=tuple(normalization[1]))
    raise ValueError(f"no objective for target kind {kind!r}; allowed: label, mask, box, caption, image")


@dataclass(frozen=True)
class SegmentationObjective:
    """Per-pixel classes: cross-entropy over pixels; mean IoU (primary) and pixel accuracy.

    Reads ``outputs["mask_logits"]`` (float, N x C x H x W) and ``batch["mask"]`` (int64, N x H x W,
    values 0..C-1, 0 being the background). ``miou`` is the mean over classes of the intersection over
    union accumulated over the whole split (the "mean IU" of Long et al. 2015), each class counted once
    it occurs in the predictions or the targets; ``pixel_accuracy`` is the share of pixels right.

    Attributes:
        num_classes: Classes of the mask, background included.
    """

    num_classes: int
    primary_metric: str = "miou"
    higher_is_better: bool = True

    def loss(self, outputs: dict[str, Tensor], batch: dict[str, Any]) -> Tensor:
        logits, mask = outputs["mask_logits"], batch["mask"]
        if logits.shape[-2:] != mask.shape[-2:] or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"mask_logits of shape {tuple(logits.shape)} do not fit masks of shape "
                f"{tuple(mask.shape)} with {self.num_classes} classes; a segmentation head returns "
                "N x C x H x W at the input size"
            )
        return torch.nn.functional.cross_entropy(logits.float(), mask)

    def metrics(self) -> dict[str, Any]:
        from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

        return {
            "miou": MulticlassJaccardIndex(num_classes=self.num_classes, average="macro"),
            "pixel_accuracy": MulticlassAccuracy(num_classes=self.num_classes, average="micro"),
        }

    def update_metrics(
        self, metrics: dict[str, Any], outputs: dict[str, Tensor], batch: dict[str, Any]
    ) -> None:
        predicted = outputs["mask_logits"].detach().argmax(1)  # once, for both metrics
        for name in ("miou", "pixel_accuracy"):
            metrics[name].update(predicted, batch["mask"])
