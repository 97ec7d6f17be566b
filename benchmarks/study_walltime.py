"""Wall time of a whole transfer study through ``transferlab.submit`` against a naive sequential script.

The naive script is what a researcher writes without transferlab: for every seed, train base nets A
and B, then for every depth and condition build the net, copy the base net's first n stages (frozen
or not), train it with a plain PyTorch loop, and test it; one trial after another, no Ray, no
feature cache, torch's default thread count (``--naive-threads`` sets another). It trains the same
nets with the same settings (epochs, batch size, optimiser, learning rate and schedule, weight decay
off for biases and norms, BatchNorm of frozen stages in eval mode). It only trains and tests; the
study also validates every epoch and records every metric, trial and checkpoint in its store.
By default each naive net starts from the weights its study trial starts from and shuffles its data
with the same seed, so both train the very same nets and their accuracies should agree to the last
digit; ``--independent-seeds`` draws other initial weights (the means then differ by seed noise).

The study runs through Ray on this machine (local Ray, SQLite store in a temporary folder); its wall
time includes starting Ray. Both report the test accuracy of every (condition, depth) as mean ± std
over seeds; a study mean outside one standard deviation of the naive run's is flagged.
Target: the study at least 5x faster on 2 CPU cores, no mean flagged.

    python -m benchmarks.study_walltime            # experiments/yosinski-digits.yaml (81 trials)
    python -m benchmarks.study_walltime --quick    # 2 seeds, depths 1 3 5, 3 epochs (34 trials)
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import yaml

from benchmarks.record import write_record
from transferlab.tasks.base import stable_hash

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SPEC = REPO / "experiments" / "yosinski-digits.yaml"
TARGET_SPEEDUP = 5.0
COPY_FROM = {"AnB": "baseA", "AnB+": "baseA", "BnB": "baseB", "BnB+": "baseB"}


def spec_text(path: Path, quick: bool, train: dict[str, Any] | None = None) -> str:
    """The spec's text; ``quick`` keeps 2 seeds, depths 1, 3 and 5 and 3 epochs; ``train`` overrides."""
    text = path.read_text()
    if not quick and not train:
        return text
    spec = yaml.safe_load(text)
    if quick:
        spec["seeds"] = list(spec.get("seeds", [0]))[:2] or [0, 1]
        spec["transfer"]["depths"] = [1, 3, 5]
        spec["train"]["epochs"] = 3
        spec["name"] = f"{spec['name']}-quick"
    spec.setdefault("train", {}).update(train or {})
    return yaml.safe_dump(spec, sort_keys=False)


