"""Receptive fields computed from the layers' kernel, stride, dilation and padding, tensor by tensor.

``ReceptiveFieldTracker`` is a ``TorchDispatchMode``: it sees every ATen operation a forward pass
runs and gives each tensor that derives from the input a ``Geometry``: per spatial axis, the receptive
field (input pixels one output pixel depends on), the jump (input pixels between neighbouring outputs,
i.e. the stride so far) and the input coordinate of output 0's receptive-field centre. Windowed
operations (convolution, max/avg pooling, divisible adaptive pooling), padding and strided slicing
update the geometry with the usual recurrence (Dumoulin & Visin 2016; Araujo et al., Distill 2019):

    k_eff = dilation * (kernel - 1) + 1
    rf'   = rf + (k_eff - 1) * jump
    start' = start + ((k_eff - 1) / 2 - padding) * jump
    jump' = jump * stride

Any other operation whose inputs have the output's spatial size (activations, normalisation, residual
sums, concatenation of inception branches, channel shuffles) takes the union of its inputs' receptive
fields, so a block's receptive field is that of its widest branch. A spatial reduction to 1 x 1 (global
pooling) makes a tensor *global*; a global tensor broadcast back over space (squeeze-and-excitation)
marks the result as having *global context* while its local receptive field stays that of the convolution
path. Anything else (upsampling, flattening, permuting spatial axes) makes the geometry unknown.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakTensorKeyDictionary

LOCAL, GLOBAL, UNKNOWN = "local", "global", "unknown"


@dataclass(frozen=True)
class Axis:
    """One spatial axis: receptive field and jump in input pixels, centre of output 0's field."""

    rf: float
    jump: float
    start: float

    @property
    def low(self) -> float:
        return self.start - (self.rf - 1) / 2

    @property
    def high(self) -> float:
        return self.start + (self.rf - 1) / 2


@dataclass(frozen=True)
class Geometry:
    """How a tensor's pixels relate to the input's.

    Attributes:
        kind: "local" (``axes`` hold the receptive field), "global" (each value depends on the whole
            input, e.g. after global pooling) or "unknown" (an operation the tracker cannot follow).
        axes: One ``Axis`` per spatial dimension (height, width), for local geometries.
        global_context: A local tensor that also mixes in a global one (squeeze-and-excitation).
    """

    kind: str
    axes: tuple[Axis, ...] = ()
    global_context: bool = False

    @property
    def receptive_field(self) -> tuple[int, ...] | None:
        """Receptive field per spatial axis in input pixels; None unless local."""
        return tuple(round(a.rf) for a in self.axes) if self.kind == LOCAL else None

    @property
    def jump(self) -> tuple[int, ...] | None:
        """Total stride per spatial axis; None unless local."""
        return tuple(round(a.jump) for a in self.axes) if self.kind == LOCAL else None


def input_geometry(spatial_dims: int) -> Geometry:
    """The geometry of the input itself: every pixel sees only itself."""
    return Geometry(LOCAL, tuple(Axis(1.0, 1.0, 0.0) for _ in range(spatial_dims)))


