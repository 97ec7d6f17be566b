"""The GPU check: CUDA paths that the CPU test suite cannot run, throughput, and fractional-GPU trials.

One prepared script for a machine with an NVIDIA GPU (CI has none). Each section is independent: a
failing check is recorded with its error and the script goes on, so one run reports everything. Every
section writes its part of the JSON record as soon as it ends (``--out``), so a run cut short still
leaves what it measured. Exit status 1 when any check failed.

Sections:

* ``env``: torch, CUDA, the device, bf16 support.
* ``checks``: asserted behaviour on CUDA: ``fit`` in bf16 autocast with channels-last weights and the
  data sets on the GPU (trial facts, a checkpoint that evaluates the same on the CPU); a non-finite
  loss named with its step although losses are read once per epoch; the frozen-prefix feature cache
  on the GPU (exact features, same results as without it); a multitask trial in bf16; augmented
  training with DataLoader workers and pinned memory.
* ``throughput``: ``benchmarks.trainer_throughput`` on CUDA: ResNet-50 at 224 px in bf16 and ResNet-18
  at 32 px (where per-step synchronisation would show), fit against a plain loop, with GPU
  utilisation (NVML samples) and peak memory.
* ``ablation``: ResNet-18 at 32 px (launch-bound) through ``fit`` with one thing changed at a time
  (optimiser kernels, memory format, metric updates) against the plain loop in both formats.
* ``study``: ``yosinski-digits`` (one seed, 27 trials) through ``transferlab.submit`` on the GPU with
  ``resources.gpu: 1`` (one trial at a time) and ``gpu: 0.25`` (four share the GPU): wall time, trials
  running at once, GPU utilisation, each trial's peak memory, and the accuracies side by side.

    python -m benchmarks.gpu_check                      # everything (about 5 minutes on an H100)
    python -m benchmarks.gpu_check --sections checks    # one or more sections, comma-separated
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from benchmarks.record import machine_info, write_record

SECTIONS = ("env", "checks", "throughput", "ablation", "study")


# -- GPU utilisation -------------------------------------------------------------------------------------


class GpuSampler:
    """Samples the GPU's utilisation (%) and used memory (MiB) through NVML in a background thread."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.util: list[float] = []
        self.memory_mb: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str | None = None

    def __enter__(self) -> GpuSampler:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        except Exception as exc:  # no NVML: the numbers are reported missing, not invented
            self.error = f"{type(exc).__name__}: {exc}"
            return self

        def run() -> None:
            while not self._stop.is_set():
                self.util.append(float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu))
                self.memory_mb.append(pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20)
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def summary(self) -> dict[str, Any]:
        if not self.util:
            return {"nvml": self.error or "no samples"}
        return {
            "gpu_util_mean_pct": round(statistics.mean(self.util), 1),
            "gpu_util_median_pct": statistics.median(self.util),
            "gpu_util_max_pct": max(self.util),
            "gpu_memory_used_max_mb": round(max(self.memory_mb), 1),
            "samples": len(self.util),
        }


# -- checks ------------------------------------------------------------------------------------------------


