"""SQLAlchemy models of the results store: experiments, trials and long-format metrics.

The Alembic revisions in ``transferlab/service/migrations`` create this schema; a test checks that the
two agree, so a change here needs a new revision (``alembic revision --autogenerate`` is a good start).
Every timestamp is stored and returned as a timezone-aware UTC ``datetime``.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# Stable constraint names, so that migrations can refer to them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

EXPERIMENT_STATUSES = ("pending", "running", "completed", "failed", "cancelled")
TRIAL_STATUSES = ("pending", "running", "completed", "failed", "skipped", "cancelled")
METRIC_SPLITS = ("train", "val", "test")


def utcnow() -> datetime:
    """The current time as an aware UTC datetime."""
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """``DateTime(timezone=True)`` that always returns aware UTC datetimes.

    SQLite keeps no time zone, so values are converted to UTC before they are stored and marked as UTC
    when they are read; PostgreSQL returns them in the session time zone, which is converted to UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the store keeps aware UTC datetimes only")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    """Declarative base holding the store's metadata."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON()}


class Experiment(Base):
    """One submitted spec: a study whose trials share a primary metric."""

    __tablename__ = "experiments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    study: Mapped[str] = mapped_column(String(32))
    spec_text: Mapped[str] = mapped_column(Text)  # the YAML exactly as submitted
    spec_json: Mapped[dict[str, Any]]  # the validated spec
    spec_hash: Mapped[str] = mapped_column(String(64))  # sha256 hex of the validated spec
    status: Mapped[str] = mapped_column(String(16), default="pending")
    primary_metric: Mapped[str] = mapped_column(String(100))
    higher_is_better: Mapped[bool]
    storage_path: Mapped[str | None] = mapped_column(String(1000))
    code_version: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class Trial(Base):
    """One training run of the plan: a base net, a transfer net or a single-task run."""

    __tablename__ = "trials"
    __table_args__ = (
        UniqueConstraint("experiment_id", "key"),
        Index("ix_trials_experiment_id_status", "experiment_id", "status"),
        Index("ix_trials_experiment_id_condition_depth", "experiment_id", "condition", "depth"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(200))  # the planner's stable name, unique in the experiment
    role: Mapped[str] = mapped_column(String(16))  # base | transfer | single
    # baseA | baseB | AnB | AnB+ | BnB | BnB+ | random | single
    condition: Mapped[str] = mapped_column(String(16))
    depth: Mapped[int]  # frozen/copied stages; 0 for base nets
    seed: Mapped[int]
    split: Mapped[str] = mapped_column(String(64))  # which A/B class split: "given", "random-3", ...
    bn_policy: Mapped[str] = mapped_column(String(16))
    config: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(16), default="pending")
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    checkpoint_path: Mapped[str | None] = mapped_column(String(1000))
    base_trial_id: Mapped[int | None] = mapped_column(ForeignKey("trials.id", ondelete="SET NULL"))
    data_hash: Mapped[str | None] = mapped_column(String(64))
    provenance: Mapped[dict[str, Any]]  # code version, library versions, split hashes, ...
    ray_trial_id: Mapped[str | None] = mapped_column(String(100))


class Metric(Base):
    """One metric value: (trial, epoch, split, name) is unique, re-recording overwrites it."""

    __tablename__ = "metrics"
    __table_args__ = (
        UniqueConstraint("trial_id", "epoch", "split", "name"),
        Index("ix_metrics_trial_id_split_name", "trial_id", "split", "name"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    trial_id: Mapped[int] = mapped_column(ForeignKey("trials.id", ondelete="CASCADE"))
    epoch: Mapped[int]
    split: Mapped[str] = mapped_column(String(16))  # train | val | test
    name: Mapped[str] = mapped_column(String(100))
    # NULL stands for NaN: SQLite stores a NaN float as NULL, so both backends record it that way.
    value: Mapped[float | None] = mapped_column(Float)
