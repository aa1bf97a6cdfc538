"""Metrics of one model, and of a candidate against the baseline on the same items."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from quantgate.evals.tasks import ModelScores, PreparedSuite


def predictions(scores: ModelScores, prepared: PreparedSuite, *, normalize: bool) -> np.ndarray:
    """Chosen option per item (int [n_items]): argmax of summed log-likelihood, or of
    log-likelihood per character of the continuation when `normalize`. Ties go to the lowest index."""
    values = scores.option_ll / prepared.option_chars if normalize else scores.option_ll
    bounds = zip(prepared.offsets[:-1], prepared.offsets[1:])
    return np.array([int(np.argmax(values[a:b])) for a, b in bounds])


@dataclass(frozen=True)
class ModelMetrics:
    accuracy: float
    accuracy_norm: float
    per_task: dict[str, float]  # accuracy (gate metric) per task
    perplexity: float
    correct: np.ndarray = field(repr=False)  # bool [n_items] under the gate metric
    chosen: np.ndarray = field(repr=False)  # int [n_items] under the gate metric

    def metric(self, name: str) -> float:
        return {"accuracy": self.accuracy, "accuracy_norm": self.accuracy_norm}[name]


def model_metrics(scores: ModelScores, prepared: PreparedSuite, metric: str) -> ModelMetrics:
    raw = predictions(scores, prepared, normalize=False)
    norm = predictions(scores, prepared, normalize=True)
    chosen = norm if metric == "accuracy_norm" else raw
    correct = chosen == prepared.gold
    tasks = np.array([item.task for item in prepared.suite.items])
    return ModelMetrics(
        accuracy=float(np.mean(raw == prepared.gold)),
        accuracy_norm=float(np.mean(norm == prepared.gold)),
        per_task={t: float(np.mean(correct[tasks == t])) for t in dict.fromkeys(tasks)},
        perplexity=float(np.exp(np.mean(scores.token_nll))),
        correct=correct,
        chosen=chosen,
    )


@dataclass(frozen=True)
class Flips:
    correct_to_wrong: int
    wrong_to_correct: int
    changed: int  # items whose chosen answer changed (includes wrong -> other wrong)
    n: int

    @property
    def rate(self) -> float:
        """Items whose correctness changed, either way, as a fraction of all items."""
        return (self.correct_to_wrong + self.wrong_to_correct) / self.n


def flips(base: ModelMetrics, cand: ModelMetrics) -> Flips:
    return Flips(
        correct_to_wrong=int(np.sum(base.correct & ~cand.correct)),
        wrong_to_correct=int(np.sum(~base.correct & cand.correct)),
        changed=int(np.sum(base.chosen != cand.chosen)),
        n=len(base.correct),
    )


@dataclass(frozen=True)
class Comparison:
    """A candidate against the baseline on the same items and tokens."""

    recovery: float  # candidate metric / baseline metric (unrounded)
    per_task_recovery: dict[str, float]
    flips: Flips
    kld_mean: float
    kld_p99: float
    top1_agreement: float


def compare(base: ModelMetrics, cand: ModelMetrics, cand_scores: ModelScores, metric: str) -> Comparison:
    if cand_scores.kld is None or cand_scores.top1_agree is None:
        raise ValueError("candidate scores were computed without the baseline's distributions")
    return Comparison(
        recovery=_ratio(cand.metric(metric), base.metric(metric)),
        per_task_recovery={t: _ratio(cand.per_task[t], base.per_task[t]) for t in base.per_task},
        flips=flips(base, cand),
        kld_mean=float(np.mean(cand_scores.kld)),
        kld_p99=float(np.quantile(cand_scores.kld, 0.99)),
        top1_agreement=float(np.mean(cand_scores.top1_agree)),
    )


def _ratio(cand: float, base: float) -> float:
    return cand / base if base > 0 else float("nan")
