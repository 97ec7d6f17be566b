"""A PNG grid of what an image head makes: inputs, their reconstructions and samples from the prior.

Rows, top to bottom: the first ``n`` images of a data set as [0, 1] pixels, the model's
reconstructions of them (evaluation mode: a VAE decodes its posterior mean) and, for a head with a
``sample(n, generator)`` method (the VAE), ``samples`` images decoded from z ~ N(0, I). One-channel
images are drawn in grey, three-channel ones in RGB.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from transferlab.atomic import atomic_path
from transferlab.engine.fit import to_device
from transferlab.tasks.splits import to_unit_pixels

CELL_INCHES = 0.9  # side of one image in the figure
DPI = 80


def first_batch(dataset: Dataset, n: int) -> dict[str, Any]:
    """The first ``n`` samples of ``dataset`` (all of them when it is smaller) as one batch."""
    count = min(n, len(dataset))  # type: ignore[arg-type]
    if hasattr(dataset, "batch"):
        return dataset.batch(torch.arange(count))
    return default_collate([dataset[i] for i in range(count)])


def to_pixels(task: Any, images: Tensor) -> Tensor:
    """Normalised input images (N x C x H x W) in [0, 1] pixels, with the task's objective or mean/std."""
    objective = getattr(task, "objective", None)
    if hasattr(objective, "pixels"):
        return objective.pixels(images.float())
    normalization = getattr(task, "normalization", None)
    if normalization is None:
        raise ValueError(
            f"task '{task.name}' gives no normalisation to map its images back to pixels; "
            "image samples need an image target (target: image)"
        )
    return to_unit_pixels(images.float(), *normalization)


def image_rows(
    model: Any, task: Any, dataset: Dataset, n: int, samples: int, seed: int
) -> list[tuple[str, Tensor]]:
    """(title, [0, 1] images on the CPU) per row: inputs, reconstructions and, for a VAE, samples."""
    batch = first_batch(dataset, n)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outputs = model(to_device(batch, device))
            rows = [
                ("input", to_pixels(task, batch["image"])),
                ("reconstruction", outputs["reconstruction"].float().clamp(0.0, 1.0).cpu()),
            ]
            sample = getattr(model.head, "sample", None)
            if callable(sample) and samples > 0:
                generator = torch.Generator().manual_seed(seed)
                rows.append(("sample (prior)", sample(samples, generator=generator).float().cpu()))
    finally:
        model.train(was_training)
    return rows


def write_image_samples(
    model: Any,
    task: Any,
    dataset: Dataset,
    path: str | Path,
    n: int = 8,
    *,
    samples: int = 8,
    seed: int = 0,
) -> Path:
    """Write a PNG grid of inputs, reconstructions and (a head with ``sample``) prior samples.

    Args:
        model: A ``TransferModel`` whose head returns ``reconstruction`` ([0, 1] pixels).
        task: The task the data set comes from (its objective maps inputs back to pixels).
        dataset: The images to reconstruct: the first ``n`` are drawn.
        path: The PNG to write (atomically; its folder must exist).
        n: Images to reconstruct.
        samples: Images to draw from the prior when the head can sample (0: none).
        seed: Seed of the prior samples.

    Returns:
        ``path`` as a ``Path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if n < 1 or samples < 0:
        raise ValueError(
            f"write_image_samples: n must be >= 1 and samples >= 0, got n={n}, samples={samples}"
        )
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"cannot write the image samples to {path}: folder {path.parent} does not exist")
    rows = image_rows(model, task, dataset, n, samples, seed)
    columns = max(len(images) for _, images in rows)
    # A Figure with an Agg canvas renders without touching pyplot's global backend or state.
    figure = Figure(figsize=(CELL_INCHES * columns, CELL_INCHES * len(rows) + 0.3), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(rows), columns, squeeze=False)
    for r, (title, images) in enumerate(rows):
        for c in range(columns):
            axes[r][c].set_axis_off()
            if c < len(images):
                draw(axes[r][c], images[c])
        axes[r][0].set_title(title, loc="left", fontsize=8)
    with atomic_path(path, mode=0o644) as temporary:  # a figure is for sharing, not private
        figure.savefig(temporary, format="png", dpi=DPI)
    return path


def draw(axis: Any, image: Tensor) -> None:
    """Show one C x H x W image in [0, 1]: grey for one channel, RGB for three."""
    if image.shape[0] == 1:
        axis.imshow(image[0].numpy(), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        axis.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
