"""Reading the store: a run back, its metrics and artifacts, the items already scored under a key,
drift checks, and the history of a model (runs and drift checks over time)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row, and_, case, func, or_, select, true
from sqlalchemy.engine import Engine

from quantgate.record import RunRecord, load_record
from quantgate.store.connect import reading
from quantgate.store.records import Artifact, DriftCheck, ItemKey, ItemResult, utc
from quantgate.store.schema import artifacts, candidates, configs, drift_checks, item_results, metric_results, runs


@dataclass(frozen=True)
class HistoryRow:
    """A run or a drift check, for `quantgate history`."""

    when: datetime  # UTC: a run's start, a check's time
    kind: str  # "run" | "drift"
    run_id: str | None  # the run; for a drift check, the run it compared against
    model_base: str
    model_sha256: str
    candidate: str | None  # a run's recommended candidate (None: none held the gate); the checked one
    recovery: float | None
    flip_rate: float | None
    kld_mean: float | None
    outcome: str  # run: "recommended" | "none passed"; drift check: one of DRIFT_OUTCOMES
    detail: str  # a drift check's detail ("" for runs)


def load_run(store: Engine, run_id: str) -> RunRecord | None:
    """The record record_run stored, its config included (any schema version the store holds:
    see record.load_record); None if no such run."""
    with reading(store) as conn:
        row = conn.execute(select(runs.c.results, configs.c.body)
                           .join(configs, configs.c.digest == runs.c.config_digest)
                           .where(runs.c.run_id == run_id)).first()
    return None if row is None else load_record({**row.results, "config": row.body}, where=f"store run {run_id}")


Bounds = tuple[float | None, float | None, float | None]  # value, ci_low, ci_high


def run_metrics(store: Engine, run_id: str) -> dict[tuple[str, str, str], Bounds]:
    """(model, task, metric) -> (value, ci_low, ci_high) of a run (see records.metric_rows)."""
    m = metric_results
    with reading(store) as conn:
        rows = conn.execute(select(m.c.model, m.c.task, m.c.metric, m.c.value, m.c.ci_low, m.c.ci_high)
                            .join(runs, runs.c.id == m.c.run_pk).where(runs.c.run_id == run_id))
        return {(r.model, r.task, r.metric): (r.value, r.ci_low, r.ci_high) for r in rows}


def run_artifacts(store: Engine, run_id: str) -> list[Artifact]:
    a = artifacts
    with reading(store) as conn:
        rows = conn.execute(select(a.c.kind, a.c.path, a.c.candidate, a.c.sha256, a.c.bytes)
                            .join(runs, runs.c.id == a.c.run_pk).where(runs.c.run_id == run_id).order_by(a.c.id))
        return [Artifact(**r._mapping) for r in rows]


def scored_items(store: Engine, key: ItemKey) -> dict[tuple[str, str], ItemResult]:
    """Every item stored under `key`: (task, item id) -> its result (floats exactly as recorded,
    -inf and nan included)."""
    i = item_results
    with reading(store) as conn:
        rows = conn.execute(select(i).where(i.c.model_sha256 == key.model_sha256,
                                            i.c.settings_digest == key.settings_digest,
                                            i.c.data_digest == key.data_digest))
        return {(r.task, r.item_id): _item(r) for r in rows}


def _item(r: Row) -> ItemResult:
    return ItemResult(
        task=r.task, item_id=r.item_id, correct=r.correct, score=r.score, answer=r.answer,
        option_ll=None if r.option_ll is None else tuple(float(x) for x in r.option_ll),
        option_greedy=None if r.option_greedy is None else tuple(r.option_greedy),
        generation=None if r.generation is None else tuple(r.generation), extra=r.extra,
    )


def last_drift(store: Engine, model: str, candidate: str) -> DriftCheck | None:
    """The latest drift check of `candidate` of `model` (its base name or its sha256)."""
    d = drift_checks
    with reading(store) as conn:
        row = conn.execute(select(d).where(_model_is(d, model), d.c.candidate == candidate)
                           .order_by(d.c.checked_at.desc(), d.c.id.desc()).limit(1)).first()
    return None if row is None else _drift(row)


def _drift(r: Row) -> DriftCheck:
    fields = {k: v for k, v in r._mapping.items() if k != "id"}
    return DriftCheck(**{**fields, "checked_at": utc(r.checked_at)})


def _model_is(table: Any, model: str | None) -> Any:
    return true() if model is None else or_(table.c.model_base == model, table.c.model_sha256 == model)


def history(store: Engine, model: str | None = None) -> list[HistoryRow]:
    """Runs and drift checks, oldest first, of `model` (its base name or sha256; None: all). A
    run's numbers are those of its recommended candidate."""
    c = candidates
    runs_q = (select(runs.c.started, runs.c.run_id, runs.c.model_base, runs.c.model_sha256, runs.c.recommended,
                     c.c.recovery, c.c.flip_rate, c.c.kld_mean)
              .outerjoin(c, and_(c.c.run_pk == runs.c.id, c.c.name == runs.c.recommended))
              .where(_model_is(runs, model)))
    with reading(store) as conn:
        found = [_run_row(r) for r in conn.execute(runs_q)]
        checks = conn.execute(select(drift_checks).where(_model_is(drift_checks, model)))
        found += [_drift_row(_drift(r)) for r in checks]
    return sorted(found, key=lambda h: (h.when, h.kind))


