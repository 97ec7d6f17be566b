"""Text classification: the bundled ``text_topics`` sentences and a user's ``text_csv``.

Batches hold ``tokens`` (int64 N x ``max_length`` word ids, 0 = ``<pad>`` after the text, 1 =
``<unk>``; longer texts keep their first ``max_length`` tokens), ``label`` and ``index`` (int64 N).
Text is lower-cased and split into words, numbers and single punctuation marks (:func:`tokenize`).
The vocabulary is built from the training split of every class, before a class subset is taken, so
the A and B tasks of a transfer study share token ids and a copied embedding means the same words.
The target's ``in_channels`` is the vocabulary size (``<pad>`` and ``<unk>`` included): the number
of channels of one-hot tokens, which is what a text backbone's embedding reads; ``image_size`` is
(1, ``max_length``) and ``input_key`` is "tokens".
"""

from __future__ import annotations

import csv
import io
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from transferlab.registry import TASKS
from transferlab.tasks.base import SPLITS, ClassificationTask, TargetSpec, stable_hash
from transferlab.tasks.folders import _listed  # up to 10 problems, one per line, and a count
from transferlab.tasks.splits import (
    check_choice,
    check_classes,
    check_fraction,
    check_int,
    check_split,
    select_classes,
    stratified_split,
)

PAD, UNK = "<pad>", "<unk>"
TOKEN = re.compile(r"[^\W_]+(?:'[^\W_]+)*|\S")  # words (with inner apostrophes), else one character


def tokenize(text: str) -> list[str]:
    """Lower-cased words, numbers and punctuation marks of ``text``."""
    return TOKEN.findall(text.lower())


@dataclass(frozen=True)
class Vocabulary:
    """Token strings by id: 0 ``<pad>``, 1 ``<unk>``, then by falling count (ties alphabetical)."""

    tokens: tuple[str, ...]

    @classmethod
    def build(cls, texts: Sequence[Sequence[str]], min_count: int) -> Vocabulary:
        counts = Counter(token for text in texts for token in text)
        kept = sorted((t for t, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t))
        return cls((PAD, UNK, *kept))

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, texts: Sequence[Sequence[str]], max_length: int) -> torch.Tensor:
        """int64 N x ``max_length`` ids, unknown tokens as ``<unk>``, padded with ``<pad>``."""
        index = {token: i for i, token in enumerate(self.tokens)}
        out = torch.zeros(len(texts), max_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [index.get(token, 1) for token in text[:max_length]]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


class TextTask(ClassificationTask):
    """Label classification of tokenised texts; the data come from :func:`text_topics` or :func:`text_csv`.

    Args:
        name: The task's registry name.
        texts: Every sample's tokens, all splits together.
        labels: Every sample's class index (int64), into ``class_names``.
        split_index: Indices into ``texts`` of each split.
        class_names: Names of all classes, before a subset is taken.
        classes: The class subset (None = all).
        max_length: Tokens per sample after truncation and padding.
        min_count: Training-split occurrences a token needs to enter the vocabulary.
        options: The factory options, for ``describe``.
        content: A hash of the source data, for ``fingerprint``.
    """

    def __init__(
        self,
        *,
        name: str,
        texts: Sequence[Sequence[str]],
        labels: np.ndarray,
        split_index: dict[str, np.ndarray],
        class_names: tuple[str, ...],
        classes: tuple[int, ...] | None,
        max_length: int,
        min_count: int,
        options: dict[str, Any],
        content: str,
    ) -> None:
        self.name = name
        self.classes = classes
        self.vocabulary = Vocabulary.build([texts[i] for i in split_index["train"]], min_count)
        self.truncated = sum(len(t) > max_length for t in texts)
        self._options, self._content = options, content
        picked = classes if classes is not None else range(len(class_names))
        self.target = TargetSpec(
            kind="label",
            num_classes=len(picked),
            in_channels=len(self.vocabulary),
            image_size=(1, max_length),
            class_names=tuple(class_names[c] for c in picked),
            input_key="tokens",
        )
        tokens = self.vocabulary.encode(texts, max_length)
        labels_t = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self._datasets = {}
        for split in SPLITS:
            rows = torch.from_numpy(np.asarray(split_index[split], dtype=np.int64))
            fields = {"tokens": tokens[rows], "label": labels_t[rows], "index": rows}
            self._datasets[split] = select_classes(fields, None, classes, len(class_names))

    def options(self) -> dict[str, Any]:
        """The factory options this task was built with."""
        return dict(self._options)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "options": self.options(),
            "classes": list(self.target.class_names),
            "vocabulary": {"size": len(self.vocabulary), "hash": stable_hash(list(self.vocabulary.tokens))},
            "truncated_texts": self.truncated,
        }

    def fingerprint(self) -> str:
        """Hash of the options, the vocabulary, the source data and every split's samples."""
        described = self.describe()
        described["options"] = {k: v for k, v in described["options"].items() if k != "path"}
        splits = {
            split: [stable_hash(self._datasets[split].tensors[f]) for f in ("index", "label", "tokens")]
            for split in SPLITS
        }
        return stable_hash({"describe": described, "content": self._content, "splits": splits})

    def dataset(self, split: str) -> Dataset:
        """``InMemoryDataset`` with ``tokens`` (int64 N x max_length), ``label`` and ``index`` (int64 N).

        ``index`` is the sample's number among all generated sentences (train, then val, then
        test), or its data row in the CSV file (0 = the first row after the header).
        """
        check_split(self.name, split)
        return self._datasets[split]


