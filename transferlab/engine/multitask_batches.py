"""Batches of several tasks for multitask training: one per task per step, with as few trunk passes as
the inputs allow (see ``transferlab.engine.multitask``)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from transferlab.engine.fit import iterate_batches, to_device
from transferlab.tasks.base import InMemoryDataset

Batches = dict[str, dict[str, Any]]
"""A batch dict per task key."""


def same_inputs(datasets: Sequence[Dataset], input_key: str) -> bool:
    """Whether every data set is in memory and holds exactly the same input tensor."""
    if not all(isinstance(d, InMemoryDataset) and input_key in d.tensors for d in datasets):
        return False
    first = datasets[0].tensors[input_key]  # type: ignore[attr-defined]
    return all(torch.equal(d.tensors[input_key], first) for d in datasets[1:])  # type: ignore[attr-defined]


def aligned_batches(
    datasets: Mapping[str, InMemoryDataset],
    batch_size: int,
    input_key: str,
    generator: torch.Generator | None,
) -> Iterator[Batches]:
    """Batches of the same samples from data sets with the same inputs, sharing one input tensor."""
    n = len(next(iter(datasets.values())))
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        batches = {k: d.batch(order[start : start + batch_size]) for k, d in datasets.items()}
        inputs = next(iter(batches.values()))[input_key]
        for batch in batches.values():
            batch[input_key] = inputs  # one tensor: the trunk runs once for every task
        yield batches


def cycled_batches(
    datasets: Mapping[str, Dataset], batch_size: int, generator: torch.Generator, num_workers: int
) -> Iterator[Batches]:
    """One shuffled batch of each data set per step; shorter sets start over until the longest ends."""

    def restart(dataset: Dataset) -> Iterator[dict[str, Any]]:
        return iterate_batches(
            dataset, batch_size, shuffle=True, generator=generator, num_workers=num_workers
        )

    steps = max(math.ceil(len(d) / batch_size) for d in datasets.values())  # type: ignore[arg-type]
    running = {k: restart(d) for k, d in datasets.items()}
    for _ in range(steps):
        batches = {}
        for key, dataset in datasets.items():
            batch = next(running[key], None)
            if batch is None:
                running[key] = restart(dataset)
                batch = next(running[key])
            batches[key] = batch
        yield batches


def batches_to_device(batches: Batches, device: torch.device, input_key: str) -> Batches:
    """``to_device`` for each task's batch, keeping a shared input one tensor."""
    inputs = [b[input_key] for b in batches.values()]
    if not all(x is inputs[0] for x in inputs):
        return {k: to_device(b, device) for k, b in batches.items()}
    shared = to_device({input_key: inputs[0]}, device)
    return {
        k: to_device({f: v for f, v in b.items() if f != input_key}, device) | shared
        for k, b in batches.items()
    }
