"""``vae``: a variational autoencoder head (Kingma and Welling 2014) with a beta-weighted KL term.

Encoder: the chosen stage's map is average-pooled to a grid of at most ``ENCODER_GRID`` x
``ENCODER_GRID`` cells (its own size when smaller; adaptive pooling, so a backbone without padding
works too), flattened, and one linear layer gives the posterior's ``mu`` and ``logvar``
(``latent_dim`` each). Reparameterisation: ``z = mu + exp(logvar / 2) * eps``, eps ~ N(0, I).
Decoder: a linear layer (+ ReLU) from ``z`` to a small map of the pooled grid's size, then the
``autoencoder`` head's deconvolution decoder (one stride-2 block per doubling) back to the input size.

In training the reconstruction decodes a sample ``z``. In evaluation ``reconstruction`` decodes
``mu`` (the sharpest picture, what PSNR and SSIM score) and ``posterior_sample_logits`` decode one
sample, so the ELBO the objective reports stays a one-sample estimate. That sample's noise is drawn
per sample on the CPU from a generator seeded by (``EVAL_NOISE_SEED``, the sample's ``index`` in its
data set) and then moved to the device: a sample gets the same noise whatever batch it lands in and
on CPU and GPU alike, and different samples get different noise. A batch without ``index`` seeds
by the row's position in the batch instead (deterministic, but row i of every such batch then
shares its noise); every bundled and user task gives ``index``.

The posterior's ``logvar`` is clamped to ``LOGVAR_RANGE`` before ``exp`` (a variance of e^20 or
e^-30 is already far outside what a useful posterior has; beyond that exp overflows float16 and
then float32), and ``mu``, ``logvar`` and the KL term are computed in float32 even under autocast.
Outputs: ``reconstruction_logits``, ``reconstruction``, ``mu``, ``logvar`` (clamped; float32),
``kl`` (N, nats, summed over the latent dimensions; float32) and ``beta`` (the KL weight).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from transferlab.backbones.base import FeatureInfo
from transferlab.heads.autoencoder import (
    IMAGE_TARGETS,
    DeconvDecoder,
    doubling_strides,
    doublings,
    image_outputs,
    nominal_map_side,
    pick_stage,
)
from transferlab.heads.base import Head, decoder_widths, require_target
from transferlab.heads.fcn import input_size, resize_to
from transferlab.registry import HEADS
from transferlab.tasks.base import TargetSpec
from transferlab.tasks.reconstruction import gaussian_kl
from transferlab.tasks.splits import check_int, check_nonnegative

ENCODER_GRID = 4  # cells per side of the pooled posterior input and the decoded seed map (at most)
SEED_CHANNELS = 256  # at most this many channels in the map the latent is decoded to
EVAL_NOISE_SEED = 0  # with each sample's index, seeds the posterior sample of evaluation (ELBO)
LOGVAR_RANGE = (-30.0, 20.0)  # the posterior's log-variance is clamped to this before exp


class VAEHead(Head):
    """Gaussian posterior from one stage, reparameterised sample, deconvolution decoder.

    Args:
        stage: Index of the stage encoded.
        in_channels: That stage's channels.
        grid: Side of the pooled grid the posterior is read from.
        latent_dim: Dimensions of z.
        seed_shape: (channels, side) of the map the latent is decoded to.
        widths: Decoder block widths, coarse to fine.
        out_channels: Image channels.
        beta: Weight of the KL term in the loss.
        image_size: Output size when the batch has no input to measure (and of ``sample``).
        input_key: The batch field the backbone reads.
    """

    target_kinds = IMAGE_TARGETS

    def __init__(
        self,
        stage: int,
        in_channels: int,
        grid: int,
        latent_dim: int,
        seed_shape: tuple[int, int],
        widths: Sequence[int],
        out_channels: int,
        *,
        beta: float,
        image_size: tuple[int, int],
        input_key: str = "image",
    ) -> None:
        super().__init__()
        self.stage, self.grid, self.latent_dim, self.beta = stage, grid, latent_dim, beta
        self.seed_shape, self.image_size, self.input_key = seed_shape, image_size, input_key
        self.posterior = nn.Linear(in_channels * grid * grid, 2 * latent_dim)
        channels, side = seed_shape
        self.seed = nn.Sequential(nn.Linear(latent_dim, channels * side * side), nn.ReLU(inplace=True))
        self.decoder = DeconvDecoder(channels, widths, out_channels)

    def decode(self, z: Tensor, size: tuple[int, int]) -> Tensor:
        """Logits (N x C x H x W at ``size``) of latents ``z`` (N x latent_dim)."""
        channels, side = self.seed_shape
        return resize_to(self.decoder(self.seed(z).view(len(z), channels, side, side)), size)

    def forward(self, features: list[Tensor], batch: dict[str, Any]) -> dict[str, Tensor]:
        size = input_size(batch, self.input_key, self.image_size)
        pooled = F.adaptive_avg_pool2d(features[self.stage], self.grid).flatten(1)
        mu, logvar = self.posterior(pooled).float().chunk(2, dim=1)  # float32 under autocast too
        logvar = logvar.clamp(*LOGVAR_RANGE)
        std = torch.exp(0.5 * logvar)
        if self.training:
            outputs = image_outputs(self.decode(mu + std * torch.randn_like(std), size))
        else:
            eps = evaluation_noise(batch, len(mu), self.latent_dim).to(mu.device)
            outputs = image_outputs(self.decode(mu, size))
            outputs["posterior_sample_logits"] = self.decode(mu + std * eps, size)
        outputs.update(
            mu=mu, logvar=logvar, kl=gaussian_kl(mu, logvar), beta=torch.tensor(self.beta, device=mu.device)
        )
        return outputs

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` images decoded from z ~ N(0, I): [0, 1] pixels, N x C x H x W at the target's size.

        Call it in eval mode (BatchNorm's running statistics); ``generator`` (a CPU one) fixes z.
        """
        device = next(self.parameters()).device
        z = torch.randn(n, self.latent_dim, generator=generator).to(device)
        return torch.sigmoid(self.decode(z, self.image_size))


