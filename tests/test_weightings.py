"""Loss weighting strategies on cases with a known answer, their option errors, and plugin discovery.

equal/fixed give the exact weighted sum; uncertainty weighting (Kendall et al. 2018) moves weight away
from a task whose loss is pure noise; DWA (Liu et al. 2019) keeps weights equal for two epochs, then
favours the task whose loss fell slower; GradNorm (Chen et al. 2018) raises the weight of the task that
trains slower and keeps the weights summing to K; PCGrad (Yu et al. 2020) removes exactly the
conflicting component of opposed gradients and leaves agreeing ones alone.
"""

from __future__ import annotations

import json
import math
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from transferlab import registry as registry_module
from transferlab.cli.main import cli
from transferlab.engine import weightings as weightings_module
from transferlab.engine.weightings import (
    DWA_LOSS_FLOOR,
    GradNorm,
    PCGrad,
    Weighting,
    build_weighting,
    project_conflicting,
)
from transferlab.registry import REGISTRIES, WEIGHTINGS, Registry, UnknownPluginError

BUILTINS = {"equal", "fixed", "uncertainty", "dwa", "gradnorm", "pcgrad"}


pytestmark = pytest.mark.usefixtures("one_thread")


def scalar_losses(**values: float) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, requires_grad=True) for k, v in values.items()}


# -- equal and fixed ---------------------------------------------------------------------------------


def test_equal_and_fixed_give_the_exact_weighted_sum() -> None:
    losses = scalar_losses(cls=2.0, seg=3.0, box=0.5)
    total = build_weighting("equal", ["cls", "seg", "box"]).backward(losses, [])
    assert float(total) == pytest.approx(5.5)
    assert [float(losses[k].grad) for k in ("cls", "seg", "box")] == [1.0, 1.0, 1.0]

    losses = scalar_losses(cls=2.0, seg=3.0, box=0.5)
    fixed = build_weighting("fixed", ["cls", "seg", "box"], {"weights": {"cls": 1.0, "seg": 0.5, "box": 4}})
    total = fixed.backward(losses, [])
    assert float(total) == pytest.approx(2.0 + 1.5 + 2.0)
    assert [float(losses[k].grad) for k in ("cls", "seg", "box")] == [1.0, 0.5, 4.0]
    assert fixed.weights() == {"cls": 1.0, "seg": 0.5, "box": 4.0}
    assert not total.requires_grad  # returned for logging only


