"""Model complexity per backbone stage: parameters, MACs/FLOPs, activation memory, receptive field.

Conventions (the lecture's and the published tables'):

- MACs are multiply-accumulates of convolutions and matrix products only (``FlopCounterMode``, which
  counts nothing else: no bias, normalisation, activation, pooling or addition); 1 MAC = 2 FLOPs.
- Activation memory is the size in bytes of a stage's output tensor for ONE sample in float32.
- Parameters are counted once per tensor (shared tensors once); buffers (BatchNorm statistics) are not.
- Receptive fields are computed from the layers' kernel, stride, dilation and padding
  (``transferlab.engine.receptive_field``), per spatial axis, in input pixels, not bounded by the input.

Nothing here needs real arithmetic, so the backbone is first built and run on PyTorch's ``meta`` device
(shapes only: no memory, no compute; VGG-16 takes milliseconds). A backbone whose code needs real
values (``.item()``, ``.tolist()``) is rebuilt and run on the CPU instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from transferlab.backbones.base import Backbone
from transferlab.engine.receptive_field import GLOBAL, LOCAL, ReceptiveFieldTracker

DEFAULT_INPUT = (3, 224, 224)
FLOPS_PER_MAC = 2
HEAD_NAME = "head (as published)"
CONVENTIONS = {
    "macs": "multiply-accumulates of convolutions and matrix products (torch FlopCounterMode)",
    "flops": "2 FLOPs per MAC",
    "activation_bytes": "bytes of the output tensor for one sample (batch 1), float32",
    "params": "parameters (each tensor once; buffers such as BatchNorm statistics not counted)",
    "receptive_field": "input pixels per spatial axis (height, width), from kernel, stride and dilation",
}
T = TypeVar("T")


class InspectError(ValueError):
    """The backbone cannot be inspected as asked (bad input shape, options, or an input too small)."""


@dataclass(frozen=True)
class PartComplexity:
    """One row of the report: a stage of the backbone, or the published classifier head.

    Attributes:
        name: Stage name from ``feature_info`` (or ``"head (as published)"``).
        output_shape: Output shape of one sample, e.g. ``(256, 56, 56)``.
        channels: Output channels (``output_shape[0]``).
        stride: The stage's total stride (``feature_info`` reduction); None for the head.
        receptive_field: Receptive field per spatial axis in input pixels; None when the output
            depends on the whole input (``global_context`` and no local field) or cannot be followed.
        global_context: The output also mixes in globally pooled values (squeeze-and-excitation).
        params: Parameters of this part.
        macs: Multiply-accumulates for one sample.
        activation_bytes: Bytes of this part's output for one sample (float32).
    """

    name: str
    output_shape: tuple[int, ...]
    channels: int | None
    stride: int | None
    receptive_field: tuple[int, ...] | None
    global_context: bool
    params: int
    macs: int
    activation_bytes: int

    @property
    def flops(self) -> int:
        return FLOPS_PER_MAC * self.macs


@dataclass(frozen=True)
class Totals:
    """Totals over a model: parameters, MACs (and FLOPs) for one sample, activation bytes if summed."""

    params: int
    macs: int
    activation_bytes: int | None = None

    @property
    def flops(self) -> int:
        return FLOPS_PER_MAC * self.macs


@dataclass(frozen=True)
class ComplexityReport:
    """What ``inspect_backbone`` measured.

    Attributes:
        backbone: The backbone name.
        options: The options it was built with.
        input_shape: One sample's shape (C, H, W).
        stages: One row per stage, in order.
        total: The backbone's totals; ``activation_bytes`` sums every stage's output (all of them
            are alive at once: ``forward`` returns them all).
        head: The published classifier part (reference minus backbone), when the backbone has a
            ``reference`` and it runs at this input.
        published: Totals of the reference (the architecture as published), when measured.
        notes: Anything the reader should know (no reference, cross-check mismatches).
    """

    backbone: str
    options: dict[str, Any]
    input_shape: tuple[int, ...]
    stages: tuple[PartComplexity, ...]
    total: Totals
    head: PartComplexity | None = None
    published: Totals | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with raw numbers (FLOPs included, shapes and fields as lists)."""

        def part(p: PartComplexity) -> dict[str, Any]:
            row = asdict(p)
            row["output_shape"] = list(p.output_shape)
            row["receptive_field"] = None if p.receptive_field is None else list(p.receptive_field)
            row["flops"] = p.flops
            return row

        def totals(t: Totals | None) -> dict[str, Any] | None:
            return None if t is None else {**asdict(t), "flops": t.flops}

        return {
            "backbone": self.backbone,
            "options": self.options,
            "input_shape": list(self.input_shape),
            "conventions": CONVENTIONS,
            "stages": [part(s) for s in self.stages],
            "total": totals(self.total),
            "head_as_published": None if self.head is None else part(self.head),
            "total_as_published": totals(self.published),
            "notes": list(self.notes),
        }


