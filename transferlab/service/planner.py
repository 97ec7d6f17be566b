"""Turn a validated spec into a trial graph.

Transfer study (Yosinski et al. 2014), per class split and seed:

| condition | trains on | stages 1..n copied from | stages 1..n during training |
|---|---|---|---|
| baseA / baseB | A / B | - (random init) | trained |
| AnB / AnB+ | B | baseA | frozen / fine-tuned |
| BnB / BnB+ | B | baseB (the "selffer" control) | frozen / fine-tuned |
| random | B | - (random init) | frozen (random features) |

Cross-task transfer (``transfer.source``): baseA trains on the source task with the source head, every
other trial on the spec's task and head; stages copy across because both tasks feed the backbone the
same kind of input. Without a class split, A and B are every class of their task.

Multitask study, per seed and freeze depth: one trial per loss weighting (role ``multitask``,
condition = the weighting's name) that trains every task's head on the shared trunk, and, with
``single_task_baselines``, one ordinary single-task trial per task (role ``single``, condition
``single:<key>``) on the same backbone, depth, seed and budget. Nothing is copied between them.

Ray Tune has no trial dependencies, so the planner owns the graph: each trial has a ``level``
(0 = needs nothing, 1 = needs a base net) and ``base_key`` names the trial it copies from.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from transferlab.service.spec import MULTITASK_METRIC, SINGLE_PREFIX, ValidatedSpec

COPY_FROM = {"AnB": "baseA", "AnB+": "baseA", "BnB": "baseB", "BnB+": "baseB"}


@dataclass(frozen=True)
class PlannedTrial:
    """One node of the trial graph."""

    key: str
    role: str
    condition: str
    depth: int
    seed: int
    split: str
    classes: tuple[int, ...] | None
    freeze_depth: int
    copy_depth: int
    base_key: str | None
    bn_policy: str
    #: Trained on the spec's ``transfer.source`` task and head (base net A of a cross-task study).
    on_source: bool = False
    #: Multitask study: the task a single-task baseline trains on.
    task_key: str | None = None
    #: Multitask study: the index in ``multitask.weightings`` of a multitask trial's weighting.
    weighting_index: int | None = None

    @property
    def level(self) -> int:
        return 0 if self.base_key is None else 1

    def display_name(self, experiment: str) -> str:
        """A descriptive name for Ray's dashboard and logs."""
        split = "" if self.split in ("given", "all") else f"-{self.split}"
        return f"{experiment}-{self.condition}-d{self.depth}-s{self.seed}{split}"

    def config(self, vspec: ValidatedSpec) -> dict[str, Any]:
        """The plain-dict config a trial runs from (JSON-serialisable; no paths yet).

        ``primary_metric`` is the metric of the task this trial trains on: the source task's for
        base net A of a cross-task study, its task's for a multitask study's single-task baseline,
        the experiment's for every other trial.
        """
        spec = vspec.spec
        if self.weighting_index is not None:
            return self._multitask_config(vspec)
        task, head, metric = self._task_head_metric(vspec)
        return {
            "trial_key": self.key,
            "role": self.role,
            "condition": self.condition,
            "depth": self.depth,
            "seed": self.seed,
            "split": self.split,
            "classes": list(self.classes) if self.classes is not None else None,
            "freeze_depth": self.freeze_depth,
            "copy_depth": self.copy_depth,
            "bn_policy": self.bn_policy,
            "fine_tune_lr_mult": spec.transfer.fine_tune_lr_mult if spec.transfer else 1.0,
            "backbone": {"name": spec.backbone.name, "options": vspec.backbone_options},
            "head": head,
            "task": task,
            "primary_metric": metric,
            "train": spec.train.model_dump(),
            "augment": [step.model_dump() for step in spec.augment],  # [] = no augmentation
        }

    def _task_head_metric(self, vspec: ValidatedSpec) -> tuple[dict[str, Any], dict[str, Any], str]:
        """The task and head (as ``{"name", "options"}``) this trial trains, and their primary metric."""
        spec = vspec.spec
        if self.task_key is not None:  # a multitask study's single-task baseline
            f = vspec.multitask_tasks[self.task_key]
            task, head = (f.task_name, f.task_options), (f.head_name, f.head_options)
            metric = f.primary_metric
        elif self.on_source and spec.transfer is not None and spec.transfer.source is not None:
            source = spec.transfer.source
            task, head = (
                (source.task.name, vspec.source_task_options),
                (source.head.name, source.head.options),
            )
            metric = vspec.source_primary_metric or vspec.primary_metric
        else:
            task = (spec.study_task.name, vspec.task_options)
            head, metric = (spec.head.name, spec.head.options), vspec.primary_metric
        return {"name": task[0], "options": task[1]}, {"name": head[0], "options": head[1]}, metric

    def _multitask_config(self, vspec: ValidatedSpec) -> dict[str, Any]:
        """The config of a multitask trial, read by ``transferlab.engine.multitask.run_multitask_trial``.

        ``task_metrics`` (each task's primary metric and direction) is for the reports; the engine
        derives both from the tasks it builds.
        """
        spec = vspec.spec
        assert spec.multitask is not None and self.weighting_index is not None
        weighting = spec.multitask.weightings[self.weighting_index]
        tasks = vspec.multitask_tasks
        return {
            "study": "multitask",
            "trial_key": self.key,
            "role": self.role,
            "condition": self.condition,
            "depth": self.depth,
            "seed": self.seed,
            "split": self.split,
            "classes": None,
            "freeze_depth": self.freeze_depth,
            "copy_depth": 0,
            "bn_policy": self.bn_policy,
            "backbone": {"name": spec.backbone.name, "options": vspec.backbone_options},
            "tasks": {
                key: {
                    "task": {"name": f.task_name, "options": f.task_options},
                    "head": {"name": f.head_name, "options": f.head_options},
                }
                for key, f in tasks.items()
            },
            "weighting": {"name": weighting.name, "options": weighting.options},
            "train": spec.train.model_dump(),
            "primary_metric": MULTITASK_METRIC,
            "task_metrics": {
                key: {"primary_metric": f.primary_metric, "higher_is_better": f.higher_is_better}
                for key, f in tasks.items()
            },
        }


