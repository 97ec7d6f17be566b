"""Captioning: the shapes caption target, its objective, the ``caption`` head, caption_csv, samples.

The head is checked on every kind of 2-D backbone at 32 px (convnet, LeNet-5, timm ResNet-18, CIFAR
ResNet-20, VGG-11) and on the 1-D ``textcnn``; beam search against greedy decoding on a hand-made
decoder; a short training run must beat fixed captions made of the most frequent words.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchmetrics.text import BLEUScore

from transferlab.engine.assembly import build_backbone, build_head, build_model, build_task
from transferlab.engine.caption_samples import caption_samples
from transferlab.engine.fit import FitConfig, fit
from transferlab.engine.model import TransferModel
from transferlab.heads.caption import CaptionHead
from transferlab.registry import HEADS, TASKS
from transferlab.service.spec import validate_spec_text
from transferlab.service.spec_yaml import SpecError
from transferlab.tasks import captioning
from transferlab.tasks.base import SPLITS, TargetSpec, Task
from transferlab.tasks.caption_csv import CaptionCSVError
from transferlab.tasks.captioning import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SPECIALS,
    UNK_ID,
    CaptionObjective,
    frequent_words_caption,
    positional_caption,
    tokenize,
)

SIZE = 32
BACKBONES = ["convnet", "lenet5", "resnet18", "resnet20", "vgg11"]
SMALL = {"target": "caption", "train_size": 48, "val_size": 16, "test_size": 16}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def caption_task() -> Task:
    return build_task("shapes", SMALL)


def scores(objective: CaptionObjective, predicted: list[str], batch: dict) -> dict[str, float]:
    metrics = objective.metrics()
    pred = objective.encode(predicted)[:, 1:]  # ids without <bos>, as a head decodes them
    objective.update_metrics(metrics, {"caption_pred": pred}, batch)
    return {name: float(m.compute()) for name, m in metrics.items()}


# -- vocabulary and tokens --------------------------------------------------------------------------
def test_shapes_vocabulary_covers_every_caption(caption_task: Task) -> None:
    target = caption_task.target
    assert target.kind == "caption" and target.vocabulary[:4] == SPECIALS
    assert target.max_length == 25  # "<np> at the <v h> to the right of <np> and <np> at the <v h>"
    assert {"circle", "magenta", "medium", "above", "right", "centre", "and"} <= set(target.vocabulary)
    for split in SPLITS:
        data = caption_task.dataset(split)
        tokens = data.tensors["caption_tokens"]
        assert tokens.dtype == torch.long and tokens.shape == (len(data), target.max_length + 2)
        assert not bool((tokens == UNK_ID).any())  # every word of the grammar is in the vocabulary
        assert bool((tokens[:, 0] == BOS_ID).all())
        assert caption_task.objective.decode(tokens) == data.extras["caption"]
    longest = "a large magenta triangle at the top right to the right of a small white star and a " + (
        "medium cyan cross at the bottom left"
    )
    assert len(tokenize(longest)) == target.max_length
    assert not bool((caption_task.objective.encode([longest]) == UNK_ID).any())


def test_user_vocabulary_round_trip_and_unknown_words() -> None:
    objective = CaptionObjective.for_captions(["A red Dog runs", "a red cat", "a dog"], min_count=2)
    assert objective.vocabulary == (*SPECIALS, "a", "dog", "red")  # by count, then A-Z
    assert objective.max_length == 4
    tokens = objective.encode(["a red cat", "A dog runs far away now"])
    a, dog, red = 4, 5, 6
    assert tokens.tolist() == [
        [BOS_ID, a, red, UNK_ID, EOS_ID, PAD_ID],
        [BOS_ID, a, dog, UNK_ID, UNK_ID, EOS_ID],  # cut to max_length words
    ]
    assert objective.decode(tokens) == ["a red <unk>", "a dog <unk> <unk>"]
    assert objective.decode([[a, EOS_ID, dog], [dog, PAD_ID, red]]) == ["a", "dog"]
    with pytest.raises(ValueError, match="no caption may be empty"):
        CaptionObjective.for_captions(["a dog", "  "])


def test_shapes_caption_target_is_deterministic_by_seed(caption_task: Task) -> None:
    again = build_task("shapes", SMALL)
    other = build_task("shapes", {**SMALL, "seed": 1})
    first = caption_task.dataset("train")
    assert torch.equal(first.tensors["caption_tokens"], again.dataset("train").tensors["caption_tokens"])
    assert first.extras["caption"] == again.dataset("train").extras["caption"]
    assert first.extras["caption"] != other.dataset("train").extras["caption"]
    assert caption_task.target == again.target == other.target  # the vocabulary does not depend on data


# -- loss and metrics -------------------------------------------------------------------------------
def test_bleu_and_exact_match_on_known_cases() -> None:
    objective = CaptionObjective.for_captions(["a b c d e f"])
    perfect = scores(objective, ["a b c d e", "b c d e f"], {"caption": ["a b c d e", "B c d  e f"]})
    assert perfect == {f"bleu{n}": pytest.approx(1.0) for n in range(1, 5)} | {"exact_match": 1.0}
    # "a b c d e" against "a b c d f": n-gram precisions 4/5, 3/4, 2/3, 1/2; same length, no penalty.
    one = scores(objective, ["a b c d e"], {"caption": ["a b c d f"]})
    assert one["bleu1"] == pytest.approx(0.8)
    assert one["bleu2"] == pytest.approx((0.8 * 0.75) ** 0.5)
    assert one["bleu4"] == pytest.approx((0.8 * 0.75 * 2 / 3 * 0.5) ** 0.25)
    assert one["exact_match"] == 0.0
    reference = float(BLEUScore(n_gram=4)(["a b c d e"], [["a b c d f"]]))
    assert one["bleu4"] == pytest.approx(reference)
    # Several references: the closest counts, and exact match accepts any of them.
    multi = scores(objective, ["a b c d e"], {"caption": ["x"], "references": [["a b c d f", "a b c d e"]]})
    assert multi["bleu4"] == pytest.approx(1.0) and multi["exact_match"] == 1.0
    assert objective.primary_metric == "bleu4" and objective.higher_is_better


def test_metrics_keep_ids_per_batch_and_decode_once(monkeypatch: pytest.MonkeyPatch) -> None:
    objective = CaptionObjective.for_captions(["a b c d e f", "b c d x"])
    batches = [
        (["a b c d e", "b c d"], {"caption": ["a b c d f", "b c d x"]}),
        (["a b", "x d c b"], {"caption": ["a b", "b c d"], "references": [["a b"], ["b c d", "x d c b"]]}),
    ]
    decoded: list[int] = []
    real = captioning.decode
    monkeypatch.setattr(captioning, "decode", lambda ids, vocab: decoded.append(len(ids)) or real(ids, vocab))
    metrics = objective.metrics()
    for predicted, batch in batches:
        pred = objective.encode(predicted)[:, 1:]
        objective.update_metrics(metrics, {"caption_pred": pred}, batch)
    assert decoded == []  # a training step neither decodes nor moves ids to the host
    values = {name: float(m.compute()) for name, m in metrics.items()}
    assert decoded and sum(decoded) == 4 * len(metrics)  # each metric decodes the split's 4 captions once
    # The same numbers as torchmetrics' BLEUScore fed batch by batch (what val/test reported before).
    for n in range(1, 5):
        bleu = BLEUScore(n_gram=n)
        for predicted, batch in batches:
            bleu.update(predicted, captioning.caption_references(batch))
        assert values[f"bleu{n}"] == pytest.approx(float(bleu.compute()), abs=1e-7)
    assert values["exact_match"] == 0.5  # "a b" and "x d c b" match a reference
    metrics["bleu4"].reset()
    with pytest.warns(UserWarning, match="called before the ``update`` method"):
        assert float(metrics["bleu4"].to("cpu").compute()) == 0.0 and metrics["bleu4"].references == []


def test_loss_ignores_padding() -> None:
    objective = CaptionObjective.for_captions(["a b c", "a"])
    tokens = objective.encode(["a b c", "a"])  # the second row is padded after <eos>
    target = tokens[:, 1:]
    logits = torch.nn.functional.one_hot(target, len(objective.vocabulary)).float() * 20.0
    batch = {"caption_tokens": tokens}
    assert float(objective.loss({"caption_logits": logits}, batch)) < 1e-6
    noisy = logits.clone()
    noisy[target == PAD_ID] = torch.randn_like(noisy[target == PAD_ID]) * 50  # only padded positions
    assert float(objective.loss({"caption_logits": noisy}, batch)) < 1e-6
    wrong = logits.clone()
    wrong[0, 0] = wrong[0, 0].roll(1)  # one real position wrong
    assert float(objective.loss({"caption_logits": wrong}, batch)) > 1.0
    with pytest.raises(ValueError, match=r"caption_logits of shape \(2, 3, 7\) do not fit caption_tokens"):
        objective.loss({"caption_logits": logits[:, :3]}, batch)


# -- the head over backbones ------------------------------------------------------------------------
@pytest.fixture(scope="module", params=BACKBONES)
def backbone_name(request: pytest.FixtureRequest) -> str:
    return request.param


def test_head_on_2d_backbones(backbone_name: str, caption_task: Task) -> None:
    torch.manual_seed(0)
    target = caption_task.target
    backbone = build_backbone(backbone_name, {}, target)
    options = {"hidden": 32, "embed_dim": 16}
    if backbone_name in ("resnet20", "lenet5"):
        options.update(cell="lstm", attention=True, decode="beam")
    model = TransferModel(backbone, build_head("caption", options, backbone.feature_info, target))
    batch = caption_task.dataset("train").batch(torch.arange(4))
    steps, vocab = target.max_length + 1, len(target.vocabulary)
    outputs = model.train()(batch)
    assert outputs["caption_logits"].shape == (4, steps, vocab)
    assert outputs["caption_pred"].shape == (4, steps)
    loss = caption_task.loss(outputs, batch)
    loss.backward()
    grads = [p.grad for p in model.head.parameters()]
    assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)
    model.eval()
    with torch.no_grad():
        outputs = model(batch)
        alone = model.head(model.forward_features(batch["image"][:1]), {})  # the spec check's call
    assert outputs["caption_logits"].shape == (4, steps, vocab)
    pred = outputs["caption_pred"]
    assert pred.shape == (4, steps) and pred.dtype == torch.long
    assert bool(((pred == EOS_ID).sum(1) == 1).all())  # every caption ends, exactly once
    assert not bool(((pred == BOS_ID) | (pred >= vocab)).any())
    assert set(alone) == {"caption_pred"} and alone["caption_pred"].shape == (1, steps)
    metrics = caption_task.metrics()
    caption_task.update_metrics(metrics, outputs, batch)
    assert set(metrics) == {"bleu1", "bleu2", "bleu3", "bleu4", "exact_match"}


def test_head_on_a_1d_backbone() -> None:
    objective = CaptionObjective.for_captions(["a red dog", "a blue cat runs"])
    target = TargetSpec(
        kind="caption",
        in_channels=20,
        image_size=(1, 12),
        input_key="tokens",
        vocabulary=objective.vocabulary,
        max_length=objective.max_length,
    )
    torch.manual_seed(0)
    backbone = build_backbone("textcnn", {"embed_dim": 8, "filters": [4, 4], "kernel_sizes": [2, 3]}, target)
    for options in ({}, {"attention": True, "cell": "lstm", "decode": "beam"}):
        head = build_head("caption", {"hidden": 16, **options}, backbone.feature_info, target)
        model = TransferModel(backbone, head, input_key="tokens").eval()
        batch = {"tokens": torch.randint(1, 20, (3, 12)), "caption_tokens": objective.encode(["a"] * 3)}
        with torch.no_grad():
            outputs = model(batch)
        assert model.forward_features(batch["tokens"])[-1].ndim == 3  # N x C x L
        assert outputs["caption_logits"].shape == (3, 5, len(objective.vocabulary))
        assert outputs["caption_pred"].shape == (3, 5)


@pytest.mark.parametrize("options", [{}, {"cell": "lstm", "attention": True}], ids=["gru", "lstm-attention"])
def test_decoding_agrees_with_teacher_forcing_and_beam_of_one_is_greedy(
    caption_task: Task, options: dict
) -> None:
    torch.manual_seed(1)
    target = caption_task.target
    backbone = build_backbone("convnet", {"widths": [8, 16, 16]}, target)
    head = build_head("caption", {"hidden": 32, "embed_dim": 16, **options}, backbone.feature_info, target)
    assert isinstance(head, CaptionHead)
    model = TransferModel(backbone, head).eval()
    with torch.no_grad():
        features = model.forward_features(caption_task.dataset("val").batch(torch.arange(6))["image"])
        greedy = head.generate(features, "greedy")
        assert torch.equal(head.generate(features, "beam", 1), greedy)
        # Fed back in, each decoded word is again the most likely next word.
        inputs = torch.cat([torch.full_like(greedy[:, :1], BOS_ID), greedy[:, :-1]], dim=1)
        logits = head.teacher_forced(head.start(features), inputs)
        again = head.log_probs(logits, last=False).argmax(-1)
        real = (greedy != PAD_ID) & (torch.arange(greedy.shape[1]) < target.max_length)
        assert torch.equal(again[real], greedy[real])
        assert head.sequence_log_prob(features, greedy).shape == (6,)


class TableDecoder(CaptionHead):
    """A decoder whose next-word scores depend only on the previous word (a fixed table)."""

    def __init__(self, table: torch.Tensor, max_length: int) -> None:
        super().__init__(4, table.shape[0], max_length, hidden=4)
        self.table = table

    def step(self, tokens, state, memory, keys):  # noqa: ANN001, ANN201 - the parent's signature
        return self.table[tokens], state


def test_beam_search_beats_a_myopic_greedy_choice() -> None:
    w1, w2, w3, w4 = 4, 5, 6, 7
    probs = torch.full((8, 8), 1e-9)
    probs[BOS_ID, [w1, w2]] = torch.tensor([0.6, 0.4])  # greedy takes w1 ...
    probs[w1, [EOS_ID, w3, w4]] = torch.tensor([0.2, 0.45, 0.35])  # ... whose continuations are all poor
    probs[w2, [EOS_ID, w3]] = torch.tensor([0.9, 0.1])  # "w2" is the likeliest: 0.36 against 0.6 * 0.45
    probs[w3, EOS_ID] = probs[w4, EOS_ID] = 1.0
    table = probs.log()
    head = TableDecoder(table, max_length=4).eval()
    features = [torch.zeros(2, 4, 2, 2)]

    def log_prob(ids: torch.Tensor) -> float:
        previous = [BOS_ID, *ids.tolist()]
        return sum(
            float(head.log_probs(table[p], last=False)[t])
            for p, t in zip(previous, ids.tolist(), strict=False)  # previous has one more
            if t != PAD_ID
        )

    greedy, beam = head.generate(features, "greedy")[0], head.generate(features, "beam", 2)[0]
    assert greedy.tolist()[:3] == [w1, w3, EOS_ID] and beam.tolist()[:2] == [w2, EOS_ID]
    assert log_prob(beam) > log_prob(greedy)
    assert log_prob(beam) == pytest.approx(float(np.log(0.4 * 0.9)), abs=1e-4)
    assert torch.equal(head.generate(features, "beam", 1)[0], greedy)


@pytest.mark.parametrize("options", [{}, {"cell": "lstm", "attention": True}], ids=["gru", "lstm-attention"])
def test_batched_beam_search_equals_image_by_image_and_is_at_least_greedy(
    caption_task: Task, options: dict
) -> None:
    # Beam search is a heuristic: it may prune the greedy caption's prefix and end lower (an untrained
    # GRU seeded with 2 does, see docs/captioning.md), so ">= greedy" is checked on decoders where it
    # holds; what must hold everywhere is that the batched search equals the one-image search.
    torch.manual_seed(1)
    target = caption_task.target
    backbone = build_backbone("convnet", {"widths": [8, 16, 16]}, target)
    head = build_head("caption", {"hidden": 32, "embed_dim": 16, **options}, backbone.feature_info, target)
    assert isinstance(head, CaptionHead)
    model = TransferModel(backbone, head).eval()
    with torch.no_grad():
        features = model.forward_features(caption_task.dataset("val").batch(torch.arange(4))["image"])
        beam, greedy = head.generate(features, "beam", 3), head.generate(features, "greedy")
        alone = torch.cat([head.generate([f[i : i + 1] for f in features], "beam", 3) for i in range(4)])
        beam_logp, greedy_logp = (
            head.sequence_log_prob(features, beam),
            head.sequence_log_prob(features, greedy),
        )
    assert torch.equal(beam, alone)  # the other images in the N*B batch change nothing
    assert bool((beam_logp >= greedy_logp - 1e-5).all()), (beam_logp, greedy_logp)
    assert not torch.equal(beam, greedy) and bool((beam_logp > greedy_logp + 1e-3).any())  # not trivial


def test_head_options_and_targets_are_checked(caption_task: Task) -> None:
    info = build_backbone("convnet", {"widths": [8, 16]}, caption_task.target).feature_info
    with pytest.raises(
        ValueError, match="head 'caption' predicts caption targets, but the task provides 'label'"
    ):
        build_head("caption", {}, info, build_task("shapes", {**SMALL, "target": "label"}).target)
    for options, message in [
        ({"cell": "rnn"}, r"cell must be one of \['gru', 'lstm'\], got 'rnn'"),
        ({"decode": "sample"}, r"decode must be one of \['greedy', 'beam'\], got 'sample'"),
        ({"beam_size": 0}, "beam_size must be >= 1, got 0"),
        ({"hidden": 2.5}, r"head 'caption': hidden must be an integer >= 1, got 2.5"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
        ({"length_penalty": -1}, "length_penalty must be a number >= 0, got -1"),
    ]:
        with pytest.raises(ValueError, match=message):
            build_head("caption", options, info, caption_task.target)
    assert (
        HEADS.entry("caption").source == "transferlab" and TASKS.entry("caption_csv").source == "transferlab"
    )


def test_spec_with_a_caption_head_on_a_mask_target_is_rejected() -> None:
    spec = """
