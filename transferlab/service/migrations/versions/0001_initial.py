"""initial schema: experiments, trials, metrics

Revision ID: 0001_initial
Revises:
Create Date: 2025-01-01 00:00:00

Written by hand to match ``transferlab.service.store.models``; the test suite compares the two.
A migration is a frozen snapshot, so it spells its types out instead of importing the models.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None

UTC_DATETIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "experiments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("study", sa.String(length=32), nullable=False),
        sa.Column("spec_text", sa.Text(), nullable=False),
        sa.Column("spec_json", sa.JSON(), nullable=False),
        sa.Column("spec_hash", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("primary_metric", sa.String(length=100), nullable=False),
        sa.Column("higher_is_better", sa.Boolean(), nullable=False),
        sa.Column("storage_path", sa.String(length=1000), nullable=True),
        sa.Column("code_version", sa.String(length=100), nullable=False),
        sa.Column("created_at", UTC_DATETIME, nullable=False),
        sa.Column("started_at", UTC_DATETIME, nullable=True),
        sa.Column("finished_at", UTC_DATETIME, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_experiments"),
    )
    op.create_index("ix_experiments_name", "experiments", ["name"])

    op.create_table(
        "trials",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("experiment_id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("condition", sa.String(length=16), nullable=False),
        sa.Column("depth", sa.Integer(), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("split", sa.String(length=64), nullable=False),
        sa.Column("bn_policy", sa.String(length=16), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", UTC_DATETIME, nullable=False),
        sa.Column("started_at", UTC_DATETIME, nullable=True),
        sa.Column("finished_at", UTC_DATETIME, nullable=True),
        sa.Column("checkpoint_path", sa.String(length=1000), nullable=True),
        sa.Column("base_trial_id", sa.Integer(), nullable=True),
        sa.Column("data_hash", sa.String(length=64), nullable=True),
        sa.Column("provenance", sa.JSON(), nullable=False),
        sa.Column("ray_trial_id", sa.String(length=100), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_trials"),
        sa.ForeignKeyConstraint(
            ["experiment_id"],
            ["experiments.id"],
            name="fk_trials_experiment_id_experiments",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["base_trial_id"], ["trials.id"], name="fk_trials_base_trial_id_trials", ondelete="SET NULL"
        ),
        sa.UniqueConstraint("experiment_id", "key", name="uq_trials_experiment_id_key"),
    )
    op.create_index("ix_trials_experiment_id_status", "trials", ["experiment_id", "status"])
    op.create_index(
        "ix_trials_experiment_id_condition_depth", "trials", ["experiment_id", "condition", "depth"]
    )

    op.create_table(
        "metrics",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("trial_id", sa.Integer(), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("split", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_metrics"),
        sa.ForeignKeyConstraint(
            ["trial_id"], ["trials.id"], name="fk_metrics_trial_id_trials", ondelete="CASCADE"
        ),
        sa.UniqueConstraint(
            "trial_id", "epoch", "split", "name", name="uq_metrics_trial_id_epoch_split_name"
        ),
    )
    op.create_index("ix_metrics_trial_id_split_name", "metrics", ["trial_id", "split", "name"])


def downgrade() -> None:
    op.drop_table("metrics")
    op.drop_table("trials")
    op.drop_table("experiments")