# -- bad options -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        (
            "fixed",
            {"weights": {"cls": 1.0}},
            r"weighting 'fixed': weights lacks task 'seg'; give one weight for each",
        ),
        ("fixed", {"weights": {"cls": 1, "seg": 1, "sgm": 2}}, r"names unknown task 'sgm'"),
        ("fixed", {"weights": {"cls": -1, "seg": 1}}, r"weights.cls must be a finite number >= 0.0, got -1"),
        ("fixed", {"weights": {"cls": 0, "seg": 0}}, r"at least one weight must be > 0"),
        ("fixed", {"weights": [1, 2]}, r"weights must map every task key to a number"),
        ("fixed", {}, r"weighting 'fixed' needs option weights: one number for each of the tasks cls, seg"),
        ("dwa", {"temperature": 0}, r"weighting 'dwa': temperature must be a finite number > 0.0, got 0"),
        ("gradnorm", {"alpha": -1.0}, r"weighting 'gradnorm': alpha must be a finite number >= 0.0"),
        ("gradnorm", {"lr": "fast"}, r"weighting 'gradnorm': lr must be a finite number > 0.0, got 'fast'"),
        ("pcgrad", {"seed": 1.5}, r"weighting 'pcgrad': seed must be an integer or null, got 1.5"),
        ("dwa", {"temp": 2.0}, r"weighting 'dwa' has no option 'temp'; its options are: temperature"),
        (
            "uncertainty",
            {"alpha": 1},
            r"weighting 'uncertainty' has no option 'alpha'; its options are: \(none\)",
        ),
    ],
)
def test_bad_options_are_clear_errors(name: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_weighting(name, ["cls", "seg"], options)


def test_unknown_names_and_task_keys_are_clear_errors() -> None:
    with pytest.raises(
        UnknownPluginError, match=r"weighting 'gradnrom' is not registered; did you mean 'gradnorm'"
    ):
        build_weighting("gradnrom", ["a", "b"])
    with pytest.raises(ValueError, match=r"task keys must be distinct, got \['a', 'a'\]"):
        build_weighting("equal", ["a", "a"])
    with pytest.raises(ValueError, match="combines the losses of tasks"):
        build_weighting("equal", ["a", "b"]).backward(scalar_losses(a=1.0), [])


# -- uncertainty ---------------------------------------------------------------------------------------


class TwoHeads(nn.Module):
    """A shared layer and one linear regression head per task."""

    def __init__(self, inputs: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.shared = nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU())
        self.heads = nn.ModuleDict({k: nn.Linear(hidden, 1) for k in ("signal", "noise")})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.shared(x)
        return {k: head(h).squeeze(1) for k, head in self.heads.items()}


def test_uncertainty_moves_weight_away_from_a_task_whose_loss_is_pure_noise() -> None:
    torch.manual_seed(0)
    net, direction = TwoHeads(), torch.randn(8)
    weighting = build_weighting("uncertainty", ["signal", "noise"])
    optimizer = torch.optim.Adam([*net.parameters(), *weighting.optimised_parameters()], lr=0.02)
    for _ in range(300):
        x = torch.randn(64, 8)
        targets = {"signal": x @ direction, "noise": torch.randn(64)}  # fresh noise: nothing to learn
        out = net(x)
        losses = {k: nn.functional.mse_loss(out[k], targets[k]) for k in targets}
        optimizer.zero_grad()
        weighting.backward(losses, list(net.shared.parameters()))
        optimizer.step()
    weights = weighting.weights()
    # exp(-s) settles near 1 / L: the noise task's mean squared error stays near its variance, 1.
    assert weights["noise"] < 1.5 < 3.0 < weights["signal"]
    assert weights["noise"] == pytest.approx(1 / float(losses["noise"].detach()), rel=0.5)
    assert weights["signal"] == pytest.approx(math.exp(-float(weighting.log_variance[0].detach())))


# -- DWA -----------------------------------------------------------------------------------------------


def test_dwa_weights_are_equal_for_two_epochs_then_favour_the_task_whose_loss_fell_slower() -> None:
    dwa = build_weighting("dwa", ["fast", "slow"], {"temperature": 2.0})
    assert dwa.weights() == {"fast": 1.0, "slow": 1.0}  # epoch 1
    dwa.end_epoch({"fast": 1.0, "slow": 1.0})
    assert dwa.weights() == {"fast": 1.0, "slow": 1.0}  # epoch 2
    dwa.end_epoch({"fast": 0.5, "slow": 0.9})
    ratios = torch.tensor([0.5, 0.9])  # L(t-1) / L(t-2)
    expected = 2 * torch.exp(ratios / 2.0) / torch.exp(ratios / 2.0).sum()
    weights = dwa.weights()
    assert [weights["fast"], weights["slow"]] == pytest.approx(expected.tolist())
    assert weights["slow"] > 1.0 > weights["fast"] and sum(weights.values()) == pytest.approx(2.0)
    dwa.end_epoch({"fast": 0.45, "slow": 0.45})  # only the last two epochs count
    ratios = torch.tensor([0.45 / 0.5, 0.45 / 0.9])
    expected = 2 * torch.softmax(ratios / 2.0, dim=0)
    assert list(dwa.weights().values()) == pytest.approx(expected.tolist())
    losses = scalar_losses(fast=1.0, slow=1.0)
    assert float(dwa.backward(losses, [])) == pytest.approx(2.0)
    assert float(losses["fast"].grad) == pytest.approx(float(expected[0]))

    fresh = build_weighting("dwa", ["fast", "slow"])
    fresh.load_state_dict(dwa.state_dict())  # the loss history is part of the state (resume)
    assert fresh.weights() == dwa.weights()


def test_dwa_clamps_zero_or_negative_mean_losses_instead_of_failing(caplog: pytest.LogCaptureFixture) -> None:
    # A plugin task's loss may be <= 0 (a Gaussian negative log-likelihood, say): the trial goes on.
    dwa = build_weighting("dwa", ["nll", "cls"], {"temperature": 2.0})
    with caplog.at_level("WARNING", logger="transferlab.engine.weightings"):
        dwa.end_epoch({"nll": -0.5, "cls": 1.0})
        dwa.end_epoch({"nll": 0.0, "cls": 0.5})
    assert "weighting 'dwa': mean training losses of tasks ['nll'] are below 1e-08" in caplog.text
    assert dwa.history == [[DWA_LOSS_FLOOR, 1.0], [DWA_LOSS_FLOOR, 0.5]]
    expected = 2 * torch.softmax(torch.tensor([1.0, 0.5]) / 2.0, dim=0)  # ratios 1 (clamped) and 0.5
    assert list(dwa.weights().values()) == pytest.approx(expected.tolist())
    with pytest.raises(ValueError, match=r"weighting 'dwa' needs finite mean losses; tasks \['cls'\]"):
        dwa.end_epoch({"nll": 0.1, "cls": math.inf})


# -- GradNorm ------------------------------------------------------------------------------------------


def test_gradnorm_balances_gradient_norms_and_keeps_the_sum() -> None:
    # The gradient-norm part of GradNorm: a task whose loss (so its gradient) is 10 times larger gets
    # the smaller weight, whatever alpha is.
    torch.manual_seed(0)
    net = TwoHeads()
    net.heads = nn.ModuleDict({k: nn.Linear(16, 1) for k in ("fast", "slow")})
    directions = {"fast": torch.randn(8), "slow": torch.randn(8)}
    scale = {"fast": 10.0, "slow": 1.0}
    weighting = build_weighting("gradnorm", ["fast", "slow"], {"alpha": 1.5})
    assert weighting.optimised_parameters() == []  # its weights have their own optimiser
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    history = []
    for _ in range(150):
        x = torch.randn(64, 8)
        out = net(x)
        losses = {k: scale[k] * nn.functional.mse_loss(out[k], x @ directions[k]) for k in scale}
        optimizer.zero_grad()
        weighting.backward(losses, list(net.shared.parameters()))
        optimizer.step()
        history.append(weighting.weights())
    assert all(sum(w.values()) == pytest.approx(2.0, abs=1e-5) for w in history)
    assert history[-1]["slow"] > 1.5 > 0.5 > history[-1]["fast"]
    initial = weighting.initial_losses
    assert torch.isfinite(initial).all() and float(initial[0]) > float(initial[1])  # the first step's


def test_gradnorm_training_rate_term_raises_the_weight_of_a_task_that_stopped_learning() -> None:
    # Equal gradient norms by construction (d L_i / d W = e_i, so G_i = w_i): only r_i^alpha can move
    # the weights. The "learning" task's loss falls 3% a step, the other's stays at 1.
    def run(alpha: float) -> list[dict[str, float]]:
        shared = nn.Parameter(torch.zeros(1, 2))
        weighting = build_weighting("gradnorm", ["learning", "stuck"], {"alpha": alpha})
        history = []
        for step in range(100):
            losses = {"learning": 2.0 * 0.97**step + shared[0, 0], "stuck": 1.0 + shared[0, 1]}
            weighting.backward(losses, [shared])
            history.append(weighting.weights())
        return history

    assert all(w == {"learning": 1.0, "stuck": 1.0} for w in run(0.0))  # alpha 0: norms already equal
    history = run(1.5)
    stuck = [w["stuck"] for w in history]
    assert all(b > a for a, b in zip(stuck[:40], stuck[1:40], strict=False))  # it rises steadily
    assert stuck[-1] > 1.9  # towards K = 2 (its target mean(G) r^1.5 exceeds what the sum allows)
    assert all(sum(w.values()) == pytest.approx(2.0, abs=1e-5) for w in history)


def test_gradnorm_alpha_gives_more_weight_to_a_task_whose_loss_plateaus() -> None:
    # Two regression tasks of the same scale (unit-variance targets) on one shared layer: one target
    # is learnable, the other fresh noise, whose loss stays near 1. Gradient balancing alone (alpha 0)
    # already favours the noise task (its batch gradient is incoherent, so smaller); the training-rate
    # term (alpha 1.5) must add clearly more.
    def final_noise_weight(alpha: float) -> float:
        torch.manual_seed(0)
        net, direction = TwoHeads(), torch.randn(8)
        direction = direction / direction.norm()
        weighting = build_weighting("gradnorm", ["signal", "noise"], {"alpha": alpha})
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
        for _ in range(150):
            x = torch.randn(64, 8)
            targets = {"signal": x @ direction, "noise": torch.randn(64)}
            out = net(x)
            losses = {k: nn.functional.mse_loss(out[k], targets[k]) for k in targets}
            optimizer.zero_grad()
            weighting.backward(losses, list(net.shared.parameters()))
            optimizer.step()
        return weighting.weights()["noise"]

    plain, with_rate = final_noise_weight(0.0), final_noise_weight(1.5)
    assert with_rate > 1.7 and with_rate > plain + 0.25


def gradnorm_step_by_hand(
    w: list[float], initial: list[float], losses: list[float], norms: list[float], alpha: float, lr: float
) -> list[float]:
    """One GradNorm weight update in plain floats (Chen et al. 2018, with Adam's first step)."""
    k = len(w)
    ratio = [lt / l0 for lt, l0 in zip(losses, initial, strict=True)]  # L~_i = L_i(t) / L_i(0)
    r = [x / (sum(ratio) / k) for x in ratio]  # relative inverse training rates
    g = [wi * ni for wi, ni in zip(w, norms, strict=True)]  # G_i = ||grad_W w_i L_i||
    target = [sum(g) / k * ri**alpha for ri in r]  # held constant
    # d/dw_i sum_j |G_j - target_j| = sign(G_i - target_i) n_i; Adam's first step moves each weight
    # by lr * grad / (|grad| + eps).
    grad = [math.copysign(ni, gi - ti) for ni, gi, ti in zip(norms, g, target, strict=True)]
    stepped = [wi - lr * gr / (abs(gr) + 1e-8) for wi, gr in zip(w, grad, strict=True)]
    return [k * x / sum(stepped) for x in stepped]  # renormalised to sum K


@pytest.mark.parametrize(
    ("w", "initial", "losses", "norms", "expected"),
    [
        # Three tasks, G_i above its target for a and c, below for b.
        ([0.5, 1.0, 1.5], [2.0, 1.0, 4.0], [1.0, 0.9, 1.0], [2.0, 1.0, 0.5], None),
        # r = (0.1, 1.9): b trains slowly and gains weight. Had the target's mean(G) been
        # differentiated, its gradient would outweigh |G_b - target_b|'s and lower b's weight too.
        ([1.0, 1.0], [2.0, 1.0], [0.1, 0.95], [1.0, 1.0], [0.9, 1.1]),
    ],
)
def test_gradnorm_update_step_matches_a_hand_computation(
    w: list[float],
    initial: list[float],
    losses: list[float],
    norms: list[float],
    expected: list[float] | None,
) -> None:
    weighting = GradNorm([f"t{i}" for i in range(len(w))], alpha=1.5, lr=0.1)
    weighting.initial_losses.copy_(torch.tensor(initial))
    with torch.no_grad():
        weighting.task_weights.copy_(torch.tensor(w))
    weighting.update_weights(torch.tensor(losses), torch.tensor(norms))
    by_hand = gradnorm_step_by_hand(w, initial, losses, norms, alpha=1.5, lr=0.1)
    if expected is not None:
        assert by_hand == pytest.approx(expected, rel=1e-6)
    assert weighting.task_weights.tolist() == pytest.approx(by_hand, rel=1e-6)


def test_gradnorm_with_no_shared_parameter_keeps_equal_weights() -> None:
    weighting = build_weighting("gradnorm", ["a", "b"])
    losses = scalar_losses(a=4.0, b=1.0)
    assert float(weighting.backward(losses, [])) == pytest.approx(5.0)
    assert weighting.weights() == {"a": 1.0, "b": 1.0}


# -- PCGrad --------------------------------------------------------------------------------------------


def test_pcgrad_removes_the_conflicting_component_of_opposed_gradients() -> None:
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])  # g1 . g2 = -1 < 0: they conflict
    p1, p2 = project_conflicting([g1, g2])
    # g1 - (g1 . g2) / |g2|^2 g2 and g2 - (g2 . g1) / |g1|^2 g1:
    torch.testing.assert_close(p1, g1 - (-1.0 / 2.0) * g2)
    torch.testing.assert_close(p2, g2 - (-1.0 / 1.0) * g1)
    torch.testing.assert_close(p1, torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(p2, torch.tensor([0.0, 1.0]))
    assert float(p1 @ g2) == pytest.approx(0.0) and float(p2 @ g1) == pytest.approx(0.0)  # normal planes

    agreeing = [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])]
    for before, after in zip(agreeing, project_conflicting(agreeing), strict=True):
        assert torch.equal(before, after)


