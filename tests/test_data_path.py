"""The data path of ``fit``: data placement, worker batches and loss reads deferred to the epoch's end.

The CUDA side of these paths (data on the GPU, deferred loss reads, pinned memory) is exercised on a
GPU by ``benchmarks/gpu_check.py``; here the same code runs on the CPU, with the CUDA decision forced
where it is a plain switch.
"""

from __future__ import annotations

import pytest
import torch

from transferlab.engine import fit as fit_module
from transferlab.engine.assembly import build_model, build_task
from transferlab.engine.augment import augmented_train_set
from transferlab.engine.fit import FitConfig, NonFiniteLossError, fit, iterate_batches, place_data
from transferlab.engine.trial import run_trial
from transferlab.tasks.base import InMemoryDataset

pytestmark = pytest.mark.usefixtures("one_thread")

BACKBONE = ("convnet", {"widths": [4, 8]})


@pytest.fixture(scope="module")
def digits():
    return build_task("digits", {"image_size": 16}, classes=[0, 1])


def model_for(task, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(BACKBONE, ("classify", {}), task)


def test_in_memory_dataset_moves_and_counts_its_bytes() -> None:
    tensors = {"image": torch.arange(24.0).view(6, 4), "label": torch.arange(6)}
    data = InMemoryDataset(tensors, {"s": list("abcdef")})
    assert data.nbytes == 6 * 4 * 4 + 6 * 8
    moved = data.to("cpu")
    assert isinstance(moved, InMemoryDataset) and moved is not data and len(moved) == 6
    batch = moved.batch(torch.tensor([4, 1]))
    assert batch["label"].tolist() == [4, 1] and batch["s"] == ["e", "b"]
    assert torch.equal(batch["image"], data.tensors["image"][[4, 1]])


def test_data_stays_on_the_host_off_cuda(digits) -> None:
    sets = {s: digits.dataset(s) for s in ("train", "val", "test")}
    placed, facts = place_data(sets, FitConfig(data_on_device=True), torch.device("cpu"))
    assert placed == sets and facts == {"device": "cpu", "data_on_device": False}


def test_data_over_the_limit_stays_on_the_host_and_says_why(digits) -> None:
    sets = {s: digits.dataset(s) for s in ("train", "val", "test")}
    mb = sum(d.nbytes for d in sets.values()) / 2**20
    # A CUDA device object needs no GPU: nothing is moved when the data sets are over the limit.
    placed, facts = place_data(sets, FitConfig(data_on_device_max_mb=mb / 2), torch.device("cuda"))
    assert placed == sets and facts["data_on_device"] is False
    assert "train.data_on_device_max_mb" in facts["data_on_device_reason"]
    placed, facts = place_data(sets, FitConfig(data_on_device=False), torch.device("cuda"))
    assert placed == sets and facts == {"device": "cuda", "data_on_device": False}


def test_augmented_data_is_never_moved_to_the_gpu() -> None:
    shapes = build_task("shapes", {"image_size": 16, "train_size": 8, "val_size": 4, "test_size": 4})
    train = augmented_train_set(shapes, [{"name": "HorizontalFlip", "p": 0.5}], seed=0)
    assert train.per_sample_work and not shapes.dataset("val").per_sample_work
    placed, facts = place_data({"train": train}, FitConfig(data_on_device=True), torch.device("cuda"))
    assert placed["train"] is train and facts["data_on_device"] is False


def test_worker_processes_build_the_same_augmented_batches() -> None:
    shapes = build_task(
        "shapes", {"target": "mask", "image_size": 16, "train_size": 24, "val_size": 4, "test_size": 4}
    )
    train = augmented_train_set(shapes, [{"name": "Affine", "rotate": (-30, 30), "p": 1.0}], seed=5)
    train.set_epoch(2)

    def batches(workers: int) -> list[dict]:
        generator = torch.Generator().manual_seed(1)
        return list(iterate_batches(train, 10, shuffle=True, generator=generator, num_workers=workers))

    here, there = batches(0), batches(2)
    assert [len(b["image"]) for b in there] == [10, 10, 4]
    for a, b in zip(here, there, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key]
    unaugmented = list(iterate_batches(shapes.dataset("train"), 10, shuffle=False, generator=None))
    assert not torch.equal(here[0]["image"], unaugmented[0]["image"])  # the draws did change pixels


def poison_loss(task, monkeypatch: pytest.MonkeyPatch, step: int, factor: float) -> dict[str, int]:
    """Multiply the ``step``-th training loss (from 1; evaluation runs without grad) by ``factor``;
    the returned dict counts the training losses computed."""
    calls = {"n": 0}
    original = task.loss

    def loss(outputs, batch):
        calls["n"] += torch.is_grad_enabled()
        value = original(outputs, batch)
        return value * factor if calls["n"] == step and torch.is_grad_enabled() else value

    monkeypatch.setattr(task, "loss", loss)
    return calls


def test_deferred_loss_reads_train_the_same_net(digits, monkeypatch: pytest.MonkeyPatch) -> None:
    config = FitConfig(epochs=2, batch_size=32)
    per_step = fit(model_for(digits), digits, config)
    monkeypatch.setattr(fit_module, "loss_read_interval", lambda device: 50)
    deferred = fit(model_for(digits), digits, config)
    assert deferred.history == per_step.history and deferred.test == per_step.test
    assert deferred.steps == per_step.steps


@pytest.mark.parametrize("interval", [1, 50], ids=["per-step", "deferred"])
def test_a_non_finite_loss_names_its_step_either_way(
    digits, interval: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert -(-len(digits.dataset("train")) // 64) == 4  # 4 steps per epoch: step 6 is epoch 2's second
    monkeypatch.setattr(fit_module, "loss_read_interval", lambda device: interval)
    calls = poison_loss(digits, monkeypatch, step=6, factor=float("inf"))
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss (inf|nan) at epoch 2, step 6"):
        fit(model_for(digits), digits, FitConfig(epochs=3, batch_size=64))
    assert calls["n"] == (6 if interval == 1 else 8)  # read at once, or at the epoch's end


def test_a_trial_records_where_it_ran(tmp_path) -> None:
    trial = {
        "trial_key": "t",
        "role": "single",
        "seed": 0,
        "backbone": {"name": "convnet", "options": {"widths": [4, 8]}},
        "head": {"name": "classify", "options": {}},
        "task": {"name": "digits", "options": {"image_size": 16}},
        "train": {"epochs": 1, "batch_size": 64},
        "freeze_depth": 0,
        "copy_depth": 0,
    }
    _, facts = run_trial(trial, checkpoint_path=tmp_path / "m.safetensors")
    assert facts["device"] == "cpu" and facts["data_on_device"] is False
    assert "cuda_peak_mb" not in facts


def test_an_empty_split_gives_no_batch() -> None:
    empty = InMemoryDataset({"image": torch.zeros(0, 3, 4, 4), "label": torch.zeros(0, dtype=torch.long)})
    assert list(iterate_batches(empty, 8, shuffle=True, generator=torch.Generator())) == []
    assert list(iterate_batches(empty, 8, shuffle=False, generator=None)) == []


def test_a_dataset_with_its_own_batches_refuses_to_move() -> None:
    shapes = build_task("shapes", {"image_size": 16, "train_size": 8, "val_size": 4, "test_size": 4})
    train = augmented_train_set(shapes, [{"name": "HorizontalFlip", "p": 0.5}], seed=0)
    with pytest.raises(TypeError, match="AugmentedDataset gathers its own batches"):
        train.to("cpu")


def test_worker_processes_leave_the_global_random_stream_alone() -> None:
    shapes = build_task("shapes", {"image_size": 16, "train_size": 24, "val_size": 4, "test_size": 4})
    train = augmented_train_set(shapes, [{"name": "HorizontalFlip", "p": 0.5}], seed=0)
    draws = []
    for workers in (0, 2):
        torch.manual_seed(7)
        list(iterate_batches(train, 8, shuffle=True, generator=torch.Generator(), num_workers=workers))
        draws.append(torch.rand(3))  # e.g. the dropout masks of the next step
    assert torch.equal(draws[0], draws[1])


def test_a_resumed_optimizer_keeps_its_fused_kernels() -> None:
    from transferlab.engine.fit import load_optimizer_state

    weights = [torch.nn.Parameter(torch.ones(3))]
    saved_by_foreach = torch.optim.SGD(weights, lr=0.1, momentum=0.9)
    weights[0].grad = torch.ones(3)
    saved_by_foreach.step()
    fused = torch.optim.SGD(weights, lr=0.1, momentum=0.9, fused=True)
    load_optimizer_state(fused, saved_by_foreach.state_dict())
    assert fused.param_groups[0]["fused"] is True
    momentum = fused.state[weights[0]]["momentum_buffer"]
    assert torch.equal(momentum, torch.ones(3))  # the saved state itself did load
    fused.step()  # the fused kernel runs with the loaded state
    assert torch.allclose(weights[0].detach(), torch.full((3,), 1 - 0.1 - 0.1 * 1.9))


def test_deferred_reads_stop_a_diverged_trial_within_the_check_interval(
    digits, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fit_module, "loss_read_interval", lambda device: 2)
    calls = poison_loss(digits, monkeypatch, step=5, factor=float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss nan at epoch 2, step 5"):
        fit(model_for(digits), digits, FitConfig(epochs=3, batch_size=64))
    assert calls["n"] == 6  # checked after epoch 2's second step, not at its fourth and last


def test_batch_indices_stay_on_the_host_when_cached_features_do() -> None:
    from transferlab.engine.feature_cache import CachedFeatureDataset, Entry

    # "meta" stands in for the GPU: no memory, only a device other than the host.
    base = InMemoryDataset({"image": torch.empty(6, 3, 4, 4, device="meta"), "label": torch.arange(6)})
    assert base.device.type == "meta"
    on_host = CachedFeatureDataset(base, Entry([torch.zeros(6, 2)], 0.0, 0.0), computed_here=True)
    with_data = CachedFeatureDataset(base, Entry([torch.empty(6, 2, device="meta")], 0.0, 0.0), True)
    assert on_host.device.type == "cpu" and with_data.device.type == "meta"
