"""The one training loop, used by Ray Tune trials and by local runs alike.

Read it top to bottom: build the optimiser (one parameter group per stage, so each can have its own
learning-rate multiplier), then per epoch train, evaluate on val, report; finally evaluate on test
with the best (or last) weights and write a checkpoint.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from transferlab.atomic import atomic_path
from transferlab.engine import feature_cache
from transferlab.engine.augment import augmented_train_set
from transferlab.engine.checkpoint import save_checkpoint
from transferlab.engine.model import TransferModel
from transferlab.tasks.base import InMemoryDataset, Task


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the trial fails with where it happened."""

    def __init__(self, epoch: int, step: int, value: float) -> None:
        super().__init__(f"non-finite loss {value} at epoch {epoch}, step {step}")
        self.epoch, self.step, self.value = epoch, step, value

    def __reduce__(self) -> tuple:  # copied and pickled across Ray processes
        return (type(self), (self.epoch, self.step, self.value))


@dataclass
class FitConfig:
    """Training settings (the spec's ``train`` section)."""

    epochs: int = 10
    batch_size: int = 64
    eval_batch_size: int = 256
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    step_size: int = 10
    gamma: float = 0.1
    early_stopping_patience: int | None = None
    amp: bool = True
    device: str = "auto"
    num_workers: int = 0
    seed: int = 0
    stage_lr_mult: Sequence[float] | None = None
    head_lr_mult: float = 1.0
    feature_cache: bool = True
    feature_cache_dtype: str = "float32"
    feature_cache_max_mb: float = 2048.0
    channels_last: bool | None = None
    #: Keep in-memory data sets on the GPU (no host-to-device copy per batch); null: on CUDA when
    #: they take at most ``data_on_device_max_mb``.
    data_on_device: bool | None = None
    data_on_device_max_mb: float = 4096.0


@dataclass
class FitResult:
    """What ``fit`` returns: per-epoch metrics, the final test metrics and where the checkpoint is.

    ``best_epoch`` has the best validation score; ``test_epoch`` is the epoch whose weights were
    tested and saved (``best_epoch`` with early stopping, else the last epoch run).
    """

    history: list[dict[str, float]] = field(default_factory=list)
    test: dict[str, float] = field(default_factory=dict)
    best_epoch: int = 0
    epochs_run: int = 0
    test_epoch: int = 0
    resumed_from: int = 0
    steps: int = 0
    seconds: float = 0.0
    checkpoint: Path | None = None
    feature_cache: dict[str, Any] = field(default_factory=dict)
    device: dict[str, Any] = field(default_factory=dict)


EpochCallback = Callable[[int, dict[str, float]], None]


