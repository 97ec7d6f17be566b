"""Pretrained weights, offline-first: local files and existing caches only, never a download.

``weights: PATH`` in a spec's backbone section loads a safetensors file (or a PyTorch file through
``torch.load(weights_only=True)``, which refuses pickled code). ``pretrained: true`` on a timm backbone
uses timm's pretrained config to find the weights in the Hugging Face or torch hub cache that already
exists on this machine; when they are not there, the error lists every place it looked and how to
provide the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


class WeightsError(ValueError):
    """Weights were asked for but cannot be found or do not fit the backbone."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: safetensors, or a PyTorch file loaded with ``weights_only=True``.

    A checkpoint that nests its weights under ``state_dict`` or ``model`` is unwrapped.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors, pickle and zip errors differ; all mean "unreadable"
        raise WeightsError(f"cannot read weights file {path}: {type(exc).__name__}: {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {path} does not hold a state dict of tensors")
    return state


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load a weights file whose keys are the backbone's own (``stages.…``) or a transferlab checkpoint's.

    Every tensor of the backbone must be in the file with the same shape; the error names what is not.
    """
    state = read_state_dict(path)
    wanted = backbone.state_dict()
    if not any(k in state for k in wanted) and any(k.startswith("backbone.") for k in state):
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    missing = [k for k in wanted if k not in state]
    if missing:
        raise WeightsError(
            f"weights file {path} lacks {len(missing)} of the backbone's {len(wanted)} tensors "
            f"(e.g. {', '.join(missing[:3])}); it must hold this backbone's state_dict or a transferlab "
            "checkpoint of the same backbone"
        )
    bad = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in wanted.items()
        if state[k].shape != v.shape
    ]
    if bad:
        raise WeightsError(f"weights file {path} has other shapes: {'; '.join(bad[:3])}")
    backbone.load_state_dict({k: state[k] for k in wanted})


def cached_pretrained_file(model_name: str) -> tuple[Path | None, list[str]]:
    """The local file holding timm's pretrained weights of ``model_name``, and every place looked at."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(model_name)
    if cfg is None:
        return None, [f"timm has no pretrained config for '{model_name}'"]
    looked: list[str] = []
    if cfg.file:
        looked.append(str(cfg.file))
        if Path(cfg.file).is_file():
            return Path(cfg.file), looked
    if cfg.hf_hub_id:
        from huggingface_hub import constants, try_to_load_from_cache

        for filename in ("model.safetensors", "pytorch_model.bin"):
            looked.append(f"Hugging Face cache {constants.HF_HUB_CACHE}: {cfg.hf_hub_id}/{filename}")
            found = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found), looked
    if cfg.url:
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name
        looked.append(f"torch hub cache: {candidate}")
        if candidate.is_file():
            return candidate, looked
    return None, looked


def pretrained_file(model_name: str, weights: str | Path | None, pretrained: bool) -> Path | None:
    """The weights file a timm backbone should load: ``weights`` if given, else the cached pretrained file.

    Raises:
        WeightsError: ``weights`` does not exist, or ``pretrained`` is set and no cache holds the file.
    """
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(f"weights file not found: {path}")
        return path
    if not pretrained:
        return None
    found, looked = cached_pretrained_file(model_name)
    if found is None:
        where = "\n  ".join(looked)
        raise WeightsError(
            f"pretrained weights for timm model '{model_name}' are not on this machine, and transferlab "
            f"never downloads. Looked in:\n  {where}\nProvide them with `weights: /path/to/file.safetensors` "
            "in the spec's backbone section (a safetensors or weights-only PyTorch file), or put the file "
            "in one of those caches; or set `pretrained: false`."
        )
    return found
