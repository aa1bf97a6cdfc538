"""The quality gate: rules -> a verdict per candidate, and the recommendation.

Values are compared exactly as measured (never rounded first: 0.946 does not pass a 0.95 floor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from quantgate.config import QualityGateConfig
from quantgate.evals.metrics import Comparison


@dataclass(frozen=True)
class RuleResult:
    rule: str  # e.g. "recovery >= min_acceptable"
    passed: bool
    value: float
    threshold: float


@dataclass(frozen=True)
class CandidateVerdict:
    name: str
    weight_bytes: int
    rules: tuple[RuleResult, ...]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rules)


@dataclass(frozen=True)
class Decision:
    verdicts: tuple[CandidateVerdict, ...]
    recommended: str | None
    reason: str


def judge(name: str, weight_bytes: int, cmp: Comparison, gate: QualityGateConfig) -> CandidateVerdict:
    recovery_ok = not math.isnan(cmp.recovery) and cmp.recovery >= gate.min_acceptable
    rules = (RuleResult(f"{gate.metric} recovery >= min_acceptable", recovery_ok, cmp.recovery, gate.min_acceptable),)
    return CandidateVerdict(name, weight_bytes, rules)


def decide(verdicts: list[CandidateVerdict]) -> Decision:
    """Recommend the passing candidate with the fewest weight bytes (the most compressed)."""
    passing = [v for v in verdicts if v.passed]
    if not passing:
        return Decision(tuple(verdicts), None, "no candidate holds the quality gate")
    best = min(passing, key=lambda v: (v.weight_bytes, v.name))
    others = len(passing) - 1
    reason = f"smallest of {len(passing)} candidates that hold the gate" if others else "the only candidate that holds the gate"
    return Decision(tuple(verdicts), best.name, reason)