def resolve_device(device: str) -> torch.device:
    """ "auto" means CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def use_channels_last(config: FitConfig, device: torch.device) -> bool:
    """Whether 4-D weights go channels-last (NHWC): ``config.channels_last``, by default on CUDA only.

    cuDNN prefers NHWC under mixed precision; on CPU oneDNN's gain depends on the model (the
    yosinski-digits convnet trains about 15 % faster, timm's ResNet-18 at 32 px about 8 % slower).
    """
    return device.type == "cuda" if config.channels_last is None else bool(config.channels_last)


class _IndexedBatches(Dataset):
    """Item i is ``dataset.batch(chunks[i])``: lets DataLoader workers build whole in-memory batches."""

    def __init__(self, dataset: InMemoryDataset, chunks: Sequence[Tensor]) -> None:
        self.dataset, self.chunks = dataset, chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.dataset.batch(self.chunks[index])


def iterate_batches(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[dict[str, Any]]:
    """Batches of ``dataset``; in-memory data sets are sliced directly instead of collated.

    ``num_workers`` worker processes build the batches of data sets whose samples cost work
    (``InMemoryDataset.per_sample_work``, e.g. augmentation) and of data sets read sample by sample;
    ``pin_memory`` (on CUDA) puts their batches in page-locked memory for asynchronous copies.
    """
    # Worker processes draw their base seed from this generator, not from torch's global one, so
    # the trial's other random draws are the same with and without workers. It is the same seed every
    # epoch: augmentation draws are seeded per (seed, epoch, sample), not by the worker's generators.
    seeds = torch.Generator().manual_seed(0)
    if isinstance(dataset, InMemoryDataset):
        n = len(dataset)
        if n == 0:
            return
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        if num_workers > 0 and dataset.per_sample_work:
            yield from DataLoader(
                _IndexedBatches(dataset, order.split(batch_size)),
                batch_size=None,
                num_workers=num_workers,
                pin_memory=pin_memory,
                generator=seeds,
            )
            return
        if not dataset.extras:  # one copy of the order per epoch, not one per batch (and no GPU sync)
            order = order.to(dataset.device)
        for chunk in order.split(batch_size):
            yield dataset.batch(chunk)
        return
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator if shuffle else seeds,
        num_workers=num_workers,
        pin_memory=pin_memory,
    )
    yield from loader


def place_data(
    datasets: dict[str, Dataset], config: FitConfig, device: torch.device
) -> tuple[dict[str, Dataset], dict[str, Any]]:
    """Move in-memory data sets to the GPU when ``config`` allows it; facts for the trial's record.

    On CUDA a batch gathered from tensors already on the GPU needs no host-to-device copy and no
    synchronisation; data sets whose samples cost work on the CPU (augmentation) stay on the host.
    """
    facts: dict[str, Any] = {"device": str(device), "data_on_device": False}
    if device.type != "cuda" or config.data_on_device is False:
        return datasets, facts
    movable = {k: d for k, d in datasets.items() if isinstance(d, InMemoryDataset) and not d.per_sample_work}
    if not movable:
        return datasets, facts
    mb = sum(d.nbytes for d in movable.values()) / 2**20
    if config.data_on_device is None and mb > config.data_on_device_max_mb:
        facts["data_on_device_reason"] = (
            f"the data sets take {mb:.0f} MB, more than train.data_on_device_max_mb="
            f"{config.data_on_device_max_mb:g}"
        )
        return datasets, facts
    facts.update(data_on_device=True, data_on_device_mb=round(mb, 1))
    return {k: movable[k].to(device) if k in movable else d for k, d in datasets.items()}, facts


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def build_optimizer(model: TransferModel, config: FitConfig) -> torch.optim.Optimizer:
    """Parameter groups per trainable stage and for the head, each with its lr multiplier.

    As in timm's ``param_groups_weight_decay``, biases and normalisation weights (tensors of one
    dimension) get no weight decay; each stage therefore has up to two groups of the same lr.
    """
    groups = []
    for name, params in model.stage_parameter_groups():
        if name == "head":
            mult = config.head_lr_mult
        else:
            index = int(name.split(":")[1])
            mult = config.stage_lr_mult[index] if config.stage_lr_mult else 1.0
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        for group, weight_decay in ((decay, config.weight_decay), (no_decay, 0.0)):
            if group:
                groups.append(
                    {"params": group, "lr": config.lr * mult, "weight_decay": weight_decay, "name": name}
                )
    if not groups:
        raise ValueError("nothing to train: every parameter is frozen")
    # On CUDA one fused kernel updates every tensor of a group (foreach needs several per group, and
    # per-stage groups multiply the launches that small models wait for).
    fused = fused_optimizer(groups)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, fused=fused)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, fused=fused)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {config.optimizer!r}")


def fused_optimizer(groups: Sequence[dict[str, Any]]) -> bool | None:
    """``fused=True`` when every parameter is a floating-point CUDA tensor, else torch's default."""
    params = [p for g in groups for p in g["params"]]
    return True if params and all(p.is_cuda and p.is_floating_point() for p in params) else None


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """``optimizer.load_state_dict(state)``, keeping each group's ``fused`` setting as it is now.

    ``load_state_dict`` takes every group option from the saved state; a state saved by a run without
    the fused optimiser would turn it off again, while the optimiser still asks a gradient scaler for
    the fused step's arguments (an error under float16 mixed precision).
    """
    saved, now = state["param_groups"], optimizer.param_groups
    if len(saved) == len(now):  # else load_state_dict says what does not match
        groups = [dict(g, fused=n.get("fused")) for g, n in zip(saved, now, strict=True)]
        state = {**state, "param_groups": groups}
    optimizer.load_state_dict(state)


