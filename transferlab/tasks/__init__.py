"""Tasks: data sets, targets, losses and metrics."""

from transferlab.tasks.base import ClassificationTask, InMemoryDataset, TargetSpec, Task

__all__ = ["ClassificationTask", "InMemoryDataset", "TargetSpec", "Task"]
