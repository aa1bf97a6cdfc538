"""A run as plain JSON-ready data: what results.json holds and what the store records."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from quantgate.run import ModelResult, RunResult


def run_id(result: RunResult) -> str:
    return f"{result.started:%Y%m%dT%H%M%SZ}-{result.config.digest()[:8]}"


def to_dict(result: RunResult) -> dict[str, Any]:
    cfg = result.config
    verdicts = {v.name: v for v in result.decision.verdicts}
    prepared = result.prepared
    return {
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
            "eval_set": cfg.quality_gate.eval_set,
            "metric": cfg.quality_gate.metric,
            "items": len(prepared.suite.items),
            "tasks": prepared.suite.tasks,
            "window_tokens": prepared.n_window_tokens,
        },
        "baseline": _model(result.baseline),
        "candidates": [
            {
                **_model(c),
                "method": c.candidate.method,
                "bits": c.candidate.bits,
                "group_size": c.candidate.group_size,
                "symmetric": c.candidate.symmetric,
                "modules_changed": c.modules_changed,
                "quantize_seconds": round(c.quantize_seconds, 3),
                "vs_baseline": _comparison(c),
                "gate": {
                    "passed": verdicts[c.name].passed,
                    "rules": [vars(r) for r in verdicts[c.name].rules],
                },
                "flipped_items": flipped_items(result, c),
            }
            for c in result.candidates
        ],
        "recommendation": {"candidate": result.decision.recommended, "reason": result.decision.reason},
        "exit_code": result.exit_code,
    }


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
        "recovery": _finite(c.recovery),
        "per_task_recovery": {k: _finite(v) for k, v in c.per_task_recovery.items()},
        "flips": {
            "correct_to_wrong": c.flips.correct_to_wrong,
            "wrong_to_correct": c.flips.wrong_to_correct,
            "answers_changed": c.flips.changed,
            "rate": c.flips.rate,
            "items": c.flips.n,
        },
        "kld_mean": c.kld_mean,
        "kld_p99": c.kld_p99,
        "top1_agreement": c.top1_agreement,
    }


def flipped_items(result: RunResult, m: ModelResult) -> list[dict[str, Any]]:
    """Items whose correctness changed (the "edge" inputs), with both answers and the gold."""
    base = result.baseline.metrics
    changed = np.flatnonzero(base.correct != m.metrics.correct)
    items = result.prepared.suite.items
    return [
        {
            "id": items[i].id,
            "task": items[i].task,
            "prompt": items[i].prompt,
            "gold": items[i].answer(items[i].gold),
            "baseline_answer": items[i].answer(int(base.chosen[i])),
            "candidate_answer": items[i].answer(int(m.metrics.chosen[i])),
            "direction": "correct->wrong" if base.correct[i] else "wrong->correct",
        }
        for i in changed
    ]


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else x
