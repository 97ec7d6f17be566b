"""transferlab: transfer and multitask learning studies with pluggable CNN backbones and heads.

The public API (``submit``, ``results``, ``metrics``, ``query``, ``validate``) is imported lazily so
that ``import transferlab`` and ``transferlab --help`` stay fast.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = (
    "submit",
    "submit_detached",
    "submit_text",
    "resume",
    "results",
    "metrics",
    "query",
    "plot",
    "validate",
    "open_store",
    "inspect",
    "samples",
)

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        from transferlab.service import api

        return getattr(api, name)
    raise AttributeError(f"module 'transferlab' has no attribute {name!r}")
