"""The results store: the one writer API of the driver, and the reads the CLI and reports make.

Every method opens a short session of its own and returns plain records (:mod:`.records`) or pandas
frames, so callers never hold ORM objects or sessions, and one ``Store`` can be shared by threads.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd
from sqlalchemy import Engine, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from transferlab.service.store import database
from transferlab.service.store.database import StoreError
from transferlab.service.store.models import (
    EXPERIMENT_STATUSES,
    METRIC_SPLITS,
    TRIAL_STATUSES,
    Experiment,
    Metric,
    Trial,
    utcnow,
)
from transferlab.service.store.records import ExperimentInfo, TrialInfo, TrialRecord

METRICS_FRAME_COLUMNS = tuple(
    "trial_id key role condition depth seed split_id epoch split name value".split()
)
TRIAL_TABLE_COLUMNS = tuple("id key role condition depth seed split status error primary_metric".split())
_METRIC_KEY = ("trial_id", "epoch", "split", "name")
_UPSERT_CHUNK = 500  # rows per INSERT; SQLite allows 32766 bound parameters per statement


class Store:
    """A transferlab results store in SQLite or PostgreSQL.

    Attributes:
        url: the database URL with its password masked, for messages.
        engine: the SQLAlchemy engine.
    """

    def __init__(self, engine: Engine, url: str) -> None:
        self.engine = engine
        self.url = url
        self._reads = sessionmaker(engine, expire_on_commit=False)
        self._writes = sessionmaker(database.writer(engine), expire_on_commit=False)

    @classmethod
    def open(cls, url: str | None = None, *, create: bool = True, upgrade: bool = False) -> Store:
        """Open the store at ``url``, creating its schema in an empty database.

        Args:
            url: a SQLAlchemy URL or a SQLite file path; ``None`` means ``$TRANSFERLAB_DB`` or
                ``sqlite:///transferlab.db`` in the working directory.
            create: create the schema (``alembic upgrade head``) in an empty database; when false an
                empty database (or a missing SQLite file, which is then not created) is an error.
            upgrade: migrate a store at an older schema revision to the current one instead of
                refusing it (what ``transferlab db upgrade`` does).

        Raises:
            StoreError: the URL is malformed or unreachable, the database holds no store (and
                ``create`` is false), other tables, or a schema revision older (run
                ``transferlab db upgrade --db URL``) or newer than this transferlab's.
        """
        engine, masked = database.connect_store(url, create=create, upgrade=upgrade)
        return cls(engine, masked)

    def upgrade(self) -> bool:
        """Migrate the schema to the newest revision (``alembic upgrade head``); a no-op at head.

        Safe to run from several processes at once (see :func:`database.upgrade_to_head`).
        Returns whether a migration ran.
        """
        return database.upgrade_to_head(self.engine, self.url)

    def close(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    # -- writes ---------------------------------------------------------------------------------

    def create_experiment(
        self,
        *,
        name: str,
        study: str,
        spec_text: str,
        spec_json: Mapping[str, Any],
        spec_hash: str,
        primary_metric: str,
        higher_is_better: bool,
        storage_path: str | None,
        code_version: str,
    ) -> int:
        """Record a new experiment in status ``pending`` and return its id."""
        row = Experiment(
            name=name,
            study=study,
            spec_text=spec_text,
            spec_json=dict(spec_json),
            spec_hash=spec_hash,
            status="pending",
            primary_metric=primary_metric,
            higher_is_better=higher_is_better,
            storage_path=storage_path,
            code_version=code_version,
        )
        with self._writes.begin() as session:
            session.add(row)
            session.flush()
            return row.id

    def add_trials(self, experiment_id: int, trials: list[TrialRecord]) -> dict[str, int]:
        """Record planned trials in one transaction and return their ids by key.

        A trial's ``base_key`` may name a trial of the same batch or one already recorded.

        Raises:
            StoreError: a key is repeated or already recorded, a ``base_key`` is unknown, or the
                experiment does not exist; nothing is written then.
        """
        repeated = sorted(key for key, n in Counter(t.key for t in trials).items() if n > 1)
        if repeated:
            raise StoreError(f"trial keys repeated in one batch: {', '.join(repeated[:5])}")
        if not trials:
            return {}
        rows = [
            {
                "experiment_id": experiment_id,
                "key": t.key,
                "role": t.role,
                "condition": t.condition,
                "depth": t.depth,
                "seed": t.seed,
                "split": t.split,
                "bn_policy": t.bn_policy,
                "config": dict(t.config),
                "status": "pending",
                "data_hash": t.data_hash,
                "provenance": dict(t.provenance),
            }
            for t in trials
        ]
        try:
            with self._writes.begin() as session:
                self._get_experiment(session, experiment_id)
                inserted = session.execute(insert(Trial).returning(Trial.key, Trial.id), rows)
                ids = {key: trial_id for key, trial_id in inserted}
                bases = self._resolve_base_keys(session, experiment_id, trials, ids)
                if bases:
                    session.execute(update(Trial), bases)
        except IntegrityError as exc:
            raise StoreError(
                f"cannot add trials to experiment {experiment_id}: {database.describe_error(exc)} "
                "(is a trial key already recorded?)"
            ) from exc
        return ids

    @staticmethod
    def _resolve_base_keys(
        session: Session, experiment_id: int, trials: list[TrialRecord], ids: dict[str, int]
    ) -> list[dict[str, int]]:
        wanted = {t.base_key for t in trials if t.base_key is not None}
        known = dict(ids)
        missing = wanted - known.keys()
        if missing:
            query = select(Trial.key, Trial.id).where(
                Trial.experiment_id == experiment_id, Trial.key.in_(missing)
            )
            known.update(dict(session.execute(query).all()))
        unknown = sorted(wanted - known.keys())
        if unknown:
            raise StoreError(
                f"unknown base trial keys in experiment {experiment_id}: {', '.join(unknown[:5])}"
            )
        return [
            {"id": ids[t.key], "base_trial_id": known[t.base_key]} for t in trials if t.base_key is not None
        ]

    def set_experiment_status(
        self, experiment_id: int, status: str, *, started: bool = False, finished: bool = False
    ) -> None:
        """Set an experiment's status; ``started``/``finished`` also stamp ``started_at``/``finished_at``."""
        _check_choice("experiment status", status, EXPERIMENT_STATUSES)
        with self._writes.begin() as session:
            row = self._get_experiment(session, experiment_id)
            row.status = status
            if started:
                row.started_at = utcnow()
            if finished:
                row.finished_at = utcnow()

    def start_trial(self, trial_id: int, *, ray_trial_id: str | None = None) -> None:
        """Mark a trial ``running`` now.

        A restarted trial (a retry trains from scratch) loses its earlier end time, error and metric
        rows, so no row of the failed attempt survives beside the new ones.
        """
        with self._writes.begin() as session:
            row = self._get_trial(session, trial_id)
            session.execute(delete(Metric).where(Metric.trial_id == trial_id))
            row.status = "running"
            row.started_at = utcnow()
            row.finished_at = None
            row.error = None
            if ray_trial_id is not None:
                row.ray_trial_id = ray_trial_id

    def add_metrics(self, trial_id: int, rows: Iterable[tuple[int, str, str, float]]) -> None:
        """Record metric values ``(epoch, split, name, value)`` of a trial.

        Idempotent: a value recorded again for the same (epoch, split, name) replaces the old one
        (``INSERT ... ON CONFLICT DO UPDATE``), and the last of repeated keys in one call wins. NaN is
        stored as NULL.

        Raises:
            StoreError: an unknown split, a non-numeric value, or an unknown trial.
        """
        latest: dict[tuple[int, str, str], float | None] = {}
        for epoch, split, name, value in rows:
            _check_choice("metric split", split, METRIC_SPLITS)
            try:
                number = float(value)
            except (TypeError, ValueError) as exc:
                raise StoreError(
                    f"metric {name!r} ({split}, epoch {epoch}) is not a number: {value!r}"
                ) from exc
            latest[(int(epoch), split, name)] = None if math.isnan(number) else number
        values = [
            {"trial_id": trial_id, "epoch": e, "split": s, "name": n, "value": v}
            for (e, s, n), v in latest.items()
        ]
        if not values:
            return
        try:
            with self._writes.begin() as session:
                upsert = _upsert_statement(session.get_bind().dialect.name)
                for start in range(0, len(values), _UPSERT_CHUNK):
                    session.execute(upsert, values[start : start + _UPSERT_CHUNK])
        except IntegrityError as exc:
            raise StoreError(
                f"cannot record metrics of trial {trial_id} (does it exist?): {database.describe_error(exc)}"
            ) from exc

    def finish_trial(
        self,
        trial_id: int,
        status: str,
        *,
        error: str | None = None,
        checkpoint_path: str | None = None,
        provenance_update: Mapping[str, Any] | None = None,
        data_hash: str | None = None,
    ) -> None:
        """End a trial with ``status``, stamping ``finished_at``.

        Args:
            trial_id: the trial.
            status: usually ``completed``, ``failed``, ``skipped`` or ``cancelled``.
            error: why it failed, if it did.
            checkpoint_path: where its final checkpoint lies (kept unchanged when ``None``).
            provenance_update: keys merged into (and overriding) the recorded provenance.
            data_hash: the fingerprint of the data split the trial trained on (kept when ``None``).
        """
        _check_choice("trial status", status, TRIAL_STATUSES)
        with self._writes.begin() as session:
            row = self._get_trial(session, trial_id)
            row.status = status
            row.error = error
            row.finished_at = utcnow()
            if checkpoint_path is not None:
                row.checkpoint_path = checkpoint_path
            if provenance_update:
                row.provenance = {**row.provenance, **provenance_update}
            if data_hash is not None:
                row.data_hash = data_hash

    # -- reads ----------------------------------------------------------------------------------

    def find_experiment(self, ref: str | int) -> ExperimentInfo:
        """The experiment with id ``ref`` or, failing that, the most recent one named ``ref``.

        Raises:
            StoreError: no such experiment; the message lists recent ones.
        """
        with self._reads() as session:
            row = None
            if isinstance(ref, int) or str(ref).strip().isdigit():
                row = session.get(Experiment, int(ref))
            if row is None:
                query = select(Experiment).where(Experiment.name == str(ref))
                row = session.scalars(
                    query.order_by(Experiment.created_at.desc(), Experiment.id.desc())
                ).first()
            if row is None:
                raise StoreError(f"no experiment {ref!r} in {self.url}; {self._recent_experiments(session)}")
            return ExperimentInfo.from_row(row, self._counts(session, row.id).get(row.id, {}))

    def experiments(self) -> list[ExperimentInfo]:
        """Every experiment, newest first, with its trial counts by status."""
        with self._reads() as session:
            rows = session.scalars(
                select(Experiment).order_by(Experiment.created_at.desc(), Experiment.id.desc())
            )
            counts = self._counts(session)
            return [ExperimentInfo.from_row(row, counts.get(row.id, {})) for row in rows]

    def trials(self, experiment_id: int) -> list[TrialInfo]:
        """The trials of an experiment in the order they were planned."""
        with self._reads() as session:
            rows = session.scalars(
                select(Trial).where(Trial.experiment_id == experiment_id).order_by(Trial.id)
            )
            return [TrialInfo.from_row(row) for row in rows]

    def trial_table(self, experiment_id: int, *, status: str | None = None) -> pd.DataFrame:
        """The trials of an experiment (those in ``status`` only, if given) as a frame, in planned order.

        Columns: id, key, role, condition, depth, seed, split, status, error, primary_metric (the
        metric the trial's config names); error and primary_metric are None where unset. Unlike
        :meth:`trials` it reads no config or provenance beyond that one field, so it stays fast for
        tens of thousands of trials.
        """
        query = (
            select(
                Trial.id,
                Trial.key,
                Trial.role,
                Trial.condition,
                Trial.depth,
                Trial.seed,
                Trial.split,
                Trial.status,
                Trial.error,
                Trial.config["primary_metric"].as_string(),
            )
            .where(Trial.experiment_id == experiment_id)
            .order_by(Trial.id)
        )
        if status is not None:
            query = query.where(Trial.status == status)
        with self._reads() as session:
            rows = session.execute(query).all()
        frame = pd.DataFrame(rows, columns=list(TRIAL_TABLE_COLUMNS))
        for column in ("error", "primary_metric"):  # None, not NaN, where there is none
            frame[column] = frame[column].astype(object).where(frame[column].notna(), None)
        return frame.astype({"id": "int64", "depth": "int64", "seed": "int64"})

    def trial_counts(self, experiment_id: int) -> dict[str, int]:
        """How many trials of an experiment are in each status (statuses with none are left out)."""
        with self._reads() as session:
            return self._counts(session, experiment_id).get(experiment_id, {})

    def metrics_frame(
        self, experiment_id: int, *, split: str | None = None, name: str | None = None
    ) -> pd.DataFrame:
        """Metric values of an experiment in long format, joined with the facts of their trials.

        Columns: trial_id, key, role, condition, depth, seed, split_id (the trial's A/B class split),
        epoch, split (train/val/test), name, value; ordered by trial, name, split and epoch.
        """
        query = (
            select(
                Trial.id,
                Trial.key,
                Trial.role,
                Trial.condition,
                Trial.depth,
                Trial.seed,
                Trial.split,
                Metric.epoch,
                Metric.split,
                Metric.name,
                Metric.value,
            )
            .join(Metric, Metric.trial_id == Trial.id)
            .where(Trial.experiment_id == experiment_id)
            .order_by(Trial.id, Metric.name, Metric.split, Metric.epoch)
        )
        if split is not None:
            query = query.where(Metric.split == split)
        if name is not None:
            query = query.where(Metric.name == name)
        with self._reads() as session:
            rows = session.execute(query).all()
        frame = pd.DataFrame(rows, columns=list(METRICS_FRAME_COLUMNS))
        return frame.astype(
            {"trial_id": "int64", "depth": "int64", "seed": "int64", "epoch": "int64", "value": "float64"}
        )

    # -- internals ------------------------------------------------------------------------------

    @staticmethod
    def _get_experiment(session: Session, experiment_id: int) -> Experiment:
        row = session.get(Experiment, experiment_id)
        if row is None:
            raise StoreError(f"no experiment with id {experiment_id}")
        return row

    @staticmethod
    def _get_trial(session: Session, trial_id: int) -> Trial:
        row = session.get(Trial, trial_id)
        if row is None:
            raise StoreError(f"no trial with id {trial_id}")
        return row

    @staticmethod
    def _counts(session: Session, experiment_id: int | None = None) -> dict[int, dict[str, int]]:
        query = select(Trial.experiment_id, Trial.status, func.count()).group_by(
            Trial.experiment_id, Trial.status
        )
        if experiment_id is not None:
            query = query.where(Trial.experiment_id == experiment_id)
        counts: dict[int, dict[str, int]] = {}
        for exp_id, status, count in session.execute(query):
            counts.setdefault(exp_id, {})[status] = count
        order = {status: i for i, status in enumerate(TRIAL_STATUSES)}
        return {
            exp_id: dict(sorted(by_status.items(), key=lambda item: order.get(item[0], len(order))))
            for exp_id, by_status in counts.items()
        }

    @staticmethod
    def _recent_experiments(session: Session, limit: int = 5) -> str:
        query = select(Experiment.id, Experiment.name).order_by(
            Experiment.created_at.desc(), Experiment.id.desc()
        )
        recent = session.execute(query.limit(limit)).all()
        if not recent:
            return "the store has no experiments yet"
        shown = ", ".join(f"{exp_id} ({name})" for exp_id, name in recent)
        return f"recent experiments: {shown} (`transferlab status` lists them all)"


def _check_choice(what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise StoreError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")


def _upsert_statement(dialect_name: str) -> Any:
    """``INSERT INTO metrics ... ON CONFLICT (trial_id, epoch, split, name) DO UPDATE SET value``."""
    if dialect_name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    elif dialect_name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    else:
        raise StoreError(f"the store supports SQLite and PostgreSQL, not {dialect_name}")
    statement = dialect_insert(Metric.__table__)
    return statement.on_conflict_do_update(
        index_elements=list(_METRIC_KEY), set_={"value": statement.excluded.value}
    )
