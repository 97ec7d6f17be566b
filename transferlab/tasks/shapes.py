"""Procedural ``shapes``: 1-3 coloured filled shapes per image, deterministic by seed, every target.

Each sample carries ``image`` (float32 3 x H x W, normalised with the fixed ``MEAN``/``STD``),
``label`` (int64, the kind of the largest shape by visible pixel area), ``mask`` (int64 H x W,
0 = background, k + 1 = kind k of the visible shape), ``box`` (float32 4, the largest shape's visible
pixels as normalised cx, cy, w, h), ``count`` (int64, shapes in the image), ``index`` (int64, the
sample's position in its full split) and, in ``extras``, a ``caption``.

Kinds (label order): circle, square, triangle, diamond, cross, star. Colours: red, green, blue,
yellow, magenta, cyan, white, distinct within an image. Shapes may overlap (later ones on top), but
every shape keeps at least half of its pixels visible and the largest one shows at least 1.25 times
the visible area of the second, so the label is never a coin toss. Scenes breaking these rules are
redrawn, which makes crowded scenes a little rarer: with the defaults about 41% of the images hold one
shape, 34% two and 25% three.

Caption grammar, shapes mentioned from the largest visible area down::

    caption  := first | first " " relation " " np | first " " relation " " np " and " np " at the " place
    first    := np " at the " place
    np       := "a " size " " colour " " kind
    size     := "small" | "medium" | "large"   # sqrt(visible pixels) / image side: < 0.18, < 0.30, else
    place    := "centre" | vertical | horizontal | vertical " " horizontal
    vertical := "top" | "bottom"               # box centre in the top / bottom third ("middle" dropped)
    horizontal := "left" | "right"             # box centre in the left / right third ("centre" dropped)
    relation := "above" | "below" | "to the left of" | "to the right of"   # first vs second box centre,
                                               # along the axis where they differ most (ties: vertical)

e.g. "a large red circle at the top left above a small blue square".

The ``target`` option picks what the task asks a head to predict (every field is in every batch):
``label`` (classification: cross-entropy, accuracy) or ``mask`` (segmentation into 1 + kinds classes,
background 0: per-pixel cross-entropy, mean IoU and pixel accuracy, see
:class:`~transferlab.tasks.objectives.SegmentationObjective`).
``box`` (localisation: the largest shape's box, normalised cx, cy, w, h of its visible pixels, and
its kind as the class: smooth L1 + GIoU loss, mean IoU ``iou`` and IoU >= 0.5 share ``acc50``, see
:class:`~transferlab.tasks.localization.BoxObjective`).
``image`` (reconstruction of the input itself by the ``autoencoder`` and ``vae`` heads: Bernoulli
cross-entropy, plus beta x KL for a VAE; PSNR (primary), SSIM and, for a VAE, ELBO, see
:class:`~transferlab.tasks.reconstruction.ReconstructionObjective`).

Class subsets keep the samples whose label (the largest shape) is in ``classes`` and renumber the
labels, so a split holds fewer samples than its ``*_size`` and the same images for every target. For
the label target, masks and captions keep the original kinds. For the mask target, the mask is
renumbered like the labels (kind ``classes[i]`` becomes ``i + 1``) and the pixels of shapes of other
kinds become background, as unannotated objects are in a real data set with fewer classes: A and B
halves of a split then segment disjoint kinds. Samples are generated in chunks of ``CHUNK`` with their
own seeds, so a smaller ``train_size`` gives a prefix of a larger one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from transferlab.registry import TASKS
from transferlab.tasks import splits
from transferlab.tasks.base import (
    SPLITS,
    ClassificationTask,
    InMemoryDataset,
    ObjectiveTask,
    TargetSpec,
    stable_hash,
)
from transferlab.tasks.objectives import target_objective
from transferlab.tasks.shapes_render import (
    COLOUR_NAMES,
    KINDS,
    MAX_SHAPES,
    RENDER_VERSION,
    RenderedShapes,
    render_scenes,
)
from transferlab.tasks.splits import (
    check_choice,
    check_classes,
    check_int,
    check_normalization,
    check_split,
    select_classes,
)

# Per-channel statistics of the default generator (20k images of 32 px), fixed so that the pixels of a
# sample never depend on the split sizes or the class subset.
MEAN = (0.175, 0.180, 0.173)
STD = (0.296, 0.295, 0.298)
CHUNK = 256
SIZE_WORDS = ((0.30, "large"), (0.18, "medium"), (0.0, "small"))
TARGETS = ("label", "mask", "box", "caption", "image")


class ShapesTask(ObjectiveTask, ClassificationTask):
    """Classify the largest shape or segment every shape; see :func:`shapes` and the module docstring.

    Class subsets pick shape kinds (0..5) whatever the target, so ``num_selectable_classes`` is 6
    even for masks, whose targets also hold the background.

    With ``target="label"`` this is a :class:`ClassificationTask`; any other target forwards loss and
    metrics to its objective (``self.objective``), whose primary metric the task reports.
    """

    name = "shapes"

    @property
    def num_selectable_classes(self) -> int:
        return len(KINDS)

    def __init__(self, **options: Any) -> None:
        self._options = options
        #: Per-channel (mean, std) subtracted from and divided into the [0, 1] pixels.
        self.normalization: tuple[tuple[float, ...], tuple[float, ...]] = (
            (tuple(options["mean"]), tuple(options["std"]))
            if options.get("mean") is not None
            else (MEAN, STD)
        )
        self.classes: tuple[int, ...] | None = options["classes"]
        size = options["image_size"]
        picked = self.classes if self.classes is not None else tuple(range(len(KINDS)))
        names = tuple(KINDS[c] for c in picked)
        kind = options.get("target", "label")
        if kind == "mask":  # class 0 is the background, class i + 1 the kind classes[i]
            names = ("background", *names)
        self.set_objective(target_objective(kind, len(names), self.normalization))
        self.target = TargetSpec(
            kind=kind,
            num_classes=len(names),
            in_channels=3,
            image_size=(size, size),
            class_names=names,
            vocabulary=tuple(getattr(self.objective, "vocabulary", ())),
            max_length=int(getattr(self.objective, "max_length", 0)),
        )
        self._datasets: dict[str, InMemoryDataset] | None = None

    def options(self) -> dict[str, Any]:
        """The factory options this task was built with (``classes`` as a list or None)."""
        classes = self._options["classes"]
        return {**self._options, "classes": list(classes) if classes is not None else None}

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "options": self.options(),
            "classes": list(self.target.class_names),
            "render_version": RENDER_VERSION,
        }

    def fingerprint(self) -> str:
        """Hash of the options, the generator version and the integer content of every split."""
        datasets = self._build()
        content = {
            split: [stable_hash(datasets[split].tensors[f]) for f in ("index", "label", "mask", "count")]
            for split in SPLITS
        }
        return stable_hash({"describe": self.describe(), "content": content})

    def dataset(self, split: str) -> Dataset:
        """``InMemoryDataset`` of ``split`` with the fields listed in the module docstring."""
        check_split(self.name, split)
        return self._build()[split]

    def _build(self) -> dict[str, InMemoryDataset]:
        if self._datasets is None:
            sizes = {s: self._options[f"{s}_size"] for s in SPLITS}
            self._datasets = {
                split: select_classes(*self._generate(code, sizes[split]), self.classes, len(KINDS))
                for code, split in enumerate(SPLITS)
            }
            if self.target.kind == "mask" and self.classes is not None:
                for dataset in self._datasets.values():
                    dataset.tensors["mask"] = subset_mask(dataset.tensors["mask"], self.classes)
            prepare = getattr(self.objective, "prepare", None)
            if prepare is not None:  # fields derived from the targets, e.g. caption token ids
                for dataset in self._datasets.values():
                    prepare(dataset)
        return self._datasets

    def _generate(self, split_code: int, size: int) -> tuple[dict[str, torch.Tensor], dict[str, list[Any]]]:
        opts = self._options
        tensors: dict[str, torch.Tensor] = {}
        captions: list[str] = []
        for lo in range(0, size, CHUNK):
            rng = np.random.default_rng([opts["seed"], split_code, lo // CHUNK])
            scenes = render_scenes(
                CHUNK, opts["image_size"], rng, min_shapes=opts["min_shapes"], max_shapes=opts["max_shapes"]
            )
            samples, chunk_captions = _to_samples(scenes, self.normalization)
            n = min(CHUNK, size - lo)  # the last chunk is rendered whole so that sizes share a prefix
            for name, values in samples.items():
                if name not in tensors:
                    tensors[name] = torch.empty((size, *values.shape[1:]), dtype=values.dtype)
                tensors[name][lo : lo + n] = values[:n]
            captions.extend(chunk_captions[:n])
        tensors["index"] = torch.arange(size)
        return tensors, {"caption": captions}


def subset_mask(mask: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """``mask`` (0 background, k + 1 kind k) renumbered: kind ``classes[i]`` -> i + 1, other kinds -> 0."""
    return splits.subset_mask(mask, classes, len(KINDS) + 1)


def _to_samples(
    scenes: RenderedShapes, normalization: tuple[tuple[float, ...], tuple[float, ...]]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Tensors (normalised image, label, mask, box, count) and captions of rendered scenes."""
    n = len(scenes.count)
    largest = scenes.largest
    mean = torch.tensor(normalization[0]).view(1, 3, 1, 1)
    std = torch.tensor(normalization[1]).view(1, 3, 1, 1)
    tensors = {
        "image": torch.from_numpy(scenes.image).sub_(mean).div_(std),
        "label": torch.from_numpy(scenes.kind[np.arange(n), largest]),
        "mask": torch.from_numpy(scenes.mask),
        "box": torch.from_numpy(scenes.box[np.arange(n), largest]),
        "count": torch.from_numpy(scenes.count),
    }
    side = scenes.owner.shape[-1]
    return tensors, [caption(scenes, i, side) for i in range(n)]


