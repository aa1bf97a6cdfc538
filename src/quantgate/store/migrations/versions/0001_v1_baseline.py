"""Schema version 1: the store as quantgate wrote it before migrations existed (runs, candidates,
quantgate_meta). A store of that age is stamped with this revision instead of running it.

Revision ID: 0001_v1_baseline
Revises: (none)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_v1_baseline"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The tables exactly as version 1's models created them (frozen here: later schema changes go
    # into later revisions, never into this one).
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("run_id", sa.String(64), nullable=False, unique=True),
        sa.Column("started", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model_base", sa.String(512), nullable=False),
        sa.Column("model_sha256", sa.String(64), nullable=False),
        sa.Column("config_digest", sa.String(64), nullable=False),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("recommended", sa.String(128)),
        sa.Column("exit_code", sa.Integer, nullable=False),
        sa.Column("results", sa.JSON, nullable=False),
    )
    op.create_table(
        "candidates",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("run_pk", sa.Integer, sa.ForeignKey("runs.id"), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("method", sa.String(32), nullable=False),
        sa.Column("bits", sa.Integer, nullable=False),
        sa.Column("group_size", sa.Integer),
        sa.Column("weight_bytes", sa.Integer, nullable=False),
        sa.Column("accuracy", sa.Float, nullable=False),
        sa.Column("recovery", sa.Float),
        sa.Column("flip_rate", sa.Float, nullable=False),
        sa.Column("kld_mean", sa.Float, nullable=False),
        sa.Column("kld_p99", sa.Float, nullable=False),
        sa.Column("top1_agreement", sa.Float, nullable=False),
        sa.Column("passed", sa.Boolean, nullable=False),
    )
    meta = op.create_table(
        "quantgate_meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(256), nullable=False),
    )
    op.bulk_insert(meta, [{"key": "schema_version", "value": "1"}])


def downgrade() -> None:
    op.drop_table("candidates")
    op.drop_table("runs")
    op.drop_table("quantgate_meta")
