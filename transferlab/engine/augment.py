"""Training-data augmentation with albumentations: the image, its mask and its box move together.

A spec's ``augment:`` list names albumentations transforms with their parameters, e.g.
``[HorizontalFlip, {name: Affine, rotate: [-15, 15], p: 0.5}]``. :func:`build_augmentation` turns it
into one ``albumentations.Compose`` whose bounding boxes are in the "yolo" format (normalised cx, cy,
w, h: transferlab's ``box``). :class:`AugmentedDataset` wraps a task's TRAINING split only; the
validation and test splits are never augmented, so their scores stay comparable across trials.

Per sample the wrapper un-normalises the image to [0, 1] pixels with the task's
:attr:`~transferlab.tasks.base.Task.normalization`, applies the pipeline to the image (H x W x C
float32), its ``mask`` (nearest-neighbour for geometric transforms) and its ``box`` (when the batch
has them), then normalises again. Other fields (label, count, caption) pass unchanged.

When the task's target is the box, a box moved entirely out of the image would vanish; the sample is
then kept un-augmented and counted (:attr:`AugmentedDataset.unaugmented`, with one warning), so no
sample loses its target silently. For any other target the box is only carried along: it is
clipped to the image as albumentations clips it, and a box moved entirely out becomes all zeros
(an empty box), while the sample stays augmented.

A caption target refuses spatial transforms (albumentations' ``DualTransform``: flips, affine,
crops, ...): they change what the caption says ("left", "right", "top") without rewriting it.
Pixel-level transforms (colour, noise, blur) are allowed.

Each sample's random draw is seeded by (trial seed, epoch, sample index), so a trial is reproducible,
a resumed trial redraws exactly what the interrupted one would have, and the draw does not depend on
the batch a sample lands in.
"""

from __future__ import annotations

import difflib
import inspect
import os
import warnings
from collections.abc import Mapping, Sequence
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from transferlab.tasks.base import InMemoryDataset, Task
from transferlab.tasks.splits import to_unit_pixels

if TYPE_CHECKING:
    import albumentations

# Transforms a spec may not name, and why: transferlab does their work itself, or they need inputs
# (callables, other samples, reference images, fonts) that a YAML spec cannot give.
NOT_ALLOWED = {
    "Normalize": "transferlab normalises the images itself",
    "ToFloat": "images reach the pipeline as float32 in [0, 1] already",
    "FromFloat": "images must stay float32 in [0, 1]",
    "ToTensorV2": "transferlab converts to tensors itself",
    "Lambda": "it needs Python callables",
    "Mosaic": "it needs other samples",
    "OverlayElements": "it needs per-sample metadata",
    "TextImage": "it needs per-sample metadata",
    "FDA": "it needs reference images",
    "HistogramMatching": "it needs reference images",
    "PixelDistributionAdaptation": "it needs reference images",
}
BOX_FORMAT = "yolo"  # normalised cx, cy, w, h, as the ``box`` field of a batch
WHERE = "see docs/augmentation.md"


def _albumentations() -> Any:
    """The albumentations module, imported without its update check (a PyPI request on import)."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations

    return albumentations


@cache
def transform_classes() -> dict[str, type]:
    """Every albumentations transform a spec may name: 2-D image or image + mask/box transforms."""
    A = _albumentations()
    from albumentations.core.transforms_interface import DualTransform, ImageOnlyTransform

    found = {}
    for name, cls in vars(A).items():
        if not inspect.isclass(cls) or cls in (DualTransform, ImageOnlyTransform):
            continue
        if name in NOT_ALLOWED or issubclass(cls, A.Transform3D):
            continue
        if issubclass(cls, (DualTransform, ImageOnlyTransform)):
            found[name] = cls
    return dict(sorted(found.items()))


def _parameters(cls: type) -> list[str]:
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # without self
    return [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _unknown_name(loc: str, name: str) -> tuple[str, str]:
    if name in NOT_ALLOWED:
        return loc, f"'{name}' cannot be used here: {NOT_ALLOWED[name]}"
    close = difflib.get_close_matches(name, list(transform_classes()), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return loc, f"'{name}' is not an albumentations transform; {hint}({WHERE} for the ones allowed)"


def _build_step(index: int, entry: Any) -> tuple[Any, list[tuple[str, str]]]:
    """One transform from a spec entry, or (None, problems naming ``augment[index].field``)."""
    loc = f"augment[{index}]"
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
        return None, [(loc, f"must be a transform name or a mapping with 'name', got {entry!r}")]
    params = {k: v for k, v in entry.items() if k != "name"}
    cls = transform_classes().get(entry["name"])
    if cls is None:
        return None, [_unknown_name(f"{loc}.name", entry["name"])]
    allowed = _parameters(cls)
    problems = []
    for key in params:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            problems.append(
                (
                    f"{loc}.{key}",
                    f"{entry['name']} has no parameter '{key}'; {hint}(allowed: {', '.join(allowed)})",
                )
            )
    if problems:
        return None, problems
    try:
        with warnings.catch_warnings():  # deprecation notes of renamed transforms are not errors
            warnings.simplefilter("ignore")
            return cls(**params), []
    except (TypeError, ValueError) as exc:
        return None, _parameter_problems(loc, entry["name"], exc)


def _parameter_problems(loc: str, name: str, exc: Exception) -> list[tuple[str, str]]:
    """Albumentations' own message per parameter (it validates parameters with pydantic)."""
    from pydantic import ValidationError

    cause = exc.__cause__ if isinstance(exc.__cause__, ValidationError) else exc
    if not isinstance(cause, ValidationError):
        return [(loc, f"{name}: {str(exc).strip()}")]
    by_field: dict[str, list[str]] = {}
    for error in cause.errors():
        field = str(error["loc"][0]) if error["loc"] else ""
        by_field.setdefault(field, []).append(f"{error['msg']} (got {error.get('input')!r})")
    return [
        (f"{loc}.{field}" if field else loc, f"{name}: {'; or '.join(messages)}")
        for field, messages in by_field.items()
    ]


