"""``image_folder``: a user's class-per-folder images (torchvision's ``ImageFolder`` layout).

Layout: ``root/<class name>/**/<image>`` (a random stratified split), or pre-made splits in
``root/{train,val,test}/<class name>/**/<image>`` (all three folders, the same class folders in each,
nothing else beside them; the fraction and seed options then do not apply). Classes are the sorted
class folder names (label i = i-th name); images may sit in nested folders of their class.

Nothing is skipped silently: only hidden entries (names starting with ``.``: ``.DS_Store``, macOS
``._photo.jpg``) are ignored. Any other file must be a readable image with one of ``IMAGE_EXTENSIONS``;
an empty, corrupt or truncated file, or one whose extension claims an image that is not one, is an
error naming the file (all such files at once).

Every image is decoded when the task is built, so ``transferlab validate`` finds a bad file before
anything runs, and held in memory (``max_images`` guards against folders far too big for that).
Pixels: EXIF orientation applied, alpha dropped, RGB (or grey for ``channels: 1``), the shorter side
resized to ``image_size`` (bilinear, antialiased) and the centre square cropped, as torchvision's
``Resize(s)`` + ``CenterCrop(s)``; a GIF gives its first frame. Normalisation defaults to the
per-channel mean and std of the whole training split (every class, so the A and B subsets of a
transfer study see identical pixels); a channel constant over that split is only centred.

A relative ``root`` is resolved against the working directory of the process that builds the task.
"""

from __future__ import annotations

import hashlib
import io
import os
from abc import abstractmethod
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from transferlab.registry import TASKS
from transferlab.tasks.base import SPLITS, ClassificationTask, InMemoryDataset, TargetSpec, Task, stable_hash
from transferlab.tasks.splits import (
    Normalization,
    check_choice,
    check_classes,
    check_int,
    check_normalization,
    check_split,
    check_split_options,
    normalized_pixels,
    select_classes,
    split_tensors,
    stratified_split,
)

NAME = "image_folder"
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".webp")
MAX_IMAGES = 200_000
DEFAULT_FRACTIONS = {"val_fraction": 0.15, "test_fraction": 0.25}
LISTED = 10  # problem files named in one error message; the rest are counted
ALLOWED = ", ".join(IMAGE_EXTENSIONS)


class ImageFolderError(ValueError):
    """The image folder cannot be used as it is; the message names the folder or files and the fix."""

    def __init__(self, message: str) -> None:
        # Idempotent, so that a copy unpickled from a Ray worker reads the same.
        super().__init__(message if message.startswith(f"{NAME}: ") else f"{NAME}: {message}")


@dataclass(frozen=True)
class FolderListing:
    """The image files of a root folder, in a fixed order, with their labels.

    Attributes:
        root: The root folder as given.
        class_names: Sorted class folder names; label i is ``class_names[i]``.
        files: Paths relative to ``root``: by split (pre-made: train, val, test), then by class in
            label order, then sorted by path (the order a random split starts from).
        labels: Class index of each file (int64).
        premade: Split code (0 train, 1 val, 2 test) of each file, or ``None`` for a random split.
    """

    root: Path
    class_names: tuple[str, ...]
    files: tuple[Path, ...]
    labels: np.ndarray
    premade: np.ndarray | None


def _listed(items: Sequence[str]) -> str:
    """Up to ``LISTED`` items, one per line, and how many more there are."""
    lines = [f"  {item}" for item in items[:LISTED]]
    if len(items) > LISTED:
        lines.append(f"  (and {len(items) - LISTED} more)")
    return "\n".join(lines)


def _visible(names: list[str]) -> list[str]:
    return sorted(n for n in names if not n.startswith("."))


def _subfolders(folder: Path) -> tuple[list[str], list[str]]:
    """(visible sub-folder names, visible other entry names) of ``folder``, sorted."""
    try:
        with os.scandir(folder) as scan:
            entries = list(scan)
    except OSError as exc:
        raise ImageFolderError(f"cannot list folder '{folder}': {exc.strerror or exc}") from None
    folders = _visible([e.name for e in entries if e.is_dir()])
    others = _visible([e.name for e in entries if not e.is_dir()])
    return folders, others


