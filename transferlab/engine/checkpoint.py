"""Checkpoints as safetensors files, written atomically; never unpickled."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from transferlab.atomic import atomic_path

CHECKPOINT_NAME = "model.safetensors"


def save_checkpoint(model: nn.Module, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model.state_dict()`` to ``path`` atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # safetensors refuses tensors that share storage; a contiguous clone of each breaks the sharing.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    meta = {"transferlab": json.dumps(metadata or {}, default=str)}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return path


def read_checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata dict stored with a checkpoint."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get("transferlab", "{}"))


def load_state(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint (CPU)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return load_file(str(path))


def load_backbone_stages(model: nn.Module, path: str | Path, depth: int) -> list[str]:
    """Copy ``backbone.stages[0:depth]`` (parameters and buffers) from a checkpoint into ``model``.

    Returns:
        The names of the tensors copied. Missing or mis-shaped tensors raise ``ValueError``.
    """
    state = load_state(path)
    prefixes = tuple(f"backbone.stages.{i}." for i in range(depth))
    wanted = {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}
    missing = [k for k in wanted if k not in state]
    if missing:
        raise ValueError(
            f"checkpoint {path} lacks {len(missing)} tensors of the first {depth} stages: {missing[:3]}"
        )
    bad = [k for k, v in wanted.items() if state[k].shape != v.shape]
    if bad:
        raise ValueError(
            f"checkpoint {path} has other shapes for {bad[:3]}; was it made with another backbone?"
        )
    model.load_state_dict({k: state[k] for k in wanted}, strict=False)
    return sorted(wanted)