def test_pcgrad_backward_sets_the_shared_gradient_to_the_sum_of_projections() -> None:
    theta = nn.Parameter(torch.zeros(2))  # shared
    heads = {k: nn.Parameter(torch.tensor(1.0)) for k in ("a", "b")}  # task-specific
    g = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([-1.0, 1.0])}
    losses = {k: theta @ g[k] + 3.0 * heads[k] for k in g}  # d/dtheta = g_k, d/dhead = 3
    weighting = build_weighting("pcgrad", ["a", "b"], {"seed": 0})
    total = weighting.backward(losses, [theta])
    assert float(total) == pytest.approx(6.0) and weighting.weights() == {"a": 1.0, "b": 1.0}
    torch.testing.assert_close(theta.grad, torch.tensor([0.5, 1.5]))  # (0.5, 0.5) + (0, 1)
    assert [float(heads[k].grad) for k in ("a", "b")] == [3.0, 3.0]  # each head: its own loss only

    theta.grad = None  # without conflict PCGrad is the plain sum
    losses = {"a": theta @ torch.tensor([1.0, 0.0]), "b": theta @ torch.tensor([1.0, 1.0])}
    weighting.backward(losses, [theta])
    torch.testing.assert_close(theta.grad, torch.tensor([2.0, 1.0]))