# -- text_topics: sentences from a small grammar -------------------------------------------------------
TOPICS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    # topic: (subjects, verbs, objects, places)
    "sports": (
        ("the team", "the coach", "the striker", "our goalkeeper", "the players", "the captain"),
        ("won", "lost", "played", "scored in", "trained for", "celebrated"),
        ("the match", "the final", "the league", "the tournament", "the derby", "the championship"),
        ("at the stadium", "on the pitch", "in extra time", "after halftime"),
    ),
    "science": (
        ("the researchers", "the chemist", "a physicist", "the lab", "our professor", "the biologist"),
        ("measured", "published", "tested", "discovered", "analysed", "recorded"),
        ("the experiment", "the molecule", "a new particle", "the hypothesis", "the genome", "the data"),
        ("in the laboratory", "under the microscope", "at the observatory", "in the journal"),
    ),
    "food": (
        ("the chef", "my grandmother", "the bakery", "the waiter", "our cook", "the restaurant"),
        ("baked", "cooked", "served", "tasted", "tested", "grilled"),
        ("the bread", "a spicy curry", "the pasta", "fresh salad", "the soup", "a chocolate cake"),
        ("in the kitchen", "at dinner", "for lunch", "at the market"),
    ),
    "travel": (
        ("the tourists", "our guide", "the pilot", "my sister", "the backpackers", "the crew"),
        ("visited", "booked", "explored", "flew to", "toured", "hiked across"),
        ("the old town", "a beach resort", "the museum", "the islands", "the mountains", "the capital"),
        ("by train", "on holiday", "at the airport", "with a map"),
    ),
    "music": (
        ("the band", "the orchestra", "the singer", "our drummer", "the pianist", "the choir"),
        ("performed", "recorded", "rehearsed", "composed", "played", "released"),
        ("the album", "a new song", "the symphony", "the concert", "the melody", "the chorus"),
        ("on stage", "in the studio", "at the festival", "on the radio"),
    ),
    "weather": (
        ("the forecast", "the storm", "a cold front", "the meteorologist", "the wind", "heavy rain"),
        ("hit", "flooded", "warned about", "cooled", "swept through", "visited"),
        ("the coast", "the valley", "the snowfall", "the heatwave", "the thunder", "the temperature"),
        ("overnight", "in the north", "this morning", "across the region"),
    ),
}
TOPIC_NAMES = tuple(TOPICS)
SENTIMENT_NAMES = ("negative", "positive")
TIMES = ("yesterday", "last week", "on sunday", "today", "this year", "recently")
# Words of no topic, and verbs of two topics ("played", "recorded", "tested", "visited"), make some
# sentences hard or ambiguous: a bag of words does not reach 100%.
GENERIC_SUBJECTS = ("my friend", "everyone", "the students", "they", "our neighbours", "the family")
GENERIC_OBJECTS = ("it", "everything", "the event", "the plan")
CONNECTIVES = ("after", "before", "while", "because")
POSITIVE = ("great", "wonderful", "fantastic", "delightful", "excellent", "fun")
NEGATIVE = ("terrible", "awful", "boring", "disappointing", "dreadful", "bad")
CHUNK = 256  # sentences per random stream, so that splits of different sizes share a prefix
GRAMMAR_VERSION = 1


