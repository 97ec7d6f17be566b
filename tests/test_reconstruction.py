"""Reconstruction: the image target on shapes and digits, its objective, the ``autoencoder`` and
``vae`` heads, and the PNG grid of reconstructions and prior samples.

Heads are checked on every kind of 2-D backbone at 32 px (a plain convnet, LeNet-5 without padding,
a timm ResNet-18, a CIFAR ResNet-20, VGG-11) and on 8 px one-channel digits; each backbone is built
once per module. Short training runs must beat the mean-image PSNR (autoencoder) and raise the ELBO
(VAE).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from tests.test_segmentation import Built  # a backbone built once per name, reset by fresh()
from transferlab.engine.assembly import build_backbone, build_head, build_model, build_task
from transferlab.engine.fit import FitConfig, fit
from transferlab.engine.image_samples import CELL_INCHES, DPI, write_image_samples
from transferlab.engine.model import TransferModel
from transferlab.heads.vae import LOGVAR_RANGE, evaluation_noise
from transferlab.registry import HEADS
from transferlab.service.spec import load_spec, validate_spec_text
from transferlab.service.spec_yaml import SpecError
from transferlab.tasks.base import SPLITS, Task
from transferlab.tasks.reconstruction import (
    MAX_PSNR,
    ReconstructionObjective,
    gaussian_kl,
    mean_image_scores,
    ssim_window,
)

SIZE = 32
BACKBONES = ["convnet", "lenet5", "resnet18", "resnet20", "vgg11"]
HEAD_NAMES = ["autoencoder", "vae"]
SMALL = {"train_size": 48, "val_size": 16, "test_size": 16}
EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def image_task() -> Task:
    return build_task("shapes", {**SMALL, "target": "image"})


# -- objective --------------------------------------------------------------------------------------


def grey_objective() -> ReconstructionObjective:
    return ReconstructionObjective(mean=(0.5,), std=(0.25,))


def scores(objective: ReconstructionObjective, outputs: dict, image: torch.Tensor) -> dict[str, float]:
    metrics = objective.metrics()
    objective.update_metrics(metrics, outputs, {"image": image})
    return {name: float(m.compute()) for name, m in metrics.items()}


def test_identical_images_score_the_cap() -> None:
    objective = grey_objective()
    pixels = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    normalised = (pixels - 0.5) / 0.25
    torch.testing.assert_close(objective.pixels(normalised), pixels)
    result = scores(objective, {"reconstruction": pixels}, normalised)
    assert result == {"psnr": pytest.approx(MAX_PSNR), "ssim": pytest.approx(1.0)}
    assert objective.primary_metric == "psnr" and objective.higher_is_better


def test_psnr_follows_the_formula_for_a_known_error() -> None:
    objective = grey_objective()
    pixels = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.8
    predicted = pixels + 0.1  # every pixel off by 0.1: MSE 0.01 -> 10 log10(1 / 0.01) = 20 dB
    result = scores(objective, {"reconstruction": predicted}, (pixels - 0.5) / 0.25)
    assert result["psnr"] == pytest.approx(20.0, abs=1e-3)
    assert 0.0 < result["ssim"] < 1.0
    assert set(result) == {"psnr", "ssim"}  # no likelihood terms without a ``kl`` output


def test_ssim_window_shrinks_for_small_images() -> None:
    assert ssim_window(32, 32) == (11, 1.5) and ssim_window(16, 20) == (11, 1.5)
    kernel, sigma = ssim_window(8, 8)
    assert kernel == 5 and sigma == pytest.approx(1.5 * 5 / 11)
    assert ssim_window(12, 12)[0] == 7


def test_kl_and_elbo_composition() -> None:
    assert torch.equal(gaussian_kl(torch.zeros(4, 6), torch.zeros(4, 6)), torch.zeros(4))
    mu, logvar = torch.ones(2, 3), torch.zeros(2, 3)
    torch.testing.assert_close(gaussian_kl(mu, logvar), torch.full((2,), 1.5))  # 0.5 mu^2 per dimension
    objective = grey_objective()
    pixels = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    logits = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    kl = torch.tensor([2.0, 4.0])
    outputs = {"reconstruction_logits": logits, "reconstruction": torch.sigmoid(logits), "kl": kl}
    image = (pixels - 0.5) / 0.25
    result = scores(objective, outputs, image)
    nll = F.binary_cross_entropy_with_logits(logits, pixels, reduction="none").flatten(1).sum(1)
    assert result["recon"] == pytest.approx(float(nll.mean()), rel=1e-5)
    assert result["kl"] == pytest.approx(3.0)
    assert result["elbo"] == pytest.approx(-(float(nll.mean()) + 3.0), rel=1e-5) and result["elbo"] < 0
    beta = torch.tensor(0.5)
    loss = objective.loss({**outputs, "beta": beta}, {"image": image})
    assert float(loss) == pytest.approx(float(((nll + 0.5 * kl) / 64).mean()), rel=1e-5)
    # A posterior sample, when given, is what the likelihood terms score (the ELBO's Monte Carlo draw).
    sampled = scores(objective, {**outputs, "posterior_sample_logits": logits + 1.0}, image)
    assert sampled["psnr"] == pytest.approx(result["psnr"]) and sampled["recon"] != result["recon"]


def test_objective_rejects_a_reconstruction_of_the_wrong_size_or_none() -> None:
    with pytest.raises(ValueError, match=r"reconstruction of shape \(1, 1, 4, 4\) does not fit images"):
        grey_objective().loss(
            {"reconstruction_logits": torch.zeros(1, 1, 4, 4)}, {"image": torch.zeros(1, 1, 8, 8)}
        )
    with pytest.raises(ValueError, match="no 'reconstruction_logits' or 'reconstruction' .*gave 'logits'"):
        grey_objective().loss({"logits": torch.zeros(1, 10)}, {"image": torch.zeros(1, 1, 8, 8)})


# -- heads over backbones ---------------------------------------------------------------------------


@pytest.fixture(scope="module", params=BACKBONES)
def built(request: pytest.FixtureRequest, image_task: Task) -> Built:
    return Built(request.param, image_task)


def check_head(model: TransferModel, task: Task, batch: dict, shape: tuple[int, ...]) -> dict:
    """Train-mode step (shape, finite loss, gradients), then eval outputs of a batch without input."""
    model.train()
    outputs = model(batch)
    assert outputs["reconstruction"].shape == shape
    pixels = outputs["reconstruction"].detach()
    assert 0.0 <= float(pixels.min()) and float(pixels.max()) <= 1.0
    loss = task.loss(outputs, batch)
    assert torch.isfinite(loss)
    loss.backward()
    head_grads = [p.grad for p in model.head.parameters() if p.requires_grad]
    assert head_grads and all(g is not None for g in head_grads)
    model.eval()  # the spec check's call: no input in the batch, so the target's size is used
    with torch.no_grad():
        alone = model.head(model.forward_features(batch["image"][:2]), {})
    assert alone["reconstruction"].shape == (2, *shape[1:])
    return alone


@pytest.mark.parametrize("head", HEAD_NAMES)
def test_head_reconstructs_the_input_size(built: Built, image_task: Task, head: str) -> None:
    backbone = built.fresh()
    model = TransferModel(backbone, build_head(head, {}, backbone.feature_info, image_task.target))
    batch = image_task.dataset("train").batch(torch.arange(4))
    alone = check_head(model, image_task, batch, (4, 3, SIZE, SIZE))
    if head == "vae":
        latent = model.head.latent_dim
        assert alone["mu"].shape == alone["logvar"].shape == (2, latent)
        assert alone["kl"].shape == (2,) and bool((alone["kl"] >= 0).all())
        samples = model.head.sample(3, generator=torch.Generator().manual_seed(0))
        assert samples.shape == (3, 3, SIZE, SIZE)
        again = model.head.sample(3, generator=torch.Generator().manual_seed(0))
        assert torch.equal(samples, again)


@pytest.mark.parametrize("backbone", ["convnet", "resnet18", "resnet20"])
@pytest.mark.parametrize("head", HEAD_NAMES)
def test_heads_on_8px_grey_digits(backbone: str, head: str) -> None:
    # LeNet-5 (5 x 5 convolutions, no padding) and VGG-11 (five poolings) cannot take 8 px inputs.
    task = build_task("digits", {"target": "image", "image_size": 8})
    torch.manual_seed(0)
    model = build_model((backbone, {}), (head, {}), task)
    batch = task.dataset("train").batch(torch.arange(4))
    check_head(model, task, batch, (4, 1, 8, 8))
    metrics = task.metrics()
    with torch.no_grad():
        task.update_metrics(metrics, model(batch), batch)
    values = {k: float(m.compute()) for k, m in metrics.items()}
    assert all(math.isfinite(v) for v in values.values())
    assert set(values) == ({"psnr", "ssim", "elbo", "recon", "kl"} if head == "vae" else {"psnr", "ssim"})


def test_vae_evaluation_is_deterministic_and_decodes_the_mean(image_task: Task) -> None:
    torch.manual_seed(0)
    model = build_model(("convnet", {"widths": [8, 16, 32]}), ("vae", {"latent_dim": 4}), image_task)
    batch = image_task.dataset("val").batch(torch.arange(6))
    model.eval()
    with torch.no_grad():
        first, second = model(batch), model(batch)
        features = model.forward_features(batch["image"])
        mean_logits = model.head.decode(first["mu"], (SIZE, SIZE))
    for key in ("reconstruction", "posterior_sample_logits", "kl"):
        assert torch.equal(first[key], second[key])
    torch.testing.assert_close(first["reconstruction_logits"], mean_logits)
    assert not torch.equal(first["posterior_sample_logits"], first["reconstruction_logits"])
    assert len(features) == 3 and float(first["beta"]) == 1.0


def test_vae_evaluation_noise_follows_the_sample_not_the_row(image_task: Task) -> None:
    torch.manual_seed(0)
    model = build_model(("convnet", {"widths": [8, 16, 32]}), ("vae", {"latent_dim": 4}), image_task)
    data = image_task.dataset("val")
    model.eval()
    with torch.no_grad():
        whole = model(data.batch(torch.arange(6)))
        picked = model(data.batch(torch.tensor([5, 2])))  # sample 5 in row 0, sample 2 in row 1
        twice = model({**data.batch(torch.tensor([3, 3]))})  # one sample twice: the same noise
        batch = data.batch(torch.arange(6))
        del batch["index"]
        unindexed = model(batch)
    sampled = "posterior_sample_logits"
    torch.testing.assert_close(picked[sampled][0], whole[sampled][5], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(picked[sampled][1], whole[sampled][2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(twice[sampled][0], twice[sampled][1], atol=1e-5, rtol=1e-5)
    # Without ``index`` the row seeds the noise: sample 0 sits in row 0 either way.
    torch.testing.assert_close(unindexed[sampled][0], whole[sampled][0], atol=1e-5, rtol=1e-5)
    noise = evaluation_noise({"index": torch.tensor([7, 7, 8])}, 3, 4)
    assert noise.dtype == torch.float32 and noise.device.type == "cpu"
    assert torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])


def test_vae_kl_is_float32_under_autocast_and_logvar_is_clamped(image_task: Task) -> None:
    torch.manual_seed(0)
    model = build_model(("convnet", {"widths": [8, 16]}), ("vae", {"latent_dim": 4}), image_task).eval()
    batch = image_task.dataset("val").batch(torch.arange(4))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(batch)
    assert model.head.posterior(torch.zeros(1, model.head.posterior.in_features)).dtype == torch.float32
    for key in ("mu", "logvar", "kl"):
        assert outputs[key].dtype == torch.float32, key  # not bfloat16, though the layer ran in it
    torch.testing.assert_close(outputs["kl"], gaussian_kl(outputs["mu"], outputs["logvar"]))
    with torch.no_grad():  # a posterior whose log-variance runs away: exp(100) overflows float32
        model.head.posterior.bias[4:] = 100.0
        huge = model(batch)
        model.head.posterior.bias[4:] = -100.0
        tiny = model(batch)
    assert float(huge["logvar"].max()) == LOGVAR_RANGE[1] and float(tiny["logvar"].min()) == LOGVAR_RANGE[0]
    for outputs in (huge, tiny):
        assert bool(
            torch.isfinite(outputs["kl"]).all() and torch.isfinite(outputs["posterior_sample_logits"]).all()
        )


def test_head_options_and_their_errors(image_task: Task) -> None:
    target = image_task.target
    info = build_backbone("convnet", {}, target).feature_info  # /1, /2, /4, /8, /16
    deep = build_head("autoencoder", {}, info, target)
    assert deep.stage == 4 and len(deep.decoder.blocks) == 4 * 3  # 4 doublings of conv-BN-ReLU
    shallow = build_head("autoencoder", {"from_stage": 2, "channels": [24]}, info, target)
    assert shallow.stage == 2 and [m.out_channels for m in shallow.decoder.blocks[::3]] == [24, 24]
    assert build_head("vae", {"from_stage": -2, "latent_dim": 5}, info, target).stage == 3
    with pytest.raises(ValueError, match=r"from_stage must be a stage index 0..4 .* got 5; .* 4 conv5"):
        build_head("autoencoder", {"from_stage": 5}, info, target)
    with pytest.raises(ValueError, match="channels lists 3 widths, but its decoder has 2 block"):
        build_head("autoencoder", {"from_stage": 2, "channels": [8, 8, 8]}, info, target)
    with pytest.raises(ValueError, match="head 'vae': latent_dim must be >= 1, got 0"):
        build_head("vae", {"latent_dim": 0}, info, target)
    with pytest.raises(ValueError, match=r"head 'autoencoder': channels must be a list of positive integers"):
        build_head("autoencoder", {"channels": [8, 0]}, info, target)
    with pytest.raises(ValueError, match=r"head 'vae': beta must be a number >= 0, got -1"):
        build_head("vae", {"beta": -1}, info, target)


@pytest.mark.parametrize("head", HEAD_NAMES)
def test_head_refuses_a_label_target(head: str) -> None:
    task = build_task("shapes", SMALL)
    info = build_backbone("convnet", {}, task.target).feature_info
    with pytest.raises(
        ValueError, match=f"head '{head}' predicts image targets, but the task provides 'label'"
    ):
        build_head(head, {}, info, task.target)
    assert HEADS.entry(head).source == "transferlab"


def test_spec_with_a_vae_on_a_label_task_is_rejected() -> None:
    spec = """
