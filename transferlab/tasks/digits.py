"""scikit-learn's bundled handwritten digits (UCI optdigits test set: 1797 8x8 images, no download).

Images are scaled from 0..16 to [0, 1], resized with bilinear interpolation (antialiased) and
normalised with the mean and standard deviation of the whole 10-class training split, so the A and B
subsets of one transfer study see identically normalised pixels. The stratified train/val/test split is
made over all 10 classes before a class subset is applied: the samples a class contributes to a split
never depend on which subset was asked for.

The ``target`` option picks what a head predicts: ``label`` (the digit: cross-entropy, accuracy) or
``image`` (the input itself, for the ``autoencoder`` and ``vae`` heads: see
:class:`~transferlab.tasks.reconstruction.ReconstructionObjective`, primary metric ``psnr``). Both see
the same samples and pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from transferlab.registry import TASKS
from transferlab.tasks.base import (
    SPLITS,
    ClassificationTask,
    InMemoryDataset,
    ObjectiveTask,
    TargetSpec,
    stable_hash,
)
from transferlab.tasks.objectives import target_objective
from transferlab.tasks.splits import (
    check_choice,
    check_classes,
    check_fraction,
    check_int,
    check_normalization,
    check_split,
    select_classes,
    stratified_split,
)

NUM_CLASSES = 10
CLASS_NAMES = tuple(str(d) for d in range(NUM_CLASSES))
NATIVE_SIZE = 8
MAX_VALUE = 16.0  # load_digits pixels are integer counts 0..16
TARGETS = ("label", "image")


class DigitsTask(ObjectiveTask, ClassificationTask):
    """Digit classification (or reconstruction) on sklearn's digits; see :func:`digits` for the options.

    With ``target="label"`` this is a :class:`ClassificationTask`; ``target="image"`` forwards loss and
    metrics to its objective (``self.objective``), whose primary metric the task reports.
    """

    name = "digits"

    def __init__(
        self,
        *,
        classes: tuple[int, ...] | None,
        image_size: int,
        channels: int,
        val_fraction: float,
        test_fraction: float,
        split_seed: int,
        normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
        target: str = "label",
    ) -> None:
        self.classes = classes
        self.image_size = image_size
        self.channels = channels
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        picked = classes if classes is not None else tuple(range(NUM_CLASSES))
        self.target = TargetSpec(
            kind=target,
            num_classes=len(picked),
            in_channels=channels,
            image_size=(image_size, image_size),
            class_names=tuple(CLASS_NAMES[c] for c in picked),
        )
        self._datasets: dict[str, InMemoryDataset] | None = None
        self._given_normalization = normalization
        self._normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None
        self._raw_hash: str | None = None
        if target != "label":  # the image objective un-normalises pixels: build the data to know how
            self.set_objective(target_objective(target, len(picked), self.normalization))

    def options(self) -> dict[str, Any]:
        """The factory options this task was built with (``classes`` as a list or None).

        ``target`` is listed only when it is not the default ``label``, so the descriptions and
        fingerprints of label tasks recorded before the option existed stay the same.
        """
        target = {} if self.target.kind == "label" else {"target": self.target.kind}
        return {
            "classes": list(self.classes) if self.classes is not None else None,
            "image_size": self.image_size,
            "channels": self.channels,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "split_seed": self.split_seed,
            "mean": list(self._given_normalization[0]) if self._given_normalization else None,
            "std": list(self._given_normalization[1]) if self._given_normalization else None,
            **target,
        }

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "options": self.options(), "classes": list(self.target.class_names)}

    def fingerprint(self) -> str:
        """Hash of the options, the raw data and the original sample indices of every split."""
        datasets = self._build()
        indices = {split: stable_hash(datasets[split].tensors["index"]) for split in SPLITS}
        return stable_hash({"describe": self.describe(), "data": self._raw_hash, "indices": indices})

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel (mean, std) subtracted from and divided into the [0, 1] pixels (channels alike)."""
        self._build()
        assert self._normalization is not None
        return self._normalization

    def dataset(self, split: str) -> Dataset:
        """``InMemoryDataset`` with ``image`` (float32 N x C x H x W), ``label`` and ``index`` (int64 N).

        ``index`` is each sample's row in ``sklearn.datasets.load_digits()``.
        """
        check_split(self.name, split)
        return self._build()[split]

    def _build(self) -> dict[str, InMemoryDataset]:
        if self._datasets is not None:
            return self._datasets
        from sklearn.datasets import load_digits

        bunch = load_digits()
        raw = np.asarray(bunch.images, dtype=np.uint8)  # exact: the values are integers 0..16
        labels = np.asarray(bunch.target, dtype=np.int64)
        self._raw_hash = stable_hash(raw.tobytes() + labels.tobytes())
        fractions = {"val_fraction": self.val_fraction, "test_fraction": self.test_fraction}
        split_index = stratified_split(self.name, labels, **fractions, seed=self.split_seed)
        images = resize(torch.from_numpy(raw).float().div_(MAX_VALUE), self.image_size)
        if self.channels == 3:
            images = images.expand(-1, 3, -1, -1).contiguous()
        if self._given_normalization is None:
            train = images[torch.from_numpy(split_index["train"])]
            mean, std = float(train.mean()), float(train.std())
            self._normalization = ((mean,) * self.channels, (std,) * self.channels)
        else:
            self._normalization = self._given_normalization
        shape = (1, self.channels, 1, 1)
        mean_t, std_t = (torch.tensor(v).view(shape) for v in self._normalization)
        images = images.sub_(mean_t).div_(std_t)
        datasets = {}
        for split in SPLITS:
            rows = torch.from_numpy(split_index[split])
            tensors = {"image": images[rows], "label": torch.from_numpy(labels)[rows], "index": rows}
            datasets[split] = select_classes(tensors, None, self.classes, NUM_CLASSES)
        self._datasets = datasets
        return datasets


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """N x H x W images in [0, 1] to N x 1 x size x size, bilinear (antialiased when shrinking)."""
    images = images.unsqueeze(1)
    if images.shape[-1] == size:
        return images.contiguous()
    out = torch.nn.functional.interpolate(
        images, size=(size, size), mode="bilinear", align_corners=False, antialias=size < images.shape[-1]
    )
    return out.clamp_(0.0, 1.0)


