"""The ``image_folder`` task on tiny generated folders: classes, splits, pixels, fingerprint, errors."""

from __future__ import annotations

import os
import shutil
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from transferlab.cli.main import cli
from transferlab.engine.contract import check_plugin
from transferlab.registry import TASKS
from transferlab.service.planner import plan_trials
from transferlab.service.spec import load_spec
from transferlab.tasks.base import SPLITS, InMemoryDataset
from transferlab.tasks.folders import ImageFolderError, ImageFolderTask

CLASSES = ("ant", "bee", "cat", "dog")
PALETTE = np.array([[220, 40, 40], [40, 200, 40], [40, 60, 220], [230, 210, 30]], dtype=np.float64)
PER_CLASS = 12


def pattern(label: int, i: int, size: tuple[int, int] = (20, 20)) -> Image.Image:
    """A class-coloured image with a random checker pattern (deterministic by label and i)."""
    rng = np.random.default_rng([label, i])
    h, w = size
    cells = rng.random((4, 4, 1)) * 0.6 + 0.4
    shade = np.kron(cells, np.ones((h // 4 + 1, w // 4 + 1, 1)))[:h, :w]
    pixels = (PALETTE[label] * shade + rng.normal(0, 8, (h, w, 3))).clip(0, 255)
    return Image.fromarray(pixels.astype(np.uint8))


def make_folder(
    root: Path, classes: tuple[str, ...] = CLASSES, per_class: int = PER_CLASS, ext: str = "png"
) -> Path:
    """``root/<class>/<class>_NN.<ext>`` with ``per_class`` images of every class."""
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pattern(label % len(PALETTE), i).save(root / name / f"{name}_{i:02d}.{ext}")
    return root


def build(root: Path, **options) -> ImageFolderTask:
    return TASKS.get("image_folder")(root=str(root), **options)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "data")


@pytest.fixture
def task(folder: Path) -> ImageFolderTask:
    return build(folder)


def tensors(task: ImageFolderTask, split: str) -> dict[str, torch.Tensor]:
    dataset = task.dataset(split)
    assert isinstance(dataset, InMemoryDataset)
    return dataset.tensors


# -- classes, labels and splits ---------------------------------------------------------------------
def test_registered_with_description() -> None:
    entry = TASKS.entry("image_folder")
    assert entry.source == "transferlab" and "per class" in entry.description


def test_classes_are_sorted_folder_names_and_labels_follow_them(tmp_path: Path) -> None:
    names = ("dog", "Zebra", "ant", "cat")  # created unsorted; "Z" sorts before "a"
    task = build(make_folder(tmp_path / "data", names))
    assert task.target.class_names == ("Zebra", "ant", "cat", "dog")
    assert (task.target.kind, task.target.num_classes, task.target.in_channels) == ("label", 4, 3)
    assert task.target.image_size == (32, 32)
    assert len(task.files) == 4 * PER_CLASS  # grouped by class in label order, sorted within each
    assert task.files == tuple(
        sorted(task.files, key=lambda f: (task.target.class_names.index(f.split("/")[0]), f))
    )
    for split in SPLITS:
        t = tensors(task, split)
        for index, label in zip(t["index"].tolist(), t["label"].tolist(), strict=True):
            assert task.files[index].split("/")[0] == task.target.class_names[label]


def test_stratified_split_sizes(task: ImageFolderTask) -> None:
    # 12 images per class: test 25% -> 3, val 15% of all -> 2, train the 7 left, in every class.
    per_class = {"train": 7, "val": 2, "test": 3}
    seen: list[int] = []
    for split in SPLITS:
        t = tensors(task, split)
        assert t["image"].shape == (4 * per_class[split], 3, 32, 32) and t["image"].dtype == torch.float32
        assert torch.bincount(t["label"]).tolist() == [per_class[split]] * 4
        seen += t["index"].tolist()
    assert sorted(seen) == list(range(4 * PER_CLASS))  # disjoint, and every image used


def test_split_is_deterministic_by_seed(folder: Path) -> None:
    first, again, other = build(folder), build(folder), build(folder, split_seed=1)
    for split in SPLITS:
        for field in ("image", "label", "index"):
            assert torch.equal(tensors(first, split)[field], tensors(again, split)[field])
    assert not torch.equal(tensors(first, "test")["index"], tensors(other, "test")["index"])
    assert first.fingerprint() == again.fingerprint() != other.fingerprint()


def test_fractions_change_split_sizes(folder: Path) -> None:
    task = build(folder, val_fraction=0.25, test_fraction=0.25)
    assert [len(task.dataset(s)) for s in SPLITS] == [24, 12, 12]


def test_class_subset_is_renumbered_and_split_before_the_subset(task: ImageFolderTask, folder: Path) -> None:
    subset = build(folder, classes=[3, 1])
    assert subset.target.class_names == ("dog", "bee") and subset.target.num_classes == 2
    assert subset.normalization == task.normalization  # A and B halves see the same pixels
    for split in SPLITS:
        full, part = tensors(task, split), tensors(subset, split)
        keep = (full["label"] == 3) | (full["label"] == 1)
        assert torch.equal(part["index"], full["index"][keep])  # the same images in the same split
        assert torch.equal(part["image"], full["image"][keep])
        assert torch.equal(part["label"], (full["label"][keep] == 1).long())  # dog -> 0, bee -> 1
    assert subset.fingerprint() != task.fingerprint()


# -- pixels ----------------------------------------------------------------------------------------
def test_default_normalisation_is_the_training_split_per_channel(task: ImageFolderTask) -> None:
    train = tensors(task, "train")["image"]
    assert train.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (train.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-4
    mean, std = task.normalization
    assert len(mean) == len(std) == 3 and mean[0] != mean[1]  # per channel, not one value


def test_given_normalisation_and_resize(folder: Path) -> None:
    task = build(folder, image_size=16, mean=[0.5, 0.5, 0.5], std=[0.25, 0.5, 1.0])
    t = tensors(task, "val")
    path = folder / task.files[int(t["index"][0])]
    expected = np.asarray(Image.open(path).convert("RGB").resize((16, 16), Image.Resampling.BILINEAR))
    expected = (torch.from_numpy(expected.copy()).permute(2, 0, 1).float() / 255 - 0.5) / torch.tensor(
        [0.25, 0.5, 1.0]
    ).view(3, 1, 1)
    assert torch.allclose(t["image"][0], expected, atol=1e-5)


def test_shorter_side_is_resized_and_the_centre_cropped(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data", ("a", "b"), per_class=6)
    wide = np.zeros((30, 90, 3), dtype=np.uint8)
    wide[:, :30, 0], wide[:, 30:60, 1], wide[:, 60:, 2] = 255, 255, 255  # red | green | blue
    Image.fromarray(wide).save(root / "a" / "wide.png")
    task = build(root, image_size=8, mean=[0, 0, 0], std=[1, 1, 1])
    row = task.files.index("a/wide.png")
    image = next(
        t["image"][t["index"].tolist().index(row)]
        for t in (tensors(task, s) for s in SPLITS)
        if row in t["index"].tolist()
    )
    assert image.shape == (3, 8, 8)
    # Only the green middle third is left (the bilinear filter lets a little red and blue in at the edges).
    assert torch.equal(image[1, :, 1:-1], torch.ones(8, 6)) and image[1].min() > 0.85
    assert image[0].max() < 0.15 and image[2].max() < 0.15


def test_grayscale(folder: Path) -> None:
    task = build(folder, channels=1, image_size=20, mean=[0.0], std=[1.0])
    assert task.target.in_channels == 1
    t = tensors(task, "test")
    assert t["image"].shape == (12, 1, 20, 20)
    grey = np.asarray(Image.open(folder / task.files[int(t["index"][0])]).convert("L"))
    assert torch.allclose(t["image"][0, 0], torch.from_numpy(grey.copy()).float() / 255, atol=1e-6)
    default = build(folder, channels=1)
    assert len(default.normalization[0]) == 1


def test_image_formats_nested_folders_and_hidden_files(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data", ("a", "b"), per_class=3)
    img = pattern(0, 99)
    for name in ("x.jpg", "x.JPEG", "x.bmp", "x.gif", "x.webp", "x.PNG"):
        img.save(root / "a" / name)
    img.convert("RGBA").save(root / "a" / "rgba.png")
    img.convert("P").save(root / "a" / "palette.png")
    Image.fromarray((np.arange(400).reshape(20, 20) * 150).astype(np.uint16)).save(root / "a" / "grey16.png")
    (root / "b" / "nested" / "deeper").mkdir(parents=True)
    img.save(root / "b" / "nested" / "deeper" / "n.png")
    # Hidden entries are the only ones ignored, whatever they hold.
    (root / "a" / ".DS_Store").write_bytes(b"\x00\x01junk")
    (root / "a" / "._x.jpg").write_bytes(b"AppleDouble")
    (root / "b" / ".cache").mkdir()
    (root / "b" / ".cache" / "broken.png").write_bytes(b"")
    (root / ".git").mkdir()
    task = build(root, val_fraction=0.2, test_fraction=0.2)
    assert len(task.files) == 3 + 9 + 3 + 1
    assert "b/nested/deeper/n.png" in task.files and not any(
        "/." in f or f.startswith(".") for f in task.files
    )


def test_premade_splits_are_used_as_they_are(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for split, n in (("train", 5), ("val", 2), ("test", 3)):
        make_folder(root / split, ("cat", "ant"), per_class=n)
    task = build(root)
    assert task.target.class_names == ("ant", "cat")
    assert task.describe()["split"] == "pre-made"
    for split, n in (("train", 5), ("val", 2), ("test", 3)):
        t = tensors(task, split)
        assert len(t["label"]) == 2 * n
        assert all(task.files[i].startswith(f"{split}/") for i in t["index"].tolist())
        for index, label in zip(t["index"].tolist(), t["label"].tolist(), strict=True):
            assert task.files[index].split("/")[1] == task.target.class_names[label]
    assert tensors(task, "train")["image"].mean(dim=(0, 2, 3)).abs().max() < 1e-4


# -- fingerprint -----------------------------------------------------------------------------------
def test_fingerprint_follows_content_not_location_or_mtime(task: ImageFolderTask, folder: Path) -> None:
    first = task.fingerprint()
    assert first == build(folder).fingerprint()  # stable across constructions
    moved = shutil.copytree(folder, folder.parent / "copy")  # same files elsewhere: same data
    assert build(moved).fingerprint() == first
    os.utime(folder / "ant" / "ant_00.png", (1, 1))  # a touch changes no pixel...
    assert build(folder).fingerprint() == first
    pattern(0, 1000).save(folder / "ant" / "ant_00.png")  # ...rewriting the file does
    rewritten = build(folder).fingerprint()
    assert rewritten != first
    pattern(1, 1000).save(folder / "bee" / "bee_99.png")  # one more file
    assert build(folder).fingerprint() not in (first, rewritten)
    assert build(folder, image_size=16).fingerprint() != build(folder).fingerprint()


def test_contract_checks_pass(folder: Path) -> None:
    report = check_plugin("image_folder", options={"root": str(folder)})
    assert report.ok, [(c.name, c.detail) for c in report.failed]


def test_a_tiny_model_learns_the_colours(folder: Path) -> None:
    from transferlab.engine.assembly import build_model
    from transferlab.engine.fit import FitConfig, fit

    torch.manual_seed(0)
    task = build(folder, image_size=16)
    model = build_model(("convnet", {"widths": [8, 16]}), ("classify", {}), task)
    result = fit(model, task, FitConfig(epochs=8, batch_size=8, lr=0.05, device="cpu"))
    assert result.test["accuracy"] >= 0.9  # four colours; chance is 0.25


# -- errors: each names the folder or file -------------------------------------------------------------
def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# (how to break a good folder, options, fragments the message must contain; {root} is the folder)
BROKEN: list = [
    pytest.param(lambda r: shutil.rmtree(r), {}, ["root folder '{root}' does not exist"], id="missing-root"),
    pytest.param(
        lambda r: (shutil.rmtree(r), r.write_text("x")),
        {},
        ["root '{root}' is a file, not a folder"],
        id="root-is-a-file",
    ),
    pytest.param(
        lambda r: [shutil.rmtree(r / c) for c in CLASSES],
        {},
        ["'{root}' has no class sub-folders; expected {root}/<class name>/<images>"],
        id="no-class-folders",
    ),
    pytest.param(
        lambda r: [shutil.rmtree(r / c) for c in CLASSES[1:]],
        {},
        ["'{root}' has only 1 class folder ('ant'); a classifier needs at least 2"],
        id="one-class",
    ),
    pytest.param(
        lambda r: (r / "README.txt").write_text("about"),
        {},
        ["'{root}' holds files outside class folders", "{root}/README.txt"],
        id="stray-file-at-root",
    ),
    pytest.param(
        lambda r: (r / "emu").mkdir(),
        {},
        ["class folder(s) holding no images", "{root}/emu"],
        id="empty-class-folder",
    ),
    pytest.param(
        lambda r: ((r / "emu").mkdir(), (r / "emu" / ".DS_Store").write_text("")),
        {},
        ["class folder(s) holding no images", "{root}/emu"],
        id="class-folder-with-hidden-files-only",
    ),
    pytest.param(
        lambda r: (r / "bee" / "labels.csv").write_text("a,b\n"),
        {},
        [
            "1 file(s) are not images by their extension",
            "only hidden dot-files are ignored",
            "{root}/bee/labels.csv",
        ],
        id="unknown-extension",
    ),
    pytest.param(
        lambda r: (r / "cat" / "cat_03.png").write_bytes(b""),
        {},
        ["1 image file(s) cannot be used", "{root}/cat/cat_03.png: empty file (0 bytes)"],
        id="zero-byte-image",
    ),
    pytest.param(
        lambda r: (r / "cat" / "notes.png").write_text("not a picture at all\n"),
        {},
        ["{root}/cat/notes.png: not an image file (Pillow cannot identify its format)"],
        id="text-file-with-image-extension",
    ),
    pytest.param(
        lambda r: truncate(r / "dog" / "dog_05.png"),
        {},
        ["{root}/dog/dog_05.png: corrupt or truncated image"],
        id="truncated-png",
    ),
    pytest.param(
        lambda r: (pattern(0, 0, (120, 120)).save(r / "ant" / "t.jpg"), truncate(r / "ant" / "t.jpg")),
        {},
        ["{root}/ant/t.jpg: corrupt or truncated image"],
        id="truncated-jpeg",
    ),
    pytest.param(
        lambda r: [(r / "bee" / f"bad{i}.png").write_bytes(b"") for i in range(12)],
        {},
        ["12 image file(s) cannot be used", "{root}/bee/bad0.png: empty file", "(and 2 more)"],
        id="many-bad-files-listed-at-once",
    ),
    pytest.param(
        lambda r: [(r / "cat" / f"cat_{i:02d}.png").unlink() for i in range(2, PER_CLASS)],
        {},
        [
            "every class needs at least 3 images, one for each of train, val and test",
            "{root}/cat: 2 image(s)",
        ],
        id="class-too-small",
    ),
    pytest.param(
        lambda r: [(r / "ant" / f"ant_{i:02d}.png").unlink() for i in range(4, PER_CLASS)],
        {},
        [
            "with val_fraction=0.15, test_fraction=0.25 some splits get no image of a class",
            "{root}/ant (4 images): none in val",
        ],
        id="split-misses-a-small-class",
    ),
    pytest.param(
        lambda r: None,
        {"val_fraction": 0.05},
        [
            "cannot split 48 samples with val_fraction=0.05, test_fraction=0.25",
            "(in '{root}', images per class: ant 12, bee 12, cat 12, dog 12); add images or raise",
        ],
        id="split-smaller-than-the-classes",
    ),
    pytest.param(
        lambda r: None,
        {"max_images": 40},
        ["'{root}' holds 48 images, more than max_images=40", "raise max_images"],
        id="too-many-images",
    ),
    pytest.param(
        lambda r: os.mkfifo(r / "ant" / "pipe.png"),
        {},
        ["{root}/ant/pipe.png: cannot be read (not a regular file)"],
        id="fifo-with-image-extension",
    ),
    pytest.param(
        lambda r: (r / "ant" / "loop").symlink_to(r / "ant", target_is_directory=True),
        {},
        ["folder '{root}/ant/loop' links back to a folder already listed"],
        id="symlink-loop",
    ),
    pytest.param(
        lambda r: None,
        {"classes": [0, 4]},
        ["image_folder: classes [4] are out of range; allowed: 0=ant, 1=bee, 2=cat, 3=dog"],
        id="class-out-of-range",
    ),
    pytest.param(
        lambda r: None, {"channels": 2}, ["channels must be one of [1, 3], got 2"], id="bad-channels"
    ),
    pytest.param(
        lambda r: None, {"image_size": 4}, ["image_size must be in 8..1024, got 4"], id="image-too-small"
    ),
]


@pytest.mark.parametrize(("breakage", "options", "fragments"), BROKEN)
def test_broken_folders_are_refused_naming_the_file(
    folder: Path, breakage: Callable[[Path], object], options: dict, fragments: list[str]
) -> None:
    breakage(folder)
    with pytest.raises(ValueError) as error:
        build(folder, **options)
    message = str(error.value)
    assert message.startswith("image_folder: ")
    for fragment in fragments:
        assert fragment.format(root=folder) in message


@pytest.mark.parametrize(
    ("layout", "options", "fragment"),
    [
        (("train", "test"), {}, "has split folder(s) train, test but not val; give all three"),
        (("train", "val", "test", "extra"), {}, "holds extra beside its train/, val/ and test/ folders"),
        (("train", "val", "test"), {"split_seed": 3}, "split_seed cannot apply: '{root}' has pre-made"),
        (("train", "val", "test"), {"val_fraction": 0.1}, "val_fraction cannot apply"),
    ],
)
def test_bad_premade_layouts(tmp_path: Path, layout: tuple[str, ...], options: dict, fragment: str) -> None:
    root = tmp_path / "data"
    for split in layout:
        make_folder(root / split, ("ant", "bee"), per_class=3)
    with pytest.raises(ImageFolderError, match="^image_folder: ") as error:
        build(root, **options)
    assert fragment.format(root=root) in str(error.value)


def test_premade_splits_need_the_same_classes(tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_folder(root / "train", ("ant", "bee", "cat"), per_class=3)
    make_folder(root / "val", ("ant", "bee"), per_class=3)
    make_folder(root / "test", ("ant", "bee", "cat", "emu"), per_class=3)
    with pytest.raises(ImageFolderError) as error:
        build(root)
    assert f"'{root}/val' lacks class folder(s) ['cat']; every split folder needs the same" in str(
        error.value
    )


@pytest.mark.parametrize(
    ("root", "fragment"),
    [
        (None, "root is required"),
        (5, "root must be a folder path, got 5"),
        ("  ", "root must be a folder path"),
    ],
)
def test_root_option_is_checked(root: object, fragment: str) -> None:
    with pytest.raises(ImageFolderError, match=fragment):
        TASKS.get("image_folder")(root=root)


# -- through the spec and the CLI -------------------------------------------------------------------
def spec_text(root: Path, study: str = "transfer") -> str:
    section = (
        "transfer: {split: {A: [0, 1], B: [2, 3]}, depths: [1, 2], conditions: [AnB, AnB+, random]}"
        if study == "transfer"
        else "single: {freeze_depth: 1, classes: [1, 3]}"
    )
    return textwrap.dedent(
        f"""
        name: folders
        study: {study}
        backbone: {{name: convnet, widths: [4, 8]}}
        task: {{name: image_folder, root: "{root}", image_size: 16}}
        {section}
        train: {{epochs: 1, batch_size: 16}}
        seeds: [0, 1]
        """
    )


def test_validate_accepts_an_image_folder_spec(tmp_path: Path, folder: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(spec_text(folder))
    result = CliRunner(env={"COLUMNS": "250"}).invoke(cli, ["validate", str(spec)])
    assert result.exit_code == 0, result.output
    assert "task image_folder (primary metric accuracy)" in result.output
    trials = plan_trials(load_spec(spec))
    assert len(trials) == 2 * (2 + 2 * 3)  # per seed: baseA, baseB, then 2 depths x 3 conditions
    assert {t.classes for t in trials} == {(0, 1), (2, 3)}


def test_single_study_plan_builds(tmp_path: Path, folder: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(spec_text(folder, "single"))
    vspec = load_spec(spec)
    assert vspec.num_classes == 4 and vspec.task_options["root"] == str(folder)
    trials = plan_trials(vspec)
    assert [(t.freeze_depth, t.classes) for t in trials] == [(1, (1, 3)), (1, (1, 3))]


def test_validate_names_the_bad_file_and_writes_nothing(tmp_path: Path, folder: Path) -> None:
    (folder / "dog" / "dog_01.png").write_bytes(b"")
    spec = tmp_path / "spec.yaml"
    spec.write_text(spec_text(folder))
    result = CliRunner(env={"COLUMNS": "250"}).invoke(cli, ["validate", str(spec)])
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {spec}: task: image_folder: 1 image file(s) cannot be used")
    assert f"{folder}/dog/dog_01.png: empty file (0 bytes)" in result.output


def test_a_relative_root_is_made_absolute_for_the_trials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transferlab.service.planner import plan_trials
    from transferlab.service.spec import validate_spec_text

    make_folder(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    text = "name: rel\nstudy: single\nbackbone: {name: convnet, widths: [4, 8]}\n"
    text += "task: {name: image_folder, root: data, image_size: 16}\n"
    vspec = validate_spec_text(text)
    (trial,) = plan_trials(vspec)
    assert trial.config(vspec)["task"]["options"]["root"] == str(tmp_path / "data")


def test_threads_decode_the_same_pixels_and_problems_in_order(folder: Path, monkeypatch) -> None:
    from transferlab.tasks import folders

    assert folders.decode_workers(10) == 1  # a handful of files is decoded on the calling thread
    files = sorted(folder.rglob("*.png"))
    (folder / CLASSES[0] / "broken.png").write_bytes(b"not a png")
    files.insert(3, folder / CLASSES[0] / "broken.png")
    files.insert(5, folder / "missing.png")
    results = {}
    for workers in (1, 4):
        monkeypatch.setattr(folders, "decode_workers", lambda count, w=workers: w)
        pixels = np.zeros((len(files), 16, 16, 3), dtype=np.uint8)
        results[workers] = (folders.decode_files(files, pixels), pixels)
    (one, pixels_one), (four, pixels_four) = results[1], results[4]
    assert one == four and np.array_equal(pixels_one, pixels_four)
    assert [i for i, (_, problem, _) in enumerate(four) if problem] == [3, 5]
    assert "no such file" in four[5][1] and pixels_four[0].any()
