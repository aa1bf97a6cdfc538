"""quality_gate.verified_against: bf16 | fp16 | fp32 — the baseline loaded and evaluated in the
precision named, the checkpoint in fp32 scored against it as a candidate-like row, the gate judged
against the lower-precision baseline, and the precision in the record and every view."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from archs import tiny_model, tiny_tokenizer

from quantgate.config import RunConfig
from quantgate.engines.torch import TorchEngine
from quantgate.evals.tasks import kl_divergence
from quantgate.models.load import at_precision, load_baseline
from quantgate.record import build_record, dump_record, load_record
from quantgate.report import view


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Llama saved as a bf16 safetensors checkpoint with its tokenizer."""
    folder = tmp_path_factory.mktemp("bf16-checkpoint")
    model = tiny_model("llama")
    model.to(torch.bfloat16).save_pretrained(folder)
    tiny_tokenizer("llama").save_pretrained(folder)
    return folder


def test_a_checkpoint_loads_in_the_precision_named(checkpoint):
    bf16 = load_baseline(str(checkpoint), "bf16")
    assert bf16.precision == "bf16" and {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    fp32 = at_precision(bf16, "fp32")
    assert fp32.precision == "fp32" and {p.dtype for p in fp32.model.parameters()} == {torch.float32}
    for (name, a), (_, b) in zip(bf16.model.named_parameters(), fp32.model.named_parameters()):
        assert torch.equal(a.float(), b), name  # a bf16 checkpoint: the same values either way
    assert fp32.digest == bf16.digest


def test_a_bf16_baseline_run_reports_fp32_as_a_row_and_gates_against_bf16(checkpoint, tmp_path, torch_single_thread):
    from quantgate.run import execute

    cfg = RunConfig.model_validate({
        "model": {"base": str(checkpoint)},
        "serving": {"engine": "torch"},
        "candidates": [{"method": "rtn", "bits": 8}, {"method": "rtn", "bits": 4, "group_size": 32}],
        "evaluation": {"limit": 12, "cloze_items": 8, "ppl_windows": 2, "window_tokens": 48},
        "economics": {"measure": False},
        "quality_gate": {"verified_against": "bf16", "min_items": 10},
    })
    result = execute(cfg, workdir=tmp_path / "work")
    assert result.precision == "bf16" and result.baseline.scheme == "bf16 (baseline)"
    full, verdict = result.full_precision
    assert full.name == "fp32" and full.comparison.kld_mean > 0 and verdict.rules
    assert result.decision.recommended != "fp32"
    # the row's KLD is KL(bf16 baseline || fp32 checkpoint) over the same windows, computed here again
    # one window per pass (bf16 results move by about 1% with the batch shape: hence rtol)
    windows = result.prepared.windows[: result.prepared.n_text_windows]
    bf16, fp32 = load_baseline(str(checkpoint), "bf16"), load_baseline(str(checkpoint), "fp32")
    ref = list(TorchEngine(bf16.model, max_batch_size=1).token_logprobs(windows))
    lp = list(TorchEngine(fp32.model, max_batch_size=1).token_logprobs(windows))
    expected = np.concatenate([kl_divergence(b, a) for a, b in zip(ref, lp)])
    np.testing.assert_allclose(full.scores.kld[: expected.size], expected, rtol=0.05, atol=1e-5)
    # every candidate is compared with (and gated against) the bf16 baseline
    assert all(c.comparison.kld_mean is not None for c in result.candidates)
    assert {v.name for v in result.decision.verdicts} == {c.name for c in result.candidates}

    record = build_record(result)
    assert record.model.precision == "bf16" and record.full_precision.name == "fp32"
    assert load_record(json.loads(dump_record(record))) == record
    rows = view.candidates_table(record).rows
    assert [r.cells[0] for r in rows][:2] == ["baseline", "fp32"] and rows[1].status == "reference"
    assert "baseline in bf16" in view.model_line(record)
    assert ("baseline precision", "bf16") in view.manifest(record)



@pytest.mark.heavy
def test_a_bf16_baseline_is_served_in_bf16_and_its_a_a_check_measured(checkpoint, tmp_path, torch_single_thread):
    """Economics of a bf16 baseline: its engine processes load it in bf16 (the serving options
    carry the precision), the A/A candidate serves the same again in every round, and the
    full-precision row is scored, not timed."""
    from quantgate.engines.registry import entry
    from quantgate.engines.torch import open_engine
    from quantgate.run import execute

    cfg = RunConfig.model_validate({
        "model": {"base": str(checkpoint)},
        "serving": {"engine": "torch", "max_batch_size": 1, "threads": 1},
        "candidates": [{"method": "none"}],
        "evaluation": {"limit": 6, "cloze_items": 4, "ppl_windows": 2, "window_tokens": 32},
        "economics": {"rounds": 2, "requests": 2, "prompt_tokens": 8, "new_tokens": 4},
        "quality_gate": {"verified_against": "bf16", "min_items": 4},
    })
    result = execute(cfg, workdir=tmp_path / "work")
    (aa,) = result.candidates
    assert aa.comparison.kld_mean == 0.0 and aa.economics.rounds == 2 and aa.economics.vs_baseline is not None
    assert result.baseline.economics.rounds == 2 and result.full_precision[0].economics is None
    record = load_record(json.loads(dump_record(build_record(result))))
    assert record.candidate("none").aa_check and not record.full_precision.aa_check
    assert record.conditions.rounds == 2
    served = entry("torch").load().serving_options
    options = served(SimpleNamespace(cfg=cfg, baseline=SimpleNamespace(precision="bf16")), None)
    assert options["precision"] == "bf16"
    assert open_engine(str(checkpoint), **options, threads=1).model.dtype == torch.bfloat16


SMALL_BF16_RUN = """\
model: {base: smollm2-135m-instruct}
serving: {engine: torch}
candidates:
  - {method: rtn, bits: 4, group_size: 64}
evaluation: {limit: 6, cloze_items: 6, ppl_windows: 1, window_tokens: 128}
economics: {measure: false}
quality_gate: {verified_against: bf16, min_items: 5}
"""  # small: bf16 matmuls are slow on CPUs without bf16 instructions (about 2.5x fp32 here)


@pytest.mark.slow
@pytest.mark.heavy
def test_a_bf16_baseline_run_on_the_default_model(tmp_path, capsys):
    """The default model evaluated in bf16: the fp32 checkpoint's KLD against it is reported as a
    row, and the candidates are gated against the bf16 baseline."""
    from quantgate.config import load_config
    from quantgate.run import execute

    path = tmp_path / "bf16.yaml"
    path.write_text(SMALL_BF16_RUN)
    result = execute(load_config(path), workdir=tmp_path / "work")
    record = build_record(result)
    full = record.full_precision
    with capsys.disabled():
        for m in (full, *record.candidates):
            print(f"\n{m.name}: KLD mean {m.vs_baseline.kld_mean:.3g} p99 {m.vs_baseline.kld_p99:.3g} "
                  f"top-1 {m.vs_baseline.top1_agreement:.4f} flips {m.vs_baseline.flips.rate:.3f} "
                  f"gate {'pass' if m.gate.passed else 'fail'}")
    assert record.model.precision == "bf16"
    assert 0 < full.vs_baseline.kld_mean < 0.05 and full.vs_baseline.top1_agreement > 0.9
    # 4-bit moves further from the bf16 baseline than the fp32 checkpoint does
    w4 = record.candidate("rtn-w4-g64")
    assert w4.vs_baseline.kld_mean > full.vs_baseline.kld_mean
    assert record.recommended != "fp32"
