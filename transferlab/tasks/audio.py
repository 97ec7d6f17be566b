"""Audio classification: the bundled ``audio_events`` clips and a user's ``audio_folder`` of WAV files.

Clips become log-mel features here, in the task, with torch alone (no audio toolkit): a Hann-window
STFT (``n_fft`` samples, ``hop_length`` apart, centred), the power spectrum through a triangular
mel filterbank (HTK mel scale, as ``torchaudio.functional.melscale_fbanks(norm=None)``), natural
log of (power + 1e-10), then every mel band standardised with its mean and std over reference
clips of every class: ``audio_folder``'s training split, or 256 ``audio_events`` clips of a stream
of their own. So the A and B subsets of a transfer study see identical features, and a generated
clip's features do not depend on the split sizes.

``representation: logmel`` gives batches ``features`` (float N x n_mels x frames; input_key
"features", ``in_channels`` = n_mels, ``image_size`` = (1, frames)) for 1-D backbones such as
``tdnn``; ``spectrogram_image`` gives the same values as ``image`` (N x 1 x n_mels x frames; row 0 is
the lowest band) for 2-D backbones. Both carry ``label`` and ``index`` (int64 N).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import wave
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from transferlab.registry import TASKS
from transferlab.tasks.base import SPLITS, ClassificationTask, InMemoryDataset, TargetSpec, stable_hash
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

SAMPLE_RATE = 16_000
REPRESENTATIONS = ("logmel", "spectrogram_image")
CHUNK = 64  # clips per random stream of audio_events
REFERENCE_CLIPS = 256  # audio_events clips whose log-mel statistics normalise every split


# -- features -----------------------------------------------------------------------------------------
def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int) -> tuple[Tensor, Tensor]:
    """Triangular filters (n_fft // 2 + 1) x n_mels from 0 Hz to Nyquist, and their centres in Hz.

    Centres are evenly spaced in HTK mels, 2595 log10(1 + f / 700); filter i rises from centre i - 1
    to 1 at centre i and falls to 0 at centre i + 1 (unnormalised, as torchaudio's ``norm=None``).
    """
    freqs = torch.linspace(0.0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    top = 2595.0 * math.log10(1.0 + sample_rate / 2 / 700.0)
    mels = torch.linspace(0.0, top, n_mels + 2, dtype=torch.float64)
    edges = 700.0 * (10.0 ** (mels / 2595.0) - 1.0)
    width = edges[1:] - edges[:-1]
    slopes = edges[None, :] - freqs[:, None]
    rising, falling = -slopes[:, :-2] / width[:-1], slopes[:, 2:] / width[1:]
    return torch.clamp(torch.minimum(rising, falling), min=0.0).float(), edges[1:-1].float()


def frame_count(samples: int, n_fft: int, hop_length: int) -> int:
    """Frames of a centred STFT (``torch.stft(center=True)``) over ``samples`` samples."""
    return 1 + (samples + 2 * (n_fft // 2) - n_fft) // hop_length


def log_mel(waves: Tensor, *, sample_rate: int, n_fft: int, hop_length: int, n_mels: int) -> Tensor:
    """Log-mel power of float waveforms N x T: float N x n_mels x :func:`frame_count` frames."""
    filters, _ = mel_filterbank(n_fft, n_mels, sample_rate)
    window = torch.hann_window(n_fft)
    out = []
    for lo in range(0, len(waves), 256):  # bounds the complex STFT's memory
        spec = torch.stft(waves[lo : lo + 256], n_fft, hop_length, window=window, return_complex=True)
        power = spec.real.square() + spec.imag.square()  # N x freqs x frames
        out.append(torch.log(torch.einsum("nft,fm->nmt", power, filters) + 1e-10))
    return torch.cat(out)


# A split's clips: (float32 N x T waveforms, int64 labels, int64 sample numbers).
ClipLoader = Callable[[str], tuple[Tensor, np.ndarray, np.ndarray]]


class AudioTask(ClassificationTask):
    """Label classification of equal-length mono clips, from :func:`audio_events` or :func:`audio_folder`.

    A split's features are computed when it is first asked for.

    Args:
        name: The task's registry name.
        load: Gives a split's clips (all classes).
        reference: Gives the clips whose per-band log-mel mean and std normalise every split.
        samples: Samples per clip.
        class_names: Names of all classes, before a subset is taken.
        classes: The class subset (None = all).
        features: ``sample_rate``, ``n_fft``, ``hop_length`` and ``n_mels``.
        representation: "logmel" or "spectrogram_image".
        options: The factory options, for ``describe``.
        content: A hash of the source data, for ``fingerprint``.
        files: The clips' files relative to the user's folder, if any; ``index`` points in here.
    """

    def __init__(
        self,
        *,
        name: str,
        load: ClipLoader,
        reference: Callable[[], Tensor],
        samples: int,
        class_names: tuple[str, ...],
        classes: tuple[int, ...] | None,
        features: dict[str, int],
        representation: str,
        options: dict[str, Any],
        content: str,
        files: tuple[str, ...] = (),
    ) -> None:
        self.name, self.files = name, files
        self.classes, self.class_names_all = classes, class_names
        self.features, self._load, self._reference = features, load, reference
        self._options, self._content = options, content
        frames = frame_count(samples, features["n_fft"], features["hop_length"])
        n_mels, image = features["n_mels"], representation == "spectrogram_image"
        picked = classes if classes is not None else range(len(class_names))
        self.target = TargetSpec(
            kind="label",
            num_classes=len(picked),
            in_channels=1 if image else n_mels,
            image_size=(n_mels, frames) if image else (1, frames),
            class_names=tuple(class_names[c] for c in picked),
            input_key="image" if image else "features",
        )
        self._normalization: tuple[Tensor, Tensor] | None = None
        self._datasets: dict[str, InMemoryDataset] = {}

    @property
    def normalization(self) -> tuple[Tensor, Tensor]:
        """Per-band (mean, std), each 1 x n_mels x 1, subtracted from and divided into the log-mel."""
        if self._normalization is None:
            mel = log_mel(self._reference(), **self.features)
            mean, std = mel.mean(dim=(0, 2), keepdim=True), mel.std(dim=(0, 2), keepdim=True)
            self._normalization = (mean, torch.where(std < 1e-6, torch.ones_like(std), std))  # silent band
        return self._normalization

    def _split(self, split: str) -> InMemoryDataset:
        if split not in self._datasets:
            waves, labels, index = self._load(split)
            mean, std = self.normalization
            mel = (log_mel(waves, **self.features) - mean) / std
            fields = {
                self.target.input_key: mel.unsqueeze(1) if self.target.input_key == "image" else mel,
                "label": torch.from_numpy(labels),
                "index": torch.from_numpy(index),
            }
            self._datasets[split] = select_classes(fields, None, self.classes, len(self.class_names_all))
        return self._datasets[split]

    def options(self) -> dict[str, Any]:
        """The factory options this task was built with."""
        return dict(self._options)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "options": self.options(), "classes": list(self.target.class_names)}

    def fingerprint(self) -> str:
        """Hash of the options (paths left out), the source data and every split's samples."""
        described = self.describe()
        described["options"] = {k: v for k, v in described["options"].items() if k != "root"}
        splits = {
            split: [stable_hash(self._split(split).tensors[f]) for f in ("index", "label")]
            for split in SPLITS
        }
        return stable_hash({"describe": described, "content": self._content, "splits": splits})

    def dataset(self, split: str) -> Dataset:
        """``InMemoryDataset`` with the input (see the module docstring), ``label`` and ``index``.

        ``index`` is the clip's number among all generated clips (train, then val, then test), or
        its position in the sorted list of WAV files (``audio_folder``'s ``files``).
        """
        check_split(self.name, split)
        return self._split(split)


def _feature_options(
    task: str, n_mels: int, n_fft: int, hop_length: int, sample_rate: int, samples: int
) -> dict[str, int]:
    n_fft = check_int(task, "n_fft", n_fft, minimum=16, maximum=8192)
    if n_fft // 2 >= samples:  # the centred STFT pads each end by reflection, which needs more samples
        raise ValueError(f"{task}: n_fft={n_fft} is too long for clips of {samples} samples; lower it")
    n_mels = check_int(task, "n_mels", n_mels, minimum=2, maximum=n_fft // 2 + 1)
    return {
        "sample_rate": sample_rate,
        "n_fft": n_fft,
        "hop_length": check_int(task, "hop_length", hop_length, minimum=1, maximum=n_fft),
        "n_mels": n_mels,
    }


# -- audio_events: synthetic clips --------------------------------------------------------------------
EVENT_CLASSES = ("tone", "chirp", "noise_burst", "tone+noise", "chirp+noise", "tone+chirp")
COMPONENTS = np.array(  # which of (tone, chirp, noise burst) each class sums
    [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1], [0, 1, 1], [1, 1, 0]], dtype=np.float32
)
LOW_HZ, HIGH_HZ = 200.0, 4000.0
SYNTH_VERSION = 1


def _envelope(t: np.ndarray, onset: np.ndarray, length: np.ndarray, ramp: float = 0.01) -> np.ndarray:
    """1 inside [onset, onset + length) with raised-cosine ramps of ``ramp`` s; 0 outside. N x T."""
    tau = t[None, :] - onset[:, None]
    edge = np.clip(np.minimum(tau, length[:, None] - tau) / ramp, 0.0, 1.0)
    return np.sin((0.5 * np.pi) * edge) ** 2


def synthesize_events(
    labels: np.ndarray, rng: np.random.Generator, *, duration: float, sample_rate: int
) -> np.ndarray:
    """float32 N x T clips: each class's events (random frequency, timing, level) over faint noise.

    Tones and chirps span 30-80% of the clip at 200-4000 Hz (log-uniform); a chirp sweeps at least
    one octave, up or down, linearly in frequency; a noise burst is white noise over 10-50% of the
    clip. Events sit 15-45 dB above the background noise (-50 to -35 dB full scale). Every clip draws
    every parameter, used or not, so a clip's sound does not depend on the classes of the others.
    """
    n, t = len(labels), (np.arange(int(round(duration * sample_rate))) / sample_rate).astype(np.float32)

    def uniform(low: float, high: float) -> np.ndarray:
        return rng.uniform(low, high, n).astype(np.float32)

    def level(low_db: float, high_db: float) -> np.ndarray:
        return 10.0 ** (uniform(low_db, high_db) / 20.0)

    def hertz() -> np.ndarray:
        return np.exp(uniform(np.log(LOW_HZ), np.log(HIGH_HZ)))

    draws = {
        "tone": (hertz(), uniform(0, 2 * np.pi), level(-20, -6), uniform(0.3, 0.8), uniform(0, 1)),
        "chirp": (
            hertz(),
            uniform(1.0, np.log2(HIGH_HZ / LOW_HZ)) * rng.choice([-1.0, 1.0], n),
            level(-20, -6),
            uniform(0.3, 0.8),
            uniform(0, 1),
        ),
        "burst": (level(-20, -6), uniform(0.1, 0.5), uniform(0, 1)),
    }
    # One white noise per clip is both the background and, louder inside its envelope, the burst.
    clips = rng.standard_normal((n, len(t)), dtype=np.float32)
    noise_level = np.repeat(level(-50, -35)[:, None], len(t), axis=1)
    mix = COMPONENTS[labels].astype(bool)
    rows = np.flatnonzero(mix[:, 2])
    gain, span, start = (d[rows] for d in draws["burst"])
    noise_level[rows] += gain[:, None] * _envelope(t, start * (1 - span) * duration, span * duration)
    clips *= noise_level
    rows = np.flatnonzero(mix[:, 0])
    freq, phase, gain, span, start = (d[rows] for d in draws["tone"])
    envelope = _envelope(t, start * (1 - span) * duration, span * duration)
    clips[rows] += np.sin(2 * np.pi * freq[:, None] * t + phase[:, None]) * (gain[:, None] * envelope)
    rows = np.flatnonzero(mix[:, 1])
    f0, octaves, gain, span, start = (d[rows] for d in draws["chirp"])
    f1 = np.clip(f0 * 2.0**octaves, LOW_HZ / 2, 0.45 * sample_rate)  # below Nyquist: no aliasing
    onset, length = start * (1 - span) * duration, span * duration
    tau = np.clip(t[None, :] - onset[:, None], 0.0, None)
    sweep = f0[:, None] * tau + (f1 - f0)[:, None] / (2 * length[:, None]) * tau**2
    clips[rows] += np.sin(2 * np.pi * sweep) * (gain[:, None] * _envelope(t, onset, length))
    return clips


def generate_events(
    size: int, seed: int, split_code: int, duration: float, sample_rate: int
) -> tuple[np.ndarray, np.ndarray]:
    """``size`` clips and their labels (int64), deterministic by the seeds; classes drawn uniformly."""
    waves, labels = [], []
    for lo in range(0, size, CHUNK):
        rng = np.random.default_rng([seed, split_code, lo // CHUNK])
        chunk_labels = rng.integers(0, len(EVENT_CLASSES), CHUNK)
        clips = synthesize_events(chunk_labels, rng, duration=duration, sample_rate=sample_rate)
        n = min(CHUNK, size - lo)  # whole chunks are drawn so that split sizes share a prefix
        waves.append(clips[:n])
        labels.append(chunk_labels[:n])
    return np.concatenate(waves), np.concatenate(labels)


@TASKS.register("audio_events")
def audio_events(
    *,
    classes: Sequence[int] | None = None,
    representation: str = "logmel",
    train_size: int = 1200,
    val_size: int = 300,
    test_size: int = 600,
    seed: int = 0,
    duration: float = 0.5,
    n_mels: int = 40,
    n_fft: int = 400,
    hop_length: int = 160,
) -> AudioTask:
    """Synthetic 16 kHz clips of tones, chirps, noise bursts and their mixtures (6 classes).

    Classes: 0 tone, 1 chirp, 2 noise_burst, 3 tone+noise, 4 chirp+noise, 5 tone+chirp, each over
    faint background noise with random frequencies, timing and levels (:func:`synthesize_events`).

    Args:
        classes: Class indices to keep, in label order; labels are renumbered. ``None`` keeps all.
        representation: "logmel" (``features`` N x n_mels x frames, for 1-D backbones) or
            "spectrogram_image" (``image`` N x 1 x n_mels x frames, for 2-D backbones).
        train_size: Clips generated for the training split (before a class subset is taken).
        val_size: Clips generated for the validation split.
        test_size: Clips generated for the test split.
        seed: Generator seed; each split and each chunk of 64 clips has its own stream, and so
            do the 256 clips whose log-mel statistics normalise every split.
        duration: Clip length in seconds (0.1 to 4).
        n_mels: Mel bands.
        n_fft: STFT window and FFT length in samples (400 = 25 ms).
        hop_length: Samples between frames (160 = 10 ms); frames = 1 + samples // hop_length.
    """
    name = "audio_events"
    representation = check_choice(name, "representation", representation, REPRESENTATIONS)
    sizes = {
        s: check_int(name, f"{s}_size", v, minimum=1)
        for s, v in zip(SPLITS, (train_size, val_size, test_size), strict=True)
    }
    seed = check_int(name, "seed", seed, minimum=0, maximum=2**32 - 1)
    if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not 0.1 <= duration <= 4:
        raise ValueError(f"{name}: duration must be a number of seconds in [0.1, 4], got {duration!r}")
    samples = int(round(duration * SAMPLE_RATE))
    features = _feature_options(name, n_mels, n_fft, hop_length, SAMPLE_RATE, samples)
    picked = check_classes(name, classes, EVENT_CLASSES)
    options = {
        "classes": list(picked) if picked is not None else None,
        "representation": representation,
        **{f"{s}_size": n for s, n in sizes.items()},
        "seed": seed,
        "duration": float(duration),
        **{k: v for k, v in features.items() if k != "sample_rate"},
    }

    def load(split: str) -> tuple[Tensor, np.ndarray, np.ndarray]:
        code = SPLITS.index(split)
        waves, labels = generate_events(sizes[split], seed, code, float(duration), SAMPLE_RATE)
        first = sum(sizes[s] for s in SPLITS[:code])  # clips are numbered train, then val, then test
        return torch.from_numpy(waves), labels, np.arange(first, first + len(labels))

    def reference() -> Tensor:  # a stream of its own: the same statistics for any sizes and classes
        return torch.from_numpy(generate_events(REFERENCE_CLIPS, seed, len(SPLITS), duration, SAMPLE_RATE)[0])

    return AudioTask(
        name=name,
        load=load,
        reference=reference,
        samples=samples,
        class_names=EVENT_CLASSES,
        classes=picked,
        features=features,
        representation=representation,
        options=options,
        content=stable_hash({"synth": SYNTH_VERSION}),
    )


# -- audio_folder: a user's WAV files, one folder per class -------------------------------------------
FOLDER_NAME = "audio_folder"
WAV_EXTENSIONS = (".wav", ".wave")
DEFAULT_FRACTIONS = {"val_fraction": 0.15, "test_fraction": 0.25}


class AudioFolderError(ValueError):
    """The audio folder cannot be used as it is; the message names the folder or files and the fix."""

    def __init__(self, message: str) -> None:
        prefix = f"{FOLDER_NAME}: "  # idempotent, so that a copy unpickled from a Ray worker reads the same
        super().__init__(message if message.startswith(prefix) else prefix + message)


def list_wav_folder(root: Path, max_files: int) -> tuple[tuple[str, ...], list[Path], np.ndarray]:
    """(sorted class folder names, WAV paths relative to ``root`` by class then path, labels).

    Hidden entries (names starting with ".") are ignored; any other file that is not a WAV file, a
    stray file beside the class folders, or a class folder without WAV files is an error.
    """
    if not root.is_dir():
        raise AudioFolderError(f"'{root}' is not a folder; expected {root}/<class name>/<clips>.wav")
    entries = sorted(e for e in os.listdir(root) if not e.startswith("."))
    stray = [str(root / e) for e in entries if not (root / e).is_dir()]
    if stray:
        raise AudioFolderError(f"'{root}' holds files outside class folders; move them:\n{_listed(stray)}")
    class_names = tuple(entries)
    if len(class_names) < 2:
        raise AudioFolderError(
            f"'{root}' has {len(class_names)} class folder(s); a classifier needs at least 2"
        )
    files, labels, others, empty = [], [], [], []
    for label, name in enumerate(class_names):
        found = []
        for current, dirnames, filenames in os.walk(root / name):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in sorted(f for f in filenames if not f.startswith(".")):
                path = Path(current, f)
                (found if path.suffix.lower() in WAV_EXTENSIONS else others).append(path)
        if not found:
            empty.append(str(root / name))
        files += sorted(p.relative_to(root) for p in found)
        labels += [label] * len(found)
    if others:
        allowed = ", ".join(WAV_EXTENSIONS)
        raise AudioFolderError(f"files that are not WAV ({allowed}); move or delete them:\n{_listed(others)}")
    if empty:
        raise AudioFolderError(f"class folder(s) holding no WAV files:\n{_listed(empty)}")
    if len(files) > max_files:
        raise AudioFolderError(f"'{root}' holds {len(files)} WAV files, more than max_files={max_files}")
    return class_names, files, np.asarray(labels, dtype=np.int64)


def read_wav(data: bytes) -> tuple[np.ndarray, int]:
    """Decode WAV bytes to (float32 mono samples in [-1, 1], sample rate); channels are averaged.

    Uses soundfile (libsndfile: PCM, float, 24-bit, ...) when it is installed, else Python's ``wave``
    module, which reads integer PCM WAV only (8, 16, 24 or 32 bit).
    """
    try:
        import soundfile
    except ImportError:
        soundfile = None
    if soundfile is not None:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
        return samples.mean(axis=1), int(rate)
    try:
        with wave.open(io.BytesIO(data)) as w:
            width, channels, rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
            raw = w.readframes(w.getnframes())
    except EOFError:
        raise ValueError("truncated WAV header") from None
    except wave.Error as exc:
        raise ValueError(
            f"not a PCM WAV file Python's wave module reads ({exc}); install soundfile for float and "
            "extensible WAV, or convert it to 16-bit PCM"
        ) from None
    if width == 1:  # 8-bit WAV is unsigned
        ints = np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0
    elif width == 3:  # 24-bit: pad each little-endian sample to 32 bits
        padded = np.zeros((len(raw) // 3, 4), np.uint8)
        padded[:, 1:] = np.frombuffer(raw[: len(raw) // 3 * 3], np.uint8).reshape(-1, 3)
        ints = padded.view("<i4").ravel().astype(np.float32) / 256.0
    else:
        ints = np.frombuffer(raw, f"<i{width}").astype(np.float32)
    samples = ints / float(2 ** (8 * width - 1))
    return samples[: len(samples) // channels * channels].reshape(-1, channels).mean(axis=1), rate


def load_clips(
    root: Path, files: Sequence[Path], sample_rate: int, length: int
) -> tuple[np.ndarray, list[str]]:
    """float32 len(files) x length clips (cut or zero-padded at the end) and each file's digest.

    Raises:
        AudioFolderError: listing every file that is unreadable, empty, not a readable WAV, silent
            (no samples) or recorded at another sample rate.
    """
    clips = np.zeros((len(files), length), np.float32)
    digests, problems = [], []
    for i, relative in enumerate(files):
        path = root / relative
        try:
            data = path.read_bytes()
        except OSError as exc:
            problems.append(f"{path}: cannot be read ({exc.strerror or exc})")
            digests.append("")
            continue
        digests.append(f"{len(data)}:{hashlib.sha256(data).hexdigest()[:16]}")
        try:
            if not data:
                raise ValueError("empty file (0 bytes)")
            samples, rate = read_wav(data)
            if rate != sample_rate:
                raise ValueError(
                    f"recorded at {rate} Hz, but the task reads {sample_rate} Hz; resample it "
                    f"(e.g. `sox IN -r {sample_rate} OUT`) or set sample_rate if every file has {rate} Hz"
                )
            if not len(samples):
                raise ValueError("holds no samples")
        except Exception as exc:  # noqa: BLE001 - every decoder failure is reported with its file
            problems.append(f"{path}: {exc}")
            continue
        clips[i, : min(length, len(samples))] = samples[:length]
    if problems:
        raise AudioFolderError(f"{len(problems)} WAV file(s) cannot be used:\n{_listed(problems)}")
    return clips, digests


@TASKS.register(FOLDER_NAME)
def audio_folder(
    *,
    root: str | None = None,
    classes: Sequence[int] | None = None,
    representation: str = "logmel",
    sample_rate: int = SAMPLE_RATE,
    duration: float = 1.0,
    n_mels: int = 40,
    n_fft: int = 400,
    hop_length: int = 160,
    val_fraction: float = DEFAULT_FRACTIONS["val_fraction"],
    test_fraction: float = DEFAULT_FRACTIONS["test_fraction"],
    split_seed: int = 0,
    max_files: int = 50_000,
) -> AudioTask:
    """Your own WAV clips, one sub-folder per class (``root/<class>/**/*.wav``), as log-mel features.

    Every file is decoded when the task is built (soundfile if installed, else Python's ``wave``:
    integer PCM only) and must be at ``sample_rate``: files are never resampled. Multi-channel
    files are averaged to mono; clips are cut to ``duration`` seconds from their start or padded
    with silence at the end. Any unusable file is an error naming it; nothing is skipped.

    Args:
        root: Folder of class folders (sorted names are the classes). Required.
        classes: Class indices to keep, in label order; labels are renumbered. ``None`` keeps all.
        representation: "logmel" or "spectrogram_image" (see the module docstring).
        sample_rate: The sample rate, in Hz, that every file must have.
        duration: Seconds per clip after cutting or padding (0.1 to 30).
        n_mels: Mel bands.
        n_fft: STFT window and FFT length in samples.
        hop_length: Samples between frames.
        val_fraction: Share of the clips in the validation split, in (0, 0.5).
        test_fraction: Share of the clips in the test split, in (0, 0.5).
        split_seed: ``random_state`` of the stratified split (made over every class).
        max_files: Refuse folders with more WAV files than this (all are decoded into memory).
    """
    name = FOLDER_NAME
    if root is None or not str(root).strip():
        raise AudioFolderError("root is required: the folder holding one sub-folder of WAV files per class")
    representation = check_choice(name, "representation", representation, REPRESENTATIONS)
    sample_rate = check_int(name, "sample_rate", sample_rate, minimum=1000, maximum=384_000)
    if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not 0.1 <= duration <= 30:
        raise ValueError(f"{name}: duration must be a number of seconds in [0.1, 30], got {duration!r}")
    samples = int(round(duration * sample_rate))
    features = _feature_options(name, n_mels, n_fft, hop_length, sample_rate, samples)
    fractions = {
        k: check_fraction(name, k, v)
        for k, v in (("val_fraction", val_fraction), ("test_fraction", test_fraction))
    }
    split_seed = check_int(name, "split_seed", split_seed, minimum=0, maximum=2**32 - 1)
    folder = Path(root).expanduser()
    class_names, files, labels = list_wav_folder(folder, check_int(name, "max_files", max_files, minimum=1))
    picked = check_classes(name, classes, class_names)
    counts = np.bincount(labels, minlength=len(class_names))
    few = [f"{folder / n}: {c} file(s)" for n, c in zip(class_names, counts, strict=True) if c < len(SPLITS)]
    if few:
        raise AudioFolderError(f"every class needs at least 3 WAV files (train, val, test):\n{_listed(few)}")
    clips, digests = load_clips(folder, files, sample_rate, samples)
    try:
        split_index = stratified_split(name, labels, **fractions, seed=split_seed)
    except ValueError as exc:
        raise AudioFolderError(f"{str(exc).removeprefix(f'{name}: ')} (in '{folder}'); add clips") from None
    options = {
        "root": str(folder),
        "classes": list(picked) if picked is not None else None,
        "representation": representation,
        "duration": float(duration),
        **features,
        **fractions,
        "split_seed": split_seed,
        "max_files": max_files,
    }

    def load(split: str) -> tuple[Tensor, np.ndarray, np.ndarray]:
        rows = split_index[split]
        return torch.from_numpy(clips[rows]), labels[rows], rows.astype(np.int64)

    return AudioTask(
        name=name,
        load=load,
        reference=lambda: torch.from_numpy(clips[split_index["train"]]),
        samples=samples,
        class_names=class_names,
        classes=picked,
        features=features,
        representation=representation,
        options=options,
        content=stable_hash([[f.as_posix(), d] for f, d in zip(files, digests, strict=True)]),
        files=tuple(f.as_posix() for f in files),
    )
