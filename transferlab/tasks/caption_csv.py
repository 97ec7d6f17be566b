"""``caption_csv``: a user's images with captions listed in a CSV file.

The CSV file (UTF-8, with a header) has a ``file`` column (an image path relative to ``root``, by
default the CSV file's folder) and a ``caption`` column; other columns are ignored. Several rows may
name the same image: the image is then one sample whose training target is its first caption (in
file order) and whose BLEU references are all of its captions; exact match counts a caption equal
to any of them. Images keep the order of their first row; a random split (``split_seed``) assigns
whole images to train, val and test, so no image is in two splits.

Nothing is skipped silently: an unreadable, empty or non-UTF-8 file, a missing column, a row with a
wrong number of fields, an empty file name or caption, an image that is missing, empty, corrupt or
not an image are errors that name the CSV file and line (every bad row at once). Images are decoded
like ``image_folder``'s (EXIF orientation, RGB or grey, shorter side resized and centre-cropped) when
the task is built, and normalised with the training split's per-channel statistics unless ``mean``
and ``std`` are given. The vocabulary and ``max_length`` come from the training captions only (see
:mod:`transferlab.tasks.captioning`).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from transferlab.registry import TASKS
from transferlab.tasks.base import SPLITS, InMemoryDataset, ObjectiveTask, TargetSpec, stable_hash
from transferlab.tasks.captioning import SPECIALS, CaptionObjective, tokenize
from transferlab.tasks.folders import MAX_IMAGES, _listed, decode_files
from transferlab.tasks.splits import (
    Normalization,
    check_choice,
    check_fraction,
    check_int,
    check_normalization,
    check_split,
    normalized_pixels,
    read_utf8_text,
)

NAME = "caption_csv"
DEFAULT_FRACTIONS = {"val_fraction": 0.15, "test_fraction": 0.25}


class CaptionCSVError(ValueError):
    """The CSV file or its images cannot be used; the message names the file (and line) and the fix."""

    def __init__(self, message: str) -> None:
        # Idempotent, so that a copy unpickled from a Ray worker reads the same.
        super().__init__(message if message.startswith(f"{NAME}: ") else f"{NAME}: {message}")


@dataclass(frozen=True)
class CaptionRows:
    """The images of a caption CSV file in order of first mention, with every caption of each.

    Attributes:
        files: Image paths as written in the file.
        captions: Each image's captions in file order (the first is the training target).
        lines: The line of each image's first row.
        content: The file's bytes.
    """

    files: tuple[str, ...]
    captions: tuple[tuple[str, ...], ...]
    lines: tuple[int, ...]
    content: bytes


def _columns(path: Path, header: list[str], wanted: Sequence[str]) -> list[int]:
    found = ", ".join(repr(h) for h in header)
    out = []
    for name in wanted:
        if header.count(name) != 1:
            issue = "is missing" if name not in header else "appears more than once"
            raise CaptionCSVError(f"{path}:1: column {name!r} {issue} in the header (columns: {found})")
        out.append(header.index(name))
    return out


def read_caption_csv(path: Path, file_column: str = "file", caption_column: str = "caption") -> CaptionRows:
    """Every image and caption of a caption CSV file; every bad row is an error naming its line.

    Raises:
        CaptionCSVError: see the module docstring.
    """
    text, data = read_utf8_text(
        path, "CSV file", CaptionCSVError, expected="a header line naming the columns, then rows"
    )
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    by_file: dict[str, list[str]] = {}
    first_line: dict[str, int] = {}
    problems: list[str] = []
    try:
        header = next(reader)
        file_at, caption_at = _columns(path, header, (file_column, caption_column))
        line = reader.line_num + 1
        for row in reader:
            if not row:
                problems.append(f"{path}:{line}: blank line; delete it")
            elif len(row) != len(header):
                problems.append(f"{path}:{line}: {len(row)} fields, but the header has {len(header)}")
            elif not row[file_at].strip():
                problems.append(f"{path}:{line}: empty file name in column {file_column!r}")
            elif not tokenize(row[caption_at]):
                problems.append(f"{path}:{line}: empty caption in column {caption_column!r}")
            else:
                name = row[file_at].strip()
                by_file.setdefault(name, []).append(row[caption_at])
                first_line.setdefault(name, line)
            line = reader.line_num + 1
    except csv.Error as exc:
        raise CaptionCSVError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None
    if problems:
        raise CaptionCSVError(
            f"{len(problems)} row(s) cannot be used; fix or delete them:\n{_listed(problems)}"
        )
    if not by_file:
        raise CaptionCSVError(f"'{path}' has a header but no data rows")
    files = tuple(by_file)
    return CaptionRows(
        files=files,
        captions=tuple(tuple(by_file[f]) for f in files),
        lines=tuple(first_line[f] for f in files),
        content=data,
    )


def decode_listed_images(
    path: Path, root: Path, rows: CaptionRows, image_size: int, channels: int
) -> tuple[np.ndarray, list[str]]:
    """The rows' images as uint8 N x size x size x channels, and each file's digest.

    Raises:
        CaptionCSVError: naming the CSV line and image of every missing, empty or corrupt image.
    """
    pixels = np.empty((len(rows.files), image_size, image_size, channels), dtype=np.uint8)
    digests, problems = [], []
    decoded = decode_files([root / name for name in rows.files], pixels)
    for name, line, (digest, problem, _) in zip(rows.files, rows.lines, decoded, strict=True):
        image = root / name
        if not image.is_file():
            problems.append(f"{path}:{line}: image '{name}' not found (looked for {image})")
            digests.append("")
            continue
        digests.append(digest)
        if problem is not None:
            problems.append(f"{path}:{line}: {image}: {problem}")
    if problems:
        raise CaptionCSVError(
            f"{len(problems)} image(s) cannot be used; fix the rows or the images:\n{_listed(problems)}"
        )
    return pixels, digests


def random_split(count: int, fractions: dict[str, float], seed: int, path: Path) -> dict[str, np.ndarray]:
    """Sorted indices of ``count`` images per split: a seeded permutation cut by the fractions."""
    n_val = max(1, round(count * fractions["val_fraction"]))
    n_test = max(1, round(count * fractions["test_fraction"]))
    if count - n_val - n_test < 1:
        raise CaptionCSVError(
            f"'{path}' lists {count} image(s); train, val and test need at least one each (at least 3 "
            "images, more for these fractions)"
        )
    order = np.random.default_rng(seed).permutation(count)
    cuts = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    return {split: np.sort(cuts[split]) for split in SPLITS}


class CaptionCSVTask(ObjectiveTask):
    """Caption a user's images; see :func:`caption_csv` and the module docstring."""

    name = NAME

    def __init__(self, path: Path, root: Path, options: dict[str, Any], normalization: Normalization | None):
        self.path, self.root, self._options = path, root, options
        rows = read_caption_csv(path, options["file_column"], options["caption_column"])
        if len(rows.files) > options["max_images"]:
            raise CaptionCSVError(
                f"'{path}' lists {len(rows.files)} images, more than max_images={options['max_images']}; "
                "every image is decoded into memory, raise max_images if this machine has the memory"
            )
        self.rows = rows
        size, channels = options["image_size"], options["channels"]
        fractions = {k: options[k] for k in DEFAULT_FRACTIONS}
        self.split_index = random_split(len(rows.files), fractions, options["split_seed"], path)
        train_captions = [rows.captions[i][0] for i in self.split_index["train"]]
        objective = CaptionObjective.for_captions(train_captions, options["min_count"])
        if len(objective.vocabulary) == len(SPECIALS):
            raise CaptionCSVError(
                f"no word of the training captions in '{path}' occurs min_count={options['min_count']} "
                "times; lower min_count or add captions"
            )
        if options["max_length"] is not None:
            objective = CaptionObjective(objective.vocabulary, options["max_length"])
        self.set_objective(objective)
        self.target = TargetSpec(
            kind="caption",
            in_channels=channels,
            image_size=(size, size),
            vocabulary=objective.vocabulary,
            max_length=objective.max_length,
        )
        pixels, self._digests = decode_listed_images(path, root, rows, size, channels)
        images, self.normalization = normalized_pixels(pixels, self.split_index["train"], normalization)
        self._datasets = {split: self._split(images, split) for split in SPLITS}

    def _split(self, images: Tensor, split: str) -> InMemoryDataset:
        rows = self.split_index[split]
        index = torch.from_numpy(rows)
        references = [list(self.rows.captions[i]) for i in rows]
        dataset = InMemoryDataset(
            {"image": images[index], "index": index},
            {"caption": [refs[0] for refs in references], "references": references},
        )
        self.objective.prepare(dataset)
        return dataset

    def dataset(self, split: str) -> Dataset:
        """``InMemoryDataset``: ``image``, ``index`` (row into :attr:`rows`), ``caption_tokens``;
        extras ``caption`` (the first caption) and ``references`` (all of the image's captions)."""
        check_split(self.name, split)
        return self._datasets[split]

    def describe(self) -> dict[str, Any]:
        options = {k: v for k, v in self._options.items() if k not in ("path", "root")}
        return {**super().describe(), "options": options, "images": len(self.rows.files)}

    def fingerprint(self) -> str:
        """Hash of the options, the CSV's content, every image's content and the splits (not the paths)."""
        content = {
            "csv": stable_hash(self.rows.content),
            "images": stable_hash(self._digests),
            "splits": {s: stable_hash(self.split_index[s].tobytes()) for s in SPLITS},
        }
        return stable_hash({"describe": self.describe(), "content": content})