class Checks:
    """Runs named checks, recording pass/fail, the error and any facts each returns."""

    def __init__(self) -> None:
        self.results: list[dict[str, Any]] = []

    def run(self, name: str, check: Callable[[], dict[str, Any] | None]) -> None:
        started = time.perf_counter()
        print(f"[gpu_check] check {name} ...", flush=True)
        try:
            facts = check() or {}
            entry = {"name": name, "ok": True, **facts}
        except Exception as exc:
            entry = {"name": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
            traceback.print_exc()
        entry["seconds"] = round(time.perf_counter() - started, 2)
        print(f"[gpu_check]   {'ok' if entry['ok'] else 'FAILED'}: {entry}", flush=True)
        self.results.append(entry)


def _digits(classes: list[int] | None = None) -> Any:
    from transferlab.engine.assembly import build_task

    return build_task("digits", {"image_size": 32}, classes=classes or [5, 6, 7, 8, 9])


def _convnet(task: Any, depth: int = 0, seed: int = 0) -> Any:
    from transferlab.engine.assembly import build_model

    torch.manual_seed(seed)
    return build_model(("convnet", {"widths": [16, 32, 64, 96]}), ("classify", {}), task, freeze_depth=depth)


def check_fit_bf16(folder: Path) -> dict[str, Any]:
    """fit on CUDA: bf16 autocast, NHWC weights, data on the GPU; its checkpoint scores the same on CPU."""
    from transferlab.engine.checkpoint import load_state
    from transferlab.engine.fit import FitConfig, evaluate, fit

    task = _digits()
    model = _convnet(task)
    config = FitConfig(epochs=4, batch_size=32, device="cuda")
    result = fit(model, task, config, checkpoint_path=folder / "m.safetensors")
    facts = result.device
    assert facts["device"].startswith("cuda") and facts["data_on_device"] is True, facts
    assert facts["cuda_peak_mb"] > 0, facts
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last), "weights are not channels-last"
    assert all(math.isfinite(v) for row in result.history for v in row.values())
    assert result.test["accuracy"] > 0.8, result.test  # 5 classes: chance is 0.2
    cpu_model = _convnet(task)
    cpu_model.load_state_dict(load_state(result.checkpoint))
    cpu = FitConfig(device="cpu", amp=False)
    on_cpu = evaluate(cpu_model.to("cpu"), task, task.dataset("test"), cpu, torch.device("cpu"), nullcontext)
    assert abs(on_cpu["accuracy"] - result.test["accuracy"]) <= 0.02, (on_cpu, result.test)
    return {"test_accuracy_cuda": result.test["accuracy"], "test_accuracy_cpu": on_cpu["accuracy"], **facts}


