"""The store's tables at the newest schema revision (the migrations in migrations/versions build
exactly this; tests compare the two).

    configs         one row per distinct settings object: a run's config or a candidate's settings,
                    keyed by digest() of its canonical JSON
    runs            one row per run; `results` holds the run's JSON payload less its config
    candidates      per run, per candidate: the headline numbers and the gate's verdict
    metric_results  per run, per model (baseline or candidate), per task ("overall" included), per
                    metric: value and interval bounds
    item_results    per scored item, keyed by (model sha256, settings digest, data digest, task, item
                    id), independent of any run row: what a resumed run asks for
    artifacts       files a run wrote (results.json, quantized models, manifests)
    drift_checks    a later re-check of a recommended candidate
    quantgate_meta  key "schema_version": SCHEMA_VERSION (old quantgate versions read it and refuse
                    a store newer than they know)
"""

from __future__ import annotations

from sqlalchemy import (
    JSON, BigInteger, Boolean, Column, DateTime, Float, ForeignKey, Index, Integer, MetaData, String, Table, Text,
    UniqueConstraint,
)

# The number written to quantgate_meta.schema_version by the newest migration; version 1 is the
# schema of the store before migrations existed (runs, candidates, quantgate_meta).
SCHEMA_VERSION = 2
DIGEST = 64  # hex sha256

metadata = MetaData()

configs = Table(
    "configs", metadata,
    Column("digest", String(DIGEST), primary_key=True),
    Column("kind", String(16), nullable=False),  # "run" | "candidate"
    Column("body", JSON, nullable=False),
)

runs = Table(
    "runs", metadata,
    Column("id", Integer, primary_key=True),
    Column("run_id", String(64), nullable=False, unique=True),
    Column("started", DateTime(timezone=True), nullable=False),
    Column("finished", DateTime(timezone=True), nullable=False),
    Column("model_base", String(512), nullable=False),
    Column("model_sha256", String(DIGEST), nullable=False),
    Column("config_digest", String(DIGEST), ForeignKey("configs.digest", name="fk_runs_config_digest"),
           nullable=False),
    Column("recommended", String(128)),
    Column("exit_code", Integer, nullable=False),
    Column("results", JSON, nullable=False),
    Index("ix_runs_model_base", "model_base"),
    Index("ix_runs_model_sha256", "model_sha256"),
)

candidates = Table(
    "candidates", metadata,
    Column("id", Integer, primary_key=True),
    Column("run_pk", Integer, ForeignKey("runs.id"), nullable=False),
    Column("name", String(128), nullable=False),
    Column("settings_digest", String(DIGEST), ForeignKey("configs.digest", name="fk_candidates_settings_digest")),
    Column("method", String(32), nullable=False),
    Column("bits", Integer, nullable=False),
    Column("group_size", Integer),
    Column("weight_bytes", BigInteger, nullable=False),
    # None where the run had nothing to measure it on (no labeled items, no text windows)
    Column("accuracy", Float),
    Column("recovery", Float),
    Column("flip_rate", Float),
    Column("kld_mean", Float),
    Column("kld_p99", Float),
    Column("top1_agreement", Float),
    Column("passed", Boolean, nullable=False),
)

metric_results = Table(
    "metric_results", metadata,
    Column("id", Integer, primary_key=True),
    Column("run_pk", Integer, ForeignKey("runs.id", name="fk_metric_results_run_pk"), nullable=False),
    Column("model", String(128), nullable=False),  # "baseline" or a candidate's name
    Column("task", String(128), nullable=False),  # "overall" or a task
    Column("metric", String(64), nullable=False),
    Column("value", Float),
    Column("ci_low", Float),
    Column("ci_high", Float),
    UniqueConstraint("run_pk", "model", "task", "metric", name="uq_metric_results"),
)

item_results = Table(
    "item_results", metadata,
    Column("id", Integer, primary_key=True),
    Column("model_sha256", String(DIGEST), nullable=False),
    Column("settings_digest", String(DIGEST), nullable=False),
    Column("data_digest", String(DIGEST), nullable=False),
    Column("task", String(128), nullable=False),
    Column("item_id", String(256), nullable=False),
    Column("run_id", String(64)),  # the run that scored it (no foreign key: items land before their run)
    Column("candidate", String(128)),
    Column("correct", Boolean),  # None: unlabeled
    Column("score", Float),  # in [0, 1]; None: unlabeled
    Column("answer", Text),
    Column("option_ll", JSON),  # [n_options] summed log-likelihoods (non-finite values as strings)
    Column("option_greedy", JSON),  # [n_options] bool
    Column("generation", JSON),  # generated token ids
    Column("extra", JSON),  # anything else (e.g. per-window KLD summaries)
    Column("scored_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("model_sha256", "settings_digest", "data_digest", "task", "item_id", name="uq_item_results_key"),
)

artifacts = Table(
    "artifacts", metadata,
    Column("id", Integer, primary_key=True),
    Column("run_pk", Integer, ForeignKey("runs.id", name="fk_artifacts_run_pk"), nullable=False),
    Column("candidate", String(128)),  # None: the run's own (results.json)
    Column("kind", String(32), nullable=False),
    Column("path", Text, nullable=False),
    Column("sha256", String(DIGEST)),
    Column("bytes", BigInteger),
)

drift_checks = Table(
    "drift_checks", metadata,
    Column("id", Integer, primary_key=True),
    Column("checked_at", DateTime(timezone=True), nullable=False),
    Column("model_base", String(512), nullable=False),
    Column("model_sha256", String(DIGEST), nullable=False),
    Column("candidate", String(128), nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("run_id", String(64)),  # the run whose results the check compared against
    Column("settings_digest", String(DIGEST)),
    Column("data_digest", String(DIGEST)),
    Column("metrics", JSON, nullable=False),
    Column("detail", Text, nullable=False),
    Index("ix_drift_checks_model", "model_base", "model_sha256", "candidate"),
)

meta = Table(
    "quantgate_meta", metadata,
    Column("key", String(64), primary_key=True),
    Column("value", String(256), nullable=False),
)

# Alembic's bookkeeping table, under a name of our own so that a PostgreSQL database shared with
# another application's migrations keeps both apart.
VERSION_TABLE = "quantgate_alembic_version"
# The revision whose schema is version 1: a store without VERSION_TABLE whose quantgate_meta says
# schema_version "1" was written before migrations existed and is stamped with it, then upgraded.
BASELINE_REVISION = "0001_v1_baseline"