def build_schedule(
    optimizer: torch.optim.Optimizer, config: FitConfig
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Per-epoch schedule: cosine to zero over ``epochs``, step decay, or none."""
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(config.epochs, 1))
    if config.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.step_size, gamma=config.gamma)
    if config.schedule == "none":
        return None
    raise ValueError(f"schedule must be 'cosine', 'step' or 'none', got {config.schedule!r}")


def evaluate(
    model: TransferModel,
    task: Task,
    dataset: Dataset,
    config: FitConfig,
    device: torch.device,
    autocast: Callable[[], Any],
) -> dict[str, float]:
    """Mean loss and the task's metrics over ``dataset``, in eval mode without gradients."""
    model.eval()
    metrics = {k: m.to(device) for k, m in task.metrics().items()}
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in iterate_batches(
            dataset,
            config.eval_batch_size,
            shuffle=False,
            generator=None,
            num_workers=config.num_workers,
            pin_memory=device.type == "cuda",
        ):
            batch = to_device(batch, device)
            with autocast():
                outputs = model(batch)
            n = len(batch[model.input_key])
            total += float(task.loss(outputs, batch)) * n
            count += n
            task.update_metrics(metrics, outputs, batch)
    out = {"loss": total / max(count, 1)}
    out.update({k: float(m.compute()) for k, m in metrics.items()})
    return out


def _check_losses(losses: list[Tensor], checked: int, epoch: int, first_step: int) -> int:
    """Raise ``NonFiniteLossError`` for the first non-finite loss after ``losses[checked]``; return
    how many losses are now checked (one read of them all, not one per step)."""
    if checked == len(losses):
        return checked
    values = torch.stack(losses[checked:]).double().cpu()
    bad = (~torch.isfinite(values)).nonzero()
    if len(bad):
        index = int(bad[0])
        raise NonFiniteLossError(epoch, first_step + checked + index + 1, float(values[index]))
    return len(losses)


def start_cuda_memory(device: torch.device) -> int:
    """On CUDA: free the blocks this worker keeps cached (an earlier trial's, a failed one's too), reset
    the peak, and return the bytes still allocated (a reused worker's cached features); 0 elsewhere."""
    if device.type != "cuda":
        return 0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def cuda_memory_facts(device: torch.device, held_at_start: int) -> dict[str, float]:
    """A trial's ``cuda_peak_mb`` and ``cuda_held_at_start_mb`` (on CUDA; nothing elsewhere), after
    which unused cached blocks go back to the driver: other trials may share this GPU."""
    if device.type != "cuda":
        return {}
    facts = {
        "cuda_peak_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
        "cuda_held_at_start_mb": round(held_at_start / 2**20, 1),
    }
    torch.cuda.empty_cache()
    return facts


def loss_read_interval(device: torch.device) -> int:
    """Steps between reads of the training losses (and at every epoch's end): 1 on CPU, 50 on CUDA.

    On CUDA reading a loss waits for the GPU to finish the step, so the losses stay on the GPU and are
    read in blocks; a non-finite one is still reported with the step it happened at, and training
    stops within 50 steps of it.
    """
    return 50 if device.type == "cuda" else 1


def train_epoch(
    model: TransferModel,
    task: Task,
    dataset: Dataset,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    config: FitConfig,
    device: torch.device,
    autocast: Callable[[], Any],
    generator: torch.Generator,
    epoch: int,
    steps: int,
) -> tuple[dict[str, float], int]:
    """One pass over the training data; returns (train metrics, total steps so far).

    Raises:
        NonFiniteLossError: The loss became NaN or infinite.
    """
    model.train()
    metrics = {k: m.to(device) for k, m in task.metrics().items()}
    interval = loss_read_interval(device)
    losses: list[Tensor] = []
    sizes: list[int] = []
    first_step, checked = steps, 0
    batches = iterate_batches(
        dataset,
        config.batch_size,
        shuffle=True,
        generator=generator,
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
    )
    for batch in batches:
        batch = to_device(batch, device)
        with autocast():
            outputs = model(batch)
            loss = task.loss(outputs, batch)
        steps += 1
        losses.append(loss.detach().float())
        if len(losses) % interval == 0:  # before the step: a non-finite loss never updates the weights
            checked = _check_losses(losses, checked, epoch, first_step)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        sizes.append(len(batch[model.input_key]))
        task.update_metrics(metrics, outputs, batch)
    _check_losses(losses, checked, epoch, first_step)
    values = torch.stack(losses).double().cpu() if losses else torch.zeros(0, dtype=torch.float64)
    count = sum(sizes)
    total = float((values * torch.tensor(sizes, dtype=torch.float64)).sum()) if sizes else 0.0
    row = {"train/loss": total / max(count, 1)}
    row.update({f"train/{k}": float(m.compute()) for k, m in metrics.items()})
    return row, steps


def save_training_state(path: Path, state: dict[str, Any]) -> None:
    """Write the state to resume training from (tensors and plain values only) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_training_state(path: Path) -> dict[str, Any] | None:
    """The saved training state, loaded with ``weights_only=True`` (no code is unpickled); None if absent."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        raise ValueError(
            f"cannot resume from {path}: {type(exc).__name__}: {str(exc).splitlines()[0]} "
            "(delete the file to start the trial from scratch)"
        ) from exc