def evaluation_noise(batch: dict[str, Any], n: int, latent_dim: int) -> Tensor:
    """float32 N x latent_dim standard normal noise on the CPU, each row seeded by its sample.

    Row i is drawn from a generator seeded by (``EVAL_NOISE_SEED``, ``batch["index"][i]``), or by
    (``EVAL_NOISE_SEED``, i) when the batch has no ``index``; see the module docstring.
    """
    index = batch.get("index") if isinstance(batch, dict) else None
    keys = index.tolist() if isinstance(index, Tensor) and len(index) == n else range(n)
    rows = []
    for key in keys:
        seed = int(np.random.SeedSequence([EVAL_NOISE_SEED, int(key)]).generate_state(1)[0])
        rows.append(torch.randn(latent_dim, generator=torch.Generator().manual_seed(seed)))
    return torch.stack(rows) if rows else torch.zeros(0, latent_dim)


@HEADS.register("vae")
def vae(
    feature_info: FeatureInfo,
    target: TargetSpec,
    *,
    latent_dim: int = 32,
    beta: float = 1.0,
    from_stage: int | None = None,
    channels: Sequence[int] | None = None,
) -> Head:
    """Variational autoencoder: pooled stage -> (mu, logvar) -> z -> linear + deconvolution decoder.

    Needs an image target and a 2-D backbone: the chosen stage's channels and reduction.
    ``latent_dim``: dimensions of z; ``beta``: weight of the KL term (1 = the ELBO; > 1 a beta-VAE);
    ``from_stage``: the stage index to encode (default the last); ``channels``: decoder block widths
    coarse to fine (as the ``autoencoder`` head's). ``sample(n)`` decodes z ~ N(0, I).
    """
    require_target("vae", VAEHead.target_kinds, target.kind)
    latent_dim = check_int("head 'vae'", "latent_dim", latent_dim, minimum=1)
    beta = check_nonnegative("head 'vae'", "beta", beta)
    stage = pick_stage("vae", feature_info, from_stage)
    info = feature_info[stage]
    side = min(nominal_map_side(target.image_size, info.reduction), ENCODER_GRID)
    blocks = doublings(target.image_size, side)
    return VAEHead(
        stage,
        info.channels,
        side,
        latent_dim,
        (min(info.channels, SEED_CHANNELS), side),
        decoder_widths("vae", "channels", channels, doubling_strides(blocks)),
        target.in_channels,
        beta=beta,
        image_size=target.image_size,
        input_key=target.input_key,
    )
