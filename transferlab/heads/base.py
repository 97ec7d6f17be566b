"""The head contract: built from ``FeatureInfo`` and ``TargetSpec``; ``forward(features, batch) -> dict``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

# Default width of a decoder block: this many channels per unit of its output stride, within the
# bounds; on a /32 backbone that is smp's U-Net default (256, 128, 64, 32, 16).
CHANNELS_PER_STRIDE = 16
DEFAULT_WIDTH_BOUNDS = (16, 256)


class Head(nn.Module):
    """Base class of heads; ``target_kinds`` lists the task targets a head can predict."""

    target_kinds: tuple[str, ...] = ()

    def forward(self, features: list[Tensor], batch: dict[str, Any]) -> dict[str, Tensor]:  # pragma: no cover
        raise NotImplementedError


def require_target(head_name: str, kinds: tuple[str, ...], target_kind: str) -> None:
    """Raise ``ValueError`` when a head cannot predict a task's target kind."""
    if target_kind not in kinds:
        raise ValueError(
            f"head '{head_name}' predicts {' or '.join(kinds)} targets, but the task provides '{target_kind}'"
        )


def decoder_widths(head: str, option: str, given: Sequence[int] | None, strides: Sequence[int]) -> list[int]:
    """One width per decoder block, given the blocks' output strides (coarse to fine).

    The ``given`` list (a shorter one repeats its last width; more widths than blocks are an error),
    or by default ``CHANNELS_PER_STRIDE`` x the block's output stride within ``DEFAULT_WIDTH_BOUNDS``.

    Args:
        head: The head's name, for messages.
        option: The head's option that gave ``given`` ("decoder_channels", "channels").
        given: The widths the user gave, or ``None``.
        strides: Output stride of each block (its reduction relative to the input).
    """
    blocks = len(strides)
    if given is None:
        low, high = DEFAULT_WIDTH_BOUNDS
        return [min(max(CHANNELS_PER_STRIDE * s, low), high) for s in strides]
    widths = list(given) if isinstance(given, Sequence) and not isinstance(given, str) else []
    if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"head '{head}': {option} must be a list of positive integers, got {given!r}")
    if len(widths) > max(blocks, 1):
        raise ValueError(
            f"head '{head}': {option} lists {len(widths)} widths, but its decoder has {blocks} block(s) "
            f"here; give at most {max(blocks, 1)} (a shorter list repeats its last width)"
        )
    return widths[:blocks] + widths[-1:] * (blocks - len(widths))
