"""Multitask training: one shared trunk, one head per task, the losses combined by a ``Weighting``.

Each step takes one batch from every task's training set (a shorter set starts over, reshuffled; an
epoch is as many steps as the longest set has batches). The trunk runs once per step: on the one
input tensor when the tasks' training sets hold the same inputs (the same images with other targets,
such as ``shapes`` with ``target: label``, ``mask`` and ``box`` at one seed: then one batch of
samples serves every task), else on the concatenation of same-shaped inputs (features are split
back per task), else once per task. The weighting does the backward pass, so PCGrad and GradNorm
can work on the shared parameters' gradients.

Mixed precision is bfloat16 autocast only: fp16 loss scaling would scale what the strategies compare
(uncertainty's regulariser, GradNorm's gradient norms), so on a GPU without bfloat16 AMP is off.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from transferlab.backbones.base import Backbone
from transferlab.engine.assembly import build_backbone, build_head, build_task
from transferlab.engine.checkpoint import save_checkpoint
from transferlab.engine.feature_cache import FeatureCache
from transferlab.engine.fit import (
    EpochCallback,
    FitConfig,
    FitResult,
    NonFiniteLossError,
    build_optimizer,
    build_schedule,
    cuda_memory_facts,
    iterate_batches,
    load_optimizer_state,
    load_training_state,
    resolve_device,
    save_training_state,
    start_cuda_memory,
    use_channels_last,
)
from transferlab.engine.model import TransferModel
from transferlab.engine.multitask_batches import (
    Batches,
    aligned_batches,
    batches_to_device,
    cycled_batches,
    same_inputs,
)
from transferlab.engine.weightings import Weighting, build_weighting
from transferlab.tasks.base import SPLITS, Task, stable_hash

#: Why a multitask trial records the frozen-prefix feature cache as off (only ``fit`` has one).
MULTITASK_NO_CACHE = "multitask: fit_multitask runs the frozen stages every step (no feature cache)"


class MultitaskModel(TransferModel):
    """``backbone -> {key: head}``: one trunk with ``TransferModel``'s frozen prefix, one head per task.

    State dict keys are ``backbone.stages.<i>.*`` (so ``load_backbone_stages`` and a backbone's
    ``weights: PATH`` accept a multitask checkpoint) and ``heads.<key>.*``.

    Args:
        backbone: A ``Backbone``.
        heads: A head per task key, each built from ``backbone.feature_info``.
        freeze_depth: Number of leading stages to freeze (0 = none, ``len(stages)`` = all).
        bn_policy: "frozen" or "train", as for ``TransferModel``.
        input_key: The batch field fed to the backbone (the same for every task).
    """

    def __init__(
        self,
        backbone: Backbone,
        heads: Mapping[str, nn.Module],
        *,
        freeze_depth: int = 0,
        bn_policy: str = "frozen",
        input_key: str = "image",
    ) -> None:
        # TransferModel's freezing and trunk methods apply as they are; only its single ``head`` is
        # replaced by ``heads``, so its __init__ is skipped.
        nn.Module.__init__(self)
        if not heads:
            raise ValueError("a multitask model needs at least one head")
        self.backbone = backbone
        self.heads = nn.ModuleDict()
        for key, head in heads.items():
            try:
                self.heads[key] = head
            except (KeyError, TypeError) as exc:
                raise ValueError(f"task key {key!r} cannot name a head: {exc}") from None
        self.input_key = input_key
        self.freeze_depth = 0
        self.bn_policy = "frozen"
        self.set_freeze(freeze_depth, bn_policy)

    def forward(self, batch: dict[str, Any], key: str) -> dict[str, Tensor]:  # type: ignore[override]
        """Outputs of task ``key``'s head on ``batch``."""
        return self.heads[key](self.forward_features(batch[self.input_key]), batch)

    def forward_all(self, batches: Batches) -> dict[str, dict[str, Tensor]]:
        """Outputs of each task's head on its batch (keys of ``batches``), running the trunk as few times as
        the inputs allow (see the module docstring)."""
        features = self.shared_features({k: b[self.input_key] for k, b in batches.items()})
        return {k: self.heads[k](features[k], batches[k]) for k in batches}

    def shared_features(self, inputs: Mapping[str, Tensor]) -> dict[str, list[Tensor]]:
        """Trunk features of each task's input: one pass over one shared tensor or over the
        concatenation of same-shaped inputs, split back per task; else one pass per task."""
        tensors = list(inputs.values())
        if all(t is tensors[0] for t in tensors):
            features = self.forward_features(tensors[0])
            return {k: features for k in inputs}
        if all(t.shape[1:] == tensors[0].shape[1:] for t in tensors):
            sizes = [len(t) for t in tensors]
            parts = [f.split(sizes) for f in self.forward_features(torch.cat(tensors))]
            return {k: [p[i] for p in parts] for i, k in enumerate(inputs)}
        return {k: self.forward_features(t) for k, t in inputs.items()}

    def head_modules(self) -> nn.Module:
        """Every task's head, so the inherited ``stage_parameter_groups`` puts all of them in "head"."""
        return self.heads

    def shared_parameters(self) -> list[nn.Parameter]:
        """The trunk's trainable parameters, in stage order (what PCGrad and GradNorm act on)."""
        return [p for p in self.backbone.parameters() if p.requires_grad]


