"""The task contract: data for train/val/test, the target it provides, its loss and metrics.

A task never sees a model, only the head's output dict and the batch dict. Batches are dicts:
``image`` (float, N x C x H x W, normalised), and per target kind ``label`` (long, N), ``mask``
(long, N x H x W), ``box`` (float, N x 4, normalised cx, cy, w, h) or ``caption`` (list of str, with
its token ids in ``caption_tokens``); an ``image`` target is the input itself.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from transferlab.tasks.objectives import Objective

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class TargetSpec:
    """What a task asks a head to predict; heads are built from this and the backbone's feature_info.

    Attributes:
        kind: "label", "mask", "box", "caption", "image" or "sequence_label".
        num_classes: Classes of a label or mask target.
        in_channels: Channels of the input images (the backbone is built for this).
        image_size: Input height and width in pixels.
        class_names: Human-readable class names, index-aligned with the labels.
        input_key: The batch field the backbone reads ("image"; 1-D tasks may use e.g. "tokens").
        vocabulary: Caption targets: the words a decoder may emit, index-aligned with token ids
            (special tokens included, see ``transferlab.tasks.captioning``).
        max_length: Caption targets: the most tokens a decoded caption may have.
    """

    kind: str
    num_classes: int | None = None
    in_channels: int = 3
    image_size: tuple[int, int] = (32, 32)
    class_names: tuple[str, ...] = field(default_factory=tuple)
    input_key: str = "image"
    vocabulary: tuple[str, ...] = field(default_factory=tuple)
    max_length: int = 0


class InMemoryDataset(Dataset):
    """Samples held as stacked tensors, with optional per-sample Python values (e.g. captions).

    ``batch(indices)`` gathers a whole batch with one tensor index per field, which is far faster
    than collating single samples for small bundled data sets.
    """

    #: Whether building a batch costs per-sample work on the CPU (augmentation): such data sets stay
    #: on the host and may use DataLoader workers (``train.num_workers``).
    per_sample_work = False

    def __init__(self, tensors: dict[str, Tensor], extras: dict[str, list[Any]] | None = None) -> None:
        sizes = {len(t) for t in tensors.values()} | {len(v) for v in (extras or {}).values()}
        if len(sizes) != 1:
            raise ValueError(f"all fields must have the same number of samples, got sizes {sorted(sizes)}")
        self.tensors = tensors
        self.extras = extras or {}
        self._len = sizes.pop()

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:
        item: dict[str, Any] = {k: t[index] for k, t in self.tensors.items()}
        item.update({k: v[index] for k, v in self.extras.items()})
        return item

    def batch(self, indices: Tensor) -> dict[str, Any]:
        """The samples at ``indices`` (a 1-D long tensor) as one batch dict."""
        out: dict[str, Any] = {k: t[indices.to(t.device)] for k, t in self.tensors.items()}
        if self.extras:
            idx = indices.tolist()
            out.update({k: [v[i] for i in idx] for k, v in self.extras.items()})
        return out

    @property
    def device(self) -> torch.device:
        """Where the tensors are (the first field's device; ``to`` moves them all)."""
        return next(iter(self.tensors.values())).device if self.tensors else torch.device("cpu")

    @property
    def nbytes(self) -> int:
        """Bytes of the stacked tensors (the per-sample Python values not counted)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def to(self, device: torch.device | str) -> InMemoryDataset:
        """A copy whose tensors live on ``device`` (batches are then gathered there, without copies).

        The copy is a plain ``InMemoryDataset``: a subclass with its own ``batch`` must not be moved.
        """
        if type(self).batch is not InMemoryDataset.batch:
            raise TypeError(f"{type(self).__name__} gathers its own batches and cannot be moved to {device}")
        return InMemoryDataset({k: t.to(device) for k, t in self.tensors.items()}, self.extras)


def stable_hash(obj: Any) -> str:
    """A short SHA-256 of a JSON-serialisable object or of raw bytes/tensors."""
    h = hashlib.sha256()
    if isinstance(obj, Tensor):
        h.update(obj.detach().cpu().contiguous().numpy().tobytes())
    elif isinstance(obj, bytes):
        h.update(obj)
    else:
        h.update(json.dumps(obj, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


class Task(ABC):
    """Base class of every task.

    Subclasses set ``name``, ``target``, ``primary_metric`` and ``higher_is_better`` and implement
    ``dataset``, ``loss`` and ``metrics``.
    """

    name: str = "task"
    target: TargetSpec
    primary_metric: str = "accuracy"
    higher_is_better: bool = True
    #: Per-channel (mean, std) subtracted from and divided into the [0, 1] pixels of ``image``, or
    #: ``None`` when the input is not such an image; augmentation needs it (``engine.augment``).
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    @abstractmethod
    def dataset(self, split: str) -> Dataset:
        """The data set of ``split`` ("train", "val" or "test")."""

    @abstractmethod
    def loss(self, outputs: dict[str, Tensor], batch: dict[str, Any]) -> Tensor:
        """Scalar training loss from the head's outputs and the batch."""

    @abstractmethod
    def metrics(self) -> dict[str, Any]:
        """Fresh metric objects by name (torchmetrics ``Metric`` instances), primary one included."""

    @abstractmethod
    def update_metrics(
        self, metrics: dict[str, Any], outputs: dict[str, Tensor], batch: dict[str, Any]
    ) -> None:
        """Feed one batch to the metric objects returned by ``metrics``."""

    @property
    def num_selectable_classes(self) -> int:
        """How many classes ``classes=[...]`` may pick from (A/B splits, class subsets).

        The target's class count by default; a task whose target adds classes of its own (a mask's
        background) overrides it.
        """
        return self.target.num_classes or 0

    def fingerprint(self) -> str:
        """A hash identifying the exact samples, classes and transforms of every split."""
        return stable_hash(self.describe())

    def describe(self) -> dict[str, Any]:
        """A JSON-serialisable description for provenance (name, target, options)."""
        return {"name": self.name, "target": asdict(self.target)}


class ClassificationTask(Task):
    """A task whose target is one class label per image: cross-entropy and accuracy."""

    primary_metric = "accuracy"
    higher_is_better = True

    def loss(self, outputs: dict[str, Tensor], batch: dict[str, Any]) -> Tensor:
        return torch.nn.functional.cross_entropy(outputs["logits"].float(), batch["label"])

    def metrics(self) -> dict[str, Any]:
        from torchmetrics.classification import MulticlassAccuracy

        assert self.target.num_classes is not None
        return {"accuracy": MulticlassAccuracy(num_classes=self.target.num_classes, average="micro")}

    def update_metrics(
        self, metrics: dict[str, Any], outputs: dict[str, Tensor], batch: dict[str, Any]
    ) -> None:
        metrics["accuracy"].update(outputs["logits"].detach().float(), batch["label"])


class ObjectiveTask(Task):
    """A task whose loss and metrics come from ``self.objective`` (see ``tasks.objectives``).

    Listed before ``ClassificationTask`` among a subclass's bases, it forwards only while an
    objective is set and leaves label targets to cross-entropy and accuracy.
    """

    objective: Objective | None = None

    def set_objective(self, objective: Objective | None) -> None:
        """Use ``objective`` (None: the next base's loss and metrics) and its primary metric."""
        self.objective = objective
        if objective is not None:
            self.primary_metric = objective.primary_metric
            self.higher_is_better = objective.higher_is_better

    def loss(self, outputs: dict[str, Tensor], batch: dict[str, Any]) -> Tensor:
        if self.objective is None:
            return super().loss(outputs, batch)  # type: ignore[safe-super]
        return self.objective.loss(outputs, batch)

    def metrics(self) -> dict[str, Any]:
        if self.objective is None:
            return super().metrics()  # type: ignore[safe-super]
        return self.objective.metrics()

    def update_metrics(
        self, metrics: dict[str, Any], outputs: dict[str, Tensor], batch: dict[str, Any]
    ) -> None:
        if self.objective is None:
            super().update_metrics(metrics, outputs, batch)  # type: ignore[safe-super]
        else:
            self.objective.update_metrics(metrics, outputs, batch)


def remap_classes(labels: Tensor, classes: Sequence[int] | None, num_classes: int) -> tuple[Tensor, Tensor]:
    """Select samples whose label is in ``classes`` and renumber those labels 0..len(classes)-1.

    Returns:
        (mask of kept samples, new labels of the kept samples). ``None`` keeps every class.
    """
    if classes is None:
        return torch.ones_like(labels, dtype=torch.bool), labels.clone()
    bad = [c for c in classes if not 0 <= int(c) < num_classes]
    if bad:
        raise ValueError(f"classes {bad} are out of range; this task has classes 0..{num_classes - 1}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes {list(classes)} contain duplicates")
    lookup = torch.full((num_classes,), -1, dtype=torch.long)
    lookup[torch.tensor(list(classes), dtype=torch.long)] = torch.arange(len(classes))
    new = lookup[labels]
    keep = new >= 0
    return keep, new[keep]
