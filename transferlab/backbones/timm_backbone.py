"""Any timm model as a backbone, through ``timm.create_model(..., features_only=True)``.

timm's feature extractor runs its (flattened) child modules in order and returns the outputs of the
modules named in its ``feature_info``; we group those children into one stage per returned feature,
so stage k ends exactly where timm's k-th feature is taken. The named aliases (``resnet50``,
``vgg16``, ...) in ``timm_zoo`` are this same builder with friendlier stage names.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from transferlab.backbones.base import Backbone, StageInfo
from transferlab.registry import BACKBONES


@BACKBONES.register("timm")
def timm_backbone(
    *,
    model_name: str,
    in_channels: int = 3,
    pretrained: bool = False,
    weights: str | None = None,
    **kwargs: Any,
) -> Backbone:
    """Any timm model name, one stage per feature level (use `timm/NAME` as the backbone name)."""
    return build_timm_backbone(
        model_name, in_channels=in_channels, pretrained=pretrained, weights=weights, **kwargs
    )


def build_timm_backbone(
    model_name: str,
    *,
    in_channels: int = 3,
    pretrained: bool = False,
    weights: str | None = None,
    stage_names: Sequence[str] | None = None,
    **kwargs: Any,
) -> Backbone:
    """A ``Backbone`` over timm model ``model_name``, one stage per timm feature level.

    Args:
        model_name: A timm model name.
        in_channels: Input channels (timm's ``in_chans``; pretrained first convs are adapted by timm).
        pretrained: Load timm's pretrained weights from a cache already on this machine (never a
            download); the error says where it looked when they are not there.
        weights: A weights file of the original timm model (safetensors, or weights-only PyTorch).
        stage_names: Names for the stages; default timm's feature module names.
        **kwargs: Passed to ``timm.create_model`` (``None`` values mean "timm's default").

    The backbone's ``reference`` builds the same timm model with its original classifier.
    """
    import timm
    from timm.models._features import FeatureDictNet

    if not timm.is_model(model_name):
        import difflib

        close = difflib.get_close_matches(model_name, timm.list_models(), n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise ValueError(f"timm has no model '{model_name}'{hint}")
    from transferlab.backbones.weights import pretrained_file

    # timm treats None as "use the default"; a YAML null means the same here.
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    file = pretrained_file(model_name, weights, pretrained)
    # timm loads a local file named in the pretrained config (weights_only for PyTorch files) and maps
    # the original model's keys onto the feature extractor, adapting the first conv to in_channels.
    overlay = {"pretrained_cfg_overlay": {"file": str(file)}} if file is not None else {}
    model = timm.create_model(
        model_name, features_only=True, pretrained=file is not None, in_chans=in_channels, **kwargs, **overlay
    )
    if isinstance(model, FeatureDictNet):
        stages = _group(model.items(), set(model.return_layers))
    elif getattr(model, "feature_hooks", True) is None and hasattr(model, "_stage_out_idx"):
        stages = _group_block_features(model)
    else:
        raise ValueError(
            f"timm model '{model_name}' extracts features with hooks ({type(model).__name__}), "
            "so its stages cannot be split in order; choose a convolutional model"
        )
    info = model.feature_info
    if len(stages) != len(info):
        raise ValueError(
            f"timm model '{model_name}': found {len(stages)} stages for {len(info)} feature levels"
        )
    names = list(stage_names) if stage_names is not None else _timm_stage_names(info.module_name())
    if len(names) != len(stages):
        raise ValueError(f"timm model '{model_name}' has {len(stages)} stages, {len(names)} names given")
    infos = [
        StageInfo(name, int(ch), int(red))
        for name, ch, red in zip(names, info.channels(), info.reduction(), strict=True)
    ]
    backbone = Backbone(stages, infos, in_channels)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    backbone.data_config = {
        k: cfg[k] for k in ("mean", "std", "input_size") if cfg.get(k) is not None
    } or None
    # A partial, not a lambda: the backbone stays picklable.
    backbone.reference = functools.partial(
        timm.create_model, model_name, pretrained=False, in_chans=in_channels, **kwargs
    )
    return backbone


def _timm_stage_names(module_names: Iterable[str]) -> list[str]:
    return [str(name).replace(".", "_") for name in module_names]


def _group(modules: Iterable[tuple[Any, nn.Module]], cut_after: set[Any]) -> list[nn.Module]:
    """Group modules that run in sequence into stages ending at each name in ``cut_after``."""
    stages: list[nn.Module] = []
    current: list[nn.Module] = []
    for name, module in modules:
        current.append(module)
        if name in cut_after:
            stages.append(nn.Sequential(*current))
            current = []
    return stages


def _group_block_features(model: nn.Module) -> list[nn.Module]:
    """Stages of timm's EfficientNet/MobileNetV3 feature classes: a stem, then runs of ``blocks``.

    Their forward is ``conv_stem -> bn1 (-> act1) -> blocks[0] -> blocks[1] ...`` with a feature taken
    after the stem (index 0) and after block i when ``i + 1`` is in ``_stage_out_idx``.
    """
    stem = [model.conv_stem, model.bn1] + ([model.act1] if hasattr(model, "act1") else [])
    sequence = [(0, nn.Sequential(*stem))] + [(i + 1, block) for i, block in enumerate(model.blocks)]
    return _group(sequence, set(model._stage_out_idx))
