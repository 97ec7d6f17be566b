"""``image_boxes``: a user's images with one box each, from a CSV file or a COCO-style JSON file.

Coordinates are pixels of the image as it is displayed (EXIF orientation applied), continuous: 0 is
the left (top) edge of the image and its width (height) the right (bottom) edge, as in COCO, so a box
covering the whole of a 640 x 480 image is ``0, 0, 640, 480``.

**CSV** (``path`` ending in ``.csv``, UTF-8, a header naming the columns, other columns ignored)::

    file,x_min,y_min,x_max,y_max,label
    img/cat1.jpg,12,30,200,181,cat
    img/dog7.png,0,4.5,96,120,dog

``label`` is optional (without the column the task predicts boxes only). **COCO-style JSON** (``path``
ending in ``.json``): ``images`` (``id``, ``file_name``, optional ``width``/``height``, which must then
match the file), ``annotations`` (``id``, ``image_id``, ``bbox``: ``[x, y, width, height]``, and
``category_id`` when there are ``categories``) and optional ``categories`` (``id``, ``name``); other
keys are ignored. Classes are the sorted labels (CSV) or the categories that have a box, in id order
(JSON). Image paths are relative to ``root`` (default: the annotation file's folder).

One box per image: an image with several boxes is an error unless ``several_boxes: largest``, which
keeps each image's largest box (by area; the first listed on a tie) and drops the others. Nothing
else is dropped: an unreadable, empty or invalid annotation file, a malformed row, a missing or
corrupt image, an image without a box (JSON), an empty or negative box, a box outside its image or an
unknown category is a ``ValueError`` naming the file and the row (line) or annotation id, every
problem of a kind listed at once.

Images are decoded when the task is built and held in memory: each is resized to ``image_size`` x
``image_size`` *without* cropping (the aspect ratio is not kept), so a box keeps its normalised
coordinates exactly and no box is cut. Batches hold ``image``, ``box`` (float32 N x 4 normalised cx,
cy, w, h), ``label`` (int64, 0 without labels) and ``index`` (int64, the position in :attr:`files`).
Splits are random and, with labels, stratified (as ``image_folder``'s); normalisation defaults to the
training split's per-channel statistics.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transferlab.registry import TASKS
from transferlab.tasks.base import SPLITS, InMemoryDataset, ObjectiveTask, TargetSpec, stable_hash
from transferlab.tasks.folders import DecodedImagesTask, _listed, decode_files
from transferlab.tasks.localization import BoxObjective
from transferlab.tasks.splits import (
    Normalization,
    check_choice,
    check_classes,
    check_fraction,
    check_int,
    check_normalization,
    normalized_pixels,
    read_utf8_text,
    select_classes,
    split_tensors,
    stratified_split,
)

NAME = "image_boxes"
CSV_COLUMNS = ("file", "x_min", "y_min", "x_max", "y_max")
DEFAULT_FRACTIONS = {"val_fraction": 0.15, "test_fraction": 0.25}
SEVERAL_BOXES = ("error", "largest")
NO_LABEL = "object"  # the one class name of a file without labels
MAX_IMAGES = 200_000


class BoxFilesError(ValueError):
    """The annotations or images cannot be used as they are; the message names the file and the fix."""

    def __init__(self, message: str) -> None:
        # Idempotent, so that a copy unpickled from a Ray worker reads the same.
        super().__init__(message if message.startswith(f"{NAME}: ") else f"{NAME}: {message}")


@dataclass(frozen=True)
class Annotation:
    """One box: the image file (relative to root), corners in pixels, label (or None) and its source."""

    file: str
    box: tuple[float, ...]
    label: str | None
    where: str  # "boxes.csv:5" (line 5) or "boxes.json: annotation id 7", for messages


# -- reading the annotation file --------------------------------------------------------------------
def _numbers(values: Any, where: str, problems: list[str]) -> tuple[float, ...] | None:
    """Four finite numbers (numeric strings too), else a problem and None."""
    listed = list(values) if isinstance(values, (list, tuple)) else [values]
    try:
        numbers = tuple(float(v) for v in listed if not isinstance(v, bool))
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) != 4 or not all(math.isfinite(v) for v in numbers):
        problems.append(f"{where}: box {values!r} is not 4 finite numbers")
        return None
    return numbers


def _box(corners: tuple[float, ...], where: str, problems: list[str]) -> tuple[float, ...] | None:
    """``corners`` (x0, y0, x1, y1) if x0 < x1, y0 < y1 and none is negative, else a problem and None."""
    x0, y0, x1, y1 = corners
    span = f"x {x0:g}..{x1:g}, y {y0:g}..{y1:g}"
    if x1 <= x0 or y1 <= y0:
        problems.append(f"{where}: empty or negative box ({span})")
        return None
    if x0 < 0 or y0 < 0:
        problems.append(f"{where}: box ({span}) starts outside the image (coordinates must be >= 0)")
        return None
    return corners


def read_csv_boxes(path: Path) -> list[Annotation]:
    """Every row of a CSV annotation file (see the module docstring); bad rows listed at once."""
    text, _ = read_utf8_text(path, "annotation file", BoxFilesError)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    annotations, problems = [], []
    try:
        header = [h.strip() for h in next(reader)]
        wanted = [*CSV_COLUMNS, *(["label"] if "label" in header else [])]
        for column in wanted:
            if header.count(column) != 1:
                issue = "is missing from" if column not in header else "appears more than once in"
                raise BoxFilesError(
                    f"{path}:1: column {column!r} {issue} the header (columns: {', '.join(header)}); "
                    f"expected {','.join(CSV_COLUMNS)}[,label]"
                )
        at = {column: header.index(column) for column in wanted}
        line = reader.line_num + 1
        for row in reader:
            where = f"{path}:{line}"
            if len(row) != len(header):
                problems.append(f"{where}: {len(row)} fields, but the header has {len(header)}")
            elif not row[at["file"]].strip():
                problems.append(f"{where}: empty file name")
            elif "label" in at and not row[at["label"]].strip():
                problems.append(f"{where}: empty label")
            else:
                numbers = _numbers([row[at[c]] for c in CSV_COLUMNS[1:]], where, problems)
                box = _box(numbers, where, problems) if numbers else None
                label = row[at["label"]].strip() if "label" in at else None
                if box is not None:
                    annotations.append(Annotation(row[at["file"]].strip(), box, label, where))
            line = reader.line_num + 1
    except csv.Error as exc:
        raise BoxFilesError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None
    if problems:
        raise BoxFilesError(
            f"{len(problems)} row(s) cannot be used; fix or delete them:\n{_listed(problems)}"
        )
    if not annotations:
        raise BoxFilesError(f"'{path}' has a header but no rows")
    return annotations


def _records(doc: dict, key: str, fields: tuple[str, ...], path: Path) -> list[dict]:
    """``doc[key]``: a list of objects that each have ``fields``."""
    records = doc.get(key)
    if not isinstance(records, list):
        raise BoxFilesError(f"{path}: '{key}' must be a list of objects, got {type(records).__name__}")
    for i, record in enumerate(records):
        missing = [f for f in fields if not isinstance(record, dict) or f not in record]
        if missing:
            raise BoxFilesError(f"{path}: {key}[{i}] lacks {', '.join(missing)}: {str(record)[:200]}")
    return records


def _unique(records: list[dict], field: str, key: str, path: Path) -> dict[Any, dict]:
    by_value: dict[Any, dict] = {}
    for record in records:
        value = record[field]
        if not isinstance(value, (int, str)) or isinstance(value, bool) or value in by_value:
            problem = "appears twice" if value in by_value else "must be an integer or a string"
            raise BoxFilesError(f"{path}: {key} {field} {value!r} {problem}")
        by_value[value] = record
    return by_value


def read_coco_boxes(path: Path) -> tuple[list[Annotation], dict[str, tuple[int, int]], list[str]]:
    """(boxes, image sizes given in the file, class names by category id) of a COCO-style file.

    Raises:
        BoxFilesError: invalid JSON, a missing section or field, duplicate ids, an unknown image
            or category, a bad box, or an image with no box (all bad annotations listed at once).
    """
    try:
        doc = json.loads(read_utf8_text(path, "annotation file", BoxFilesError)[0])
    except json.JSONDecodeError as exc:
        raise BoxFilesError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}, column {exc.colno})") from None
    if not isinstance(doc, dict):
        raise BoxFilesError(f"{path}: expected a JSON object with 'images' and 'annotations'")
    images = _unique(_records(doc, "images", ("id", "file_name"), path), "id", "image", path)
    _unique(list(images.values()), "file_name", "image", path)
    labelled = "categories" in doc
    category_fields = ("id", "name") if labelled else ()
    categories = (
        _unique(_records(doc, "categories", category_fields, path), "id", "category", path)
        if labelled
        else {}
    )
    fields = ("id", "image_id", "bbox", *(("category_id",) if labelled else ()))
    annotations, problems, boxed = [], [], set()
    for record in _records(doc, "annotations", fields, path):
        where = f"{path}: annotation id {record['id']}"
        image = images.get(record["image_id"])
        category = categories.get(record.get("category_id")) if labelled else None
        if image is None:
            problems.append(f"{where}: unknown image_id {record['image_id']!r}")
        elif labelled and category is None:
            problems.append(f"{where}: unknown category_id {record['category_id']!r}")
        elif numbers := _numbers(record["bbox"], f"{where}: bbox [x, y, width, height]", problems):
            x, y, w, h = numbers
            box = _box((x, y, x + w, y + h), where, problems)
            if box is not None:
                label = str(category["name"]) if category is not None else None
                annotations.append(Annotation(str(image["file_name"]), box, label, where))
                boxed.add(record["image_id"])
    problems += [
        f"{path}: image id {i!r} ('{r['file_name']}') has no box" for i, r in images.items() if i not in boxed
    ]
    if problems:
        raise BoxFilesError(f"{len(problems)} annotation(s) or image(s) cannot be used:\n{_listed(problems)}")
    sizes = {
        str(r["file_name"]): (r["width"], r["height"])
        for r in images.values()
        if "width" in r and "height" in r
    }
    used = {a.label for a in annotations}
    in_order = sorted(categories, key=lambda i: (isinstance(i, str), i))  # numeric ids numerically
    names = [str(categories[i]["name"]) for i in in_order]
    if len(set(names)) != len(names):
        raise BoxFilesError(f"{path}: category names {names} are not distinct")
    return annotations, sizes, [n for n in names if n in used]


def one_box_per_image(annotations: list[Annotation], several: str, path: Path) -> list[Annotation]:
    """One annotation per file in first-seen order; several for one file: error or the largest."""
    by_file: dict[str, list[Annotation]] = {}
    for annotation in annotations:
        by_file.setdefault(annotation.file, []).append(annotation)
    crowded = {f: group for f, group in by_file.items() if len(group) > 1}
    if crowded and several == "error":
        at = [[a.where.removeprefix(str(path)).lstrip(": ") for a in g] for g in crowded.values()]
        listed = [
            f"{f}: {len(g)} boxes ({', '.join(f'line {w}' if w.isdigit() else w for w in where)})"
            for (f, g), where in zip(crowded.items(), at, strict=True)
        ]
        raise BoxFilesError(
            f"{path}: {len(crowded)} image(s) have several boxes; this task predicts one box per image. Set "
            f"several_boxes: largest to keep each image's largest box, or fix the file:\n{_listed(listed)}"
        )
    area = lambda a: (a.box[2] - a.box[0]) * (a.box[3] - a.box[1])  # noqa: E731
    return [max(group, key=area) if len(group) > 1 else group[0] for group in by_file.values()]


# -- images -----------------------------------------------------------------------------------------
def decode_boxed_images(
    root: Path, annotations: Sequence[Annotation], sizes: dict[str, tuple[int, int]], size: int, channels: int
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Pixels (uint8 N x size x size x channels), normalised cx, cy, w, h boxes (float32 N x 4) and
    each file's ``"bytes:sha256"``.

    Raises:
        BoxFilesError: listing every missing, unreadable, empty or corrupt image, every image whose
            size differs from the one the annotation file gives, and every box outside its image.
    """
    pixels = np.empty((len(annotations), size, size, channels), dtype=np.uint8)
    boxes = np.empty((len(annotations), 4), dtype=np.float32)
    digests, problems = [], []
    decoded = decode_files([root / a.file for a in annotations], pixels, crop=False)
    for i, (annotation, result) in enumerate(zip(annotations, decoded, strict=True)):
        digest, problem, (width, height) = result
        path = root / annotation.file
        digests.append(digest)
        if problem is not None:
            problems.append(f"{path} ({annotation.where}): {problem}")
            continue
        given = sizes.get(annotation.file)
        x0, y0, x1, y1 = annotation.box
        if given is not None and tuple(given) != (width, height):
            problems.append(
                f"{path} ({annotation.where}): the annotation file gives {given[0]} x {given[1]} px, the "
                f"image is {width} x {height} (after EXIF orientation); fix the size or the image"
            )
        elif x1 > width or y1 > height:
            problems.append(
                f"{path} ({annotation.where}): box (x {x0:g}..{x1:g}, y {y0:g}..{y1:g}) reaches outside "
                f"the {width} x {height} px image"
            )
        boxes[i] = ((x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height)
    if problems:
        raise BoxFilesError(f"{len(problems)} image(s) cannot be used:\n{_listed(problems)}")
    return pixels, boxes, digests


def _split(labels: np.ndarray, names: tuple[str, ...], fractions: dict, seed: int, path: Path) -> dict:
    """Random train/val/test indices, stratified by label (every class in every split)."""
    counts = np.bincount(labels, minlength=len(names))
    few = [f"{n!r}: {c} image(s)" for n, c in zip(names, counts, strict=True) if c < len(SPLITS)]
    if few:
        raise BoxFilesError(
            f"every class needs at least 3 images in '{path}', one for each of train, val and test; "
            f"these have fewer:\n{_listed(few)}"
        )
    try:
        return stratified_split(NAME, labels, **fractions, seed=seed)
    except ValueError as exc:
        raise BoxFilesError(f"{str(exc).removeprefix(f'{NAME}: ')} (in '{path}'); add images") from None


# -- the task ---------------------------------------------------------------------------------------
class ImageBoxesTask(DecodedImagesTask, ObjectiveTask):
    """Predict each image's box (and its class); see :func:`image_boxes` and the module docstring.

    Building the task reads the annotations and decodes every image, so a bad file fails here.
    Loss and metrics are :class:`~transferlab.tasks.localization.BoxObjective`'s (primary ``iou``).
    Its data sets hold ``image``, ``box``, ``label`` and ``index`` (see the module docstring).
    """

    name = NAME

    def __init__(self, path: Path, root: Path, options: dict[str, Any]) -> None:
        self._options = options
        annotations, sizes, names = _read_annotations(path)
        annotations = one_box_per_image(annotations, options["several_boxes"], path)
        if len(annotations) > options["max_images"]:
            raise BoxFilesError(
                f"'{path}' annotates {len(annotations)} images, more than max_images="
                f"{options['max_images']}: every image is decoded into memory; raise max_images if this "
                "machine has the memory"
            )
        #: Every image's path as the annotation file gives it; a sample's ``index`` points in here.
        self.files = tuple(a.file for a in annotations)
        #: Every class of the file (before a class subset), label i = ``label_names[i]``.
        self.label_names = tuple(names)
        self.classes = check_classes(NAME, options["classes"], names)
        picked = self.classes if self.classes is not None else range(len(names))
        self.set_objective(BoxObjective(num_classes=len(picked)))
        size, channels = options["image_size"], options["channels"]
        self.target = TargetSpec(
            kind="box",
            num_classes=len(picked),
            in_channels=channels,
            image_size=(size, size),
            class_names=tuple(names[c] for c in picked),
        )
        number = {name: i for i, name in enumerate(names)}
        self._labels = np.asarray([number.get(a.label or NO_LABEL, 0) for a in annotations], dtype=np.int64)
        self._pixels, self._boxes, self._digests = decode_boxed_images(
            root, annotations, sizes, size, channels
        )
        fractions = {k: options[k] for k in DEFAULT_FRACTIONS}
        self.split_index = _split(self._labels, tuple(names), fractions, options["split_seed"], path)
        self._datasets: dict[str, InMemoryDataset] | None = None
        self._normalization: Normalization | None = None

    def options(self) -> dict[str, Any]:
        """The factory options this task was built with (paths absolute)."""
        return dict(self._options)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "options": self.options(), "images": len(self.files)}

    def fingerprint(self) -> str:
        """Hash of the options (paths left out), every image's path and content, boxes, labels, splits."""
        described = self.describe()
        described["options"] = {k: v for k, v in self._options.items() if k not in ("path", "root")}
        content = {
            "files": stable_hash([[f, d] for f, d in zip(self.files, self._digests, strict=True)]),
            "boxes": stable_hash(self._boxes.tobytes()),
            "labels": stable_hash(self._labels.tobytes()),
            "indices": self.split_hashes(),
        }
        return stable_hash({"describe": described, "content": content})

    def _make_datasets(self) -> dict[str, InMemoryDataset]:
        assert self._pixels is not None
        mean, std = self._options["mean"], self._options["std"]
        given = (tuple(mean), tuple(std)) if mean is not None else None
        images, self._normalization = normalized_pixels(self._pixels, self.split_index["train"], given)
        self._pixels = None  # the float copy replaces the decoded bytes
        tensors = {
            "image": images,
            "box": torch.from_numpy(self._boxes),
            "label": torch.from_numpy(self._labels),
        }
        parts = split_tensors(self.split_index, tensors)
        num_classes = len(self.label_names)
        return {s: select_classes(t, None, self.classes, num_classes) for s, t in parts.items()}


