"""Loss weighting strategies of multitask training: how per-task losses become one backward pass.

A strategy is a ``Weighting`` (an ``nn.Module``) built by a factory registered in
``transferlab.registry.WEIGHTINGS`` as ``factory(task_keys, **options)``. ``fit_multitask`` calls
``weights()`` and then ``backward(losses, shared)`` once per step (after ``zero_grad``; the logged
weight of an epoch is the mean of the weights read before each step's backward pass) and
``end_epoch(mean_losses)`` after each training epoch. Parameters returned by
``optimised_parameters()`` join the model's optimiser; everything a strategy must remember to resume
exactly lives in its ``state_dict()`` (parameters, buffers and ``get_extra_state``).

Built-ins (formulas in ``docs/weightings.md``): ``equal``, ``fixed``, ``uncertainty`` (Kendall et al.
2018), ``dwa`` (Liu et al. 2019), ``gradnorm`` (Chen et al. 2018) and ``pcgrad`` (Yu et al. 2020).
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from transferlab.engine.assembly import check_options
from transferlab.registry import WEIGHTINGS

log = logging.getLogger(__name__)


def _number(name: str, option: str, value: Any, *, minimum: float, strict: bool) -> float:
    """``value`` as a finite float above (``strict``) or at least ``minimum``, else a ValueError."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and (value > minimum if strict else value >= minimum):
        return float(value)
    bound = f"> {minimum}" if strict else f">= {minimum}"
    raise ValueError(f"weighting '{name}': {option} must be a finite number {bound}, got {value!r}")


class Weighting(nn.Module):
    """Base class: a fixed weight per task and one backward pass of the weighted sum.

    Subclasses override ``loss_weights`` (weights as a tensor in task order) or ``backward`` itself
    when they manipulate gradients.

    Args:
        task_keys: The tasks' keys, in the order the weights are kept.
    """

    name = "weighting"

    def __init__(self, task_keys: Sequence[str]) -> None:
        super().__init__()
        keys = list(task_keys)
        if not keys or not all(isinstance(k, str) and k for k in keys):
            raise ValueError(f"weighting '{self.name}': task keys must be non-empty strings, got {keys!r}")
        if len(set(keys)) != len(keys):
            raise ValueError(f"weighting '{self.name}': task keys must be distinct, got {keys!r}")
        self.task_keys = keys

    def stacked(self, losses: Mapping[str, Tensor]) -> Tensor:
        """The losses as one tensor in task order; a missing or extra key is an error."""
        if set(losses) != set(self.task_keys):
            raise ValueError(
                f"weighting '{self.name}' combines the losses of tasks {self.task_keys}, got {sorted(losses)}"
            )
        return torch.stack([losses[k].float() for k in self.task_keys])

    def loss_weights(self) -> Tensor:
        """The current weight of each task in task order (1 each by default)."""
        return torch.ones(len(self.task_keys))

    def combine(self, losses: Mapping[str, Tensor]) -> Tensor:
        """The scalar the network is trained on."""
        stacked = self.stacked(losses)
        return (self.loss_weights().to(stacked.device) * stacked).sum()

    def backward(self, losses: Mapping[str, Tensor], shared: Sequence[nn.Parameter]) -> Tensor:
        """Backward pass of one step; returns the combined loss, detached, for logging.

        Args:
            losses: Each task's scalar loss of this step.
            shared: The trainable parameters every task shares (the trunk's), in stage order.
        """
        total = self.combine(losses)
        total.backward()
        return total.detach()

    def weights(self) -> dict[str, float]:
        """The weight of each task that the next ``backward`` applies (read before every step, logged
        as the epoch's mean)."""
        return dict(zip(self.task_keys, self.loss_weights().tolist(), strict=True))

    def end_epoch(self, mean_losses: Mapping[str, float]) -> None:
        """Called after each training epoch with each task's mean training loss."""

    def optimised_parameters(self) -> list[nn.Parameter]:
        """Parameters the model's optimiser updates together with the network (none by default)."""
        return []


class FixedWeighting(Weighting):
    """Constant weights: ``L = sum_i w_i L_i``."""

    name = "fixed"

    def __init__(self, task_keys: Sequence[str], weights: Mapping[str, float] | None = None) -> None:
        super().__init__(task_keys)
        values = [1.0] * len(self.task_keys) if weights is None else self._checked(weights)
        self.register_buffer("fixed_weights", torch.tensor(values, dtype=torch.float32))

    def _checked(self, weights: Mapping[str, float]) -> list[float]:
        if not isinstance(weights, Mapping):
            raise ValueError(
                f"weighting 'fixed': weights must map every task key to a number, got {weights!r}"
            )
        missing = [k for k in self.task_keys if k not in weights]
        unknown = [k for k in weights if k not in self.task_keys]
        if missing or unknown:
            parts = [f"lacks task {', '.join(map(repr, missing))}"] if missing else []
            parts += [f"names unknown task {', '.join(map(repr, unknown))}"] if unknown else []
            raise ValueError(
                f"weighting 'fixed': weights {' and '.join(parts)}; "
                f"give one weight for each of the tasks {', '.join(self.task_keys)}"
            )
        values = [
            _number("fixed", f"weights.{k}", weights[k], minimum=0.0, strict=False) for k in self.task_keys
        ]
        if not any(values):
            raise ValueError("weighting 'fixed': at least one weight must be > 0, got all zeros")
        return values

    def loss_weights(self) -> Tensor:
        return self.fixed_weights