def check_deferred_nan() -> dict[str, Any]:
    """A non-finite loss on CUDA is named with its step, although losses are read once per epoch."""
    from transferlab.engine import fit as fit_module
    from transferlab.engine.fit import FitConfig, NonFiniteLossError, fit

    assert fit_module.loss_read_interval(torch.device("cuda")) > 1
    task = _digits([0, 1])
    steps_per_epoch = -(-len(task.dataset("train")) // 64)
    bad_step = steps_per_epoch + 2  # the second step of epoch 2
    calls = {"n": 0}
    original = task.loss

    def loss(outputs: Any, batch: Any) -> Any:
        calls["n"] += torch.is_grad_enabled()
        value = original(outputs, batch)
        return value * float("inf") if calls["n"] == bad_step and torch.is_grad_enabled() else value

    task.loss = loss
    try:
        fit(_convnet(task), task, FitConfig(epochs=3, batch_size=64, device="cuda"))
    except NonFiniteLossError as exc:
        assert (exc.epoch, exc.step) == (2, bad_step), (exc.epoch, exc.step, bad_step)
        return {"error_message": str(exc)}
    raise AssertionError("no NonFiniteLossError")


def check_feature_cache() -> dict[str, Any]:
    """The cache on the GPU: exact prefix features, kept on the GPU, same results as without it."""
    from transferlab.engine import feature_cache
    from transferlab.engine.fit import FitConfig, fit

    task = _digits()
    runs = {}
    for cached in (False, True):
        feature_cache.STORE.clear()
        model = _convnet(task, depth=2, seed=1)
        config = FitConfig(epochs=3, batch_size=32, device="cuda", feature_cache=cached, amp=False)
        runs[cached] = (model, fit(model, task, config))
    model, result = runs[True]
    report = result.feature_cache
    assert report["feature_cache"] == "on" and report["feature_cache_hits"] > 0, report
    entry = next(iter(feature_cache.STORE._entries.values()))
    assert entry.features[0].is_cuda, "cached features are not on the GPU"
    # Exact features: the cache's entry for the test split equals a fresh pass of the frozen prefix.
    test_key = next(k for k in feature_cache.STORE._entries if k.split == "test")
    cached_features = feature_cache.STORE._entries[test_key].features
    model.eval()
    inputs = task.dataset("test").tensors[model.input_key].to("cuda")
    chunks = [model.forward_frozen(x) for x in inputs.split(32)]  # the cache's batch size: same kernels
    fresh = [torch.cat(stage) for stage in zip(*chunks, strict=True)]
    worst = max(float((a - b.float()).abs().max()) for a, b in zip(fresh, cached_features, strict=True))
    for a, b in zip(fresh, cached_features, strict=True):
        torch.testing.assert_close(b.float(), a, rtol=1e-4, atol=1e-5)
    off, on = runs[False][1].test["accuracy"], result.test["accuracy"]
    assert abs(off - on) <= 0.02, (off, on)
    return {"test_accuracy_off": off, "test_accuracy_on": on, "max_feature_difference": worst, **report}


def check_multitask() -> dict[str, Any]:
    """A multitask trial (classify + bbox on one trunk) trains on CUDA in bf16."""
    from transferlab.engine.trial import run_trial
    from transferlab.service.planner import plan_trials
    from transferlab.service.spec import validate_spec_text

    shapes = "{name: shapes, target: %s, image_size: 32, train_size: 256, val_size: 64, test_size: 64}"
    text = (
        "name: mt-gpu\nstudy: multitask\nbackbone: {name: convnet, widths: [16, 32, 48]}\n"
        f"multitask:\n  tasks:\n    cls: {{task: {shapes % 'label'}, head: classify}}\n"
        f"    box: {{task: {shapes % 'box'}, head: bbox}}\n  weightings: [uncertainty]\n"
        "  single_task_baselines: false\n"
        "train: {epochs: 3, batch_size: 32, optimizer: adamw, lr: 0.003, device: cuda}\n"
        "seeds: [0]\nresources: {cpu: 1, gpu: 1}\n"
    )
    vspec = validate_spec_text(text)
    trial = plan_trials(vspec)[0]
    result, facts = run_trial(trial.config(vspec))
    assert facts["device"].startswith("cuda") and facts["cuda_peak_mb"] > 0, facts
    assert all(math.isfinite(v) for v in result.test.values()), result.test
    return {"test": result.test, "cuda_peak_mb": facts["cuda_peak_mb"]}


def check_augmented_workers() -> dict[str, Any]:
    """Augmented training with two DataLoader workers and pinned memory; val/test sit on the GPU."""
    from transferlab.engine.assembly import build_model, build_task
    from transferlab.engine.fit import FitConfig, fit

    task = build_task(
        "shapes", {"target": "mask", "image_size": 32, "train_size": 256, "val_size": 64, "test_size": 64}
    )
    torch.manual_seed(0)
    model = build_model(("convnet", {"widths": [16, 32, 48]}), ("unet", {}), task)
    config = FitConfig(epochs=2, batch_size=32, device="cuda", num_workers=2)
    result = fit(model, task, config, augment=[{"name": "HorizontalFlip", "p": 0.5}])
    assert result.device["data_on_device"] is True, result.device  # val and test moved, train not
    assert all(math.isfinite(v) for v in result.test.values()), result.test
    return {"test": result.test, **result.device}


def section_checks(folder: Path) -> dict[str, Any]:
    checks = Checks()
    checks.run("fit_bf16_channels_last_data_on_gpu", lambda: check_fit_bf16(folder))
    checks.run("non_finite_loss_named_with_its_step", check_deferred_nan)
    checks.run("feature_cache_on_gpu", check_feature_cache)
    checks.run("multitask_bf16", check_multitask)
    checks.run("augmented_workers_pinned_memory", check_augmented_workers)
    return {"checks": checks.results, "ok": all(c["ok"] for c in checks.results)}


# -- throughput -------------------------------------------------------------------------------------------


def section_throughput(rounds: int) -> dict[str, Any]:
    from benchmarks.trainer_throughput import cuda_cases, measure

    out = []
    for case in cuda_cases():
        print(f"[gpu_check] throughput {case.name} ...", flush=True)
        torch.cuda.reset_peak_memory_stats()
        with GpuSampler() as sampler:
            result = measure(case, rounds)
        result["gpu"] = sampler.summary()
        result["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        print(
            f"[gpu_check]   fit {result['fit']['median']:.0f} vs plain "
            f"{result['plain']['median']:.0f} images/s: "
            f"ratio {result['ratio']:.3f}; whole call {result['fit_whole_call']['median']:.0f}; "
            f"{result['gpu']}; peak {result['cuda_peak_mb']} MB",
            flush=True,
        )
        out.append(result)
    return {"cases": out, "ok": True}


def section_ablation(rounds: int) -> dict[str, Any]:
    """Where a small model's steps go in ``fit`` on CUDA: fit with one thing changed at a time.

    ResNet-18 at 32 px is launch-bound (each step is many tiny kernels), so per-step work that the
    plain loop does not do shows here: fused vs foreach optimiser, channels-last vs NCHW, metric
    updates; the plain loop in NCHW and in channels-last is the baseline.
    """
    from benchmarks.record import alternate, summary
    from benchmarks.trainer_throughput import Case, EpochTimer, build, plain_run
    from transferlab.engine import fit as fit_module
    from transferlab.engine.fit import FitConfig, fit

    case = Case("resnet18-32px-cuda-bf16", "cuda", "timm/resnet18", 32, 4096, 64, 2, amp=True)
    torch.manual_seed(0)
    model, task = build(case)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    images = case.train_images * case.epochs
    device = torch.device("cuda")

    def fit_variant(
        channels_last: bool = True, fused: bool = True, metrics: bool = True
    ) -> Callable[[], float]:
        def run() -> float:
            model.load_state_dict(initial)
            config = FitConfig(
                epochs=case.epochs,
                batch_size=case.batch_size,
                eval_batch_size=256,
                lr=0.05,
                schedule="none",
                amp=True,
                device="cuda",
                channels_last=channels_last,
            )
            saved_fused, saved_update = fit_module.fused_optimizer, task.update_metrics
            if not fused:
                fit_module.fused_optimizer = lambda groups: None
            if not metrics:
                task.update_metrics = lambda *args, **kwargs: None
            try:
                with EpochTimer(device) as timer:
                    fit(model, task, config)
            finally:
                fit_module.fused_optimizer, task.update_metrics = saved_fused, saved_update
            model.to(memory_format=torch.contiguous_format)
            return images / timer.seconds

        return run

    def plain_variant(channels_last: bool) -> Callable[[], float]:
        def run() -> float:
            model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            return plain_run(model, initial, task, case)

        return run

    runs = {
        "fit": fit_variant(),
        "fit_foreach_optimizer": fit_variant(fused=False),
        "fit_nchw": fit_variant(channels_last=False),
        "fit_no_metric_updates": fit_variant(metrics=False),
        "plain_nchw": plain_variant(False),
        "plain_channels_last": plain_variant(True),
    }
    alternate(runs, 1)
    measured = alternate(runs, rounds)
    base = statistics.median(measured["plain_nchw"])
    out = {
        name: {**summary(v), "vs_plain_nchw": round(statistics.median(v) / base, 3)}
        for name, v in measured.items()
    }
    for name, row in out.items():
        print(
            f"[gpu_check]   {name:24s} {row['median']:8.0f} images/s  x{row['vs_plain_nchw']:.3f}", flush=True
        )
    return {"case": case.name, "variants": out, "ok": True}


# -- fractional-GPU study ---------------------------------------------------------------------------------


def study_text(gpu: float, cpu: float) -> str:
    root = Path(__file__).resolve().parent.parent
    text = (root / "experiments" / "yosinski-digits.yaml").read_text()
    text = text.replace("seeds: [0, 1, 2]", "seeds: [0]")
    text = text.replace("resources: {cpu: 1, gpu: 0}", f"resources: {{cpu: {cpu:g}, gpu: {gpu:g}}}")
    assert f"gpu: {gpu:g}" in text and "seeds: [0]" in text
    return text.replace("  schedule: cosine\n", "  schedule: cosine\n  device: cuda\n")


def max_concurrent(events: list[tuple[float, str, str]]) -> int:
    """The most trials running at once, from (time, kind, key) start/finish events."""
    running, best = 0, 0
    for _, kind, _ in sorted(events, key=lambda e: (e[0], e[1] != "completed")):
        if kind == "start":
            running += 1
            best = max(best, running)
        elif kind in ("completed", "failed"):
            running -= 1
    return best


def run_gpu_study(gpu: float, cpu: float, folder: Path) -> dict[str, Any]:
    import transferlab
    from transferlab.service.report import results_frame
    from transferlab.service.spec import validate_spec_text

    vspec = validate_spec_text(study_text(gpu, cpu))
    db = f"sqlite:///{folder / f'study-{gpu:g}.db'}"
    events: list[tuple[float, str, str]] = []
    started = time.perf_counter()

    def on_event(kind: str, trial: Any, info: dict[str, Any]) -> None:
        if kind != "epoch":
            events.append((time.perf_counter() - started, kind, trial.key))

    with GpuSampler(0.2) as sampler:
        exp_id = transferlab.submit(vspec, db=db, runs_dir=folder / f"runs-{gpu:g}", on_event=on_event)
    seconds = time.perf_counter() - started
    store = transferlab.open_store(db, create=False)
    try:
        frame = results_frame(store, exp_id)
        provenance = [t.provenance for t in store.trials(exp_id)]
        counts = dict(store.find_experiment(exp_id).trial_counts)
    finally:
        store.close()
    peaks = [p.get("cuda_peak_mb") for p in provenance if p.get("cuda_peak_mb") is not None]
    fit_seconds = [p.get("fit_seconds") for p in provenance if p.get("fit_seconds") is not None]
    means = frame.groupby(["condition", "depth"])["value"].mean().round(4)
    return {
        "gpu_per_trial": gpu,
        "cpu_per_trial": cpu,
        "wall_seconds": round(seconds, 1),
        "trial_counts": counts,
        "max_concurrent_trials": max_concurrent(events),
        "gpu": sampler.summary(),
        "trial_cuda_peak_mb": {
            "max": max(peaks, default=None),
            "median": statistics.median(peaks) if peaks else None,
        },
        "trial_fit_seconds_median": statistics.median(fit_seconds) if fit_seconds else None,
        "data_on_device": sorted({str(p.get("data_on_device")) for p in provenance}),
        "accuracy": {f"{c}@{d}": v for (c, d), v in means.items()},
    }


def section_study(folder: Path) -> dict[str, Any]:
    import ray

    runs = []
    for gpu in (1.0, 0.25):
        print(f"[gpu_check] study yosinski-digits (1 seed, 27 trials), gpu {gpu:g} per trial ...", flush=True)
        run = run_gpu_study(gpu, 2.0, folder)
        print(f"[gpu_check]   {json.dumps({k: v for k, v in run.items() if k != 'accuracy'})}", flush=True)
        runs.append(run)
    if ray.is_initialized():
        ray.shutdown()
    whole, shared = runs
    ok = all(r["trial_counts"].get("completed") == 27 for r in runs)
    diffs = {k: round(shared["accuracy"][k] - whole["accuracy"][k], 4) for k in whole["accuracy"]}
    return {
        "runs": runs,
        "speedup_fractional_vs_whole_gpu": round(whole["wall_seconds"] / shared["wall_seconds"], 2),
        "accuracy_difference_fractional_minus_whole": diffs,
        "ok": ok and shared["max_concurrent_trials"] > 1,
    }


# -- main ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated: {', '.join(SECTIONS)}"
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the throughput cases")
    parser.add_argument(
        "--out", default=None, help="JSON record path (default benchmarks/results/gpu_check.json)"
    )
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections: unknown {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    if not torch.cuda.is_available():
        parser.error("CUDA is not available on this machine: the GPU check needs an NVIDIA GPU")
    record: dict[str, Any] = {}
    failed = []
    with tempfile.TemporaryDirectory(prefix="tl-gpu-check-") as tmp:
        folder = Path(tmp)
        for section in sections:
            started = time.perf_counter()
            try:
                if section == "env":
                    part = {"machine": machine_info(), "cuda": torch.version.cuda, "ok": True}
                    part["capability"] = list(torch.cuda.get_device_capability())
                    part["memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
                elif section == "checks":
                    part = section_checks(folder)
                elif section == "throughput":
                    part = section_throughput(args.rounds)
                elif section == "ablation":
                    part = section_ablation(args.rounds)
                else:
                    part = section_study(folder)
            except Exception as exc:
                traceback.print_exc()
                part = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            part["seconds"] = round(time.perf_counter() - started, 1)
            record[section] = part
            if not part.get("ok"):
                failed.append(section)
            path = write_record("gpu_check", record, args.out)
            print(
                f"[gpu_check] section {section}: {'ok' if part.get('ok') else 'FAILED'} "
                f"({part['seconds']} s); record {path}",
                flush=True,
            )
    print(f"[gpu_check] done; failed sections: {', '.join(failed) or 'none'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
