"""A run as plain JSON-ready data: what results.json holds and what the store records."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import numpy as np

from quantgate.economics import Economics
from quantgate.evals.digest import eval_digest
from quantgate.evals.metrics import TaskComparison
from quantgate.models.load import file_sha256
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
            "sha256": eval_digest(result.prepared),  # the prepared items, labels and tokens (evals/digest.py)
        },
        "calibration": result.calibration,
        "noise_floor": noise_floor(result),
        "notes": result.notes,
        "machine": {"memory_bandwidth_bytes_per_s": result.memory_bandwidth},
        "economics_config": cfg.economics.model_dump(mode="json"),
        "baseline": _model(result.baseline),
        "candidates": [
            {
                **_model(c),
                "method": c.candidate.method,
                "bits": c.candidate.quantized_bits,
                "group_size": getattr(c.candidate, "group_size", None),
                "symmetric": getattr(c.candidate, "symmetric", None),
                "settings": c.candidate.model_dump(mode="json"),
                "modules_changed": c.modules_changed,
                "quantize_seconds": round(c.quantize_seconds, 3),
                "vs_baseline": comparison_dict(c),
                "gate": {
                    "passed": verdicts[c.name].passed,
                    "rules": [{**asdict(r), "passed": r.passed} for r in verdicts[c.name].rules],
                },
                "flipped_items": flipped_items(result, c),
            }
            for c in result.candidates
        ],
        "failed_candidates": [{"name": f.name, "settings": f.candidate.model_dump(mode="json"), "error": f.error}
                              for f in result.failed],
        "strategy": cfg.strategy,
        "ladder": ladder(result) if cfg.strategy == "ladder" else None,
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
        "items_scored": m.scores.items_scored,
        "items_reused": m.scores.items_reused,
        "economics": economics(m.economics),
        "artifact": m.artifact and {"path": str(m.artifact), "sha256": file_sha256(m.artifact),
                                    "bytes": m.artifact.stat().st_size},
    }


def ladder(result: RunResult) -> list[dict[str, str]]:
    """Each rung in order: "pass", "fail" (where quality broke), or "not measured" (after it)."""
    verdicts = {v.name: v for v in result.decision.verdicts}
    return [{"name": c.label, "status": ("pass" if verdicts[c.label].passed else "fail") if c.label in verdicts
             else "not measured"} for c in result.config.resolved_candidates]


def economics(e: Economics | None) -> dict[str, Any] | None:
    if e is None:
        return None
    t = e.throughput
    return {
        "engine": e.engine,
        "simulated": e.simulated,
        "artifact_bytes": e.artifact_bytes,
        "peak_rss_bytes": e.peak_rss_bytes,
        "prefill_tokens_per_s": t and t.prefill_tokens_per_s,
        "decode_tokens_per_s": t and t.decode_tokens_per_s,
        "decode_tokens_per_s_range": t and t.decode_range and list(t.decode_range),
        "latency_s": t and t.latency_s,
        "roofline_fraction": e.roofline_fraction,
        "load": [asdict(level) for level in e.load],
        "cost": e.cost and asdict(e.cost),
    }


def noise_floor(result: RunResult) -> dict[str, Any] | None:
    f = result.noise_floor
    if f is None:
        return None
    return {"engine": f.engine, "reference": f.reference, "kld_mean": float(f.kld.mean()),
            "kld_p99": float(np.quantile(f.kld, 0.99)), "top1_agreement": float(f.top1_agree.mean()),
            "tokens": int(f.kld.size)}


def comparison_dict(m: ModelResult) -> dict[str, Any]:
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
        "kld_hist": kld_histogram(m.scores.kld),
    }


def kld_histogram(kld: np.ndarray | None, bins: int = 30) -> dict[str, list[float]] | None:
    """Per-token KL divergences counted in log-spaced bins from 1e-5 (values below it, zeros
    included, fall in the first bin) to the largest value."""
    if kld is None or not len(kld):
        return None
    low = 1e-5
    edges = np.geomspace(low, max(float(kld.max()), low * 10) * 1.0001, bins + 1)
    counts, _ = np.histogram(np.clip(kld, low, None), bins=edges)
    return {"edges": edges.tolist(), "counts": counts.tolist()}


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