def _clause(rng: random.Random, topic: str, generic: float) -> str:
    subjects, verbs, objects, places = TOPICS[topic]
    subject = rng.choice(GENERIC_SUBJECTS if rng.random() < generic else subjects)
    words = [subject, rng.choice(verbs), rng.choice(GENERIC_OBJECTS if rng.random() < generic else objects)]
    if rng.random() < 0.4:
        words.append(rng.choice(places))
    return " ".join(words)


def _sentence(rng: random.Random, topic: str, positive: bool, distractor: float) -> str:
    """Main clause of ``topic``, maybe a subordinate clause of another topic, then a sentiment clause."""
    main = _clause(rng, topic, generic=0.4)
    if rng.random() < 0.3:
        main = f"{rng.choice(TIMES)} {main}"
    if rng.random() < distractor:  # words of another topic, in a clause the label does not follow
        other = rng.choice([t for t in TOPIC_NAMES if t != topic])
        sub = f"{rng.choice(CONNECTIVES)} {_clause(rng, other, generic=0.0)}"
        main = f"{sub} , {main}" if rng.random() < 0.5 else f"{main} {sub}"
    # "not great" is negative and "expected it to be great , but it was bad" too: the sentiment
    # needs word pairs and order, not words alone.
    negated, form = rng.random() < 0.3, rng.random()
    adjective = rng.choice(POSITIVE if positive != negated else NEGATIVE)
    if form < 0.25:
        expected = rng.choice(NEGATIVE if positive else POSITIVE)
        feeling = f"; i expected it to be {expected} , but it was {'not ' if negated else ''}{adjective}"
    elif form < 0.6:
        feeling = f"and it was {'not ' if negated else ''}{adjective}"
    else:
        feeling = f", which {'was not' if negated else 'was'} {adjective}"
    return f"{main} {feeling}"


