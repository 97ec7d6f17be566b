"""Every built-in head on every backbone kind it fits: 2-D (small, CIFAR, timm) and 1-D (text, audio).

A pairing is compatible when a task provides the head's target kind on that backbone's kind of input.
For each: the head builds from ``feature_info`` and the target, one training step gives a finite
loss whose gradient reaches the head, and in eval mode the task's metrics (the primary one included)
accept the output. Each head's own file checks its numbers; this one checks the whole matrix, and
that no built-in head is left out of it.
"""

from __future__ import annotations

import math

import pytest
import torch

from transferlab.engine.assembly import build_backbone, build_head, build_task
from transferlab.engine.fit import iterate_batches
from transferlab.engine.model import TransferModel
from transferlab.registry import BUILTIN_SOURCE, HEADS
from transferlab.tasks.base import Task

TINY = {"train_size": 8, "val_size": 8, "test_size": 8}
SHAPES = {"image_size": 32, **TINY}
# Backbone kinds: name, options, and the tasks (name, options) that feed it.
BACKBONES = {
    "convnet": ({"widths": [8, 16, 16]}, "2-D"),
    "resnet20": ({}, "2-D"),
    "resnet18": ({}, "2-D"),
    "textcnn": ({"embed_dim": 8, "filters": [4, 4], "kernel_sizes": [2, 3]}, "1-D text"),
    "tdnn": (
        {"channels": [8, 8, 8, 12], "kernel_sizes": [5, 3, 3, 1], "dilations": [1, 2, 3, 1]},
        "1-D audio",
    ),
}
TASKS = {
    "2-D": [
        ("shapes", {**SHAPES}),
        ("shapes", {**SHAPES, "target": "mask"}),
        ("shapes", {**SHAPES, "target": "box"}),
        ("shapes", {**SHAPES, "target": "caption"}),
        ("shapes", {**SHAPES, "target": "image"}),
        ("digits", {"image_size": 16, "target": "image"}),
    ],
    "1-D text": [("text_topics", TINY)],
    "1-D audio": [("audio_events", TINY)],
}
# Heads whose target kinds have a task on 1-D inputs must work there too.
HEAD_OPTIONS = {
    "unet": {"decoder_channels": [8]},
    "caption": {"embed_dim": 8, "hidden": 16},
}


pytestmark = pytest.mark.usefixtures("one_thread")


_TASK_CACHE: dict[str, Task] = {}


def task_for(name: str, options: dict) -> Task:
    key = f"{name}{sorted(options.items())}"
    if key not in _TASK_CACHE:
        _TASK_CACHE[key] = build_task(name, options)
    return _TASK_CACHE[key]


def head_kinds(name: str) -> tuple[str, ...]:
    """The target kinds a head declares (read from the class the factory returns on shapes)."""
    for task_name, options in TASKS["2-D"]:
        task = task_for(task_name, options)
        backbone = build_backbone("convnet", BACKBONES["convnet"][0], task.target)
        try:
            head = build_head(name, HEAD_OPTIONS.get(name, {}), backbone.feature_info, task.target)
        except ValueError:
            continue
        return tuple(head.target_kinds)
    raise AssertionError(f"head {name} builds on no shapes or digits target")


def pairings() -> list[tuple[str, str, str, dict]]:
    cases = []
    for head in HEADS.names():
        if HEADS.entry(head).source != BUILTIN_SOURCE:
            continue  # plugins have their own checks (`transferlab plugins check`)
        kinds = head_kinds(head)
        for backbone, (_, input_kind) in BACKBONES.items():
            for task_name, options in TASKS[input_kind]:
                if task_for(task_name, options).target.kind in kinds:
                    cases.append((head, backbone, task_name, options))
    return cases


PAIRINGS = pairings()


def test_every_builtin_head_is_in_the_matrix() -> None:
    builtin = {h for h in HEADS.names() if HEADS.entry(h).source == BUILTIN_SOURCE}
    assert {"classify", "fcn", "unet", "bbox", "caption", "autoencoder", "vae", "conv1d"} <= builtin
    assert {case[0] for case in PAIRINGS} == builtin
    one_d = {case[0] for case in PAIRINGS if case[1] in ("textcnn", "tdnn")}
    assert {"classify", "conv1d"} <= one_d  # the label heads run on text and audio stages too


@pytest.mark.parametrize(
    ("head_name", "backbone_name", "task_name", "task_options"),
    PAIRINGS,
    ids=[f"{h}-{b}-{t}-{o.get('target', 'label')}" for h, b, t, o in PAIRINGS],
)
def test_head_trains_and_scores_on_backbone(
    head_name: str, backbone_name: str, task_name: str, task_options: dict
) -> None:
    torch.manual_seed(0)
    task = task_for(task_name, task_options)
    backbone = build_backbone(backbone_name, BACKBONES[backbone_name][0], task.target)
    head = build_head(head_name, HEAD_OPTIONS.get(head_name, {}), backbone.feature_info, task.target)
    assert task.target.kind in head.target_kinds
    model = TransferModel(backbone, head, input_key=task.target.input_key)
    batch = next(iterate_batches(task.dataset("train"), 4, shuffle=False, generator=None))

    model.train()
    loss = task.loss(model(batch), batch)
    assert loss.ndim == 0 and math.isfinite(float(loss.detach()))
    loss.backward()
    grads = [p.grad for p in head.parameters() if p.requires_grad]
    assert grads and any(g is not None and float(g.abs().sum()) > 0 for g in grads)

    model.eval()
    metrics = task.metrics()
    with torch.no_grad():
        outputs = model(batch)
        assert math.isfinite(float(task.loss(outputs, batch)))
        task.update_metrics(metrics, outputs, batch)
    values = {name: float(metric.compute()) for name, metric in metrics.items()}
    assert task.primary_metric in values
    assert all(math.isfinite(v) for v in values.values()), values
