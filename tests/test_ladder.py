"""Ladder mode: rungs in order of aggressiveness, measured until the first that fails."""

from __future__ import annotations

import math

import pytest

from quantgate.config import RunConfig
from quantgate.gate import CandidateVerdict, RuleResult, decide, ladder_step
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


# -- rungs of one scheme: a costlier method (gptq, then qat) only where the cheaper one failed ----


def test_ladder_step_retries_a_scheme_only_after_a_failure():
    assert ladder_step(None, "int3 g64 asym") == "run"
    assert ladder_step(("int3 g64 asym", False), "int3 g64 asym") == "run"  # retry with a costlier method
    assert ladder_step(("int3 g64 asym", True), "int3 g64 asym") == "skip"  # a cheaper method held it
    assert ladder_step(("int4 g64 asym", True), "int3 g64 asym") == "run"  # the next, more aggressive rung
    assert ladder_step(("int4 g64 asym", False), "int3 g64 asym") == "stop"  # quality broke, no retry left


def test_a_retried_rung_that_held_does_not_break_the_ladder():
    verdicts = [_verdict("rtn-w4", "pass"), _verdict("rtn-w3", "fail"), _verdict("gptq-w3", "pass")]
    d = decide(verdicts, eval_items=500, min_items=100, ladder=True)
    assert d.recommended == "gptq-w3" and "broke" not in d.reason and "rtn-w3" in d.reason
    d = decide([*verdicts[:2], _verdict("gptq-w3", "fail")], eval_items=500, min_items=100, ladder=True)
    assert d.recommended == "rtn-w4" and "broke at gptq-w3" in d.reason


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from conftest import build_tiny_llama
    from test_export import char_tokenizer_files

    model_dir = tmp_path_factory.mktemp("ladder") / "tiny-llama"
    build_tiny_llama().save_pretrained(model_dir)
    char_tokenizer_files(model_dir)
    return model_dir


@pytest.mark.parametrize("kld_ceiling, measured, statuses", [
    (1e6, ["rtn-w3-g32"], ["pass", "not needed", "not needed"]),  # RTN holds: no GPTQ, no training
    (0.0, ["rtn-w3-g32", "gptq-w3-g32", "qat-w3-g32-steps2"], ["fail", "fail", "fail"]),  # each fails: each next runs
])
def test_recovery_runs_only_when_the_cheaper_rung_failed(tiny_model_dir, tmp_path, kld_ceiling, measured, statuses):
    from conftest import single_thread

    from quantgate.report.view import ladder_line
    from quantgate.run import execute

    rungs = [{"method": "rtn", "bits": 3, "group_size": 32}, {"method": "gptq", "bits": 3, "group_size": 32},
             {"method": "qat", "bits": 3, "group_size": 32, "steps": 2}]
    cfg = RunConfig.model_validate({
        "model": {"base": str(tiny_model_dir)}, "candidates": rungs, "strategy": "ladder",
        "quality_gate": {"min_acceptable": 0.01, "max_kld_mean": kld_ceiling, "inconclusive": "pass", "min_items": 4},
        "evaluation": {"limit": 8, "cloze_items": 8, "ppl_windows": 2, "window_tokens": 32},
        "calibration": {"samples": 4, "seq_len": 32},
        "economics": {"measure": False},
    })
    with single_thread():
        result = execute(cfg, workdir=tmp_path)
    assert [c.name for c in result.candidates] == measured
    record = build_record(result)
    assert [r.status for r in record.ladder] == statuses
    if statuses[0] == "pass":
        assert result.decision.recommended == "rtn-w3-g32"
        assert ladder_line(record).endswith("gptq-w3-g32 not needed (a cheaper method held) → "
                                            "qat-w3-g32-steps2 not needed (a cheaper method held)")
    else:
        assert result.decision.recommended is None and "broke at qat-w3-g32-steps2" in result.decision.reason
        assert ladder_line(record) == ("ladder: rtn-w3-g32 ✗ (retried) → gptq-w3-g32 ✗ (retried) → "
                                       "qat-w3-g32-steps2 ✗ quality broke here")
