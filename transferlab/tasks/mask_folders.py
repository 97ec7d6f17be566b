"""``mask_folder``: a user's images with per-pixel class masks (semantic segmentation).

Layout: ``root/images/NAME.<ext>`` (any of ``IMAGE_EXTENSIONS``) and ``root/masks/NAME.png``, paired
by file stem (a random split), or pre-made splits in ``root/{train,val,test}/{images,masks}/``. A
mask is a single-channel PNG (8- or 16-bit grey, 1-bit, or a palette PNG, whose pixel indices are
read) of the image's size, with pixel value = class index. Class names come from the
``class_names`` option or from ``root/classes.txt`` (one name per line, line i names class i); class
0 is the background. VOC's 255 "void" border is not a class: map it to one before use.

Nothing is skipped silently: only hidden entries (names starting with ``.``) are ignored. An image
without a mask or a mask without an image, a stray file, a sub-folder, an unreadable, empty or
corrupt file, an RGB mask, a mask of another size than its image and a mask value that is not a
class are errors naming the files (all of them at once).

Pixels: the image as ``image_folder`` decodes it (EXIF orientation applied, RGB or grey, shorter side
resized to ``image_size`` bilinearly and the centre square cropped); the mask through the same
resize and crop with nearest-neighbour sampling, so every pixel keeps a class of the original mask.
Normalisation defaults to the per-channel mean and std of the training split.

Class subsets (A/B splits) pick among the foreground classes 1..K-1 by their index counted from 0,
as the shapes task's mask target does: ``classes[i]`` becomes i + 1 and every other class becomes
background 0; every image is kept.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transferlab.registry import TASKS
from transferlab.tasks.base import SPLITS, InMemoryDataset, ObjectiveTask, TargetSpec, stable_hash
from transferlab.tasks.folders import (
    DEFAULT_FRACTIONS,
    IMAGE_EXTENSIONS,
    MAX_IMAGES,
    DecodedImagesTask,
    ImageFolderError,
    _decode_problem,
    _listed,
    _subfolders,
    decode_images,
    folder_options,
)
from transferlab.tasks.objectives import SegmentationObjective
from transferlab.tasks.splits import (
    Normalization,
    check_choice,
    check_classes,
    check_int,
    check_normalization,
    check_split_options,
    normalized_pixels,
    split_tensors,
    stratified_split,
    subset_mask,
)

NAME = "mask_folder"
MASK_EXTENSION = ".png"
MASK_MODES = ("1", "L", "P", "I", "I;16", "I;16B", "I;16L")  # single channel: value = class index
CLASSES_FILE = "classes.txt"
PAIR_FOLDERS = ("images", "masks")


class MaskFolderError(ValueError):
    """The mask folder cannot be used as it is; the message names the folder or files and the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(message if message.startswith(f"{NAME}: ") else f"{NAME}: {message}")


@dataclass(frozen=True)
class PairListing:
    """Image files and their masks under a root folder, in a fixed order (paths relative to root).

    Attributes:
        premade: Split code (0 train, 1 val, 2 test) of each pair, or ``None`` for a random split.
    """

    root: Path
    images: tuple[Path, ...]
    masks: tuple[Path, ...]
    premade: np.ndarray | None


def _entries(folder: Path) -> tuple[list[str], list[str]]:
    """(visible sub-folder names, visible file names) of ``folder``, sorted."""
    try:
        return _subfolders(folder)
    except ImageFolderError as exc:  # the shared helper names image_folder
        raise MaskFolderError(str(exc).removeprefix("image_folder: ")) from None


def _files(folder: Path, extensions: Sequence[str], problems: list[str]) -> dict[str, Path]:
    """Files of ``folder`` by stem; sub-folders, other extensions and repeated stems go to ``problems``."""
    if not folder.is_dir():
        problems.append(f"{folder}: missing folder")
        return {}
    subfolders, names = _entries(folder)
    problems += [f"{folder / n}: a sub-folder (files must sit directly in {folder})" for n in subfolders]
    by_stem: dict[str, Path] = {}
    for name in names:
        path = folder / name
        if path.suffix.lower() not in extensions:
            problems.append(f"{path}: not {' or '.join(extensions)} by its extension")
        elif path.stem in by_stem:
            problems.append(f"{path}: same name as {by_stem[path.stem]} (pairs match by file stem)")
        else:
            by_stem[path.stem] = path
    return by_stem


def _pairs(base: Path, problems: list[str]) -> list[tuple[Path, Path]]:
    """(image, mask) pairs of ``base/images`` and ``base/masks``, sorted by stem."""
    images = _files(base / "images", IMAGE_EXTENSIONS, problems)
    masks = _files(base / "masks", (MASK_EXTENSION,), problems)
    problems += [
        f"{images[s]}: no mask {base / 'masks' / s}{MASK_EXTENSION}" for s in sorted(set(images) - set(masks))
    ]
    problems += [f"{masks[s]}: no image {base / 'images' / s}.*" for s in sorted(set(masks) - set(images))]
    return [(images[s], masks[s]) for s in sorted(set(images) & set(masks))]


