"""Frozen-prefix feature cache: exact features, a key that misses on every change, bypass, same metrics."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from transferlab.engine import feature_cache
from transferlab.engine.assembly import build_model, build_task
from transferlab.engine.fit import FitConfig, fit
from transferlab.engine.model import TransferModel
from transferlab.tasks.base import Task

SPLITS = ("train", "val", "test")


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def empty_store() -> Iterator[None]:
    feature_cache.STORE.clear()
    yield
    feature_cache.STORE.clear()


def tiny(
    depth: int = 2, classes: tuple[int, ...] = (0, 1, 2), bn: str = "frozen", **task_options: Any
) -> tuple[TransferModel, Task]:
    """Digits at 16 px, a 3-stage convnet with ``depth`` frozen stages; the same weights on every call."""
    task = build_task("digits", {"image_size": 16, **task_options}, classes=list(classes))
    torch.manual_seed(0)
    model = build_model(
        ("convnet", {"widths": [4, 8, 8]}), ("classify", {}), task, freeze_depth=depth, bn_policy=bn
    )
    return model, task


def prepare(model: TransferModel, task: Task, **options: Any) -> feature_cache.FeatureCache:
    settings = {
        "augment": None,
        "enabled": True,
        "dtype": "float32",
        "max_mb": 64,
        "batch_size": 64,
        "device": torch.device("cpu"),
    }
    datasets = {split: task.dataset(split) for split in SPLITS}
    return feature_cache.prepare(model, task, datasets, **{**settings, **options})


def computed(cache: feature_cache.FeatureCache) -> list[bool]:
    """Whether each split's features were computed by this call (a miss) or found in the store (a hit)."""
    return [cache.splits[split].computed_here for split in SPLITS]


def test_cache_holds_exactly_what_the_frozen_stages_compute() -> None:
    model, task = tiny(depth=2)
    cache = prepare(model, task, batch_size=100_000)  # one pass per split, as the reference below
    assert cache.enabled and computed(cache) == [True, True, True]
    model.eval()
    for split in SPLITS:
        images = task.dataset(split).tensors["image"]
        expected = model.forward_frozen(images)
        got = [cache.splits[split].features[key] for key in feature_cache.feature_keys(2)]
        assert len(got) == 2 and all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))
    # the model fed a cached batch gives exactly what it gives on the images themselves
    cached_batch = cache.splits["val"].batch(torch.arange(7))
    plain_batch = task.dataset("val").batch(torch.arange(7))
    assert torch.equal(model(cached_batch)["logits"], model(plain_batch)["logits"])


def test_key_misses_on_a_change_of_checkpoint_split_transform_or_depth() -> None:
    model, task = tiny(depth=2)
    assert computed(prepare(model, task)) == [True, True, True]  # three splits, three entries
    assert computed(prepare(model, task)) == [False, False, False] and len(feature_cache.STORE) == 3
    same_weights, same_task = tiny(depth=2)  # an identical trial (another seed or learning rate)
    assert computed(prepare(same_weights, same_task)) == [False, False, False]

    changes = {}
    changed_checkpoint, _ = tiny(depth=2)
    with torch.no_grad():
        changed_checkpoint.backbone.stages[1][0].weight[0, 0, 0, 0] += 1e-3
    changes["checkpoint"] = (changed_checkpoint, task)
    changes["split"] = tiny(depth=2, classes=(5, 6, 7))  # same weights, B's classes
    changes["transform"] = tiny(depth=2, mean=[0.25], std=[0.5])  # other input normalisation
    changes["depth"] = tiny(depth=1)
    for what, (other_model, other_task) in changes.items():
        before = len(feature_cache.STORE)
        assert computed(prepare(other_model, other_task)) == [True, True, True], what
        assert len(feature_cache.STORE) == before + 3, what


def test_cache_is_bypassed_under_augmentation_and_says_why() -> None:
    model, task = tiny(depth=2)
    result = fit(
        model,
        task,
        FitConfig(epochs=1, batch_size=64, device="cpu"),
        augment=[{"name": "HorizontalFlip", "p": 0.5}],
    )
    assert result.feature_cache["feature_cache"] == "off"
    assert "augmentation" in result.feature_cache["feature_cache_reason"]
    assert len(feature_cache.STORE) == 0
    for options, reason in (
        ({"bn": "train"}, "bn: train"),
        ({"depth": 0}, "no stage is frozen"),
    ):
        other, other_task = tiny(**options)
        cache = prepare(other, other_task)
        assert not cache.enabled and reason in cache.reason
    assert "turned off" in prepare(model, task, enabled=False).reason


def test_size_limit_falls_back_with_a_logged_reason(caplog: pytest.LogCaptureFixture) -> None:
    model, task = tiny(depth=1)
    with caplog.at_level(logging.WARNING, logger="transferlab.engine.feature_cache"):
        cache = prepare(model, task, max_mb=0.01)
    assert not cache.enabled and "feature_cache_max_mb" in cache.reason
    assert "feature_cache_max_mb" in caplog.text and len(feature_cache.STORE) == 0


def test_half_precision_storage_is_close_and_fed_back_as_float32() -> None:
    model, task = tiny(depth=2)
    full, half = prepare(model, task), prepare(model, task, dtype="float16")
    assert computed(half) == [True, True, True]  # the storage dtype is part of the key
    stored = half.splits["train"].features[feature_cache.feature_keys(2)[-1]]
    assert stored.dtype == torch.float16
    batch = half.splits["train"].batch(torch.arange(16))
    reference = full.splits["train"].batch(torch.arange(16))
    key = feature_cache.feature_keys(2)[-1]
    assert batch[key].dtype == torch.float32
    torch.testing.assert_close(batch[key], reference[key], rtol=2e-3, atol=2e-3)
    assert half.report()["feature_cache_mb"] == pytest.approx(full.report()["feature_cache_mb"] / 2, rel=0.01)


def test_a_trial_with_the_cache_gives_the_same_metrics_as_without() -> None:
    results = {}
    for enabled in (True, False):
        model, task = tiny(depth=2)
        config = FitConfig(epochs=3, batch_size=32, device="cpu", seed=0, feature_cache=enabled)
        results[enabled] = fit(model, task, config)
    cached, plain = results[True], results[False]
    facts = cached.feature_cache
    n = {split: len(task.dataset(split)) for split in SPLITS}
    # every sample computed once; then 2 more training epochs, 2 more val passes (test passes once)
    assert facts["feature_cache_misses"] == sum(n.values())
    assert facts["feature_cache_hits"] == 2 * (n["train"] + n["val"])
    assert plain.feature_cache["feature_cache"] == "off"
    assert len(cached.history) == len(plain.history) == 3
    for row_cached, row_plain in zip(cached.history, plain.history, strict=True):
        assert row_cached == pytest.approx(row_plain, rel=1e-5, abs=1e-6)
    assert cached.test == pytest.approx(plain.test, rel=1e-5, abs=1e-6)
