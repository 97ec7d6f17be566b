"""The ``mask_folder`` task on tiny generated folders: pairs, pixels, classes, splits and errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from transferlab.engine.contract import check_plugin
from transferlab.registry import TASKS
from transferlab.service.spec import validate_spec_text
from transferlab.tasks.base import SPLITS, InMemoryDataset
from transferlab.tasks.mask_folders import MaskFolderError, MaskFolderTask

CLASS_NAMES = ("background", "red", "blue", "green")
COLOURS = np.array([[40, 40, 40], [230, 30, 30], [30, 30, 230], [30, 220, 30]], dtype=np.uint8)
PAIRS = 16


pytestmark = pytest.mark.usefixtures("one_thread")


def scene(i: int, size: tuple[int, int] = (16, 16)) -> tuple[np.ndarray, np.ndarray]:
    """(H x W x 3 uint8 image, H x W uint8 mask) with two class-coloured rectangles, by ``i``."""
    rng = np.random.default_rng(i)
    h, w = size
    mask = np.zeros((h, w), dtype=np.uint8)
    for label in (1 + i % 3, 1 + (i + 1) % 3):
        y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
        mask[y : y + h // 3 + 1, x : x + w // 3 + 1] = label
    return COLOURS[mask], mask


def make_pairs(root: Path, n: int = PAIRS, size: tuple[int, int] = (16, 16), names: bool = True) -> Path:
    """``root/images/pNN.png`` and ``root/masks/pNN.png`` (plus ``classes.txt`` when ``names``)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        image, mask = scene(i, size)
        Image.fromarray(image).save(root / "images" / f"p{i:02d}.png")
        Image.fromarray(mask).save(root / "masks" / f"p{i:02d}.png")
    if names:
        (root / "classes.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    return root


def build(root: Path, **options: object) -> MaskFolderTask:
    return TASKS.get("mask_folder")(root=str(root), **{"image_size": 16, **options})


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_pairs(tmp_path / "data")


# -- round trip --------------------------------------------------------------------------------------


def test_pairs_round_trip_pixels_and_masks(folder: Path) -> None:
    task = build(folder)
    assert task.target.kind == "mask" and task.target.num_classes == 4
    assert task.target.class_names == CLASS_NAMES and task.primary_metric == "miou"
    seen = []
    for split in SPLITS:
        data = task.dataset(split)
        assert isinstance(data, InMemoryDataset) and len(data) > 0
        for index, image, mask in zip(
            data.tensors["index"], data.tensors["image"], data.tensors["mask"], strict=True
        ):
            expected_image, expected_mask = scene(int(index))
            assert task.files[int(index)] == f"images/p{int(index):02d}.png"
            assert torch.equal(mask, torch.from_numpy(expected_mask).long())
            mean, std = (torch.tensor(v).view(3, 1, 1) for v in task.normalization)
            restored = (image * std + mean) * 255
            assert torch.allclose(
                restored, torch.from_numpy(expected_image).permute(2, 0, 1).float(), atol=1e-3
            )
        seen += data.tensors["index"].tolist()
    assert sorted(seen) == list(range(PAIRS))  # every pair in exactly one split


def test_resizing_keeps_masks_on_their_pixels(tmp_path: Path) -> None:
    task = build(make_pairs(tmp_path / "big", size=(30, 40)), image_size=12)
    data = task.dataset("train")
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in task.normalization)
    rgb = (data.tensors["image"] * std + mean) * 255
    colour = torch.from_numpy(COLOURS).float()
    nearest = ((rgb.permute(0, 2, 3, 1)[..., None, :] - colour) ** 2).sum(-1).argmin(-1)  # closest colour
    assert data.tensors["mask"].shape[1:] == (12, 12)
    assert set(data.tensors["mask"].unique().tolist()) <= {0, 1, 2, 3}
    assert float((nearest == data.tensors["mask"]).float().mean()) > 0.9  # bilinear edges may blur