def parse_input_shape(text: str | Sequence[int]) -> tuple[int, int, int]:
    """``"3x224x224"`` (or a sequence of three ints) as ``(C, H, W)``; anything else raises InspectError."""
    parts = text.lower().replace(" ", "").split("x") if isinstance(text, str) else list(text)
    try:
        shape = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise InspectError(f"expected CxHxW, e.g. 3x224x224, got {_show(text)!r}")
    return shape  # type: ignore[return-value]


def inspect_backbone(
    name: str, input_shape: str | Sequence[int] = DEFAULT_INPUT, options: Mapping[str, Any] | None = None
) -> ComplexityReport:
    """Per-stage and total complexity of backbone ``name`` built with ``options``, at batch 1.

    Args:
        name: A registered backbone name or ``timm/MODEL``.
        input_shape: One sample's shape, ``(C, H, W)`` or ``"CxHxW"``; C sets ``in_channels``
            unless ``options`` do.
        options: Keyword options of the backbone factory (never pretrained weights).

    Raises:
        UnknownPluginError: ``name`` is not registered (the message lists close matches).
        InspectError: Bad shape or options, or an input too small for the backbone.
    """
    shape = parse_input_shape(input_shape)
    options = dict(options or {})
    # Never any weights: they change no count, and loading them could need the network.
    build_options = {**options, "pretrained": False} if _accepts_pretrained(name) else options

    def build_and_measure() -> ComplexityReport:
        backbone = _build(name, build_options, shape)
        return measure_backbone(backbone, shape, name=name, options=options)

    report = _on_meta_else_cpu(build_and_measure)
    if options.get("pretrained"):
        note = "pretrained weights were not loaded: they change no count"
        report = dataclasses.replace(report, notes=(*report.notes, note))
    return report


def measure_backbone(
    backbone: Backbone,
    input_shape: Sequence[int],
    *,
    name: str = "backbone",
    options: Mapping[str, Any] | None = None,
) -> ComplexityReport:
    """Measure an already-built backbone (and its ``reference``) on one sample of ``input_shape``.

    Runs on whatever device the backbone's parameters are on; ``inspect_backbone`` chooses ``meta``.
    """
    shape = tuple(int(s) for s in input_shape)
    if backbone.in_channels != shape[0]:
        raise InspectError(
            f"backbone '{name}' was built for {backbone.in_channels} input channels but the input is "
            f"{_show(shape)}; give --input {backbone.in_channels}x{_show(shape[1:])} or drop in_channels"
        )
    backbone = backbone.eval()
    device = next((p.device for p in backbone.parameters()), None)
    stages, notes = _measure_stages(backbone, torch.zeros((1, *shape), device=device), name)
    if any(s.global_context and s.receptive_field is not None for s in stages):
        notes.append(
            "global_context (a receptive field shown as 'N*'): the stage also scales by globally pooled "
            "values (squeeze-and-excitation), so every output sees the whole input; N is the field of "
            "its convolution path"
        )
    total = Totals(
        params=_count_params(backbone),
        macs=sum(s.macs for s in stages),
        activation_bytes=sum(s.activation_bytes for s in stages),
    )
    head, published, ref_notes = _measure_reference(backbone.reference, shape, total)
    return ComplexityReport(
        name, dict(options or {}), shape, tuple(stages), total, head, published, tuple(notes + ref_notes)
    )


def _measure_stages(backbone: Backbone, x: torch.Tensor, name: str) -> tuple[list[PartComplexity], list[str]]:
    """Run the stages one by one on ``x`` (one sample), counting each and following receptive fields."""
    shape, n = tuple(x.shape[1:]), len(backbone.stages)
    tracker = ReceptiveFieldTracker(spatial_dims=x.dim() - 2)
    tracker.mark_input(x)
    stages, notes = [], []
    with torch.no_grad(), tracker:
        for index, (stage, info) in enumerate(zip(backbone.stages, backbone.feature_info, strict=True)):
            with FlopCounterMode(display=False) as counter:
                y = _run_stage(stage, x, name, shape, index, info.name, n)
            geometry = tracker.geometry(y)
            stages.append(
                PartComplexity(
                    name=info.name,
                    output_shape=tuple(y.shape[1:]),
                    channels=int(y.shape[1]),
                    stride=info.reduction,
                    receptive_field=None if geometry is None else geometry.receptive_field,
                    global_context=geometry is not None
                    and (geometry.global_context or geometry.kind == GLOBAL),
                    params=_count_params(stage),
                    macs=counter.get_total_flops() // FLOPS_PER_MAC,
                    activation_bytes=y.numel() * y.element_size(),
                )
            )
            notes += _cross_check(info, y, geometry)
            x = y
    return stages, notes