def _class_folders(folder: Path) -> list[str]:
    """The class folder names of ``folder`` (at least 2; no stray files beside them)."""
    folders, others = _subfolders(folder)
    layout = f"expected {folder}/<class name>/<images> ({ALLOWED})"
    if others:
        raise ImageFolderError(
            f"'{folder}' holds files outside class folders; move them away (only hidden dot-files are "
            f"ignored), {layout}:\n{_listed([str(folder / n) for n in others])}"
        )
    if not folders:
        raise ImageFolderError(f"'{folder}' has no class sub-folders; {layout}")
    if len(folders) < 2:
        raise ImageFolderError(
            f"'{folder}' has only 1 class folder ('{folders[0]}'); a classifier needs at least 2"
        )
    return folders


def _images_in(folder: Path, problems: list[str]) -> list[Path]:
    """Image files under ``folder`` (recursively, hidden entries pruned); other files go to ``problems``."""
    found: list[Path] = []
    seen: set[str] = set()
    for current, dirnames, filenames in os.walk(folder, followlinks=True, onerror=_raise_walk_error):
        real = os.path.realpath(current)
        if real in seen:  # a symbolic link back to a folder already listed
            raise ImageFolderError(f"folder '{current}' links back to a folder already listed ({real})")
        seen.add(real)
        dirnames[:] = _visible(dirnames)
        for name in _visible(filenames):
            path = Path(current) / name
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                found.append(path)
            else:
                problems.append(str(path))
    return found


def _raise_walk_error(exc: OSError) -> None:
    raise ImageFolderError(f"cannot list folder '{exc.filename}': {exc.strerror or exc}")


def _split_bases(root: Path) -> list[Path]:
    """``[root]`` for a random split, or its train, val and test folders for pre-made splits."""
    folders, files = _subfolders(root)
    present = [s for s in SPLITS if s in folders]
    if not present:
        return [root]
    missing = [s for s in SPLITS if s not in folders]
    if missing:
        raise ImageFolderError(
            f"'{root}' has split folder(s) {', '.join(present)} but not {', '.join(missing)}; give all "
            "three of train/, val/ and test/ (pre-made splits), or class folders only (a random "
            "stratified split)"
        )
    others = [n for n in folders if n not in SPLITS] + files
    if others:
        raise ImageFolderError(
            f"'{root}' holds {', '.join(others)} beside its train/, val/ and test/ folders; move them away"
        )
    return [root / s for s in SPLITS]


def _same_classes(bases: list[Path]) -> list[str]:
    """The class folders of the first base; every other base must have the same ones."""
    class_names = _class_folders(bases[0])
    for base in bases[1:]:
        names = _class_folders(base)
        lacking, extra = sorted(set(class_names) - set(names)), sorted(set(names) - set(class_names))
        if lacking or extra:
            parts = [f"lacks class folder(s) {lacking}"] if lacking else []
            parts += [f"has class folder(s) {extra} that '{bases[0]}' lacks"] if extra else []
            raise ImageFolderError(
                f"'{base}' {' and '.join(parts)}; every split folder needs the same class folders"
            )
    return class_names


