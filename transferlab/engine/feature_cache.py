"""Frozen-prefix feature cache: compute a frozen prefix's output once per sample and reuse it.

When a trial's first n stages are frozen with ``bn: frozen`` (so BatchNorm keeps its running
statistics and dropout is off: the prefix is a fixed function) and its inputs are deterministic (no
``augment``), the prefix's output for every sample is the same in every epoch. ``fit`` then runs the
prefix once over each split, keeps every frozen stage's output (heads such as ``unet`` read the
early stages too) and trains the suffix and the head on those features.

Entries live in a process-wide LRU store, so a later trial in the same process (Ray reuses worker
processes) with the same key reuses them: the key is the frozen prefix itself (its modules'
structure and a hash of its parameters and buffers, i.e. of the copied base checkpoint or of a
random initialisation), the task's fingerprint (samples, classes, preprocessing), the split, the
input transform, the depth and the storage dtype. Features may be stored in float16 or bfloat16 to
halve the memory; they are turned back into float32 for the suffix. An entry larger than the
size limit is not cached: the trial runs its prefix every step as without a cache and says why.
"""

from __future__ import annotations

import hashlib
import logging
import math
import statistics
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from transferlab.engine.model import frozen_feature_keys
from transferlab.tasks.base import InMemoryDataset, Task, stable_hash

log = logging.getLogger(__name__)

STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: The batch fields of the cached outputs of frozen stages 1..depth, which ``TransferModel`` reads.
feature_keys = frozen_feature_keys


@dataclass(frozen=True)
class CacheKey:
    """What a prefix's features depend on; any difference is a different entry."""

    prefix: str  # the frozen stages' structure, parameters and buffers
    data: str  # the task's fingerprint: samples, classes and preprocessing of every split
    split: str
    transform: str  # the input field and any transform between the data set and the backbone
    depth: int
    dtype: str
    device: str = "cpu"  # where the features are kept: the GPU only within ``gpu_budget_mb``, else the host


@dataclass
class Entry:
    """Cached features of one split: one tensor per frozen stage, and what computing them cost."""

    features: list[Tensor]
    seconds: float  # wall time of the one pass that computed them
    seconds_per_sample: float  # the prefix's steady cost per sample (median over full batches)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.features)


class FeatureStore:
    """The process-wide store of cached features, least recently used first out, within a byte budget."""

    def __init__(self) -> None:
        self._entries: OrderedDict[CacheKey, Entry] = OrderedDict()

    def get(self, key: CacheKey) -> Entry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: CacheKey, entry: Entry, max_bytes: int) -> None:
        """Keep ``entry``, evicting the least recently used entries until the store fits ``max_bytes``."""
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while self.nbytes > max_bytes and len(self._entries) > 1:
            evicted, old = self._entries.popitem(last=False)
            log.info("feature cache: evicted %s split (%.1f MB)", evicted.split, old.nbytes / 2**20)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


STORE = FeatureStore()


def prefix_hash(stages: Sequence[torch.nn.Module]) -> str:
    """A hash of frozen stages: their module structure (``repr``) and every parameter and buffer."""
    h = hashlib.sha256()
    for i, stage in enumerate(stages):
        h.update(f"{i}:{stage!r}".encode())
        for name, tensor in stage.state_dict().items():
            t = tensor.detach().cpu().contiguous()  # bytes of any dtype, bfloat16 too
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class CachedFeatureDataset(InMemoryDataset):
    """An in-memory split whose batches also carry the frozen prefix's cached outputs.

    ``features`` maps the batch fields ``frozen_features.<i>`` to their tensors (all samples); a
    batch gets them sliced and as float32. It counts the samples it serves and the time slicing
    their features takes (the cache's own cost, set against the prefix passes it saves).
    """

    def __init__(self, base: InMemoryDataset, entry: Entry, computed_here: bool) -> None:
        super().__init__(dict(base.tensors), base.extras)
        self.features = dict(zip(feature_keys(len(entry.features)), entry.features, strict=True))
        self.entry = entry
        self.computed_here = computed_here
        self.served = 0
        self.serve_seconds = 0.0

    @property
    def device(self) -> torch.device:
        """Where batch indices are best made: the host when any features are kept there (indices go
        to the GPU without waiting for it; the other way round each batch would wait)."""
        if any(f.device.type == "cpu" for f in self.features.values()):
            return torch.device("cpu")
        return super().device

    def batch(self, indices: Tensor) -> dict[str, Any]:
        out = super().batch(indices)
        started = time.perf_counter()
        for key, features in self.features.items():
            out[key] = features[indices.to(features.device)].float()
        self.serve_seconds += time.perf_counter() - started
        self.served += len(indices)
        return out


