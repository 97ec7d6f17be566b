"""Helpers that fill a store in tests: an experiment with a small spec and trial records."""

from __future__ import annotations

from typing import Any

from transferlab.service.store import Store, TrialRecord


def make_experiment(
    store: Store, name: str = "demo", *, higher_is_better: bool = True, study: str = "transfer"
) -> int:
    """Record an experiment with a small spec and return its id."""
    return store.create_experiment(
        name=name,
        study=study,
        spec_text=f"name: {name}\nstudy: {study}  # as typed\n",
        spec_json={"name": name, "study": study, "seeds": [0, 1]},
        spec_hash="ab" * 32,
        primary_metric="accuracy",
        higher_is_better=higher_is_better,
        storage_path="/runs/demo",
        code_version="0.1.0+test",
    )


def trial(key: str, condition: str, depth: int = 0, seed: int = 0, **extra: Any) -> TrialRecord:
    """A trial record with the role that ``condition`` implies."""
    role = "base" if condition.startswith("base") else "single" if condition == "single" else "transfer"
    return TrialRecord(
        key=key,
        role=role,
        condition=condition,
        depth=depth,
        seed=seed,
        split="given",
        bn_policy="frozen",
        **extra,
    )