@WEIGHTINGS.register("equal")
def equal(task_keys: Sequence[str]) -> Weighting:
    """Every task weight 1: the plain sum of the task losses."""
    weighting = FixedWeighting(task_keys)
    weighting.name = "equal"
    return weighting


@WEIGHTINGS.register("fixed")
def fixed(task_keys: Sequence[str], *, weights: Mapping[str, float] | None = None) -> Weighting:
    """Constant weights given per task key (``weights: {cls: 1.0, seg: 0.5}``), every key required."""
    if weights is None:
        raise ValueError(
            "weighting 'fixed' needs option weights: one number for each of the tasks "
            f"{', '.join(map(str, task_keys))}"
        )
    return FixedWeighting(task_keys, weights)


class UncertaintyWeighting(Weighting):
    """Homoscedastic uncertainty weighting (Kendall, Gal and Cipolla, CVPR 2018).

    ``L = sum_i exp(-s_i) L_i + s_i`` with learnable ``s_i = log sigma_i^2`` (initially 0). This is the
    common form for classification and regression alike: the paper's regression term
    ``L_i / (2 sigma^2) + log sigma`` is half of it, its classification term ``L_i / sigma^2 + log sigma``
    differs only in the regulariser's factor; all have the minimum at ``sigma_i^2 ~ L_i``, so a task
    whose loss stays high (noisy) gets a low weight ``exp(-s_i)``.
    """

    name = "uncertainty"

    def __init__(self, task_keys: Sequence[str]) -> None:
        super().__init__(task_keys)
        self.log_variance = nn.Parameter(torch.zeros(len(self.task_keys)))

    def loss_weights(self) -> Tensor:
        return torch.exp(-self.log_variance.detach())

    def combine(self, losses: Mapping[str, Tensor]) -> Tensor:
        stacked = self.stacked(losses)
        s = self.log_variance.to(stacked.device)
        return (torch.exp(-s) * stacked + s).sum()

    def optimised_parameters(self) -> list[nn.Parameter]:
        return [self.log_variance]


@WEIGHTINGS.register("uncertainty")
def uncertainty(task_keys: Sequence[str]) -> Weighting:
    """Kendall et al. 2018: learned homoscedastic uncertainty, L = sum exp(-s_i) L_i + s_i."""
    return UncertaintyWeighting(task_keys)


#: DWA's smallest mean loss: a loss below it (zero or negative) is raised to it before the ratios.
DWA_LOSS_FLOOR = 1e-8


class DynamicWeightAverage(Weighting):
    """Dynamic weight average (Liu, Johns and Davison, CVPR 2019, "End-to-end multi-task learning
    with attention").

    ``w_i(t) = K exp(r_i(t-1) / T) / sum_j exp(r_j(t-1) / T)`` with ``r_i(t-1) = L_i(t-1) / L_i(t-2)``,
    the ratio of task i's mean training losses of the two previous epochs; weights are 1 in the first
    two epochs. A task whose loss fell slower (a larger ratio) gets more weight. The ratios assume
    positive losses: a mean loss below ``DWA_LOSS_FLOOR`` (a plugin task's loss may be <= 0) is
    raised to it, with a warning, so the trial goes on (its ratios then say little).
    """

    name = "dwa"

    def __init__(self, task_keys: Sequence[str], temperature: float = 2.0) -> None:
        super().__init__(task_keys)
        self.temperature = _number("dwa", "temperature", temperature, minimum=0.0, strict=True)
        self.history: list[list[float]] = []  # mean training losses of the last two epochs

    def loss_weights(self) -> Tensor:
        if len(self.history) < 2:
            return torch.ones(len(self.task_keys))
        before, last = (torch.tensor(h, dtype=torch.float64) for h in self.history[-2:])
        ratio = last / before
        return (len(self.task_keys) * torch.softmax(ratio / self.temperature, dim=0)).float()

    def end_epoch(self, mean_losses: Mapping[str, float]) -> None:
        values = [float(mean_losses[k]) for k in self.task_keys]
        bad = [k for k, v in zip(self.task_keys, values, strict=True) if not math.isfinite(v)]
        if bad:
            raise ValueError(f"weighting 'dwa' needs finite mean losses; tasks {bad} have {values}")
        low = [k for k, v in zip(self.task_keys, values, strict=True) if v < DWA_LOSS_FLOOR]
        if low:  # a plugin task's loss may be <= 0 (e.g. a negative log-likelihood of a density)
            log.warning(
                "weighting 'dwa': mean training losses of tasks %s are below %g (%s); DWA's loss ratios "
                "assume positive losses, so they are clamped to %g",
                low,
                DWA_LOSS_FLOOR,
                values,
                DWA_LOSS_FLOOR,
            )
        self.history = [*self.history, [max(v, DWA_LOSS_FLOOR) for v in values]][-2:]

    def get_extra_state(self) -> dict[str, Any]:
        return {"history": self.history}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.history = [list(map(float, h)) for h in state["history"]]