def train_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["feature_cache_dtype=float16"]`` -> ``{"feature_cache_dtype": "float16"}`` (values read as YAML)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--train: expected KEY=VALUE, got {pair!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


# -- the naive script ---------------------------------------------------------------------------------


def train_plain(model: Any, data: Any, frozen: int, train: Any, seed: int) -> None:
    """A plain training loop: SGD with momentum, cosine schedule per epoch, frozen stages in eval mode."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": train.weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=train.epochs)
    images, labels = data.tensors["image"], data.tensors["label"]
    generator = torch.Generator().manual_seed(seed)
    for _ in range(train.epochs):
        model.train()
        for stage in model.backbone.stages[:frozen]:
            stage.eval()  # bn: frozen keeps the copied running statistics
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), train.batch_size):
            index = order[start : start + train.batch_size]
            batch = {"image": images[index], "label": labels[index]}
            logits = model.head(model.backbone(batch["image"]), batch)["logits"]
            loss = torch.nn.functional.cross_entropy(logits, batch["label"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        schedule.step()


def test_accuracy(model: Any, data: Any) -> float:
    model.eval()
    images, labels = data.tensors["image"], data.tensors["label"]
    with torch.no_grad():
        logits = model.head(model.backbone(images), {"image": images})["logits"]
    return float((logits.argmax(1) == labels).float().mean())


def naive_init_seed(split: str, condition: str, depth: int, seed: int, same_seeds: bool) -> int:
    """The study's initialisation seed of this trial (``same_seeds``), or one of the naive run's own."""
    if same_seeds:
        from transferlab.engine.trial import init_seed

        return init_seed({"seed": seed, "split": split, "condition": condition, "depth": depth})
    return int(stable_hash(["naive", split, seed, condition, depth]), 16) % 2**31


def naive_trial(
    vspec: Any, classes: Any, condition: str, depth: int, seed: int, base: Any, init: int
) -> tuple[Any, float]:
    """Build (weights drawn after ``torch.manual_seed(init)``), copy ``depth`` stages from ``base``
    (frozen unless the condition ends in +), train, test."""
    from transferlab.engine.assembly import build_model, build_task

    spec = vspec.spec
    torch.manual_seed(init)
    task = build_task(spec.task.name, vspec.task_options, classes=classes)
    model = build_model(
        (spec.backbone.name, vspec.backbone_options), (spec.head.name, spec.head.options), task
    )
    frozen = 0 if condition.endswith("+") or condition.startswith("base") else depth
    if base is not None:
        for mine, theirs in zip(model.backbone.stages[:depth], base.backbone.stages[:depth], strict=True):
            mine.load_state_dict(theirs.state_dict())
    for stage in model.backbone.stages[:frozen]:
        stage.requires_grad_(False)
    train_plain(model, task.dataset("train"), frozen, spec.train, seed)
    return model, test_accuracy(model, task.dataset("test"))


def run_naive(vspec: Any, same_seeds: bool) -> tuple[float, list[dict[str, Any]]]:
    """Every trial of the study one after another; returns the wall time and per-trial accuracies.

    With ``same_seeds`` each net starts from the weights its study trial starts from (and every
    net shuffles its data by the spec's seed, as in the study), so the two runs train the same nets.
    """
    spec = vspec.spec
    if spec.transfer is None or spec.transfer.fine_tune_lr_mult != 1.0:
        raise ValueError("study_walltime: the naive script handles transfer studies with fine_tune_lr_mult 1")
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for split in vspec.splits:
        for seed in spec.seeds:
            bases = {}
            for name, classes in (("baseA", split.a), ("baseB", split.b)):
                init = naive_init_seed(split.id, name, 0, seed, same_seeds)
                bases[name], acc = naive_trial(vspec, classes, name, 0, seed, None, init)
                rows.append({"condition": name, "depth": 0, "seed": seed, "value": acc})
            for depth in vspec.depths:
                for condition in spec.transfer.conditions:
                    base = bases.get(COPY_FROM.get(condition, ""))
                    init = naive_init_seed(split.id, condition, depth, seed, same_seeds)
                    _, acc = naive_trial(vspec, split.b, condition, depth, seed, base, init)
                    rows.append({"condition": condition, "depth": depth, "seed": seed, "value": acc})
            print(
                f"  naive: seed {seed} done ({len(rows)} trials, {time.perf_counter() - started:.0f} s)",
                flush=True,
            )
    return time.perf_counter() - started, rows


# -- the study through transferlab ----------------------------------------------------------------------


def run_study(vspec: Any, folder: Path) -> tuple[float, list[dict[str, Any]], dict[str, Any]]:
    """``transferlab.submit`` into a SQLite store in ``folder``; wall time, per-trial results, provenance."""
    import transferlab
    from transferlab.service.report import results_frame

    db = f"sqlite:///{folder / 'study.db'}"
    done = {"n": 0}
    events: list[tuple[float, str, str]] = []  # (seconds since submit, kind, trial key)
    started = time.perf_counter()

    def on_event(kind: str, trial: Any, info: dict[str, Any]) -> None:
        if kind != "epoch":
            events.append((round(time.perf_counter() - started, 2), kind, trial.key))
        if kind in ("completed", "failed", "skipped"):
            done["n"] += 1
            if kind != "completed" or done["n"] % 10 == 0:
                print(f"  study: {done['n']} trials finished ({kind}: {trial.key})", flush=True)

    exp_id = transferlab.submit(vspec, db=db, runs_dir=folder / "runs", on_event=on_event)
    seconds = time.perf_counter() - started
    store = transferlab.open_store(db, create=False)
    try:
        frame = results_frame(store, exp_id)
        provenance = [t.provenance for t in store.trials(exp_id)]
        info = store.find_experiment(exp_id)
    finally:
        store.close()
    rows = frame[["condition", "depth", "seed", "value"]].to_dict("records")
    return (
        seconds,
        rows,
        {
            "status": info.status,
            "trial_counts": dict(info.trial_counts),
            "trials": provenance,
            "events": events,
        },
    )


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


# -- comparison -----------------------------------------------------------------------------------------


def cells(rows: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, float]]:
    """Mean, std (ddof 1; 0 for one value) and n of the accuracy by (condition, depth)."""
    grouped: dict[tuple[str, int], list[float]] = defaultdict(list)
    for row in rows:
        grouped[(str(row["condition"]), int(row["depth"]))].append(float(row["value"]))
    return {
        key: {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values),
        }
        for key, values in grouped.items()
    }


def compare(
    study: list[dict[str, Any]], naive: list[dict[str, Any]], one_sample: dict[str, float]
) -> list[dict[str, Any]]:
    """One record per (condition, depth): both means and stds, and whether the study's mean is off.

    ``outside_one_std`` is the target's test: the study's mean differs from the naive mean by more
    than the naive std over seeds. With few seeds that std is often 0 (every seed scored the same),
    so ``outside_tolerance`` also allows one test sample's worth of accuracy (``one_sample`` by
    condition: 1 / test samples), the metric's resolution.
    """
    mine, theirs = cells(study), cells(naive)
    out = []
    for key in sorted(theirs, key=lambda k: (k[1], k[0])):
        s, n = mine.get(key), theirs[key]
        diff = math.inf if s is None else abs(s["mean"] - n["mean"])
        out.append(
            {
                "condition": key[0],
                "depth": key[1],
                "study_mean": s["mean"] if s else math.nan,
                "study_std": s["std"] if s else math.nan,
                "naive_mean": n["mean"],
                "naive_std": n["std"],
                "n": n["n"],
                "outside_one_std": diff > n["std"] + 1e-12,
                "outside_tolerance": diff > max(n["std"], one_sample[key[0]]) + 1e-12,
            }
        )
    return out


def one_test_sample(vspec: Any) -> dict[str, float]:
    """The accuracy one test sample is worth, by condition (base A tests on A's classes, all else on B's)."""
    from transferlab.engine.assembly import build_task

    spec, split = vspec.spec, vspec.splits[0]
    sizes = {
        side: len(build_task(spec.task.name, vspec.task_options, classes=classes).dataset("test"))
        for side, classes in (("A", split.a), ("B", split.b))
    }
    conditions = ["baseA", "baseB", *spec.transfer.conditions]
    return {c: 1.0 / sizes["A" if c == "baseA" else "B"] for c in conditions}


def print_comparison(table: list[dict[str, Any]]) -> None:
    print(f"  {'condition':9s} {'depth':>5s}  {'study':>15s}  {'naive':>15s}")
    for r in table:
        flag = "  <- outside 1 std" if r["outside_one_std"] else ""
        flag += " and 1 test sample" if r["outside_tolerance"] else ""
        print(
            f"  {r['condition']:9s} {r['depth']:5d}  {r['study_mean']:.3f} ± {r['study_std']:.3f}  "
            f"{r['naive_mean']:.3f} ± {r['naive_std']:.3f}{flag}"
        )


def trial_facts(provenance: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over trials: time inside ``fit``, feature-cache hits, misses and seconds saved, threads."""
    keys = ("fit_seconds", "feature_cache_hits", "feature_cache_misses", "feature_cache_seconds_saved")
    out: dict[str, Any] = {k: sum(float(p.get(k) or 0) for p in provenance) for k in keys}
    out["trials_with_cache"] = sum(p.get("feature_cache") == "on" for p in provenance)
    out["torch_threads"] = sorted({p["torch_threads"] for p in provenance if p.get("torch_threads")})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", type=Path, default=DEFAULT_SPEC, help="a transfer study spec")
    parser.add_argument("--quick", action="store_true", help="2 seeds, depths 1 3 5, 3 epochs")
    parser.add_argument("--skip-naive", action="store_true", help="run the study only (no ratio)")
    parser.add_argument(
        "--independent-seeds",
        action="store_true",
        help="the naive run draws its own initial weights instead of the study's (accuracies then "
        "differ by seed noise)",
    )
    parser.add_argument(
        "--naive-threads",
        type=int,
        default=None,
        help="torch threads of the naive script (default: torch's own, all cores); 1 is immune to other "
        "processes' load, which stalls multi-threaded torch on a busy machine",
    )
    parser.add_argument(
        "--train",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a train option of the study, e.g. feature_cache=false, feature_cache_dtype=float16",
    )
    parser.add_argument("--out", default=None, help="JSON record path (default benchmarks/results/...)")
    args = parser.parse_args(argv)
    from transferlab.service.spec import validate_spec_text

    overrides = train_overrides(args.train)
    vspec = validate_spec_text(spec_text(args.spec, args.quick, overrides), str(args.spec))
    print(
        f"[study_walltime] {vspec.spec.name}: torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}"
    )
    record: dict[str, Any] = {
        "quick": args.quick,
        "spec": str(args.spec),
        "train_overrides": overrides,
        "spec_text": vspec.text,
    }
    naive_rows: list[dict[str, Any]] = []
    if not args.skip_naive:
        default_threads = torch.get_num_threads()
        if args.naive_threads:
            torch.set_num_threads(args.naive_threads)
        record["naive_threads"] = torch.get_num_threads()
        load_before = os.getloadavg()
        record["naive_seconds"], naive_rows = run_naive(vspec, not args.independent_seeds)
        record["naive_seeds"] = "independent" if args.independent_seeds else "the study's"
        record["naive_load"] = [load_before, os.getloadavg()]
        print(f"  naive: {len(naive_rows)} trials in {record['naive_seconds']:.1f} s", flush=True)
        torch.set_num_threads(default_threads)
    with tempfile.TemporaryDirectory(prefix="tl-bench-study-") as folder:
        load_before = os.getloadavg()
        try:
            record["study_seconds"], study_rows, facts = run_study(vspec, Path(folder))
        finally:
            shutdown_ray()
        record["study_load"] = [load_before, os.getloadavg()]
    print(f"  study: {len(study_rows)} trials in {record['study_seconds']:.1f} s ({facts['trial_counts']})")
    record.update(study_status=facts["status"], trial_counts=facts["trial_counts"])
    record["trial_facts"] = trial_facts(facts["trials"])
    record["study_events"] = facts["events"]
    record["study_trials"], record["naive_trials"] = study_rows, naive_rows
    if naive_rows:
        table = compare(study_rows, naive_rows, one_test_sample(vspec))
        speedup = record["naive_seconds"] / record["study_seconds"]
        flagged = sum(r["outside_one_std"] for r in table)
        beyond = sum(r["outside_tolerance"] for r in table)
        record.update(
            speedup=speedup,
            target_speedup=TARGET_SPEEDUP,
            accuracy=table,
            flagged=flagged,
            flagged_beyond_one_sample=beyond,
            met=speedup >= TARGET_SPEEDUP and flagged == 0,
        )
        print_comparison(table)
        print(
            f"[study_walltime] naive {record['naive_seconds']:.1f} s, study {record['study_seconds']:.1f} s: "
            f"speed-up {speedup:.2f}x (target >= {TARGET_SPEEDUP:g}x); {flagged} of {len(table)} means "
            f"outside one std ({beyond} by more than one test sample): {'met' if record['met'] else 'MISSED'}"
        )
    name = "study_walltime" + ("_quick" if args.quick else "")
    path = write_record(name, record, args.out)
    print(f"[study_walltime] record written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