def build_multitask_model(
    backbone: tuple[str, Mapping[str, Any]],
    heads: Mapping[str, tuple[str, Mapping[str, Any]]],
    tasks: Mapping[str, Task],
    *,
    freeze_depth: int = 0,
    bn_policy: str = "frozen",
) -> MultitaskModel:
    """A ``MultitaskModel`` with one head per task from (name, options) pairs.

    Raises:
        ValueError: The heads and tasks have other keys, or a task feeds the trunk another input
            (batch field or channels) than the first task.
    """
    if not tasks or list(heads) != list(tasks):
        raise ValueError(
            f"a multitask model needs one head per task: heads {list(heads)}, tasks {list(tasks)}"
        )
    first_key, first = next(iter(tasks.items()))
    for key, task in tasks.items():
        t, f = task.target, first.target
        if (t.input_key, t.in_channels) != (f.input_key, f.in_channels):
            raise ValueError(
                f"task '{key}' feeds the backbone {t.in_channels}-channel '{t.input_key}' inputs, but task "
                f"'{first_key}' feeds {f.in_channels}-channel '{f.input_key}' inputs; the tasks of a "
                "multitask study share one trunk, so they need the same kind of input"
            )
    trunk = build_backbone(backbone[0], backbone[1], first.target)
    built = {k: build_head(heads[k][0], heads[k][1], trunk.feature_info, t.target) for k, t in tasks.items()}
    return MultitaskModel(
        trunk, built, freeze_depth=freeze_depth, bn_policy=bn_policy, input_key=first.target.input_key
    )


# -- the loop ----------------------------------------------------------------------------------------


class Tally:
    """Each task's sample-weighted mean loss and its metric objects over one pass."""

    def __init__(self, tasks: Mapping[str, Task], device: torch.device) -> None:
        self.tasks = tasks
        self.metrics = {k: {n: m.to(device) for n, m in t.metrics().items()} for k, t in tasks.items()}
        self.sums = {k: [0.0, 0] for k in tasks}

    def add(self, key: str, loss: float, outputs: dict[str, Tensor], batch: dict[str, Any], n: int) -> None:
        self.sums[key][0] += loss * n
        self.sums[key][1] += n
        self.tasks[key].update_metrics(self.metrics[key], outputs, batch)

    def values(self) -> dict[str, float]:
        """``<key>/loss`` and ``<key>/<metric>`` of every task."""
        out: dict[str, float] = {}
        for key, (total, count) in self.sums.items():
            out[f"{key}/loss"] = total / max(count, 1)
            out.update({f"{key}/{name}": float(m.compute()) for name, m in self.metrics[key].items()})
        return out


def selection_score(tasks: Mapping[str, Task], values: Mapping[str, float]) -> float:
    """Mean over tasks of the primary metric, negated where lower is better: higher is better."""
    signed = [
        (1.0 if t.higher_is_better else -1.0) * values[f"{k}/{t.primary_metric}"] for k, t in tasks.items()
    ]
    return sum(signed) / len(signed)