def _read_annotations(path: Path) -> tuple[list[Annotation], dict[str, tuple[int, int]], list[str]]:
    """(boxes, image sizes the file gives, class names) of a CSV or JSON annotation file."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        annotations = read_csv_boxes(path)
        labels = {a.label for a in annotations}
        return annotations, {}, [NO_LABEL] if labels == {None} else sorted(labels)  # type: ignore[arg-type]
    if suffix == ".json":
        annotations, sizes, names = read_coco_boxes(path)
        return annotations, sizes, names or [NO_LABEL]
    raise BoxFilesError(f"annotation file '{path}' must end in .csv or .json (COCO style), got '{suffix}'")


@TASKS.register(NAME)
def image_boxes(
    *,
    path: str | None = None,
    root: str | None = None,
    classes: Sequence[int] | None = None,
    several_boxes: str = "error",
    image_size: int = 32,
    channels: int = 3,
    val_fraction: float = DEFAULT_FRACTIONS["val_fraction"],
    test_fraction: float = DEFAULT_FRACTIONS["test_fraction"],
    split_seed: int = 0,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    max_images: int = MAX_IMAGES,
) -> ImageBoxesTask:
    """Your own images with one box each (and optionally a class): CSV or COCO-style JSON annotations.

    Args:
        path: The annotation file, ``.csv`` or ``.json`` (formats in the module docstring). Required.
        root: The folder the image paths are relative to; default: the annotation file's folder.
        classes: Class indices to keep (into the class names), in label order; labels are
            renumbered 0..len(classes)-1. ``None`` keeps every class.
        several_boxes: An image with several boxes: "error" (default) or "largest" (keep its
            largest box, drop the others).
        image_size: Output height and width in pixels (8..1024); images are resized without crop.
        channels: 3 (RGB) or 1 (grey).
        val_fraction: Share of the images in the validation split, in (0, 0.5).
        test_fraction: Share of the images in the test split, in (0, 0.5).
        split_seed: ``random_state`` of the split (stratified by class when there are labels).
        mean: Per-channel means to subtract from the [0, 1] pixels (with ``std``); by default the
            training split's per-channel statistics.
        std: Per-channel standard deviations to divide by.
        max_images: Refuse files annotating more images than this (all are decoded into memory).
    """
    if path is None or not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise BoxFilesError(f"path is required: the annotation file (.csv or COCO-style .json), got {path!r}")
    if root is not None and (not isinstance(root, (str, os.PathLike)) or not str(root).strip()):
        raise BoxFilesError(f"root must be the folder the image paths are relative to, got {root!r}")
    file = Path(path).expanduser().absolute()
    folder = Path(root).expanduser().absolute() if root is not None else file.parent
    if not folder.is_dir():
        raise BoxFilesError(f"root '{folder}' is not a folder (the image paths are relative to it)")
    channels = check_choice(NAME, "channels", channels, (1, 3))
    normalization = check_normalization(NAME, mean, std, channels)
    options = {
        "path": str(file),
        "root": str(folder),
        "classes": list(classes) if classes is not None else None,
        "several_boxes": check_choice(NAME, "several_boxes", several_boxes, SEVERAL_BOXES),
        "image_size": check_int(NAME, "image_size", image_size, minimum=8, maximum=1024),
        "channels": channels,
        "val_fraction": check_fraction(NAME, "val_fraction", val_fraction),
        "test_fraction": check_fraction(NAME, "test_fraction", test_fraction),
        "split_seed": check_int(NAME, "split_seed", split_seed, minimum=0, maximum=2**32 - 1),
        "mean": list(normalization[0]) if normalization else None,
        "std": list(normalization[1]) if normalization else None,
        "max_images": check_int(NAME, "max_images", max_images, minimum=1),
    }
    return ImageBoxesTask(file, folder, options)
