"""Checks of a structurally valid spec against the plugin registries.

Builds the task, backbone and head once on the CPU (pretrained weights off) so that every name,
option, class index and freeze depth is known to work before anything is written or submitted.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from transferlab.registry import HEADS, TASKS, UnknownPluginError
from transferlab.service.spec import ClassSplit, Spec, ValidatedSpec
from transferlab.service.spec_yaml import SpecError

Problems = list[tuple[str, str]]


def _random_split(num_classes: int, seed: int, a_classes: int | None) -> ClassSplit:
    classes = list(range(num_classes))
    random.Random(seed).shuffle(classes)
    n_a = a_classes if a_classes is not None else num_classes // 2
    return ClassSplit(f"random-{seed}", tuple(sorted(classes[:n_a])), tuple(sorted(classes[n_a:])))


def _class_splits(
    spec: Spec, classes_a: int, classes_b: int, problems: list[tuple[str, str]]
) -> tuple[ClassSplit, ...]:
    """The A/B class splits; ``classes_a`` counts the source task's classes (cross-task transfer)."""
    assert spec.transfer is not None
    split = spec.transfer.split
    if split is None:  # cross-task transfer on every class of both tasks
        return (ClassSplit("all", None, None),)
    num_classes = classes_b
    if hasattr(split, "random"):
        if classes_a != classes_b:
            problems.append(
                (
                    "transfer.split",
                    f"a random split needs the same classes in both tasks; the source task has "
                    f"{classes_a} and the target task {classes_b}: give the A and B lists instead",
                )
            )
            return ()
        # Each half trains its own classifier, so each needs at least 2 classes.
        if num_classes < 4:
            problems.append(
                ("transfer.split", f"the task has {num_classes} classes; a random A/B split needs at least 4")
            )
            return ()
        if split.a_classes is not None and not 2 <= split.a_classes <= num_classes - 2:
            problems.append(
                (
                    "transfer.split.a_classes",
                    "must leave at least 2 classes in each half: "
                    f"2..{num_classes - 2} (got {split.a_classes})",
                )
            )
            return ()
        return tuple(_random_split(num_classes, s, split.a_classes) for s in split.seeds)
    for side, count in (("A", classes_a), ("B", classes_b)):
        bad = [c for c in getattr(split, side) if c >= count]
        if bad:
            problems.append(
                (
                    f"transfer.split.{side}",
                    f"classes {bad} do not exist; the task has classes 0..{count - 1}",
                )
            )
    for side in ("A", "B"):
        if len(getattr(split, side)) < 2:
            problems.append((f"transfer.split.{side}", "needs at least 2 classes to train a classifier"))
    return (ClassSplit("given", tuple(split.A), tuple(split.B)),)


def check_depths(
    loc: str, depths: list[int], stage_names: tuple[str, ...], backbone: str, problems: list[tuple[str, str]]
) -> None:
    n = len(stage_names)
    for d in depths:
        if d > n:
            problems.append(
                (
                    loc,
                    f"depth {d} is deeper than backbone '{backbone}' ({n} stages: {', '.join(stage_names)})",
                )
            )


PATH_OPTIONS = ("root", "weights", "path")


def absolute_paths(options: dict[str, Any]) -> dict[str, Any]:
    """Options naming files or folders (``root``, ``weights``) made absolute against the working folder.

    Trials run in other working folders (Ray changes into each trial's folder), so a relative path
    in a spec means "relative to where `transferlab submit` ran" only if it is resolved here.
    """
    return {
        k: str(Path(v).expanduser().resolve()) if k in PATH_OPTIONS and isinstance(v, str) else v
        for k, v in options.items()
    }