def list_folder(root: Path, max_images: int) -> FolderListing:
    """Find the classes and image files under ``root``; raise ``ImageFolderError`` on any problem."""
    if not root.exists():
        raise ImageFolderError(f"root folder '{root}' does not exist (looked for {root.resolve()})")
    if not root.is_dir():
        raise ImageFolderError(f"root '{root}' is a file, not a folder of class sub-folders")
    bases = _split_bases(root)
    class_names = _same_classes(bases)
    files: list[Path] = []
    labels: list[int] = []
    codes: list[int] = []
    not_images: list[str] = []
    empty: list[str] = []
    for code, base in enumerate(bases):
        for label, name in enumerate(class_names):
            found = sorted(_images_in(base / name, not_images), key=lambda p: p.relative_to(root).as_posix())
            if not found:
                empty.append(str(base / name))
            files += found
            labels += [label] * len(found)
            codes += [code] * len(found)
    if len(files) > max_images:
        raise ImageFolderError(
            f"'{root}' holds {len(files)} images, more than max_images={max_images}: every image is "
            "decoded into memory (4 bytes per channel and pixel), as this task is meant for small data "
            "sets; raise max_images if this machine has the memory"
        )
    if not_images:
        raise ImageFolderError(
            f"{len(not_images)} file(s) are not images by their extension (allowed: {ALLOWED}; only "
            f"hidden dot-files are ignored); move or delete them:\n{_listed(not_images)}"
        )
    if empty:
        raise ImageFolderError(f"class folder(s) holding no images ({ALLOWED}):\n{_listed(empty)}")
    return FolderListing(
        root=root,
        class_names=tuple(class_names),
        files=tuple(f.relative_to(root) for f in files),
        labels=np.asarray(labels, dtype=np.int64),
        premade=np.asarray(codes, dtype=np.int64) if len(bases) > 1 else None,
    )


# -- decoding ---------------------------------------------------------------------------------------
def decode_images(
    root: Path, files: Sequence[Path], image_size: int, channels: int
) -> tuple[np.ndarray, list[str]]:
    """Every file decoded to uint8 N x size x size x channels, and each file's ``"bytes:sha256"``.

    Raises:
        ImageFolderError: listing every file that is unreadable, empty, not an image or corrupt.
    """
    pixels = np.empty((len(files), image_size, image_size, channels), dtype=np.uint8)
    results = decode_files([root / relative for relative in files], pixels)
    problems = [f"{root / f}: {p}" for f, (_, p, _) in zip(files, results, strict=True) if p is not None]
    if problems:
        raise ImageFolderError(
            f"{len(problems)} image file(s) cannot be used; replace or delete them:\n{_listed(problems)}"
        )
    return pixels, [digest for digest, _, _ in results]


