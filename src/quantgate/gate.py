"""The quality gate: rules -> a verdict per candidate, and the recommendation.

Each rule is judged on an interval, not a point: pass when the whole interval is on the right side
of the threshold, fail when the whole interval is on the wrong side, inconclusive when it
straddles it (which fails unless quality_gate.inconclusive is "pass"). Values are compared exactly
as measured, never rounded first (0.946 does not pass a 0.95 floor). Rules on economics (decode
speedup, peak memory, p99 latency, cost) are judged the same way on the economics stage's
intervals; with any of them the recommendation is the cheapest candidate that holds every rule,
else the smallest.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass
from typing import Literal

from quantgate.config import QualityGateConfig
from quantgate.economics import Economics, Estimate
from quantgate.errors import UserError
from quantgate.evals import stats
from quantgate.evals.metrics import OVERALL, Comparison, TaskComparison

Status = Literal["pass", "fail", "inconclusive"]


class RuleKind(str, enum.Enum):
    """What a rule measures: views format values by kind (percentages, significant digits), never
    by parsing the rule's text."""

    RECOVERY = "recovery"  # overall recovery: candidate / baseline metric
    TASK_RECOVERY = "task_recovery"  # one task's recovery
    AGREEMENT = "agreement"  # an unlabeled task's agreement with the baseline
    ABSOLUTE = "absolute"  # the candidate's own metric
    FLIP_RATE = "flip_rate"
    KLD_MEAN = "kld_mean"
    KLD_P99 = "kld_p99"
    NO_RULE = "no_rule"  # no rule applies to the eval set: fails
    ENGINE = "engine"  # the engine did not run to completion: fails
    SERVABLE = "servable"  # the serving engine cannot serve it as evaluated: fails
    DECODE_SPEEDUP = "decode_speedup"  # decode tokens/s over the baseline's (paired ratio)
    PEAK_RSS = "peak_rss"  # the serving process's peak resident memory, MB
    P99_LATENCY = "p99_latency"  # batch-1 request latency, 99th percentile, seconds
    COST = "cost"  # cost per 1M generated tokens at the loaded throughput

    @property
    def is_rate(self) -> bool:
        """Shown as a percentage."""
        return self in (RuleKind.FLIP_RATE,)

    @property
    def is_divergence(self) -> bool:
        """Shown with significant digits (values span orders of magnitude)."""
        return self in (RuleKind.KLD_MEAN, RuleKind.KLD_P99)


@dataclass(frozen=True)
class RuleResult:
    rule: str  # e.g. "overall recovery >= 0.94"
    status: Status
    value: float
    interval: tuple[float, float]
    threshold: float
    kind: RuleKind = RuleKind.RECOVERY

    @property
    def passed(self) -> bool:
        return self.status == "pass"


@dataclass(frozen=True)
class CandidateVerdict:
    name: str
    weight_bytes: int
    rules: tuple[RuleResult, ...]
    inconclusive_passes: bool = False
    shippable: bool = True  # False: the baseline itself (the A/A check), never recommended
    # What serving it costs, lower is cheaper: cost per 1M tokens when priced, else seconds per
    # generated token under load; None when its speed was not measured.
    cost_key: float | None = None

    @property
    def failed_rules(self) -> list[RuleResult]:
        """The rules that keep this candidate from passing (inconclusive ones unless they pass)."""
        ok = ("pass", "inconclusive") if self.inconclusive_passes else ("pass",)
        return [r for r in self.rules if r.status not in ok]

    @property
    def passed(self) -> bool:
        return not self.failed_rules


@dataclass(frozen=True)
class Decision:
    verdicts: tuple[CandidateVerdict, ...]
    recommended: str | None
    reason: str


def at_least(kind: RuleKind, rule: str, value: float, interval: tuple[float, float], floor: float) -> RuleResult:
    lo, hi = interval
    if math.isnan(value):
        return RuleResult(rule, "fail", value, interval, floor, kind)
    status: Status = "pass" if lo >= floor else "fail" if hi < floor else "inconclusive"
    return RuleResult(rule, status, value, interval, floor, kind)


def at_most(kind: RuleKind, rule: str, value: float, interval: tuple[float, float], ceiling: float) -> RuleResult:
    lo, hi = interval
    if math.isnan(value):
        return RuleResult(rule, "fail", value, interval, ceiling, kind)
    status: Status = "pass" if hi <= ceiling else "fail" if lo > ceiling else "inconclusive"
    return RuleResult(rule, status, value, interval, ceiling, kind)


def at_most_estimate(kind: RuleKind, rule: str, e: Estimate, ceiling: float, scale: float = 1.0) -> RuleResult:
    """at_most on a measured Estimate, in units of `scale` (e.g. 1e6: bytes shown as MB)."""
    return at_most(kind, rule, e.value / scale, (e.ci[0] / scale, e.ci[1] / scale), ceiling)


