"""Caption targets: vocabulary and token ids, the teacher-forced loss, BLEU and exact-match metrics.

Tokens are the lower-cased, whitespace-separated words of a caption. Token ids: 0 ``<pad>``,
1 ``<bos>``, 2 ``<eos>``, 3 ``<unk>``, then the words. ``caption_tokens`` (int64 N x (max_length + 2))
holds ``<bos>``, the words (the first ``max_length`` of a longer caption), ``<eos>`` and padding.

The ``shapes`` captions have a fixed vocabulary taken from the grammar's own word lists (see
:func:`shapes_grammar`); a user's captions get a vocabulary from their training split (words seen
fewer than ``min_count`` times become ``<unk>``) and ``max_length`` from its longest caption.

Metrics (:class:`CaptionObjective`) score the head's decoded ids ``outputs["caption_pred"]`` against
the batch's captions: corpus-level BLEU-1..4 (torchmetrics' BLEU, uniform weights, no smoothing,
whitespace tokens) and the share of captions decoded exactly. The ids are kept per batch and decoded
once per split (:func:`caption_score`), so a training step pays no host synchronisation for them.
A sample may carry several references (``batch["references"]``: a list of strings per sample); the
sample's ``caption`` is the only one otherwise. References are compared in the tokenised form (lower
case, single spaces).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)
BLEU_ORDERS = (1, 2, 3, 4)
SCORES = (*(f"bleu{n}" for n in BLEU_ORDERS), "exact_match")
# The literal words of the shapes grammar (``transferlab.tasks.shapes.caption`` writes them in its
# f-strings: "a <size> <colour> <kind>", "<np> at the <place>", "... and <np> ..."). Every other word is
# read from the generator's own lists and functions by :func:`shapes_grammar`.
SHAPES_GLUE = ("a", "at", "the", "and")


def tokenize(caption: str) -> list[str]:
    """The lower-cased, whitespace-separated words of ``caption``."""
    return caption.lower().split()


def normalize(caption: str) -> str:
    """``caption`` as its tokens joined by single spaces (the form metrics compare)."""
    return " ".join(tokenize(caption))


def shapes_grammar() -> tuple[tuple[str, ...], int]:
    """(the words, the most words of a caption) of the ``shapes`` caption grammar.

    Sizes, colours and kinds come from the generator's lists; places and relations from probing
    the functions that choose them (a box centre in each third of the image, a second shape on each
    side), so a change to the grammar changes this vocabulary with it.
    """
    import numpy as np

    from transferlab.tasks import shapes  # lazily: shapes imports the objectives, which import this

    thirds = (1 / 6, 1 / 2, 5 / 6)
    places = {shapes._place(np.array([x, y])) for x in thirds for y in thirds}
    sides = [((0.2, 0.5), (0.8, 0.5)), ((0.5, 0.2), (0.5, 0.8))]
    relations = {shapes._relation(np.array(a), np.array(b)) for pair in sides for a, b in (pair, pair[::-1])}
    sizes = [word for _, word in shapes.SIZE_WORDS]
    groups = [SHAPES_GLUE, sizes, shapes.COLOUR_NAMES, shapes.KINDS, places, relations]
    words = sorted({word for group in groups for phrase in group for word in phrase.split()})

    def longest(phrases: Iterable[str]) -> int:
        return max(len(p.split()) for p in phrases)

    noun_phrase = 1 + longest(sizes) + longest(shapes.COLOUR_NAMES) + longest(shapes.KINDS)
    located = noun_phrase + 2 + longest(places)  # "<np> at the <place>"
    # The longest caption: "<located> <relation> <np> and <located>".
    return tuple(words), 2 * located + longest(relations) + noun_phrase + 1


def build_vocabulary(captions: Sequence[str], min_count: int = 1) -> tuple[str, ...]:
    """Special tokens, then the words seen at least ``min_count`` times, by falling count then A-Z."""
    counts = Counter(word for caption in captions for word in tokenize(caption))
    kept = sorted(
        (w for w, c in counts.items() if c >= min_count and w not in SPECIALS), key=lambda w: (-counts[w], w)
    )
    return (*SPECIALS, *kept)


def decode(token_ids: Tensor | Sequence[Sequence[int]], vocabulary: Sequence[str]) -> list[str]:
    """Token ids (N x T) as captions: a leading ``<bos>`` skipped, up to the first ``<eos>`` or pad."""
    rows = token_ids.tolist() if isinstance(token_ids, Tensor) else [list(r) for r in token_ids]
    captions = []
    for row in rows:
        if row and row[0] == BOS_ID:
            row = row[1:]
        words = []
        for token in row:
            if token in (EOS_ID, PAD_ID):
                break
            words.append(vocabulary[token])
        captions.append(" ".join(words))
    return captions


@dataclass(frozen=True)
class CaptionObjective:
    """Teacher-forced token cross-entropy; BLEU-1..4 (primary: ``bleu4``) and exact match.

    Reads ``outputs["caption_logits"]`` (float N x T x V: position t scores token t + 1 of
    ``batch["caption_tokens"]`` given tokens 0..t, so T = max_length + 1), ``outputs["caption_pred"]``
    (int64 N x T' decoded ids, no ``<bos>``) and ``batch["caption"]`` (list of str).

    Attributes:
        vocabulary: Token strings by id, the four special tokens first.
        max_length: The most words a caption target (and a decoded caption) has.
    """

    vocabulary: tuple[str, ...]
    max_length: int
    primary_metric: str = "bleu4"
    higher_is_better: bool = True

    def __post_init__(self) -> None:
        if tuple(self.vocabulary[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a caption vocabulary starts with {SPECIALS}, got {self.vocabulary[:4]}")
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")

    @classmethod
    def for_captions(cls, captions: Sequence[str] | None, min_count: int = 1) -> CaptionObjective:
        """The shapes grammar's objective (``None``), or one for a user's training captions.

        Args:
            captions: The training split's captions; ``None`` gives the fixed shapes vocabulary.
            min_count: Training occurrences a word needs to enter the vocabulary (rarer: ``<unk>``).
        """
        if captions is None:
            words, max_length = shapes_grammar()
            return cls(vocabulary=(*SPECIALS, *words), max_length=max_length)
        lengths = [len(tokenize(c)) for c in captions]
        if not lengths or min(lengths) == 0:
            raise ValueError("caption targets need at least one caption, and no caption may be empty")
        return cls(vocabulary=build_vocabulary(captions, min_count), max_length=max(lengths))

    @property
    def word_ids(self) -> dict[str, int]:
        return {word: i for i, word in enumerate(self.vocabulary)}

    def encode(self, captions: Sequence[str]) -> Tensor:
        """int64 N x (max_length + 2): ``<bos>``, the first max_length words, ``<eos>``, padding."""
        ids = self.word_ids
        out = torch.full((len(captions), self.max_length + 2), PAD_ID, dtype=torch.long)
        for i, caption in enumerate(captions):
            words = [ids.get(w, UNK_ID) for w in tokenize(caption)[: self.max_length]]
            out[i, : len(words) + 2] = torch.tensor([BOS_ID, *words, EOS_ID])
        return out

    def decode(self, token_ids: Tensor | Sequence[Sequence[int]]) -> list[str]:
        """Token ids (N x T) as caption strings; see :func:`decode`."""
        return decode(token_ids, self.vocabulary)

    def prepare(self, dataset: Any) -> None:
        """Add ``caption_tokens`` to an ``InMemoryDataset`` from its ``extras["caption"]``."""
        if "caption" not in dataset.extras:
            raise ValueError(
                f"a caption target needs captions in extras['caption'], got {list(dataset.extras)}"
            )
        dataset.tensors["caption_tokens"] = self.encode(dataset.extras["caption"])

    def loss(self, outputs: dict[str, Tensor], batch: dict[str, Any]) -> Tensor:
        logits, tokens = outputs["caption_logits"], batch["caption_tokens"]
        target = tokens[:, 1:]
        if logits.shape[:2] != target.shape or logits.shape[-1] != len(self.vocabulary):
            raise ValueError(
                f"caption_logits of shape {tuple(logits.shape)} do not fit caption_tokens of shape "
                f"{tuple(tokens.shape)} and {len(self.vocabulary)} words; a caption head returns "
                "N x (tokens - 1) x vocabulary"
            )
        return F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=PAD_ID)

    def metrics(self) -> dict[str, Any]:
        return {name: caption_score(name, self.vocabulary) for name in SCORES}

    def update_metrics(
        self, metrics: dict[str, Any], outputs: dict[str, Tensor], batch: dict[str, Any]
    ) -> None:
        predicted = outputs["caption_pred"].detach()
        references = caption_references(batch)
        for name in SCORES:
            metrics[name].update(predicted, references)


def caption_score(name: str, vocabulary: Sequence[str]) -> Any:
    """A torchmetrics ``Metric`` for one of ``SCORES`` (BLEU-n or exact match) over a whole split.

    ``update(ids, references)`` only keeps the decoded ids (on their device) and the references: no
    host synchronisation and no Python decoding per batch, which matters in training, where every
    step updates the (teacher-forced, optimistic) train metrics. ``compute()`` decodes every id once
    and scores the corpus: BLEU-n equal to torchmetrics' ``BLEUScore(n_gram=n)`` fed batch by batch
    (corpus-level counts), exact match the share of captions equal to one of their references.
    """
    return _caption_score_class()(name, tuple(vocabulary))


@cache
def _caption_score_class() -> type:
    """The ``Metric`` subclass of :func:`caption_score`, made on first use (torchmetrics loads slowly)."""
    from torchmetrics import Metric
    from torchmetrics.functional.text import bleu_score

    class CaptionScore(Metric):
        full_state_update = False

        def __init__(self, name: str, vocabulary: tuple[str, ...]) -> None:
            super().__init__()
            self.name, self.vocabulary = name, vocabulary
            self.add_state("predictions", default=[], dist_reduce_fx=None)
            self.references: list[list[str]] = []  # strings, kept beside the tensor state

        def update(self, predicted: Tensor, references: list[list[str]]) -> None:
            self.predictions.append(predicted)
            self.references.extend(references)

        def reset(self) -> None:
            super().reset()
            self.references = []

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError(f"{self.name}: call update() per batch, then compute()")

        def compute(self) -> Tensor:
            hypotheses = [h for ids in self.predictions for h in decode(ids, self.vocabulary)]
            if self.name == "exact_match":
                exact = [h in refs for h, refs in zip(hypotheses, self.references, strict=True)]
                return torch.tensor(sum(exact) / len(exact) if exact else float("nan"))
            if not hypotheses:
                return torch.tensor(0.0)
            return bleu_score(hypotheses, self.references, n_gram=int(self.name.removeprefix("bleu")))

    return CaptionScore


def caption_references(batch: dict[str, Any]) -> list[list[str]]:
    """Each sample's reference captions, normalised: ``batch["references"]`` or its ``caption``."""
    given = batch.get("references")
    if given is None:
        given = [[caption] for caption in batch["caption"]]
    return [[normalize(r) for r in refs] for refs in given]


def frequent_words_caption(captions: Sequence[str]) -> str:
    """The baseline caption: the most frequent words (by falling count, ties A-Z) at the median length."""
    counts = Counter(word for caption in captions for word in tokenize(caption))
    length = median_length(captions)
    return " ".join(sorted(counts, key=lambda w: (-counts[w], w))[:length])


def positional_caption(captions: Sequence[str]) -> str:
    """A stronger fixed caption: at each position up to the median length, its most frequent word."""
    tokenized = [tokenize(c) for c in captions]
    words = []
    for t in range(median_length(captions)):
        counts = Counter(tokens[t] for tokens in tokenized if len(tokens) > t)
        words.append(min(counts, key=lambda w: (-counts[w], w)))
    return " ".join(words)


def median_length(captions: Sequence[str]) -> int:
    """The median number of words of ``captions`` (the lower median)."""
    lengths = sorted(len(tokenize(c)) for c in captions)
    return lengths[(len(lengths) - 1) // 2]
