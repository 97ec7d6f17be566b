"""Augmentation: image, mask and box move together; evaluation data is never augmented; seeded draws.

Samples come from the shapes task, whose every sample carries an image, a mask and a box; pixels
are compared un-normalised ([0, 1]), as the pipeline sees them.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

from transferlab.engine.assembly import build_model, build_task
from transferlab.engine.augment import (
    AugmentedDataset,
    augmented_train_set,
    build_augmentation,
    check_augmentation,
    pixel_normalization,
    transform_classes,
)
from transferlab.engine.fit import FitConfig, fit
from transferlab.service.planner import plan_trials
from transferlab.service.spec import validate_spec_text
from transferlab.service.spec_yaml import SpecError
from transferlab.tasks.base import Task

SMALL = {"target": "mask", "train_size": 64, "val_size": 16, "test_size": 16, "seed": 1}
FLIP = [{"name": "HorizontalFlip", "p": 1.0}]
SPEC = (
    "name: aug\nstudy: single\nbackbone: {name: convnet, widths: [4, 8]}\nhead: unet\n"
    "task: {name: shapes, target: mask, image_size: 16, train_size: 16, val_size: 8, test_size: 8}\n"
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def task() -> Task:
    return build_task("shapes", SMALL)


def pixels(task: Task, images: torch.Tensor) -> torch.Tensor:
    """Normalised N x C x H x W images back in [0, 1]."""
    mean, std = (torch.from_numpy(v).view(1, -1, 1, 1) for v in pixel_normalization(task))
    return images * std + mean


def augmented(task: Task, entries: list[Any], indices: torch.Tensor, seed: int = 0, epoch: int = 1) -> dict:
    train = augmented_train_set(task, entries, seed=seed)
    train.set_epoch(epoch)
    return train.batch(indices)


# -- image, mask and box together --------------------------------------------------------------------


def test_horizontal_flip_moves_image_mask_and_box_together(task: Task) -> None:
    everything = torch.arange(len(task.dataset("train")))
    before, after = task.dataset("train").batch(everything), augmented(task, FLIP, everything)
    flipped = pixels(task, before["image"]).flip(-1)
    assert torch.allclose(pixels(task, after["image"]), flipped, atol=1e-6)
    assert torch.equal(after["mask"], before["mask"].flip(-1)) and after["mask"].dtype == torch.int64
    cx, rest = after["box"][:, 0], after["box"][:, 1:]
    assert torch.allclose(cx, 1.0 - before["box"][:, 0], atol=1e-6)
    assert torch.allclose(rest, before["box"][:, 1:], atol=1e-6)
    for key in ("label", "count", "index"):  # fields that do not move pass unchanged
        assert torch.equal(after[key], before[key])
    assert after["caption"] == before["caption"]
    assert torch.equal(task.dataset("train").tensors["image"], before["image"])  # held data untouched


@pytest.mark.parametrize(("interpolation", "agreement"), [(0, 0.999), (1, 0.98)])
def test_rotation_shift_and_scale_keep_the_mask_on_the_shapes(
    task: Task, interpolation: int, agreement: float
) -> None:
    # Shapes are drawn on black in colours with a channel at 1: foreground <=> brightest channel > 0.5.
    affine = {"name": "Affine", "rotate": [-40, 40], "translate_percent": 0.15, "scale": [0.8, 1.2]}
    entries = [{**affine, "p": 1.0, "interpolation": interpolation}]
    everything = torch.arange(len(task.dataset("train")))
    before, after = task.dataset("train").batch(everything), augmented(task, entries, everything)
    foreground = pixels(task, after["image"]).amax(1) > 0.5
    assert float((foreground == (after["mask"] > 0)).float().mean()) >= agreement
    # Control: the same images against the masks they had before are far apart.
    assert float((foreground == (before["mask"] > 0)).float().mean()) < 0.95


def test_a_rotated_box_still_holds_its_shape() -> None:
    single = build_task("shapes", {**SMALL, "min_shapes": 1, "max_shapes": 1})
    entries = [{"name": "Affine", "rotate": [-45, 45], "translate_percent": 0.1, "p": 1.0}]
    batch = augmented(single, entries, torch.arange(32))
    size = batch["mask"].shape[-1]
    for mask, (cx, cy, w, h) in zip(batch["mask"], batch["box"].tolist(), strict=True):
        rows, cols = torch.nonzero(mask > 0, as_tuple=True)
        if len(rows) == 0:  # the shape was moved out, its box clipped to the border
            continue
        assert (cx - w / 2) * size <= int(cols.min()) + 1 and int(cols.max()) <= (cx + w / 2) * size + 1
        assert (cy - h / 2) * size <= int(rows.min()) + 1 and int(rows.max()) <= (cy + h / 2) * size + 1


def test_pixel_transforms_leave_mask_and_box_alone(task: Task) -> None:
    entries = [{"name": "ColorJitter", "brightness": 0.4, "p": 1.0}, {"name": "GaussNoise", "p": 1.0}]
    before = task.dataset("train").batch(torch.arange(8))
    after = augmented(task, entries, torch.arange(8))
    assert not torch.allclose(after["image"], before["image"])
    assert torch.equal(after["mask"], before["mask"]) and torch.equal(after["box"], before["box"])


OUT_OF_THE_IMAGE = [{"name": "Affine", "translate_percent": 0.95, "p": 1.0}]  # every shape leaves


def test_a_box_target_pushed_out_of_the_image_keeps_its_sample_unaugmented() -> None:
    boxes = build_task("shapes", {**SMALL, "target": "box"})
    train = augmented_train_set(boxes, OUT_OF_THE_IMAGE, seed=0)
    before = boxes.dataset("train").batch(torch.arange(8))
    with pytest.warns(UserWarning, match="moved a box entirely out of the image"):
        after = train.batch(torch.arange(8))
    assert train.unaugmented == 8
    for key in ("image", "mask", "box"):
        assert torch.equal(after[key], before[key])


def test_a_carried_box_pushed_out_does_not_withdraw_the_augmentation(task: Task) -> None:
    # A mask task: the box only travels along, so strong shifts still apply (the image and the mask
    # move out of view) and the box that left the image becomes an empty one.
    train = augmented_train_set(task, OUT_OF_THE_IMAGE, seed=0)
    before = task.dataset("train").batch(torch.arange(8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        after = train.batch(torch.arange(8))
    assert not [w for w in caught if "out of the image" in str(w.message)]
    assert train.unaugmented == 0
    assert not torch.equal(after["image"], before["image"])
    assert float((after["mask"] > 0).float().mean()) < float((before["mask"] > 0).float().mean()) / 2
    assert torch.equal(after["box"], torch.zeros(8, 4))  # every box left (as the box-target test shows)


def test_a_caption_target_refuses_spatial_transforms(task: Task) -> None:
    captions = build_task("shapes", {**SMALL, "target": "caption"})
    entries = ["ColorJitter", {"name": "HorizontalFlip", "p": 1.0}, {"name": "GaussNoise"}, "Affine"]
    problems = check_augmentation(entries, captions)
    assert [field for field, _ in problems] == ["augment[1].name", "augment[3].name"]
    assert problems[0][1].startswith("'HorizontalFlip' is a spatial transform")
    assert "changes what a caption says" in problems[0][1] and "pixel-level" in problems[0][1]
    assert check_augmentation(["ColorJitter", "GaussNoise", "Blur"], captions) == []  # pixel-level
    assert check_augmentation(entries, task) == []  # a mask target takes them all
    with pytest.raises(ValueError, match=r"augment\[0\]\.name: 'VerticalFlip' is a spatial transform"):
        augmented_train_set(captions, ["VerticalFlip"], seed=0)  # fit's path refuses them too
    spec = SPEC.replace("head: unet", "head: {name: caption, hidden: 8}").replace(
        "target: mask", "target: caption"
    )
    with pytest.raises(SpecError, match=r"augment\[0\]\.name: 'HorizontalFlip' is a spatial transform"):
        validate_spec_text(spec + "augment: [HorizontalFlip, ColorJitter]\n")
    assert validate_spec_text(spec + "augment: [ColorJitter]\n").primary_metric == "bleu4"


def test_one_channel_images_are_augmented_too() -> None:
    digits = build_task("digits", {"image_size": 16})
    before = digits.dataset("train").batch(torch.arange(4))
    after = augmented(digits, FLIP, torch.arange(4))
    assert torch.allclose(pixels(digits, after["image"]), pixels(digits, before["image"]).flip(-1), atol=1e-6)
    assert torch.equal(after["label"], before["label"])


# -- reproducibility ---------------------------------------------------------------------------------

AFFINE = [{"name": "Affine", "rotate": [-30, 30], "translate_percent": 0.1, "p": 1.0}, "HorizontalFlip"]


def test_draws_are_seeded_by_seed_epoch_and_sample(task: Task) -> None:
    first = augmented(task, AFFINE, torch.arange(8), seed=3, epoch=2)
    again = augmented(task, AFFINE, torch.arange(8), seed=3, epoch=2)
    assert all(torch.equal(first[k], again[k]) for k in ("image", "mask", "box"))
    assert not torch.equal(first["image"], augmented(task, AFFINE, torch.arange(8), seed=3, epoch=3)["image"])
    assert not torch.equal(first["image"], augmented(task, AFFINE, torch.arange(8), seed=4, epoch=2)["image"])
    # A sample's draw does not depend on the batch it lands in.
    alone = augmented(task, AFFINE, torch.tensor([5, 2]), seed=3, epoch=2)
    assert torch.equal(alone["image"][0], first["image"][5]) and torch.equal(
        alone["mask"][1], first["mask"][2]
    )
    single = augmented_train_set(task, AFFINE, seed=3)
    single.set_epoch(2)
    assert torch.equal(single[5]["image"], first["image"][5])


# -- training: evaluation data never augmented -------------------------------------------------------


def recorded_fit(task: Task, augment: list[Any] | None, epochs: int = 1) -> tuple[list, list, Any]:
    """(train batches, eval batches, fit result) of a short run; batches as seen by the model."""
    torch.manual_seed(0)
    model = build_model(("convnet", {"widths": [8, 16]}), ("unet", {"decoder_channels": [8]}), task)
    seen: dict[bool, list[torch.Tensor]] = {True: [], False: []}
    model.register_forward_pre_hook(lambda m, args: seen[m.training].append(args[0]["image"].clone()))
    config = FitConfig(epochs=epochs, batch_size=16, optimizer="adamw", lr=0.003, device="cpu", seed=0)
    result = fit(model, task, config, augment=augment)
    return seen[True], seen[False], result


def test_evaluation_data_is_never_augmented(task: Task) -> None:
    plain_train, plain_eval, _ = recorded_fit(task, None)
    aug_train, aug_eval, _ = recorded_fit(task, AFFINE)
    assert len(plain_eval) == len(aug_eval) > 0
    assert all(torch.equal(a, b) for a, b in zip(plain_eval, aug_eval, strict=True))  # val and test
    assert len(plain_train) == len(aug_train)
    assert not any(torch.equal(a, b) for a, b in zip(plain_train, aug_train, strict=True))


def test_a_short_fit_with_augmentation_learns_the_masks() -> None:
    data = build_task(
        "shapes", {"target": "mask", "train_size": 384, "val_size": 64, "test_size": 16, "seed": 3}
    )
    _, _, result = recorded_fit(
        data, [{"name": "HorizontalFlip"}, {"name": "Affine", "rotate": [-15, 15]}], 2
    )
    val = data.dataset("val").tensors["mask"]
    all_background = float((val == 0).float().mean()) / 7  # mIoU of predicting background everywhere
    assert result.history[-1]["val/miou"] > all_background + 0.04, (result.history, all_background)


def test_trial_runs_pass_the_spec_augmentation(monkeypatch: pytest.MonkeyPatch) -> None:
    from transferlab.engine import trial

    vspec = validate_spec_text(SPEC + "augment: [HorizontalFlip, {name: Affine, rotate: [-10, 10]}]\n")
    config = plan_trials(vspec)[0].config(vspec)
    assert config["augment"] == [{"name": "HorizontalFlip"}, {"name": "Affine", "rotate": [-10, 10]}]
    none = validate_spec_text(SPEC)
    assert plan_trials(none)[0].config(none)["augment"] == []
    given: dict[str, Any] = {}

    class FitCalled(Exception):
        pass

    def fake_fit(*args: Any, **kwargs: Any) -> None:
        given.update(kwargs)
        raise FitCalled

    monkeypatch.setattr(trial, "fit", fake_fit)
    with pytest.raises(FitCalled):
        trial.run_trial(config)
    assert given["augment"] == config["augment"]


# -- the spec ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("augment", "message"),
    [
        (
            "[HorizntalFlip]",
            r"augment\[0\]\.name: 'HorizntalFlip' is not an albumentations transform; "
            r"did you mean 'HorizontalFlip'\?",
        ),
        (
            "[VerticalFlip, {name: Affine, rotate: sideways}]",
            r"augment\[1\]\.rotate: Affine: Input should be",
        ),
        (
            "[{name: HorizontalFlip, p: 2}]",
            r"augment\[0\]\.p: HorizontalFlip: Input should be less than or equal to 1",
        ),
        (
            "[{name: Affine, rotation: 10}]",
            r"augment\[0\]\.rotation: Affine has no parameter 'rotation'; did you mean 'rotate'\?",
        ),
        ("[Normalize]", r"augment\[0\]\.name: 'Normalize' cannot be used here: transferlab normalises"),
        ("[{name: RandomCrop, height: 8, width: 8}]", r"augment: the pipeline turned a 16x16 image into 8x8"),
        ("[{p: 0.5}]", r"augment\.0\.name: Field required"),
    ],
)
def test_spec_errors_name_the_field(augment: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        validate_spec_text(SPEC + f"augment: {augment}\n")


def test_augmentation_needs_image_inputs() -> None:
    text = SPEC.replace("head: unet", "head: conv1d").replace(
        "{name: shapes, target: mask, image_size: 16, train_size: 16, val_size: 8, test_size: 8}",
        "{name: text_topics, train_size: 40, val_size: 16, test_size: 16}",
    )
    text = text.replace("name: convnet, widths: [4, 8]", "name: textcnn")
    with pytest.raises(SpecError, match=r"augment: task 'text_topics' reads 'tokens', not images"):
        validate_spec_text(text + "augment: [HorizontalFlip]\n")


def test_build_augmentation() -> None:
    assert build_augmentation([]) is None and build_augmentation(None) is None
    pipeline = build_augmentation(["HorizontalFlip", {"name": "RandomBrightnessContrast", "p": 0.2}])
    assert [type(t).__name__ for t in pipeline.transforms] == ["HorizontalFlip", "RandomBrightnessContrast"]
    with pytest.raises(ValueError, match=r"augment\[0\]\.name: .*; augment\[1\]\.q: "):
        build_augmentation(["Flipp", {"name": "HorizontalFlip", "q": 1}])
    names = transform_classes()
    assert {"HorizontalFlip", "Affine", "ColorJitter", "ElasticTransform"} <= set(names)
    assert not {"Normalize", "ToTensorV2", "Lambda", "CenterCrop3D"} & set(names)
    assert isinstance(augmented_train_set(build_task("shapes", SMALL), FLIP, 0), AugmentedDataset)
