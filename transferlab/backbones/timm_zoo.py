"""The lecture's ImageNet architectures from timm, as named backbones.

Each name is an alias over the generic ``timm/NAME`` wrapper (``build_timm_backbone``): the stages
are timm's feature levels (the stem, then the last block at each resolution), renamed after the
family's own blocks. Every alias accepts ``in_channels``, ``pretrained`` and any other
``timm.create_model`` keyword (``drop_rate``, ``drop_path_rate``, ``output_stride``, ...).

VGG keeps timm's six levels: conv1..conv5 (each ending before its max pool) and pool5, the final
max pool at stride 32. pool5 has no parameters, so depths 5 and 6 freeze the same weights; it is
kept so the last feature is the map VGG's classifier reads, and ``vgg16`` matches ``timm/vgg16``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transferlab.backbones.base import Backbone
from transferlab.backbones.timm_backbone import build_timm_backbone
from transferlab.registry import BACKBONES


@dataclass(frozen=True)
class TimmAlias:
    """A named backbone over a timm model.

    Attributes:
        model_name: The timm model name.
        title: The architecture and its paper, for the description.
        stage_names: One name per timm feature level.
    """

    model_name: str
    title: str
    stage_names: tuple[str, ...]


VGG = ("conv1", "conv2", "conv3", "conv4", "conv5", "pool5")
RESNET = ("stem", "layer1", "layer2", "layer3", "layer4")
# EfficientNet-style nets: the stem conv plus the first block row at /2, then timm's block rows,
# several rows sharing a stage where they share a resolution.
MOBILE = ("stem", "blocks1", "blocks2", "blocks3_4", "blocks5_6")
INCEPTION = ("stem", "conv3b_4a", "mixed5", "mixed6", "mixed7")

TIMM_ALIASES: dict[str, TimmAlias] = {
    "vgg11": TimmAlias("vgg11", "VGG-11 (Simonyan & Zisserman 2015)", VGG),
    "vgg16": TimmAlias("vgg16", "VGG-16 (Simonyan & Zisserman 2015)", VGG),
    "vgg19": TimmAlias("vgg19", "VGG-19 (Simonyan & Zisserman 2015)", VGG),
    "resnet18": TimmAlias("resnet18", "ResNet-18 (He et al. 2016)", RESNET),
    "resnet34": TimmAlias("resnet34", "ResNet-34 (He et al. 2016)", RESNET),
    "resnet50": TimmAlias("resnet50", "ResNet-50 (He et al. 2016)", RESNET),
    "resnet101": TimmAlias("resnet101", "ResNet-101 (He et al. 2016)", RESNET),
    "resnet152": TimmAlias("resnet152", "ResNet-152 (He et al. 2016)", RESNET),
    "resnext50": TimmAlias("resnext50_32x4d", "ResNeXt-50 32x4d (Xie et al. 2017)", RESNET),
    "seresnet50": TimmAlias("seresnet50", "SE-ResNet-50 (Hu et al. 2018)", RESNET),
    "mobilenetv2": TimmAlias("mobilenetv2_100", "MobileNetV2 1.0 (Sandler et al. 2018)", MOBILE),
    "inception_v3": TimmAlias("inception_v3", "Inception-v3 (Szegedy et al. 2016)", INCEPTION),
    "efficientnet_b0": TimmAlias("efficientnet_b0", "EfficientNet-B0 (Tan & Le 2019)", MOBILE),
}


def _alias_factory(name: str, alias: TimmAlias) -> Callable[..., Backbone]:
    def factory(
        *, in_channels: int = 3, pretrained: bool = False, weights: str | None = None, **kwargs: Any
    ) -> Backbone:
        return build_timm_backbone(
            alias.model_name,
            in_channels=in_channels,
            pretrained=pretrained,
            weights=weights,
            stage_names=alias.stage_names,
            **kwargs,
        )

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"{alias.title}, timm '{alias.model_name}': stages {', '.join(alias.stage_names)}."
    return factory


for _name, _alias in TIMM_ALIASES.items():
    BACKBONES.register(_name)(_alias_factory(_name, _alias))
