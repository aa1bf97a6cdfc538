"""Writing to the store: a finished run (with its per-metric results and artifacts), per-item
results as they are scored, and drift checks."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Connection, Table, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine

from quantgate.errors import UserError
from quantgate.record import OVERALL, CandidateRecord, RunRecord
from quantgate.store.schema import artifacts as artifact_table
from quantgate.store.schema import candidates, configs, drift_checks, item_results, metric_results, runs

DRIFT_OUTCOMES = ("pass", "fail", "inconclusive", "error")


def digest(value: Any) -> str:
    """sha256 (hex) of the canonical JSON of a JSON-ready value: the identity of a run's config or
    of a candidate's settings. digest(cfg.model_dump(mode="json")) == cfg.digest()."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def utc(moment: datetime) -> datetime:
    """An aware UTC datetime; a naive one is taken to be UTC already (SQLite keeps no zone)."""
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


@dataclass(frozen=True)
class Artifact:
    """A file a run wrote."""

    kind: str  # "results", "model", "manifest", ...
    path: str
    candidate: str | None = None  # None: the run's own
    sha256: str | None = None
    bytes: int | None = None


@dataclass(frozen=True)
class ItemKey:
    """What makes one item's result reusable: the same model weights, the same candidate settings
    (baseline included: its own settings digest), the same eval data and scoring settings."""

    model_sha256: str
    settings_digest: str
    data_digest: str


@dataclass(frozen=True)
class ItemResult:
    """One scored item: everything needed to rebuild the metrics without scoring it again."""

    task: str
    item_id: str
    correct: bool | None  # None: unlabeled
    score: float | None  # in [0, 1] under the gate metric; None: unlabeled
    answer: str | None
    option_ll: tuple[float, ...] | None = None  # [n_options] summed log-likelihood (-inf allowed)
    option_greedy: tuple[bool, ...] | None = None  # [n_options] every continuation token was the argmax
    generation: tuple[int, ...] | None = None  # generated token ids
    extra: Mapping[str, Any] | None = None  # JSON-ready, finite numbers (e.g. a window's KLD summary)


@dataclass(frozen=True)
class DriftCheck:
    """A re-check of a candidate some time after the run that recommended it."""

    model_base: str
    model_sha256: str
    candidate: str
    outcome: str  # one of DRIFT_OUTCOMES
    checked_at: datetime
    metrics: Mapping[str, float | None] = field(default_factory=dict)  # e.g. recovery, flip_rate, kld_mean
    run_id: str | None = None  # the run whose results it compared against
    settings_digest: str | None = None
    data_digest: str | None = None
    detail: str = ""


def record_run(store: Engine, record: RunRecord, *, artifacts: Sequence[Artifact] = ()) -> None:
    """Store one run: its config goes to `configs`, the rest of the record to runs.results, with
    its candidates, their per-metric results, the model files the record names and `artifacts`
    (files written beside it, e.g. results.json). UserError if a run of that id is recorded already."""
    with store.begin() as conn:
        if conn.execute(select(runs.c.id).where(runs.c.run_id == record.run_id)).first():
            raise UserError(f"store: run {record.run_id} is recorded already")
        _put_config(conn, record.config_digest, "run", record.config)
        run_pk = conn.execute(runs.insert().values(**_run_row(record))).inserted_primary_key[0]
        for c in record.candidates:
            conn.execute(candidates.insert().values(run_pk=run_pk, **_candidate_row(conn, c)))
        conn.execute(metric_results.insert(), [{"run_pk": run_pk, **r} for r in metric_rows(record)])
        written = [*record_artifacts(record), *artifacts]
        if written:
            conn.execute(artifact_table.insert(), [{"run_pk": run_pk, **vars(a)} for a in written])


def _run_row(record: RunRecord) -> dict[str, Any]:
    return {
        "run_id": record.run_id, "started": utc(record.started), "finished": utc(record.finished),
        "model_base": record.model.base, "model_sha256": record.model.sha256, "config_digest": record.config_digest,
        "recommended": record.recommended, "exit_code": record.exit_code,
        # JSON-safe (the record holds no NaN: PostgreSQL's json refuses it); the config lives in `configs`
        "results": record.model_dump(mode="json", exclude={"config"}),
    }


def record_artifacts(record: RunRecord) -> list[Artifact]:
    """The model files a run wrote: each model's artifact in the record (kind "model")."""
    return [Artifact("model", a.path, candidate=m.name, sha256=a.sha256, bytes=a.bytes)
            for m in record.models if (a := m.artifact)]


def _candidate_row(conn: Connection, c: CandidateRecord) -> dict[str, Any]:
    settings = c.settings  # None in records older than the settings field
    settings_digest = None if settings is None else _put_config(conn, digest(settings), "candidate", settings)
    vs = c.vs_baseline
    return {
        # bits None: nothing quantized (pruning alone), the weights stay float32 like every baseline
        "name": c.name, "settings_digest": settings_digest, "method": c.method, "bits": c.bits or 32,
        "group_size": c.group_size, "weight_bytes": c.weight_bytes, "accuracy": c.accuracy,
        "recovery": vs.recovery, "flip_rate": vs.flips.rate, "kld_mean": vs.kld_mean,
        "kld_p99": vs.kld_p99, "top1_agreement": vs.top1_agreement, "passed": c.gate.passed,
    }


