"""``unet``: a U-Net decoder (Ronneberger et al. 2015) over any 2-D backbone's stages.

The decoder starts at the last stage and, for each finer resolution the backbone has (the deepest
stage at each distinct reduction, see :func:`~transferlab.heads.fcn.pyramid`), upsamples to that
stage's size, concatenates it and applies two 3x3 conv-BN-ReLU layers: segmentation-models-pytorch's
``UnetDecoderBlock``. When the finest stage is coarser than the input, one more block without a skip
upsamples to the input size; a 3x3 convolution then scores the classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from transferlab.backbones.base import FeatureInfo
from transferlab.heads.base import Head, decoder_widths, require_target
from transferlab.heads.fcn import input_size, pyramid, resize_to
from transferlab.registry import HEADS
from transferlab.tasks.base import TargetSpec

ATTENTIONS = (None, "scse")


class UNetHead(Head):
    """Decoder blocks from the last stage up through the skips, then per-pixel class scores.

    Args:
        bottom: Index of the stage the decoder starts from (the last one).
        skips: Stage indices to concatenate, coarse to fine.
        feature_info: The backbone's feature metadata.
        widths: Output channels of each decoder block (``len(skips)`` or one more for the final block).
        num_classes: Mask classes, background included.
        attention: smp's attention in the blocks (None or "scse").
        image_size: Output size when the batch has no input to measure.
        input_key: The batch field the backbone reads.
    """

    target_kinds = ("mask",)

    def __init__(
        self,
        bottom: int,
        skips: list[int],
        feature_info: FeatureInfo,
        widths: list[int],
        num_classes: int,
        *,
        attention: str | None,
        image_size: tuple[int, int],
        input_key: str = "image",
    ) -> None:
        from segmentation_models_pytorch.base import SegmentationHead
        from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoderBlock

        super().__init__()
        self.bottom, self.skips = bottom, list(skips)
        self.image_size, self.input_key = image_size, input_key
        skip_channels = [feature_info[i].channels for i in skips] + [0] * (len(widths) - len(skips))
        in_channels = [feature_info[bottom].channels, *widths[:-1]]
        self.blocks = nn.ModuleList(
            UnetDecoderBlock(cin, cskip, cout, attention_type=attention)
            for cin, cskip, cout in zip(in_channels, skip_channels, widths, strict=True)
        )
        self.classify = SegmentationHead(widths[-1], num_classes, kernel_size=3)

    def forward(self, features: list[Tensor], batch: dict[str, Any]) -> dict[str, Tensor]:
        size = input_size(batch, self.input_key, self.image_size)
        x = features[self.bottom]
        for k, block in enumerate(self.blocks):
            skip = features[self.skips[k]] if k < len(self.skips) else None
            height, width = skip.shape[-2:] if skip is not None else size
            x = block(x, height, width, skip_connection=skip)
        return {"mask_logits": resize_to(self.classify(x), size)}


@HEADS.register("unet")
def unet(
    feature_info: FeatureInfo,
    target: TargetSpec,
    *,
    decoder_channels: Sequence[int] | None = None,
    attention: str | None = None,
) -> Head:
    """U-Net decoder with skips from every resolution of the backbone (smp's UnetDecoderBlock).

    Needs a mask target and a 2-D backbone; one block per stride finer than the last stage, plus one
    to the input size when the finest stage is strided. ``decoder_channels``: block widths coarse to
    fine (a shorter list repeats its last width; default 16 per unit of the block's output stride,
    16..256); ``attention``: None or "scse" (smp's spatial and channel squeeze-and-excitation).
    """
    require_target("unet", UNetHead.target_kinds, target.kind)
    if not target.num_classes or target.num_classes < 2:
        raise ValueError(f"head 'unet' needs at least 2 mask classes, the task has {target.num_classes}")
    if attention not in ATTENTIONS:
        raise ValueError(f"head 'unet': attention must be null or 'scse', got {attention!r}")
    levels = pyramid(feature_info)  # finest first; the last stage is the last level
    skips = levels[:-1][::-1]
    strides = [feature_info[i].reduction for i in skips]
    if feature_info[levels[0]].reduction > 1 or not skips:  # a last block to the input size
        strides.append(1)
    return UNetHead(
        levels[-1],
        skips,
        feature_info,
        decoder_widths("unet", "decoder_channels", decoder_channels, strides),
        target.num_classes,
        attention=attention,
        image_size=target.image_size,
        input_key=target.input_key,
    )
