"""The backbone contract: stages and ``feature_info`` agree, features fit them, every depth freezes."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from transferlab.backbones.base import Backbone, StageInfo
from transferlab.engine.assembly import backbone_factory, check_options
from transferlab.engine.contract.checks import (
    BATCH,
    CheckResult,
    Checks,
    ContractViolation,
    accepts,
    isolated,
    signature,
)
from transferlab.engine.model import TransferModel

DEFAULT_INPUT = (3, 32, 32)
TRAIN_STEPS = 2


def check_backbone(
    name: str, *, input_shape: Sequence[int] = DEFAULT_INPUT, options: Mapping[str, Any] | None = None
) -> list[CheckResult]:
    """Build backbone ``name`` (or ``timm/NAME``) for a (C, H, W) input and check its contract.

    Checks the factory, the stages against ``feature_info``, the features' channels and sizes, that
    ``forward`` is the stages run in order, and, at every freeze depth, ``requires_grad``, bit-identical
    frozen parameters and buffers (``bn: frozen``) after SGD steps, and that trainable stages learn.
    """
    factory, implied = backbone_factory(name)
    if options and "in_channels" in options:
        raise ValueError("the input shape sets in_channels; do not pass it as an option")
    checks = Checks()
    with isolated():
        backbone = _build(checks, name, factory, {**implied, **(options or {})}, input_shape[0])
        _check_stages(checks, backbone)
        x = torch.randn(BATCH, *input_shape) * 2 + 0.5  # off-centre, so BatchNorm statistics move
        features = _check_forward(checks, backbone, x)
        _check_feature_shapes(checks, backbone, features, tuple(input_shape[1:]))
        last = features[-1]
        _check_freezing(checks, backbone, x, last.shape[1] if last.ndim > 1 else 1)
    return checks.results


def _build(
    checks: Checks, name: str, factory: Callable[..., Any], options: dict[str, Any], in_channels: int
) -> Backbone:
    with checks.check("factory accepts in_channels", required=True) as note:
        if not accepts(factory, "in_channels"):
            raise ContractViolation(
                f"{signature(factory)} has no 'in_channels' parameter; transferlab passes the task's "
                "input channels as the keyword `in_channels`"
            )
        note.text = signature(factory)
    with checks.check(f"factory builds with in_channels={in_channels}", required=True) as note:
        check_options("backbone", name, factory, options)
        backbone = factory(**{"in_channels": in_channels, **options})
        note.text = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "default options"
    with checks.check("returns a transferlab Backbone", required=True) as note:
        returned = f"{type(backbone).__module__}.{type(backbone).__qualname__}"
        if not isinstance(backbone, Backbone):
            raise ContractViolation(
                f"the factory returned {returned}; return a transferlab.backbones.Backbone "
                "(subclass it or use Backbone(stages, feature_info, in_channels))"
            )
        note.text = returned
    return backbone


def _check_stages(checks: Checks, backbone: Backbone) -> None:
    with checks.check("stages match feature_info", required=True) as note:
        stages, info = backbone.stages, backbone.feature_info
        if not isinstance(stages, nn.ModuleList):
            raise ContractViolation(f"`stages` is a {type(stages).__name__}, not an nn.ModuleList")
        bad = [repr(s) for s in info if not isinstance(s, StageInfo)]
        if bad:
            raise ContractViolation(f"feature_info holds {', '.join(bad)}; use one StageInfo per stage")
        if len(stages) == 0 or len(stages) != len(info):
            raise ContractViolation(
                f"{len(stages)} stages but {len(info)} feature_info entries ({', '.join(info.names)}); "
                "give each stage exactly one StageInfo, in stage order"
            )
        bad = [f"'{s.name}' ({s.channels} channels, reduction {s.reduction})" for s in info]
        bad = [b for b, s in zip(bad, info, strict=True) if s.channels < 1 or s.reduction < 1]
        if bad:
            raise ContractViolation(f"channels and reduction must be positive: {', '.join(bad)}")
        note.text = f"{len(stages)} stages: {', '.join(info.names)}"


def _check_forward(checks: Checks, backbone: Backbone, x: Tensor) -> list[Tensor]:
    backbone.eval()
    with checks.check("forward returns one feature map per stage", required=True) as note, torch.no_grad():
        features = backbone(x)
        if not isinstance(features, (list, tuple)) or not all(isinstance(f, Tensor) for f in features):
            raise ContractViolation(f"forward returned {type(features).__name__}, not a list of tensors")
        if len(features) != len(backbone.stages):
            raise ContractViolation(
                f"forward returned {len(features)} feature maps for {len(backbone.stages)} stages; "
                "return one per stage, in stage order"
            )
        note.text = ", ".join("x".join(map(str, f.shape[1:])) for f in features)
    # TransferModel runs the stages one by one (a frozen prefix, then the rest), never forward().
    with checks.check("forward is the stages run in order") as note, torch.no_grad():
        y, differ = x, []
        for i, (stage, feature) in enumerate(zip(backbone.stages, features, strict=True)):
            y = stage(y)
            if y.shape != feature.shape or not torch.allclose(y, feature, rtol=1e-4, atol=1e-5):
                differ.append(f"{i + 1} '{backbone.feature_info[i].name}'")
        if differ:
            raise ContractViolation(
                f"the output of stage {', '.join(differ)} differs from running `stages` in sequence; "
                "transferlab calls each stage on the previous stage's output, so keep all computation "
                "inside the stages"
            )
        note.text = "as TransferModel runs them"
    return list(features)


def _check_feature_shapes(
    checks: Checks, backbone: Backbone, features: list[Tensor], spatial: tuple[int, ...]
) -> None:
    pairs = list(enumerate(zip(features, backbone.feature_info, strict=True), start=1))
    checks.expect(
        "feature channels match feature_info",
        [
            f"stage {i} '{info.name}' gives {f.shape[1]} channels, feature_info says {info.channels}"
            for i, (f, info) in pairs
            if f.ndim < 2 or f.shape[1] != info.channels
        ],
        ", ".join(str(c) for c in backbone.feature_info.channels),
    )
    problems = []
    for i, (f, info) in pairs:
        size = tuple(f.shape[2:])
        # Padded layers give ceil(input / reduction); unpadded ones shrink by the receptive field.
        upper = tuple(math.ceil(s / info.reduction) for s in spatial)
        rf = info.receptive_field
        lower = tuple(1 if rf is None else max(1, (s - rf) // info.reduction + 1) for s in spatial)
        fits = len(size) == len(spatial) and all(
            lo <= d <= up for lo, d, up in zip(lower, size, upper, strict=True)
        )
        if not fits:
            low, high = "x".join(map(str, lower)), "x".join(map(str, upper))
            allowed = high if lower == upper else f"{low} to {high}" if rf else f"at most {high}"
            problems.append(
                f"stage {i} '{info.name}' gives {'x'.join(map(str, size))} from a "
                f"{'x'.join(map(str, spatial))} input; reduction {info.reduction} allows {allowed}"
            )
    checks.expect("feature sizes match reduction", problems, f"reductions {backbone.feature_info.reductions}")


class _ProbeHead(nn.Module):
    """Mean of the last feature map over its positions, then 2 logits: enough to train a backbone."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, 2)

    def forward(self, features: list[Tensor], batch: dict[str, Any]) -> dict[str, Tensor]:
        last = features[-1]
        return {"logits": self.fc(last.flatten(2).mean(-1) if last.ndim > 2 else last)}


