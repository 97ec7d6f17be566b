"""Helpers shared by the bundled tasks (and the heads' option checks).

Option checks, reading a user's UTF-8 annotation files, normalising images with the training split's
statistics (and back to pixels), stratified splits and class subsets of labels and masks.

Option checks raise ``ValueError`` messages of the form ``"digits: image_size must be >= 8, got 4"``
so a spec error names the task (or head), the option, what is allowed and what was received.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from transferlab.tasks.base import SPLITS, InMemoryDataset, remap_classes

Normalization = tuple[tuple[float, ...], tuple[float, ...]]


def check_int(owner: str, option: str, value: Any, *, minimum: int, maximum: int | None = None) -> int:
    """``value`` as an int within ``[minimum, maximum]``, else a ValueError naming the option.

    Args:
        owner: What the option belongs to, the message's prefix: ``"digits"``, ``"head 'vae'"``.
    """
    allowed = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{owner}: {option} must be an integer {allowed}, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{owner}: {option} must be {allowed}, got {value!r}")
    return int(value)


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))


def check_nonnegative(owner: str, option: str, value: Any) -> float:
    """``value`` as a float >= 0, else a ValueError naming the option (``owner`` as in :func:`check_int`)."""
    if not _is_number(value) or not float(value) >= 0.0:
        raise ValueError(f"{owner}: {option} must be a number >= 0, got {value!r}")
    return float(value)


def check_dropout(owner: str, value: Any, option: str = "dropout") -> float:
    """A dropout probability: a number in [0, 1), else a ValueError naming the option."""
    if not _is_number(value) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{owner}: {option} must be in [0, 1), got {value!r}")
    return float(value)


def check_fraction(task: str, option: str, value: Any, *, low: float = 0.0, high: float = 0.5) -> float:
    """``value`` as a float in the open interval ``(low, high)``, else a ValueError naming the option."""
    if not _is_number(value):
        raise ValueError(f"{task}: {option} must be a number in ({low}, {high}), got {value!r}")
    if not low < float(value) < high:
        raise ValueError(f"{task}: {option} must be in ({low}, {high}), got {value!r}")
    return float(value)


def check_split_options(
    task: str, val_fraction: float | None, test_fraction: float | None, split_seed: int | None
) -> tuple[dict[str, float] | None, int | None]:
    """The given split fractions (``None`` when neither is given) and split seed, checked; a task
    with pre-made splits refuses them, one without fills in its defaults."""
    given = {"val_fraction": val_fraction, "test_fraction": test_fraction}
    fractions = {k: check_fraction(task, k, v) for k, v in given.items() if v is not None}
    if split_seed is not None:
        split_seed = check_int(task, "split_seed", split_seed, minimum=0, maximum=2**32 - 1)
    return fractions or None, split_seed


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


def read_utf8_text(
    path: Path, what: str, error: type[ValueError] = ValueError, expected: str = ""
) -> tuple[str, bytes]:
    """The text of a UTF-8 file (a leading byte-order mark dropped) and its bytes.

    Args:
        path: The file.
        what: What the file is, for messages ("annotation file").
        error: The exception class raised (a task's own ``ValueError`` subclass).
        expected: What an empty file should have held, added to its message.

    Raises:
        error: The file cannot be read, is empty (or blank), or is not UTF-8 (the line is named).
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise error(f"cannot read {what} '{path}': {exc.strerror or exc}") from None
    if not data.strip():
        raise error(f"{what} '{path}' is empty" + (f"; expected {expected}" if expected else ""))
    try:
        return data.decode("utf-8-sig"), data
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise error(
            f"{path}:{line}: not UTF-8 text ({exc.reason} at byte {exc.start}); save the file as UTF-8"
        ) from None


def normalized_images(
    images: Tensor, train: Tensor | np.ndarray, given: Normalization | None
) -> tuple[Tensor, Normalization]:
    """``images`` (float N x C x H x W in [0, 1]) normalised in place, and the (mean, std) used.

    Args:
        images: Every image of the task.
        train: Indices of the training split's images.
        given: Per-channel (mean, std) to use; ``None``: the training split's per-channel mean and
            standard deviation (a channel constant over that split is only centred).
    """
    if given is None:
        pixels = images[torch.as_tensor(train)]
        mean, std = pixels.mean(dim=(0, 2, 3)), pixels.std(dim=(0, 2, 3))
        std = torch.where(std < 1e-6, torch.ones_like(std), std)
        given = (tuple(mean.tolist()), tuple(std.tolist()))
    shape = (1, images.shape[1], 1, 1)
    mean_t, std_t = (torch.tensor(v, dtype=torch.float32).view(shape) for v in given)
    return images.sub_(mean_t).div_(std_t), given


def normalized_pixels(
    pixels: np.ndarray, train: Tensor | np.ndarray, given: Normalization | None
) -> tuple[Tensor, Normalization]:
    """Decoded 8-bit images (N x H x W x C) as float N x C x H x W in [0, 1], normalised by
    :func:`normalized_images`, and the (mean, std) used."""
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous().float().div_(255.0)
    return normalized_images(images, train, given)


def split_tensors(
    split_index: Mapping[str, np.ndarray], tensors: Mapping[str, Tensor]
) -> dict[str, dict[str, Tensor]]:
    """Per split, that split's rows of every tensor and ``index`` (the rows themselves, int64)."""
    out = {}
    for split in SPLITS:
        rows = torch.from_numpy(split_index[split])
        out[split] = {**{name: t[rows] for name, t in tensors.items()}, "index": rows}
    return out


def to_unit_pixels(images: Tensor, mean: Any, std: Any) -> Tensor:
    """Normalised images (N x C x H x W or C x H x W) back in [0, 1] pixels: ``images * std + mean``,
    clamped; ``mean`` and ``std`` hold one value per channel (a sequence, array or tensor)."""
    as_channels = {"dtype": images.dtype, "device": images.device}
    mean_t = torch.as_tensor(mean, **as_channels).reshape(-1, 1, 1)
    std_t = torch.as_tensor(std, **as_channels).reshape(-1, 1, 1)
    return (images * std_t + mean_t).clamp_(0.0, 1.0)


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


def subset_mask(mask: Tensor, classes: Sequence[int], num_values: int) -> Tensor:
    """``mask`` (0 background, k + 1 foreground class k) renumbered for a class subset.

    Foreground class ``classes[i]`` becomes i + 1 and every other class background 0.

    Args:
        mask: Class indices, values in ``0..num_values - 1``.
        classes: Foreground classes to keep, counted from 0 (mask value k + 1 is class k).
        num_values: Distinct mask values, the background included.
    """
    lookup = torch.zeros(num_values, dtype=mask.dtype)
    lookup[torch.tensor(list(classes)) + 1] = torch.arange(1, len(classes) + 1, dtype=mask.dtype)
    return lookup[mask]