def count_model(model: nn.Module, input_shape: Sequence[int]) -> tuple[Totals, torch.Tensor]:
    """Parameters and MACs of any model on one sample (eval mode, no grad), and its (first) output."""
    model = model.eval()
    device = next((p.device for p in model.parameters()), None)
    x = torch.zeros((1, *input_shape), device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = model(x)
    output = next(t for t in _leaves(out) if isinstance(t, torch.Tensor))
    return Totals(_count_params(model), counter.get_total_flops() // FLOPS_PER_MAC), output


def _measure_reference(
    reference: Callable[[], nn.Module] | None, shape: tuple[int, ...], total: Totals
) -> tuple[PartComplexity | None, Totals | None, list[str]]:
    """The published model's totals and its classifier part (reference minus the stages)."""
    if reference is None:
        return None, None, ["no published reference for this backbone: totals cover its stages only"]
    try:
        published, output = _on_meta_else_cpu(lambda: count_model(reference(), shape))
    except (RuntimeError, ValueError) as exc:
        note = f"the published reference does not run on a {_show(shape)} input: {_first_line(exc)}"
        return None, None, [note]
    params, macs = published.params - total.params, published.macs - total.macs
    if params < 0 or macs < 0:
        note = "the published reference is smaller than these stages (did options change them?): no head row"
        return None, published, [note]
    head = PartComplexity(
        name=HEAD_NAME,
        output_shape=tuple(output.shape[1:]),
        channels=None,
        stride=None,
        receptive_field=None,
        global_context=False,
        params=params,
        macs=macs,
        activation_bytes=output.numel() * output.element_size(),
    )
    return head, published, []


def _run_stage(
    stage: nn.Module, x: torch.Tensor, name: str, shape: tuple[int, ...], index: int, stage_name: str, n: int
) -> torch.Tensor:
    try:
        y = stage(x)
    except (RuntimeError, ValueError) as exc:
        if _is_meta_limitation(exc):
            raise
        where = f"stage '{stage_name}' ({index + 1} of {n}) fails on its {_show(tuple(x.shape[1:]))} input"
        message = _first_line(exc)
        if any(s in message.lower() for s in ("too small", "greater than", "output size", "at most half")):
            raise InspectError(
                f"input {_show(shape)} is too small for {name}: {where} ({message}); try a larger --input"
            ) from exc
        raise InspectError(f"backbone '{name}' fails on input {_show(shape)}: {where}: {message}") from exc
    if not isinstance(y, torch.Tensor):
        raise InspectError(
            f"backbone '{name}': stage '{stage_name}' returned {type(y).__name__}, not a tensor"
        )
    return y


def _cross_check(info: Any, y: torch.Tensor, geometry: Any) -> list[str]:
    """Notes where the stage's declared ``feature_info`` disagrees with what was measured."""
    notes = []
    if info.channels != y.shape[1]:
        notes.append(
            f"stage '{info.name}': feature_info says {info.channels} channels, output has {y.shape[1]}"
        )
    if geometry is not None and geometry.kind == LOCAL:
        rf, jump = geometry.receptive_field, geometry.jump
        if info.receptive_field is not None and any(r != info.receptive_field for r in rf):
            notes.append(
                f"stage '{info.name}': feature_info says receptive field {info.receptive_field}, "
                f"computed {_show(rf)}"
            )
        if any(j != info.reduction for j in jump):
            notes.append(
                f"stage '{info.name}': feature_info says stride {info.reduction}, computed {_show(jump)}"
            )
    return notes


def _build(name: str, options: dict[str, Any], shape: tuple[int, ...]) -> Backbone:
    from transferlab.engine.assembly import build_backbone
    from transferlab.tasks.base import TargetSpec

    target = TargetSpec(kind="image", in_channels=shape[0], image_size=(shape[1], shape[2]))
    try:
        return build_backbone(name, options, target)
    except (ValueError, TypeError) as exc:
        if _is_meta_limitation(exc):
            raise
        message = str(exc)
        raise InspectError(message if f"'{name}'" in message else f"backbone '{name}': {message}") from exc


def _accepts_pretrained(name: str) -> bool:
    """Whether the factory takes ``pretrained`` (so inspect can force it off: never any download)."""
    import inspect

    from transferlab.engine.assembly import backbone_factory

    factory, _ = backbone_factory(name)
    params = inspect.signature(factory).parameters
    return "pretrained" in params


def _on_meta_else_cpu(fn: Callable[[], T]) -> T:
    """Run ``fn`` with tensors created on the meta device; again on the CPU if it needs real values."""
    try:
        with torch.device("meta"):
            return fn()
    except (RuntimeError, NotImplementedError, ValueError, TypeError) as exc:
        if not _is_meta_limitation(exc):
            raise
    with torch.device("cpu"):
        return fn()


def _is_meta_limitation(exc: BaseException) -> bool:
    return "meta" in str(exc).lower() and not isinstance(exc, InspectError)


def _count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _leaves(out: Any) -> list[Any]:
    from torch.utils._pytree import tree_flatten

    return tree_flatten(out)[0]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _show(value: Any) -> str:
    if isinstance(value, str):
        return value
    return "x".join(str(v) for v in value)
