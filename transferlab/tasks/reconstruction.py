"""The ``image`` target: reconstruct the input (``autoencoder`` and ``vae`` heads).

Pixel space and likelihood. The heads decode to one logit per pixel and channel; their
``reconstruction`` is its sigmoid, pixels in [0, 1] (the heads never learn the task's normalisation).
The target is the batch's ``image`` (normalised with ``mean``/``std``) mapped back to [0, 1] pixels
and clamped. The decoder is read as a Bernoulli likelihood per pixel value, as Kingma and Welling
(2014) did for MNIST: the reconstruction term is the binary cross-entropy of the logits against the
[0, 1] pixels, summed over the image (in nats). On grey or coloured pixels that are not 0 or 1 this is
the conventional, unnormalised Bernoulli ELBO (see Loaiza-Ganem and Cunningham 2019, "The continuous
Bernoulli"), fine for comparing epochs and models but not a calibrated log-likelihood.

Loss per image, divided by the number of pixel values D = C x H x W so that its scale does not
depend on the image size: ``(BCE_sum + beta * KL) / D`` (``beta * KL`` only for a head that returns
``kl``, e.g. the VAE; beta = 1 gives the negative ELBO per pixel value), averaged over the batch.

Metrics, on [0, 1] pixels, averaged over images:

- ``psnr`` (primary, dB, higher is better): per-image PSNR, torchmetrics'
  ``peak_signal_noise_ratio`` with ``data_range=1``, capped at ``MAX_PSNR`` (identical images).
- ``ssim``: per-image SSIM (``structural_similarity_index_measure``, ``data_range=1``) with Wang et
  al.'s 11 px Gaussian window (sigma 1.5) from 16 px up; smaller images (digits at 8 px) use a
  smaller odd window, see :func:`ssim_window`.
- with a ``kl`` output: ``elbo`` (nats per image, ``-(recon + kl)``), ``recon`` (the Bernoulli
  negative log-likelihood per image) and ``kl`` (nats per image). A head that samples its latent
  in training and decodes its mean in evaluation returns the logits of a posterior sample as
  ``posterior_sample_logits``; the likelihood terms use those, so the ELBO is a one-sample Monte
  Carlo estimate in both modes, while PSNR and SSIM score the mean reconstruction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from transferlab.tasks.splits import to_unit_pixels

MAX_PSNR = 100.0  # dB; identical images (MSE 0) would otherwise score infinity
SSIM_WINDOW = (11, 1.5)  # Wang et al. 2004: 11 x 11 Gaussian window, sigma 1.5
SSIM_FULL_WINDOW_FROM = 16  # px; below this the window shrinks (see ssim_window)


def ssim_window(height: int, width: int) -> tuple[int, float]:
    """SSIM's Gaussian window (odd side, sigma) for images of ``height`` x ``width`` pixels.

    11 px, sigma 1.5 from 16 px up. Smaller images take the largest odd side <= side / 2 + 1 (at least
    3; 5 at 8 px) with sigma scaled alike (1.5 x side / 11), so that SSIM keeps a few windows' worth
    of valid positions after torchmetrics crops the padded border.
    """
    side = min(height, width)
    if side >= SSIM_FULL_WINDOW_FROM:
        return SSIM_WINDOW
    kernel = max(3, side // 2 + 1)
    kernel -= 1 - kernel % 2  # odd
    return kernel, SSIM_WINDOW[1] * kernel / SSIM_WINDOW[0]


def image_psnr(predicted: Tensor, target: Tensor) -> Tensor:
    """Per-image PSNR in dB (N) of [0, 1] images (N x C x H x W), capped at ``MAX_PSNR``."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    values = peak_signal_noise_ratio(predicted, target, data_range=1.0, reduction="none", dim=(1, 2, 3))
    return values.clamp(max=MAX_PSNR)


def image_ssim(predicted: Tensor, target: Tensor) -> Tensor:
    """Per-image SSIM (N) of [0, 1] images (N x C x H x W), window from :func:`ssim_window`."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    kernel, sigma = ssim_window(*predicted.shape[-2:])
    return structural_similarity_index_measure(
        predicted, target, data_range=1.0, kernel_size=kernel, sigma=sigma, reduction="none"
    )


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per sample in nats (N), summed over the latent dimensions."""
    return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