def list_pairs(root: Path, max_images: int) -> PairListing:
    """Find every (image, mask) pair under ``root``; raise ``MaskFolderError`` on any problem."""
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is a file, not a folder"
        raise MaskFolderError(f"root '{root}' {what}; expected {root}/images/ and {root}/masks/")
    folders, files = _entries(root)
    premade = any(s in folders for s in SPLITS)
    expected = list(SPLITS) if premade else list(PAIR_FOLDERS)
    stray = [str(root / n) for n in folders if n not in expected]
    stray += [str(root / n) for n in files if n != CLASSES_FILE]
    if stray:
        raise MaskFolderError(
            f"'{root}' holds entries besides {', '.join(f'{e}/' for e in expected)} and {CLASSES_FILE}; "
            f"move them away:\n{_listed(stray)}"
        )
    problems: list[str] = []
    pairs, codes = [], []
    for code, base in enumerate([root / s for s in SPLITS] if premade else [root]):
        if premade and base.is_dir():  # a split folder holds images/ and masks/ only
            folders, files = _entries(base)
            problems += [
                f"{base / n}: not images/ or masks/" for n in folders + files if n not in PAIR_FOLDERS
            ]
        found = _pairs(base, problems)
        pairs += found
        codes += [code] * len(found)
    if problems:
        raise MaskFolderError(f"{len(problems)} problem(s) with the files:\n{_listed(problems)}")
    if len(pairs) > max_images:
        raise MaskFolderError(f"'{root}' holds {len(pairs)} images, more than max_images={max_images}")
    if premade and len(set(codes)) < len(SPLITS):
        empty = [s for i, s in enumerate(SPLITS) if i not in codes]
        raise MaskFolderError(f"split folder(s) {', '.join(empty)} of '{root}' hold no image")
    return PairListing(
        root=root,
        images=tuple(i.relative_to(root) for i, _ in pairs),
        masks=tuple(m.relative_to(root) for _, m in pairs),
        premade=np.asarray(codes, dtype=np.int64) if premade else None,
    )


def read_class_names(root: Path, given: Sequence[str] | None) -> tuple[str, ...]:
    """Class names from the ``class_names`` option or ``root/classes.txt`` (exactly one of them)."""
    path = root / CLASSES_FILE
    if given is not None and path.exists():
        raise MaskFolderError(f"class names are given twice: by class_names and by {path}; keep one")
    if given is None:
        if not path.is_file():
            raise MaskFolderError(
                f"no class names: give class_names: [background, ...] or write {path} (one name per line)"
            )
        try:
            given = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        except (OSError, UnicodeDecodeError) as exc:
            raise MaskFolderError(f"{path}: cannot be read as UTF-8 text ({exc})") from None
        while given and not given[-1]:
            given.pop()
    where = str(path) if path.exists() else "class_names"
    if isinstance(given, (str, bytes)) or not all(isinstance(n, str) and n.strip() for n in given):
        raise MaskFolderError(f"{where}: class names must be non-empty strings, got {list(given)!r}")
    names = tuple(n.strip() for n in given)
    if len(names) < 2 or len(set(names)) != len(names):
        raise MaskFolderError(
            f"{where}: needs at least 2 distinct class names (class 0 is the background), got {list(names)}"
        )
    return names


# -- decoding ---------------------------------------------------------------------------------------
def image_size_of(path: Path) -> tuple[int, int]:
    """(width, height) of an image file as displayed (EXIF orientation applied), from its header."""
    from PIL import Image

    with Image.open(path) as img:
        width, height = img.size
        if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated by 90 or 270 degrees
            return height, width
    return width, height


def decode_mask(
    data: bytes, size: int, image_size: tuple[int, int], class_names: Sequence[str]
) -> np.ndarray:
    """One encoded mask as int64 size x size class indices; ValueError says what is wrong with it."""
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()  # decodes everything: a truncated or corrupt file fails here
            bilevel = opened.mode == "1"  # pixels 0 and 1, not the 0 and 255 of convert("L")
            mask = Image.fromarray(np.asarray(opened, dtype=np.uint8)) if bilevel else opened.copy()
    except Exception as exc:  # noqa: BLE001 - every decoder failure is reported with its file
        raise ValueError(_decode_problem(exc)) from None
    if mask.mode not in MASK_MODES:
        raise ValueError(
            f"pixel mode '{mask.mode}': a mask must be single-channel (grey or palette PNG) with pixel "
            "value = class index"
        )
    if mask.size != image_size:
        raise ValueError(f"{mask.size[0]}x{mask.size[1]} pixels, its image {image_size[0]}x{image_size[1]}")
    values = np.asarray(mask)
    bad = np.unique(values[values >= len(class_names)])
    if bad.size:
        shown = ", ".join(map(str, bad[:8].tolist())) + (", ..." if bad.size > 8 else "")
        raise ValueError(
            f"pixel values {shown} are not classes (0..{len(class_names) - 1}: {', '.join(class_names)})"
        )
    if mask.mode.startswith("I"):
        mask = Image.fromarray(values.astype(np.int32))  # nearest resampling works on 32-bit integers
    fitted = ImageOps.fit(mask, (size, size), method=Image.Resampling.NEAREST)
    return np.asarray(fitted).astype(np.int64)


