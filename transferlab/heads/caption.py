"""``caption``: a GRU or LSTM decoder started from pooled image features, greedy or beam decoding.

The last feature map (N x C x H x W, or N x C x L from a 1-D backbone) is read as P = H x W (or L)
positions of C channels. Their mean sets the decoder's initial state through a linear layer and tanh
(both h and c for an LSTM, as in Xu et al. 2015). With ``attention``, each step also attends over the
positions with additive attention (Bahdanau et al. 2015) keyed by the previous hidden state; the
context joins the word embedding at the input and the hidden state at the output ("Show, attend and
tell"). Without it, the image enters through the initial state only ("Show and tell", Vinyals et al.
2015, with the image as the state rather than the first input).

Training uses teacher forcing: position t reads token t of ``batch["caption_tokens"]`` and scores
token t + 1 (``caption_logits``, N x (max_length + 1) x V). In eval mode the head also decodes
(``caption_pred``, int64 N x (max_length + 1): the words, ``<eos>``, then padding), greedily or with a
batched beam search; a batch without ``caption_tokens`` (the spec check's) gets ``caption_pred`` only.
In training mode ``caption_pred`` is the argmax of the teacher-forced logits, so train BLEU scores
each word given the true words before it (cheap, optimistic) while val and test BLEU score free
decoding.

Decoding never emits ``<pad>`` or ``<bos>`` (their scores are masked before the softmax) and ends a
caption with ``<eos>`` at the latest after ``max_length`` words. Beam search keeps ``beam_size``
hypotheses per image, carries finished ones along unchanged, and picks the one with the highest
log-probability divided by its length (words + ``<eos>``) to the power ``length_penalty``: 0 (the
default) keeps the plain log-probability, 1 the mean per token, which favours longer captions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from transferlab.backbones.base import FeatureInfo
from transferlab.heads.base import Head, require_target
from transferlab.registry import HEADS
from transferlab.tasks.base import TargetSpec
from transferlab.tasks.captioning import BOS_ID, EOS_ID, PAD_ID, SPECIALS
from transferlab.tasks.splits import check_dropout, check_int, check_nonnegative

CELLS = ("gru", "lstm")
DECODERS = ("greedy", "beam")
State = tuple[Tensor, ...]  # (h,) for a GRU, (h, c) for an LSTM; each 1 x N x hidden


class AdditiveAttention(nn.Module):
    """Bahdanau attention: weights ``softmax(v . tanh(W_m m_p + W_q q))`` over positions p."""

    def __init__(self, memory_dim: int, query_dim: int, attention_dim: int) -> None:
        super().__init__()
        self.key = nn.Linear(memory_dim, attention_dim, bias=False)
        self.query = nn.Linear(query_dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1, bias=False)

    def forward(self, keys: Tensor, memory: Tensor, query: Tensor) -> Tensor:
        """Context N x C from ``keys`` (N x P x A, ``self.key(memory)``), memory N x P x C, query N x Q."""
        energy = self.score(torch.tanh(keys + self.query(query)[:, None])).squeeze(-1)
        weights = energy.softmax(dim=1)
        return torch.bmm(weights[:, None].to(memory.dtype), memory).squeeze(1)


class CaptionHead(Head):
    """Embedding, one recurrent layer (GRU or LSTM), optional attention, a linear layer over words.

    Args:
        in_channels: Channels of the backbone's last stage.
        vocab_size: Words the decoder scores, the special tokens included.
        max_length: The most words of a caption; sequences have ``max_length + 1`` steps.
        cell: "gru" or "lstm".
        embed_dim: Word embedding width.
        hidden: Recurrent state width (also the attention width).
        attention: Attend over the last map's positions at every step.
        decode: Eval-mode decoding, "greedy" or "beam".
        beam_size: Hypotheses per image in beam search.
        length_penalty: Exponent of the length that divides a finished beam's log-probability.
        dropout: Dropout on the embeddings and before the output layer.
    """

    target_kinds = ("caption",)

    def __init__(
        self,
        in_channels: int,
        vocab_size: int,
        max_length: int,
        *,
        cell: str = "gru",
        embed_dim: int = 64,
        hidden: int = 256,
        attention: bool = False,
        decode: str = "greedy",
        beam_size: int = 3,
        length_penalty: float = 0.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.vocab_size, self.max_length, self.cell = vocab_size, max_length, cell
        self.decode_method, self.beam_size, self.length_penalty = decode, beam_size, length_penalty
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD_ID)
        self.init_state = nn.ModuleList(
            nn.Linear(in_channels, hidden) for _ in range(2 if cell == "lstm" else 1)
        )
        self.attention = AdditiveAttention(in_channels, hidden, hidden) if attention else None
        context = in_channels if attention else 0
        rnn = nn.GRU if cell == "gru" else nn.LSTM
        self.rnn = rnn(embed_dim + context, hidden, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden + context, vocab_size)

    # -- the decoder's pieces -------------------------------------------------------------------------
    def start(self, features: list[Tensor]) -> tuple[State, Tensor, Tensor | None]:
        """(initial state, memory N x P x C, attention keys N x P x A or None) of the last map."""
        last = features[-1]
        if last.ndim < 3:
            raise ValueError(
                f"head 'caption' reads N x C x H x W or N x C x L feature maps, got {tuple(last.shape)}"
            )
        memory = last.flatten(2).transpose(1, 2)
        pooled = memory.mean(dim=1)
        state = tuple(torch.tanh(layer(pooled))[None].contiguous() for layer in self.init_state)
        keys = self.attention.key(memory) if self.attention is not None else None
        return state, memory, keys

    def _rnn(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        out, new = self.rnn(x, state[0] if self.cell == "gru" else state)
        return out, (new,) if self.cell == "gru" else tuple(new)

    def step(self, tokens: Tensor, state: State, memory: Tensor, keys: Tensor | None) -> tuple[Tensor, State]:
        """Scores N x V of the next word after ``tokens`` (N), and the new state."""
        x = self.dropout(self.embed(tokens))
        context = None
        if self.attention is not None:
            assert keys is not None
            context = self.attention(keys, memory, state[0][0])
            x = torch.cat([x, context.to(x.dtype)], dim=-1)
        out, state = self._rnn(x[:, None], state)
        h = out[:, 0]
        if context is not None:
            h = torch.cat([h, context.to(h.dtype)], dim=-1)
        return self.out(self.dropout(h)), state

    def teacher_forced(self, start: tuple[State, Tensor, Tensor | None], inputs: Tensor) -> Tensor:
        """Scores N x T x V of the word after each of ``inputs`` (N x T token ids, ``<bos>`` first)."""
        state, memory, keys = start
        if self.attention is None:  # the image is in the state only: one call over the sequence
            out, _ = self._rnn(self.dropout(self.embed(inputs)), state)
            return self.out(self.dropout(out))
        steps = []
        for t in range(inputs.shape[1]):
            logits, state = self.step(inputs[:, t], state, memory, keys)
            steps.append(logits)
        return torch.stack(steps, dim=1)

    def log_probs(self, logits: Tensor, *, last: bool) -> Tensor:
        """Log-probabilities of the next word: never ``<pad>`` or ``<bos>``; only ``<eos>`` when ``last``."""
        logits = logits.float().clone()
        if last:
            logits[..., :EOS_ID] = -torch.inf
            logits[..., EOS_ID + 1 :] = -torch.inf
        else:
            logits[..., [PAD_ID, BOS_ID]] = -torch.inf
        return logits.log_softmax(dim=-1)

    # -- the contract ------------------------------------------------------------------------------------
    def forward(self, features: list[Tensor], batch: dict[str, Any]) -> dict[str, Tensor]:
        start = self.start(features)
        tokens = batch.get("caption_tokens") if isinstance(batch, dict) else None
        outputs: dict[str, Tensor] = {}
        if tokens is not None:
            logits = self.teacher_forced(start, tokens[:, :-1])
            outputs["caption_logits"] = logits
            if self.training:  # each word given the true ones before it: see the module docstring
                with torch.no_grad():
                    outputs["caption_pred"] = self.log_probs(logits.detach(), last=False).argmax(-1)
        elif self.training:
            raise ValueError("head 'caption' trains on batch['caption_tokens'], which this batch lacks")
        if not self.training:
            outputs["caption_pred"] = self._decode(start, self.decode_method, self.beam_size)
        return outputs

    def generate(
        self, features: list[Tensor], method: str | None = None, beam_size: int | None = None
    ) -> Tensor:
        """Decoded ids N x (max_length + 1) ("greedy" or "beam"; the head's options by default)."""
        method = method or self.decode_method
        if method not in DECODERS:
            raise ValueError(
                f"head 'caption': decoding method must be one of {list(DECODERS)}, got {method!r}"
            )
        with torch.no_grad():
            return self._decode(self.start(features), method, beam_size or self.beam_size)

    def sequence_log_prob(self, features: list[Tensor], ids: Tensor) -> Tensor:
        """The decoder's log-probability (N) of ``ids`` (N x (max_length + 1), as ``generate`` gives)."""
        if ids.shape[1] != self.max_length + 1:
            raise ValueError(f"ids need {self.max_length + 1} steps, got {tuple(ids.shape)}")
        inputs = torch.cat([torch.full_like(ids[:, :1], BOS_ID), ids[:, :-1]], dim=1)
        logits = self.teacher_forced(self.start(features), inputs)
        logp = torch.cat(
            [self.log_probs(logits[:, :-1], last=False), self.log_probs(logits[:, -1:], last=True)], dim=1
        )
        picked = logp.gather(-1, ids[..., None]).squeeze(-1)
        return picked.masked_fill(ids == PAD_ID, 0.0).sum(dim=1)

    def _decode(self, start: tuple[State, Tensor, Tensor | None], method: str, beam_size: int) -> Tensor:
        return self._greedy(start) if method == "greedy" else self._beam(start, beam_size)

    def _greedy(self, start: tuple[State, Tensor, Tensor | None]) -> Tensor:
        state, memory, keys = start
        n, steps = memory.shape[0], self.max_length + 1
        out = torch.full((n, steps), PAD_ID, dtype=torch.long, device=memory.device)
        tokens = torch.full((n,), BOS_ID, dtype=torch.long, device=memory.device)
        finished = torch.zeros(n, dtype=torch.bool, device=memory.device)
        for t in range(steps):
            logits, state = self.step(tokens, state, memory, keys)
            tokens = self.log_probs(logits, last=t == steps - 1).argmax(-1).masked_fill(finished, PAD_ID)
            out[:, t] = tokens
            finished |= tokens == EOS_ID
            if bool(finished.all()):
                break
        return out

    def _beam(self, start: tuple[State, Tensor, Tensor | None], beam_size: int) -> Tensor:
        """Batched beam search: every image keeps ``beam_size`` hypotheses in one N*B batch."""
        state, memory, keys = start
        n, width, steps, vocab = memory.shape[0], beam_size, self.max_length + 1, self.vocab_size
        device = memory.device
        memory = memory.repeat_interleave(width, dim=0)
        keys = keys.repeat_interleave(width, dim=0) if keys is not None else None
        state = tuple(s.repeat_interleave(width, dim=1) for s in state)
        scores = torch.full((n, width), -torch.inf, device=device)
        scores[:, 0] = 0.0  # one live hypothesis at first, so the first words are not picked B times
        seqs = torch.full((n, width, steps), PAD_ID, dtype=torch.long, device=device)
        finished = torch.zeros(n, width, dtype=torch.bool, device=device)
        tokens = torch.full((n * width,), BOS_ID, dtype=torch.long, device=device)
        carry = torch.full((vocab,), -torch.inf, device=device)
        carry[PAD_ID] = 0.0  # a finished hypothesis goes on with padding at no cost
        offsets = torch.arange(n, device=device)[:, None] * width
        for t in range(steps):
            logits, state = self.step(tokens, state, memory, keys)
            logp = self.log_probs(logits, last=t == steps - 1).view(n, width, vocab)
            logp = torch.where(finished[..., None], carry, logp)
            scores, index = (scores[..., None] + logp).view(n, width * vocab).topk(width, dim=1)
            origin, words = index // vocab, index % vocab
            seqs = seqs.gather(1, origin[..., None].expand(-1, -1, steps)).clone()
            seqs[:, :, t] = words
            finished = finished.gather(1, origin) | (words == EOS_ID)
            rows = (origin + offsets).flatten()
            state = tuple(s.index_select(1, rows) for s in state)
            tokens = words.flatten()
            if bool(finished.all()):
                break
        lengths = (seqs != PAD_ID).sum(-1).clamp(min=1).float()
        best = (scores / lengths**self.length_penalty).argmax(dim=1)
        return seqs[torch.arange(n, device=device), best]


@HEADS.register("caption")
def caption(
    feature_info: FeatureInfo,
    target: TargetSpec,
    *,
    cell: str = "gru",
    embed_dim: int = 64,
    hidden: int = 256,
    attention: bool = False,
    decode: str = "greedy",
    beam_size: int = 3,
    length_penalty: float = 0.0,
    dropout: float = 0.0,
) -> Head:
    """GRU/LSTM caption decoder from pooled last-stage features (optional attention over positions).

    Needs a caption target (its vocabulary and max_length) and the last stage's channels; works on
    2-D and 1-D backbones.

    Args:
        feature_info: The backbone's stages; the head reads the last one.
        target: A caption target.
        cell: "gru" or "lstm".
        embed_dim: Word embedding width.
        hidden: Recurrent state width (and attention width).
        attention: Additive attention over the last map's positions at every step.
        decode: Eval-mode decoding: "greedy" or "beam".
        beam_size: Hypotheses per image in beam search (>= 1; 1 decodes as greedy does).
        length_penalty: Beam search ranks finished captions by log-probability / length**this (>= 0).
        dropout: Dropout on embeddings and before the output layer, in [0, 1).
    """
    require_target("caption", CaptionHead.target_kinds, target.kind)
    if tuple(target.vocabulary[: len(SPECIALS)]) != SPECIALS or len(target.vocabulary) <= len(SPECIALS):
        raise ValueError(
            f"head 'caption' needs a vocabulary of {list(SPECIALS)} and at least one word, got "
            f"{list(target.vocabulary)[:8]}"
        )
    if target.max_length < 1:
        raise ValueError(f"head 'caption' needs the target's max_length >= 1, got {target.max_length}")
    if cell not in CELLS:
        raise ValueError(f"head 'caption': cell must be one of {list(CELLS)}, got {cell!r}")
    if decode not in DECODERS:
        raise ValueError(f"head 'caption': decode must be one of {list(DECODERS)}, got {decode!r}")
    if not isinstance(attention, bool):
        raise ValueError(f"head 'caption': attention must be true or false, got {attention!r}")
    owner = "head 'caption'"
    return CaptionHead(
        feature_info[-1].channels,
        len(target.vocabulary),
        target.max_length,
        cell=cell,
        embed_dim=check_int(owner, "embed_dim", embed_dim, minimum=1),
        hidden=check_int(owner, "hidden", hidden, minimum=1),
        attention=attention,
        decode=decode,
        beam_size=check_int(owner, "beam_size", beam_size, minimum=1),
        length_penalty=check_nonnegative(owner, "length_penalty", length_penalty),
        dropout=check_dropout(owner, dropout),
    )