class ReceptiveFieldTracker(TorchDispatchMode):
    """Follows ``Geometry`` through every operation run while the mode is active.

    Args:
        spatial_dims: Trailing dimensions that are spatial (2 for N x C x H x W images).

    Example::

        tracker = ReceptiveFieldTracker(2)
        tracker.mark_input(x)
        with tracker:
            y = model(x)
        tracker.geometry(y).receptive_field
    """

    def __init__(self, spatial_dims: int = 2) -> None:
        super().__init__()
        self.nd = spatial_dims
        self._geometry: WeakTensorKeyDictionary = WeakTensorKeyDictionary()

    def mark_input(self, tensor: torch.Tensor) -> None:
        self._geometry[tensor] = input_geometry(self.nd)

    def geometry(self, tensor: torch.Tensor) -> Geometry | None:
        """The tensor's geometry, or None if it does not derive from a marked input."""
        return self._geometry.get(tensor)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [(t, g) for t in _tensors((args, kwargs)) if (g := self._geometry.get(t)) is not None]
        if inputs:
            named = _named_arguments(func, args, kwargs)
            for t in _tensors(out):
                if t.dim() >= self.nd:
                    self._geometry[t] = self._propagate(func, named, inputs, t)
        return out

    def _propagate(
        self, func: Any, named: dict[str, Any], inputs: list[tuple[torch.Tensor, Geometry]], out: torch.Tensor
    ) -> Geometry:
        first = named.get("input", named.get("self"))
        source = self._geometry.get(first) if isinstance(first, torch.Tensor) else None
        if source is not None and source.kind == LOCAL:
            windowed = self._windowed(func, named, source, first, out)
            if windowed is not None:
                return windowed
        return self._merge(inputs, out)

    def _windowed(
        self, func: Any, named: dict[str, Any], source: Geometry, first: torch.Tensor, out: torch.Tensor
    ) -> Geometry | None:
        """The geometry after a sliding-window or padding op on ``first``, or None for other ops."""
        nd = self.nd
        if "stride" in named and "padding" in named and ("kernel_size" in named or "weight" in named):
            if named.get("transposed"):
                return Geometry(UNKNOWN)
            kernel = named["kernel_size"] if "kernel_size" in named else named["weight"].shape[2:]
            kernel = _per_axis(kernel, nd, 1)
            stride = _per_axis(named["stride"], nd, None)
            stride = [k if s is None else s for s, k in zip(stride, kernel, strict=True)]  # [] = kernel
            return _window(
                source,
                kernel,
                stride,
                _per_axis(named["padding"], nd, 0),
                _per_axis(named.get("dilation"), nd, 1),
            )
        if {"dim", "start", "end", "step"} <= named.keys():  # x[:, :, ::2]: a strided 1 x 1 window
            return self._slice(named, source, first)
        if "adaptive" in func.name() and "output_size" in named:
            return self._adaptive(source, first, out)
        if "pad" in named or ("padding" in named and "stride" not in named):
            pad = list(named.get("pad", named.get("padding")))
            # F.pad order: (last-dim left, last-dim right, previous-dim left, ...).
            left = [0] * nd
            for i in range(min(len(pad) // 2, nd)):
                left[nd - 1 - i] = pad[2 * i]
            axes = tuple(
                replace(a, start=a.start - p * a.jump) for a, p in zip(source.axes, left, strict=True)
            )
            return replace(source, axes=axes)
        return None

    def _slice(self, named: dict[str, Any], source: Geometry, first: torch.Tensor) -> Geometry | None:
        """Slicing a spatial axis (option-A shortcuts subsample with ``x[..., ::2, ::2]``)."""
        axis = named["dim"] % first.dim() - (first.dim() - self.nd)
        if axis < 0:
            return None  # a channel or batch slice: the merge rule keeps the geometry
        size = first.shape[named["dim"]]
        begin = named["start"] or 0
        begin = min(max(begin + size if begin < 0 else begin, 0), size)
        axes = list(source.axes)
        a = axes[axis]
        axes[axis] = Axis(a.rf, a.jump * named["step"], a.start + begin * a.jump)
        return replace(source, axes=tuple(axes))

    def _adaptive(self, source: Geometry, first: torch.Tensor, out: torch.Tensor) -> Geometry | None:
        """Adaptive pooling: global to 1 x 1, a plain window when the sizes divide, else unknown."""
        size_in, size_out = _spatial(first, self.nd), _spatial(out, self.nd)
        if all(s == 1 for s in size_out):
            return None  # the merge rule turns a reduction to 1 x 1 into a global tensor
        if all(i % o == 0 for i, o in zip(size_in, size_out, strict=True)):
            kernel = [i // o for i, o in zip(size_in, size_out, strict=True)]
            return _window(source, kernel, kernel, [0] * self.nd, [1] * self.nd)
        return Geometry(UNKNOWN)

    def _merge(self, inputs: list[tuple[torch.Tensor, Geometry]], out: torch.Tensor) -> Geometry:
        """Element-wise ops, concatenation, reshapes: the union of the inputs' receptive fields."""
        size_out = _spatial(out, self.nd)
        local: list[Geometry] = []
        global_ = unknown = False
        for t, g in inputs:
            size_in = _spatial(t, self.nd)
            broadcast = all(s == 1 for s in size_in) and not all(s == 1 for s in size_out)
            if g.kind == GLOBAL or broadcast:
                global_ = True
            elif g.kind == UNKNOWN:
                unknown = True
            elif size_in == size_out:
                local.append(g)
            elif all(s == 1 for s in size_out):  # a spatial reduction (global pooling, mean)
                global_ = True
            else:
                unknown = True
        if unknown:
            return Geometry(UNKNOWN)
        if not local:
            return Geometry(GLOBAL)
        context = global_ or any(g.global_context for g in local)
        return Geometry(LOCAL, _union([g.axes for g in local]), context)


def _window(
    source: Geometry,
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> Geometry:
    axes = []
    for a, k, s, p, d in zip(source.axes, kernel, stride, padding, dilation, strict=True):
        span = d * (k - 1)  # k_eff - 1
        axes.append(Axis(a.rf + span * a.jump, a.jump * s, a.start + (span / 2 - p) * a.jump))
    return replace(source, axes=tuple(axes))


def _union(axes_list: list[tuple[Axis, ...]]) -> tuple[Axis, ...]:
    """Per axis, the smallest field covering every branch's field (branches may be off-centre)."""
    merged = []
    for per_branch in zip(*axes_list, strict=True):
        low = min(a.low for a in per_branch)
        high = max(a.high for a in per_branch)
        merged.append(Axis(high - low + 1, max(a.jump for a in per_branch), (low + high) / 2))
    return tuple(merged)


def _per_axis(value: Any, nd: int, default: int | None) -> list[Any]:
    """An int or list argument as one value per trailing spatial axis (an empty list = default)."""
    if value is None:
        return [default] * nd
    if isinstance(value, int):
        return [value] * nd
    values = list(value)
    if not values:
        return [default] * nd
    if len(values) == 1:
        return values * nd
    return values[-nd:]


def _spatial(t: torch.Tensor, nd: int) -> tuple[int, ...]:
    return tuple(t.shape[-nd:]) if t.dim() >= nd else ()


def _tensors(tree: Any) -> Iterator[torch.Tensor]:
    leaves, _ = tree_flatten(tree)
    return (leaf for leaf in leaves if isinstance(leaf, torch.Tensor))


def _named_arguments(func: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The op's arguments by schema name, defaults included (``avg_pool2d(x, 2)`` omits the stride)."""
    schema = func._schema.arguments
    named = {a.name: a.default_value for a in schema if a.has_default_value()}
    named.update(zip((a.name for a in schema), args, strict=False))
    named.update(kwargs)
    return named