def test_pcgrad_task_order_is_random_and_seeded() -> None:
    # Three mutually conflicting gradients: the result depends on the order of projection.
    grads = [torch.tensor([1.0, 0.0]), torch.tensor([-0.8, 0.6]), torch.tensor([-0.6, -0.8])]

    def run(seed: int) -> list[list[float]]:
        generator = torch.Generator().manual_seed(seed)
        return [[round(v, 6) for v in torch.stack(project_conflicting(grads, generator)).sum(0).tolist()]]

    assert run(3) == run(3)
    assert len({str(run(s)) for s in range(12)}) > 1
    a, b = PCGrad(["x", "y"], seed=5), PCGrad(["x", "y"], seed=6)
    b.load_state_dict(a.state_dict())  # the generator's state travels with the weighting (resume)
    assert torch.equal(torch.randperm(9, generator=a.generator), torch.randperm(9, generator=b.generator))


# -- plugins -------------------------------------------------------------------------------------------

PLUGIN = textwrap.dedent(
    '''
    """A weighting from a made-up distribution."""

    from transferlab.engine.weightings import FixedWeighting


    def halves(task_keys, *, share=0.5):
        """The same share for every task."""
        return FixedWeighting(task_keys, {k: share for k in task_keys})
    '''
)


@dataclass(frozen=True)
class FakeDistribution:
    name: str


