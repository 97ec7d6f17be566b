"""Shared fixtures: one Ray instance per test session, tiny specs, isolated working folders."""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

# A plugin distribution (dist-info + module) that the registries discover through entry points,
# in this process and, through PYTHONPATH, in Ray's worker processes.
PLUGINS = str(Path(__file__).parent / "plugins")
sys.path.insert(0, PLUGINS)

# Tests never download anything and run with small thread counts.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")

TINY_TRANSFER = textwrap.dedent(
    """
    name: tiny
    study: transfer
    backbone: {name: convnet, widths: [4, 8, 8]}
    head: classify
    task: {name: digits, image_size: 16}
    transfer:
      split: {A: [0, 1, 2, 3, 4], B: [5, 6, 7, 8, 9]}
      depths: [1, 3]
      conditions: [AnB, AnB+, BnB, BnB+, random]
    train: {epochs: 2, batch_size: 64, lr: 0.05}
    seeds: [0]
    resources: {cpu: 1}
    """
)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op torch thread for a whole module (``pytestmark = pytest.mark.usefixtures("one_thread")``).

    Tiny convolutions and models gain nothing from more, and on a busy 2-core runner OpenMP's
    spinning threads make such tests many times slower.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_session():
    """Start one local Ray for the whole test session (2 CPUs).

    Its dashboard is on (bound to 127.0.0.1; Ray picks a free port) because the detached-study tests
    submit Ray Jobs through it. ``address="local"`` starts a fresh instance even when a head that
    `transferlab cluster up` or `ray start` started is running on this machine.
    """
    import ray

    if not ray.is_initialized():
        pythonpath = os.pathsep.join(p for p in (PLUGINS, os.environ.get("PYTHONPATH")) if p)
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
        )
    yield ray
    ray.shutdown()


@pytest.fixture
def tiny_spec(tmp_path: Path) -> Path:
    """A 12-trial transfer spec on 16 px digits that trains in seconds."""
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_TRANSFER)
    return path


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in an empty folder so default store and run folders land there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TRANSFERLAB_DB", raising=False)
    monkeypatch.delenv("TRANSFERLAB_RUNS", raising=False)
    return tmp_path