@WEIGHTINGS.register("dwa")
def dwa(task_keys: Sequence[str], *, temperature: float = 2.0) -> Weighting:
    """Liu et al. 2019 dynamic weight average: more weight to tasks whose loss fell slower last epoch."""
    return DynamicWeightAverage(task_keys, temperature)


def last_shared_layer(shared: Sequence[nn.Parameter]) -> nn.Parameter | None:
    """GradNorm's W: the last shared weight tensor (a conv or linear weight, not a bias or norm scale)."""
    matrices = [p for p in shared if p.ndim > 1]
    return matrices[-1] if matrices else (shared[-1] if shared else None)


def gradient_norms(stacked: Tensor, layer: nn.Parameter) -> Tensor:
    """``||d L_i / d layer||`` per task (no graph kept: GradNorm needs them as constants)."""
    norms = []
    for loss in stacked:
        (grad,) = torch.autograd.grad(loss, layer, retain_graph=True, allow_unused=True)
        norms.append(grad.norm() if grad is not None else torch.zeros((), device=stacked.device))
    return torch.stack(norms).float()


class GradNorm(Weighting):
    """GradNorm (Chen, Badrinarayanan, Lee and Rabinovich, ICML 2018).

    Learnable weights ``w_i`` (initially 1) scale the losses, ``L = sum_i w_i L_i``. After each step's
    backward pass the weights take one step of their own Adam optimiser (rate ``lr``) on
    ``L_grad = sum_i |G_i - mean(G) r_i^alpha|``, where ``G_i = ||grad_W w_i L_i||`` is the norm of task
    i's weighted gradient on ``W``, the last shared weight tensor, and ``r_i = L~_i / mean(L~)`` with
    ``L~_i = L_i(t) / L_i(0)`` (``L_i(0)``: the first step's loss) is its relative inverse training rate;
    the target ``mean(G) r_i^alpha`` is a constant. Then the weights are renormalised to sum to K. A
    task that trains slower (larger ``r_i``) gets a larger weight. The weights are kept out of the
    network's optimiser so the network's gradient ``L_i`` never moves them, as in the paper. With no
    trainable shared parameter (the whole trunk frozen) there is nothing to balance: weights stay 1.
    """

    name = "gradnorm"

    def __init__(self, task_keys: Sequence[str], alpha: float = 1.5, lr: float = 0.025) -> None:
        super().__init__(task_keys)
        self.alpha = _number("gradnorm", "alpha", alpha, minimum=0.0, strict=False)
        self.lr = _number("gradnorm", "lr", lr, minimum=0.0, strict=True)
        self.task_weights = nn.Parameter(torch.ones(len(self.task_keys)))
        self.register_buffer("initial_losses", torch.full((len(self.task_keys),), math.nan))
        self.optimizer = torch.optim.Adam([self.task_weights], lr=self.lr)

    def loss_weights(self) -> Tensor:
        return self.task_weights.detach()

    def backward(self, losses: Mapping[str, Tensor], shared: Sequence[nn.Parameter]) -> Tensor:
        stacked = self.stacked(losses)
        layer = last_shared_layer([p for p in shared if p.requires_grad])
        norms = gradient_norms(stacked, layer) if layer is not None else None
        # A clone: the weights change in place below, after the graph has used them.
        total = (self.task_weights.detach().clone() * stacked).sum()
        total.backward()
        if norms is not None:
            self.update_weights(stacked.detach(), norms)
        return total.detach()

    def update_weights(self, losses: Tensor, norms: Tensor) -> None:
        """One Adam step of the weights on GradNorm's loss, then renormalisation to sum K."""
        if torch.isnan(self.initial_losses).any():
            self.initial_losses.copy_(losses.clamp_min(1e-12))
        inverse_rate = losses / self.initial_losses
        relative = inverse_rate / inverse_rate.mean()
        weighted_norms = self.task_weights * norms
        target = (weighted_norms.mean() * relative**self.alpha).detach()
        gradnorm_loss = (weighted_norms - target).abs().sum()
        self.optimizer.zero_grad(set_to_none=True)
        (self.task_weights.grad,) = torch.autograd.grad(gradnorm_loss, self.task_weights)
        self.optimizer.step()
        with torch.no_grad():
            self.task_weights.clamp_(min=1e-4)
            self.task_weights.mul_(len(self.task_keys) / self.task_weights.sum())

    def get_extra_state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])


