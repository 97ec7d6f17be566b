"""Training images per second of ``transferlab.engine.fit.fit()`` against a plain PyTorch loop.

Both train the same model (one initial state, restored before every run), on the same in-memory
tensors, with the same batch size, optimiser settings and device; they run alternately in this
process for several rounds, and the ratio of their medians (fit / plain) is the result. Target: >= 1.

fit's training epochs are timed inside a real ``fit()`` call (its ``train_epoch`` is wrapped by a
timer); the rate of the whole call, with its set-up, a validation pass after every epoch and the
final test pass (32 images each), is reported beside it. The plain loop times its epochs and its
optimiser's creation.

Cases: CPU, timm ResNet-18 at 32 x 32 on the shapes task (always); with ``--device cuda``, ResNet-50
at 224 x 224 and ResNet-18 at 32 x 32 in bf16 autocast (fit turns AMP on for CUDA; the plain loop
uses ``torch.autocast``). ``benchmarks/gpu_check.py`` runs the CUDA cases with GPU utilisation.

    python -m benchmarks.trainer_throughput            # CPU case, 5 rounds
    python -m benchmarks.trainer_throughput --quick    # fewer images and rounds
    python -m benchmarks.trainer_throughput --device cuda
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.record import alternate, summary, write_record
from transferlab.engine import fit as fit_module
from transferlab.engine.assembly import build_model, build_task
from transferlab.engine.fit import FitConfig, fit
from transferlab.engine.model import TransferModel
from transferlab.tasks.base import Task

TARGET_RATIO = 1.0


@dataclass(frozen=True)
class Case:
    """One throughput measurement: model, input size, data size and training settings."""

    name: str
    device: str
    backbone: str
    image_size: int
    train_images: int
    batch_size: int
    epochs: int
    amp: bool


def cases(device: str, quick: bool) -> list[Case]:
    """The CPU case always; the GPU case (ResNet-50, 224 px, bf16) when ``device`` is cuda."""
    n = 256 if quick else 1024
    out = [Case("resnet18-32px-cpu", "cpu", "timm/resnet18", 32, n, 64, 2, amp=False)]
    return out + (cuda_cases(quick) if device == "cuda" else [])


def cuda_cases(quick: bool = False) -> list[Case]:
    """ResNet-50 at 224 px (compute-bound) and ResNet-18 at 32 px (launch-bound), both in bf16."""
    n = 256 if quick else 1024
    return [
        Case("resnet50-224px-cuda-bf16", "cuda", "timm/resnet50", 224, n, 64, 3, amp=True),
        Case("resnet18-32px-cuda-bf16", "cuda", "timm/resnet18", 32, 4 * n, 64, 3, amp=True),
    ]


def build(case: Case) -> tuple[TransferModel, Task]:
    """The shapes task (tiny val and test splits) and a backbone + classify head for it."""
    task = build_task(
        "shapes",
        {"image_size": case.image_size, "train_size": case.train_images, "val_size": 32, "test_size": 32},
    )
    model = build_model((case.backbone, {"pretrained": False}), ("classify", {}), task)
    return model, task


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class EpochTimer:
    """Wraps ``transferlab.engine.fit.train_epoch`` while a ``fit()`` call runs and sums its seconds."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds = device, 0.0

    def __enter__(self) -> EpochTimer:
        original = fit_module.train_epoch

        def timed(*args: Any, **kwargs: Any) -> Any:
            synchronize(self.device)
            started = time.perf_counter()
            out = original(*args, **kwargs)
            synchronize(self.device)
            self.seconds += time.perf_counter() - started
            return out

        self._original, fit_module.train_epoch = original, timed
        return self

    def __exit__(self, *exc: object) -> None:
        fit_module.train_epoch = self._original


def fit_run(
    model: TransferModel, initial: dict[str, Any], task: Task, case: Case, whole: list[float]
) -> float:
    """Images per second of ``fit()``'s training epochs; the whole call's rate is appended to ``whole``."""
    model.load_state_dict(initial)
    config = FitConfig(
        epochs=case.epochs,
        batch_size=case.batch_size,
        eval_batch_size=case.batch_size,
        lr=0.05,
        momentum=0.9,
        weight_decay=5e-4,
        schedule="none",
        amp=case.amp,
        device=case.device,
        seed=0,
    )
    device = torch.device(case.device)
    synchronize(device)
    started = time.perf_counter()
    with EpochTimer(device) as timer:
        fit(model, task, config)
    synchronize(device)
    images = case.train_images * case.epochs
    whole.append(images / (time.perf_counter() - started))
    return images / timer.seconds