def decode_masks(listing: PairListing, size: int, class_names: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Every mask as int64 N x size x size, and each file's ``"bytes:sha256"`` digest.

    Raises:
        MaskFolderError: listing every mask that is unreadable, empty, corrupt, of the wrong mode or
            size, or holds values that are not classes.
    """
    masks = np.zeros((len(listing.masks), size, size), dtype=np.int64)
    digests, problems = [], []
    for i, (image, relative) in enumerate(zip(listing.images, listing.masks, strict=True)):
        path = listing.root / relative
        try:
            data = path.read_bytes()
        except OSError as exc:
            problems.append(f"{path}: cannot be read ({exc.strerror or exc})")
            digests.append("")
            continue
        digests.append(f"{len(data)}:{hashlib.sha256(data).hexdigest()[:16]}")
        if not data:
            problems.append(f"{path}: empty file (0 bytes)")
            continue
        try:
            masks[i] = decode_mask(data, size, image_size_of(listing.root / image), class_names)
        except ValueError as exc:
            problems.append(f"{path}: {exc}")
    if problems:
        raise MaskFolderError(f"{len(problems)} mask file(s) cannot be used:\n{_listed(problems)}")
    return masks, digests


# -- the task ---------------------------------------------------------------------------------------
def split_pairs(listing: PairListing, fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """Indices into the pairs per split: the pre-made folders, or a seeded random split."""
    if listing.premade is not None:
        return {split: np.flatnonzero(listing.premade == code) for code, split in enumerate(SPLITS)}
    try:  # one stratum: a plain random split, made by the helper every folder task shares
        return stratified_split(NAME, np.zeros(len(listing.images), dtype=np.int64), **fractions, seed=seed)
    except ValueError as exc:
        raise MaskFolderError(
            f"{str(exc).removeprefix(f'{NAME}: ')} (in '{listing.root}'); every split needs an image: "
            "add images (or change val_fraction and test_fraction)"
        ) from None


class MaskFolderTask(DecodedImagesTask, ObjectiveTask):
    """Segment a user's images by their masks; see :func:`mask_folder` and the module docstring.

    Building the task lists, decodes and splits every pair, so a bad folder fails here. Its data
    sets hold ``image`` (float32 N x C x H x W), ``mask`` (int64 N x H x W) and ``index`` (int64 N,
    each sample's position in :attr:`files`).
    """

    name = NAME

    def __init__(
        self,
        *,
        root: Path,
        class_names: Sequence[str] | None,
        classes: Sequence[int] | None,
        image_size: int,
        channels: int,
        fractions: dict[str, float] | None,
        split_seed: int | None,
        normalization: Normalization | None,
        max_images: int,
    ) -> None:
        self.listing = listing = list_pairs(root, max_images)
        if listing.premade is not None and (fractions or split_seed is not None):
            raise MaskFolderError(
                f"val_fraction, test_fraction and split_seed cannot apply: '{root}' has pre-made train/, "
                "val/ and test/ folders; remove the options or the split folders"
            )
        self.all_class_names = read_class_names(root, class_names)
        self.classes = check_classes(NAME, classes, self.all_class_names[1:])
        self.image_size, self.channels = image_size, channels
        self._given_class_names = class_names
        self._fractions, self._split_seed = fractions, split_seed
        self._given_normalization, self._max_images = normalization, max_images
        picked = self.classes if self.classes is not None else range(len(self.all_class_names) - 1)
        names = (self.all_class_names[0], *(self.all_class_names[c + 1] for c in picked))
        self.set_objective(SegmentationObjective(num_classes=len(names)))
        self.target = TargetSpec(
            kind="mask",
            num_classes=len(names),
            in_channels=channels,
            image_size=(image_size, image_size),
            class_names=names,
        )
        try:
            pixels, self._image_digests = decode_images(root, listing.images, image_size, channels)
        except ImageFolderError as exc:  # same decoder as image_folder; this task's name in front
            raise MaskFolderError(str(exc).removeprefix("image_folder: ")) from None
        masks, self._mask_digests = decode_masks(listing, image_size, self.all_class_names)
        self._pixels: tuple[np.ndarray, np.ndarray] | None = (pixels, masks)
        self.split_index = split_pairs(listing, {**DEFAULT_FRACTIONS, **(fractions or {})}, split_seed or 0)
        self._datasets: dict[str, InMemoryDataset] | None = None
        self._normalization: Normalization | None = None

    @property
    def num_selectable_classes(self) -> int:
        return len(self.all_class_names) - 1  # the background is not a class a subset picks

    @property
    def files(self) -> tuple[str, ...]:
        """Every image's path relative to ``root`` (POSIX form); a sample's ``index`` points in here."""
        return tuple(f.as_posix() for f in self.listing.images)

    def options(self) -> dict[str, Any]:
        """The factory options this task was built with (``None``: the default was used)."""
        names = list(self._given_class_names) if self._given_class_names is not None else None
        return {**folder_options(self), "class_names": names}

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "options": self.options(),
            "classes": list(self.target.class_names),
            "split": "pre-made" if self.listing.premade is not None else "random",
            "images": len(self.listing.images),
        }

    def fingerprint(self) -> str:
        """Hash of the options (root left out), class names, every file's content hash and the splits."""
        described = self.describe()
        described["options"] = {k: v for k, v in described["options"].items() if k != "root"}
        pairs = zip(self.files, self._image_digests, self._mask_digests, strict=True)
        content = {
            "class_names": list(self.all_class_names),
            "files": stable_hash([list(p) for p in pairs]),
            "indices": self.split_hashes(),
        }
        return stable_hash({"describe": described, "content": content})

    def _make_datasets(self) -> dict[str, InMemoryDataset]:
        assert self._pixels is not None
        pixels, masks = self._pixels
        images, self._normalization = normalized_pixels(
            pixels, self.split_index["train"], self._given_normalization
        )
        self._pixels = None  # the tensors replace the decoded arrays
        mask = torch.from_numpy(masks)
        if self.classes is not None:  # classes[i] -> i + 1, every other class -> background
            mask = subset_mask(mask, self.classes, len(self.all_class_names))
        parts = split_tensors(self.split_index, {"image": images, "mask": mask})
        return {s: InMemoryDataset(t) for s, t in parts.items()}


@TASKS.register(NAME)
def mask_folder(
    *,
    root: str | None = None,
    class_names: Sequence[str] | None = None,
    classes: Sequence[int] | None = None,
    image_size: int = 32,
    channels: int = 3,
    val_fraction: float | None = None,
    test_fraction: float | None = None,
    split_seed: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    max_images: int = MAX_IMAGES,
) -> MaskFolderTask:
    """Your own images with class-index masks (``images/`` + ``masks/``), held in memory.

    Args:
        root: The folder holding ``images/`` and ``masks/`` (and ``classes.txt``), or ``train/``,
            ``val/`` and ``test/`` folders that each hold ``images/`` and ``masks/``. Required.
        class_names: Names of the mask values 0..K-1 (0 the background); instead of
            ``root/classes.txt``.
        classes: Foreground classes to keep, as indices counted from 0 over classes 1..K-1; kept
            class ``classes[i]`` becomes mask value i + 1, the others background. ``None``: all.
        image_size: Output height and width in pixels (8..1024): the shorter side is resized to it
            and the centre square cropped, nearest-neighbour for the masks.
        channels: 3 (RGB) or 1 (grey) image channels.
        val_fraction: Share of all pairs in the validation split, in (0, 0.5); default 0.15. Not
            allowed with pre-made splits.
        test_fraction: Share of all pairs in the test split, in (0, 0.5); default 0.25. Not allowed
            with pre-made splits.
        split_seed: Seed of the random split; default 0. Not allowed with pre-made splits.
        mean: Per-channel means to subtract from the [0, 1] pixels (with ``std``); by default the
            training split's per-channel statistics.
        std: Per-channel standard deviations to divide by.
        max_images: Refuse folders with more pairs than this (all are decoded into memory).
    """
    if root is None:
        raise MaskFolderError("root is required: the folder holding images/ and masks/")
    if not isinstance(root, (str, os.PathLike)) or not str(root).strip():
        raise MaskFolderError(f"root must be a folder path, got {root!r}")
    fractions, split_seed = check_split_options(NAME, val_fraction, test_fraction, split_seed)
    channels = check_choice(NAME, "channels", channels, (1, 3))
    return MaskFolderTask(
        root=Path(root).expanduser(),
        class_names=class_names,
        classes=classes,
        image_size=check_int(NAME, "image_size", image_size, minimum=8, maximum=1024),
        channels=channels,
        fractions=fractions,
        split_seed=split_seed,
        normalization=check_normalization(NAME, mean, std, channels),
        max_images=check_int(NAME, "max_images", max_images, minimum=1),
    )