@TASKS.register(NAME)
def caption_csv(
    *,
    path: str | None = None,
    root: str | None = None,
    classes: Sequence[int] | None = None,
    file_column: str = "file",
    caption_column: str = "caption",
    image_size: int = 32,
    channels: int = 3,
    min_count: int = 1,
    max_length: int | None = None,
    val_fraction: float = DEFAULT_FRACTIONS["val_fraction"],
    test_fraction: float = DEFAULT_FRACTIONS["test_fraction"],
    split_seed: int = 0,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    max_images: int = MAX_IMAGES,
) -> CaptionCSVTask:
    """Your own captioned images: a CSV file with a header and one ``file,caption`` pair per row.

    Args:
        path: The CSV file. Required.
        root: The folder the ``file`` paths are relative to; default: the CSV file's folder.
        classes: Not supported (captions have no classes); must be left out.
        file_column: Header name of the image path column.
        caption_column: Header name of the caption column.
        image_size: Output height and width in pixels (8..1024).
        channels: 3 (RGB) or 1 (grey).
        min_count: Training occurrences a word needs to enter the vocabulary (rarer ones: ``<unk>``).
        max_length: The most words of a caption target (longer ones are cut); default: the longest
            training caption.
        val_fraction: Share of the images in the validation split, in (0, 0.5).
        test_fraction: Share of the images in the test split, in (0, 0.5).
        split_seed: Seed of the random split.
        mean: Per-channel means to subtract from the [0, 1] pixels (with ``std``); default: the
            training split's statistics.
        std: Per-channel standard deviations.
        max_images: Refuse files listing more images than this (all are decoded into memory).
    """
    if path is None or not str(path).strip():
        raise CaptionCSVError(
            "path is required: the CSV file with a header and one file,caption pair per row"
        )
    if classes is not None:
        raise CaptionCSVError(
            f"captions have no classes to select, got classes={list(classes)}; leave it out"
        )
    file = Path(path).expanduser().absolute()
    folder = Path(root).expanduser().absolute() if root is not None else file.parent
    if root is not None and not folder.is_dir():
        raise CaptionCSVError(f"root '{folder}' is not a folder (the images' paths are relative to it)")
    channels = check_choice(NAME, "channels", channels, (1, 3))
    options = {
        "file_column": file_column,
        "caption_column": caption_column,
        "image_size": check_int(NAME, "image_size", image_size, minimum=8, maximum=1024),
        "channels": channels,
        "min_count": check_int(NAME, "min_count", min_count, minimum=1),
        "max_length": None if max_length is None else check_int(NAME, "max_length", max_length, minimum=1),
        "val_fraction": check_fraction(NAME, "val_fraction", val_fraction),
        "test_fraction": check_fraction(NAME, "test_fraction", test_fraction),
        "split_seed": check_int(NAME, "split_seed", split_seed, minimum=0, maximum=2**32 - 1),
        "max_images": check_int(NAME, "max_images", max_images, minimum=1),
        "mean": list(mean) if mean is not None else None,
        "std": list(std) if std is not None else None,
    }
    normalization = check_normalization(NAME, mean, std, channels)
    return CaptionCSVTask(file, folder, {**options, "path": str(file), "root": str(folder)}, normalization)
