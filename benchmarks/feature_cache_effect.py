"""What the frozen-prefix feature cache saves one trial, by freeze depth, measured in one process.

For each depth n, a yosinski-digits transfer trial (the spec's convnet, digits 5-9, its train
settings, first n stages frozen) runs through ``fit()`` with the cache off, on (float32) and on
(float16 storage), alternately for several rounds, each time with an empty cache (a trial of the
study shares no entry with another: each copies a different base net). Reported per depth: median
``fit()`` seconds of each, the speed-up of the cache, the time saved that the trial records
(``feature_cache_seconds_saved``) beside the time actually saved, and the test accuracy of each.

    python -m benchmarks.feature_cache_effect            # 3 rounds, 8 epochs
    python -m benchmarks.feature_cache_effect --quick    # 1 round, 3 epochs
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import torch
import yaml

from benchmarks.record import alternate, summary, write_record
from transferlab.engine import feature_cache
from transferlab.engine.assembly import build_model, build_task
from transferlab.engine.fit import FitConfig, fit

SPEC = Path(__file__).resolve().parent.parent / "experiments" / "yosinski-digits.yaml"
VARIANTS = {"off": {"feature_cache": False}, "fp32": {}, "fp16": {"feature_cache_dtype": "float16"}}


def run(depth: int, epochs: int, variant: str, last: dict[str, Any]) -> float:
    """One trial at ``depth`` with the cache ``variant``; returns fit's seconds (facts kept in ``last``)."""
    spec = yaml.safe_load(SPEC.read_text())
    task = build_task(
        spec["task"]["name"], {"image_size": spec["task"]["image_size"]}, classes=[5, 6, 7, 8, 9]
    )
    torch.manual_seed(depth)
    backbone = {k: v for k, v in spec["backbone"].items() if k != "name"}
    model = build_model((spec["backbone"]["name"], backbone), (spec["head"], {}), task, freeze_depth=depth)
    train = {**spec["train"], "epochs": epochs, "device": "cpu", **VARIANTS[variant]}
    feature_cache.STORE.clear()
    result = fit(model, task, FitConfig(**train))
    last[variant] = {"test_accuracy": result.test["accuracy"], **result.feature_cache}
    return result.seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round, 3 epochs")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a study trial's share: 1)")
    parser.add_argument("--out", default=None, help="JSON record path (default benchmarks/results/...)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (1 if args.quick else 3)
    epochs = 3 if args.quick else int(yaml.safe_load(SPEC.read_text())["train"]["epochs"])
    depths = []
    print(f"[feature_cache_effect] {epochs} epochs, {rounds} rounds, {args.threads} thread(s)")
    header = ("depth", "off s", "fp32 s", "fp16 s", "speed-up", "saved", "said")
    print("  " + " ".join(f"{h:>{w}s}" for h, w in zip(header, (5, 7, 7, 7, 8, 6, 6), strict=True)))
    for depth in range(1, 6):
        facts: dict[str, Any] = {}
        runs = {v: lambda v=v, d=depth, f=facts: run(d, epochs, v, f) for v in VARIANTS}
        seconds = alternate(runs, rounds)
        median = {v: statistics.median(s) for v, s in seconds.items()}
        entry = {
            "depth": depth,
            "seconds": {v: summary(s) for v, s in seconds.items()},
            "speedup_fp32": median["off"] / median["fp32"],
            "measured_seconds_saved": median["off"] - median["fp32"],
            "recorded_seconds_saved": facts["fp32"]["feature_cache_seconds_saved"],
            "facts": facts,
        }
        depths.append(entry)
        print(
            f"  {depth:5d} {median['off']:7.2f} {median['fp32']:7.2f} {median['fp16']:7.2f} "
            f"{entry['speedup_fp32']:7.2f}x {entry['measured_seconds_saved']:6.2f} "
            f"{entry['recorded_seconds_saved']:6.2f}   accuracy off/fp32/fp16 "
            + "/".join(f"{facts[v]['test_accuracy']:.3f}" for v in VARIANTS),
            flush=True,
        )
    name = "feature_cache_effect" + ("_quick" if args.quick else "")
    path = write_record(
        name, {"quick": args.quick, "epochs": epochs, "rounds": rounds, "depths": depths}, args.out
    )
    print(f"[feature_cache_effect] record written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