def fit(
    model: TransferModel,
    task: Task,
    config: FitConfig,
    *,
    on_epoch: EpochCallback | None = None,
    checkpoint_path: str | Path | None = None,
    checkpoint_metadata: dict[str, Any] | None = None,
    resume_path: str | Path | None = None,
    augment: Sequence[Any] | None = None,
) -> FitResult:
    """Train ``model`` on ``task`` and evaluate it.

    Args:
        model: The model; its frozen prefix is respected.
        task: Provides the data sets, the loss and the metrics.
        config: Training settings.
        on_epoch: Called after each epoch with (epoch from 1, {"train/loss": ..., "val/accuracy": ...}).
        checkpoint_path: Where to write the final weights (safetensors), if given.
        checkpoint_metadata: Stored in the checkpoint's header.
        resume_path: Where the training state is saved after every epoch. If a state is already there
            (the trial was interrupted or retried), training resumes after its epoch and the earlier
            epochs' rows are passed to ``on_epoch`` again, so a fresh record of them is complete.
        augment: The spec's ``augment`` list (albumentations transforms, see
            ``transferlab.engine.augment``), applied to the training split only, seeded by
            ``config.seed`` and the epoch.

    Raises:
        NonFiniteLossError: The loss became NaN or infinite.
    """
    started = time.perf_counter()
    device = resolve_device(config.device)
    held_at_start = start_cuda_memory(device)
    model.to(device)
    if use_channels_last(config, device):
        model.to(memory_format=torch.channels_last)
    use_amp = config.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    def autocast() -> Any:
        return torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp)

    optimizer = build_optimizer(model, config)
    schedule = build_schedule(optimizer, config)
    generator = torch.Generator().manual_seed(config.seed)
    train_set, val_set, test_set = (task.dataset(s) for s in ("train", "val", "test"))
    if augment:  # evaluation data is never augmented
        train_set = augmented_train_set(task, augment, seed=config.seed)
    placed, device_facts = place_data({"train": train_set, "val": val_set, "test": test_set}, config, device)
    train_set, val_set, test_set = placed["train"], placed["val"], placed["test"]
    primary, sign = task.primary_metric, (1.0 if task.higher_is_better else -1.0)
    result = FitResult(device=device_facts)
    best_score, best_state, stale, first_epoch = -math.inf, None, 0, 1

    resume_file = Path(resume_path) if resume_path is not None else None
    saved = load_training_state(resume_file) if resume_file is not None else None
    if saved is not None:  # continue an interrupted run exactly where its last epoch ended
        model.load_state_dict(saved["model"])
        load_optimizer_state(optimizer, saved["optimizer"])
        if schedule is not None:
            schedule.load_state_dict(saved["schedule"])
        scaler.load_state_dict(saved["scaler"])
        generator.set_state(saved["generator"])
        result.history, result.steps = list(saved["history"]), int(saved["steps"])
        result.best_epoch, result.resumed_from = int(saved["best_epoch"]), int(saved["epoch"])
        best_score, stale, best_state = float(saved["best_score"]), int(saved["stale"]), saved["best_state"]
        first_epoch = result.epochs_run = int(saved["epoch"])
        first_epoch += 1
        for epoch, row in enumerate(result.history, start=1):
            if on_epoch is not None:
                on_epoch(epoch, row)

    # A frozen prefix that cannot change runs once per sample, not once per epoch (feature_cache).
    cache = feature_cache.prepare(
        model,
        task,
        {"train": train_set, "val": val_set, "test": test_set},
        augment=augment,
        enabled=config.feature_cache,
        dtype=config.feature_cache_dtype,
        max_mb=config.feature_cache_max_mb,
        batch_size=config.batch_size,  # on CPU large batches run the prefix slower per sample
        device=device,
        # Features join data sets placed on the GPU only within the same budget; else the host keeps them.
        gpu_budget_mb=config.data_on_device_max_mb - result.device.get("data_on_device_mb", 0.0),
    )
    train_set, val_set, test_set = (
        cache.wrap(s, d) for s, d in (("train", train_set), ("val", val_set), ("test", test_set))
    )

    for epoch in range(first_epoch, config.epochs + 1):
        if hasattr(train_set, "set_epoch"):  # augmentation draws are seeded per epoch
            train_set.set_epoch(epoch)
        row, result.steps = train_epoch(
            model,
            task,
            train_set,
            optimizer,
            scaler,
            config,
            device,
            autocast,
            generator,
            epoch,
            result.steps,
        )
        lr_used = optimizer.param_groups[-1]["lr"]  # the head's lr during this epoch
        if schedule is not None:
            schedule.step()
        row.update(
            {f"val/{k}": v for k, v in evaluate(model, task, val_set, config, device, autocast).items()}
        )
        row["lr"] = lr_used
        result.history.append(row)
        result.epochs_run = epoch

        # -- early stopping on the primary validation metric --------------------------------------
        score = sign * row[f"val/{primary}"]
        if score > best_score:
            best_score, result.best_epoch, stale = score, epoch, 0
            if config.early_stopping_patience is not None:
                best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
        if resume_file is not None:
            state = {
                "epoch": epoch,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict() if schedule is not None else {},
                "scaler": scaler.state_dict(),
                "generator": generator.get_state(),
                "history": result.history,
                "steps": result.steps,
                "best_epoch": result.best_epoch,
                "best_score": best_score,
                "stale": stale,
                "best_state": best_state,
            }
            save_training_state(resume_file, state)
        if on_epoch is not None:
            on_epoch(epoch, row)
        if config.early_stopping_patience is not None and stale >= config.early_stopping_patience:
            break

    result.test_epoch = result.epochs_run
    if best_state is not None:  # evaluate and save the weights of the best validation epoch
        model.load_state_dict(best_state)
        result.test_epoch = result.best_epoch
    result.test = evaluate(model, task, test_set, config, device, autocast)
    result.feature_cache = cache.report()
    result.device.update(cuda_memory_facts(device, held_at_start))
    if checkpoint_path is not None:
        meta = dict(checkpoint_metadata or {}, epoch=result.test_epoch)
        result.checkpoint = save_checkpoint(model, checkpoint_path, meta)
    result.seconds = time.perf_counter() - started
    return result