def test_palette_jpeg_grey_and_one_bit_files(tmp_path: Path) -> None:
    root = make_pairs(tmp_path / "mixed", n=6, names=False)
    image, mask = scene(0)
    palette = Image.fromarray(mask).convert("P")  # a palette PNG: its indices are the classes
    palette.putpalette(COLOURS.flatten().tolist())
    palette.save(root / "masks" / "p00.png")
    Image.fromarray(image).save(root / "images" / "p01.png")
    (root / "images" / "p01.png").rename(root / "images" / "p01.jpg")
    Image.fromarray(image).save(root / "images" / "p01.jpg", quality=95)
    Image.fromarray(scene(2)[1] > 0).save(root / "masks" / "p02.png")  # mode "1": classes 0 and 1
    task = build(root, class_names=list(CLASS_NAMES), val_fraction=0.2, test_fraction=0.2)
    masks = {
        int(i): m
        for s in SPLITS
        for i, m in zip(task.dataset(s).tensors["index"], task.dataset(s).tensors["mask"], strict=True)
    }
    assert torch.equal(masks[0], torch.from_numpy(mask).long())
    assert torch.equal(masks[2], torch.from_numpy(scene(2)[1] > 0).long())
    assert task.files[1] == "images/p01.jpg"


def test_class_subsets_renumber_foreground_classes(folder: Path) -> None:
    full, subset = build(folder), build(folder, classes=[2, 0])  # green -> 1, red -> 2, blue -> 0
    assert full.num_selectable_classes == 3 and subset.target.class_names == ("background", "green", "red")
    lookup = torch.tensor([0, 2, 0, 1])
    for split in SPLITS:
        assert torch.equal(subset.dataset(split).tensors["mask"], lookup[full.dataset(split).tensors["mask"]])
        assert torch.equal(subset.dataset(split).tensors["image"], full.dataset(split).tensors["image"])


def test_premade_splits(tmp_path: Path) -> None:
    root = tmp_path / "premade"
    for split, n in zip(SPLITS, (6, 2, 3), strict=True):
        make_pairs(root / split, n=n, names=False)
    task = build(root, class_names=list(CLASS_NAMES))
    assert [len(task.dataset(s)) for s in SPLITS] == [6, 2, 3]
    assert task.describe()["split"] == "pre-made"
    with pytest.raises(MaskFolderError, match="split_seed cannot apply"):
        build(root, class_names=list(CLASS_NAMES), split_seed=1)
    (root / "val" / "labels").mkdir()
    shutil.rmtree(root / "test" / "masks")
    with pytest.raises(MaskFolderError, match=r"(?s)val/labels: not images/ or masks/.*test/masks: missing"):
        build(root, class_names=list(CLASS_NAMES))


def test_deterministic_and_fingerprinted_by_content(folder: Path, tmp_path: Path) -> None:
    first, second = build(folder), build(folder)
    for split in SPLITS:
        for key in ("image", "mask", "index"):
            assert torch.equal(first.dataset(split).tensors[key], second.dataset(split).tensors[key])
    assert first.fingerprint() == second.fingerprint()
    moved = shutil.copytree(folder, tmp_path / "elsewhere")
    assert build(moved).fingerprint() == first.fingerprint()  # the root's own path is not hashed
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(moved / "masks" / "p03.png")
    assert build(moved).fingerprint() != first.fingerprint()
    assert build(folder, split_seed=1).fingerprint() != first.fingerprint()


def test_contract_checks_pass(folder: Path) -> None:
    report = check_plugin("mask_folder", options={"root": str(folder), "image_size": 16})
    assert report.ok, [(c.name, c.detail) for c in report.failed]