def caption(scenes: RenderedShapes, i: int, side: int) -> str:
    """The caption of scene ``i`` following the grammar in the module docstring."""
    slots = sorted(range(int(scenes.count[i])), key=lambda m: -int(scenes.visible[i, m]))
    phrases = [_noun_phrase(scenes, i, m, side) for m in slots]
    boxes = [scenes.box[i, m] for m in slots]
    text = f"{phrases[0]} at the {_place(boxes[0])}"
    if len(slots) >= 2:
        text += f" {_relation(boxes[0], boxes[1])} {phrases[1]}"
    if len(slots) >= 3:
        text += f" and {phrases[2]} at the {_place(boxes[2])}"
    return text


def _noun_phrase(scenes: RenderedShapes, i: int, slot: int, side: int) -> str:
    extent = float(np.sqrt(scenes.visible[i, slot])) / side
    size = next(word for low, word in SIZE_WORDS if extent >= low)
    return f"a {size} {COLOUR_NAMES[scenes.colour[i, slot]]} {KINDS[scenes.kind[i, slot]]}"


def _place(box: np.ndarray) -> str:
    vertical = ("top", "", "bottom")[min(int(box[1] * 3), 2)]
    horizontal = ("left", "", "right")[min(int(box[0] * 3), 2)]
    return " ".join(w for w in (vertical, horizontal) if w) or "centre"


