"""Rebuild a trained trial's model and task from its stored config and checkpoint."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transferlab.engine.assembly import build_model, build_task
from transferlab.engine.checkpoint import load_state
from transferlab.engine.model import TransferModel
from transferlab.tasks.base import Task


def restore_trial(
    config: Mapping[str, Any], checkpoint: str | Path, *, data_hash: str | None = None
) -> tuple[TransferModel, Task]:
    """The model of a finished trial with its trained weights, in eval mode, and its task.

    Args:
        config: The trial's config as the planner made it (``TrialInfo.config``).
        checkpoint: The trial's safetensors checkpoint (never unpickled).
        data_hash: The fingerprint of the data the trial trained on (``TrialInfo.data_hash``); when
            given, the rebuilt task must have it, so user files edited since (a caption CSV whose
            vocabulary changed, say) are refused instead of decoded with the wrong words.

    Raises:
        FileNotFoundError: The checkpoint is gone.
        ValueError: A multitask trial, data that changed, or a checkpoint without this model's tensors.
    """
    if "task" not in config:
        raise ValueError(
            f"trial {config.get('trial_key')} trains several heads ({', '.join(config.get('tasks', {}))}); "
            "only a single-head trial can be restored"
        )
    task = build_task(config["task"]["name"], config["task"]["options"], classes=config.get("classes"))
    if data_hash is not None and task.fingerprint() != data_hash:
        raise ValueError(
            f"the data of trial {config.get('trial_key')} changed since it trained (fingerprint "
            f"{task.fingerprint()}, trained on {data_hash}): its files were edited or moved"
        )
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
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # same names, other shapes: another backbone or head configuration
        reason = str(exc).strip().splitlines()[-1].strip()
        raise ValueError(
            f"checkpoint {checkpoint} does not fit trial {config.get('trial_key')}'s model: {reason}"
        ) from None
    return model.eval(), task


def _without_weights(options: Mapping[str, Any]) -> dict[str, Any]:
    """Backbone options without initial weights: the checkpoint holds every trained tensor."""
    return {k: v for k, v in options.items() if k not in ("weights", "pretrained")}
