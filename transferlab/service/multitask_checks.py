"""Checks of a multitask spec: every task with its head on the shared backbone, weightings, depths.

Each task is built with the backbone and its head and an input is run through them (as for a
transfer study's task), so a head that cannot predict a task's target is refused under
``multitask.tasks.<key>.head`` before anything runs.
"""

from __future__ import annotations

from typing import Any

from transferlab.registry import HEADS, TASKS, WEIGHTINGS
from transferlab.service.spec import (
    CONDITION_MAX_LENGTH,
    MULTITASK_METRIC,
    SINGLE_PREFIX,
    ClassSplit,
    MultitaskSpec,
    Spec,
    TaskFacts,
    ValidatedSpec,
)
from transferlab.service.spec_checks import (
    Problems,
    absolute_paths,
    build_side,
    check_depths,
    check_plugin_names,
    check_training,
)
from transferlab.service.spec_yaml import SpecError


def check_multitask(spec: Spec, text: str, source: str) -> ValidatedSpec:
    """Check a multitask spec completely; raise ``SpecError`` listing every problem."""
    mt = spec.multitask
    assert mt is not None
    refs: list[tuple[str, Any, str]] = []
    for key, entry in mt.tasks.items():
        refs += [
            (f"multitask.tasks.{key}.task.name", TASKS, entry.task.name),
            (f"multitask.tasks.{key}.head.name", HEADS, entry.head.name),
        ]
    refs += [(f"multitask.weightings.{i}.name", WEIGHTINGS, w.name) for i, w in enumerate(mt.weightings)]
    check_plugin_names(spec, refs, source)

    backbone_options = absolute_paths(spec.backbone.options)
    built: dict[str, tuple[Any, dict[str, Any]]] = {}
    backbone = None
    for key, entry in mt.tasks.items():
        task, options, backbone = build_side(
            spec, entry.task, entry.head, backbone_options, source, f"multitask.tasks.{key}."
        )
        built[key] = (task, options)
    assert backbone is not None
    stage_names = tuple(backbone.feature_info.names)

    problems = _same_inputs(mt, {k: t for k, (t, _) in built.items()})
    if spec.augment:
        problems.append(
            (
                "augment",
                "a multitask study does not augment its training data yet; remove 'augment' "
                "(or run each task as a single study with it)",
            )
        )
    problems += check_training(spec, stage_names)
    problems += _check_weightings(mt)
    problems += _check_conditions(mt)
    check_depths("multitask.freeze_depths", mt.freeze_depths, stage_names, spec.backbone.name, problems)
    problems += _check_trunk_weights(mt, backbone_options)
    if problems:
        raise SpecError(source, problems)
    facts = {
        key: TaskFacts(
            task_name=entry.task.name,
            task_options=built[key][1],
            head_name=entry.head.name,
            head_options=entry.head.options,
            primary_metric=built[key][0].primary_metric,
            higher_is_better=built[key][0].higher_is_better,
        )
        for key, entry in mt.tasks.items()
    }
    first = next(iter(built.values()))[0]
    return ValidatedSpec(
        spec=spec,
        text=text,
        source=source,
        stage_names=stage_names,
        depths=tuple(sorted(mt.freeze_depths)),
        splits=(ClassSplit("all", None, None),),
        num_classes=first.num_selectable_classes,
        primary_metric=MULTITASK_METRIC,
        higher_is_better=True,
        backbone_options=backbone_options,
        multitask_tasks=facts,
    )


def _same_inputs(mt: MultitaskSpec, tasks: dict[str, Any]) -> Problems:
    """Every task must feed the shared trunk the same kind of input (key and channels)."""
    (first_key, first), *others = tasks.items()
    want = (first.target.input_key, first.target.in_channels)
    problems: Problems = []
    for key, task in others:
        got = (task.target.input_key, task.target.in_channels)
        if got != want:
            problems.append(
                (
                    f"multitask.tasks.{key}.task",
                    f"'{mt.tasks[key].task.name}' feeds the backbone {got[1]}-channel '{got[0]}' inputs "
                    f"but task '{first_key}' ('{mt.tasks[first_key].task.name}') {want[1]}-channel "
                    f"'{want[0]}' inputs; a shared trunk needs the same kind of input from every task",
                )
            )
    return problems


def _check_weightings(mt: MultitaskSpec) -> Problems:
    """Build every weighting for the task keys, so bad options are refused before any trial runs."""
    from transferlab.engine.weightings import build_weighting

    problems: Problems = []
    for i, ref in enumerate(mt.weightings):
        try:
            build_weighting(ref.name, list(mt.tasks), ref.options)
        except (TypeError, ValueError) as exc:
            message = str(exc)
            if not message.startswith(f"weighting '{ref.name}'"):
                message = f"weighting '{ref.name}': {message}"
            problems.append((f"multitask.weightings.{i}", message))
    return problems


def _check_conditions(mt: MultitaskSpec) -> Problems:
    """Conditions (``<weighting>``, ``single:<key>``) must fit the store's condition column."""
    names = list(mt.weighting_conditions())
    if mt.single_task_baselines:
        names += [f"{SINGLE_PREFIX}{key}" for key in mt.tasks]
    too_long = [n for n in names if len(n) > CONDITION_MAX_LENGTH]
    if not too_long:
        return []
    return [
        (
            "multitask.weightings",
            f"conditions {too_long} are longer than {CONDITION_MAX_LENGTH} characters, the most the store "
            "keeps; register the weighting under a shorter name",
        )
    ]


def _check_trunk_weights(mt: MultitaskSpec, backbone_options: dict[str, Any]) -> Problems:
    """A frozen shared trunk must start from trained weights: frozen random features help no task."""
    from transferlab.engine.assembly import uses_pretrained_weights

    frozen = [d for d in mt.freeze_depths if d > 0]
    if not frozen or uses_pretrained_weights(backbone_options):
        return []
    return [
        (
            "multitask.freeze_depths",
            f"depths {frozen} freeze the first stages of the shared trunk, but the backbone starts from "
            "random weights: give it trunk weights (backbone `weights: PATH`, a pretrained file or the "
            "checkpoint of a base net or a multitask trial, or `pretrained: true`), or use depth 0",
        )
    ]
