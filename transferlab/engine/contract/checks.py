"""Check results and the machinery that turns a plugin's exceptions into failed checks."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from transferlab.tasks.base import Task

BATCH = 4  # samples per probe batch: more than one, so BatchNorm can train


@dataclass(frozen=True)
class CheckResult:
    """One verified property of a plugin; ``detail`` says what was found (and, failed, what is wrong)."""

    name: str
    ok: bool
    detail: str


class ContractViolation(Exception):
    """A plugin does not meet its contract; the message says how."""


class Stop(Exception):
    """A check that the remaining checks need has failed."""


class Note:
    """What a passing check reports."""

    text = ""


class Checks:
    """Collects results; ``check`` turns any exception raised inside it into a failed result."""

    def __init__(self) -> None:
        self.results: list[CheckResult] = []

    @contextmanager
    def check(self, name: str, *, required: bool = False) -> Iterator[Note]:
        """Run the body as check ``name``; ``required`` stops the remaining checks when it fails."""
        note = Note()
        try:
            yield note
        except Stop:
            raise
        except ContractViolation as exc:
            self._fail(name, str(exc), required)
        except Exception as exc:  # noqa: BLE001 - a plugin's exception is a finding, not a crash
            self._fail(name, f"raised {describe_error(exc)}", required)
        else:
            self.results.append(CheckResult(name, True, note.text))

    def expect(self, name: str, problems: Sequence[str], passed: str) -> None:
        """One result from problems found elsewhere: passed when there are none."""
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        self.results.append(CheckResult(name, not problems, shown or passed))

    def _fail(self, name: str, detail: str, required: bool) -> None:
        if required:
            detail += " (the checks that need this one did not run)"
        self.results.append(CheckResult(name, False, detail))
        if required:
            raise Stop


def describe_error(exc: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters of it)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


@contextmanager
def isolated() -> Iterator[None]:
    """Seed torch, restore the caller's RNG state afterwards, and end quietly on ``Stop``."""
    with torch.random.fork_rng(devices=[]), suppress(Stop):
        torch.manual_seed(0)
        yield


def accepts(factory: Callable[..., Any], parameter: str) -> bool:
    """Whether ``factory`` takes keyword ``parameter`` (by name or through ``**kwargs``)."""
    params = inspect.signature(factory).parameters.values()
    return any(p.name == parameter or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def signature(factory: Callable[..., Any]) -> str:
    """``name(params=defaults)`` of a factory, without type annotations."""
    sig = inspect.signature(factory)
    plain = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    text = sig.replace(parameters=plain, return_annotation=inspect.Signature.empty)
    return f"{getattr(factory, '__name__', type(factory).__name__)}{text}"


def loss_and_metrics(
    task: Task, outputs: dict[str, Tensor], batch: dict[str, Any], params: Sequence[Tensor]
) -> str:
    """Check that the task's loss is finite and reaches ``params``, and that its metrics compute.

    Returns:
        A one-line summary: the loss and every scalar metric.
    """
    loss = task.loss(outputs, batch)
    if not isinstance(loss, Tensor) or loss.ndim != 0:
        raise ContractViolation(f"loss is {type(loss).__name__} {getattr(loss, 'shape', '')}, not a scalar")
    if not torch.isfinite(loss):
        raise ContractViolation(f"loss is {loss.item()}")
    loss.backward()
    grads = [p.grad for p in params if p.requires_grad]
    if grads and all(g is None for g in grads):
        raise ContractViolation("the loss does not backpropagate: no parameter received a gradient")
    if any(g is not None and not torch.isfinite(g).all() for g in grads):
        raise ContractViolation("the loss backpropagates non-finite gradients")
    metrics = task.metrics()
    task.update_metrics(metrics, {k: v.detach() for k, v in outputs.items()}, batch)
    values = {k: m.compute() for k, m in metrics.items()}
    bad = [k for k, v in values.items() if isinstance(v, Tensor) and not torch.isfinite(v).all()]
    if bad:
        raise ContractViolation(f"metrics {bad} computed non-finite values")
    shown = [f"{k} {v.item():.3g}" for k, v in values.items() if isinstance(v, Tensor) and v.numel() == 1]
    return f"loss {loss.item():.3g}" + "".join(f"; {s}" for s in shown)
