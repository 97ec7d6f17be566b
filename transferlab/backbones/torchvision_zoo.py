"""AlexNet, GoogLeNet and ShuffleNetV2 from torchvision, split into stages from the models' children.

torchvision builds these for 3-channel input; for any other ``in_channels`` the first convolution
is replaced by one of the same shape over ``in_channels`` whose weights are the original ones adapted
by timm's ``adapt_input_conv`` (summed over RGB for 1 channel, tiled and rescaled for more), so
pretrained weights stay useful and random ones keep their scale. Each backbone's ``reference``
builds the torchvision model itself (ImageNet classifier, no pretrained weights).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from transferlab.backbones.base import Backbone, StageInfo
from transferlab.backbones.small import receptive_fields
from transferlab.registry import BACKBONES

# ShuffleNetV2 widths (the paper's channel multipliers) -> torchvision builders.
SHUFFLENET_V2_WIDTHS = {
    0.5: "shufflenet_v2_x0_5",
    1.0: "shufflenet_v2_x1_0",
    1.5: "shufflenet_v2_x1_5",
    2.0: "shufflenet_v2_x2_0",
}


def torchvision_model(name: str, in_channels: int = 3, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """torchvision model ``name`` with its classifier; ``pretrained`` loads torchvision's default weights."""
    from torchvision import models

    weights = _cached_weights(name) if pretrained else None
    net = models.get_model(name, weights=weights, **kwargs)
    if in_channels != 3:
        _adapt_first_conv(net, in_channels)
    return net


def _cached_weights(name: str) -> Any:
    """torchvision's default weights for ``name`` when its torch hub cache holds them: never a download."""
    from torchvision import models

    from transferlab.backbones.weights import WeightsError

    weights = models.get_model_weights(name).DEFAULT  # type: ignore[attr-defined]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not cached.is_file():
        raise WeightsError(
            f"pretrained weights for torchvision model '{name}' are not on this machine, and transferlab "
            f"never downloads. Looked for {cached}: put a copy of {weights.url} there, or set "
            "`pretrained: false`."
        )
    return weights


def _adapt_first_conv(net: nn.Module, in_channels: int) -> None:
    from timm.models import adapt_input_conv

    name, conv = next((n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d))
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        dilation=conv.dilation,  # type: ignore[arg-type]
        groups=conv.groups,
        bias=conv.bias is not None,
    )
    with torch.no_grad():
        new.weight.copy_(adapt_input_conv(in_channels, conv.weight))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)  # type: ignore[union-attr]
    parent, _, attr = name.rpartition(".")
    setattr(net.get_submodule(parent), attr, new)


def _backbone(
    stages: list[nn.Module], infos: list[StageInfo], in_channels: int, name: str, **kwargs: Any
) -> Backbone:
    backbone = Backbone(stages, infos, in_channels)
    backbone.reference = functools.partial(torchvision_model, name, in_channels, False, **kwargs)
    return backbone


@BACKBONES.register("alexnet")
def alexnet(*, in_channels: int = 3, pretrained: bool = False) -> Backbone:
    """AlexNet (Krizhevsky et al. 2012), torchvision: conv1..conv5, max pools ending conv1, conv2, conv5."""
    features = torchvision_model("alexnet", in_channels, pretrained).features
    # features: conv relu pool | conv relu pool | conv relu | conv relu | conv relu pool
    stages: list[nn.Module] = [features[0:3], features[3:6], features[6:8], features[8:10], features[10:13]]
    shape = [("conv1", 64, 8), ("conv2", 192, 16), ("conv3", 384, 16), ("conv4", 256, 16), ("conv5", 256, 32)]
    infos = [StageInfo(n, c, r, rf) for (n, c, r), rf in zip(shape, receptive_fields(stages), strict=True)]
    return _backbone(stages, infos, in_channels, "alexnet")


class GoogLeNetInputTransform(nn.Module):
    """torchvision GoogLeNet's ``transform_input``: ImageNet-normalised RGB to the (x - 0.5) / 0.5
    scale its pretrained weights expect (its forward does this; building from children skips it)."""

    def forward(self, x: Tensor) -> Tensor:
        mean = x.new_tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = x.new_tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        return x * (std / 0.5) + (mean - 0.5) / 0.5


@BACKBONES.register("googlenet")
def googlenet(*, in_channels: int = 3, pretrained: bool = False) -> Backbone:
    """GoogLeNet (Szegedy et al. 2015), torchvision, no aux heads: conv1, conv2, inception3, 4 and 5."""
    # Built without the auxiliary classifiers (training-time heads) and without transform_input,
    # which only its forward applies; with pretrained weights the stem applies it instead.
    options: dict[str, Any] = {"transform_input": False}
    if not pretrained:
        options |= {"aux_logits": False, "init_weights": True}
    net = torchvision_model("googlenet", in_channels, pretrained, **options)
    # The transform has no tensors, so state dicts are the same with and without it.
    transform = GoogLeNetInputTransform() if pretrained and in_channels == 3 else nn.Identity()
    stages: list[nn.Module] = [
        nn.Sequential(transform, net.conv1),
        nn.Sequential(net.maxpool1, net.conv2, net.conv3),
        nn.Sequential(net.maxpool2, net.inception3a, net.inception3b),
        nn.Sequential(net.maxpool3, *(getattr(net, f"inception4{c}") for c in "abcde")),
        nn.Sequential(net.maxpool4, net.inception5a, net.inception5b),
    ]
    shape = [("conv1", 64, 2), ("conv2", 192, 4), ("inception3", 480, 8), ("inception4", 832, 16)]
    infos = [StageInfo(*s) for s in [*shape, ("inception5", 1024, 32)]]
    reference = {"transform_input": False, "aux_logits": False, "init_weights": True}
    return _backbone(stages, infos, in_channels, "googlenet", **reference)


@BACKBONES.register("shufflenet_v2")
def shufflenet_v2(*, in_channels: int = 3, pretrained: bool = False, width: float = 1.0) -> Backbone:
    """ShuffleNetV2 (Ma et al. 2018), torchvision: conv1 (with max pool), stage2, stage3, stage4, conv5."""
    if width not in SHUFFLENET_V2_WIDTHS:
        allowed = ", ".join(str(w) for w in SHUFFLENET_V2_WIDTHS)
        raise ValueError(f"shufflenet_v2: width must be one of {allowed}, got {width!r}")
    name = SHUFFLENET_V2_WIDTHS[width]
    net = torchvision_model(name, in_channels, pretrained)
    stages: list[nn.Module] = [
        nn.Sequential(net.conv1, net.maxpool),
        net.stage2,
        net.stage3,
        net.stage4,
        net.conv5,
    ]
    channels = net._stage_out_channels  # the paper's Table 5 row for this width
    names_reductions = [("conv1", 4), ("stage2", 8), ("stage3", 16), ("stage4", 32), ("conv5", 32)]
    infos = [StageInfo(n, c, r) for (n, r), c in zip(names_reductions, channels, strict=True)]
    return _backbone(stages, infos, in_channels, name)
