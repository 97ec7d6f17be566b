"""Helpers shared by the bundled tasks: option checks, stratified splits and class subsets.

Option checks raise ``ValueError`` messages of the form ``"digits: image_size must be >= 8, got 4"``
so a spec error names the task, the option, what is allowed and what was received.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from transferlab.tasks.base import SPLITS, InMemoryDataset, remap_classes


def check_int(task: str, option: str, value: Any, *, minimum: int, maximum: int | None = None) -> int:
    """``value`` as an int within ``[minimum, maximum]``, else a ValueError naming the option."""
    allowed = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{task}: {option} must be an integer {allowed}, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{task}: {option} must be {allowed}, got {value!r}")
    return int(value)


def check_fraction(task: str, option: str, value: Any, *, low: float = 0.0, high: float = 0.5) -> float:
    """``value`` as a float in the open interval ``(low, high)``, else a ValueError naming the option."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"{task}: {option} must be a number in ({low}, {high}), got {value!r}")
    if not low < float(value) < high:
        raise ValueError(f"{task}: {option} must be in ({low}, {high}), got {value!r}")
    return float(value)


def check_choice(task: str, option: str, value: Any, allowed: Sequence[Any]) -> Any:
    """``value`` if it is one of ``allowed``, else a ValueError naming the option and the choices."""
    if isinstance(value, bool) or value not in allowed:
        raise ValueError(f"{task}: {option} must be one of {list(allowed)}, got {value!r}")
    return value


def check_classes(
    task: str, classes: Sequence[int] | None, class_names: Sequence[str]
) -> tuple[int, ...] | None:
    """Validate a class subset: at least two distinct class indices of this task, in the given order.

    Returns:
        The classes as a tuple of ints, or ``None`` (every class) when ``classes`` is ``None``.
    """
    if classes is None:
        return None
    listing = ", ".join(f"{i}={name}" for i, name in enumerate(class_names))
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence):
        raise ValueError(f"{task}: classes must be a list of class indices ({listing}), got {classes!r}")
    try:
        picked = tuple(operator.index(c) for c in classes if not isinstance(c, bool))
    except TypeError:
        picked = ()
    if len(picked) != len(classes):
        raise ValueError(f"{task}: classes must be a list of class indices ({listing}), got {classes!r}")
    bad = [c for c in picked if not 0 <= c < len(class_names)]
    if bad:
        raise ValueError(f"{task}: classes {bad} are out of range; allowed: {listing}")
    if len(set(picked)) != len(picked):
        raise ValueError(f"{task}: classes {list(picked)} contain duplicates")
    if len(picked) < 2:
        raise ValueError(f"{task}: classes must name at least 2 classes, got {list(picked)}")
    return picked


def check_normalization(
    task: str, mean: Sequence[float] | None, std: Sequence[float] | None, channels: int
) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """Validate per-channel ``mean``/``std`` options (both or neither; one value per channel, std > 0)."""
    if mean is None and std is None:
        return None
    if mean is None or std is None:
        raise ValueError(f"{task}: give both mean and std (one value per channel), or neither")
    values = {}
    for option, given in (("mean", mean), ("std", std)):
        if isinstance(given, (str, bytes)) or not isinstance(given, Sequence) or len(given) != channels:
            raise ValueError(f"{task}: {option} needs {channels} values (one per channel), got {given!r}")
        values[option] = tuple(float(v) for v in given)
    if any(v <= 0 for v in values["std"]):
        raise ValueError(f"{task}: std values must be > 0, got {list(values['std'])}")
    return values["mean"], values["std"]


def check_split(task: str, split: str) -> None:
    """Raise a ValueError unless ``split`` is one of ``SPLITS``."""
    if split not in SPLITS:
        raise ValueError(f"{task}: unknown split {split!r}; allowed: {', '.join(SPLITS)}")


def stratified_split(
    task: str, labels: np.ndarray, *, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """Deterministic stratified train/val/test indices into ``labels``, each sorted ascending.

    The test split takes ``test_fraction`` of every class, the validation split ``val_fraction`` of the
    whole (taken from what is left), both with scikit-learn's ``train_test_split(stratify=...)``.
    """
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    try:
        rest, test = train_test_split(index, test_size=test_fraction, stratify=labels, random_state=seed)
        train, val = train_test_split(
            rest, test_size=val_fraction / (1.0 - test_fraction), stratify=labels[rest], random_state=seed
        )
    except ValueError as exc:  # e.g. a split too small to hold one sample of every class
        raise ValueError(
            f"{task}: cannot split {len(labels)} samples with val_fraction={val_fraction}, "
            f"test_fraction={test_fraction}: {exc}"
        ) from None
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def select_classes(
    tensors: dict[str, Tensor],
    extras: dict[str, list[Any]] | None,
    classes: Sequence[int] | None,
    num_classes: int,
) -> InMemoryDataset:
    """An InMemoryDataset of the samples whose ``label`` is in ``classes``, labels renumbered.

    Other fields (``mask`` included) are kept unchanged; ``classes=None`` keeps every sample.
    """
    if classes is None:  # every sample: no copies
        return InMemoryDataset(dict(tensors), dict(extras or {}))
    keep, labels = remap_classes(tensors["label"], classes, num_classes)
    kept = {name: (labels if name == "label" else t[keep]) for name, t in tensors.items()}
    where = torch.nonzero(keep).flatten().tolist()
    kept_extras = {name: [values[i] for i in where] for name, values in (extras or {}).items()}
    return InMemoryDataset(kept, kept_extras)
