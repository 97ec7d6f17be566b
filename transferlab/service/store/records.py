"""Plain records that cross the store's boundary, so callers never hold ORM objects or sessions."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from transferlab.service.store.models import Experiment, Trial


@dataclass(frozen=True)
class TrialRecord:
    """A planned trial, as the planner hands it to :meth:`Store.add_trials`.

    ``base_key`` names the trial whose checkpoint this one starts from (its base net); it may be in the
    same batch or already in the experiment, and becomes ``base_trial_id``.
    """

    key: str
    role: str
    condition: str
    depth: int
    seed: int
    split: str
    bn_policy: str
    config: Mapping[str, Any] = field(default_factory=dict)
    base_key: str | None = None
    data_hash: str | None = None
    provenance: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ExperimentInfo:
    """One experiment with its trial counts by status."""

    id: int
    name: str
    study: str
    status: str
    primary_metric: str
    higher_is_better: bool
    spec_text: str
    spec_json: Mapping[str, Any]
    spec_hash: str
    storage_path: str | None
    code_version: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    trial_counts: Mapping[str, int] = field(default_factory=dict)

    @property
    def n_trials(self) -> int:
        """How many trials the experiment has, in any status."""
        return sum(self.trial_counts.values())

    @classmethod
    def from_row(cls, row: Experiment, trial_counts: Mapping[str, int]) -> ExperimentInfo:
        """Copy an ORM row into a plain record."""
        return cls(
            id=row.id,
            name=row.name,
            study=row.study,
            status=row.status,
            primary_metric=row.primary_metric,
            higher_is_better=row.higher_is_better,
            spec_text=row.spec_text,
            spec_json=row.spec_json,
            spec_hash=row.spec_hash,
            storage_path=row.storage_path,
            code_version=row.code_version,
            created_at=row.created_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
            trial_counts=dict(trial_counts),
        )


@dataclass(frozen=True)
class TrialInfo:
    """One trial as stored: plan facts, status, timings, checkpoint and provenance."""

    id: int
    experiment_id: int
    key: str
    role: str
    condition: str
    depth: int
    seed: int
    split: str
    bn_policy: str
    config: Mapping[str, Any]
    status: str
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    checkpoint_path: str | None
    base_trial_id: int | None
    data_hash: str | None
    provenance: Mapping[str, Any]
    ray_trial_id: str | None

    @classmethod
    def from_row(cls, row: Trial) -> TrialInfo:
        """Copy an ORM row into a plain record."""
        return cls(**{name: getattr(row, name) for name in cls.__dataclass_fields__})