class FakeEntryPoint:
    """What the registry reads from an ``importlib.metadata.EntryPoint``."""

    group = "transferlab.weightings"

    def __init__(self, name: str, value: str, dist: str) -> None:
        self.name, self.value, self.dist = name, value, FakeDistribution(dist)

    def load(self) -> object:
        return EntryPoint(self.name, self.value, self.group).load()


@pytest.fixture
def plugin_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Registry]:
    (tmp_path / "acme_weightings_for_tests.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = FakeEntryPoint("halves", "acme_weightings_for_tests:halves", "acme-weightings")
    monkeypatch.setattr(registry_module, "entry_points", lambda *, group: [ep] if group == ep.group else [])
    fresh = Registry("weighting", entry_point_group="transferlab.weightings")
    monkeypatch.setattr(weightings_module, "WEIGHTINGS", fresh)
    monkeypatch.setitem(REGISTRIES, "weighting", fresh)
    yield fresh
    sys.modules.pop("acme_weightings_for_tests", None)


def test_a_plugin_weighting_is_found_by_name(plugin_registry: Registry) -> None:
    weighting = build_weighting("halves", ["a", "b"], {"share": 0.25})
    assert isinstance(weighting, Weighting) and weighting.weights() == {"a": 0.25, "b": 0.25}
    assert plugin_registry.entry("halves").source == "acme-weightings"
    with pytest.raises(ValueError, match="weighting 'halves' has no option 'shares'; its options are: share"):
        build_weighting("halves", ["a"], {"shares": 1})
    result = CliRunner().invoke(cli, ["plugins", "list", "--kind", "weighting", "--output", "json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["plugins"]
    assert rows == [
        {
            "name": "halves",
            "kind": "weighting",
            "source": "acme-weightings",
            "description": "The same share for every task.",
        }
    ]


def test_builtins_are_registered_and_listed() -> None:
    assert BUILTINS <= set(WEIGHTINGS.names()) and REGISTRIES["weighting"] is WEIGHTINGS
    result = CliRunner(env={"COLUMNS": "250"}).invoke(cli, ["plugins", "list", "--kind", "weighting"])
    assert result.exit_code == 0, result.output
    for name in BUILTINS:
        assert f"│ {name} " in result.output
    assert isinstance(build_weighting("gradnorm", ["a"]), GradNorm)