class MultitaskLoop:
    """What one ``fit_multitask`` run trains with (device, optimiser, data) and its model selection."""

    def __init__(
        self, model: MultitaskModel, tasks: Mapping[str, Task], weighting: Weighting, config: FitConfig
    ) -> None:
        self.model, self.tasks, self.weighting, self.config = model, tasks, weighting, config
        self.device = resolve_device(config.device)
        model.to(self.device)
        if use_channels_last(config, self.device):  # as fit does: 4-D weights in NHWC memory format
            model.to(memory_format=torch.channels_last)
        weighting.to(self.device)
        self.use_amp = config.amp and self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.optimizer = build_optimizer(model, config)
        extra = weighting.optimised_parameters()
        if extra:  # e.g. uncertainty's log-variances: no weight decay, which would pull them to 0
            self.optimizer.add_param_group(
                {"params": extra, "lr": config.lr, "weight_decay": 0.0, "name": "weighting"}
            )
        self.schedule = build_schedule(self.optimizer, config)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.data = {s: {k: t.dataset(s) for k, t in tasks.items()} for s in SPLITS}
        self.shared = {s: same_inputs(list(d.values()), model.input_key) for s, d in self.data.items()}
        self.best_score, self.stale = -math.inf, 0
        self.best_state: dict[str, Tensor] | None = None

    def autocast(self) -> Any:
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.use_amp)

    def batches(self, split: str) -> Iterator[Batches]:
        """Training batches (shuffled, one per task per step) or evaluation batches (in order)."""
        data, key, workers = self.data[split], self.model.input_key, self.config.num_workers
        train = split == "train"
        size = self.config.batch_size if train else self.config.eval_batch_size
        if self.shared[split]:
            yield from aligned_batches(data, size, key, self.generator if train else None)  # type: ignore[arg-type]
        elif train:
            yield from cycled_batches(data, size, self.generator, workers)
        else:
            for task_key, dataset in data.items():
                for batch in iterate_batches(
                    dataset, size, shuffle=False, generator=None, num_workers=workers
                ):
                    yield {task_key: batch}

    def train_epoch(self, epoch: int, steps: int) -> tuple[dict[str, float], int]:
        """One pass over the training data; returns (train row, total steps so far).

        Raises:
            NonFiniteLossError: A task's loss, or the combined loss, became NaN or infinite.
        """
        model, tasks = self.model.train(), self.tasks
        tally, combined, count = Tally(tasks, self.device), 0.0, 0
        applied = dict.fromkeys(tasks, 0.0)  # sums of the weights each step applied
        shared = model.shared_parameters()
        for batches in self.batches("train"):
            batches = batches_to_device(batches, self.device, model.input_key)
            with self.autocast():
                outputs = model.forward_all(batches)
                losses = {k: tasks[k].loss(outputs[k], batches[k]) for k in batches}
            steps += 1
            values = {k: float(loss.detach()) for k, loss in losses.items()}
            for value in values.values():
                if not math.isfinite(value):
                    raise NonFiniteLossError(epoch, steps, value)
            self.optimizer.zero_grad(set_to_none=True)
            # Read before the step: the weights this backward pass applies (GradNorm and uncertainty
            # change theirs during the step).
            for k, w in self.weighting.weights().items():
                applied[k] += w
            total = float(self.weighting.backward(losses, shared))
            if not math.isfinite(total):
                raise NonFiniteLossError(epoch, steps, total)
            self.optimizer.step()
            combined, count = combined + total, count + 1
            for k, batch in batches.items():
                tally.add(k, values[k], outputs[k], batch, len(batch[model.input_key]))
        row = {"train/loss": combined / max(count, 1)}
        row.update({f"train/{k}": v for k, v in tally.values().items()})
        row.update({f"train/weight/{k}": w / max(count, 1) for k, w in applied.items()})
        return row, steps

    def evaluate(self, split: str) -> dict[str, float]:
        """``<key>/loss``, ``<key>/<metric>`` and ``score`` on ``split``, in eval mode without gradients."""
        self.model.eval()
        tally = Tally(self.tasks, self.device)
        with torch.no_grad():
            for batches in self.batches(split):
                batches = batches_to_device(batches, self.device, self.model.input_key)
                with self.autocast():
                    outputs = self.model.forward_all(batches)
                for k, batch in batches.items():
                    loss = float(self.tasks[k].loss(outputs[k], batch))
                    tally.add(k, loss, outputs[k], batch, len(batch[self.model.input_key]))
        values = tally.values()
        values["score"] = selection_score(self.tasks, values)
        return values

    def run_epoch(self, epoch: int, steps: int) -> tuple[dict[str, float], int]:
        """Train (logging the mean weights applied), let the weighting see the epoch, step the schedule,
        validate."""
        row, steps = self.train_epoch(epoch, steps)
        self.weighting.end_epoch({k: row[f"train/{k}/loss"] for k in self.tasks})
        lr_used = next(g["lr"] for g in self.optimizer.param_groups if g["name"] == "head")
        if self.schedule is not None:
            self.schedule.step()
        row.update({f"val/{k}": v for k, v in self.evaluate("val").items()})
        row["lr"] = lr_used
        return row, steps

    def track_best(self, epoch: int, score: float, result: FitResult) -> None:
        """Early-stopping bookkeeping on the validation score."""
        if score > self.best_score:
            self.best_score, result.best_epoch, self.stale = score, epoch, 0
            if self.config.early_stopping_patience is not None:
                self.best_state = copy.deepcopy(self.model.state_dict())
        else:
            self.stale += 1

    def state(self, epoch: int, result: FitResult) -> dict[str, Any]:
        """Everything needed to continue after ``epoch`` exactly (tensors and plain values only)."""
        return {
            "epoch": epoch,
            "model": self.model.state_dict(),
            "weighting": self.weighting.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict() if self.schedule is not None else {},
            "generator": self.generator.get_state(),
            "history": result.history,
            "steps": result.steps,
            "best_epoch": result.best_epoch,
            "best_score": self.best_score,
            "stale": self.stale,
            "best_state": self.best_state,
        }

    def restore(self, saved: dict[str, Any], result: FitResult) -> None:
        """Continue from a saved ``state``."""
        self.model.load_state_dict(saved["model"])
        self.weighting.load_state_dict(saved["weighting"])
        load_optimizer_state(self.optimizer, saved["optimizer"])
        if self.schedule is not None:
            self.schedule.load_state_dict(saved["schedule"])
        self.generator.set_state(saved["generator"])
        result.history, result.steps = list(saved["history"]), int(saved["steps"])
        result.best_epoch = int(saved["best_epoch"])
        result.resumed_from = result.epochs_run = int(saved["epoch"])
        self.best_score, self.stale = float(saved["best_score"]), int(saved["stale"])
        self.best_state = saved["best_state"]