def _check_forward(
    spec: Spec, task: Any, backbone: Any, head: Any, source: str, *, head_name: str, loc: str = "task"
) -> None:
    """Run one input of the task's size through backbone and head, as the trials will.

    Images: all zeros of the target's size. Other inputs (token ids, audio frames): the first two
    validation samples, since their dtype and layout are the task's own.
    """
    import torch

    from transferlab.engine.fit import iterate_batches

    target = task.target
    if target.input_key == "image":
        x, batch = torch.zeros((1, target.in_channels, *target.image_size)), {}
    else:
        batch = next(iterate_batches(task.dataset("val"), 2, shuffle=False, generator=None))
        x = batch[target.input_key]
    shape = "x".join(map(str, x.shape[int(target.input_key == "image") :]))
    what = (
        f"a {shape} input does"
        if target.input_key == "image"
        else f"the task's {target.input_key} ({shape}) do"
    )
    backbone.eval()
    head.eval()
    try:
        with torch.no_grad():
            features = backbone(x)
            head(features, batch)
    except (RuntimeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0]
        raise SpecError(
            source,
            [
                (
                    loc,
                    f"{what} not fit backbone '{spec.backbone.name}' with head '{head_name}': {reason}",
                )
            ],
        ) from None


def build_side(
    spec: Spec, task_ref: Any, head_ref: Any, backbone_options: dict[str, Any], source: str, loc: str
) -> tuple[Any, dict[str, Any], Any]:
    """Build one task with the backbone and its head and run an input through them.

    ``loc`` prefixes the fields errors name ("" for the spec's task, "transfer.source." for a source).

    Returns:
        (task, the task options trials use, backbone).
    """
    from transferlab.engine.assembly import (
        build_backbone,
        build_head,
        build_task,
        pretrained_task_options,
        uses_pretrained_weights,
    )

    base_task_options = absolute_paths(task_ref.options)
    try:
        task = build_task(task_ref.name, base_task_options)
    except (TypeError, ValueError) as exc:
        raise SpecError(source, [(f"{loc}task", str(exc))]) from None
    # Validation never loads or downloads weights: it only needs the stages' shapes.
    options = {
        **backbone_options,
        **({"pretrained": False} if "pretrained" in backbone_options else {}),
    }
    try:
        backbone = build_backbone(spec.backbone.name, options, task.target)
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:
        raise SpecError(source, [("backbone", str(exc))]) from None
    try:
        head = build_head(head_ref.name, head_ref.options, backbone.feature_info, task.target)
    except (TypeError, ValueError, KeyError) as exc:
        raise SpecError(source, [(f"{loc}head", str(exc))]) from None
    task_options = dict(base_task_options)
    if uses_pretrained_weights(backbone_options):
        task_options = pretrained_task_options(task_ref.name, task_options, task.target, backbone.data_config)
        if task_options != base_task_options:  # rebuild for the pretrained model's input
            try:
                task = build_task(task_ref.name, task_options)
            except (TypeError, ValueError) as exc:
                raise SpecError(
                    source, [(f"{loc}task", f"with the pretrained model's input settings: {exc}")]
                ) from None
    _check_forward(spec, task, backbone, head, source, head_name=head_ref.name, loc=f"{loc}task")
    return task, task_options, backbone


def _check_source(spec: Spec, task: Any, source_task: Any, problems: list[tuple[str, str]]) -> None:
    """A source task must feed the backbone the same kind of input as the target task."""
    assert spec.transfer is not None and spec.transfer.source is not None
    mine, theirs = task.target, source_task.target
    if (theirs.input_key, theirs.in_channels) != (mine.input_key, mine.in_channels):
        problems.append(
            (
                "transfer.source.task",
                f"'{spec.transfer.source.task.name}' feeds the backbone {theirs.in_channels}-channel "
                f"'{theirs.input_key}' inputs but '{spec.study_task.name}' {mine.in_channels}-channel "
                f"'{mine.input_key}' inputs; copied stages need the same kind of input",
            )
        )


def check_plugin_names(spec: Spec, refs: list[tuple[str, Any, str]], source: str) -> None:
    """Raise ``SpecError`` naming each unregistered (loc, registry, name) and an unknown backbone."""
    from transferlab.engine.assembly import backbone_factory

    problems = [(loc, registry.unknown_message(name)) for loc, registry, name in refs if name not in registry]
    try:
        backbone_factory(spec.backbone.name)
    except UnknownPluginError as exc:
        problems.append(("backbone.name", str(exc)))
    if problems:
        raise SpecError(source, problems)