@dataclass
class _DepthRun:
    """What training at one freeze depth did to the backbone."""

    grad_problems: list[str]
    frozen_problems: list[str]
    trainable_changed: bool
    trainable_has_params: bool


def _check_freezing(checks: Checks, backbone: Backbone, x: Tensor, channels: int) -> None:
    n = len(backbone.stages)
    initial = {k: v.clone() for k, v in backbone.state_dict().items()}
    runs: list[_DepthRun] = []
    with checks.check(f"a training step runs at every depth 0..{n}", required=True) as note:
        for depth in range(n + 1):
            backbone.load_state_dict(initial)
            runs.append(_train_at_depth(backbone, _ProbeHead(channels), x, depth))
        note.text = f"{TRAIN_STEPS} SGD steps at each depth"
    checks.expect(
        "every depth k freezes exactly stages[0:k]",
        [p for r in runs for p in r.grad_problems],
        f"requires_grad as expected at depths 0..{n}",
    )
    checks.expect(
        "frozen stages are bit-identical after training (bn: frozen)",
        [p for r in runs for p in r.frozen_problems],
        "parameters and buffers unchanged at every depth",
    )
    checks.expect(
        "trainable stages learn",
        [
            f"depth {d}: no parameter of stages {d + 1}..{n} changed after {TRAIN_STEPS} SGD steps; "
            "do they get gradients (no torch.no_grad or .detach() inside a stage)?"
            for d, r in enumerate(runs)
            if r.trainable_has_params and not r.trainable_changed
        ],
        "some trainable parameter changed at every depth that has one",
    )
    with checks.check(f"depth {n + 1} (deeper than the backbone) is refused") as note:
        try:
            TransferModel(backbone, _ProbeHead(channels), freeze_depth=n + 1)
        except ValueError as exc:
            note.text = str(exc)
        else:
            raise ContractViolation(f"freeze depth {n + 1} was accepted by a backbone of {n} stages")
    backbone.load_state_dict(initial)
    backbone.requires_grad_(True)