def _run_row(r: Row) -> HistoryRow:
    return HistoryRow(
        when=utc(r.started), kind="run", run_id=r.run_id, model_base=r.model_base, model_sha256=r.model_sha256,
        candidate=r.recommended, recovery=r.recovery, flip_rate=r.flip_rate, kld_mean=r.kld_mean,
        outcome="recommended" if r.recommended else "none passed", detail="",
    )


def _drift_row(d: DriftCheck) -> HistoryRow:
    m = d.metrics
    return HistoryRow(
        when=d.checked_at, kind="drift", run_id=d.run_id, model_base=d.model_base, model_sha256=d.model_sha256,
        candidate=d.candidate, recovery=m.get("recovery"), flip_rate=m.get("flip_rate"), kld_mean=m.get("kld_mean"),
        outcome=d.outcome, detail=d.detail,
    )



@dataclass(frozen=True)
class RunRow:
    """One recorded run, whatever its outcome, for `quantgate runs`."""

    started: datetime  # UTC
    run_id: str
    model_base: str
    model_sha256: str
    recommended: str | None  # None: no candidate held the gate
    exit_code: int
    candidates: int  # candidates evaluated
    passed: int  # of those, how many held the gate
    results: str | None  # its results.json, where the run wrote it


def run_rows(store: Engine, model: str | None = None) -> list[RunRow]:
    """Every run of `model` (its base name or sha256; None: all), oldest first: runs where no
    candidate passed are listed like any other."""
    c, a = candidates, artifacts
    counts = (select(c.c.run_pk, func.count().label("n"), func.sum(case((c.c.passed, 1), else_=0)).label("passed"))
              .group_by(c.c.run_pk).subquery())
    results = (select(a.c.run_pk, func.min(a.c.path).label("path")).where(a.c.kind == "results")
               .group_by(a.c.run_pk).subquery())
    q = (select(runs.c.started, runs.c.run_id, runs.c.model_base, runs.c.model_sha256, runs.c.recommended,
                runs.c.exit_code, counts.c.n, counts.c.passed, results.c.path)
         .outerjoin(counts, counts.c.run_pk == runs.c.id).outerjoin(results, results.c.run_pk == runs.c.id)
         .where(_model_is(runs, model)).order_by(runs.c.started, runs.c.id))
    with reading(store) as conn:
        return [RunRow(utc(r.started), r.run_id, r.model_base, r.model_sha256, r.recommended, r.exit_code,
                       int(r.n or 0), int(r.passed or 0), r.path) for r in conn.execute(q)]
