"""Ladder mode: rungs in order of aggressiveness, measured until the first that fails."""

from __future__ import annotations

import math

import pytest

from quantgate.config import RunConfig
from quantgate.gate import CandidateVerdict, RuleResult, decide
from quantgate.record import build_record


def _verdict(name: str, status: str) -> CandidateVerdict:
    return CandidateVerdict(name, 100, (RuleResult("r", status, 1.0, (1.0, 1.0), 1.0),))


def test_ladder_recommends_the_last_rung_that_held():
    verdicts = [_verdict("w8", "pass"), _verdict("w6", "pass"), _verdict("w4", "fail")]
    d = decide(verdicts, eval_items=500, min_items=100, ladder=True)
    assert d.recommended == "w6" and "broke at w4" in d.reason
    first_fails = decide([_verdict("w8", "inconclusive")], eval_items=500, min_items=100, ladder=True)
    assert first_fails.recommended is None and "first rung" in first_fails.reason


def test_ladder_is_a_config_choice():
    assert RunConfig().strategy == "all"
    with pytest.raises(ValueError):
        RunConfig.model_validate({"strategy": "greedy"})


@pytest.mark.slow
@pytest.mark.heavy
def test_ladder_run_stops_at_its_third_rung(tmp_path):
    """Built to break at 4 bits: a KLD ceiling of 0.1 holds at 8 and 6 bits (KLD ~0.003 and
    ~0.03 on this model) and not at 4 (~0.3)."""
    from quantgate.run import execute

    rungs = [{"method": "rtn", "bits": 8}, {"method": "rtn", "bits": 6, "group_size": 64},
             {"method": "rtn", "bits": 4, "group_size": 64}, {"method": "rtn", "bits": 3, "group_size": 64},
             {"method": "rtn", "bits": 2, "group_size": 64}]
    cfg = RunConfig.model_validate({
        "candidates": rungs, "strategy": "ladder",
        "quality_gate": {"min_acceptable": 0.5, "max_kld_mean": 0.1, "inconclusive": "pass", "min_items": 10},
        "evaluation": {"limit": 10, "cloze_items": 10, "ppl_windows": 2, "window_tokens": 128},
        "economics": {"measure": False},
        "serving": {"max_batch_size": 2},
    })
    result = execute(cfg, workdir=tmp_path)
    assert [c.name for c in result.candidates] == ["rtn-w8", "rtn-w6-g64", "rtn-w4-g64"]
    assert result.decision.recommended == "rtn-w6-g64"
    assert "broke at rtn-w4-g64" in result.decision.reason
    kld = [c.comparison.kld.mean for c in result.candidates]
    assert kld[1] < 0.1 < kld[2] and not math.isnan(kld[0])
    rungs_out = build_record(result).ladder
    assert [r.status for r in rungs_out] == ["pass", "pass", "fail", "not measured", "not measured"]