def test_a_spec_with_augmentation_trains_on_mask_folders(folder: Path) -> None:
    from transferlab.engine.assembly import build_model
    from transferlab.engine.fit import FitConfig, fit

    text = (
        f"name: mf\nstudy: single\nbackbone: {{name: convnet, widths: [8, 16]}}\nhead: unet\n"
        f"task: {{name: mask_folder, root: '{folder}', image_size: 16}}\naugment: [HorizontalFlip]\n"
    )
    vspec = validate_spec_text(text)
    assert vspec.primary_metric == "miou" and vspec.num_classes == 3
    task = build(folder, test_fraction=0.25)
    torch.manual_seed(0)
    model = build_model(("convnet", {"widths": [8, 16]}), ("unet", {"decoder_channels": [16]}), task)
    config = FitConfig(epochs=12, batch_size=4, optimizer="adamw", lr=0.01, weight_decay=0.0, device="cpu")
    result = fit(model, task, config, augment=["HorizontalFlip"])
    assert result.test["pixel_accuracy"] > 0.8, result.history  # background alone is about 0.6


# -- errors name the file ----------------------------------------------------------------------------


def corrupt(root: Path) -> None:
    (root / "masks" / "p01.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")


def empty_image(root: Path) -> None:
    (root / "images" / "p02.png").write_bytes(b"")


def rgb_mask(root: Path) -> None:
    Image.fromarray(scene(3)[0]).save(root / "masks" / "p03.png")


def small_mask(root: Path) -> None:
    Image.fromarray(np.zeros((8, 16), dtype=np.uint8)).save(root / "masks" / "p04.png")


def bad_values(root: Path) -> None:
    mask = scene(5)[1]
    mask[0, 0], mask[1, 1] = 4, 255
    Image.fromarray(mask).save(root / "masks" / "p05.png")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda r: (r / "masks" / "p00.png").unlink(), r"images/p00\.png: no mask .*masks/p00\.png"),
        (lambda r: (r / "images" / "p00.png").unlink(), r"masks/p00\.png: no image .*images/p00\.\*"),
        (corrupt, r"masks/p01\.png: not an image file"),
        (lambda r: (r / "masks" / "p01.png").write_bytes(b""), r"masks/p01\.png: empty file \(0 bytes\)"),
        (empty_image, r"images/p02\.png: empty file"),
        (rgb_mask, r"masks/p03\.png: pixel mode 'RGB': a mask must be single-channel"),
        (small_mask, r"masks/p04\.png: 16x8 pixels, its image 16x16"),
        (bad_values, r"masks/p05\.png: pixel values 4, 255 are not classes \(0\.\.3: background, red"),
        (lambda r: (r / "images" / "sub").mkdir(), r"images/sub: a sub-folder"),
        (
            lambda r: (r / "notes.md").write_text("x"),
            r"holds entries besides images/, masks/ and classes\.txt",
        ),
        (lambda r: (r / "masks" / "p06.png").rename(r / "masks" / "p06.jpg"), r"masks/p06\.jpg: not \.png"),
        (
            lambda r: shutil.copy(r / "images" / "p07.png", r / "images" / "p07.jpg"),
            r"images/p07\.png: same name as",
        ),
        (
            lambda r: (r / "classes.txt").write_text("background\n"),
            r"classes\.txt: needs at least 2 distinct",
        ),
        (lambda r: (r / "classes.txt").unlink(), r"no class names: give class_names"),
    ],
)
def test_bad_files_are_errors_naming_them(folder: Path, damage, message: str) -> None:
    damage(folder)
    with pytest.raises(MaskFolderError, match=message) as caught:
        build(folder)
    assert str(caught.value).startswith("mask_folder: ")


def test_option_errors(folder: Path) -> None:
    with pytest.raises(MaskFolderError, match="root is required"):
        TASKS.get("mask_folder")()
    with pytest.raises(MaskFolderError, match="does not exist"):
        build(folder / "nowhere")
    with pytest.raises(MaskFolderError, match="class names are given twice"):
        build(folder, class_names=list(CLASS_NAMES))
    with pytest.raises(ValueError, match=r"mask_folder: classes \[3\] are out of range"):
        build(folder, classes=[0, 3])
    with pytest.raises(MaskFolderError, match="cannot split 2 samples"):
        build(make_pairs(folder.parent / "two", n=2))