@WEIGHTINGS.register("gradnorm")
def gradnorm(task_keys: Sequence[str], *, alpha: float = 1.5, lr: float = 0.025) -> Weighting:
    """Chen et al. 2018 GradNorm: learned weights that balance gradient norms on the last shared layer."""
    return GradNorm(task_keys, alpha, lr)


def project_conflicting(grads: Sequence[Tensor], generator: torch.Generator | None = None) -> list[Tensor]:
    """PCGrad's projection (Yu et al. 2020, Algorithm 1) of flat task gradients.

    For each task i, its gradient ``g_i`` is projected, for every other task j in a random order, onto
    the normal plane of ``g_j`` whenever the two conflict (``g_i . g_j < 0``):
    ``g_i <- g_i - (g_i . g_j) / ||g_j||^2 g_j``. Gradients that conflict with no other come back
    unchanged. The update is the sum of the returned gradients.
    """
    projected = []
    for i, grad in enumerate(grads):
        others = [j for j in range(len(grads)) if j != i]
        order = torch.randperm(len(others), generator=generator).tolist()
        out = grad.clone()
        for j in (others[o] for o in order):
            dot = torch.dot(out, grads[j])
            if dot < 0:
                out = out - dot / grads[j].pow(2).sum().clamp_min(1e-20) * grads[j]
        projected.append(out)
    return projected


class PCGrad(Weighting):
    """Projecting conflicting gradients (Yu, Kumar, Gupta, Levine, Hausman and Finn, NeurIPS 2020).

    Each task's gradient on the shared parameters is computed by its own backward pass and projected
    with ``project_conflicting``; the shared parameters get the sum of the projections, each head the
    gradient of its own loss. Weights are 1 (the logged combined loss is the plain sum). The random
    order is drawn from a generator seeded by ``seed``, or from torch's seeded global generator.
    """

    name = "pcgrad"

    def __init__(self, task_keys: Sequence[str], seed: int | None = None) -> None:
        super().__init__(task_keys)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"weighting 'pcgrad': seed must be an integer or null, got {seed!r}")
        start = seed if seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
        self.generator = torch.Generator().manual_seed(start)

    def backward(self, losses: Mapping[str, Tensor], shared: Sequence[nn.Parameter]) -> Tensor:
        stacked = self.stacked(losses)
        params = [p for p in shared if p.requires_grad]
        if not params:  # nothing shared to project: each head gets its own loss's gradient
            stacked.sum().backward()
            return stacked.sum().detach()
        for p in params:
            p.grad = None
        grads = []
        for i, key in enumerate(self.task_keys):
            # Each task's backward pass also fills its own head's gradient, which is kept.
            losses[key].float().backward(retain_graph=i < len(self.task_keys) - 1)
            grads.append(torch.cat([flat_grad(p) for p in params]))
            for p in params:
                p.grad = None
        combined = torch.stack(project_conflicting(grads, self.generator)).sum(dim=0)
        offset = 0
        for p in params:
            p.grad = combined[offset : offset + p.numel()].view_as(p).to(p.dtype).clone()
            offset += p.numel()
        return stacked.sum().detach()

    def get_extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def flat_grad(p: nn.Parameter) -> Tensor:
    """``p.grad`` as a flat vector (zeros where a loss did not reach ``p``)."""
    return (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)


@WEIGHTINGS.register("pcgrad")
def pcgrad(task_keys: Sequence[str], *, seed: int | None = None) -> Weighting:
    """Yu et al. 2020 PCGrad: project each task gradient off the shared gradients it conflicts with."""
    return PCGrad(task_keys, seed)


def build_weighting(
    name: str, task_keys: Sequence[str], options: Mapping[str, Any] | None = None
) -> Weighting:
    """Instantiate weighting ``name`` for ``task_keys``; unknown names and options raise with the choices."""
    factory = WEIGHTINGS.get(name)
    options = dict(options or {})
    # The first parameter receives the task keys, whatever a plugin calls it; the rest are options.
    first = next(iter(inspect.signature(factory).parameters), "task_keys")
    check_options("weighting", name, factory, options, reserved=(first,))
    weighting = factory(list(task_keys), **options)
    if not isinstance(weighting, Weighting):
        raise TypeError(
            f"weighting '{name}' returned {type(weighting).__name__}, not a transferlab Weighting"
        )
    return weighting