name: wrong-head
study: single
backbone: {name: convnet, widths: [8, 16]}
head: {name: vae, latent_dim: 4}
task: {name: digits, image_size: 16}
"""
    with pytest.raises(SpecError, match="head 'vae' predicts image targets, but the task provides 'label'"):
        validate_spec_text(spec)
    validated = validate_spec_text(spec.replace("image_size: 16}", "image_size: 16, target: image}"))
    assert validated.primary_metric == "psnr" and validated.higher_is_better


@pytest.mark.parametrize(("name", "head"), [("shapes-autoencoder", "autoencoder"), ("digits-vae", "vae")])
def test_example_specs_validate(name: str, head: str) -> None:
    validated = load_spec(EXPERIMENTS / f"{name}.yaml")
    assert validated.spec.head.name == head and validated.primary_metric == "psnr"


# -- the image target on shapes and digits ----------------------------------------------------------


def test_image_targets_are_deterministic_and_share_the_label_pixels() -> None:
    for name, options in (("shapes", {**SMALL, "seed": 4}), ("digits", {"image_size": 16})):
        image = build_task(name, {**options, "target": "image"})
        again = build_task(name, {**options, "target": "image"})
        label = build_task(name, options)
        assert image.target.kind == "image" and image.primary_metric == "psnr" and image.higher_is_better
        for split in SPLITS:
            tensors = image.dataset(split).tensors
            assert torch.equal(tensors["image"], again.dataset(split).tensors["image"])
            assert torch.equal(tensors["image"], label.dataset(split).tensors["image"])
        assert image.fingerprint() == again.fingerprint() != label.fingerprint()
    other_seed = build_task("shapes", {**SMALL, "seed": 5, "target": "image"})
    assert not torch.equal(
        other_seed.dataset("train").tensors["image"], image.dataset("train").tensors["image"]
    )


def test_digits_label_target_is_unchanged() -> None:
    task = build_task("digits", {})
    assert task.target.kind == "label" and task.primary_metric == "accuracy" and task.objective is None
    assert "target" not in task.options()  # label fingerprints recorded earlier stay valid
    assert build_task("digits", {"target": "image"}).options()["target"] == "image"
    with pytest.raises(ValueError, match=r"target must be one of \['label', 'image'\], got 'mask'"):
        build_task("digits", {"target": "mask"})


def test_mean_image_scores() -> None:
    task = build_task("digits", {"target": "image", "image_size": 8})
    objective = task.objective
    train = objective.pixels(task.dataset("train").tensors["image"])
    test = objective.pixels(task.dataset("test").tensors["image"])
    mse = (test - train.mean(0)).square().flatten(1).mean(1)
    baseline = mean_image_scores(task, "test")
    assert baseline["psnr"] == pytest.approx(float((10 * torch.log10(1 / mse)).mean()), rel=1e-5)
    assert 0 < baseline["ssim"] < 1
    with pytest.raises(
        ValueError, match="needs a task with target 'image', got task 'digits' with target 'label'"
    ):
        mean_image_scores(build_task("digits", {}))


# -- training and the figure ------------------------------------------------------------------------


def train(task: Task, head: tuple[str, dict], epochs: int, widths: list[int]) -> tuple[TransferModel, list]:
    torch.manual_seed(0)
    model = build_model(("convnet", {"widths": widths}), head, task)
    config = FitConfig(
        epochs=epochs, batch_size=16, optimizer="adamw", lr=0.003, weight_decay=0.0, device="cpu"
    )
    result = fit(model, task, config)
    return model, [result.history, result.test]


def test_autoencoder_beats_the_mean_image() -> None:
    task = build_task(
        "shapes", {"target": "image", "train_size": 768, "val_size": 64, "test_size": 64, "seed": 3}
    )
    _, (history, test) = train(task, ("autoencoder", {"channels": [64, 32, 16]}), 3, [16, 32, 64, 128])
    baseline = mean_image_scores(task, "test")
    assert test["psnr"] > baseline["psnr"] + 4.0, (history, test, baseline)


def test_vae_elbo_improves_and_the_grid_is_written(tmp_path: Path) -> None:
    task = build_task("digits", {"target": "image", "image_size": 8})
    model, (history, _) = train(task, ("vae", {"latent_dim": 8}), 3, [16, 32, 64])
    elbo = [row["val/elbo"] for row in history]
    assert elbo[-1] > elbo[0] + 0.5 and all(e < 0 for e in elbo), elbo
    assert all(row["val/kl"] >= 0 and row["train/elbo"] < 0 for row in history)
    from PIL import Image

    path = write_image_samples(model, task, task.dataset("test"), tmp_path / "grid.png", 6, samples=4)
    assert path == tmp_path / "grid.png" and path.stat().st_size > 0
    with Image.open(path) as png:
        assert png.format == "PNG"
        width, height = png.size  # 3 rows (inputs, reconstructions, prior samples) of 6 columns
    assert width == round(6 * CELL_INCHES * DPI) and height == round((3 * CELL_INCHES + 0.3) * DPI)
    autoencoder = build_model(("convnet", {"widths": [8, 16]}), ("autoencoder", {}), task)
    autoencoder.train()
    two_rows = write_image_samples(autoencoder, task, task.dataset("test"), tmp_path / "ae.png", 6)
    with Image.open(two_rows) as png:
        assert png.size[1] == round((2 * CELL_INCHES + 0.3) * DPI)  # no sample row without ``sample``
    assert autoencoder.training  # restored after drawing in eval mode
    with pytest.raises(ValueError, match="folder .*missing does not exist"):
        write_image_samples(model, task, task.dataset("test"), tmp_path / "missing" / "x.png")
