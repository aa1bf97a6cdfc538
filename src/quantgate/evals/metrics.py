"""Metrics of one model, and of a candidate against the baseline on the same items, with the
statistics that say how sure we can be (paired: the same items for both)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from quantgate.evals import stats
from quantgate.evals.datasets import ChoiceItem, ClozeItem, GenerationItem, PromptItem
from quantgate.evals.scoring import first_line, load_scorer, score_generation
from quantgate.evals.tasks import ModelScores, PreparedSuite

OVERALL = "overall"  # the key of all labeled items together


def predictions(scores: ModelScores, prepared: PreparedSuite, *, normalize: bool) -> np.ndarray:
    """Chosen option per item (int [n_items]; -1 for items that are not multiple choice): argmax of
    summed log-likelihood, or of log-likelihood per character of the continuation when `normalize`.
    Ties go to the lowest index."""
    values = scores.option_ll / prepared.option_chars if normalize else scores.option_ll
    chosen = np.full(len(prepared.suite.items), -1)
    for i, item in enumerate(prepared.suite.items):
        if isinstance(item, ChoiceItem):
            a, b = prepared.offsets[i], prepared.offsets[i + 1]
            chosen[i] = int(np.argmax(values[a:b]))
    return chosen


@dataclass(frozen=True)
class ModelMetrics:
    score: np.ndarray = field(repr=False)  # float [n_items] in [0, 1] under the gate metric; nan: unlabeled
    answers: list[str] = field(repr=False)  # per item: the answer given (option, generation, ...)
    accuracy: float  # mean score over labeled items, multiple choice by summed log-likelihood
    accuracy_norm: float  # the same with multiple choice by log-likelihood per character
    per_task: dict[str, float]  # mean score per labeled task, under the gate metric
    perplexity: float

    @property
    def correct(self) -> np.ndarray:
        """bool [n_items]: score >= 0.5 (unlabeled items: False)."""
        return np.nan_to_num(self.score, nan=0.0) >= 0.5

    def metric(self, name: str) -> float:
        return {"accuracy": self.accuracy, "accuracy_norm": self.accuracy_norm, "task_accuracy": self.accuracy}[name]


def model_metrics(scores: ModelScores, prepared: PreparedSuite, metric: str, tokenizer) -> ModelMetrics:
    items = prepared.suite.items
    raw, norm = (predictions(scores, prepared, normalize=n) for n in (False, True))
    texts = {i: tokenizer.decode(ids, skip_special_tokens=True) for i, ids in scores.generations.items()}
    scorers = {t: load_scorer(s.scorer) for t, s in prepared.suite.specs.items() if s.scorer}
    score_raw, score_norm = np.full(len(items), np.nan), np.full(len(items), np.nan)
    answers = []
    for i, item in enumerate(items):
        if isinstance(item, ChoiceItem):
            score_raw[i], score_norm[i] = float(raw[i] == item.gold), float(norm[i] == item.gold)
            answers.append(item.answer(int(norm[i] if metric == "accuracy_norm" else raw[i])))
        elif isinstance(item, ClozeItem):
            hit = bool(scores.option_greedy[prepared.offsets[i]])
            score_raw[i] = score_norm[i] = float(hit)
            answers.append(item.gold_answer if hit else f"(not greedy: {item.gold_answer})")
        elif isinstance(item, GenerationItem):
            spec = prepared.suite.spec(item.task)
            score_raw[i] = score_norm[i] = score_generation(texts[i], item, spec.match, scorers.get(item.task))
            answers.append(first_line(texts[i]))
        else:  # PromptItem: unlabeled, judged by agreement with the baseline only
            answers.append(texts[i].strip())
    score = score_norm if metric == "accuracy_norm" else score_raw
    tasks = np.array([item.task for item in items])
    labeled = ~np.isnan(score)
    ppl_tokens = scores.token_nll
    return ModelMetrics(
        score=score,
        answers=answers,
        accuracy=_mean(score_raw[labeled]),
        accuracy_norm=_mean(score_norm[labeled]),
        per_task={t: _mean(score[(tasks == t) & labeled]) for t in dict.fromkeys(tasks[labeled])},
        perplexity=float(np.exp(np.mean(ppl_tokens))) if len(ppl_tokens) else float("nan"),
    )


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x)) if len(x) else float("nan")


@dataclass(frozen=True)
class Flips:
    correct_to_wrong: int
    wrong_to_correct: int
    changed: int  # items whose answer changed (includes wrong -> other wrong)
    n: int

    @property
    def rate(self) -> float:
        """Items whose correctness changed, either way, as a fraction of the items."""
        return (self.correct_to_wrong + self.wrong_to_correct) / self.n if self.n else float("nan")


def flips(base: ModelMetrics, cand: ModelMetrics, mask: np.ndarray | None = None) -> Flips:
    """Flips over the labeled items (restricted to `mask`, bool [n_items], when given)."""
    keep = ~np.isnan(base.score) if mask is None else mask & ~np.isnan(base.score)
    b, c = base.correct[keep], cand.correct[keep]
    changed = sum(x != y for x, y, k in zip(base.answers, cand.answers, keep) if k)
    return Flips(int(np.sum(b & ~c)), int(np.sum(~b & c)), int(changed), int(keep.sum()))


@dataclass(frozen=True)
class TaskComparison:
    """A candidate against the baseline on one task (or OVERALL), with intervals."""

    task: str
    n: int
    labeled: bool  # False: unlabeled prompts, where the metric is agreement with the baseline
    base: float
    cand: float
    recovery: float  # cand / base, unrounded (agreement for unlabeled tasks)
    recovery_ci: tuple[float, float]
    diff: float
    diff_ci: tuple[float, float]
    flips: Flips
    flip_rate_ci: tuple[float, float]
    mcnemar_p: float  # one-sided: is the candidate worse?
    min_detectable_drop: float  # accuracy points detectable at 80% power on this many items


@dataclass(frozen=True)
class Comparison:
    """A candidate against the baseline on the same items and tokens."""

    recovery: float  # OVERALL recovery (the headline)
    tasks: dict[str, TaskComparison]  # OVERALL and each task
    flips: Flips  # OVERALL
    kld: stats.MeanQuantile  # per-token KL(baseline || candidate): mean and p99 with intervals
    top1_agreement: float

    @property
    def kld_mean(self) -> float:
        return self.kld.mean

    @property
    def kld_p99(self) -> float:
        return self.kld.quantile

    @property
    def per_task_recovery(self) -> dict[str, float]:
        return {t: c.recovery for t, c in self.tasks.items() if t != OVERALL}


def compare(
    base: ModelMetrics, cand: ModelMetrics, cand_scores: ModelScores, prepared: PreparedSuite,
    *, confidence: float = 0.95, n_boot: int = 2000, seed: int = 0,
) -> Comparison:
    if cand_scores.kld is None or cand_scores.top1_agree is None:
        raise ValueError("candidate scores were computed without the baseline's distributions")
    tasks = np.array([item.task for item in prepared.suite.items])
    labeled = ~np.isnan(base.score)
    out: dict[str, TaskComparison] = {}
    if labeled.any():
        out[OVERALL] = _paired(OVERALL, base, cand, labeled, confidence, n_boot, seed)
    for t in dict.fromkeys(tasks):
        mask = tasks == t
        if labeled[mask].all():
            out[t] = _paired(t, base, cand, mask, confidence, n_boot, seed)
        else:
            out[t] = _agreement(t, base, cand, mask, confidence)
    if len(cand_scores.kld):
        kld = stats.bootstrap_mean_quantile(cand_scores.kld, q=0.99, clusters=cand_scores.window_of,
                                            n_boot=max(200, n_boot // 2), confidence=confidence, seed=seed)
    else:  # no distributions (an engine without prompt log-probabilities): unmeasured, not zero
        nan = float("nan")
        kld = stats.MeanQuantile(nan, (nan, nan), nan, (nan, nan), 0.99, 0)
    headline = out[OVERALL] if OVERALL in out else next(iter(out.values()))
    return Comparison(
        recovery=headline.recovery, tasks=out, flips=headline.flips, kld=kld,
        top1_agreement=float(np.mean(cand_scores.top1_agree)) if len(cand_scores.top1_agree) else float("nan"),
    )


def _paired(task: str, base: ModelMetrics, cand: ModelMetrics, mask: np.ndarray,
            confidence: float, n_boot: int, seed: int) -> TaskComparison:
    b, c = base.score[mask], cand.score[mask]
    boot = stats.paired_bootstrap(b, c, n_boot=n_boot, confidence=confidence, seed=seed)
    f = flips(base, cand, mask)
    discordance = max(f.rate, 1.0 / f.n)  # no flips observed: assume one, the smallest possible
    return TaskComparison(
        task=task, n=int(mask.sum()), labeled=True, base=boot.base_mean, cand=boot.cand_mean,
        recovery=boot.ratio, recovery_ci=boot.ratio_ci, diff=boot.diff, diff_ci=boot.diff_ci,
        flips=f, flip_rate_ci=stats.wilson_interval(f.correct_to_wrong + f.wrong_to_correct, f.n, confidence),
        mcnemar_p=stats.mcnemar_exact(f.correct_to_wrong, f.wrong_to_correct),
        min_detectable_drop=stats.min_detectable_drop(f.n, discordance=min(discordance, 1.0)),
    )


def _agreement(task: str, base: ModelMetrics, cand: ModelMetrics, mask: np.ndarray,
               confidence: float) -> TaskComparison:
    """Unlabeled prompts: the candidate's output equals the baseline's, item by item."""
    same = [x == y for x, y, k in zip(base.answers, cand.answers, mask) if k]
    n, agree = len(same), int(sum(same))
    changed = n - agree
    ci = stats.wilson_interval(agree, n, confidence)
    return TaskComparison(
        task=task, n=n, labeled=False, base=1.0, cand=agree / n, recovery=agree / n, recovery_ci=ci,
        diff=agree / n - 1.0, diff_ci=(ci[0] - 1.0, ci[1] - 1.0),
        flips=Flips(0, 0, changed, n), flip_rate_ci=stats.wilson_interval(changed, n, confidence),
        mcnemar_p=float("nan"), min_detectable_drop=float("nan"),
    )

