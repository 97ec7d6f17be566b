"""Localisation: the box objective and its metrics, the ``bbox`` head, the shapes box target and
``image_boxes`` user files (CSV and COCO-style JSON).

The head is checked on every kind of 2-D backbone at 32 px (as tests/test_segmentation.py does);
a short run must beat always predicting the training split's mean box; every bad annotation or
image is an error naming its file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from transferlab.engine.assembly import build_backbone, build_head, build_model, build_task
from transferlab.engine.fit import FitConfig, fit
from transferlab.engine.model import TransferModel
from transferlab.registry import HEADS, TASKS
from transferlab.service.spec import validate_spec_text
from transferlab.service.spec_yaml import SpecError
from transferlab.tasks.base import SPLITS, Task
from transferlab.tasks.localization import BoxIoU, BoxObjective, box_iou_of, mean_box_baseline

SIZE = 32
BACKBONES = ["convnet", "lenet5", "resnet18", "resnet20", "vgg11"]
SMALL = {"train_size": 48, "val_size": 16, "test_size": 16}


pytestmark = pytest.mark.usefixtures("one_thread")


def shapes(classes: list[int] | None = None, **options: object) -> Task:
    return build_task("shapes", {**SMALL, "target": "box", **options}, classes=classes)


@pytest.fixture(scope="module")
def box_task() -> Task:
    return shapes()


def scores(objective: BoxObjective, outputs: dict, batch: dict) -> dict[str, float]:
    metrics = objective.metrics()
    objective.update_metrics(metrics, outputs, batch)
    return {name: float(m.compute()) for name, m in metrics.items()}


# -- objective and metrics --------------------------------------------------------------------------


def test_perfect_prediction_scores_one_and_costs_nothing() -> None:
    objective = BoxObjective(num_classes=3)
    boxes = torch.tensor([[0.5, 0.5, 0.4, 0.2], [0.2, 0.7, 0.1, 0.3], [0.8, 0.3, 0.3, 0.3]])
    labels = torch.tensor([2, 0, 1])
    logits = torch.nn.functional.one_hot(labels, 3).float() * 20
    batch = {"box": boxes, "label": labels}
    assert scores(objective, {"box": boxes}, batch) == {"iou": pytest.approx(1.0), "acc50": 1.0}
    with_class = scores(objective, {"box": boxes, "logits": logits}, batch)
    assert with_class == {"iou": pytest.approx(1.0), "acc50": 1.0, "accuracy": 1.0}
    assert float(objective.loss({"box": boxes, "logits": logits}, batch)) < 1e-5
    assert objective.primary_metric == "iou" and objective.higher_is_better


def test_iou_matches_hand_calculations() -> None:
    objective = BoxObjective(num_classes=2)
    target = torch.tensor([[0.625, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5], [0.8, 0.5, 0.4, 0.2]])
    predicted = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.25, 0.25, 0.5, 0.5], [0.9, 0.5, 0.4, 0.2]])
    # 1: x 0.25..0.75 vs 0.375..0.875, same y: inter 0.375 x 0.5, union 0.25 + 0.25 - 0.1875 -> 0.6.
    # 2: [0, 0.5]^2 vs [0.25, 0.75]^2: inter 0.0625, union 0.4375 -> 1/7.
    # 3: the prediction x 0.7..1.1 is clipped to 0.7..1.0; the target is x 0.6..1.0: 0.3 / 0.4 = 0.75.
    expected = torch.tensor([0.6, 1 / 7, 0.75])
    torch.testing.assert_close(box_iou_of(predicted, target), expected)
    result = scores(objective, {"box": predicted}, {"box": target, "label": torch.zeros(3).long()})
    assert result == {"iou": pytest.approx(float(expected.mean())), "acc50": pytest.approx(2 / 3)}
    assert "accuracy" not in result  # no class output, no accuracy


def test_metrics_accumulate_over_batches_exactly() -> None:
    generator = torch.Generator().manual_seed(0)
    predicted, target = (
        torch.rand(10, 4, generator=generator) * 0.5 + 0.25,
        torch.rand(10, 4, generator=generator) * 0.5 + 0.25,
    )
    whole, parts = BoxIoU(), BoxIoU()
    whole.update(predicted, target)
    for chunk in (slice(0, 3), slice(3, 10)):
        parts.update(predicted[chunk], target[chunk])
    assert float(parts.compute()) == pytest.approx(float(whole.compute()))
    assert float(whole.compute()) == pytest.approx(float(box_iou_of(predicted, target).mean()))


def test_giou_loss_pulls_disjoint_boxes_together() -> None:
    objective = BoxObjective(num_classes=2)
    predicted = torch.tensor([[0.2, 0.2, 0.1, 0.1]], requires_grad=True)
    target = torch.tensor([[0.8, 0.8, 0.1, 0.1]])
    loss = objective.loss({"box": predicted}, {"box": target})
    # Disjoint boxes have a GIoU below 0, so the GIoU loss alone exceeds 1.
    assert torch.isfinite(loss) and float(loss.detach()) > objective.giou_weight
    loss.backward()
    assert predicted.grad is not None and torch.isfinite(predicted.grad).all()
    assert float(predicted.grad[0, 0]) < 0 and float(predicted.grad[0, 1]) < 0  # move towards the target
    assert scores(objective, {"box": predicted.detach()}, {"box": target}) == {"iou": 0.0, "acc50": 0.0}


def test_objective_rejects_a_wrong_shape() -> None:
    with pytest.raises(
        ValueError, match=r"box of shape \(2, 2\) does not fit target boxes of shape \(2, 4\)"
    ):
        BoxObjective(num_classes=2).loss({"box": torch.zeros(2, 2)}, {"box": torch.zeros(2, 4)})


def test_mean_box_baseline_by_hand() -> None:
    train = torch.tensor([[0.4, 0.5, 0.4, 0.4], [0.6, 0.5, 0.4, 0.4]])  # mean: centre, 0.4 x 0.4
    test = torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.5, 0.5, 0.2, 0.2]])
    assert mean_box_baseline(train, test) == {"iou": pytest.approx((1 + 0.25) / 2), "acc50": 0.5}


# -- the bbox head over backbones -------------------------------------------------------------------


@pytest.fixture(scope="module", params=BACKBONES)
def backbone_name(request: pytest.FixtureRequest) -> str:
    return request.param


def test_head_output_shape_range_and_gradients(backbone_name: str, box_task: Task) -> None:
    torch.manual_seed(0)
    backbone = build_backbone(backbone_name, {}, box_task.target)
    model = TransferModel(backbone, build_head("bbox", {}, backbone.feature_info, box_task.target))
    model.train()
    batch = box_task.dataset("train").batch(torch.arange(4))
    outputs = model(batch)
    assert outputs["box"].shape == (4, 4) and outputs["logits"].shape == (4, 6)
    box = outputs["box"].detach()
    assert float(box.min()) > 0.0 and float(box.max()) < 1.0
    loss = box_task.loss(outputs, batch)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.head.parameters()]
    assert grads and all(g is not None and float(g.abs().sum()) > 0 for g in grads)
    model.eval()  # the spec check's call: no batch fields
    for grid in (1, 4):
        head = build_head("bbox", {"grid": grid, "classify": False}, backbone.feature_info, box_task.target)
        with torch.no_grad():
            alone = head.eval()(model.forward_features(batch["image"][:1]), {})
        assert set(alone) == {"box"} and alone["box"].shape == (1, 4)


def test_head_options_are_checked(box_task: Task) -> None:
    info = build_backbone("convnet", {"widths": [8, 16]}, box_task.target).feature_info
    for options, message in (
        ({"grid": 0}, r"grid must be in 1..8, got 0"),
        ({"grid": 9}, r"grid must be in 1..8, got 9"),
        ({"grid": 2.0}, r"grid must be an integer in 1..8, got 2.0"),
        ({"hidden": -1}, r"hidden must be >= 0, got -1"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
        ({"classify": "yes"}, r"classify must be true or false, got 'yes'"),
    ):
        with pytest.raises(ValueError, match=rf"head 'bbox': {message}"):
            build_head("bbox", options, info, box_task.target)
    label = shapes(target="label").target
    with pytest.raises(ValueError, match="head 'bbox' predicts box targets, but the task provides 'label'"):
        build_head("bbox", {}, info, label)
    assert HEADS.entry("bbox").source == "transferlab" and TASKS.entry("image_boxes").source == "transferlab"


def test_spec_with_bbox_on_a_label_target_is_rejected() -> None:
    spec = """
