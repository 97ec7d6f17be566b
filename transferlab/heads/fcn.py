"""``fcn``: FCN-32s, FCN-16s and FCN-8s of Long, Shelhamer and Darrell (2015), "Fully convolutional
networks for semantic segmentation", over any 2-D backbone's ``feature_info``.

A 1x1 convolution scores every class on the last stage; FCN-16s and FCN-8s add score layers on one or
two finer stages and fuse them coarse to fine (upsample the coarser scores 2x with a transposed
convolution, add the skip's scores); a last transposed convolution brings the scores to the input
size. Following the paper, score layers start at zero, every transposed convolution starts as bilinear
interpolation, the fusing ones then learn and the final one stays bilinear.

Also home of the helpers the dense-prediction heads share (:func:`pyramid`, :func:`input_size`,
:func:`resize_to`), so that ``unet`` reads the backbone the same way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from transferlab.backbones.base import FeatureInfo
from transferlab.heads.base import Head, require_target
from transferlab.registry import HEADS
from transferlab.tasks.base import TargetSpec

# Variant -> skips fused below the last stage. The names are the paper's output strides on a /32
# backbone (VGG-16); on a backbone whose last stage has another stride they keep meaning 0, 1 or 2 skips.
VARIANTS = {"32s": 0, "16s": 1, "8s": 2}


def pyramid(feature_info: FeatureInfo) -> list[int]:
    """Stage indices of the deepest stage at each distinct reduction, finest first.

    The deepest stage of a resolution has the richest features (LeNet-5's C3 rather than S2, a
    CIFAR ResNet's stage1 rather than its stem); the last stage is always the last entry.
    """
    deepest = {info.reduction: i for i, info in enumerate(feature_info)}
    return [deepest[r] for r in sorted(deepest)]


def input_size(batch: dict[str, Any], input_key: str, default: tuple[int, int]) -> tuple[int, int]:
    """Height and width of the batch's input (``batch[input_key]``), or ``default`` without one."""
    x = batch.get(input_key) if isinstance(batch, dict) else None
    return (int(x.shape[-2]), int(x.shape[-1])) if isinstance(x, Tensor) and x.ndim >= 3 else default


def resize_to(x: Tensor, size: tuple[int, int]) -> Tensor:
    """``x`` (N x C x h x w) bilinearly resized to ``size`` unless it has that size already.

    Backbones without padding (LeNet-5) or odd input sizes give maps that are not exactly
    ``input / reduction``; resizing makes every head work on them (the paper crops instead).
    """
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def bilinear_kernel(factor: int) -> Tensor:
    """The square kernel (side ``2 * factor - factor % 2``) of bilinear upsampling by ``factor``.

    As ``upsample_filt`` of the reference FCN code: a tent of half-width ``factor`` per axis.
    """
    size = 2 * factor - factor % 2
    centre = factor - 1 if size % 2 == 1 else factor - 0.5
    tent = 1.0 - (torch.arange(size, dtype=torch.float64) - centre).abs() / factor
    return (tent[:, None] * tent[None, :]).float()


def bilinear_upsampling(channels: int, factor: int, *, learnable: bool = True) -> nn.ConvTranspose2d:
    """A transposed convolution that upsamples ``channels`` maps exactly ``factor`` times, as bilinear.

    Output side = ``factor`` x input side; inside the map it equals ``F.interpolate(..., "bilinear",
    align_corners=False)``, at the border it fades to zero padding. A learnable one maps all channels
    to all (initialised channel-to-itself, as in the paper); a fixed one is depthwise and frozen.
    """
    size = 2 * factor - factor % 2
    conv = nn.ConvTranspose2d(
        channels,
        channels,
        size,
        stride=factor,
        padding=(size - factor) // 2,
        groups=1 if learnable else channels,
        bias=False,
    )
    with torch.no_grad():
        conv.weight.zero_()
        kernel = bilinear_kernel(factor)
        for c in range(channels):
            conv.weight[c, c if learnable else 0] = kernel
    conv.weight.requires_grad_(learnable)
    return conv


class FCNHead(Head):
    """Score the chosen stages (coarsest first), fuse them coarse to fine, upsample to the input.

    Args:
        stages: Stage indices to score, the last stage first, then finer ones.
        feature_info: The backbone's feature metadata.
        num_classes: Mask classes, background included.
        image_size: Output size when the batch has no input to measure.
        input_key: The batch field the backbone reads.
    """

    target_kinds = ("mask",)

    def __init__(
        self,
        stages: list[int],
        feature_info: FeatureInfo,
        num_classes: int,
        *,
        image_size: tuple[int, int],
        input_key: str = "image",
    ) -> None:
        super().__init__()
        self.stages = list(stages)
        self.image_size, self.input_key = image_size, input_key
        self.score = nn.ModuleList(nn.Conv2d(feature_info[i].channels, num_classes, 1) for i in stages)
        for conv in self.score:  # the paper's zero init: training starts from "no opinion"
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        reductions = [feature_info[i].reduction for i in stages]
        self.upsample = nn.ModuleList(
            bilinear_upsampling(num_classes, max(1, round(coarse / fine)))
            for coarse, fine in zip(reductions[:-1], reductions[1:], strict=True)
        )
        finest = reductions[-1]
        self.final = (
            bilinear_upsampling(num_classes, finest, learnable=False) if finest > 1 else nn.Identity()
        )

    def forward(self, features: list[Tensor], batch: dict[str, Any]) -> dict[str, Tensor]:
        scores = self.score[0](features[self.stages[0]])
        for score, upsample, stage in zip(self.score[1:], self.upsample, self.stages[1:], strict=True):
            skip = score(features[stage])
            scores = resize_to(upsample(scores), skip.shape[-2:]) + skip  # skip fusion by summation
        size = input_size(batch, self.input_key, self.image_size)
        return {"mask_logits": resize_to(self.final(scores), size)}


@HEADS.register("fcn")
def fcn(feature_info: FeatureInfo, target: TargetSpec, *, variant: str = "8s") -> Head:
    """FCN-32s/16s/8s (Long et al. 2015): 1x1 scores, bilinear-initialised transposed convs, skip sums.

    The skips are the deepest stages at the next one (16s) or two (8s) strides finer than the last
    stage: stride 16 and 8 on a /32 backbone (VGG, ResNet, as in the paper); on a backbone whose last
    stage is finer, the nearest finer strides it has (a /16 ``convnet`` fuses /8 and /4). Needs a mask
    target and a 2-D backbone with ``VARIANTS[variant] + 1`` distinct strides.
    """
    require_target("fcn", FCNHead.target_kinds, target.kind)
    if variant not in VARIANTS:
        raise ValueError(f"head 'fcn': variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    if not target.num_classes or target.num_classes < 2:
        raise ValueError(f"head 'fcn' needs at least 2 mask classes, the task has {target.num_classes}")
    levels = pyramid(feature_info)[::-1]  # coarsest first
    skips = VARIANTS[variant]
    if len(levels) <= skips:
        strides = ", ".join(f"{feature_info[i].name} /{feature_info[i].reduction}" for i in levels)
        fits = [v for v, n in VARIANTS.items() if n < len(levels)]
        raise ValueError(
            f"head 'fcn': variant '{variant}' fuses {skips} stages finer than the last, but the backbone "
            f"has {len(levels) - 1} finer stride(s) ({strides}); use variant {' or '.join(fits)}"
        )
    return FCNHead(
        levels[: skips + 1],
        feature_info,
        target.num_classes,
        image_size=target.image_size,
        input_key=target.input_key,
    )