def augmentation_problems(entries: Sequence[Any]) -> list[tuple[str, str]]:
    """(field, message) for every unknown transform, unknown parameter or bad value in ``entries``."""
    return [problem for i, entry in enumerate(entries) for problem in _build_step(i, entry)[1]]


def build_augmentation(entries: Sequence[Any] | None) -> albumentations.Compose | None:
    """The albumentations pipeline of a spec's ``augment`` list; ``None`` when it is empty.

    Args:
        entries: Transform names, or mappings with ``name`` and the transform's parameters.

    Raises:
        ValueError: naming ``augment[i].name`` or ``augment[i].PARAM`` for every problem found.
    """
    if not entries:
        return None
    steps, problems = [], []
    for i, entry in enumerate(entries):
        step, found = _build_step(i, entry)
        steps.append(step)
        problems += found
    if problems:
        raise ValueError("; ".join(f"{loc}: {message}" for loc, message in problems))
    A = _albumentations()
    boxes = A.BboxParams(format=BOX_FORMAT, label_fields=["box_labels"], clip=True)
    with warnings.catch_warnings():  # a pipeline of pixel-level transforms only leaves boxes alone
        warnings.filterwarnings("ignore", message="Got processor for bboxes")
        return A.Compose(steps, bbox_params=boxes, seed=0)


def pixel_normalization(task: Task) -> tuple[np.ndarray, np.ndarray]:
    """The task's per-channel (mean, std) as float32 arrays of shape (channels,).

    Raises:
        ValueError: The task's input is not an image normalised per channel.
    """
    target = task.target
    if target.input_key != "image":
        raise ValueError(
            f"task '{task.name}' reads '{target.input_key}', not images; augmentation applies to images only"
        )
    normalization = task.normalization
    shape = (target.in_channels,)
    if normalization is None or any(np.shape(v) != shape for v in normalization):
        raise ValueError(
            f"task '{task.name}' does not give a per-channel (mean, std) of its images "
            "(Task.normalization), which augmentation needs to see [0, 1] pixels"
        )
    mean, std = (np.asarray(v, dtype=np.float32) for v in normalization)
    return mean, std


