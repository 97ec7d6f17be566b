"""Heads: task-specific modules built from a backbone's feature_info and a task's target."""

from transferlab.heads.base import Head

__all__ = ["Head"]