def failing(kind: RuleKind, rule: str) -> RuleResult:
    """A rule that fails with nothing measured (no rule applies; the engine crashed)."""
    nan = float("nan")
    return RuleResult(rule, "fail", nan, (nan, nan), nan, kind)


def judge(name: str, weight_bytes: int, cmp: Comparison, gate: QualityGateConfig) -> CandidateVerdict:
    rules: list[RuleResult] = []
    overall = cmp.tasks.get(OVERALL)
    if overall is not None:
        rules.append(at_least(RuleKind.RECOVERY, f"{gate.metric} recovery >= {gate.min_acceptable}", overall.recovery,
                              overall.recovery_ci, gate.min_acceptable))
    for task, floor in gate.task_floors.items():
        t = _task(cmp, task)
        what = "recovery" if t.labeled else "agreement with baseline"
        kind = RuleKind.TASK_RECOVERY if t.labeled else RuleKind.AGREEMENT
        rules.append(at_least(kind, f"{task} {what} >= {floor}", t.recovery, t.recovery_ci, floor))
    for task, floor in gate.absolute_floors.items():
        t = _task(cmp, task)
        rules.append(at_least(RuleKind.ABSOLUTE, f"{task} {gate.metric} >= {floor}", t.cand, _own_interval(t, gate.confidence), floor))
    if gate.max_flip_rate is not None and overall is not None:
        rules.append(at_most(RuleKind.FLIP_RATE, f"flip rate <= {gate.max_flip_rate}", overall.flips.rate, overall.flip_rate_ci,
                             gate.max_flip_rate))
    if gate.max_kld_mean is not None:
        rules.append(at_most(RuleKind.KLD_MEAN, f"KLD mean <= {gate.max_kld_mean}", cmp.kld.mean, cmp.kld.mean_ci, gate.max_kld_mean))
    if gate.max_kld_p99 is not None:
        rules.append(at_most(RuleKind.KLD_P99, f"KLD p99 <= {gate.max_kld_p99}", cmp.kld.quantile, cmp.kld.quantile_ci,
                             gate.max_kld_p99))
    if not rules:  # e.g. unlabeled prompts only, with no task floor and no KLD ceiling
        rules.append(failing(RuleKind.NO_RULE, "some gate rule applies to this eval set (set task_floors or "
                             "KLD ceilings)"))
    return CandidateVerdict(name, weight_bytes, tuple(rules), gate.inconclusive == "pass")


def judge_economics(verdict: CandidateVerdict, e: Economics | None, gate: QualityGateConfig) -> CandidateVerdict:
    """The verdict with the gate's economics rules added (none configured: unchanged) and its
    cost key set. A rule whose figure was not measured fails, saying why."""
    measured = e is not None and not e.simulated and e.throughput is not None
    why = "" if measured else f" (not measured: {_unmeasured(e)})"
    ratios = e.vs_baseline if measured else None
    checks = (  # (threshold, kind, rule, the figure or None, how it is judged)
        (gate.min_decode_speedup, RuleKind.DECODE_SPEEDUP, "decode speedup >= {}", ratios and ratios.decode,
         lambda kind, rule, x, t: at_least(kind, rule, x.value, x.ci, t)),
        (gate.max_peak_rss_mb, RuleKind.PEAK_RSS, "peak RSS <= {} MB", measured and e.peak_rss_bytes,
         lambda kind, rule, x, t: at_most_estimate(kind, rule, x, t, 1e6)),
        (gate.max_p99_latency_s, RuleKind.P99_LATENCY, "p99 latency <= {} s",
         measured and e.throughput.latency_s["p99"], at_most_estimate),
        (gate.max_cost_per_1m_tokens, RuleKind.COST, "cost per 1M tokens <= {}",
         measured and e.cost and e.cost.per_million_tokens, at_most_estimate),
    )
    rules = [judged(kind, rule.format(t), x, t) if x else failing(kind, rule.format(t) + (why or " (not measured)"))
             for t, kind, rule, x, judged in checks if t is not None]
    return dataclasses.replace(verdict, rules=(*verdict.rules, *rules), cost_key=_cost_key(e) if measured else None)


def _cost_key(e: Economics) -> float | None:
    """Lower is cheaper: cost per 1M tokens when priced, else seconds per token under load."""
    if e.cost is not None:
        return e.cost.per_million_tokens.value
    return 1 / e.tokens_per_s_under_load.value if e.tokens_per_s_under_load else None