class AugmentedDataset(InMemoryDataset):
    """A training split whose batches are augmented on the fly; see the module docstring.

    Args:
        dataset: The training split.
        pipeline: The albumentations pipeline (:func:`build_augmentation`).
        normalization: Per-channel (mean, std) of the images.
        seed: The trial's seed; each draw is seeded by (seed, epoch, sample index).
        target_kind: The task's target kind; "box" keeps a sample whose box left the image as it was.

    Attributes:
        unaugmented: Samples kept as they were because the pipeline moved their box (the target)
            out of the image.
    """

    per_sample_work = True

    def __init__(
        self,
        dataset: InMemoryDataset,
        pipeline: albumentations.Compose,
        normalization: tuple[np.ndarray, np.ndarray],
        seed: int,
        *,
        target_kind: str,
    ) -> None:
        super().__init__(dataset.tensors, dataset.extras)
        self.pipeline = pipeline
        self.mean, self.std = (torch.from_numpy(v).view(-1, 1, 1) for v in normalization)
        self.seed, self.epoch, self.unaugmented = int(seed), 0, 0
        #: A box pushed out of the image keeps its sample un-augmented only when the box is the target.
        self.box_is_target = target_kind == "box"

    def set_epoch(self, epoch: int) -> None:
        """Draw the augmentations of ``epoch`` (as ``DistributedSampler.set_epoch``)."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        batch = self.batch(torch.tensor([index]))
        return {k: v[0] for k, v in batch.items()}

    def batch(self, indices: torch.Tensor) -> dict[str, Any]:
        """The samples at ``indices``, each augmented with its own seeded draw."""
        out = super().batch(indices)  # gathered copies: the held tensors are never changed
        images, masks, boxes = out["image"], out.get("mask"), out.get("box")
        pixels = to_unit_pixels(images, self.mean, self.std).permute(0, 2, 3, 1).numpy()
        for row, index in enumerate(indices.tolist()):
            sample = self._augment(index, pixels[row], masks, boxes, row)
            if sample is None:  # the box left the image: keep this sample as it was
                continue
            image, mask, box = sample
            images[row] = (torch.from_numpy(image).permute(2, 0, 1) - self.mean) / self.std
            if masks is not None:
                masks[row] = torch.from_numpy(mask)
            if boxes is not None:
                boxes[row] = torch.from_numpy(box)
        return out

    def _augment(
        self, index: int, image: np.ndarray, masks: torch.Tensor | None, boxes: torch.Tensor | None, row: int
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None] | None:
        """(image, mask, box) of one sample after its draw; None when its box was pushed out."""
        data: dict[str, Any] = {"image": np.ascontiguousarray(image)}
        if masks is not None:
            data["mask"] = masks[row].numpy().copy()
        data["bboxes"] = boxes[row : row + 1].numpy() if boxes is not None else np.zeros((0, 4), np.float32)
        data["box_labels"] = [0] * len(data["bboxes"])
        self.pipeline.set_random_seed(
            int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])
        )
        result = self.pipeline(**data)
        if result["image"].shape[:2] != image.shape[:2]:
            raise ValueError(
                f"augment: the pipeline turned a {image.shape[0]}x{image.shape[1]} image into "
                f"{result['image'].shape[0]}x{result['image'].shape[1]}; every transform must keep the "
                "task's image size (give crops and resizes the task's image_size)"
            )
        box = None
        if boxes is not None and len(result["bboxes"]) == 0:  # moved entirely out of the image
            if self.box_is_target:
                self.unaugmented += 1
                if self.unaugmented == 1:
                    warnings.warn(
                        "augment: a transform moved a box entirely out of the image; such samples are "
                        "kept un-augmented (AugmentedDataset.unaugmented counts them); use smaller shifts",
                        stacklevel=3,
                    )
                return None
            box = np.zeros(4, dtype=np.float32)  # only carried along: an empty box, see the module docstring
        elif boxes is not None:
            box = np.asarray(result["bboxes"][0], dtype=np.float32)
        mask = np.asarray(result["mask"]) if masks is not None else None
        return result["image"].reshape(image.shape).astype(np.float32, copy=False), mask, box


def augmented_train_set(task: Task, entries: Sequence[Any], seed: int) -> AugmentedDataset:
    """The task's training split wrapped by :class:`AugmentedDataset` for the ``augment`` entries.

    Raises:
        ValueError: The entries are invalid, the task's input is not a normalised image, or its
            training split is not an ``InMemoryDataset``.
    """
    pipeline = build_augmentation(entries)
    if pipeline is None:
        raise ValueError("augment: the list of transforms is empty")
    refused = target_problems(entries, task)
    if refused:
        raise ValueError("; ".join(f"{loc}: {message}" for loc, message in refused))
    normalization = pixel_normalization(task)
    train = task.dataset("train")
    if not isinstance(train, InMemoryDataset):
        raise ValueError(
            f"task '{task.name}' gives a {type(train).__name__} training split; augmentation needs an "
            "InMemoryDataset (transferlab.tasks.base)"
        )
    return AugmentedDataset(train, pipeline, normalization, seed, target_kind=task.target.kind)


def target_problems(entries: Sequence[Any], task: Task) -> list[tuple[str, str]]:
    """(``augment[i].name``, why) for every transform ``task``'s target cannot take.

    A caption target takes no spatial transform (a ``DualTransform``): a flip, rotation, shift or
    crop changes what the caption says about positions, and the caption is not rewritten.
    """
    if task.target.kind != "caption":
        return []
    from albumentations.core.transforms_interface import DualTransform

    problems = []
    for i, entry in enumerate(entries):
        name = entry if isinstance(entry, str) else entry["name"]
        if issubclass(transform_classes()[name], DualTransform):
            problems.append(
                (
                    f"augment[{i}].name",
                    f"'{name}' is a spatial transform: it moves the image, which changes what a caption "
                    "says ('left', 'right', 'top', ...) without rewriting it; a caption target takes "
                    "pixel-level transforms only (e.g. ColorJitter, GaussNoise, Blur)",
                )
            )
    return problems


def check_augmentation(entries: Sequence[Any], task: Task) -> list[tuple[str, str]]:
    """Problems of an ``augment`` list for ``task``, found by building it and augmenting samples."""
    problems = augmentation_problems(entries)
    if not problems:
        problems = target_problems(entries, task)
    if problems:
        return problems
    try:
        train = augmented_train_set(task, entries, seed=0)
        train.batch(torch.arange(min(len(train), 4)))
    except Exception as exc:  # noqa: BLE001 - reported as a spec problem, with its message
        return [("augment", str(exc).strip().splitlines()[0].removeprefix("augment: "))]
    return []