@dataclass
class FeatureCache:
    """The cache decision of one ``fit`` call and, at the end, what it saved (``report``)."""

    enabled: bool
    reason: str
    dtype: str = "float32"
    splits: dict[str, CachedFeatureDataset] = field(default_factory=dict)

    def wrap(self, split: str, dataset: Any) -> Any:
        """The cached version of ``dataset`` (the split's data set) when the cache is on, else itself."""
        return self.splits.get(split, dataset)

    def report(self) -> dict[str, Any]:
        """Facts for the trial's record: on or off and why, hits, misses and the seconds saved.

        A hit is a sample whose prefix output came from the cache; a miss one whose output was
        computed (once per sample and split, unless another trial had computed it). The time saved
        is the hits times the per-sample cost of the prefix measured when the entry was filled, less
        the time spent slicing cached features into batches (it can be negative: a cheap, wide
        first stage costs more to gather than to compute).
        """
        out: dict[str, Any] = {"feature_cache": "on" if self.enabled else "off"}
        if not self.enabled:
            out["feature_cache_reason"] = self.reason
            return out
        hits = misses = 0
        saved = 0.0
        for data in self.splits.values():
            computed = len(data) if data.computed_here else 0
            split_hits = max(data.served - computed, 0)
            hits, misses = hits + split_hits, misses + computed
            saved += split_hits * data.entry.seconds_per_sample - data.serve_seconds
        out.update(
            feature_cache_dtype=self.dtype,
            feature_cache_hits=hits,
            feature_cache_misses=misses,
            feature_cache_seconds_saved=round(saved, 3),
            feature_cache_mb=round(sum(d.entry.nbytes for d in self.splits.values()) / 2**20, 2),
        )
        return out


def why_not(model: Any, datasets: dict[str, Any], augment: Sequence[Any] | None, enabled: bool) -> str | None:
    """Why the frozen prefix's features cannot be cached for this trial; ``None`` when they can."""
    if not enabled:
        return "turned off (train.feature_cache: false)"
    if model.freeze_depth == 0:
        return "no stage is frozen"
    if model.bn_policy != "frozen":
        return (
            "bn: train lets the frozen stages' BatchNorm statistics follow the data, so their output changes"
        )
    if augment:
        return "random augmentation (augment) changes the inputs every epoch"
    lazy = [split for split, data in datasets.items() if not isinstance(data, InMemoryDataset)]
    if lazy:
        return f"the {', '.join(lazy)} data sets are read from files, not held in memory"
    return None