def check_training(spec: Spec, stage_names: tuple[str, ...]) -> Problems:
    """Problems of the train section that depend on the backbone: per-stage multipliers, the device."""
    problems: Problems = []
    if spec.train.device.startswith("cuda") and spec.resources.gpu == 0:
        problems.append(
            (
                "train.device",
                f"'{spec.train.device}' needs resources.gpu > 0: Ray hides GPUs from trials without one",
            )
        )
    lr_mult = spec.train.stage_lr_mult
    if lr_mult is not None and len(lr_mult) != len(stage_names):
        problems.append(
            (
                "train.stage_lr_mult",
                f"needs one multiplier per stage: {len(stage_names)} "
                f"({', '.join(stage_names)}), got {len(lr_mult)}",
            )
        )
    return problems


def check_spec(spec: Spec, text: str, source: str) -> ValidatedSpec:
    """Check plugin names, options, classes and depths; raise ``SpecError`` listing every problem."""
    if spec.study == "multitask":
        from transferlab.service.multitask_checks import check_multitask

        return check_multitask(spec, text, source)
    problems: Problems = []
    spec_task = spec.study_task
    refs = [("task.name", TASKS, spec_task.name), ("head.name", HEADS, spec.head.name)]
    cross = spec.transfer.source if spec.transfer is not None else None
    if cross is not None:
        refs += [
            ("transfer.source.task.name", TASKS, cross.task.name),
            ("transfer.source.head.name", HEADS, cross.head.name),
        ]
    check_plugin_names(spec, refs, source)

    backbone_options = absolute_paths(spec.backbone.options)
    task, task_options, backbone = build_side(spec, spec_task, spec.head, backbone_options, source, "")
    source_task, source_task_options = task, None
    if cross is not None:
        source_task, source_task_options, _ = build_side(
            spec, cross.task, cross.head, backbone_options, source, "transfer.source."
        )
        _check_source(spec, task, source_task, problems)
    if spec.augment:  # albumentations transforms of every trial's training split
        from transferlab.engine.augment import check_augmentation

        steps = [step.model_dump() for step in spec.augment]
        for checked in dict.fromkeys((task, source_task)):  # base net A's source task trains with it too
            problems += [p for p in check_augmentation(steps, checked) if p not in problems]
    stage_names = tuple(backbone.feature_info.names)
    num_classes = task.num_selectable_classes
    problems += check_training(spec, stage_names)
    depths: tuple[int, ...] = ()
    splits: tuple[ClassSplit, ...] = ()
    if spec.transfer is not None:
        splits = _class_splits(spec, source_task.num_selectable_classes, num_classes, problems)
        if spec.transfer.depths == "all":
            depths = tuple(range(1, len(stage_names) + 1))
        else:
            depths = tuple(sorted(spec.transfer.depths))
            check_depths("transfer.depths", list(depths), stage_names, spec.backbone.name, problems)
    if spec.single is not None:
        check_depths(
            "single.freeze_depth", [spec.single.freeze_depth], stage_names, spec.backbone.name, problems
        )
        bad = [c for c in spec.single.classes or [] if c >= num_classes]
        if bad:
            problems.append(
                ("single.classes", f"classes {bad} do not exist; the task has classes 0..{num_classes - 1}")
            )
    if problems:
        raise SpecError(source, problems)
    return ValidatedSpec(
        spec=spec,
        text=text,
        source=source,
        stage_names=stage_names,
        depths=depths,
        splits=splits,
        num_classes=num_classes,
        primary_metric=task.primary_metric,
        higher_is_better=task.higher_is_better,
        task_options=task_options,
        backbone_options=backbone_options,
        source_task_options=source_task_options,
        source_primary_metric=source_task.primary_metric if cross is not None else None,
        source_higher_is_better=source_task.higher_is_better,
    )
