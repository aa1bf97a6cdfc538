"""A run as plain JSON-ready data: what results.json holds and what the store records."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import numpy as np

from quantgate.evals.metrics import TaskComparison
from quantgate.run import ModelResult, RunResult


def run_id(result: RunResult) -> str:
    return f"{result.started:%Y%m%dT%H%M%SZ}-{result.config.digest()[:8]}"


def to_dict(result: RunResult) -> dict[str, Any]:
    cfg = result.config
    verdicts = {v.name: v for v in result.decision.verdicts}
    suite = result.prepared.suite
    return _clean({
        "run_id": run_id(result),
        "started": result.started.isoformat(),
        "finished": result.finished.isoformat(),
        "config": cfg.model_dump(mode="json"),
        "config_digest": cfg.digest(),
        "environment": result.environment,
        "model": {
            "base": cfg.model.base,
            "source": result.model_source,
            "sha256": result.model_digest,
            "description": result.model_description,
        },
        "eval": {
            "eval_set": suite.name,
            "metric": cfg.quality_gate.metric,
            "items": len(suite.items),
            "tasks": suite.tasks,
            "duplicates": [{"task": t, "id": i, "same_as": f} for t, i, f in suite.duplicates],
            "window_tokens": result.prepared.n_window_tokens,
        },
        "calibration": result.calibration,
        "baseline": _model(result.baseline),
        "candidates": [
            {
                **_model(c),
                "method": c.candidate.method,
                "bits": c.candidate.bits,
                "group_size": c.candidate.group_size,
                "symmetric": c.candidate.symmetric,
                "settings": c.candidate.model_dump(mode="json"),
                "modules_changed": c.modules_changed,
                "quantize_seconds": round(c.quantize_seconds, 3),
                "vs_baseline": _comparison(c),
                "gate": {
                    "passed": verdicts[c.name].passed,
                    "rules": [{**asdict(r), "passed": r.passed} for r in verdicts[c.name].rules],
                },
                "flipped_items": flipped_items(result, c),
            }
            for c in result.candidates
        ],
        "recommendation": {"candidate": result.decision.recommended, "reason": result.decision.reason},
        "exit_code": result.exit_code,
    })


def _model(m: ModelResult) -> dict[str, Any]:
    return {
        "name": m.name,
        "weight_bytes": m.weight_bytes,
        "accuracy": m.metrics.accuracy,
        "accuracy_norm": m.metrics.accuracy_norm,
        "per_task": m.metrics.per_task,
        "perplexity": m.metrics.perplexity,
        "eval_seconds": round(m.scores.seconds, 3),
    }


def _comparison(m: ModelResult) -> dict[str, Any]:
    c = m.comparison
    return {
        "recovery": c.recovery,
        "tasks": {name: _task(t) for name, t in c.tasks.items()},
        "flips": {
            "correct_to_wrong": c.flips.correct_to_wrong,
            "wrong_to_correct": c.flips.wrong_to_correct,
            "answers_changed": c.flips.changed,
            "rate": c.flips.rate,
            "items": c.flips.n,
        },
        "kld_mean": c.kld.mean,
        "kld_mean_ci": c.kld.mean_ci,
        "kld_p99": c.kld.quantile,
        "kld_p99_ci": c.kld.quantile_ci,
        "top1_agreement": c.top1_agreement,
    }


def _task(t: TaskComparison) -> dict[str, Any]:
    d = asdict(t)
    d["flips"]["rate"] = t.flips.rate
    return d


def flipped_items(result: RunResult, m: ModelResult) -> list[dict[str, Any]]:
    """Items whose correctness changed (labeled) or whose output changed (unlabeled prompts): the
    "edge" inputs, with both answers and the gold."""
    base = result.baseline.metrics
    labeled = ~np.isnan(base.score)
    changed = np.flatnonzero(np.where(labeled, base.correct != m.metrics.correct,
                                      np.array(base.answers, dtype=object) != np.array(m.metrics.answers, dtype=object)))
    items = result.prepared.suite.items
    return [
        {
            "id": items[i].id,
            "task": items[i].task,
            "prompt": items[i].prompt,
            "gold": items[i].gold_answer,
            "baseline_answer": base.answers[i],
            "candidate_answer": m.metrics.answers[i],
            "direction": ("correct->wrong" if base.correct[i] else "wrong->correct") if labeled[i] else "output changed",
        }
        for i in changed
    ]


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf -> None, tuples -> lists, numpy scalars -> Python."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(value) or math.isinf(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value