def check_keys(model: MultitaskModel, tasks: Mapping[str, Task], weighting: Weighting) -> None:
    """The model's heads, the tasks and the weighting must name the same task keys."""
    heads, weighted = set(model.heads), set(weighting.task_keys)
    if not (set(tasks) == heads == weighted):
        raise ValueError(
            f"task keys differ: tasks {sorted(tasks)}, model heads {sorted(heads)}, "
            f"weighting {sorted(weighted)}"
        )


def fit_multitask(
    model: MultitaskModel,
    tasks: Mapping[str, Task],
    weighting: Weighting,
    config: FitConfig,
    *,
    on_epoch: EpochCallback | None = None,
    checkpoint_path: str | Path | None = None,
    checkpoint_metadata: dict[str, Any] | None = None,
    resume_path: str | Path | None = None,
) -> FitResult:
    """Train ``model``'s heads jointly on ``tasks`` with ``weighting`` and evaluate each task.

    Rows passed to ``on_epoch(epoch, row)``: ``train/loss`` (combined), ``train/<key>/loss``,
    ``train/<key>/<metric>``, ``train/weight/<key>`` (the mean over the epoch's steps of the weight
    each step applied), ``lr``, ``val/<key>/loss``,
    ``val/<key>/<metric>`` and ``val/score`` (mean of each task's primary metric, negated where lower is
    better), which early stopping and the best epoch follow. ``FitResult.test`` has the same keys
    without the split. Resuming works as in ``fit`` (the weighting's state is saved too).
    ``FitResult.feature_cache`` says the frozen-prefix feature cache is off (``fit`` only).

    Raises:
        NonFiniteLossError: A loss became NaN or infinite.
    """
    started = time.perf_counter()
    check_keys(model, tasks, weighting)
    device = resolve_device(config.device)
    held_at_start = start_cuda_memory(device)
    loop = MultitaskLoop(model, tasks, weighting, config)
    # The same facts as fit's cache and data decisions, so multitask and single-task trials record the
    # same keys (multitask data stays on the host: its batches are drawn per task, see cycled_batches).
    result = FitResult(
        feature_cache=FeatureCache(False, MULTITASK_NO_CACHE).report(),
        device={"device": str(device), "data_on_device": False},
    )
    resume_file = Path(resume_path) if resume_path is not None else None
    saved = load_training_state(resume_file) if resume_file is not None else None
    if saved is not None:  # continue an interrupted run; report the earlier epochs again
        loop.restore(saved, result)
        for epoch, row in enumerate(result.history, start=1):
            if on_epoch is not None:
                on_epoch(epoch, row)

    for epoch in range(result.epochs_run + 1, config.epochs + 1):
        row, result.steps = loop.run_epoch(epoch, result.steps)
        result.history.append(row)
        result.epochs_run = epoch
        loop.track_best(epoch, row["val/score"], result)
        if resume_file is not None:
            save_training_state(resume_file, loop.state(epoch, result))
        if on_epoch is not None:
            on_epoch(epoch, row)
        if config.early_stopping_patience is not None and loop.stale >= config.early_stopping_patience:
            break

    result.test_epoch = result.epochs_run
    if loop.best_state is not None:  # test and save the weights of the best validation epoch
        model.load_state_dict(loop.best_state)
        result.test_epoch = result.best_epoch
    result.test = loop.evaluate("test")
    result.device.update(cuda_memory_facts(device, held_at_start))
    if checkpoint_path is not None:
        meta = dict(checkpoint_metadata or {}, epoch=result.test_epoch)
        result.checkpoint = save_checkpoint(model, checkpoint_path, meta)
    result.seconds = time.perf_counter() - started
    return result