@dataclass(frozen=True)
class ReconstructionObjective:
    """Reconstruct the input image; see the module docstring for the likelihood, loss and metrics.

    Reads ``outputs["reconstruction_logits"]`` (float, N x C x H x W; or ``reconstruction``, [0, 1]
    pixels, when a head gives no logits), optionally ``kl`` (N, nats), ``beta`` and
    ``posterior_sample_logits``, and ``batch["image"]`` (normalised, N x C x H x W).

    Attributes:
        mean: Per-channel means the task subtracted from its [0, 1] pixels.
        std: Per-channel standard deviations it divided by.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    primary_metric: str = "psnr"
    higher_is_better: bool = True

    def pixels(self, image: Tensor) -> Tensor:
        """Normalised images (N x C x H x W) back in [0, 1] pixels (clamped)."""
        return to_unit_pixels(image, self.mean, self.std)

    def loss(self, outputs: dict[str, Tensor], batch: dict[str, Any]) -> Tensor:
        target = self.pixels(batch["image"].float())
        recon = self.negative_log_likelihood(outputs, target)
        if "kl" in outputs:
            recon = recon + self.beta(outputs) * outputs["kl"].float()
        return (recon / target[0].numel()).mean()

    def negative_log_likelihood(self, outputs: dict[str, Tensor], target: Tensor) -> Tensor:
        """Bernoulli negative log-likelihood per image in nats (N), of a posterior sample if given."""
        self.check_outputs(outputs)
        logits = outputs.get("posterior_sample_logits", outputs.get("reconstruction_logits"))
        if logits is not None:
            self.check_size(logits, target)
            nll = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
        else:
            predicted = outputs["reconstruction"].float()
            self.check_size(predicted, target)
            nll = F.binary_cross_entropy(predicted.clamp(0.0, 1.0), target, reduction="none")
        return nll.flatten(1).sum(1)

    @staticmethod
    def beta(outputs: dict[str, Tensor]) -> Tensor | float:
        """The KL weight the head returned (1.0, the plain ELBO, when it gave none)."""
        beta = outputs.get("beta")
        return beta.float() if isinstance(beta, Tensor) else 1.0 if beta is None else float(beta)

    @staticmethod
    def check_outputs(outputs: dict[str, Tensor]) -> None:
        if "reconstruction_logits" not in outputs and "reconstruction" not in outputs:
            raise ValueError(
                "the head's outputs have no 'reconstruction_logits' or 'reconstruction' (it gave "
                f"{', '.join(map(repr, outputs)) or 'nothing'}); target 'image' needs an image head "
                "such as autoencoder or vae"
            )

    @staticmethod
    def check_size(predicted: Tensor, target: Tensor) -> None:
        if predicted.shape != target.shape:
            raise ValueError(
                f"reconstruction of shape {tuple(predicted.shape)} does not fit images of shape "
                f"{tuple(target.shape)}; an image head returns N x C x H x W at the input size"
            )

    def predicted_pixels(self, outputs: dict[str, Tensor]) -> Tensor:
        """The head's reconstruction in [0, 1] pixels (N x C x H x W)."""
        self.check_outputs(outputs)
        if "reconstruction" in outputs:
            return outputs["reconstruction"].detach().float().clamp(0.0, 1.0)
        return torch.sigmoid(outputs["reconstruction_logits"].detach().float())

    def metrics(self) -> dict[str, Any]:
        """``psnr`` and ``ssim`` (``MeanMetric``s over images).

        ``update_metrics`` adds ``elbo``, ``recon`` and ``kl`` to the same dict the first time a head
        returns ``kl``: a plain autoencoder has no likelihood terms to report, and an empty metric
        would compute NaN.
        """
        from torchmetrics import MeanMetric

        return {"psnr": MeanMetric(), "ssim": MeanMetric()}

    def update_metrics(
        self, metrics: dict[str, Any], outputs: dict[str, Tensor], batch: dict[str, Any]
    ) -> None:
        target = self.pixels(batch["image"].detach().float())
        predicted = self.predicted_pixels(outputs)
        self.check_size(predicted, target)
        metrics["psnr"].update(image_psnr(predicted, target))
        metrics["ssim"].update(image_ssim(predicted, target))
        if "kl" not in outputs:
            return
        from torchmetrics import MeanMetric

        with torch.no_grad():
            recon = self.negative_log_likelihood(outputs, target)
            kl = outputs["kl"].detach().float()
        for name, values in (("elbo", -(recon + kl)), ("recon", recon), ("kl", kl)):
            if name not in metrics:
                metrics[name] = MeanMetric().to(values.device)
            metrics[name].update(values)


def mean_image_scores(task: Any, split: str = "test") -> dict[str, float]:
    """PSNR and SSIM on ``split`` of predicting the training split's per-pixel mean image.

    The trivial baseline an autoencoder has to beat: the mean of the training images in [0, 1]
    pixels, scored against every image of ``split`` exactly as the metrics score a reconstruction.

    Args:
        task: A task with an ``image`` target (its ``objective`` is a ``ReconstructionObjective``).
        split: The split to score ("train", "val" or "test").
    """
    objective = getattr(task, "objective", None)
    if not isinstance(objective, ReconstructionObjective):
        raise ValueError(
            f"mean_image_scores needs a task with target 'image', got task '{task.name}' "
            f"with target '{task.target.kind}'"
        )
    train = objective.pixels(task.dataset("train").tensors["image"].float())
    images = objective.pixels(task.dataset(split).tensors["image"].float())
    mean = train.mean(0, keepdim=True).expand_as(images)
    return {
        "psnr": float(image_psnr(mean, images).mean()),
        "ssim": float(image_ssim(mean, images).mean()),
    }
