"""A plugin package used by the tests, found through its entry points like any installed plugin.

``nan_digits`` is the digits task whose loss turns NaN whenever class 0 is among its classes, so in
a 0-4 / 5-9 transfer study baseA fails and the trials copying it must be skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from transferlab.backbones.base import Backbone, StageInfo
from transferlab.registry import TASKS


def nan_digits(*, classes: list[int] | None = None, image_size: int = 16) -> Any:
    """Digits whose loss is NaN when class 0 is included (for failure-path tests)."""
    task = TASKS.get("digits")(classes=classes, image_size=image_size)
    if classes is not None and 0 in classes:
        task.loss = lambda outputs, batch: outputs["logits"].sum() * torch.tensor(float("nan"))
    return task


def flaky_digits(*, classes: list[int] | None = None, image_size: int = 16, marker: str = "") -> Any:
    """Digits whose loss raises once, in epoch 2, until the file ``marker`` exists (transient faults)."""
    task = TASKS.get("digits")(classes=classes, image_size=image_size)
    original, calls = task.loss, {"n": 0}
    steps_per_epoch = -(-len(task.dataset("train")) // 64)

    def loss(outputs: dict, batch: dict) -> torch.Tensor:
        calls["n"] += torch.is_grad_enabled()
        if marker and calls["n"] == steps_per_epoch + 1 and not Path(marker).exists():
            Path(marker).write_text("failed once")
            raise RuntimeError("transient failure (test)")
        return original(outputs, batch)

    task.loss = loss
    return task


def oom_digits(*, classes: list[int] | None = None, image_size: int = 16, attempts: str = "") -> Any:
    """Digits whose loss runs out of memory, noting each attempt in the file ``attempts`` (when given)."""
    task = TASKS.get("digits")(classes=classes, image_size=image_size)
    if not attempts:  # plain digits, so that contract checks over every task see a working one
        return task

    def loss(outputs: dict, batch: dict) -> torch.Tensor:
        with open(attempts, "a") as f:
            f.write("attempt\n")
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (test)")

    task.loss = loss
    return task


def twostage(*, in_channels: int = 3) -> Backbone:
    """Two 3x3 conv stages (a plugin backbone for the tests)."""
    stages = [
        torch.nn.Sequential(torch.nn.Conv2d(in_channels, 4, 3, padding=1), torch.nn.ReLU()),
        torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, stride=2, padding=1), torch.nn.ReLU()),
    ]
    return Backbone(stages, [StageInfo("c1", 4, 1, 3), StageInfo("c2", 8, 2, 7)], in_channels)
