"""``stripes``: procedural images of striped patterns, one class per pattern, deterministic by seed.

Classes (label order): horizontal, vertical, diagonal (top left to bottom right), antidiagonal,
checkerboard (two crossed waves) and rings (concentric around a random centre). Every image draws
its own stripe period (3-8 px at 32 px, scaled with the image), phase, a tilt of up to 15 degrees,
two colours that differ by at least 0.35 in every channel, and Gaussian pixel noise. Labels are
balanced within each split. Split ``s`` of seed ``seed`` is drawn from ``numpy.random.default_rng
([seed, s])``, so a split never depends on the others, and a class subset keeps the samples of its
classes and renumbers their labels ``0..k-1`` (the samples never depend on the subset).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from transferlab.tasks import ClassificationTask, InMemoryDataset, TargetSpec
from transferlab.tasks.base import SPLITS, remap_classes

PATTERNS = ("horizontal", "vertical", "diagonal", "antidiagonal", "checkerboard", "rings")
# Direction (degrees) along which the intensity of each line pattern varies.
ANGLES = {"horizontal": 90.0, "vertical": 0.0, "diagonal": -45.0, "antidiagonal": 45.0, "checkerboard": 0.0}
MAX_TILT = 15.0
MEAN, STD = 0.5, 0.25  # fixed normalisation: pixels of a sample never depend on the subset
GENERATOR_VERSION = 1  # bump when the images change, so fingerprints change too


class StripesTask(ClassificationTask):
    """Classify the stripe pattern of an image; see :func:`stripes` for the options."""

    name = "stripes"

    def __init__(self, *, classes: tuple[int, ...] | None, **options: Any) -> None:
        self.classes = classes
        self.options = options
        picked = classes if classes is not None else tuple(range(len(PATTERNS)))
        size = options["image_size"]
        self.target = TargetSpec(
            kind="label",
            num_classes=len(picked),
            in_channels=options["channels"],
            image_size=(size, size),
            class_names=tuple(PATTERNS[c] for c in picked),
        )
        self._datasets: dict[str, InMemoryDataset] = {}

    def describe(self) -> dict[str, Any]:
        """Name, target, options and generator version: with the seed they define every pixel."""
        classes = list(self.classes) if self.classes is not None else None
        return {
            **super().describe(),
            "options": {**self.options, "classes": classes},
            "generator_version": GENERATOR_VERSION,
        }

    def dataset(self, split: str) -> Dataset:
        """``InMemoryDataset`` with ``image`` (float32 N x C x H x W, normalised) and ``label`` (int64 N)."""
        if split not in SPLITS:
            raise ValueError(f"stripes: split must be one of {', '.join(SPLITS)}, got {split!r}")
        if split not in self._datasets:
            self._datasets[split] = self._generate(split)
        return self._datasets[split]

    def _generate(self, split: str) -> InMemoryDataset:
        opts = self.options
        n = opts[f"{split}_size"]
        rng = np.random.default_rng([opts["seed"], SPLITS.index(split)])
        labels = rng.permutation(np.arange(n) % len(PATTERNS))
        images = render(labels, opts["image_size"], rng, noise=opts["noise"])
        if opts["channels"] == 1:
            images = images.mean(axis=1, keepdims=True)
        image = torch.from_numpy(images).sub_(MEAN).div_(STD)
        keep, label = remap_classes(torch.from_numpy(labels), self.classes, len(PATTERNS))
        return InMemoryDataset({"image": image[keep], "label": label})


def render(labels: np.ndarray, size: int, rng: np.random.Generator, *, noise: float) -> np.ndarray:
    """RGB images (float32 N x 3 x size x size in [0, 1]) of the patterns ``labels`` index."""
    n = len(labels)
    period = rng.uniform(3.0, 8.0, n) * size / 32
    phase = rng.uniform(0.0, 2 * math.pi, (n, 2))
    tilt = np.radians(rng.uniform(-MAX_TILT, MAX_TILT, n))
    centre = rng.uniform(0.25, 0.75, (n, 2)) * size
    fg = rng.uniform(0.0, 1.0, (n, 3))
    bg = (fg + rng.uniform(0.35, 0.65, (n, 3))) % 1.0  # every channel differs by 0.35 or more
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    wave = np.empty((n, size, size))
    for i, label in enumerate(labels):
        k = 2 * math.pi / period[i]
        pattern = PATTERNS[label]
        if pattern == "rings":
            wave[i] = np.sin(k * np.hypot(x - centre[i, 0], y - centre[i, 1]) + phase[i, 0])
            continue
        angle = math.radians(ANGLES[pattern]) + tilt[i]
        along = x * math.cos(angle) + y * math.sin(angle)
        wave[i] = np.sin(k * along + phase[i, 0])
        if pattern == "checkerboard":  # a second wave at right angles
            across = -x * math.sin(angle) + y * math.cos(angle)
            wave[i] *= np.sin(k * across + phase[i, 1])
    mix = 0.5 + 0.5 * wave[:, None]  # N x 1 x H x W in [0, 1]
    images = bg[:, :, None, None] + (fg - bg)[:, :, None, None] * mix
    images += rng.normal(0.0, noise, images.shape)
    return np.clip(images, 0.0, 1.0).astype(np.float32)


def stripes(
    *,
    classes: Sequence[int] | None = None,
    image_size: int = 32,
    channels: int = 3,
    train_size: int = 1200,
    val_size: int = 300,
    test_size: int = 300,
    noise: float = 0.1,
    seed: int = 0,
) -> StripesTask:
    """Procedural striped patterns in 6 classes (horizontal, vertical, diagonal, ...), by seed.

    Args:
        classes: Pattern indices to keep, in label order (e.g. ``[0, 1, 2]`` for an A split); labels
            are renumbered 0..len(classes)-1. ``None`` keeps all six.
        image_size: Height and width in pixels (>= 8).
        channels: 3 for colour, 1 for grey (the mean of the colour channels).
        train_size: Samples drawn for the train split over all classes (a subset keeps its share).
        val_size: The same for the validation split.
        test_size: The same for the test split.
        noise: Standard deviation of the Gaussian pixel noise, on the [0, 1] pixel scale.
        seed: Seed of the generator; the same seed gives the same images.
    """
    if classes is not None:
        listing = ", ".join(f"{i}={p}" for i, p in enumerate(PATTERNS))
        picked = tuple(int(c) for c in classes)
        if (
            len(picked) < 2
            or len(set(picked)) != len(picked)
            or not all(0 <= c < len(PATTERNS) for c in picked)
        ):
            raise ValueError(
                f"stripes: classes must be 2 or more distinct indices of {listing}; got {list(classes)}"
            )
        classes = picked
    for option, value, minimum in (
        ("image_size", image_size, 8),
        ("train_size", train_size, 1),
        ("val_size", val_size, 1),
        ("test_size", test_size, 1),
        ("seed", seed, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"stripes: {option} must be an integer >= {minimum}, got {value!r}")
    if channels not in (1, 3):
        raise ValueError(f"stripes: channels must be 1 or 3, got {channels!r}")
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"stripes: noise must be in [0, 1], got {noise!r}")
    return StripesTask(
        classes=classes,
        image_size=image_size,
        channels=channels,
        train_size=train_size,
        val_size=val_size,
        test_size=test_size,
        noise=float(noise),
        seed=seed,
    )