def plain_run(model: TransferModel, initial: dict[str, Any], task: Task, case: Case) -> float:
    """Images per second of a hand-written loop: shuffle, slice, forward, loss, backward, step."""
    model.load_state_dict(initial)
    device = torch.device(case.device)
    data = task.dataset("train")
    images, labels = data.tensors["image"], data.tensors["label"]
    amp_dtype = torch.bfloat16
    synchronize(device)
    started = time.perf_counter()
    model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(0)
    for _ in range(case.epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), case.batch_size):
            index = order[start : start + case.batch_size]
            x = images[index].to(device, non_blocking=True)
            y = labels[index].to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=case.amp):
                logits = model({"image": x})["logits"]
                loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    synchronize(device)
    return case.train_images * case.epochs / (time.perf_counter() - started)


def measure(case: Case, rounds: int) -> dict[str, Any]:
    """Warm up both loops once, then ``rounds`` alternating rounds; medians, ratios and the target."""
    torch.manual_seed(0)
    model, task = build(case)
    initial = copy.deepcopy(model.state_dict())
    task.dataset("train")  # generate the data before anything is timed
    whole: list[float] = []
    runs = {
        "fit": lambda: fit_run(model, initial, task, case, whole),
        "plain": lambda: plain_run(model, initial, task, case),
    }
    alternate(runs, 1)  # warm-up: allocator, kernels, lazy imports
    whole.clear()
    measured = alternate(runs, rounds)
    fit_ips, plain_ips = measured["fit"], measured["plain"]
    ratio = statistics.median(fit_ips) / statistics.median(plain_ips)
    paired = [f / p for f, p in zip(fit_ips, plain_ips, strict=True)]
    return {
        **asdict(case),
        "rounds": rounds,
        "images_per_s": {"fit": fit_ips, "plain": plain_ips},
        "fit": summary(fit_ips),
        "plain": summary(plain_ips),
        "fit_whole_call": summary(whole),
        "ratio": ratio,
        "ratio_whole_call": statistics.median(whole) / statistics.median(plain_ips),
        "paired_ratio_median": statistics.median(paired),
        "target": TARGET_RATIO,
        "met": ratio >= TARGET_RATIO,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda adds the GPU case")
    parser.add_argument("--quick", action="store_true", help="fewer images and rounds (about a minute)")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 5, quick 3)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's own choice)"
    )
    parser.add_argument("--out", default=None, help="JSON record path (default benchmarks/results/...)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    rounds = args.rounds or (3 if args.quick else 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for case in cases(args.device, args.quick):
        print(
            f"[trainer_throughput] {case.name}: {case.train_images} images x {case.epochs} epochs, "
            f"batch {case.batch_size}, {rounds} rounds ...",
            flush=True,
        )
        result = measure(case, rounds)
        results.append(result)
        print(
            f"  fit   {result['fit']['median']:8.1f} images/s (min {result['fit']['min']:.1f}, "
            f"max {result['fit']['max']:.1f})\n"
            f"  plain {result['plain']['median']:8.1f} images/s (min {result['plain']['min']:.1f}, "
            f"max {result['plain']['max']:.1f})\n"
            f"  ratio fit/plain = {result['ratio']:.3f} (paired median {result['paired_ratio_median']:.3f}; "
            f"target >= {TARGET_RATIO}: {'met' if result['met'] else 'MISSED'})\n"
            f"  whole fit() call {result['fit_whole_call']['median']:8.1f} images/s "
            f"(with set-up, validation and test): ratio {result['ratio_whole_call']:.3f}",
            flush=True,
        )
    name = (
        "trainer_throughput" + ("_cuda" if args.device == "cuda" else "") + ("_quick" if args.quick else "")
    )
    path = write_record(name, {"quick": args.quick, "cases": results}, args.out)
    print(f"[trainer_throughput] record written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
