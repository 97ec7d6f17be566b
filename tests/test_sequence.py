"""1-D convolution for text and audio: textcnn and tdnn, the conv1d head, the text and audio tasks.

The backbone checks follow tests/test_backbones.py (which feeds images) with each backbone's own
``example_input``: feature shapes against ``feature_info``, measured receptive fields, and one
optimiser step per freeze depth proving that frozen parameters and buffers stay bit-identical.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from transferlab.backbones.sequence import SequenceBackbone, textcnn
from transferlab.engine.assembly import build_backbone, build_head, build_model, build_task
from transferlab.engine.fit import FitConfig, fit
from transferlab.engine.model import TransferModel
from transferlab.heads.conv1d import conv1d
from transferlab.registry import BACKBONES, HEADS, TASKS
from transferlab.service.api import validate
from transferlab.tasks.audio import AudioFolderError, frame_count, log_mel, mel_filterbank, read_wav
from transferlab.tasks.base import SPLITS, TargetSpec
from transferlab.tasks.text import PAD, UNK, TextCSVError, tokenize

EXPERIMENTS = Path(__file__).parents[1] / "experiments"
LENGTH = 24
# name -> small options; in_channels is the vocabulary size (textcnn) or the mel bands (tdnn).
SMALL = {
    "textcnn": {"in_channels": 50, "embed_dim": 8, "filters": [4, 4], "kernel_sizes": [2, 3]},
    "tdnn": {"in_channels": 10, "channels": [8, 8, 8, 12]},
}
SMALL["tdnn"].update(kernel_sizes=[5, 3, 3, 1], dilations=[1, 2, 3, 1])


pytestmark = pytest.mark.usefixtures("one_thread")


def make(name: str) -> SequenceBackbone:
    torch.manual_seed(0)
    backbone = BACKBONES.get(name)(**SMALL[name])
    assert isinstance(backbone, SequenceBackbone)
    return backbone


TARGET = TargetSpec(kind="label", num_classes=3, in_channels=1)


# -- backbones -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SMALL))
def test_features_match_feature_info(name: str) -> None:
    backbone = make(name).eval()
    features = backbone(backbone.example_input(2, LENGTH))
    assert len(features) == len(backbone.stages) == len(backbone.feature_info)
    for feature, info in zip(features, backbone.feature_info, strict=True):
        assert feature.shape == (2, info.channels, -(-LENGTH // info.reduction)), info


@pytest.mark.parametrize("name", list(SMALL))
def test_receptive_field_is_measured(name: str) -> None:
    """Changing one input step changes exactly ``receptive_field`` steps of a stride-1 stage."""
    backbone = make(name).eval()
    x = backbone.example_input(1, LENGTH)
    y = x.clone()
    y[..., LENGTH // 2] = (y[..., LENGTH // 2] + 1) % backbone.in_channels if name == "textcnn" else 5.0
    with torch.no_grad():
        pairs = list(zip(backbone(x), backbone(y), backbone.feature_info, strict=True))
    checked = 0
    for before, after, info in pairs:
        if info.reduction == 1:
            changed = (before != after).any(dim=1).sum().item()
            assert changed == info.receptive_field, info
            checked += 1
    assert checked >= 2


def test_default_receptive_fields() -> None:
    assert [s.receptive_field for s in BACKBONES.get("tdnn")().feature_info] == [5, 9, 15, 15, 15]
    info = textcnn(in_channels=10).feature_info
    assert [(s.name, s.channels, s.reduction, s.receptive_field) for s in info] == [
        ("embed", 64, 1, 1),
        ("conv1", 96, 1, 5),
        ("conv2", 96, 2, 14),  # 5, +1 for the pool, +4 steps of 2 for the widest filter
    ]


def _train_step(model: TransferModel, backbone: SequenceBackbone) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    model.train()
    x = backbone.example_input(4, LENGTH, seed=1)
    loss = torch.nn.functional.cross_entropy(model({"x": x})["logits"], torch.tensor([0, 1, 2, 0]))
    opt.zero_grad()
    loss.backward()
    opt.step()


@pytest.mark.parametrize("bn_policy", ["frozen", "train"])
@pytest.mark.parametrize("name", list(SMALL))
def test_every_depth_freezes_exactly_its_stages(name: str, bn_policy: str) -> None:
    backbone = make(name)
    initial = {k: v.clone() for k, v in backbone.state_dict().items()}
    params = dict(backbone.named_parameters())
    n = len(backbone.stages)
    for depth in range(n + 1):
        backbone.load_state_dict(initial)
        head = conv1d(backbone.feature_info, TARGET, channels=[4])
        model = TransferModel(backbone, head, freeze_depth=depth, bn_policy=bn_policy, input_key="x")
        for i, stage in enumerate(backbone.stages):
            assert all(p.requires_grad == (i >= depth) for p in stage.parameters()), (depth, i)
        _train_step(model, backbone)
        after = backbone.state_dict()
        for key, value in initial.items():
            stage = int(key.split(".")[1])
            if stage < depth and (key in params or bn_policy == "frozen"):
                assert torch.equal(after[key], value), (depth, key)  # frozen means frozen
            if stage >= depth and key in params:
                assert not torch.equal(after[key], value), (depth, key)  # trainable stages learn
        if bn_policy == "train" and depth:
            stats = [k for k in initial if k.startswith("stages.0.") and k.endswith("running_mean")]
            assert all(not torch.equal(after[k], initial[k]) for k in stats), "bn: train adapts"


@pytest.mark.parametrize("name", list(SMALL))
def test_frozen_prefix_builds_no_graph(name: str) -> None:
    backbone = make(name)
    model = TransferModel(backbone, conv1d(backbone.feature_info, TARGET), freeze_depth=2, input_key="x")
    features = model.train().forward_features(backbone.example_input(2, LENGTH))
    assert [f.requires_grad for f in features] == [False, False] + [True] * (len(features) - 2)
    assert not backbone.stages[0].training and backbone.stages[2].training


def test_backbone_option_errors() -> None:
    with pytest.raises(
        ValueError, match=r"textcnn: in_channels \(the vocabulary size\) must be an integer >= 2"
    ):
        textcnn(in_channels=1)
    with pytest.raises(ValueError, match="textcnn: kernel_sizes must be a non-empty list"):
        textcnn(kernel_sizes=[])
    with pytest.raises(ValueError, match="tdnn: channels, kernel_sizes and dilations need one entry"):
        BACKBONES.get("tdnn")(channels=[8, 8])
    with pytest.raises(ValueError, match="textcnn reads int64 token ids of shape N x L"):
        make("textcnn")(torch.randn(2, 50, LENGTH))


# -- the conv1d head -----------------------------------------------------------------------------------
def test_conv1d_head_on_1d_and_2d_features() -> None:
    backbone = make("tdnn")
    head = conv1d(backbone.feature_info, TARGET, channels=[6], frequency_pool="max").eval()
    sequence = torch.randn(2, 12, 30)
    for length in (1, 7, 30):  # max over time: any length gives one vector
        assert head([sequence[..., :length]], {})["logits"].shape == (2, 3)
    image = torch.randn(2, 12, 5, 30)  # N x C x H x W: H pooled, W is time
    assert torch.equal(head([image], {})["logits"], head([image.amax(dim=2)], {})["logits"])
    mean_head = conv1d(backbone.feature_info, TARGET, channels=[], frequency_pool="mean").eval()
    assert torch.allclose(mean_head([image], {})["logits"], mean_head.fc(image.mean(2).amax(-1)))
    with pytest.raises(ValueError, match="reads N x C x L"):
        head([torch.randn(2, 12)], {})


def test_conv1d_head_rejects_what_it_cannot_predict() -> None:
    info = make("tdnn").feature_info
    with pytest.raises(
        ValueError, match="head 'conv1d' predicts label targets, but the task provides 'mask'"
    ):
        conv1d(info, TargetSpec(kind="mask", num_classes=3))
    with pytest.raises(ValueError, match="frequency_pool must be one of"):
        conv1d(info, TARGET, frequency_pool="sum")
    for options, message in (  # the option checks shared with every head (transferlab.tasks.splits)
        ({"dropout": "half"}, r"head 'conv1d': dropout must be in \[0, 1\), got 'half'"),
        ({"dropout": 1}, r"head 'conv1d': dropout must be in \[0, 1\), got 1"),
        ({"kernel_size": 0}, r"head 'conv1d': kernel_size must be >= 1, got 0"),
        ({"kernel_size": 2.5}, r"head 'conv1d': kernel_size must be an integer >= 1, got 2.5"),
    ):
        with pytest.raises(ValueError, match=message):
            conv1d(info, TARGET, **options)
    with pytest.raises(ValueError, match=r"head 'classify': dropout must be in \[0, 1\), got True"):
        HEADS.get("classify")(info, TargetSpec(kind="label", num_classes=3), dropout=True)
    assert "conv1d" in HEADS.names() and {"textcnn", "tdnn"} <= set(BACKBONES.names())


# -- bundled data: determinism, subsets, features --------------------------------------------------------
SMALL_TEXT = {"train_size": 300, "val_size": 60, "test_size": 90}
SMALL_AUDIO = {"train_size": 96, "val_size": 64, "test_size": 64, "duration": 0.25}


def test_text_topics_is_deterministic_and_subsets_share_the_vocabulary() -> None:
    task = build_task("text_topics", SMALL_TEXT)
    again = build_task("text_topics", SMALL_TEXT)
    other = build_task("text_topics", {**SMALL_TEXT, "seed": 1})
    train = task.dataset("train").tensors
    assert torch.equal(train["tokens"], again.dataset("train").tensors["tokens"])
    assert task.fingerprint() == again.fingerprint() != other.fingerprint()
    assert not torch.equal(train["tokens"], other.dataset("train").tensors["tokens"])
    longer = build_task("text_topics", {**SMALL_TEXT, "train_size": 400})  # splits share a prefix
    assert torch.equal(longer.dataset("train").tensors["label"][:300], train["label"])
    assert task.target.input_key == "tokens" and task.target.image_size == (1, 40)
    assert task.target.in_channels == len(task.vocabulary) and task.vocabulary.tokens[:2] == (PAD, UNK)
    a = build_task("text_topics", SMALL_TEXT, classes=[0, 1, 2])
    b = build_task("text_topics", SMALL_TEXT, classes=[5, 3])
    assert a.vocabulary == b.vocabulary == task.vocabulary  # a copied embedding means the same words
    b_labels = b.dataset("test").tensors
    assert sorted(set(b_labels["label"].tolist())) == [0, 1] and b.target.class_names == ("weather", "travel")
    everything = task.dataset("test").tensors
    kept = everything["label"][torch.searchsorted(everything["index"], b_labels["index"])]
    assert torch.equal(kept, torch.where(b_labels["label"] == 0, 5, 3))
    sentiment = build_task("text_topics", {**SMALL_TEXT, "label": "sentiment"})
    assert sentiment.target.class_names == ("negative", "positive")


def test_audio_events_is_deterministic_and_normalised_alike_for_every_subset() -> None:
    task = build_task("audio_events", SMALL_AUDIO)
    again = build_task("audio_events", SMALL_AUDIO)
    features = task.dataset("train").tensors["features"]
    assert features.shape == (96, 40, frame_count(4000, 400, 160)) == (96, 40, 26)
    assert torch.equal(features, again.dataset("train").tensors["features"])
    assert task.fingerprint() == again.fingerprint()
    assert task.fingerprint() != build_task("audio_events", {**SMALL_AUDIO, "seed": 3}).fingerprint()
    assert abs(features.mean().item()) < 0.2 and 0.8 < features.std().item() < 1.2
    subset = build_task("audio_events", SMALL_AUDIO, classes=[4, 1])
    rows = subset.dataset("train").tensors  # train clips are numbered from 0
    assert torch.equal(rows["features"], features[rows["index"]])  # same values in every subset
    image = build_task("audio_events", {**SMALL_AUDIO, "representation": "spectrogram_image"})
    assert image.target.input_key == "image" and image.target.in_channels == 1
    assert torch.equal(image.dataset("val").tensors["image"][:, 0], task.dataset("val").tensors["features"])


@pytest.mark.parametrize("band", [3, 12, 25, 38])
def test_a_pure_tone_peaks_in_its_mel_band(band: int) -> None:
    _, centres = mel_filterbank(400, 40, 16_000)
    t = torch.arange(8000) / 16_000
    tone = torch.sin(2 * torch.pi * centres[band] * t).unsqueeze(0)
    mel = log_mel(tone, sample_rate=16_000, n_fft=400, hop_length=160, n_mels=40)
    assert mel.shape == (1, 40, 51)
    assert mel[0, :, 5:-5].mean(dim=1).argmax().item() == band


def test_mel_filters_are_triangles_at_their_centres() -> None:
    filters, centres = mel_filterbank(512, 20, 8000)
    freqs = torch.linspace(0, 4000, 257)
    peaks = freqs[filters.argmax(dim=0)]
    assert torch.all((peaks - centres).abs() <= 4000 / 256)  # within one FFT bin
    assert float(filters.max()) <= 1.0 and bool(torch.all(filters.sum(dim=0) > 0))


# -- user data: text CSV -------------------------------------------------------------------------------
def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


GOOD_ROWS = "".join(f'"{w} game, {i}",sport\n"{w} soup {i}",food\n' for i, w in enumerate("abcdefgh"))


def test_text_csv_reads_labels_vocabulary_and_unknown_words(tmp_path: Path) -> None:
    path = write(
        tmp_path / "t.csv",
        "id,text,label\n" + "".join(f"{i},{r}" for i, r in enumerate(GOOD_ROWS.splitlines(keepends=True))),
    )
    task = TASKS.get("text_csv")(path=str(path), classes=None, max_length=4, val_fraction=0.25)
    assert task.target.class_names == ("food", "sport") and task.target.input_key == "tokens"
    tokens = {split: task.dataset(split).tensors["tokens"] for split in SPLITS}
    assert all(t.shape[1] == 4 for t in tokens.values())
    assert (tokens["test"] == 1).any()  # the number in a test row was never seen in training: <unk>
    assert tokenize("Don't stop, it's 42!") == ["don't", "stop", ",", "it's", "42", "!"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", r"t\.csv' is empty"),
        ("text,category\nhello,a\n", r"t\.csv:1: column 'label' is missing in the header \(columns: 'text'"),
        ("text,label\n" + GOOD_ROWS + "a,b,c\n", r"t\.csv:18: 3 fields, but the header has 2"),
        ("text,label\n" + GOOD_ROWS + " ,food\n", r"t\.csv:18: empty text in column 'text'"),
        ("text,label\nhi,\n" + GOOD_ROWS, r"t\.csv:2: empty label in column 'label'"),
        ("text,label\n" + GOOD_ROWS + "\nx,food\n", r"t\.csv:18: blank line"),
        ("text,label\n" + GOOD_ROWS + '"open,food\n', r"t\.csv:\d+: malformed CSV"),
        (b"text,label\nok,a\n\xff\xfe,b\n", r"t\.csv:3: not UTF-8 text"),
        ("text,label\n", "has a header but no data rows"),
        ("text,label\na b,x\nc d,x\ne f,x\n", "has only one label \\('x'\\)"),
        ("text,label\n" + GOOD_ROWS + "lone,z\n", "every label needs at least 3 rows .*\n  'z': 1 row"),
    ],
)
def test_text_csv_errors_name_the_file_and_line(tmp_path: Path, content: str | bytes, message: str) -> None:
    path = write(tmp_path / "t.csv", content)
    with pytest.raises(TextCSVError, match=message):
        TASKS.get("text_csv")(path=str(path))


def test_text_csv_lists_every_bad_row(tmp_path: Path) -> None:
    path = write(tmp_path / "t.csv", "text,label\n" + GOOD_ROWS + "x\n,food\ny,\n")
    with pytest.raises(TextCSVError, match=r"3 row\(s\) cannot be used") as raised:
        TASKS.get("text_csv")(path=str(path))
    assert [line.split(":")[1] for line in str(raised.value).splitlines()[1:]] == ["18", "19", "20"]
    with pytest.raises(TextCSVError, match="path is required"):
        TASKS.get("text_csv")()
    with pytest.raises(TextCSVError, match="cannot read .*missing.csv"):
        TASKS.get("text_csv")(path=str(tmp_path / "missing.csv"))


# -- user data: audio folder ---------------------------------------------------------------------------
def write_wav(path: Path, samples: np.ndarray, *, rate: int = 16_000, width: int = 2) -> Path:
    """Integer PCM WAV of float samples in [-1, 1] (frames x channels, or frames)."""
    frames = samples.reshape(len(samples), -1)
    scaled = np.round(frames * (2 ** (8 * width - 1) - 1)).astype(np.int64)
    if width == 1:
        raw = (scaled + 128).astype(np.uint8).tobytes()
    else:
        raw = b"".join(int(v).to_bytes(width, "little", signed=True) for v in scaled.ravel())
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(frames.shape[1])
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(raw)
    return path


def sine(hz: float, seconds: float = 0.2, rate: int = 16_000) -> np.ndarray:
    return 0.5 * np.sin(2 * np.pi * hz * np.arange(int(seconds * rate)) / rate)


@pytest.fixture
def wav_folder(tmp_path: Path) -> Path:
    root = tmp_path / "clips"
    for label, hz in (("high", 3000.0), ("low", 300.0)):
        for i in range(4):
            write_wav(root / label / f"{i}.wav", sine(hz + 20 * i))
    return root


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_read_wav_decodes_integer_pcm(tmp_path: Path, width: int) -> None:
    stereo = np.stack([sine(440.0), -sine(440.0) * 0.5], axis=1)
    data = write_wav(tmp_path / "x.wav", stereo, rate=8000, width=width).read_bytes()
    samples, rate = read_wav(data)
    assert rate == 8000 and samples.dtype == np.float32
    assert np.allclose(samples, stereo.mean(axis=1), atol=2.0 / 2 ** (8 * width - 1) + 1e-6)


def test_audio_folder_reads_clips_as_features(wav_folder: Path) -> None:
    task = TASKS.get("audio_folder")(root=str(wav_folder), duration=0.25, n_mels=16, val_fraction=0.25)
    assert task.target.class_names == ("high", "low") and task.target.in_channels == 16
    assert task.files[0] == "high/0.wav" and len(task.files) == 8
    data = {split: task.dataset(split).tensors for split in SPLITS}
    assert sum(len(d["label"]) for d in data.values()) == 8
    assert data["train"]["features"].shape[1:] == (16, frame_count(4000, 400, 160))
    moved = wav_folder.rename(wav_folder.parent / "moved")  # the same files elsewhere hash the same
    assert TASKS.get("audio_folder")(
        root=str(moved), duration=0.25, n_mels=16, val_fraction=0.25
    ).fingerprint() == (task.fingerprint())


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda r: (r / "low" / "0.wav").write_bytes(b""), r"low/0\.wav: empty file"),
        (lambda r: (r / "low" / "1.wav").write_bytes(b"RIFF0000junk"), r"low/1\.wav: .*WAV"),
        (
            lambda r: write_wav(r / "low" / "2.wav", sine(300.0, rate=8000), rate=8000),
            r"2\.wav: recorded at 8000 Hz",
        ),
        (lambda r: (r / "low" / "notes.txt").write_text("x"), r"not WAV .*\n  .*low/notes\.txt"),
        (lambda r: (r / "stray.wav").write_bytes(b""), r"holds files outside class folders"),
        (lambda r: (r / "empty").mkdir(), r"class folder\(s\) holding no WAV files:\n  .*empty"),
        (lambda r: [p.unlink() for p in (r / "low").iterdir() if p.name != "0.wav"], r"at least 3 WAV files"),
    ],
)
def test_audio_folder_errors_name_the_file(wav_folder: Path, damage, message: str) -> None:
    damage(wav_folder)
    with pytest.raises(AudioFolderError, match=message):
        TASKS.get("audio_folder")(root=str(wav_folder))


def test_audio_folder_lists_every_bad_file(wav_folder: Path) -> None:
    (wav_folder / "low" / "0.wav").write_bytes(b"")
    (wav_folder / "high" / "3.wav").write_bytes(b"not a wav")
    (wav_folder / "high" / ".hidden.txt").write_text("ignored")  # hidden entries are ignored
    with pytest.raises(
        AudioFolderError, match=r"2 WAV file\(s\) cannot be used:\n  .*high/3\.wav.*\n  .*low/0\.wav"
    ):
        TASKS.get("audio_folder")(root=str(wav_folder))
    with pytest.raises(AudioFolderError, match="root is required"):
        TASKS.get("audio_folder")()


# -- training and example specs ------------------------------------------------------------------------
TRAIN = FitConfig(epochs=2, batch_size=16, optimizer="adamw", lr=0.005, weight_decay=0.0, device="cpu")


@pytest.mark.parametrize(
    ("task", "options", "backbone", "backbone_options"),
    [
        ("text_topics", {**SMALL_TEXT, "train_size": 900}, "textcnn", {"embed_dim": 32, "filters": [16]}),
        ("audio_events", {**SMALL_AUDIO, "train_size": 384}, "tdnn", {"channels": [32, 32, 32, 32, 32]}),
        (  # a 2-D backbone over the spectrogram image, the head treating width as time
            "audio_events",
            {**SMALL_AUDIO, "train_size": 384, "representation": "spectrogram_image"},
            "convnet",
            {"widths": [8, 16, 16]},
        ),
    ],
)
def test_two_epochs_beat_chance(task: str, options: dict, backbone: str, backbone_options: dict) -> None:
    torch.manual_seed(0)
    built = build_task(task, options)
    model = build_model((backbone, backbone_options), ("conv1d", {"channels": [32]}), built)
    result = fit(model, built, TRAIN)
    assert result.test["accuracy"] > 2.5 / built.target.num_classes, result.test  # 6 classes: 0.42


@pytest.mark.parametrize("spec", ["text-topics.yaml", "audio-events.yaml"])
def test_example_specs_validate(spec: str) -> None:
    vspec = validate(EXPERIMENTS / spec)
    assert vspec.spec.head.name == "conv1d" and vspec.num_classes == 6
    task = build_task(vspec.spec.task.name, vspec.task_options)
    built = build_backbone(vspec.spec.backbone.name, vspec.backbone_options, task.target)
    head = build_head(vspec.spec.head.name, vspec.spec.head.options, built.feature_info, task.target)
    batch = task.dataset("val").batch(torch.arange(2))
    assert head(built.eval()(batch[task.target.input_key]), batch)["logits"].shape == (2, 6)