name: wrong-target
study: single
backbone: {name: convnet, widths: [8, 16]}
head: bbox
task: {name: shapes, train_size: 16, val_size: 8, test_size: 8}
"""
    with pytest.raises(SpecError, match="head 'bbox' predicts box targets, but the task provides 'label'"):
        validate_spec_text(spec)
    validated = validate_spec_text(spec.replace("test_size: 8}", "test_size: 8, target: box}"))
    assert validated.primary_metric == "iou" and validated.higher_is_better


# -- the shapes box target --------------------------------------------------------------------------


def test_box_target_is_the_largest_shape(box_task: Task) -> None:
    target = box_task.target
    assert target.kind == "box" and target.num_classes == 6 and box_task.primary_metric == "iou"
    assert set(box_task.metrics()) == {"iou", "acc50"}
    labelled = shapes(target="label")
    for split in SPLITS:
        t, same = box_task.dataset(split).tensors, labelled.dataset(split).tensors
        assert torch.equal(t["image"], same["image"]) and torch.equal(t["box"], same["box"])
        assert t["box"].dtype == torch.float32 and t["box"].shape == (len(t["image"]), 4)
        for box, mask, label, count in zip(t["box"], t["mask"], t["label"], t["count"], strict=True):
            x0, y0, x1, y1 = (
                round(float(v) * SIZE)
                for v in (box[0] - box[2] / 2, box[1] - box[3] / 2, box[0] + box[2] / 2, box[1] + box[3] / 2)
            )
            kind = mask[y0:y1, x0:x1] == label + 1
            # The box is tight around pixels of the largest shape's kind: every edge touches one.
            assert bool(kind[0].any() and kind[-1].any() and kind[:, 0].any() and kind[:, -1].any())
            if int(count) == 1:  # one shape: the box of every non-background pixel
                rows, cols = torch.nonzero(mask.any(1)).flatten(), torch.nonzero(mask.any(0)).flatten()
                assert (x0, y0, x1, y1) == (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)


def test_box_target_is_deterministic(box_task: Task) -> None:
    again = shapes()
    assert again.fingerprint() == box_task.fingerprint() != shapes(target="label").fingerprint()
    for split in SPLITS:
        assert torch.equal(again.dataset(split).tensors["box"], box_task.dataset(split).tensors["box"])
    other = shapes(seed=1).dataset("train").tensors["box"]
    assert not torch.equal(other, box_task.dataset("train").tensors["box"])
    prefix = shapes(train_size=20).dataset("train").tensors["box"]
    assert torch.equal(prefix, box_task.dataset("train").tensors["box"][:20])
    subset = shapes(classes=[4, 1])
    keep = torch.isin(box_task.dataset("test").tensors["label"], torch.tensor([4, 1]))
    assert torch.equal(subset.dataset("test").tensors["box"], box_task.dataset("test").tensors["box"][keep])
    assert subset.target.class_names == ("cross", "square")


# -- training ---------------------------------------------------------------------------------------


def test_short_training_beats_the_mean_box() -> None:
    task = build_task(
        "shapes", {"target": "box", "train_size": 512, "val_size": 128, "test_size": 16, "seed": 3}
    )
    torch.manual_seed(0)
    model = build_model(("convnet", {"widths": [8, 16, 32, 32]}), ("bbox", {"hidden": 64}), task)
    config = FitConfig(epochs=3, batch_size=16, optimizer="adamw", lr=0.003, weight_decay=0.0, device="cpu")
    result = fit(model, task, config)
    train, val = (task.dataset(s).tensors["box"] for s in ("train", "val"))
    baseline = mean_box_baseline(train, val)
    assert 0.2 < baseline["iou"] < 0.6  # the mean box overlaps most boxes a little
    last = result.history[-1]
    assert last["val/iou"] > baseline["iou"] + 0.1, (result.history, baseline)
    assert last["val/acc50"] > baseline["acc50"] and "val/accuracy" in last


# -- image_boxes: user files ------------------------------------------------------------------------

LABELS = ("cat", "dog")


def make_images(folder: Path, n: int = 12) -> list[dict]:
    """``n`` PNGs of varied sizes, each a black canvas with one bright rectangle; their records."""
    from PIL import Image

    (folder / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        width, height = 40 + 8 * (i % 3), 30 + 6 * (i % 2)
        w, h = int(rng.integers(8, 16)), int(rng.integers(6, 12))
        x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        pixels = np.zeros((height, width, 3), np.uint8)
        pixels[y : y + h, x : x + w, i % 2] = 255
        Image.fromarray(pixels).save(folder / "img" / f"{i}.png")
        records.append(
            {
                "file": f"img/{i}.png",
                "box": (x, y, x + w, y + h),
                "size": (width, height),
                "label": LABELS[i % 2],
            }
        )
    return records


def write_csv(path: Path, records: list[dict], *, labels: bool = True) -> Path:
    lines = ["file,x_min,y_min,x_max,y_max" + (",label" if labels else "")]
    lines += [",".join([r["file"], *map(str, r["box"]), *([r["label"]] if labels else [])]) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


def coco(records: list[dict]) -> dict:
    return {
        "images": [
            {"id": i, "file_name": r["file"], "width": r["size"][0], "height": r["size"][1]}
            for i, r in enumerate(records)
        ],
        "annotations": [
            {
                "id": 100 + i,
                "image_id": i,
                "category_id": 7 + LABELS.index(r["label"]),
                "bbox": [r["box"][0], r["box"][1], r["box"][2] - r["box"][0], r["box"][3] - r["box"][1]],
            }
            for i, r in enumerate(records)
        ],
        "categories": [{"id": 8, "name": "dog"}, {"id": 7, "name": "cat"}, {"id": 9, "name": "unused"}],
    }


def expected_boxes(records: list[dict]) -> torch.Tensor:
    return torch.tensor(
        [
            [
                (r["box"][0] + r["box"][2]) / 2 / r["size"][0],
                (r["box"][1] + r["box"][3]) / 2 / r["size"][1],
                (r["box"][2] - r["box"][0]) / r["size"][0],
                (r["box"][3] - r["box"][1]) / r["size"][1],
            ]
            for r in records
        ]
    )


@pytest.mark.parametrize("kind", ["csv", "json"])
def test_user_boxes_round_trip(tmp_path: Path, kind: str) -> None:
    records = make_images(tmp_path)
    path = tmp_path / f"boxes.{kind}"
    write_csv(path, records) if kind == "csv" else path.write_text(json.dumps(coco(records)))
    task = build_task("image_boxes", {"path": str(path), "image_size": 32})
    assert task.target.kind == "box" and task.target.class_names == ("cat", "dog")  # sorted / by id
    assert task.primary_metric == "iou" and task.files == tuple(r["file"] for r in records)
    seen = []
    for split in SPLITS:
        t = task.dataset(split).tensors
        index = t["index"]
        seen += index.tolist()
        torch.testing.assert_close(t["box"], expected_boxes([records[i] for i in index]))
        assert t["label"].tolist() == [LABELS.index(records[i]["label"]) for i in index]
        # Resized without a crop: the bright channel fills the box's centre in the 32 px image.
        for image, box, label in zip(t["image"], t["box"], t["label"], strict=True):
            cx, cy = int(box[0] * 32), int(box[1] * 32)
            assert float(image[label, cy, cx]) > float(image[1 - label, cy, cx])
    assert sorted(seen) == list(range(len(records)))
    assert (
        build_task("image_boxes", {"path": str(path), "image_size": 32}).fingerprint() == task.fingerprint()
    )


def test_user_boxes_without_labels_and_with_several_boxes(tmp_path: Path) -> None:
    records = make_images(tmp_path)
    path = write_csv(tmp_path / "boxes.csv", records, labels=False)
    task = build_task("image_boxes", {"path": str(path), "split_seed": 1})
    assert task.target.num_classes == 1 and task.target.class_names == ("object",)
    info = build_backbone("convnet", {"widths": [8, 16]}, task.target).feature_info
    head = build_head("bbox", {}, info, task.target)  # one class: nothing to classify
    assert set(head([torch.zeros(2, 16, 16, 16)], {})) == {"box"}
    small = dict(records[0], box=(0, 0, 4, 4))
    write_csv(path, [*records, small], labels=False)  # a second, smaller box for image 0
    with pytest.raises(ValueError, match=rf"{path}: 1 image\(s\) have several boxes.*several_boxes: largest"):
        build_task("image_boxes", {"path": str(path)})
    largest = build_task("image_boxes", {"path": str(path), "several_boxes": "largest", "split_seed": 1})
    assert largest.files == task.files and largest.fingerprint() != task.fingerprint()
    for split in SPLITS:
        assert torch.equal(largest.dataset(split).tensors["box"], task.dataset(split).tensors["box"])


def _corrupt(folder: Path, records: list[dict]) -> None:
    (folder / records[3]["file"]).write_bytes(b"\x89PNG\r\n\x1a\n not really")


CSV_ERRORS = {
    "missing image": (
        lambda r, f: r[2].update(file="img/nope.png"),
        r"img/nope.png \(.*boxes.csv:4\): cannot be read",
    ),
    "corrupt image": (lambda r, f: _corrupt(f, r), r"img/3.png \(.*boxes.csv:5\): (not an image|corrupt)"),
    "empty image": (
        lambda r, f: (f / r[1]["file"]).write_bytes(b""),
        r"img/1.png \(.*boxes.csv:3\): empty file",
    ),
    "outside": (
        lambda r, f: r[0].update(box=(30, 2, 60, 9)),
        r"img/0.png \(.*boxes.csv:2\): box \(x 30..60, y 2..9\) reaches outside the 40 x 30",
    ),
    "empty box": (lambda r, f: r[4].update(box=(5, 5, 5, 9)), r"boxes.csv:6: empty or negative box \(x 5..5"),
    "negative box": (lambda r, f: r[4].update(box=(9, 5, 2, 9)), r"boxes.csv:6: empty or negative box"),
    "negative start": (lambda r, f: r[5].update(box=(-1, 5, 2, 9)), r"boxes.csv:7: box .* starts outside"),
    "not a number": (
        lambda r, f: r[5].update(box=("a", 5, 2, 9)),
        r"boxes.csv:7: box .* is not 4 finite numbers",
    ),
    "empty label": (lambda r, f: r[6].update(label=""), r"boxes.csv:8: empty label"),
}


@pytest.mark.parametrize("case", list(CSV_ERRORS))
def test_every_bad_csv_row_or_image_is_named(tmp_path: Path, case: str) -> None:
    records = make_images(tmp_path)
    change, message = CSV_ERRORS[case]
    change(records, tmp_path)
    path = write_csv(tmp_path / "boxes.csv", records)
    with pytest.raises(ValueError, match=rf"(?s)^image_boxes: .*{message}") as caught:
        build_task("image_boxes", {"path": str(path)})
    assert str(tmp_path) in str(caught.value)


def test_malformed_csv_files_are_named(tmp_path: Path) -> None:
    records = make_images(tmp_path)
    path = tmp_path / "boxes.csv"
    for text, message in (
        ("", r"annotation file '.*boxes.csv' is empty"),
        (
            "file,x_min,y_min,x_max\nimg/0.png,1,2,3\n",
            r"boxes.csv:1: column 'y_max' is missing from the header",
        ),
        ("file,x_min,y_min,x_max,y_max\n", r"'.*boxes.csv' has a header but no rows"),
        ("file,x_min,y_min,x_max,y_max\nimg/0.png,1,2,3\n", r"boxes.csv:2: 4 fields, but the header has 5"),
        ('file,x_min,y_min,x_max,y_max\n"img/0.png,1,2,3,4\n', r"boxes.csv:\d+: malformed CSV"),
    ):
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            build_task("image_boxes", {"path": str(path)})
    path.write_bytes("file,x_min,y_min,x_max,y_max\nimg/\xe9.png,1,2,3,4\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"boxes.csv:2: not UTF-8 text"):
        build_task("image_boxes", {"path": str(path)})
    for bad, message in (
        ({"path": str(tmp_path / "boxes.txt")}, r"'.*boxes.txt' must end in .csv or .json"),
        ({"path": str(tmp_path / "none.csv")}, r"cannot read annotation file '.*none.csv'"),
        ({}, r"path is required"),
        (
            {"path": str(write_csv(path, records)), "root": str(tmp_path / "nowhere")},
            r"root '.*nowhere' is not a folder",
        ),
        ({"path": str(path), "several_boxes": "all"}, r"several_boxes must be one of \['error', 'largest'\]"),
    ):
        with pytest.raises(ValueError, match=rf"(?s)^image_boxes: .*{message}"):
            build_task("image_boxes", bad)


def _edit(doc: dict, what: str) -> None:
    if what == "unknown category":
        doc["annotations"][2]["category_id"] = 42
    elif what == "unknown image":
        doc["annotations"][3]["image_id"] = 99
    elif what == "bad bbox":
        doc["annotations"][4]["bbox"] = [1, 2, 3]
    elif what == "zero width":
        doc["annotations"][4]["bbox"][2] = 0
    elif what == "no box":
        doc["annotations"].pop(5)
    elif what == "size":
        doc["images"][0]["width"] = 41
    elif what == "outside":
        doc["annotations"][0]["bbox"] = [30, 2, 30, 7]
    elif what == "duplicate id":
        doc["images"][1]["id"] = 0
    elif what == "missing field":
        del doc["annotations"][1]["bbox"]


JSON_ERRORS = {
    "unknown category": r"annotation id 102: unknown category_id 42",
    "unknown image": r"annotation id 103: unknown image_id 99",
    "bad bbox": r"annotation id 104: bbox \[x, y, width, height\]: box \[1, 2, 3\] is not 4 finite numbers",
    "zero width": r"annotation id 104: empty or negative box",
    "no box": r"image id 5 \('img/5.png'\) has no box",
    "size": r"img/0.png \(.*annotation id 100\): the annotation file gives 41 x 30 px, the image is 40 x 30",
    "outside": r"img/0.png \(.*annotation id 100\): box \(x 30..60, y 2..9\) reaches outside",
    "duplicate id": r"image id 0 appears twice",
    "missing field": r"annotations\[1\] lacks bbox",
}


@pytest.mark.parametrize("case", list(JSON_ERRORS))
def test_every_bad_coco_annotation_is_named(tmp_path: Path, case: str) -> None:
    doc = coco(make_images(tmp_path))
    _edit(doc, case)
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=rf"(?s)^image_boxes: .*{JSON_ERRORS[case]}") as caught:
        build_task("image_boxes", {"path": str(path)})
    assert str(path) in str(caught.value)


def test_invalid_json_is_named(tmp_path: Path) -> None:
    path = tmp_path / "boxes.json"
    for text, message in (
        ('{"images": [}', r"boxes.json:1: invalid JSON"),
        ("[]", r"boxes.json: expected a JSON object"),
        ('{"images": {}}', r"boxes.json: 'images' must be a list of objects, got dict"),
    ):
        path.write_text(text)
        with pytest.raises(ValueError, match=rf"(?s)^image_boxes: .*{message}"):
            build_task("image_boxes", {"path": str(path)})


def test_user_boxes_spec_validates(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "boxes.csv", make_images(tmp_path))
    text = (
        "name: user-boxes\nstudy: single\nbackbone: {name: convnet, widths: [4, 8]}\n"
        f"head: {{name: bbox, grid: 1}}\ntask: {{name: image_boxes, path: '{path}', image_size: 16}}\n"
    )
    validated = validate_spec_text(text)
    assert validated.primary_metric == "iou" and validated.num_classes == 2