name: wrong-target
study: single
backbone: {name: convnet, widths: [8, 16]}
head: {name: caption, hidden: 16}
task: {name: shapes, target: mask, train_size: 16, val_size: 8, test_size: 8}
"""
    with pytest.raises(
        SpecError, match="head 'caption' predicts caption targets, but the task provides 'mask'"
    ):
        validate_spec_text(spec)
    validated = validate_spec_text(spec.replace("target: mask", "target: caption"))
    assert validated.primary_metric == "bleu4" and validated.higher_is_better


# -- training ---------------------------------------------------------------------------------------
def test_short_training_beats_the_most_frequent_words() -> None:
    task = build_task(
        "shapes", {"target": "caption", "train_size": 1024, "val_size": 128, "test_size": 8, "seed": 3}
    )
    torch.manual_seed(0)
    head = ("caption", {"attention": True, "hidden": 128, "embed_dim": 32})
    model = build_model(("convnet", {"widths": [16, 32, 64, 64]}), head, task)
    config = FitConfig(epochs=3, batch_size=16, optimizer="adamw", lr=0.004, weight_decay=0.0, device="cpu")
    result = fit(model, task, config)
    train, val = task.dataset("train").extras["caption"], task.dataset("val").extras["caption"]
    references = [[c] for c in val]
    baselines = {
        name: float(BLEUScore(n_gram=4)([fixed] * len(val), references))
        for name, fixed in (
            ("words", frequent_words_caption(train)),
            ("positional", positional_caption(train)),
        )
    }
    achieved = result.history[-1]["val/bleu4"]
    assert baselines["words"] < 0.05  # bag of frequent words: hardly any 4-gram in order
    assert achieved > baselines["positional"] + 0.08, (result.history, baselines)
    rows = caption_samples(model, task, task.dataset("test"), 3, beam_size=2)
    assert len(rows) == 3 and all(set(r) == {"reference", "greedy", "beam"} for r in rows)
    assert [r["reference"] for r in rows] == task.dataset("test").extras["caption"][:3]
    assert all(r["greedy"] and r["beam"] for r in rows) and not model.training


# -- caption_csv ------------------------------------------------------------------------------------
def write_png(path: Path, colour: tuple[int, int, int]) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), colour).save(path)


@pytest.fixture
def caption_folder(tmp_path: Path) -> Path:
    colours = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
    rows = ["file,caption,note"]
    for i in range(12):
        name = list(colours)[i % 3]
        write_png(tmp_path / "img" / f"{i}.png", colours[name])
        rows.append(f"img/{i}.png,a {name} square,x")
    rows.append('img/0.png,"a bright red square",y')  # a second reference for image 0
    (tmp_path / "captions.csv").write_text("\n".join(rows) + "\n")
    return tmp_path


def test_caption_csv_round_trip(caption_folder: Path) -> None:
    options = {"path": str(caption_folder / "captions.csv"), "image_size": 8, "test_fraction": 0.25}
    task = build_task("caption_csv", options)
    assert task.target.kind == "caption" and task.primary_metric == "bleu4"
    sizes = {split: len(task.dataset(split)) for split in SPLITS}
    assert sum(sizes.values()) == 12 and sizes["test"] == 3  # one sample per image
    every = {}
    for split in SPLITS:
        data = task.dataset(split)
        assert data.tensors["image"].shape == (sizes[split], 3, 8, 8)
        for index, caption, refs in zip(
            data.tensors["index"].tolist(), data.extras["caption"], data.extras["references"], strict=True
        ):
            every[index] = (caption, refs)
    assert every[0] == ("a red square", ["a red square", "a bright red square"])
    assert every[4] == ("a green square", ["a green square"])
    train = task.dataset("train").extras["caption"]
    assert task.target.max_length == 3
    assert set(task.target.vocabulary[4:]) == {w for c in train for w in c.split()}  # training words only
    again = build_task("caption_csv", options)
    assert (
        again.fingerprint()
        == task.fingerprint()
        != build_task("caption_csv", {**options, "split_seed": 1}).fingerprint()
    )
    model = build_model(("convnet", {"widths": [4, 8]}), ("caption", {"hidden": 8}), task)
    batch = task.dataset("val").batch(torch.arange(2))
    with torch.no_grad():
        outputs = model.eval()(batch)
    metrics = task.metrics()
    task.update_metrics(metrics, outputs, batch)
    assert 0.0 <= float(metrics["bleu4"].compute()) <= 1.0


def test_caption_csv_paths_are_made_absolute(caption_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(caption_folder)
    task = build_task("caption_csv", {"path": "captions.csv", "image_size": 8})
    assert task.path == caption_folder / "captions.csv" and task.root == caption_folder
    assert task.path.is_absolute() and task.root.is_absolute()
    monkeypatch.chdir(caption_folder.parent)  # the task no longer depends on the working directory
    again = build_task(
        "caption_csv", {"path": str(task.path), "root": f"{caption_folder.name}", "image_size": 8}
    )
    assert again.root == caption_folder and again.fingerprint() == task.fingerprint()


def test_caption_csv_errors_name_the_file_and_row(caption_folder: Path) -> None:
    csv_path = caption_folder / "captions.csv"
    text = csv_path.read_text()

    def fails(content: str | bytes, message: str, **options: object) -> None:
        bad = caption_folder / "bad.csv"
        bad.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(CaptionCSVError, match=message):
            build_task("caption_csv", {"path": str(bad), **options})

    where = str(caption_folder / "bad.csv")
    fails("", f"caption_csv: CSV file '{where}' is empty; expected a header line")
    fails("file,caption\n", f"'{where}' has a header but no data rows")
    fails(text.replace("file,caption,note", "image,caption,note"), rf"{where}:1: column 'file' is missing")
    fails(
        text.replace("img/3.png,a red square", "img/3.png,  "),
        rf"{where}:5: empty caption in column 'caption'",
    )
    fails(text.replace("img/5.png", "img/missing.png"), rf"{where}:7: image 'img/missing.png' not found")
    (caption_folder / "img" / "2.png").write_bytes(b"not a png at all")
    fails(text, rf"{where}:4: .*2.png: not an image file")
    (caption_folder / "img" / "2.png").write_bytes(b"")
    fails(text, rf"{where}:4: .*2.png: empty file")
    fails(b"file,caption\n\xff\xfe,a\n", rf"{where}:2: not UTF-8 text")
    with pytest.raises(CaptionCSVError, match=r"cannot read CSV file '.*nowhere.csv'"):
        build_task("caption_csv", {"path": str(caption_folder / "nowhere.csv")})
    with pytest.raises(CaptionCSVError, match="captions have no classes"):
        build_task("caption_csv", {"path": str(csv_path)}, classes=[0, 1])
