"""What every benchmark record holds: the machine it ran on, its numbers, and where it is written.

Benchmarks run on shared machines, so each one compares transferlab against a baseline measured in
the same process, alternately (ABBA order), and reports medians and the ratio; the load average at
the start and the end of the run is recorded beside the numbers so a noisy run can be recognised.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine_info() -> dict[str, Any]:
    """CPU count, CPU model, torch and Python versions, the accelerator (if any) and the load now."""
    import torch

    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "load_average": list(os.getloadavg()),
    }
    if torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(0)
        info["bf16"] = torch.cuda.is_bf16_supported()
    else:
        info["device_name"] = f"CPU ({info['cpu_model']})"
    return info


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else ``platform.processor()``."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def git_commit() -> str | None:
    """The repository's HEAD commit (with ``-dirty`` when the tree has changes), if git answers."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{head}-dirty" if dirty else head


def write_record(name: str, record: dict[str, Any], out: str | Path | None = None) -> Path:
    """Write ``record`` (plus machine facts and a timestamp) as JSON to ``out`` or results/NAME.json."""
    path = Path(out) if out is not None else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    full = {
        "benchmark": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "commit": git_commit(),
        "machine": machine_info(),
        **record,
    }
    path.write_text(json.dumps(full, indent=2, default=float) + "\n")
    return path


def alternate(runs: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Call each run ``rounds`` times, alternating the order each round (A B, B A, ...).

    Every call returns one measurement; alternating spreads slow drifts in the machine's load over
    all contenders alike.
    """
    names = list(runs)
    out: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        for name in names if i % 2 == 0 else reversed(names):
            out[name].append(runs[name]())
    return out


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of a list of measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}