def run_multitask_trial(
    config: dict[str, Any],
    *,
    checkpoint_path: str | Path | None = None,
    on_epoch: EpochCallback | None = None,
    threads: int | None = None,
) -> tuple[FitResult, dict[str, Any]]:
    """Build a multitask trial's tasks, model and weighting, copy base stages, train and evaluate.

    Args:
        config: The planner's multitask trial config (``study: multitask``, ``tasks`` with a task and a
            head per key, ``weighting``, ``backbone``, ``train``, freeze/copy depths, ``seed``).
        checkpoint_path: Where to write the trained weights.
        on_epoch: Per-epoch metrics callback.
        threads: Torch intra-op threads (the trial's CPU share).

    Returns:
        The fit result and facts for provenance: the keys ``run_trial`` returns (data hash, copied
        tensors, stages, resumed epoch, torch threads, the feature cache's facts: off, "multitask").
    """
    from transferlab.engine.trial import (
        copy_base_stages,
        finish_facts,
        fit_config,
        resume_path_for,
        start_trial,
    )

    if config.get("augment"):
        raise ValueError(f"trial {config.get('trial_key')}: multitask trials do not support augment yet")
    start_trial(config, threads)
    specs = config["tasks"]
    tasks = {
        k: build_task(s["task"]["name"], s["task"].get("options"), classes=config.get("classes"))
        for k, s in specs.items()
    }
    model = build_multitask_model(
        (config["backbone"]["name"], config["backbone"].get("options") or {}),
        {k: (s["head"]["name"], s["head"].get("options") or {}) for k, s in specs.items()},
        tasks,
        freeze_depth=int(config.get("freeze_depth", 0)),
        bn_policy=config.get("bn_policy", "frozen"),
    )
    copied = copy_base_stages(model, config)
    spec = config["weighting"]
    weighting = build_weighting(spec["name"], list(tasks), spec.get("options"))
    facts = {
        "data_hash": stable_hash({k: t.fingerprint() for k, t in tasks.items()}),
        "copied_tensors": len(copied),
        "num_stages": model.backbone.num_stages,
    }
    resume_path = resume_path_for(checkpoint_path)
    result = fit_multitask(
        model,
        tasks,
        weighting,
        fit_config(config, model.backbone.num_stages),
        on_epoch=on_epoch,
        checkpoint_path=checkpoint_path,
        checkpoint_metadata={"trial_key": config.get("trial_key"), "freeze_depth": model.freeze_depth},
        resume_path=resume_path,
    )
    return result, finish_facts(result, facts, resume_path)
