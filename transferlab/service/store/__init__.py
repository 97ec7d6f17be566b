"""The results store: SQLAlchemy models, Alembic migrations, the writer API and read-only SQL."""

from __future__ import annotations

from transferlab.service.store.database import DB_ENV_VAR, DEFAULT_URL, StoreError, mask_url, resolve_url
from transferlab.service.store.readonly import run_readonly_query
from transferlab.service.store.records import ExperimentInfo, TrialInfo, TrialRecord
from transferlab.service.store.store import METRICS_FRAME_COLUMNS, Store

__all__ = [
    "DB_ENV_VAR",
    "DEFAULT_URL",
    "METRICS_FRAME_COLUMNS",
    "ExperimentInfo",
    "Store",
    "StoreError",
    "TrialInfo",
    "TrialRecord",
    "mask_url",
    "resolve_url",
    "run_readonly_query",
]
