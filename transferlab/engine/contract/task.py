"""The task contract: a target, three non-empty splits, batches that fit, loss, metrics, class subsets."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from transferlab.engine.assembly import check_options
from transferlab.engine.contract.checks import (
    BATCH,
    CheckResult,
    Checks,
    ContractViolation,
    accepts,
    isolated,
    loss_and_metrics,
    signature,
)
from transferlab.engine.fit import iterate_batches
from transferlab.registry import TASKS
from transferlab.tasks.base import SPLITS, InMemoryDataset, TargetSpec, Task

MAX_LABELS = 4096  # samples read per split when a class subset's labels are checked


def check_task(name: str, *, options: Mapping[str, Any] | None = None) -> list[CheckResult]:
    """Build task ``name`` (all classes) and check target, splits, a batch, loss, metrics and subsets.

    For label targets the loss and metrics run on random logits, and ``classes=[0, 1]`` must give a
    two-class task whose labels are renumbered 0 and 1.
    """
    factory = TASKS.get(name)
    options = dict(options or {})
    checks = Checks()
    with isolated():
        task = _build(checks, name, factory, options)
        _check_splits(checks, task)
        batch = _check_batch(checks, task)
        if task.target.kind == "label":
            with checks.check("loss and metrics on a dummy prediction") as note:
                n = len(batch[task.target.input_key])
                logits = torch.randn(n, task.target.num_classes, requires_grad=True)
                note.text = loss_and_metrics(task, {"logits": logits}, batch, [logits])
        with checks.check("primary_metric is among metrics()") as note:
            names = list(task.metrics())
            if task.primary_metric not in names:
                raise ContractViolation(f"primary_metric '{task.primary_metric}' is not one of {names}")
            if not isinstance(task.higher_is_better, bool):
                raise ContractViolation(f"higher_is_better is {task.higher_is_better!r}, not a bool")
            note.text = f"{task.primary_metric} ({'higher' if task.higher_is_better else 'lower'} is better)"
        with checks.check("fingerprint is stable across constructions") as note:
            first, second = task.fingerprint(), factory(classes=None, **options).fingerprint()
            if not isinstance(first, str) or not first or first != second:
                raise ContractViolation(f"two constructions gave fingerprints {first!r} and {second!r}")
            note.text = first
        if task.target.kind == "label":
            with checks.check("class subset [0, 1] renumbers labels") as note:
                note.text = _check_subset(task, factory(classes=[0, 1], **options))
    return checks.results


def _build(checks: Checks, name: str, factory: Callable[..., Any], options: dict[str, Any]) -> Task:
    with checks.check("factory builds with classes=None", required=True) as note:
        if not accepts(factory, "classes"):
            raise ContractViolation(
                f"{signature(factory)} has no 'classes' parameter; the planner passes the class subset "
                "of an A/B split as `classes` (None = every class)"
            )
        check_options("task", name, factory, options, reserved=("classes",))
        task = factory(classes=None, **options)
        note.text = signature(factory)
    with checks.check("returns a transferlab Task with a TargetSpec", required=True) as note:
        if not isinstance(task, Task):
            raise ContractViolation(
                f"the factory returned {type(task).__qualname__}; return a transferlab.tasks.Task "
                "(a ClassificationTask for label targets)"
            )
        target = task.target
        if not isinstance(target, TargetSpec):
            raise ContractViolation(f"target is {type(target).__name__}, not a transferlab.tasks.TargetSpec")
        if target.kind == "label" and (not target.num_classes or target.num_classes < 2):
            raise ContractViolation(f"a label target needs num_classes >= 2, got {target.num_classes}")
        if target.class_names and len(target.class_names) != target.num_classes:
            raise ContractViolation(f"{len(target.class_names)} class_names for {target.num_classes} classes")
        size = "x".join(map(str, (target.in_channels, *target.image_size)))
        note.text = f"{target.kind}, {target.num_classes} classes, input {size}"
    return task


def _check_splits(checks: Checks, task: Task) -> None:
    with checks.check("train, val and test data sets are non-empty", required=True) as note:
        sizes = {split: len(task.dataset(split)) for split in SPLITS}
        empty = [split for split, size in sizes.items() if size == 0]
        if empty:
            raise ContractViolation(f"split {', '.join(map(repr, empty))} is empty (sizes {sizes})")
        note.text = ", ".join(f"{s} {n}" for s, n in sizes.items())


def _check_batch(checks: Checks, task: Task) -> dict[str, Any]:
    target = task.target
    with checks.check(f"a batch has '{target.input_key}' of the target's shape", required=True) as note:
        batch = next(iterate_batches(task.dataset("train"), BATCH, shuffle=False, generator=None))
        x = batch.get(target.input_key) if isinstance(batch, dict) else None
        if not isinstance(x, Tensor):
            raise ContractViolation(f"the batch has no tensor '{target.input_key}' (fields: {list(batch)})")
        expected = (target.in_channels, *target.image_size)
        if target.input_key == "image" and tuple(x.shape[1:]) != expected:
            raise ContractViolation(
                f"'image' has shape {tuple(x.shape)}, expected (N, {', '.join(map(str, expected))}) "
                "from target.in_channels and target.image_size"
            )
        if target.kind == "label":
            y = batch.get("label")
            if not isinstance(y, Tensor) or y.dtype != torch.long or y.shape != (len(x),):
                raise ContractViolation(f"'label' must be an int64 tensor of shape (N,), got {y!r:.80}")
            if y.min() < 0 or y.max() >= target.num_classes:
                raise ContractViolation(f"labels {y.tolist()} are outside 0..{target.num_classes - 1}")
        note.text = ", ".join(f"{k} {tuple(v.shape)}" for k, v in batch.items() if isinstance(v, Tensor))
    return batch


def _check_subset(full: Task, subset: Task) -> str:
    if subset.target.num_classes != 2:
        raise ContractViolation(f"classes=[0, 1] gave a task of {subset.target.num_classes} classes, not 2")
    names = full.target.class_names
    if names and tuple(subset.target.class_names) != tuple(names[:2]):
        raise ContractViolation(f"class_names {subset.target.class_names}, expected {tuple(names[:2])}")
    counts = {}
    for split in SPLITS:
        labels = _labels(subset.dataset(split))
        found = sorted(labels.unique().tolist())
        if not found:
            raise ContractViolation(f"split '{split}' of the subset is empty")
        if not set(found) <= {0, 1}:
            raise ContractViolation(f"split '{split}' has labels {found}; a subset renumbers labels 0..k-1")
        if split == "train" and found != [0, 1]:
            raise ContractViolation(f"the subset's train split holds only label {found}, not both classes")
        counts[split] = len(labels)
    if subset.fingerprint() == full.fingerprint():
        raise ContractViolation("the subset has the same fingerprint as the whole task")
    return ", ".join(f"{s} {n}" for s, n in counts.items())


def _labels(dataset: Any) -> Tensor:
    """The labels of (up to ``MAX_LABELS`` samples of) a data set."""
    if isinstance(dataset, InMemoryDataset) and "label" in dataset.tensors:
        return dataset.tensors["label"]
    labels, seen = [], 0
    for batch in iterate_batches(dataset, 256, shuffle=False, generator=None):
        labels.append(batch["label"])
        seen += len(batch["label"])
        if seen >= MAX_LABELS:
            break
    return torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)
