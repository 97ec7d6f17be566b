"""The head contract: built from feature_info and a task's target, outputs the task's loss accepts."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from transferlab.backbones.base import Backbone
from transferlab.engine.assembly import build_backbone, build_task, check_options
from transferlab.engine.contract.checks import (
    BATCH,
    CheckResult,
    Checks,
    ContractViolation,
    Stop,
    describe_error,
    isolated,
    loss_and_metrics,
    signature,
)
from transferlab.engine.fit import iterate_batches
from transferlab.engine.model import TransferModel
from transferlab.registry import HEADS, TASKS, UnknownPluginError
from transferlab.tasks.base import TargetSpec, Task

# Target kinds a task's ``target`` option may offer (see transferlab.tasks.base.TargetSpec).
TARGET_KINDS = ("label", "mask", "box", "caption", "image")
# The backbone heads are checked on: small, built-in, 2-D, with BatchNorm.
PROBE_BACKBONE = ("convnet", {"widths": [8, 16, 16]})


@dataclass
class _Pairing:
    """One task a head is tried with: a batch, the probe backbone, and the head or why it failed."""

    task_name: str
    task: Task
    batch: dict[str, Any]
    backbone: Backbone
    head: nn.Module | None = None
    error: str = ""
    variant: bool = False  # built with a ``target`` option other than the task's default


def check_head(
    name: str, *, tasks: Sequence[str] | None = None, options: Mapping[str, Any] | None = None
) -> list[CheckResult]:
    """Build head ``name`` for each registered task whose target kind it declares (or ``tasks``).

    The head sits on a small ``convnet``; a validation batch of each task goes through it, label
    targets must give ``logits`` of shape (N, num_classes), and the task's loss (finite, reaching the
    head's parameters) and metrics must accept the output. A head that declares no ``target_kinds``
    is tried with every task.
    """
    factory = HEADS.get(name)
    options = dict(options or {})
    checks = Checks()
    with isolated():
        with checks.check("factory takes (feature_info, target) and the options", required=True) as note:
            params = list(inspect.signature(factory).parameters.values())
            positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            if len(positional) < 2 and not any(p.kind is p.VAR_POSITIONAL for p in params):
                raise ContractViolation(
                    f"{signature(factory)}: transferlab calls factory(feature_info, target, **options); "
                    "take those two positionally"
                )
            check_options("head", name, factory, options)
            note.text = signature(factory)
        pairings, skipped = _pair(factory, options, tasks)
        for pairing in _compatible(checks, pairings, skipped, explicit=tasks is not None):
            _check_on_task(checks, pairing)
    return checks.results


def _pair(
    factory: Callable[..., Any], options: dict[str, Any], tasks: Sequence[str] | None
) -> tuple[list[_Pairing], list[str]]:
    """Build the head for each task; tasks that fail themselves are skipped, with the reason."""
    pairings, skipped = [], []
    for task_name, task_options in _task_variants(tasks if tasks is not None else TASKS.names()):
        label = task_name + "".join(f" {k}={v}" for k, v in task_options.items())
        try:
            task = build_task(task_name, task_options)
            batch = next(iterate_batches(task.dataset("val"), BATCH, shuffle=False, generator=None))
            x = batch.get(task.target.input_key)
            if not isinstance(x, Tensor) or x.ndim != 4:
                skipped.append(f"{label} (its inputs are not images)")
                continue
            backbone = build_backbone(*PROBE_BACKBONE, task.target)
        except UnknownPluginError:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken task is not the head's fault
            skipped.append(f"{label} (the task fails: {describe_error(exc)})")
            continue
        pairing = _Pairing(label, task, batch, backbone, variant=bool(task_options))
        try:
            pairing.head = factory(backbone.feature_info, task.target, **options)
        except Exception as exc:  # noqa: BLE001 - reported by the checks
            pairing.error = describe_error(exc)
        pairings.append(pairing)
    return pairings, skipped


def _task_variants(names: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """Each task with its default options, and once per other target kind its ``target`` option takes.

    A task such as ``shapes`` provides a label by default and a mask, box, caption or image on
    request; a head of any of those kinds then finds it. Kinds a task refuses are left out.
    """
    variants: list[tuple[str, dict[str, Any]]] = []
    for name in names:
        variants.append((name, {}))
        with suppress(UnknownPluginError):
            if "target" not in inspect.signature(TASKS.get(name)).parameters:
                continue
            default = inspect.signature(TASKS.get(name)).parameters["target"].default
            for kind in TARGET_KINDS:
                if kind != default and _accepts_target(name, kind):
                    variants.append((name, {"target": kind}))
    return variants


def _accepts_target(name: str, kind: str) -> bool:
    """Whether task ``name`` builds with ``target: kind`` (cheap: no data is generated yet)."""
    try:
        build_task(name, {"target": kind})
    except Exception:  # noqa: BLE001 - a refused target kind is simply not offered
        return False
    return True


def _compatible(
    checks: Checks, pairings: list[_Pairing], skipped: list[str], *, explicit: bool
) -> list[_Pairing]:
    """The pairings whose target kind the head declares (all of them if it declares none)."""
    built = [p.head for p in pairings if p.head is not None]
    declared = tuple(getattr(built[0], "target_kinds", ())) if built else ()
    # A task's extra target variants (``shapes target=mask``) are only tried for a head of that kind.
    pairings = [p for p in pairings if not p.variant or p.task.target.kind in declared]
    if explicit or not declared:
        compatible = pairings
    else:
        compatible = [p for p in pairings if p.task.target.kind in declared]
    skip_note = f"; skipped {', '.join(skipped)}" if skipped else ""
    with checks.check("pairs with tasks", required=True) as note:
        if not compatible:
            tried = ", ".join(f"{p.task_name} ({p.task.target.kind}): {p.error or 'built'}" for p in pairings)
            raise ContractViolation(
                f"no task to check it with; target_kinds {declared}; tried {tried or 'no task'}{skip_note}"
            )
        others = [f"{p.task_name} ({p.task.target.kind})" for p in pairings if p not in compatible]
        note.text = (
            f"target_kinds {declared}" if declared else "declares no target_kinds, so every task is tried"
        )
        note.text += f"; checked on {', '.join(p.task_name for p in compatible)}"
        note.text += (f"; not its kind: {', '.join(others)}" if others else "") + skip_note
    return compatible


def _check_on_task(checks: Checks, pairing: _Pairing) -> None:
    task, batch, name = pairing.task, pairing.batch, pairing.task_name
    target = task.target
    with suppress(Stop):  # a failure on one task does not stop the checks on the next
        with checks.check(f"builds for {name} ({target.kind})", required=True) as note:
            if pairing.head is None:
                raise ContractViolation(f"factory(feature_info, target) raised {pairing.error}")
            if not isinstance(pairing.head, nn.Module):
                raise ContractViolation(
                    f"the factory returned {type(pairing.head).__name__}, not an nn.Module"
                )
            note.text = type(pairing.head).__name__
        model = TransferModel(pairing.backbone, pairing.head, input_key=target.input_key).train()
        with checks.check(f"output on {name}", required=True) as note:
            outputs = model(batch)
            if not isinstance(outputs, dict) or not outputs:
                raise ContractViolation(
                    f"forward returned {type(outputs).__name__}; return a dict of tensors"
                )
            bad = [k for k, v in outputs.items() if not isinstance(v, Tensor)]
            if bad:
                raise ContractViolation(f"outputs {bad} are not tensors")
            if target.kind == "label":
                _check_logits(outputs, len(batch[target.input_key]), target)
            note.text = ", ".join(f"{k} {tuple(v.shape)}" for k, v in outputs.items())
        with checks.check(f"loss and metrics of {name} accept the output") as note:
            note.text = loss_and_metrics(task, outputs, batch, list(pairing.head.parameters()))
        with checks.check(f"evaluation on {name}: eval-mode outputs score") as note:
            note.text = _evaluate(task, model, batch)


def _evaluate(task: Task, model: TransferModel, batch: dict[str, Any]) -> str:
    """Eval mode, as validation and test run it (decoding, a VAE's mean): loss and every metric."""
    import torch

    model.eval()
    with torch.no_grad():
        outputs = model(batch)
        loss = task.loss(outputs, batch)
        metrics = task.metrics()
        task.update_metrics(metrics, outputs, batch)
        values = {k: m.compute() for k, m in metrics.items()}
    if not torch.isfinite(loss):
        raise ContractViolation(f"eval-mode loss is {loss.item()}")
    if task.primary_metric not in values:
        raise ContractViolation(
            f"eval-mode metrics {sorted(values)} lack the primary '{task.primary_metric}'"
        )
    bad = [k for k, v in values.items() if isinstance(v, Tensor) and not torch.isfinite(v).all()]
    if bad:
        raise ContractViolation(f"eval-mode metrics {bad} computed non-finite values")
    return f"{task.primary_metric} {float(values[task.primary_metric]):.3g}"


def _check_logits(outputs: dict[str, Tensor], n: int, target: TargetSpec) -> None:
    if "logits" not in outputs:
        raise ContractViolation(
            f"no 'logits' in the outputs ({', '.join(outputs)}); label tasks read outputs['logits']"
        )
    expected = (n, target.num_classes)
    if tuple(outputs["logits"].shape) != expected:
        raise ContractViolation(
            f"logits have shape {tuple(outputs['logits'].shape)}, expected {expected} = (N, num_classes)"
        )
