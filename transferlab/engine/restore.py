"""Rebuild a trained trial's model and task from its stored config and checkpoint."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transferlab.engine.assembly import build_model, build_task
from transferlab.engine.checkpoint import load_state
from transferlab.engine.model import TransferModel
from transferlab.tasks.base import Task


def restore_trial(config: Mapping[str, Any], checkpoint: str | Path) -> tuple[TransferModel, Task]:
    """The model of a finished trial with its trained weights, in eval mode, and its task.

    Args:
        config: The trial's config as the planner made it (``TrialInfo.config``).
        checkpoint: The trial's safetensors checkpoint (never unpickled).

    Raises:
        FileNotFoundError: The checkpoint is gone.
        ValueError: The checkpoint does not hold this model's tensors.
    """
    task = build_task(config["task"]["name"], config["task"]["options"], classes=config.get("classes"))
    model = build_model(
        (config["backbone"]["name"], _without_weights(config["backbone"]["options"])),
        (config["head"]["name"], config["head"]["options"]),
        task,
        freeze_depth=int(config.get("freeze_depth", 0)),
        bn_policy=config.get("bn_policy", "frozen"),
    )
    state = load_state(checkpoint)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {checkpoint} does not fit trial {config.get('trial_key')}'s model: "
            f"{len(missing)} tensors missing {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}"
        )
    model.load_state_dict(state)
    return model.eval(), task


def _without_weights(options: Mapping[str, Any]) -> dict[str, Any]:
    """Backbone options without initial weights: the checkpoint holds every trained tensor."""
    return {k: v for k, v in options.items() if k not in ("weights", "pretrained")}
