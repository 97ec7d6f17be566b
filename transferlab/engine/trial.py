"""Run one planned trial from its plain-dict config: the code a Ray worker (or a local run) executes."""

from __future__ import annotations

import random
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from transferlab.engine.assembly import build_model, build_task
from transferlab.engine.checkpoint import load_backbone_stages
from transferlab.engine.fit import EpochCallback, FitConfig, FitResult, fit
from transferlab.tasks.base import stable_hash


def init_seed(config: dict[str, Any]) -> int:
    """The seed of a trial's weight initialisation: distinct for every (seed, split, condition, depth).

    Base nets A and B, and the re-initialised upper stages of every transfer net, must start from
    independent random weights, as in Yosinski et al. (2014); the spec's seed alone would give
    every trial of a seed the same initial weights. The seed still fixes the data order.

    The arms of a multitask study (one trial per weighting, and the ``single:<key>`` baselines) are
    compared with each other, so they share one initialisation per (seed, split, depth): the trunk,
    built first, starts from the same weights in every arm.
    """
    condition = config.get("condition")
    if config.get("study") == "multitask" or str(condition).startswith("single:"):
        condition = "multitask-arm"
    key = [config["seed"], config.get("split"), condition, config.get("depth")]
    return int(stable_hash(key), 16) % 2**31


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def fit_config(config: dict[str, Any], num_stages: int) -> FitConfig:
    """The ``FitConfig`` of a trial: the spec's train section, its seed, and fine-tuning multipliers."""
    known = {f.name for f in fields(FitConfig)}
    train = {k: v for k, v in config["train"].items() if k in known}
    mult = list(train.get("stage_lr_mult") or [1.0] * num_stages)
    # Copied stages that are fine-tuned (AnB+, BnB+) may learn slower: the lecture's 1/10 rule.
    for i in range(config.get("copy_depth", 0)):
        if i >= config.get("freeze_depth", 0):
            mult[i] *= config.get("fine_tune_lr_mult", 1.0)
    train.update(stage_lr_mult=mult, seed=int(config["seed"]))
    return FitConfig(**train)


def copy_base_stages(model: nn.Module, config: dict[str, Any]) -> list[str]:
    """Copy the trial's ``copy_depth`` first stages from its ``base_checkpoint``; the names copied."""
    if not config.get("copy_depth"):
        return []
    base = config.get("base_checkpoint")
    if not base:
        raise ValueError(
            f"trial {config.get('trial_key')} copies {config['copy_depth']} stages but has no base checkpoint"
        )
    return load_backbone_stages(model, base, int(config["copy_depth"]))


def start_trial(config: dict[str, Any], threads: int | None) -> None:
    """Set the trial's torch threads (its CPU share) and seed its initialisation, before building."""
    if threads:
        torch.set_num_threads(max(1, int(threads)))
    seed_everything(init_seed(config))


def resume_path_for(checkpoint_path: str | Path | None) -> Path | None:
    """The training state beside the checkpoint (``resume.pt``): a retried or resumed trial continues
    after its last finished epoch; it is removed once the final checkpoint exists."""
    return Path(checkpoint_path).with_name("resume.pt") if checkpoint_path is not None else None


def finish_facts(result: FitResult, facts: dict[str, Any], resume_path: Path | None) -> dict[str, Any]:
    """Drop the training state now the checkpoint exists; add the facts every kind of trial records."""
    if resume_path is not None:
        resume_path.unlink(missing_ok=True)
    facts["resumed_from_epoch"] = result.resumed_from
    facts["torch_threads"] = torch.get_num_threads()
    facts.update(result.feature_cache)
    facts.update(result.device)
    return facts


def run_trial(
    config: dict[str, Any],
    *,
    checkpoint_path: str | Path | None = None,
    on_epoch: EpochCallback | None = None,
    threads: int | None = None,
) -> tuple[FitResult, dict[str, Any]]:
    """Build the trial's task and model, copy base stages, train and evaluate.

    Args:
        config: The planner's trial config (see ``transferlab.service.planner``).
        checkpoint_path: Where to write the trained weights.
        on_epoch: Per-epoch metrics callback.
        threads: Torch intra-op threads (the trial's CPU share).

    Returns:
        The fit result and facts for provenance (data hash, copied tensors).
    """
    if config.get("study") == "multitask":
        from transferlab.engine.multitask import run_multitask_trial

        return run_multitask_trial(
            config, checkpoint_path=checkpoint_path, on_epoch=on_epoch, threads=threads
        )
    start_trial(config, threads)
    task = build_task(config["task"]["name"], config["task"]["options"], classes=config.get("classes"))
    model = build_model(
        (config["backbone"]["name"], config["backbone"]["options"]),
        (config["head"]["name"], config["head"]["options"]),
        task,
        freeze_depth=int(config.get("freeze_depth", 0)),
        bn_policy=config.get("bn_policy", "frozen"),
    )
    copied = copy_base_stages(model, config)
    facts = {
        "data_hash": task.fingerprint(),
        "copied_tensors": len(copied),
        "num_stages": model.backbone.num_stages,
    }
    resume_path = resume_path_for(checkpoint_path)
    result = fit(
        model,
        task,
        fit_config(config, model.backbone.num_stages),
        on_epoch=on_epoch,
        checkpoint_path=checkpoint_path,
        checkpoint_metadata={"trial_key": config.get("trial_key"), "freeze_depth": model.freeze_depth},
        resume_path=resume_path,
        augment=config.get("augment"),
    )
    return result, finish_facts(result, facts, resume_path)
