"""1-D backbones for sequences: ``textcnn`` over token ids and ``tdnn`` over log-mel frames.

Both follow the stage/freeze contract of :mod:`transferlab.backbones.base`; their features are
N x C x L maps, ``StageInfo.reduction`` is the temporal stride and ``receptive_field`` is counted in
input steps (tokens or frames). Input conventions, shared with the text and audio tasks:

- token inputs (``textcnn``): int64 N x L token ids, id 0 is padding; ``in_channels`` is the
  vocabulary size. An embedding is a 1x1 convolution over one-hot tokens, whose channel count is
  exactly the vocabulary size, so the task's ``TargetSpec.in_channels`` keeps its meaning.
- frame inputs (``tdnn``): float N x C x L with C = ``in_channels`` features per frame (mel bands).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from transferlab.backbones.base import Backbone, StageInfo
from transferlab.registry import BACKBONES

PAD_ID = 0  # the token id of padding: its embedding is zero and receives no gradient


class SequenceBackbone(Backbone):
    """A backbone over 1-D sequences; ``input_kind`` says what ``forward`` expects.

    Args:
        input_kind: "tokens" (int64 N x L ids < ``in_channels``) or "frames" (float N x C x L).
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        feature_info: Sequence[StageInfo],
        in_channels: int,
        *,
        input_kind: str,
    ) -> None:
        super().__init__(stages, feature_info, in_channels)
        self.input_kind = input_kind

    def example_input(self, batch_size: int = 2, length: int = 32, seed: int = 0) -> Tensor:
        """A random input of the kind and size this backbone reads (for contract checks)."""
        gen = torch.Generator().manual_seed(seed)
        if self.input_kind == "tokens":
            return torch.randint(0, self.in_channels, (batch_size, length), generator=gen)
        return torch.randn(batch_size, self.in_channels, length, generator=gen) * 2 + 0.5


class TokenEmbedding(nn.Module):
    """Token ids (int64 N x L) to embeddings N x D x L, channels first as ``nn.Conv1d`` reads them."""

    def __init__(self, vocab_size: int, dim: int, dropout: float) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim, padding_idx=PAD_ID)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.is_floating_point() or tokens.ndim != 2:
            raise ValueError(
                f"textcnn reads int64 token ids of shape N x L, got {tokens.dtype} {tuple(tokens.shape)}"
            )
        return self.dropout(self.embedding(tokens)).transpose(1, 2)


