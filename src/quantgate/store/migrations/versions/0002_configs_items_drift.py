"""Schema version 2: configs as their own table (runs and candidates refer to them by digest),
per-metric and per-item results, artifacts and drift checks; candidates' weight_bytes as a 64-bit
integer and their measurements nullable (a run without labeled items has no accuracy).

Revision ID: 0002_configs_items_drift
Revises: 0001_v1_baseline
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0002_configs_items_drift"
down_revision = "0001_v1_baseline"
branch_labels = None
depends_on = None

MEASURED = ("accuracy", "flip_rate", "kld_mean", "kld_p99", "top1_agreement")


def upgrade() -> None:
    configs = op.create_table(
        "configs",
        sa.Column("digest", sa.String(64), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("body", sa.JSON, nullable=False),
    )
    settings = _move_configs(configs)
    with op.batch_alter_table("runs") as b:
        b.drop_column("config")
        b.create_foreign_key("fk_runs_config_digest", "configs", ["config_digest"], ["digest"])
        b.create_index("ix_runs_model_base", ["model_base"])
        b.create_index("ix_runs_model_sha256", ["model_sha256"])
    with op.batch_alter_table("candidates") as b:
        b.add_column(sa.Column("settings_digest", sa.String(64)))
        b.create_foreign_key("fk_candidates_settings_digest", "configs", ["settings_digest"], ["digest"])
        b.alter_column("weight_bytes", type_=sa.BigInteger, existing_type=sa.Integer, existing_nullable=False)
        for name in MEASURED:
            b.alter_column(name, nullable=True, existing_type=sa.Float)
    cands = sa.table("candidates", sa.column("run_pk"), sa.column("name"), sa.column("settings_digest"))
    if settings:
        op.get_bind().execute(
            cands.update().where(cands.c.run_pk == sa.bindparam("r"), cands.c.name == sa.bindparam("n"))
            .values(settings_digest=sa.bindparam("d")),
            settings,
        )
    _create_result_tables()
    _set_schema_version("2")


def _set_schema_version(value: str) -> None:
    meta = sa.table("quantgate_meta", sa.column("key"), sa.column("value"))
    op.execute(meta.update().where(meta.c.key == "schema_version").values(value=value))


def _move_configs(configs: sa.Table) -> list[dict[str, Any]]:
    """Copy each run's inline config, and each candidate's settings found in its run's results,
    into `configs`. Returns {r: run pk, n: candidate name, d: settings digest} per candidate."""
    runs = sa.table("runs", sa.column("id"), sa.column("config_digest"), sa.column("config", sa.JSON),
                    sa.column("results", sa.JSON))
    bodies: dict[str, tuple[str, Any]] = {}
    settings = []
    for run in op.get_bind().execute(sa.select(runs.c.id, runs.c.config_digest, runs.c.config, runs.c.results)):
        bodies.setdefault(run.config_digest, ("run", run.config))
        for cand in (run.results or {}).get("candidates", []):
            if cand.get("settings") is not None:
                # sha256 of the canonical JSON (frozen copy of quantgate.store.digest at this revision)
                d = hashlib.sha256(json.dumps(cand["settings"], sort_keys=True).encode()).hexdigest()
                bodies.setdefault(d, ("candidate", cand["settings"]))
                settings.append({"r": run.id, "n": cand["name"], "d": d})
    if bodies:
        op.bulk_insert(configs, [{"digest": d, "kind": k, "body": b} for d, (k, b) in bodies.items()])
    return settings


def _create_result_tables() -> None:
    op.create_table(
        "metric_results",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("run_pk", sa.Integer, sa.ForeignKey("runs.id", name="fk_metric_results_run_pk"), nullable=False),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("task", sa.String(128), nullable=False),
        sa.Column("metric", sa.String(64), nullable=False),
        sa.Column("value", sa.Float),
        sa.Column("ci_low", sa.Float),
        sa.Column("ci_high", sa.Float),
        sa.UniqueConstraint("run_pk", "model", "task", "metric", name="uq_metric_results"),
    )
    op.create_table(
        "item_results",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("model_sha256", sa.String(64), nullable=False),
        sa.Column("settings_digest", sa.String(64), nullable=False),
        sa.Column("data_digest", sa.String(64), nullable=False),
        sa.Column("task", sa.String(128), nullable=False),
        sa.Column("item_id", sa.String(256), nullable=False),
        sa.Column("run_id", sa.String(64)),
        sa.Column("candidate", sa.String(128)),
        sa.Column("correct", sa.Boolean),
        sa.Column("score", sa.Float),
        sa.Column("answer", sa.Text),
        sa.Column("option_ll", sa.JSON),
        sa.Column("option_greedy", sa.JSON),
        sa.Column("generation", sa.JSON),
        sa.Column("extra", sa.JSON),
        sa.Column("scored_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("model_sha256", "settings_digest", "data_digest", "task", "item_id",
                            name="uq_item_results_key"),
    )
    op.create_table(
        "artifacts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("run_pk", sa.Integer, sa.ForeignKey("runs.id", name="fk_artifacts_run_pk"), nullable=False),
        sa.Column("candidate", sa.String(128)),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("sha256", sa.String(64)),
        sa.Column("bytes", sa.BigInteger),
    )
    op.create_table(
        "drift_checks",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("checked_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model_base", sa.String(512), nullable=False),
        sa.Column("model_sha256", sa.String(64), nullable=False),
        sa.Column("candidate", sa.String(128), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("run_id", sa.String(64)),
        sa.Column("settings_digest", sa.String(64)),
        sa.Column("data_digest", sa.String(64)),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
    )
    op.create_index("ix_drift_checks_model", "drift_checks", ["model_base", "model_sha256", "candidate"])


def downgrade() -> None:
    """Back to version 1. Fails (and changes nothing) where a candidate lacks a measurement that
    version 1 required."""
    _set_schema_version("1")
    for table in ("drift_checks", "artifacts", "item_results", "metric_results"):
        op.drop_table(table)
    with op.batch_alter_table("candidates") as b:
        b.drop_constraint("fk_candidates_settings_digest", type_="foreignkey")
        b.drop_column("settings_digest")
        b.alter_column("weight_bytes", type_=sa.Integer, existing_type=sa.BigInteger, existing_nullable=False)
        for name in MEASURED:
            b.alter_column(name, nullable=False, existing_type=sa.Float)
    op.add_column("runs", sa.Column("config", sa.JSON))
    op.execute("UPDATE runs SET config = (SELECT body FROM configs WHERE configs.digest = runs.config_digest)")
    with op.batch_alter_table("runs") as b:
        b.alter_column("config", nullable=False, existing_type=sa.JSON)
        b.drop_constraint("fk_runs_config_digest", type_="foreignkey")
        b.drop_index("ix_runs_model_base")
        b.drop_index("ix_runs_model_sha256")
    op.drop_table("configs")
