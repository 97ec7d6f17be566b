"""Contracts of the bundled tasks: digits (sklearn) and shapes (procedural)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from transferlab.registry import TASKS
from transferlab.tasks.base import SPLITS, InMemoryDataset, Task
from transferlab.tasks.shapes import CHUNK, KINDS
from transferlab.tasks.shapes_render import COLOUR_NAMES, PALETTE, RENDER_VERSION, UNIT_AREA, inside
from transferlab.tasks.splits import normalized_images, read_utf8_text, subset_mask, to_unit_pixels

N_DIGITS = 1797


def make(name: str, **options) -> Task:
    return TASKS.get(name)(**options)


@pytest.fixture(scope="module")
def digits_task() -> Task:
    return make("digits")


@pytest.fixture(scope="module")
def shapes_task() -> Task:
    return make("shapes")


# -- registry and contract --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["digits", "shapes"])
def test_registered_with_description(name: str) -> None:
    assert name in TASKS.names()
    entry = TASKS.entry(name)
    assert entry.source == "transferlab" and len(entry.description) > 20
    task = entry.factory()
    assert isinstance(task, Task) and task.name == name
    assert task.primary_metric == "accuracy" and task.higher_is_better


def test_digits_fields_and_sizes(digits_task: Task) -> None:
    sets = {split: digits_task.dataset(split) for split in SPLITS}
    assert sum(len(d) for d in sets.values()) == N_DIGITS
    assert len(sets["test"]) == pytest.approx(0.25 * N_DIGITS, abs=1)
    assert len(sets["val"]) == pytest.approx(0.15 * N_DIGITS, abs=2)
    train = sets["train"]
    assert isinstance(train, InMemoryDataset)
    assert train.tensors["image"].dtype == torch.float32
    assert train.tensors["image"].shape == (len(train), 1, 32, 32)
    assert train.tensors["label"].dtype == torch.int64
    assert sorted(train.tensors["label"].unique().tolist()) == list(range(10))
    # Normalised with the train split's own statistics.
    assert float(train.tensors["image"].mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(train.tensors["image"].std()) == pytest.approx(1.0, abs=1e-3)
    all_index = torch.cat([d.tensors["index"] for d in sets.values()])
    assert sorted(all_index.tolist()) == list(range(N_DIGITS))  # disjoint and complete
    assert digits_task.target.num_classes == 10 and digits_task.target.in_channels == 1
    assert digits_task.target.class_names == tuple("0123456789")
    assert digits_task.dataset("train") is train  # built once, cached


def test_digits_native_size_is_the_sklearn_data() -> None:
    from sklearn.datasets import load_digits

    task = make("digits", image_size=8)
    test = task.dataset("test")
    (mean,), (std,) = task.normalization
    raw = torch.from_numpy(load_digits().images).float()[test.tensors["index"]] / 16.0
    torch.testing.assert_close(test.tensors["image"][:, 0] * std + mean, raw, atol=1e-5, rtol=0)
    assert test.tensors["label"].tolist() == load_digits().target[test.tensors["index"].numpy()].tolist()


def test_digits_three_channels_replicate_grey(digits_task: Task) -> None:
    task = make("digits", channels=3, image_size=16)
    image = task.dataset("val").tensors["image"]
    assert image.shape[1:] == (3, 16, 16) and task.target.in_channels == 3
    assert torch.equal(image[:, 0], image[:, 1]) and torch.equal(image[:, 0], image[:, 2])
    assert torch.equal(task.dataset("val").tensors["index"], digits_task.dataset("val").tensors["index"])


def test_digits_split_is_stratified(digits_task: Task) -> None:
    everything = torch.cat([digits_task.dataset(s).tensors["label"] for s in SPLITS])
    per_class = torch.bincount(everything, minlength=10)
    for split, share in (("train", 0.60), ("val", 0.15), ("test", 0.25)):
        counts = torch.bincount(digits_task.dataset(split).tensors["label"], minlength=10)
        assert torch.all((counts - share * per_class).abs() <= 2), (split, counts, share * per_class)


def test_digits_determinism_and_seed(digits_task: Task) -> None:
    again = make("digits")
    for split in SPLITS:
        for field in ("image", "label", "index"):
            assert torch.equal(again.dataset(split).tensors[field], digits_task.dataset(split).tensors[field])
    other = make("digits", split_seed=1)
    assert not torch.equal(
        other.dataset("test").tensors["index"], digits_task.dataset("test").tensors["index"]
    )


@pytest.mark.parametrize("classes", [[7, 2, 5], [0, 1, 2, 3, 4], [9, 8, 6, 3, 1]])
def test_digits_class_subset_is_the_full_split_restricted(digits_task: Task, classes: list[int]) -> None:
    task = make("digits", classes=classes)
    assert task.target.num_classes == len(classes)
    assert task.target.class_names == tuple(str(c) for c in classes)
    for split in SPLITS:
        full, sub = digits_task.dataset(split).tensors, task.dataset(split).tensors
        keep = torch.isin(full["label"], torch.tensor(classes))
        assert torch.equal(sub["index"], full["index"][keep])
        assert torch.equal(sub["image"], full["image"][keep])  # same pixels, same normalisation
        assert torch.equal(sub["label"], torch.tensor([classes.index(c) for c in full["label"][keep]]))
        assert set(sub["label"].tolist()) == set(range(len(classes)))


def test_describe_is_json_and_names_options() -> None:
    task = make("digits", classes=[3, 8], image_size=16)
    described = json.loads(json.dumps(task.describe()))
    assert described["name"] == "digits" and described["classes"] == ["3", "8"]
    assert described["options"]["classes"] == [3, 8] and described["options"]["image_size"] == 16
    shapes = json.loads(json.dumps(make("shapes", classes=[5, 0], train_size=10).describe()))
    assert shapes["classes"] == ["star", "circle"] and shapes["options"]["train_size"] == 10
    assert shapes["render_version"] == RENDER_VERSION


def test_digits_fingerprint_stable_and_sensitive(digits_task: Task) -> None:
    base = digits_task.fingerprint()
    assert make("digits").fingerprint() == base
    variants = [
        {"classes": [0, 1]},
        {"classes": [1, 0]},
        {"image_size": 16},
        {"channels": 3},
        {"split_seed": 1},
        {"val_fraction": 0.2},
        {"test_fraction": 0.2},
    ]
    prints = [make("digits", **v).fingerprint() for v in variants]
    assert base not in prints and len(set(prints)) == len(variants)


def test_shapes_fingerprint_stable_and_sensitive() -> None:
    small = {"train_size": 40, "val_size": 20, "test_size": 20}
    base = make("shapes", **small).fingerprint()
    assert make("shapes", **small).fingerprint() == base
    variants = [{"seed": 1}, {"classes": [0, 1]}, {"image_size": 24}, {"train_size": 41}, {"max_shapes": 2}]
    prints = [make("shapes", **{**small, **v}).fingerprint() for v in variants]
    assert base not in prints and len(set(prints)) == len(variants)


# -- shapes ---------------------------------------------------------------------------------------


def test_shapes_fields(shapes_task: Task) -> None:
    train = shapes_task.dataset("train")
    assert [len(shapes_task.dataset(s)) for s in SPLITS] == [2000, 400, 600]
    t = train.tensors
    assert t["image"].dtype == torch.float32 and t["image"].shape == (2000, 3, 32, 32)
    assert t["mask"].dtype == torch.int64 and t["mask"].shape == (2000, 32, 32)
    assert t["box"].dtype == torch.float32 and t["box"].shape == (2000, 4)
    assert t["label"].dtype == torch.int64 and t["count"].dtype == torch.int64
    assert set(t["count"].tolist()) == {1, 2, 3}
    assert int(t["mask"].min()) == 0 and int(t["mask"].max()) == len(KINDS)
    assert len(train.extras["caption"]) == 2000 and isinstance(train[0]["caption"], str)
    assert train.batch(torch.tensor([3, 1]))["caption"] == [
        train.extras["caption"][3],
        train.extras["caption"][1],
    ]
    # Labels are balanced: each kind is the largest about one time in six.
    share = torch.bincount(t["label"], minlength=len(KINDS)).float() / 2000
    assert torch.all((share - 1 / 6).abs() < 0.04), share
    assert abs(float(t["image"].mean())) < 0.1 and abs(float(t["image"].std()) - 1) < 0.1
    target = shapes_task.target
    assert target.kind == "label" and target.num_classes == 6 and target.in_channels == 3
    assert target.image_size == (32, 32) and target.class_names == KINDS


CAPTION = re.compile(
    r"^(?P<np1>a \w+ \w+ \w+) at the (?P<place1>[\w ]+?)"
    r"(?: (?P<rel>above|below|to the left of|to the right of) (?P<np2>a \w+ \w+ \w+)"
    r"(?: and (?P<np3>a \w+ \w+ \w+) at the (?P<place3>[\w ]+))?)?$"
)


def place_of(box: np.ndarray) -> str:
    vertical = ("top", "", "bottom")[min(int(box[1] * 3), 2)]
    horizontal = ("left", "", "right")[min(int(box[0] * 3), 2)]
    return " ".join(w for w in (vertical, horizontal) if w) or "centre"


def box_of(hit: np.ndarray) -> np.ndarray:
    """Normalised (cx, cy, w, h) of the True pixels of an H x W array."""
    ys, xs = np.nonzero(hit)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    return np.array([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]) / hit.shape[-1]


def colour_regions(image: torch.Tensor, mean, std) -> dict[str, np.ndarray]:
    """Pixels of each palette colour (shapes of one image have distinct colours)."""
    raw = (image * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)).numpy()
    regions = {}
    for name, rgb in PALETTE.items():
        hit = np.all(np.abs(raw - np.array(rgb, dtype=np.float32)[:, None, None]) < 1e-4, axis=0)
        if hit.any():
            regions[name] = hit
    return regions


def test_shapes_mask_box_label_caption_agree_with_the_pixels(shapes_task: Task) -> None:
    data = shapes_task.dataset("test")
    mean, std = shapes_task.normalization
    side = 32
    for i in range(len(data)):
        item = data[i]
        regions = colour_regions(item["image"], mean, std)
        mask = item["mask"].numpy()
        shape_pixels = np.logical_or.reduce(list(regions.values()))
        assert np.array_equal(mask > 0, shape_pixels), i  # mask non-zero exactly where shapes are
        raw = item["image"] * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
        assert float(raw.amax(0)[~torch.from_numpy(shape_pixels)].max()) < 0.16  # dark background
        assert len(regions) == int(item["count"])  # every shape is visible
        for hit in regions.values():
            assert len(np.unique(mask[hit])) == 1  # one shape, one kind
        order = sorted(regions, key=lambda c: -regions[c].sum())
        largest = regions[order[0]]
        if len(order) > 1:  # the largest shape is never a near tie
            assert largest.sum() >= 1.25 * regions[order[1]].sum()
        assert int(mask[largest][0]) - 1 == int(item["label"])
        np.testing.assert_allclose(item["box"].numpy(), box_of(largest), atol=1e-6)
        # The caption names the shapes from the largest down, with the right colour, kind and place.
        match = CAPTION.match(item["caption"])
        assert match, item["caption"]
        phrases = [match[g] for g in ("np1", "np2", "np3") if match[g]]
        assert len(phrases) == int(item["count"])
        for phrase, colour in zip(phrases, order, strict=True):
            _, size, said, kind = phrase.split()
            assert said in COLOUR_NAMES and regions[said].sum() == regions[colour].sum()  # ties may swap
            assert kind == KINDS[int(mask[regions[said]][0]) - 1]
            extent = np.sqrt(regions[said].sum()) / side
            assert size == ("large" if extent >= 0.3 else "medium" if extent >= 0.18 else "small")
        assert match["place1"] == place_of(item["box"].numpy())
        if match["rel"]:
            first, second = box_of(largest), box_of(regions[phrases[1].split()[2]])
            dx, dy = first[0] - second[0], first[1] - second[1]
            if abs(dy) >= abs(dx):
                assert match["rel"] == ("above" if dy < 0 else "below")
            else:
                assert match["rel"] == ("to the left of" if dx < 0 else "to the right of")
        if match["np3"]:
            assert match["place3"] == place_of(box_of(regions[phrases[2].split()[2]]))


def test_shapes_box_is_inside_the_image_and_tight(shapes_task: Task) -> None:
    box = shapes_task.dataset("train").tensors["box"]
    assert torch.all(box[:, 2:] > 0) and torch.all(box[:, :2] - box[:, 2:] / 2 >= 0)
    assert torch.all(box[:, :2] + box[:, 2:] / 2 <= 1)


@pytest.mark.parametrize("kind", KINDS)
def test_shape_unit_areas_match_the_geometry(kind: str) -> None:
    grid = (np.arange(800) + 0.5) / 400 - 1.0  # pixel centres over [-1, 1]
    area = inside(kind, grid[None, :], grid[:, None]).mean() * 4.0
    assert area == pytest.approx(UNIT_AREA[kind], rel=0.01)


def test_shapes_determinism_seeds_and_prefix(shapes_task: Task) -> None:
    # A fresh task with the same seed reproduces the samples, and a smaller train_size gives a prefix
    # of a larger one (each chunk of CHUNK samples has its own stream).
    full = shapes_task.dataset("train")
    small = make("shapes", train_size=600, val_size=50, test_size=50)
    assert CHUNK < 600
    for field in ("image", "label", "mask", "box", "count"):
        assert torch.equal(small.dataset("train").tensors[field], full.tensors[field][:600])
    assert small.dataset("train").extras["caption"] == full.extras["caption"][:600]
    other = make("shapes", seed=1, train_size=600, val_size=50, test_size=50)
    assert not torch.equal(other.dataset("train").tensors["mask"], small.dataset("train").tensors["mask"])
    assert (
        other.dataset("train").tensors["label"] != small.dataset("train").tensors["label"]
    ).float().mean() > 0.5
    # Splits use different streams.
    val = shapes_task.dataset("val").tensors["mask"]
    assert not torch.equal(val, full.tensors["mask"][: len(val)])


def test_shapes_output_is_pinned() -> None:
    # A change here changes every stored shapes experiment: bump RENDER_VERSION with it.
    data = make("shapes", image_size=16, train_size=12, val_size=1, test_size=1).dataset("train")
    assert RENDER_VERSION == 1
    assert data.tensors["label"].tolist() == [4, 1, 3, 4, 2, 2, 4, 5, 0, 5, 3, 5]
    assert data.tensors["count"].tolist() == [1, 2, 2, 1, 1, 1, 1, 1, 1, 3, 1, 3]
    assert int(data.tensors["mask"].sum()) == 2159
    assert data.extras["caption"][1] == "a large magenta square at the top right above a medium yellow cross"


def test_shapes_class_subset_keeps_original_mask_kinds(shapes_task: Task) -> None:
    classes = [5, 0, 2]
    task = make("shapes", classes=classes)
    assert task.target.num_classes == 3 and task.target.class_names == ("star", "circle", "triangle")
    for split in SPLITS:
        full, sub = shapes_task.dataset(split), task.dataset(split)
        keep = torch.isin(full.tensors["label"], torch.tensor(classes))
        assert torch.equal(sub.tensors["index"], full.tensors["index"][keep])
        for field in ("image", "mask", "box", "count"):
            assert torch.equal(sub.tensors[field], full.tensors[field][keep])
        expected = torch.tensor([classes.index(c) for c in full.tensors["label"][keep]])
        assert torch.equal(sub.tensors["label"], expected)
        keep_rows = torch.nonzero(keep).flatten().tolist()
        assert sub.extras["caption"] == [full.extras["caption"][i] for i in keep_rows]
    stars = task.dataset("train").tensors["label"] == 0
    assert torch.all((task.dataset("train").tensors["mask"][stars] == 6).flatten(1).any(1))


def test_shapes_generation_is_fast() -> None:
    # CPU time, so that a busy test machine does not fail it; about 0.4 s on one idle core.
    start = time.process_time()
    task = make("shapes", train_size=2000, val_size=400, test_size=600, seed=7)
    for split in SPLITS:
        task.dataset(split)
    assert time.process_time() - start < 2.0


# -- loss and metrics -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["digits", "shapes"])
def test_loss_and_accuracy(name: str, digits_task: Task, shapes_task: Task) -> None:
    task = {"digits": digits_task, "shapes": shapes_task}[name]
    batch = task.dataset("val").batch(torch.arange(64))
    classes = task.target.num_classes
    perfect = {"logits": 20.0 * torch.nn.functional.one_hot(batch["label"], classes).float()}
    wrong = {"logits": 20.0 * torch.nn.functional.one_hot((batch["label"] + 1) % classes, classes).float()}
    assert float(task.loss(perfect, batch)) < 1e-6
    assert float(task.loss(wrong, batch)) == pytest.approx(20.0, abs=1e-3)
    for outputs, accuracy in ((perfect, 1.0), (wrong, 0.0)):
        metrics = task.metrics()
        assert task.primary_metric in metrics
        task.update_metrics(metrics, outputs, batch)
        assert float(metrics["accuracy"].compute()) == accuracy
    half = {"logits": torch.where(torch.arange(64)[:, None] < 32, perfect["logits"], wrong["logits"])}
    metrics = task.metrics()
    task.update_metrics(metrics, half, batch)
    assert float(metrics["accuracy"].compute()) == pytest.approx(0.5)


# -- option errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "options", "pattern"),
    [
        ("digits", {"image_size": 4}, r"image_size must be >= 8, got 4"),
        ("digits", {"image_size": 16.0}, r"image_size must be an integer"),
        ("digits", {"channels": 2}, r"channels must be one of \[1, 3\], got 2"),
        ("digits", {"val_fraction": 0.5}, r"val_fraction must be in \(0.0, 0.5\), got 0.5"),
        ("digits", {"test_fraction": 0}, r"test_fraction must be in \(0.0, 0.5\), got 0"),
        ("digits", {"split_seed": -1}, r"split_seed must be in 0\.\.\d+, got -1"),
        ("digits", {"classes": [3, 10]}, r"classes \[10\] are out of range"),
        ("digits", {"classes": [1, 1]}, r"classes \[1, 1\] contain duplicates"),
        ("digits", {"classes": [4]}, r"classes must name at least 2 classes"),
        ("digits", {"classes": "01"}, r"classes must be a list of class indices"),
        ("shapes", {"image_size": 8}, r"image_size must be >= 16, got 8"),
        ("shapes", {"train_size": 0}, r"train_size must be >= 1, got 0"),
        ("shapes", {"max_shapes": 4}, r"max_shapes must be in 1\.\.3, got 4"),
        ("shapes", {"min_shapes": 3, "max_shapes": 2}, r"max_shapes must be in 3\.\.3, got 2"),
        ("shapes", {"seed": True}, r"seed must be an integer"),
        ("shapes", {"classes": [0, 6]}, r"classes \[6\] are out of range; allowed: 0=circle"),
    ],
)
def test_bad_options_name_the_option(name: str, options: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=f"^{name}: {pattern}"):
        make(name, **options)


@pytest.mark.parametrize("name", ["digits", "shapes"])
def test_unknown_option_and_split(name: str) -> None:
    with pytest.raises(TypeError, match="colour"):
        make(name, colour="red")
    with pytest.raises(ValueError, match=r"unknown split 'training'; allowed: train, val, test"):
        make(name).dataset("training")


def test_tiny_digits_split_fails_with_the_options() -> None:
    with pytest.raises(ValueError, match=r"digits: cannot split 1797 samples with val_fraction=0.001"):
        make("digits", val_fraction=0.001).dataset("train")


def test_given_normalization_replaces_the_default() -> None:
    from transferlab.registry import TASKS

    default = TASKS.get("digits")(image_size=16, channels=3)
    given = TASKS.get("digits")(image_size=16, channels=3, mean=[0.5, 0.4, 0.3], std=[0.25, 0.2, 0.1])
    (dm, ds), (gm, gs) = default.normalization, given.normalization
    assert gm == (0.5, 0.4, 0.3) and gs == (0.25, 0.2, 0.1)
    raw = default.dataset("train").tensors["image"] * torch.tensor(ds).view(1, 3, 1, 1) + torch.tensor(
        dm
    ).view(1, 3, 1, 1)
    expected = (raw - torch.tensor(gm).view(1, 3, 1, 1)) / torch.tensor(gs).view(1, 3, 1, 1)
    assert torch.allclose(given.dataset("train").tensors["image"], expected, atol=1e-5)
    shapes = TASKS.get("shapes")(
        image_size=16, train_size=8, val_size=4, test_size=4, mean=[0, 0, 0], std=[1, 1, 1]
    )
    assert shapes.normalization == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert float(shapes.dataset("train").tensors["image"].min()) >= 0.0  # raw [0, 1] pixels


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mean": [0.5]}, "give both mean and std"),
        ({"mean": [0.5, 0.5], "std": [0.2, 0.2]}, "mean needs 1 values"),
        ({"mean": [0.5], "std": [0.0]}, "std values must be > 0"),
    ],
)
def test_bad_normalization_options(options: dict, message: str) -> None:
    from transferlab.registry import TASKS

    with pytest.raises(ValueError, match=message):
        TASKS.get("digits")(**options)


# -- helpers the folder tasks and heads share (transferlab.tasks.splits) ------------------------------


def test_normalisation_helpers_round_trip_and_clamp() -> None:
    images = torch.rand(6, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    images[:, 1] = 0.5  # a channel constant over the training split is only centred
    train = np.array([0, 2, 4])
    normalised, (mean, std) = normalized_images(images.clone(), train, None)
    assert mean == pytest.approx((float(images[train, 0].mean()), 0.5)) and std[1] == 1.0
    assert float(normalised[train, 0].mean()) == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(to_unit_pixels(normalised, mean, std), images)
    given = ((0.25, 0.5), (0.5, 2.0))
    again, used = normalized_images(images.clone(), train, given)
    assert used == given and torch.allclose(again[:, 0], (images[:, 0] - 0.25) / 0.5)
    assert float(to_unit_pixels(torch.full((1, 1, 2, 2), 9.0), [0.5], [1.0]).max()) == 1.0  # clamped
    assert to_unit_pixels(normalised[0], torch.tensor(mean), np.asarray(std)).shape == (2, 4, 4)


def test_subset_mask_and_utf8_reader(tmp_path: Path) -> None:
    mask = torch.tensor([[0, 1, 2], [3, 4, 1]])
    assert subset_mask(mask, [2, 0], num_values=5).tolist() == [[0, 2, 0], [1, 0, 2]]
    path = tmp_path / "notes.csv"
    path.write_bytes("\ufeffa,b\n".encode())
    assert read_utf8_text(path, "notes file") == ("a,b\n", "\ufeffa,b\n".encode())
    path.write_bytes(b"a\n\xff")
    with pytest.raises(ValueError, match=rf"{path}:2: not UTF-8 text \(invalid start byte at byte 2\)"):
        read_utf8_text(path, "notes file")
    path.write_bytes(b" \n")
    with pytest.raises(ValueError, match=r"notes file '.*notes.csv' is empty; expected a header"):
        read_utf8_text(path, "notes file", expected="a header")

    class NotesError(ValueError):
        pass

    with pytest.raises(NotesError, match=r"cannot read notes file '.*none.csv': No such file"):
        read_utf8_text(tmp_path / "none.csv", "notes file", NotesError)