def _train_at_depth(backbone: Backbone, head: nn.Module, x: Tensor, depth: int) -> _DepthRun:
    model = TransferModel(backbone, head, freeze_depth=depth, bn_policy="frozen")
    grad_problems = [
        f"depth {depth}: stage {i + 1} '{backbone.feature_info[i].name}' parameter {pname} has "
        f"requires_grad={p.requires_grad} (is it shared with another stage?)"
        for i, stage in enumerate(backbone.stages)
        for pname, p in stage.named_parameters()
        if p.requires_grad != (i >= depth)
    ]
    outside = [k for k, _ in backbone.named_parameters() if not k.startswith("stages.")]
    if depth == len(backbone.stages) and outside:
        grad_problems.append(
            f"parameters outside `stages` are never frozen: {', '.join(outside[:4])}; put every layer "
            "in a stage"
        )
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    target = torch.arange(len(x)) % 2
    for _ in range(TRAIN_STEPS):
        loss = nn.functional.cross_entropy(model({"image": x})["logits"], target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = backbone.state_dict()
    frozen = tuple(f"stages.{i}." for i in range(depth))
    params = dict(backbone.named_parameters())
    frozen_problems = [
        f"depth {depth}: {'parameter' if k in params else 'buffer'} {k} changed"
        for k in before
        if k.startswith(frozen) and not torch.equal(before[k], after[k])
    ]
    frozen_problems += [
        f"depth {depth}: {type(m).__name__} stages.{i}.{mname} is in training mode after a step though "
        "its stage is frozen; a frozen stage must stay in eval mode (never call .train() inside a stage)"
        for i, stage in enumerate(model.frozen_stages)
        for mname, m in stage.named_modules()
        if m.training and any(True for _ in m.buffers(recurse=False))
    ]
    trainable = [k for k in params if k.startswith("stages.") and not k.startswith(frozen)]
    return _DepthRun(
        grad_problems,
        frozen_problems,
        trainable_changed=any(not torch.equal(before[k], after[k]) for k in trainable),
        trainable_has_params=bool(trainable),
    )
