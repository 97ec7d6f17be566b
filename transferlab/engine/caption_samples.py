"""Sample captions of a trained caption model: the reference beside greedy and beam decoding."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from transferlab.engine.fit import iterate_batches, to_device
from transferlab.engine.model import TransferModel
from transferlab.tasks.base import Task
from transferlab.tasks.captioning import caption_references, decode


def caption_samples(
    model: TransferModel, task: Task, dataset: Dataset, n: int = 8, *, beam_size: int = 3
) -> list[dict[str, str]]:
    """The first ``n`` samples of ``dataset`` captioned greedily and with beam search.

    Args:
        model: A model whose head decodes captions (``generate``, as the ``caption`` head has).
        task: The caption task (its target's vocabulary turns ids into words).
        dataset: The samples, e.g. ``task.dataset("test")``.
        n: How many samples (fewer if the data set is smaller).
        beam_size: Hypotheses per image for the beam-search caption.

    Returns:
        One dict per sample: ``reference`` (the caption; several references joined by " | "),
        ``greedy`` and ``beam``.
    """
    if task.target.kind != "caption":
        raise ValueError(
            f"task '{task.name}' has a {task.target.kind!r} target; sample captions need 'caption'"
        )
    generate = getattr(model.head, "generate", None)
    if generate is None:
        raise ValueError(f"head {type(model.head).__name__} cannot generate captions (it has no generate())")
    if n < 1 or len(dataset) == 0:  # type: ignore[arg-type]
        return []
    batch: dict[str, Any] = next(iterate_batches(dataset, n, shuffle=False, generator=None))
    device = next(model.parameters()).device
    batch = to_device(batch, device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            features = model.forward_features(batch[model.input_key])
            greedy = generate(features, "greedy")
            beam = generate(features, "beam", beam_size)
    finally:
        model.train(was_training)
    vocabulary = task.target.vocabulary
    references = [" | ".join(refs) for refs in caption_references(batch)]
    return [
        {"reference": ref, "greedy": g, "beam": b}
        for ref, g, b in zip(references, decode(greedy, vocabulary), decode(beam, vocabulary), strict=True)
    ]