def decode_workers(count: int) -> int:
    """Threads that decode ``count`` files: the process's torch threads (its CPU share), at most 8."""
    return max(1, min(8, torch.get_num_threads(), count // 16))


def decode_files(
    paths: Sequence[Path], pixels: np.ndarray, *, crop: bool = True
) -> list[tuple[str, str | None, tuple[int, int]]]:
    """:func:`decode_file` of every path into ``pixels[i]``, in order, by :func:`decode_workers` threads.

    Reading, hashing, decoding and resizing release the GIL (PIL's codecs, hashlib on large buffers), so
    threads decode a folder about as many times faster as the process has CPUs; the pixels are the same.
    """
    workers = decode_workers(len(paths))
    if workers > 1:  # load every format plugin now: threads that race to do it can miss one (WebP)
        from PIL import Image

        Image.init()
    if workers == 1:
        return [decode_file(path, pixels, i, crop=crop) for i, path in enumerate(paths)]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        return list(pool.map(lambda item: decode_file(item[1], pixels, item[0], crop=crop), enumerate(paths)))


def decode_file(
    path: Path, pixels: np.ndarray, i: int, *, crop: bool = True
) -> tuple[str, str | None, tuple[int, int]]:
    """(``"bytes:sha256"``, what is wrong or None, displayed (width, height)) of one image file,
    decoded into ``pixels[i]`` by :func:`decoded_pixels`; the caller names the file in a problem."""
    try:
        if not path.is_file():
            raise OSError("no such file" if not path.exists() else "not a regular file")
        data = path.read_bytes()
    except OSError as exc:
        return "", f"cannot be read ({exc.strerror or exc})", (0, 0)
    digest = f"{len(data)}:{hashlib.sha256(data).hexdigest()[:16]}"
    if not data:
        return digest, "empty file (0 bytes)", (0, 0)
    size, channels = pixels.shape[1], pixels.shape[3]
    try:
        pixels[i], displayed = decoded_pixels(data, size, channels, crop=crop)
    except Exception as exc:  # noqa: BLE001 - every decoder failure is reported with its file
        return digest, _decode_problem(exc), (0, 0)
    return digest, None, displayed


def decoded_pixels(
    data: bytes, size: int, channels: int, *, crop: bool
) -> tuple[np.ndarray, tuple[int, int]]:
    """One encoded image as uint8 size x size x channels, and its displayed (width, height).

    EXIF orientation applied, 16-bit grey scaled to 8 bits, palette and transparency resolved, alpha
    dropped, RGB or grey. ``crop``: the shorter side resized to ``size`` and the centre square cropped
    (torchvision's ``Resize`` + ``CenterCrop``); otherwise the whole image stretched to size x size
    (the aspect ratio is not kept, so boxes keep their normalised coordinates).
    """
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as opened:
        opened.load()  # decodes everything: a truncated or corrupt file fails here
        img = ImageOps.exif_transpose(opened)
    if img.mode.startswith("I;16"):  # 16-bit grey: scale 0..65535 to 0..255
        img = Image.fromarray((np.asarray(img, dtype=np.float32) / 257.0).round().astype(np.uint8))
    elif img.mode in ("I", "F"):
        raise ValueError(f"pixel mode '{img.mode}' (32-bit) is not supported; save it with 8 or 16 bits")
    if img.mode in ("P", "PA", "LA", "RGBA") or "transparency" in img.info:
        img = img.convert("RGBA")  # palette and transparency resolved first; alpha dropped below
    displayed = img.size
    img = img.convert("L" if channels == 1 else "RGB")
    bilinear = Image.Resampling.BILINEAR
    img = ImageOps.fit(img, (size, size), method=bilinear) if crop else img.resize((size, size), bilinear)
    return np.asarray(img, dtype=np.uint8).reshape(size, size, channels), displayed


def _decode_problem(exc: Exception) -> str:
    from PIL import Image, UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return "not an image file (Pillow cannot identify its format)"
    if isinstance(exc, Image.DecompressionBombError):
        return f"too many pixels ({exc})"
    return f"corrupt or truncated image ({type(exc).__name__}: {exc})"


# -- splits -----------------------------------------------------------------------------------------
def split_indices(listing: FolderListing, fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """Indices into ``listing.files`` per split: the pre-made folders, or a stratified random split.

    Raises:
        ImageFolderError: a class too small to give every split at least one image.
    """
    if listing.premade is not None:
        return {split: np.flatnonzero(listing.premade == code) for code, split in enumerate(SPLITS)}
    counts = np.bincount(listing.labels, minlength=len(listing.class_names))
    where = {name: listing.root / name for name in listing.class_names}
    few = [
        f"{where[n]}: {c} image(s)"
        for n, c in zip(listing.class_names, counts, strict=True)
        if c < len(SPLITS)
    ]
    if few:
        raise ImageFolderError(
            "every class needs at least 3 images, one for each of train, val and test; these have "
            f"fewer:\n{_listed(few)}"
        )
    try:
        index = stratified_split(NAME, listing.labels, **fractions, seed=seed)
    except ValueError as exc:  # a split too small to hold one image of every class
        per_class = ", ".join(f"{n} {c}" for n, c in zip(listing.class_names, counts, strict=True))
        raise ImageFolderError(
            f"{str(exc).removeprefix(f'{NAME}: ')} (in '{listing.root}', images per class: {per_class}); "
            "add images or raise the fractions"
        ) from None
    missing = [
        f"{where[name]} ({counts[label]} images): none in {split}"
        for split in SPLITS
        for label, name in enumerate(listing.class_names)
        if not np.any(listing.labels[index[split]] == label)
    ]
    if missing:
        shown = ", ".join(f"{k}={v}" for k, v in fractions.items())
        raise ImageFolderError(
            f"with {shown} some splits get no image of a class; add images to these classes or raise "
            f"the fraction:\n{_listed(missing)}"
        )
    return index


# -- the task ---------------------------------------------------------------------------------------


def folder_options(task: Any) -> dict[str, Any]:
    """The options every folder task (``image_folder``, ``mask_folder``) was built with.

    ``None`` means the default was used; the task supplies ``listing``, ``classes``, ``image_size``,
    ``channels`` and the private split, normalisation and size settings it was given.
    """
    given = task._given_normalization
    return {
        "root": str(task.listing.root),
        "classes": list(task.classes) if task.classes is not None else None,
        "image_size": task.image_size,
        "channels": task.channels,
        **{k: (task._fractions or {}).get(k) for k in DEFAULT_FRACTIONS},
        "split_seed": task._split_seed,
        "mean": list(given[0]) if given else None,
        "std": list(given[1]) if given else None,
        "max_images": task._max_images,
    }


class DecodedImagesTask(Task):
    """A task over images decoded into memory when it is built; the float images, normalised with
    the training split's statistics, and every split's data set are made on first use."""

    _datasets: dict[str, InMemoryDataset] | None = None
    _normalization: Normalization | None = None

    @abstractmethod
    def _make_datasets(self) -> dict[str, InMemoryDataset]:
        """Every split's data set from the decoded images; sets ``_normalization``."""

    def _build(self) -> dict[str, InMemoryDataset]:
        if self._datasets is None:
            self._datasets = self._make_datasets()
        return self._datasets

    @property
    def normalization(self) -> Normalization:
        """Per-channel (mean, std) subtracted from and divided into the [0, 1] pixels."""
        self._build()
        assert self._normalization is not None
        return self._normalization

    def dataset(self, split: str) -> Dataset:
        """The ``InMemoryDataset`` of ``split`` (its fields in the class docstring)."""
        check_split(self.name, split)
        return self._build()[split]

    def split_hashes(self) -> dict[str, str]:
        """Per split, the hash of its ``index`` tensor (which images it holds), for fingerprints."""
        return {split: stable_hash(self._build()[split].tensors["index"]) for split in SPLITS}


class ImageFolderTask(DecodedImagesTask, ClassificationTask):
    """Classify a user's class-per-folder images; see :func:`image_folder` and the module docstring.

    Building the task lists, decodes and splits every image, so a bad folder fails here. Its data
    sets hold ``image`` (float32 N x C x H x W), ``label`` and ``index`` (int64 N, each sample's
    position in :attr:`files`).
    """

    name = NAME

    def __init__(
        self,
        *,
        root: Path,
        classes: Sequence[int] | None,
        image_size: int,
        channels: int,
        fractions: dict[str, float] | None,
        split_seed: int | None,
        normalization: Normalization | None,
        max_images: int,
    ) -> None:
        listing = list_folder(root, max_images)
        random_options = [
            k for k, v in {**(fractions or {}), "split_seed": split_seed}.items() if v is not None
        ]
        if listing.premade is not None and random_options:
            raise ImageFolderError(
                f"{' and '.join(random_options)} cannot apply: '{root}' has pre-made train/, val/ and test/ "
                "folders; remove the option(s) or the split folders"
            )
        self.classes = check_classes(NAME, classes, listing.class_names)
        self.listing = listing
        self.image_size, self.channels = image_size, channels
        self._fractions, self._split_seed = fractions, split_seed
        self._given_normalization = normalization
        self._max_images = max_images
        picked = self.classes if self.classes is not None else range(len(listing.class_names))
        self.target = TargetSpec(
            kind="label",
            num_classes=len(picked),
            in_channels=channels,
            image_size=(image_size, image_size),
            class_names=tuple(listing.class_names[c] for c in picked),
        )
        self._pixels: np.ndarray | None
        self._pixels, self._digests = decode_images(root, listing.files, image_size, channels)
        split_fractions = {**DEFAULT_FRACTIONS, **(fractions or {})}
        self.split_index = split_indices(listing, split_fractions, split_seed or 0)
        self._datasets: dict[str, InMemoryDataset] | None = None
        self._normalization: Normalization | None = None

    @property
    def files(self) -> tuple[str, ...]:
        """Every image's path relative to ``root`` (POSIX form); a sample's ``index`` points in here."""
        return tuple(f.as_posix() for f in self.listing.files)

    def options(self) -> dict[str, Any]:
        """The factory options this task was built with (``None``: the default was used)."""
        return folder_options(self)

    def describe(self) -> dict[str, Any]:
        split = "pre-made" if self.listing.premade is not None else "stratified"
        return {
            **super().describe(),
            "options": self.options(),
            "classes": list(self.target.class_names),
            "split": split,
            "images": len(self.listing.files),
        }

    def fingerprint(self) -> str:
        """Hash of the options, every file's path, size and content hash, and the split indices.

        The root folder's own path is left out (the same files elsewhere hash the same), and so are
        modification times: touching a file does not change the data, rewriting it does.
        """
        described = self.describe()
        described["options"] = {k: v for k, v in described["options"].items() if k != "root"}
        content = {
            "files": stable_hash([[f, d] for f, d in zip(self.files, self._digests, strict=True)]),
            "labels": stable_hash(self.listing.labels.tobytes()),
            "indices": self.split_hashes(),
        }
        return stable_hash({"describe": described, "content": content})

    def _make_datasets(self) -> dict[str, InMemoryDataset]:
        assert self._pixels is not None
        images, self._normalization = normalized_pixels(
            self._pixels, self.split_index["train"], self._given_normalization
        )
        self._pixels = None  # the float copy replaces the decoded bytes
        parts = split_tensors(
            self.split_index, {"image": images, "label": torch.from_numpy(self.listing.labels)}
        )
        num_classes = len(self.listing.class_names)
        return {s: select_classes(t, None, self.classes, num_classes) for s, t in parts.items()}


@TASKS.register(NAME)
def image_folder(
    *,
    root: str | None = None,
    classes: Sequence[int] | None = None,
    image_size: int = 32,
    channels: int = 3,
    val_fraction: float | None = None,
    test_fraction: float | None = None,
    split_seed: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    max_images: int = MAX_IMAGES,
) -> ImageFolderTask:
    """Your own images, one sub-folder per class (torchvision ImageFolder layout), held in memory.

    Args:
        root: The folder holding one sub-folder per class, or ``train/``, ``val/`` and ``test/``
            folders that each hold the class folders (pre-made splits). Required.
        classes: Class indices to keep (into the sorted class folder names), in label order; labels
            are renumbered 0..len(classes)-1. ``None`` keeps every class.
        image_size: Output height and width in pixels (8..1024): the shorter side is resized to it
            and the centre square cropped.
        channels: 3 (RGB) or 1 (grey).
        val_fraction: Share of all images in the validation split, in (0, 0.5); default 0.15. Not
            allowed with pre-made splits.
        test_fraction: Share of all images in the test split, in (0, 0.5); default 0.25. Not allowed
            with pre-made splits.
        split_seed: ``random_state`` of the stratified split (made over every class before a class
            subset is taken); default 0. Not allowed with pre-made splits.
        mean: Per-channel means to subtract from the [0, 1] pixels (with ``std``); by default the
            training split's per-channel statistics, the same for every class subset.
        std: Per-channel standard deviations to divide by.
        max_images: Refuse folders with more images than this (all are decoded into memory).
    """
    if root is None:
        raise ImageFolderError("root is required: the folder holding one sub-folder of images per class")
    if not isinstance(root, (str, os.PathLike)) or not str(root).strip():
        raise ImageFolderError(f"root must be a folder path, got {root!r}")
    channels = check_choice(NAME, "channels", channels, (1, 3))
    fractions, split_seed = check_split_options(NAME, val_fraction, test_fraction, split_seed)
    return ImageFolderTask(
        root=Path(root).expanduser(),
        classes=classes,
        image_size=check_int(NAME, "image_size", image_size, minimum=8, maximum=1024),
        channels=channels,
        fractions=fractions,
        split_seed=split_seed,
        normalization=check_normalization(NAME, mean, std, channels),
        max_images=check_int(NAME, "max_images", max_images, minimum=1),
    )