def _key(split: str, seed: int, condition: str, depth: int) -> str:
    return f"{split}/s{seed}/{condition}/d{depth}"


def plan_trials(vspec: ValidatedSpec) -> list[PlannedTrial]:
    """Every trial of the study, base nets before the transfer nets that copy them."""
    spec = vspec.spec
    trials: list[PlannedTrial] = []
    if spec.study == "multitask":
        return _plan_multitask(vspec)
    if spec.study == "single":
        assert spec.single is not None
        classes = tuple(spec.single.classes) if spec.single.classes is not None else None
        for seed in spec.seeds:
            d = spec.single.freeze_depth
            trials.append(
                PlannedTrial(
                    _key("all", seed, "single", d),
                    "single",
                    "single",
                    d,
                    seed,
                    "all",
                    classes,
                    d,
                    0,
                    None,
                    spec.single.bn,
                )
            )
        return trials

    assert spec.transfer is not None
    bn = spec.transfer.bn
    for split in vspec.splits:
        for seed in spec.seeds:
            base = {
                "baseA": PlannedTrial(
                    _key(split.id, seed, "baseA", 0),
                    "base",
                    "baseA",
                    0,
                    seed,
                    split.id,
                    split.a,
                    0,
                    0,
                    None,
                    bn,
                    on_source=spec.transfer.source is not None,
                ),
                "baseB": PlannedTrial(
                    _key(split.id, seed, "baseB", 0),
                    "base",
                    "baseB",
                    0,
                    seed,
                    split.id,
                    split.b,
                    0,
                    0,
                    None,
                    bn,
                ),
            }
            needed = {COPY_FROM[c] for c in spec.transfer.conditions if c in COPY_FROM} | {"baseB"}
            trials += [base[name] for name in ("baseA", "baseB") if name in needed]
            for depth in vspec.depths:
                for condition in spec.transfer.conditions:
                    key = _key(split.id, seed, condition, depth)
                    if condition == "random":
                        trials.append(
                            PlannedTrial(
                                key, "transfer", condition, depth, seed, split.id, split.b, depth, 0, None, bn
                            )
                        )
                        continue
                    frozen = depth if not condition.endswith("+") else 0
                    trials.append(
                        PlannedTrial(
                            key,
                            "transfer",
                            condition,
                            depth,
                            seed,
                            split.id,
                            split.b,
                            frozen,
                            depth,
                            base[COPY_FROM[condition]].key,
                            bn,
                        )
                    )
    return trials


def _plan_multitask(vspec: ValidatedSpec) -> list[PlannedTrial]:
    """Per seed and freeze depth: one trial per weighting, then one single-task baseline per task."""
    mt = vspec.spec.multitask
    assert mt is not None

    def planned(role: str, condition: str, seed: int, depth: int, **which: Any) -> PlannedTrial:
        """A trial on every task's data ("all"), its trunk frozen up to ``depth``, nothing copied."""
        key = _key("all", seed, condition, depth)
        return PlannedTrial(key, role, condition, depth, seed, "all", None, depth, 0, None, mt.bn, **which)

    trials = []
    for seed in vspec.spec.seeds:
        for depth in vspec.depths:
            for index, condition in enumerate(mt.weighting_conditions()):
                trials.append(planned("multitask", condition, seed, depth, weighting_index=index))
            if not mt.single_task_baselines:
                continue
            for task_key in mt.tasks:
                condition = f"{SINGLE_PREFIX}{task_key}"
                trials.append(planned("single", condition, seed, depth, task_key=task_key))
    return trials


def plan_summary(trials: list[PlannedTrial]) -> dict[str, Counter]:
    """Counts of trials per role, condition, depth and seed (what ``validate`` prints)."""
    return {
        "role": Counter(t.role for t in trials),
        "condition": Counter(t.condition for t in trials),
        "depth": Counter(t.depth for t in trials),
        "seed": Counter(t.seed for t in trials),
        "split": Counter(t.split for t in trials),
    }