def _put_config(conn: Connection, key: str, kind: str, body: Any) -> str:
    _upsert(conn, configs, [{"digest": key, "kind": kind, "body": body}], ["digest"], update=False)
    return key


def metric_rows(record: RunRecord) -> list[dict[str, Any]]:
    """The run's numbers as rows {model, task, metric, value, ci_low, ci_high}: each model's own
    metrics (overall, and per task under the gate metric) and each candidate's comparison with
    the baseline (per task, "overall" included, with the intervals the run computed)."""
    rows: list[dict[str, Any]] = []

    def add(model: str, task: str, metric: str, value: float | None,
            ci: Sequence[float | None] | None = None) -> None:
        low, high = ci if ci else (None, None)
        rows.append({"model": model, "task": task, "metric": metric, "value": value, "ci_low": low, "ci_high": high})

    for m in record.models:
        for metric, value in (("accuracy", m.accuracy), ("accuracy_norm", m.accuracy_norm),
                              ("perplexity", m.perplexity)):
            add(m.name, OVERALL, metric, value)
        for task, value in m.per_task.items():
            add(m.name, task, record.eval.metric, value)
    for c in record.candidates:
        vs = c.vs_baseline
        add(c.name, OVERALL, "kld_mean", vs.kld_mean, vs.kld_mean_ci)
        add(c.name, OVERALL, "kld_p99", vs.kld_p99, vs.kld_p99_ci)
        add(c.name, OVERALL, "top1_agreement", vs.top1_agreement)
        for task, t in vs.tasks.items():
            add(c.name, task, "recovery", t.recovery, t.recovery_ci)
            add(c.name, task, "diff", t.diff, t.diff_ci)
            add(c.name, task, "flip_rate", t.flips.rate, t.flip_rate_ci)
            add(c.name, task, "mcnemar_p", t.mcnemar_p)
            add(c.name, task, "min_detectable_drop", t.min_detectable_drop)
    return rows


def record_items(store: Engine, key: ItemKey, items: Iterable[ItemResult], *, run_id: str | None = None,
                 candidate: str | None = None) -> int:
    """Store scored items under `key` (one transaction); an item already stored under the same key,
    task and id is replaced. Returns how many items were written."""
    now = datetime.now(timezone.utc)
    rows = {(i.task, i.item_id): _item_row(key, i, run_id, candidate, now) for i in items}  # last wins
    if rows:
        with store.begin() as conn:
            _upsert(conn, item_results, list(rows.values()),
                    ["model_sha256", "settings_digest", "data_digest", "task", "item_id"], update=True)
    return len(rows)


def _item_row(key: ItemKey, item: ItemResult, run_id: str | None, candidate: str | None,
              now: datetime) -> dict[str, Any]:
    score = None if item.score is None or math.isnan(item.score) else float(item.score)
    return {
        "model_sha256": key.model_sha256, "settings_digest": key.settings_digest, "data_digest": key.data_digest,
        "task": item.task, "item_id": item.item_id, "run_id": run_id, "candidate": candidate,
        "correct": None if item.correct is None else bool(item.correct), "score": score, "answer": item.answer,
        "option_ll": None if item.option_ll is None else [_encode_float(x) for x in item.option_ll],
        "option_greedy": None if item.option_greedy is None else [bool(x) for x in item.option_greedy],
        "generation": None if item.generation is None else [int(x) for x in item.generation],
        "extra": None if item.extra is None else json.loads(json.dumps(item.extra, allow_nan=False)),
        "scored_at": now,
    }


def _encode_float(x: float) -> float | str:
    """JSON has no inf or nan: those travel as the strings 'inf', '-inf', 'nan' (float() reads them)."""
    x = float(x)
    return x if math.isfinite(x) else str(x)


def record_drift(store: Engine, check: DriftCheck) -> None:
    """Store one drift check. ValueError for an outcome outside DRIFT_OUTCOMES."""
    if check.outcome not in DRIFT_OUTCOMES:
        raise ValueError(f"drift outcome {check.outcome!r}: expected one of {', '.join(DRIFT_OUTCOMES)}")
    row = {**vars(check), "checked_at": utc(check.checked_at),
           "metrics": json.loads(json.dumps(dict(check.metrics), allow_nan=False))}
    with store.begin() as conn:
        conn.execute(drift_checks.insert().values(**row))


def _upsert(conn: Connection, table: Table, rows: list[dict[str, Any]], keys: list[str], *, update: bool) -> None:
    """INSERT ... ON CONFLICT (keys): replace the other columns (update) or keep the stored row."""
    insert = sqlite_insert if conn.dialect.name == "sqlite" else pg_insert
    stmt = insert(table)
    if update:
        stmt = stmt.on_conflict_do_update(index_elements=keys,
                                          set_={c: stmt.excluded[c] for c in rows[0] if c not in keys})
    else:
        stmt = stmt.on_conflict_do_nothing(index_elements=keys)
    conn.execute(stmt, rows)
