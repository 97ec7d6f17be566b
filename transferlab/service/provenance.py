"""Facts recorded with every trial: code version and library versions."""

from __future__ import annotations

import subprocess
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

LIBRARIES = (
    "torch",
    "torchvision",
    "timm",
    "ray",
    "numpy",
    "scikit-learn",
    "torchmetrics",
    "safetensors",
    "segmentation-models-pytorch",
    "sqlalchemy",
    "pydantic",
)


@lru_cache(maxsize=1)
def code_version() -> str:
    """transferlab's version, plus ``+g<commit>`` (and ``.dirty``) when run from its own checkout."""
    try:
        base = version("transferlab")
    except PackageNotFoundError:
        base = "unknown"
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists() or not (root / "pyproject.toml").is_file():
        return base  # an installed copy: the enclosing folder's repository is not ours
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return base
    return f"{base}+g{sha}{'.dirty' if dirty else ''}"


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that shape a result."""
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out