def _unmeasured(e: Economics | None) -> str:
    if e is None or not e.simulated:
        return "the serving engine did not run its economics"
    return "fake quantization keeps float32 weights, so it is not faster; serve it on an engine with integer kernels"


def check_tasks(gate: QualityGateConfig, tasks: dict[str, int]) -> None:
    """Every task a rule names must be in the eval set (checked before any model work)."""
    for key, table in (("task_floors", gate.task_floors), ("absolute_floors", gate.absolute_floors)):
        for task in table:
            if task != OVERALL and task not in tasks:
                raise UserError(f"quality_gate.{key}: task '{task}' is not in the eval set "
                                f"(tasks: {', '.join(tasks) or 'none'})")


def _task(cmp: Comparison, task: str) -> TaskComparison:
    if task not in cmp.tasks:
        known = ", ".join(cmp.tasks)
        raise UserError(f"quality_gate: task '{task}' is not in the eval set (tasks: {known})")
    return cmp.tasks[task]


def _own_interval(t: TaskComparison, confidence: float) -> tuple[float, float]:
    """Interval of the candidate's own mean score (Wilson, on the rounded count of successes)."""
    return stats.wilson_interval(round(t.cand * t.n), t.n, confidence)


# What a ladder does with its next rung (see ladder_step).
LadderStep = Literal["run", "skip", "stop"]


def ladder_step(last: tuple[str, bool] | None, scheme: str) -> LadderStep:
    """A ladder's rungs are in order of aggressiveness; consecutive rungs of one scheme (the
    weights' grid, MethodConfig.scheme) are that rung tried by ever costlier methods (rtn, gptq,
    then qat), so a costlier one runs only when the one before it failed. Given the last rung
    measured (its scheme, whether it held the gate) or None: "run" the next rung (the first;
    the next scheme after one that held; a retry of one that failed), "skip" it (a costlier
    retry of a rung that held), or "stop" (a rung that failed and has no retry left)."""
    if last is None:
        return "run"
    last_scheme, held = last
    if scheme == last_scheme:
        return "skip" if held else "run"
    return "run" if held else "stop"


def decide(verdicts: list[CandidateVerdict], *, eval_items: int, min_items: int, ladder: bool = False,
           cheapest: bool = False) -> Decision:
    """Recommend the passing candidate with the fewest weight bytes (the most compressed), or
    with cheapest=True (the gate has economics rules) the one that costs least to serve — but
    only on an eval set large enough to say so. ladder=True: the verdicts are rungs in order of
    aggressiveness, measured by ladder_step (so the last verdict failed only where the ladder
    broke); recommend the last that passed. The baseline itself (an A/A check) is never
    recommended."""
    if eval_items < min_items:
        what = "no eval items" if eval_items == 0 else f"only {eval_items} eval items"
        return Decision(tuple(verdicts), None,
                        f"{what} (quality_gate.min_items is {min_items}): measured, but no candidate "
                        "can be called shippable without an eval set")
    shippable = [v for v in verdicts if v.shippable]
    passing = [v for v in shippable if v.passed]
    if ladder:
        broke = shippable[-1].name if shippable and not shippable[-1].passed else None
        retried = [v.name for v in shippable if not v.passed and v.name != broke]
        where = (f"the ladder broke at {broke}" if broke else "every rung held") + (
            f" ({', '.join(retried)} failed and a costlier method of the same scheme was tried)" if retried else "")
        if not passing:
            return Decision(tuple(verdicts), None, f"{where}, the first rung: no candidate holds the gate")
        return Decision(tuple(verdicts), passing[-1].name, f"the last rung that holds every rule; {where}")
    if not passing:
        return Decision(tuple(verdicts), None, "no candidate holds every rule of the gate: " + why_none(shippable))
    costed = [v for v in passing if v.cost_key is not None]
    if cheapest and costed:
        best = min(costed, key=lambda v: (v.cost_key, v.weight_bytes, v.name))
        what = "cheapest to serve"
    else:
        best = min(passing, key=lambda v: (v.weight_bytes, v.name))
        what = "smallest"
    reason = (f"the {what} of {len(passing)} candidates that hold every rule" if len(passing) > 1
              else "the only candidate that holds every rule")
    return Decision(tuple(verdicts), best.name, reason)


def why_none(verdicts: list[CandidateVerdict]) -> str:
    """Which rules kept the candidates out: "rule (a, b); rule (c)", most common first."""
    if not verdicts:
        return "no candidate was measured"
    names: dict[str, list[str]] = {}
    for v in verdicts:
        for r in v.failed_rules:
            names.setdefault(r.rule, []).append(v.name)
    ranked = sorted(names.items(), key=lambda kv: -len(kv[1]))
    return "; ".join(f"{rule} fails for {', '.join(who)}" for rule, who in ranked)
