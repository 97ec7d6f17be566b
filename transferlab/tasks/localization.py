"""Localisation: one box per image (and optionally its class); the loss and metrics of a ``box`` target.

Boxes travel as normalised ``(cx, cy, w, h)``: centre and size as fractions of the image width and
height, so (0.5, 0.5, 1, 1) is the whole image. A head predicts ``outputs["box"]`` (float, N x 4, each
value in [0, 1]) and, when it also classifies, ``outputs["logits"]`` (N x classes); the batch gives
``batch["box"]`` (float, N x 4) and ``batch["label"]`` (int64, N).

The loss follows DETR (Carion et al. 2020): smooth L1 on the four numbers plus the generalised IoU
loss of Rezatofighi et al. 2019 (``torchvision.ops.generalized_box_iou_loss``), which still has a
gradient when the predicted and true boxes do not overlap; cross-entropy is added when the head
predicts the class. Metrics: ``iou`` (primary), the mean IoU of predicted and true box over the
split; ``acc50``, the share of images whose IoU is at least 0.5 (the PASCAL VOC criterion for a
correct localisation); ``accuracy`` of the class, only when the head predicts one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F
from torchmetrics import Metric

ACC50_THRESHOLD = 0.5


def cxcywh_to_xyxy(boxes: Tensor, *, clip: bool = False) -> Tensor:
    """Normalised (cx, cy, w, h) -> (x0, y0, x1, y1); ``clip`` clamps the corners to the image."""
    from torchvision.ops import box_convert

    corners = box_convert(boxes, in_fmt="cxcywh", out_fmt="xyxy")
    return corners.clamp(0.0, 1.0) if clip else corners


def paired_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of ``a[i]`` with ``b[i]`` (both N x 4 corners x0, y0, x1, y1) -> N; 0 where a union is empty.

    ``torchvision.ops.box_iou`` scores every pair (N x N); this is its diagonal in O(N).
    """
    width = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    height = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
    inter = width * height
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    union = area_a + area_b - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(union))


def box_iou_of(predicted: Tensor, target: Tensor) -> Tensor:
    """Per-sample IoU (N) of predicted and true normalised (cx, cy, w, h) boxes.

    The prediction is clipped to the image first, as detectors clip their boxes: the true box lies
    inside the image, so the part of a prediction outside it can only add to the union.
    """
    return paired_iou(cxcywh_to_xyxy(predicted.float(), clip=True), cxcywh_to_xyxy(target.float()))


class BoxIoU(Metric):
    """Mean IoU of predicted and true boxes over every sample seen, or, with ``threshold``, the share
    of samples whose IoU is at least ``threshold``.

    ``update(predicted, target)`` takes N x 4 normalised (cx, cy, w, h) boxes; states are sums, so
    batches of any size accumulate exactly and the metric syncs across processes like any torchmetric.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, threshold: float | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predicted: Tensor, target: Tensor) -> None:
        iou = box_iou_of(predicted, target)
        scores = iou if self.threshold is None else (iou >= self.threshold).float()
        self.total += scores.sum().double()
        self.count += scores.numel()

    def compute(self) -> Tensor:
        return (self.total / self.count.clamp(min=1)).float()


@dataclass(frozen=True)
class BoxObjective:
    """One box per image (optionally its class): smooth L1 + GIoU (+ cross-entropy); ``iou`` primary.

    Reads ``outputs["box"]`` and ``batch["box"]`` (N x 4 normalised cx, cy, w, h) and, when the head
    classifies, ``outputs["logits"]`` (N x ``num_classes``) and ``batch["label"]``. Loss: ``l1_weight``
    x smooth L1 (``beta`` in units of the image side, so errors above 2% of the side count linearly)
    + ``giou_weight`` x the GIoU loss on the corners + ``class_weight`` x cross-entropy. DETR's weights
    (5 and 2) balance the two box terms.

    Attributes:
        num_classes: Classes of the labels (a class-predicting head outputs this many logits).
        l1_weight: Weight of the smooth L1 term.
        giou_weight: Weight of the generalised IoU loss.
        class_weight: Weight of the cross-entropy, when the head predicts the class.
        beta: Smooth L1's switch from quadratic to linear, in normalised units.
    """

    num_classes: int
    l1_weight: float = 5.0
    giou_weight: float = 2.0
    class_weight: float = 1.0
    beta: float = 0.02
    primary_metric: str = "iou"
    higher_is_better: bool = True

    def loss(self, outputs: dict[str, Tensor], batch: dict[str, Any]) -> Tensor:
        from torchvision.ops import generalized_box_iou_loss

        predicted, target = outputs["box"].float(), batch["box"].float()
        if predicted.shape != target.shape or predicted.ndim != 2 or predicted.shape[1] != 4:
            raise ValueError(
                f"box of shape {tuple(predicted.shape)} does not fit target boxes of shape "
                f"{tuple(target.shape)}; a box head returns N x 4 normalised (cx, cy, w, h)"
            )
        loss = self.l1_weight * F.smooth_l1_loss(predicted, target, beta=self.beta)
        giou = generalized_box_iou_loss(cxcywh_to_xyxy(predicted), cxcywh_to_xyxy(target), reduction="mean")
        loss = loss + self.giou_weight * giou
        if "logits" in outputs:
            loss = loss + self.class_weight * F.cross_entropy(outputs["logits"].float(), batch["label"])
        return loss

    def metrics(self) -> dict[str, Any]:
        """``iou`` and ``acc50``; ``accuracy`` joins in ``update_metrics`` when the head classifies."""
        return {"iou": BoxIoU(), "acc50": BoxIoU(threshold=ACC50_THRESHOLD)}

    def update_metrics(
        self, metrics: dict[str, Any], outputs: dict[str, Tensor], batch: dict[str, Any]
    ) -> None:
        predicted = outputs["box"].detach()
        for name in ("iou", "acc50"):
            metrics[name].update(predicted, batch["box"])
        if "logits" in outputs:
            # Added on first sight, so a head without a class output reports no meaningless accuracy;
            # fit() and the contract checks compute every entry of the dict they passed in.
            if "accuracy" not in metrics:
                from torchmetrics.classification import MulticlassAccuracy

                accuracy = MulticlassAccuracy(num_classes=self.num_classes, average="micro")
                metrics["accuracy"] = accuracy.to(predicted.device)
            metrics["accuracy"].update(outputs["logits"].detach().float(), batch["label"])


def mean_box(boxes: Tensor) -> Tensor:
    """The mean (cx, cy, w, h) of N x 4 boxes: the trivial predictor's one answer."""
    return boxes.float().mean(dim=0)


def mean_box_baseline(train_boxes: Tensor, boxes: Tensor) -> dict[str, float]:
    """``iou`` and ``acc50`` on ``boxes`` of always predicting the mean box of ``train_boxes``.

    The trivial baseline a box head must beat (e.g. the training split's mean box on the test split).
    """
    guess = mean_box(train_boxes).expand(len(boxes), 4)
    scores = {"iou": BoxIoU(), "acc50": BoxIoU(threshold=ACC50_THRESHOLD)}
    for metric in scores.values():
        metric.update(guess, boxes)
    return {name: float(metric.compute()) for name, metric in scores.items()}