def same_conv1d(cin: int, cout: int, kernel: int, *, dilation: int = 1, bias: bool = True) -> nn.Module:
    """A 1-D convolution whose output has its input's length ("same" padding, also for even widths).

    Even spans pad one step more on the right, as ``padding="same"`` does (which torch warns about
    for even spans, hence the explicit padding).
    """
    conv = nn.Conv1d(cin, cout, kernel, dilation=dilation, bias=bias)
    span = dilation * (kernel - 1)
    return nn.Sequential(nn.ConstantPad1d((span // 2, span - span // 2), 0.0), conv) if span else conv


class MultiWidthConv1d(nn.Module):
    """Parallel convolutions of several widths over the same input, concatenated (Kim 2014).

    Every branch keeps the length (:func:`same_conv1d`), so the branches line up and a stage's
    output length is its input length.
    """

    def __init__(self, cin: int, filters: int, widths: Sequence[int], batch_norm: bool) -> None:
        super().__init__()
        self.branches = nn.ModuleList(same_conv1d(cin, filters, w, bias=not batch_norm) for w in widths)
        out = filters * len(widths)
        self.norm = nn.BatchNorm1d(out) if batch_norm else nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(torch.cat([branch(x) for branch in self.branches], dim=1)))


def _positive_int(backbone: str, option: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{backbone}: {option} must be an integer >= {minimum}, got {value!r}")
    return value


def _positive_ints(backbone: str, option: str, values: Sequence[int]) -> list[int]:
    allowed = f"{backbone}: {option} must be a non-empty list of positive integers, got {values!r}"
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ValueError(allowed)
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(allowed)
    return list(values)


def _he_init(stages: Sequence[nn.Module]) -> None:
    for stage in stages:
        for m in stage.modules():
            if isinstance(m, nn.Conv1d):  # as convnet: keeps activations' scale through ReLUs
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


@BACKBONES.register("textcnn")
def textcnn(
    *,
    in_channels: int = 1000,
    embed_dim: int = 64,
    filters: Sequence[int] = (32, 32),
    kernel_sizes: Sequence[int] = (3, 4, 5),
    pool: int = 2,
    dropout: float = 0.0,
    batch_norm: bool = True,
) -> SequenceBackbone:
    """Kim (2014) text CNN: token embedding, then stages of parallel multi-width 1-D convolutions.

    Stages: ``embed`` (D x L), then ``conv1``, ``conv2``, ... with ``filters[i] * len(kernel_sizes)``
    channels each; every conv stage after the first starts with a max pool of ``pool`` steps.

    Args:
        in_channels: Vocabulary size (token ids 0..in_channels-1, 0 = padding); tasks set it.
        embed_dim: Embedding dimension D.
        filters: Filters per width in each conv stage (one entry per stage).
        kernel_sizes: The parallel filter widths in tokens (Kim: 3, 4, 5).
        pool: Temporal max-pool stride between conv stages (1 = none).
        dropout: Dropout on the embeddings.
        batch_norm: BatchNorm after each conv stage.
    """
    name = "textcnn"
    _positive_int(name, "in_channels (the vocabulary size)", in_channels, minimum=2)
    filters = _positive_ints(name, "filters", filters)
    widths = _positive_ints(name, "kernel_sizes", kernel_sizes)
    embed_dim, pool = _positive_int(name, "embed_dim", embed_dim), _positive_int(name, "pool", pool)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{name}: dropout must be in [0, 1), got {dropout}")
    stages: list[nn.Module] = [TokenEmbedding(in_channels, embed_dim, dropout)]
    infos = [StageInfo("embed", embed_dim, 1, 1)]
    cin, reduction, rf = embed_dim, 1, 1
    for i, per_width in enumerate(filters):
        layers: list[nn.Module] = []
        if i > 0 and pool > 1:
            layers.append(nn.MaxPool1d(pool, ceil_mode=True))  # ceil: a short sequence keeps a step
            rf += (pool - 1) * reduction
            reduction *= pool
        layers.append(MultiWidthConv1d(cin, per_width, widths, batch_norm))
        rf += (max(widths) - 1) * reduction  # the widest branch sees furthest
        stages.append(nn.Sequential(*layers))
        cin = per_width * len(widths)
        infos.append(StageInfo(f"conv{i + 1}", cin, reduction, rf))
    _he_init(stages)
    return SequenceBackbone(stages, infos, in_channels, input_kind="tokens")


def _tdnn_layer(cin: int, cout: int, kernel: int, dilation: int, batch_norm: bool) -> nn.Sequential:
    layers = [same_conv1d(cin, cout, kernel, dilation=dilation, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(cout))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


@BACKBONES.register("tdnn")
def tdnn(
    *,
    in_channels: int = 40,
    channels: Sequence[int] = (64, 64, 64, 64, 128),
    kernel_sizes: Sequence[int] = (5, 3, 3, 1, 1),
    dilations: Sequence[int] = (1, 2, 3, 1, 1),
    batch_norm: bool = True,
) -> SequenceBackbone:
    """Time-delay network over log-mel frames (Waibel 1989; the x-vector frame layers of Snyder/Peddinti).

    One stage per TDNN layer, ``tdnn1`` (the stem, reading ``in_channels`` mel bands) to ``tdnnN``:
    a 1-D convolution of ``kernel_sizes[i]`` taps spaced ``dilations[i]`` frames apart, BatchNorm and
    ReLU. The default contexts are [-2, 2], {-2, 0, 2}, {-3, 0, 3}, {0}, {0}: 15 frames in all.
    Lengths are kept ("same" padding), so every stage has temporal stride 1.

    Args:
        in_channels: Features per frame (the task's mel bands).
        channels: Output channels per stage.
        kernel_sizes: Taps per stage.
        dilations: Spacing of the taps per stage, in frames.
        batch_norm: BatchNorm after each convolution.
    """
    name = "tdnn"
    channels = _positive_ints(name, "channels", channels)
    kernels = _positive_ints(name, "kernel_sizes", kernel_sizes)
    dilation = _positive_ints(name, "dilations", dilations)
    if not len(channels) == len(kernels) == len(dilation):
        raise ValueError(
            f"{name}: channels, kernel_sizes and dilations need one entry per stage, got "
            f"{len(channels)}, {len(kernels)} and {len(dilation)}"
        )
    _positive_int(name, "in_channels", in_channels)
    stages: list[nn.Module] = []
    infos: list[StageInfo] = []
    cin, rf = in_channels, 1
    for i, (cout, k, d) in enumerate(zip(channels, kernels, dilation, strict=True)):
        stages.append(_tdnn_layer(cin, cout, k, d, batch_norm))
        rf += (k - 1) * d
        infos.append(StageInfo(f"tdnn{i + 1}", cout, 1, rf))
        cin = cout
    _he_init(stages)
    return SequenceBackbone(stages, infos, in_channels, input_kind="frames")