def generate_sentences(
    size: int, seed: int, split_code: int, distractor: float
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``size`` sentences with their topic and sentiment labels (int64), deterministic by the seeds."""
    texts, topics, sentiments = [], np.empty(size, np.int64), np.empty(size, np.int64)
    for lo in range(0, size, CHUNK):
        state = np.random.SeedSequence([seed, split_code, lo // CHUNK]).generate_state(1)[0]
        rng = random.Random(int(state))
        for i in range(lo, min(lo + CHUNK, size)):
            topics[i], sentiments[i] = rng.randrange(len(TOPIC_NAMES)), rng.randrange(2)
            texts.append(_sentence(rng, TOPIC_NAMES[topics[i]], bool(sentiments[i]), distractor))
    return texts, topics, sentiments


@TASKS.register("text_topics")
def text_topics(
    *,
    classes: Sequence[int] | None = None,
    label: str = "topic",
    train_size: int = 1800,
    val_size: int = 300,
    test_size: int = 600,
    seed: int = 0,
    max_length: int = 40,
    min_count: int = 1,
    distractor: float = 0.5,
) -> TextTask:
    """Synthetic sentences from a small grammar, labelled by topic (6) or sentiment (2).

    A sentence is a main clause of its topic (sports, science, food, travel, music, weather), with
    probability ``distractor`` a subordinate clause of another topic before or after it, and a
    sentiment clause ("and it was not great"); negation flips the sentiment.

    Args:
        classes: Class indices to keep, in label order; labels are renumbered. ``None`` keeps all.
        label: "topic" or "sentiment" (0 negative, 1 positive).
        train_size: Sentences generated for the training split (before a class subset is taken).
        val_size: Sentences generated for the validation split.
        test_size: Sentences generated for the test split.
        seed: Generator seed; each split and each chunk of 256 sentences has its own stream.
        max_length: Tokens per sentence (the longest sentences have about 35).
        min_count: Training occurrences a word needs to enter the vocabulary.
        distractor: Probability of a clause of another topic, in [0, 1].
    """
    label = check_choice("text_topics", "label", label, ("topic", "sentiment"))
    names = TOPIC_NAMES if label == "topic" else SENTIMENT_NAMES
    sizes = {
        s: check_int("text_topics", f"{s}_size", v, minimum=1)
        for s, v in zip(SPLITS, (train_size, val_size, test_size), strict=True)
    }
    seed = check_int("text_topics", "seed", seed, minimum=0, maximum=2**32 - 1)
    if isinstance(distractor, bool) or not isinstance(distractor, (int, float)) or not 0 <= distractor <= 1:
        raise ValueError(f"text_topics: distractor must be a probability in [0, 1], got {distractor!r}")
    texts: list[str] = []
    labels, split_index = [], {}
    for code, split in enumerate(SPLITS):
        generated, topics, sentiments = generate_sentences(sizes[split], seed, code, float(distractor))
        split_index[split] = np.arange(len(texts), len(texts) + len(generated))
        texts += generated
        labels.append(topics if label == "topic" else sentiments)
    picked = check_classes("text_topics", classes, names)
    options = {
        "classes": list(picked) if picked is not None else None,
        "label": label,
        **{f"{s}_size": n for s, n in sizes.items()},
        "seed": seed,
        "max_length": check_int("text_topics", "max_length", max_length, minimum=1),
        "min_count": check_int("text_topics", "min_count", min_count, minimum=1),
        "distractor": float(distractor),
    }
    return TextTask(
        name="text_topics",
        texts=[tokenize(t) for t in texts],
        labels=np.concatenate(labels),
        split_index=split_index,
        class_names=names,
        classes=picked,
        max_length=options["max_length"],
        min_count=options["min_count"],
        options=options,
        content=stable_hash({"grammar": GRAMMAR_VERSION}),
    )


# -- text_csv: a user's CSV file ------------------------------------------------------------------------
CSV_NAME = "text_csv"
DEFAULT_FRACTIONS = {"val_fraction": 0.15, "test_fraction": 0.25}


class TextCSVError(ValueError):
    """The CSV file cannot be used as it is; the message names the file (and line) and the fix."""

    def __init__(self, message: str) -> None:
        # Idempotent, so that a copy unpickled from a Ray worker reads the same.
        super().__init__(message if message.startswith(f"{CSV_NAME}: ") else f"{CSV_NAME}: {message}")


def _decode(path: Path) -> tuple[str, bytes]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TextCSVError(f"cannot read '{path}': {exc.strerror or exc}") from None
    if not data.strip():
        raise TextCSVError(
            f"'{path}' is empty; expected a header line naming the columns, then one row per text"
        )
    try:
        return data.decode("utf-8-sig"), data
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise TextCSVError(
            f"{path}:{line}: not UTF-8 text ({exc.reason} at byte {exc.start}); save the file as UTF-8"
        ) from None


def read_text_csv(path: Path, text_column: str, label_column: str) -> tuple[list[str], list[str], bytes]:
    """The (texts, labels, raw bytes) of every data row; every bad row is an error naming its line.

    Raises:
        TextCSVError: unreadable, empty or non-UTF-8 file, a missing column, or rows that have the
            wrong number of fields, are blank, or have an empty text or label (all listed at once).
    """
    content, data = _decode(path)
    reader = csv.reader(io.StringIO(content, newline=""), strict=True)
    texts, labels, problems = [], [], []
    try:
        header = next(reader)
        columns = {}
        for wanted in (text_column, label_column):
            if header.count(wanted) != 1:
                found = ", ".join(repr(h) for h in header)
                issue = "is missing" if wanted not in header else "appears more than once"
                raise TextCSVError(f"{path}:1: column {wanted!r} {issue} in the header (columns: {found})")
            columns[wanted] = header.index(wanted)
        line = reader.line_num + 1
        for row in reader:
            if not row:
                problems.append(f"{path}:{line}: blank line; delete it")
            elif len(row) != len(header):
                problems.append(f"{path}:{line}: {len(row)} fields, but the header has {len(header)}")
            elif not tokenize(row[columns[text_column]]):
                problems.append(f"{path}:{line}: empty text in column {text_column!r}")
            elif not row[columns[label_column]].strip():
                problems.append(f"{path}:{line}: empty label in column {label_column!r}")
            else:
                texts.append(row[columns[text_column]])
                labels.append(row[columns[label_column]].strip())
            line = reader.line_num + 1
    except csv.Error as exc:
        raise TextCSVError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None
    if problems:
        raise TextCSVError(f"{len(problems)} row(s) cannot be used; fix or delete them:\n{_listed(problems)}")
    if not texts:
        raise TextCSVError(f"'{path}' has a header but no data rows")
    return texts, labels, data


def _csv_split(path: Path, labels: np.ndarray, names: tuple[str, ...], fractions: dict, seed: int) -> dict:
    counts = np.bincount(labels, minlength=len(names))
    if len(names) < 2:
        raise TextCSVError(f"'{path}' has only one label ({names[0]!r}); a classifier needs at least 2")
    few = [f"{n!r}: {c} row(s)" for n, c in zip(names, counts, strict=True) if c < len(SPLITS)]
    if few:
        raise TextCSVError(
            f"every label needs at least 3 rows in '{path}', one for each of train, val and test; "
            f"these have fewer:\n{_listed(few)}"
        )
    try:
        return stratified_split(CSV_NAME, labels, **fractions, seed=seed)
    except ValueError as exc:
        raise TextCSVError(f"{str(exc).removeprefix(f'{CSV_NAME}: ')} (in '{path}'); add rows") from None


@TASKS.register(CSV_NAME)
def text_csv(
    *,
    path: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    classes: Sequence[int] | None = None,
    max_length: int = 64,
    min_count: int = 1,
    val_fraction: float = DEFAULT_FRACTIONS["val_fraction"],
    test_fraction: float = DEFAULT_FRACTIONS["test_fraction"],
    split_seed: int = 0,
) -> TextTask:
    """Your own texts: a UTF-8 CSV file with a header, one text and one label per row.

    Classes are the distinct labels sorted as strings (label i = i-th name). Every row must have
    the header's number of fields, a non-empty text and a non-empty label; any other row is an
    error naming the file and line (all at once), nothing is skipped.

    Args:
        path: The CSV file. Required.
        text_column: Header name of the text column.
        label_column: Header name of the label column.
        classes: Class indices to keep (into the sorted labels); ``None`` keeps all.
        max_length: Tokens per text; longer texts keep their first ``max_length`` tokens.
        min_count: Training occurrences a token needs to enter the vocabulary (rarer ones: ``<unk>``).
        val_fraction: Share of the rows in the validation split, in (0, 0.5).
        test_fraction: Share of the rows in the test split, in (0, 0.5).
        split_seed: ``random_state`` of the stratified split (made over every class).
    """
    if path is None or not str(path).strip():
        raise TextCSVError("path is required: the CSV file with a header and one text and label per row")
    fractions = {
        "val_fraction": check_fraction(CSV_NAME, "val_fraction", val_fraction),
        "test_fraction": check_fraction(CSV_NAME, "test_fraction", test_fraction),
    }
    split_seed = check_int(CSV_NAME, "split_seed", split_seed, minimum=0, maximum=2**32 - 1)
    max_length = check_int(CSV_NAME, "max_length", max_length, minimum=1)
    min_count = check_int(CSV_NAME, "min_count", min_count, minimum=1)
    file = Path(path).expanduser()
    texts, label_strings, data = read_text_csv(file, text_column, label_column)
    names = tuple(sorted(set(label_strings)))
    number = {name: i for i, name in enumerate(names)}
    labels = np.asarray([number[s] for s in label_strings], dtype=np.int64)
    picked = check_classes(CSV_NAME, classes, names)
    options = {
        "path": str(file),
        "text_column": text_column,
        "label_column": label_column,
        "classes": list(picked) if picked is not None else None,
        "max_length": max_length,
        "min_count": min_count,
        **fractions,
        "split_seed": split_seed,
    }
    return TextTask(
        name=CSV_NAME,
        texts=[tokenize(t) for t in texts],
        labels=labels,
        split_index=_csv_split(file, labels, names, fractions, split_seed),
        class_names=names,
        classes=picked,
        max_length=max_length,
        min_count=min_count,
        options=options,
        content=stable_hash(data),
    )
