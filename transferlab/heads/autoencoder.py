"""``autoencoder``: a deconvolution decoder from one stage's feature map back to the input image.

The decoder doubles the map's resolution with stride-2 transposed convolutions (4 x 4 kernels, each
followed by BatchNorm and ReLU, as in the DCGAN generator of Radford et al. 2016), as many times as
the stage's reduction asks, then a 3 x 3 convolution gives one logit per pixel and input channel.
A reduction that is not a power of two, or a backbone without padding whose maps are smaller than
``input / reduction`` (LeNet-5), leaves the decoded map off the input size; a last bilinear resize
of the logits fixes that, so the head gives the exact input size on every 2-D backbone.

Outputs: ``reconstruction_logits`` (N x C x H x W) and ``reconstruction``, their sigmoid: pixels in
[0, 1]. The loss and metrics are :class:`~transferlab.tasks.reconstruction.ReconstructionObjective`'s.
The shared decoder pieces here also serve the ``vae`` head (:mod:`transferlab.heads.vae`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from transferlab.backbones.base import FeatureInfo
from transferlab.heads.base import Head, decoder_widths, require_target
from transferlab.heads.fcn import input_size, resize_to
from transferlab.registry import HEADS
from transferlab.tasks.base import TargetSpec

IMAGE_TARGETS = ("image",)


def nominal_map_side(image_size: tuple[int, int], reduction: int) -> int:
    """Side of a stage's map at ``reduction`` for a padded backbone: ceil(input side / reduction)."""
    return max(1, math.ceil(max(image_size) / max(reduction, 1)))


def doublings(image_size: tuple[int, int], map_side: int) -> int:
    """Stride-2 upsamplings that bring a ``map_side`` map to at least the input size."""
    return max(0, math.ceil(math.log2(max(image_size) / map_side) - 1e-9))


def pick_stage(head: str, feature_info: FeatureInfo, from_stage: int | None) -> int:
    """The index of the stage to decode from (the last by default; negative indices count back)."""
    n = len(feature_info)
    if from_stage is None:
        return n - 1
    if isinstance(from_stage, bool) or not isinstance(from_stage, int) or not -n <= from_stage < n:
        stages = ", ".join(f"{i} {s.name}" for i, s in enumerate(feature_info))
        raise ValueError(
            f"head '{head}': from_stage must be a stage index 0..{n - 1} (or -{n}..-1), got "
            f"{from_stage!r}; the backbone's stages: {stages}"
        )
    return from_stage % n


def doubling_strides(blocks: int) -> list[int]:
    """Output stride of each of ``blocks`` stride-2 upsampling blocks, coarse to fine: ..., 4, 2, 1."""
    return [2 ** (blocks - 1 - i) for i in range(blocks)]


class DeconvDecoder(nn.Module):
    """Stride-2 ``ConvTranspose2d`` + BatchNorm + ReLU blocks, then a 3 x 3 conv to ``out_channels`` logits.

    Args:
        in_channels: Channels of the map decoded.
        widths: Output channels of each block, coarse to fine (empty: no upsampling).
        out_channels: Channels of the image.
    """

    def __init__(self, in_channels: int, widths: Sequence[int], out_channels: int) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        for cin, cout in zip([in_channels, *widths[:-1]], widths, strict=True):
            blocks += [
                nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=False),  # exactly 2x
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]
        self.blocks = nn.Sequential(*blocks)
        self.to_image = nn.Conv2d(widths[-1] if widths else in_channels, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.to_image(self.blocks(x))


def image_outputs(logits: Tensor) -> dict[str, Tensor]:
    """The output fields of an image head: logits and their sigmoid, the [0, 1] reconstruction."""
    return {"reconstruction_logits": logits, "reconstruction": torch.sigmoid(logits)}


class AutoencoderHead(Head):
    """Decode one stage's map back to the input image.

    Args:
        stage: Index of the stage decoded.
        in_channels: That stage's channels.
        widths: Decoder block widths, coarse to fine.
        out_channels: Image channels.
        image_size: Output size when the batch has no input to measure.
        input_key: The batch field the backbone reads.
    """

    target_kinds = IMAGE_TARGETS

    def __init__(
        self,
        stage: int,
        in_channels: int,
        widths: Sequence[int],
        out_channels: int,
        *,
        image_size: tuple[int, int],
        input_key: str = "image",
    ) -> None:
        super().__init__()
        self.stage, self.image_size, self.input_key = stage, image_size, input_key
        self.decoder = DeconvDecoder(in_channels, widths, out_channels)

    def forward(self, features: list[Tensor], batch: dict[str, Any]) -> dict[str, Tensor]:
        size = input_size(batch, self.input_key, self.image_size)
        return image_outputs(resize_to(self.decoder(features[self.stage]), size))


@HEADS.register("autoencoder")
def autoencoder(
    feature_info: FeatureInfo,
    target: TargetSpec,
    *,
    from_stage: int | None = None,
    channels: Sequence[int] | None = None,
) -> Head:
    """Deconvolution decoder (stride-2 transposed conv + BN + ReLU blocks) from one stage to the image.

    Needs an image target and a 2-D backbone: the chosen stage's channels and reduction (one block per
    doubling back to the input size). ``from_stage``: the stage index to decode (default the last;
    a shallower one reconstructs more easily); ``channels``: block widths coarse to fine (a shorter
    list repeats its last width; default 16 per unit of the block's output stride, 16..256).
    """
    require_target("autoencoder", AutoencoderHead.target_kinds, target.kind)
    stage = pick_stage("autoencoder", feature_info, from_stage)
    blocks = doublings(target.image_size, nominal_map_side(target.image_size, feature_info[stage].reduction))
    return AutoencoderHead(
        stage,
        feature_info[stage].channels,
        decoder_widths("autoencoder", "channels", channels, doubling_strides(blocks)),
        target.in_channels,
        image_size=target.image_size,
        input_key=target.input_key,
    )
