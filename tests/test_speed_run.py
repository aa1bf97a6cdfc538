"""Economics as a stage of the run, end to end: the A/A candidate ({method: none}) served and
measured like any other and never recommended; speed rules on the torch engine (fake quantization
is not faster: nothing is recommended, and the reason says why) and, on the default model, on ONNX
Runtime (a candidate that is faster is recommended, the cheapest that holds every rule)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from rich.console import Console

from conftest import build_tiny_llama, single_thread
from quantgate.config import RunConfig
from quantgate.gate import RuleKind
from quantgate.record import build_record, dump_record, load_record
from quantgate.report import terminal, view
from quantgate.report.html import render_html
from quantgate.report.markdown import render_markdown
from quantgate.run import execute
from test_export import char_tokenizer_files

HAVE_ORT = all(importlib.util.find_spec(m) for m in ("onnxruntime", "onnx", "onnxruntime_genai"))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    build_tiny_llama().save_pretrained(folder)
    char_tokenizer_files(folder)
    return folder


@pytest.mark.heavy
def test_a_speed_rule_on_the_torch_engine_recommends_nothing_and_says_why(tiny_model, tmp_path):
    cfg = RunConfig.model_validate({
        "model": {"base": str(tiny_model)},
        "candidates": [{"method": "rtn", "bits": 8}, {"method": "none"}],
        "serving": {"max_batch_size": 2, "threads": 1},
        "evaluation": {"limit": 8, "cloze_items": 8, "ppl_windows": 2, "window_tokens": 32},
        "economics": {"rounds": 2, "requests": 2, "prompt_tokens": 8, "new_tokens": 6},
        "quality_gate": {"min_items": 4, "min_acceptable": 0.5, "inconclusive": "pass", "min_decode_speedup": 1.5},
    })
    with single_thread():
        result = execute(cfg, workdir=tmp_path / "work")
    w8, aa = result.candidates
    assert (w8.name, aa.name) == ("rtn-w8", "none")
    # the fake-quantized candidate has no speed of its own; the baseline served again does
    assert w8.economics.simulated and w8.economics.throughput is None
    assert not aa.economics.simulated and aa.economics.rounds == 2 and aa.economics.vs_baseline is not None
    assert aa.economics.throughput.requests == 2 * 2 and aa.comparison.kld.mean == 0.0  # the same model
    assert result.decision.recommended is None
    reason = result.decision.reason
    assert "decode speedup >= 1.5 (not measured: fake quantization keeps float32 weights" in reason
    assert "rtn-w8" in reason and "none" not in reason.split("fails for")[1]  # the A/A check is no candidate
    verdicts = {v.name: v for v in result.decision.verdicts}
    assert not verdicts["none"].shippable
    assert [r.kind for r in verdicts["rtn-w8"].failed_rules] == [RuleKind.DECODE_SPEEDUP]
    c = result.conditions
    assert (c.threads, c.rounds, len(c.load_during)) == (1, 2, 2)

    record = load_record(_written(result, tmp_path))
    assert record.conditions.threads == 1 and record.candidate("none").aa_check
    rows = {r.cells[0]: r for r in view.candidates_table(record).rows}
    assert rows["none"].cells[-1] == view.AA and rows["none"].status == "reference"
    ratios = view.ratios_table(record)
    assert [r.cells[0] for r in ratios.rows] == ["none"]
    ok, line = view.aa_check(record)
    r = record.candidate("none").economics.vs_baseline.decode
    assert ok == (r.ci[0] <= 1 <= r.ci[1]) and line.startswith("A/A check")
    console = Console(record=True, width=250)
    terminal.render(record, console)
    text = console.export_text()
    assert "speed vs baseline: paired ratios" in text and "A/A check" in text and "interleaved round" in text
    md, page = render_markdown(record), render_html(record)
    assert "A/A check" in md and "interleaved round" in md and "| candidate | decode |" in md
    assert "Against the baseline" in page and "A/A check" in page


@pytest.mark.heavy
def test_a_resumed_a_a_check_is_the_baseline_served_again(tiny_model, tmp_path):
    """A resumed run reuses the A/A candidate's stored items and still measures its speed: it is
    the baseline served again (Backend.serve), not a made candidate restored without weights."""
    from quantgate.store import open_store

    cfg = RunConfig.model_validate({
        "model": {"base": str(tiny_model)}, "candidates": [{"method": "none"}],
        "serving": {"max_batch_size": 1, "threads": 1},
        "evaluation": {"limit": 6, "cloze_items": 4, "ppl_windows": 2, "window_tokens": 32},
        "economics": {"rounds": 2, "requests": 2, "prompt_tokens": 8, "new_tokens": 4},
        "quality_gate": {"min_items": 4},
    })
    store = open_store(tmp_path / "store.db")
    with single_thread():
        execute(cfg, workdir=tmp_path / "first", store=store)
        resumed = execute(cfg, workdir=tmp_path / "again", store=store, resume=True)
    (aa,) = resumed.candidates
    assert aa.scores.items_reused > 0 and aa.scores.items_scored == 0
    assert not aa.economics.simulated and aa.economics.rounds == 2 and aa.economics.vs_baseline is not None

def _written(result, tmp_path: Path) -> Path:
    path = tmp_path / "results.json"
    path.write_text(dump_record(build_record(result)))
    return path


@pytest.mark.slow
@pytest.mark.heavy  # a whole run on the default model (make test-heavy)
@pytest.mark.skipif(not HAVE_ORT, reason="onnxruntime, onnx or onnxruntime-genai not installed")
def test_on_onnxruntime_a_speed_rule_recommends_a_candidate_that_is_faster(tmp_path):
    """The default model on ORT, a small eval subset and a short speed run (3 rounds of 3
    requests): int4 weights with int8 activations decode about twice as fast as fp32 (`make
    bench-onnx`: 2.17x on an idle machine; at a load average of 5.5 on 2 cores, one thread, this
    run measured 2.04 [1.72, 2.30]), so `min_decode_speedup: 1.5` holds on its interval and the
    candidate is recommended, as faster and cheaper. (rtn-w8-acc4, 1.94x idle, measured 1.49
    [1.36, 1.69] at a load average of 8: honestly inconclusive, so it is not the one tested; the
    choice of the cheapest of several passing candidates is tested in test_speed.py.)"""
    cfg = RunConfig.model_validate({
        "candidates": [{"method": "rtn", "bits": 4, "group_size": 64, "accuracy_level": 4}],
        "serving": {"engine": "onnxruntime", "max_batch_size": 1},
        "evaluation": {"limit": 12, "cloze_items": 12, "ppl_windows": 2, "window_tokens": 128},
        "economics": {"rounds": 3, "requests": 3, "new_tokens": 32, "hardware_cost_per_hour": 0.1,
                      "tokens_per_month": 1e7},
        "quality_gate": {"min_items": 10, "min_acceptable": 0.5, "inconclusive": "pass", "min_decode_speedup": 1.5},
    })
    result = execute(cfg, workdir=tmp_path / "work")
    (w4,) = result.candidates
    r = w4.economics.vs_baseline.decode
    assert w4.economics.throughput.requests == 3 * 3 and result.conditions.rounds == 3
    assert r.ci[0] >= 1.5, (r, result.conditions)
    assert result.decision.recommended == "rtn-w4-g64-acc4", result.decision.reason
    assert "speedup" not in result.decision.reason
    record = load_record(_written(result, tmp_path))
    words = {row.cells[0]: row.cells[-1] for row in view.ratios_table(record).rows}
    assert words["rtn-w4-g64-acc4"].startswith("faster") and "cheaper" in words["rtn-w4-g64-acc4"]
    assert record.candidate("rtn-w4-g64-acc4").economics.cost.per_million_tokens_ci is not None