@TASKS.register("digits")
def digits(
    *,
    classes: Sequence[int] | None = None,
    image_size: int = 32,
    channels: int = 1,
    val_fraction: float = 0.15,
    test_fraction: float = 0.25,
    split_seed: int = 0,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    target: str = "label",
) -> DigitsTask:
    """Real handwritten digits 0-9 from scikit-learn (1797 8x8 images, resized), stratified splits.

    Args:
        classes: Digits to keep, in label order (e.g. ``[0, 1, 2, 3, 4]`` for an A split); labels are
            renumbered 0..len(classes)-1. ``None`` keeps all ten.
        image_size: Output height and width in pixels (>= 8); 8 keeps the native resolution.
        channels: 1, or 3 to replicate the grey channel for backbones built for RGB.
        val_fraction: Share of all samples in the validation split, in (0, 0.5).
        test_fraction: Share of all samples in the test split, in (0, 0.5).
        split_seed: ``random_state`` of the stratified split.
        mean: Per-channel means to subtract from the [0, 1] pixels (with ``std``); by default the
            training split's mean and std, the same for every class subset. Set them to a pretrained
            backbone's normalisation (transferlab does when the backbone loads pretrained weights).
        std: Per-channel standard deviations to divide by.
        target: What a head predicts: "label" (the digit; primary metric ``accuracy``) or "image"
            (the input itself, for the ``autoencoder`` and ``vae`` heads; primary metric ``psnr``).
    """
    return DigitsTask(
        classes=check_classes("digits", classes, CLASS_NAMES),
        image_size=check_int("digits", "image_size", image_size, minimum=8),
        channels=check_choice("digits", "channels", channels, (1, 3)),
        val_fraction=check_fraction("digits", "val_fraction", val_fraction),
        test_fraction=check_fraction("digits", "test_fraction", test_fraction),
        split_seed=check_int("digits", "split_seed", split_seed, minimum=0, maximum=2**32 - 1),
        normalization=check_normalization("digits", mean, std, channels),
        target=check_choice("digits", "target", target, TARGETS),
    )