def prepare(
    model: Any,
    task: Task,
    datasets: dict[str, Any],
    *,
    augment: Sequence[Any] | None,
    enabled: bool,
    dtype: str,
    max_mb: float,
    batch_size: int,
    device: torch.device,
    gpu_budget_mb: float = math.inf,
) -> FeatureCache:
    """Look up or compute the frozen prefix's features of every split, or say why not.

    Args:
        model: A ``TransferModel`` on ``device`` with its frozen prefix set.
        task: The task ``datasets`` come from (its fingerprint keys the entries).
        datasets: The data sets by split ("train", "val", "test").
        augment: The trial's augmentation list; any augmentation turns the cache off.
        enabled: The spec's ``train.feature_cache``.
        dtype: Storage dtype: "float32", "float16" or "bfloat16".
        max_mb: The process-wide size limit of the cache, in MiB.
        batch_size: Samples per prefix pass.
        device: Where the prefix runs.
        gpu_budget_mb: GPU memory the features may take when the data sets are on the GPU; features
            that do not fit are kept in host memory (and copied to the GPU batch by batch).
    """
    if dtype not in STORAGE_DTYPES:
        raise ValueError(
            f"train.feature_cache_dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}"
        )
    reason = why_not(model, datasets, augment, enabled)
    if reason is not None:
        return FeatureCache(False, reason)
    depth = model.freeze_depth
    prefix = prefix_hash(model.frozen_stages)
    data = task.fingerprint()
    transform = stable_hash({"input_key": model.input_key, "augment": None})
    max_bytes = int(max_mb * 2**20)
    needed = sum(_entry_bytes(model, ds, dtype) for ds in datasets.values())
    if needed > max_bytes:
        reason = (
            f"the features would take {needed / 2**20:.0f} MB, more than the limit "
            f"train.feature_cache_max_mb={max_mb:g}; the prefix runs every step instead"
        )
        log.warning("feature cache off: %s", reason)
        return FeatureCache(False, reason, dtype)
    cache = FeatureCache(True, "", dtype)
    on_gpu = needed <= gpu_budget_mb * 2**20
    for split, dataset in datasets.items():
        if len(dataset) == 0:
            continue
        keep = dataset.device if dataset.device.type == "cpu" or on_gpu else torch.device("cpu")
        key = CacheKey(prefix, data, split, transform, depth, dtype, str(keep))
        entry, computed = STORE.get(key), False
        if entry is None:
            entry, computed = compute(model, dataset, batch_size, device, STORAGE_DTYPES[dtype], keep), True
            STORE.put(key, entry, max_bytes)
        cache.splits[split] = CachedFeatureDataset(dataset, entry, computed)
    return cache


def _entry_bytes(model: Any, dataset: InMemoryDataset, dtype: str) -> int:
    """The bytes one split's features take: one sample through the prefix, times the samples."""
    if len(dataset) == 0:
        return 0
    sample = dataset.tensors[model.input_key][:1]
    device = next(iter(model.parameters())).device
    features = model.forward_frozen(sample.to(device))
    itemsize = torch.empty((), dtype=STORAGE_DTYPES[dtype]).element_size()
    return sum(f[0].numel() for f in features) * itemsize * len(dataset)


def compute(
    model: Any,
    dataset: InMemoryDataset,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    keep: torch.device | None = None,
) -> Entry:
    """Every frozen stage's output for every sample of ``dataset`` (eval mode, no gradients).

    The features are kept on ``keep``: by default where the data set's tensors are (on the GPU for a
    data set placed there by ``fit.place_data``), else in host memory.
    """
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    parts: list[list[Tensor]] = []
    full_batches: list[float] = []  # seconds of each full batch: the steady cost, without warm-ups
    try:
        inputs = dataset.tensors[model.input_key]
        keep = inputs.device if keep is None else keep
        for start in range(0, len(dataset), batch_size):
            tick = time.perf_counter()
            x = inputs[start : start + batch_size].to(device, non_blocking=True)
            parts.append([f.to(keep, dtype) for f in model.forward_frozen(x)])
            if device.type == "cuda":  # time the work, not its launch
                torch.cuda.synchronize(device)
            if len(x) == batch_size:
                full_batches.append(time.perf_counter() - tick)
    finally:
        model.train(was_training)
    features = [torch.cat(stage) for stage in zip(*parts, strict=True)]
    seconds = time.perf_counter() - started
    if full_batches:
        per_sample = statistics.median(full_batches) / batch_size
    else:
        per_sample = seconds / len(dataset)
    return Entry(features, seconds, per_sample)
