"""Build tasks, backbones, heads and models from registry names and option dicts."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from transferlab.backbones.base import Backbone, FeatureInfo
from transferlab.engine.model import TransferModel
from transferlab.registry import BACKBONES, HEADS, TASKS
from transferlab.tasks.base import TargetSpec, Task

TIMM_PREFIX = "timm/"


def check_options(
    kind: str,
    name: str,
    factory: Callable[..., Any],
    options: Mapping[str, Any],
    reserved: Sequence[str] = (),
) -> None:
    """Raise ``ValueError`` naming any option that ``factory`` does not accept."""
    params = list(inspect.signature(factory).parameters.values())
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    # Heads receive (feature_info, target) positionally; every other parameter is an option.
    named = params[2:] if kind == "head" else params
    keyword = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    allowed = [p.name for p in named if p.kind in keyword and p.name not in reserved]
    unknown = [k for k in options if k not in allowed]
    if unknown:
        raise ValueError(
            f"{kind} '{name}' has no option {', '.join(map(repr, unknown))}; "
            f"its options are: {', '.join(allowed) or '(none)'}"
        )


def backbone_factory(name: str) -> tuple[Callable[..., Backbone], dict[str, Any]]:
    """The factory for a backbone name and the options its name implies (``timm/NAME``)."""
    if name.startswith(TIMM_PREFIX):
        return BACKBONES.get("timm"), {"model_name": name[len(TIMM_PREFIX) :]}
    return BACKBONES.get(name), {}


def build_task(
    name: str, options: Mapping[str, Any] | None = None, *, classes: Sequence[int] | None = None
) -> Task:
    """Instantiate task ``name``; ``classes`` selects a class subset (an A or B split)."""
    factory = TASKS.get(name)
    options = dict(options or {})
    check_options("task", name, factory, options, reserved=("classes",))
    return factory(classes=list(classes) if classes is not None else None, **options)


def build_backbone(name: str, options: Mapping[str, Any] | None, target: TargetSpec) -> Backbone:
    """Instantiate backbone ``name`` for the task's input channels (unless the options set them).

    ``weights: PATH`` works for every backbone: a factory that takes ``weights`` itself (timm ones,
    which map the original layer names) gets it; for any other the file is loaded afterwards and
    must hold the backbone's own state dict or a transferlab checkpoint.
    """
    factory, implied = backbone_factory(name)
    options = dict(options or {})
    weights = None
    if "weights" in options and "weights" not in inspect.signature(factory).parameters:
        weights = options.pop("weights")
    check_options("backbone", name, factory, options, reserved=tuple(implied))
    kwargs = {"in_channels": target.in_channels, **implied, **options}
    backbone = factory(**kwargs)
    if not isinstance(backbone, Backbone):
        raise TypeError(f"backbone '{name}' returned {type(backbone).__name__}, not a transferlab Backbone")
    if weights:
        from transferlab.backbones.weights import load_backbone_weights

        load_backbone_weights(backbone, weights)
    return backbone


def uses_pretrained_weights(options: Mapping[str, Any]) -> bool:
    """Whether backbone options ask for pretrained weights (``pretrained: true`` or ``weights: PATH``)."""
    return bool(options.get("pretrained") or options.get("weights"))


def pretrained_task_options(
    task_name: str, task_options: Mapping[str, Any], target: TargetSpec, data_config: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Task options with a pretrained backbone's normalisation and input size filled in.

    Only options the spec leaves unset and the task accepts are filled: ``mean``/``std`` (averaged over
    channels for a grey task) and ``image_size`` (the pretrained input's width).
    """
    out = dict(task_options)
    if not data_config:
        return out
    params = inspect.signature(TASKS.get(task_name)).parameters
    mean, std = data_config.get("mean"), data_config.get("std")
    if "mean" in params and "std" in params and "mean" not in out and "std" not in out and mean and std:
        if len(mean) != target.in_channels:  # e.g. a 1-channel task on an RGB-pretrained model
            mean = [sum(mean) / len(mean)] * target.in_channels
            std = [sum(std) / len(std)] * target.in_channels
        out.update(mean=list(mean), std=list(std))
    size = data_config.get("input_size")
    if "image_size" in params and "image_size" not in out and size:
        out["image_size"] = int(size[-1])
    return out


def build_head(
    name: str, options: Mapping[str, Any] | None, feature_info: FeatureInfo, target: TargetSpec
) -> Any:
    """Instantiate head ``name`` from the backbone's feature metadata and the task's target."""
    factory = HEADS.get(name)
    options = dict(options or {})
    check_options("head", name, factory, options)
    return factory(feature_info, target, **options)


def build_model(
    backbone: tuple[str, Mapping[str, Any]],
    head: tuple[str, Mapping[str, Any]],
    task: Task,
    *,
    freeze_depth: int = 0,
    bn_policy: str = "frozen",
) -> TransferModel:
    """A ``TransferModel`` for ``task`` from (name, options) pairs of a backbone and a head."""
    bb = build_backbone(backbone[0], backbone[1], task.target)
    hd = build_head(head[0], head[1], bb.feature_info, task.target)
    return TransferModel(
        bb, hd, freeze_depth=freeze_depth, bn_policy=bn_policy, input_key=task.target.input_key
    )