def _relation(first: np.ndarray, second: np.ndarray) -> str:
    dx, dy = float(first[0] - second[0]), float(first[1] - second[1])
    if abs(dy) >= abs(dx):
        return "above" if dy < 0 else "below"
    return "to the left of" if dx < 0 else "to the right of"


@TASKS.register("shapes")
def shapes(
    *,
    classes: Sequence[int] | None = None,
    target: str = "label",
    image_size: int = 32,
    train_size: int = 2000,
    val_size: int = 400,
    test_size: int = 600,
    seed: int = 0,
    min_shapes: int = 1,
    max_shapes: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> ShapesTask:
    """Synthetic coloured shapes (deterministic by seed) with label, mask, box, count and caption.

    Args:
        classes: Kinds to keep, in label order (0 circle, 1 square, 2 triangle, 3 diamond, 4 cross,
            5 star): images whose largest shape is one of them; labels are renumbered
            0..len(classes)-1 (mask target: 1..len(classes), other kinds become background).
            ``None`` keeps all six.
        target: What a head predicts: "label" (the largest shape's kind) or "mask" (per pixel:
            0 background, i + 1 the i-th kept kind; primary metric ``miou``) or "box" (the
            largest shape's box and kind; primary metric ``iou``) or "image" (the input itself;
            primary metric ``psnr``).
        image_size: Height and width in pixels (>= 16).
        train_size: Images generated for the training split (before a class subset is applied).
        val_size: Images generated for the validation split.
        test_size: Images generated for the test split.
        seed: Generator seed; each split and each chunk of ``CHUNK`` images derives its own stream.
        min_shapes: Fewest shapes per image (1..3).
        max_shapes: Most shapes per image (min_shapes..3).
        mean: Per-channel means (3 values) to subtract from the [0, 1] pixels, with ``std``; by
            default ``MEAN``/``STD`` measured on this generator. A pretrained backbone's own
            normalisation is filled in by transferlab unless the spec sets these.
        std: Per-channel standard deviations (3 values).
    """
    check_choice("shapes", "target", target, TARGETS)
    normalization = check_normalization("shapes", mean, std, 3)
    min_shapes = check_int("shapes", "min_shapes", min_shapes, minimum=1, maximum=MAX_SHAPES)
    return ShapesTask(
        classes=check_classes("shapes", classes, KINDS),
        target=target,
        image_size=check_int("shapes", "image_size", image_size, minimum=16),
        train_size=check_int("shapes", "train_size", train_size, minimum=1),
        val_size=check_int("shapes", "val_size", val_size, minimum=1),
        test_size=check_int("shapes", "test_size", test_size, minimum=1),
        seed=check_int("shapes", "seed", seed, minimum=0),
        min_shapes=min_shapes,
        max_shapes=check_int("shapes", "max_shapes", max_shapes, minimum=min_shapes, maximum=MAX_SHAPES),
        mean=list(normalization[0]) if normalization else None,
        std=list(normalization[1]) if normalization else None,
    )
