"""The real default model (SmolLM2-135M-Instruct, dequantized Q4_1), kept fast by small subsets."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
import torch

from quantgate.methods.registry import candidate
from quantgate.engines.torch import TorchEngine, loglikelihood_reference
from quantgate.evals.datasets import default_suite
from quantgate.evals.tasks import evaluate, prepare
from quantgate.methods.apply import make_candidate
from quantgate.models.load import load_baseline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def baseline():
    return load_baseline("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def small_suite(baseline):
    suite = default_suite(limit=24, cloze_items=12, seed=0)
    return prepare(suite, baseline.tokenizer, window_tokens=64, n_windows=2)


def test_baseline_is_the_dequantized_packaged_gguf(baseline):
    assert baseline.model.config.model_type == "llama"
    assert baseline.model.dtype == torch.float32
    assert len(baseline.digest) == 64 and baseline.source.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    ids = baseline.tokenizer.encode("The capital of France is")
    out = baseline.model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False)
    assert "Paris" in baseline.tokenizer.decode(out[0, len(ids):])


def test_engine_equals_plain_loop_on_real_items(baseline, small_suite):
    reqs = small_suite.requests[:60]
    fast, fast_greedy = TorchEngine(baseline.model).loglikelihood(reqs)
    plain, plain_greedy = loglikelihood_reference(baseline.model, reqs)
    np.testing.assert_allclose(fast, plain, rtol=1e-5, atol=2e-3)  # float32 through 30 layers
    assert fast_greedy.dtype == bool and fast_greedy.shape == (len(reqs),)
    np.testing.assert_array_equal(fast_greedy, plain_greedy)


def test_model_against_itself_has_zero_kld(baseline, small_suite):
    engine = TorchEngine(baseline.model)
    _, reference = evaluate(engine, small_suite, keep=True)
    again, _ = evaluate(engine, small_suite, reference)
    assert again.kld.max() < 1e-9
    assert again.top1_agree.all()


def test_int8_is_close_and_int2_is_not(baseline, small_suite):
    engine = TorchEngine(baseline.model)
    _, reference = evaluate(engine, small_suite, keep=True)
    kld = {}
    for cand in (candidate(method="rtn", bits=8), candidate(method="rtn", bits=2, group_size=64)):
        made = make_candidate(baseline.model, baseline.arch, cand)
        assert made.modules_changed == 30 * 7
        scores, _ = evaluate(TorchEngine(made.model), small_suite, reference)
        kld[cand.bits] = float(np.mean(scores.kld))
    assert kld[8] < 0.01
    assert kld[2] > 100 * kld[8]


RTN_8_AND_2 = "candidates:\n  - {method: rtn, bits: 8}\n  - {method: rtn, bits: 2, group_size: 64}\n"


def run_cli(tmp_path, name, candidates=RTN_8_AND_2, extra=""):
    config = tmp_path / f"{name}.yaml"
    config.write_text(
        candidates + "evaluation: {limit: 24, cloze_items: 12, ppl_windows: 2, window_tokens: 64}\n"
        "quality_gate: {min_items: 30}\n" + extra  # 36 labeled items: under the default 100 nothing is recommended
    )
    out = tmp_path / name
    proc = subprocess.run([sys.executable, "-m", "quantgate.cli", "run", str(config), "--results-dir", str(out)],
                          capture_output=True, text=True, timeout=600)
    return proc, out


@pytest.mark.heavy
def test_cli_end_to_end_and_deterministic(tmp_path):
    proc, out = run_cli(tmp_path, "a")
    assert proc.returncode == 0, proc.stderr
    assert "recommendation: rtn-w8" in proc.stdout
    (results,) = out.glob("*/results.json")
    data = json.loads(results.read_text())
    assert data["eval"]["items"] == 36
    int8, int2 = data["candidates"]
    assert int8["gate"]["passed"] and not int2["gate"]["passed"]
    assert int8["vs_baseline"]["kld_mean"] < 0.01
    assert data["baseline"]["economics"]["decode_tokens_per_s"] > 0  # measured in a torch engine process
    assert int8["economics"]["simulated"]  # fake quant: quality only, no speed claimed
    assert int2["weight_bytes"] < int8["weight_bytes"] < data["baseline"]["weight_bytes"]
    flips = int2["vs_baseline"]["flips"]
    assert len(int2["flipped_items"]) == flips["correct_to_wrong"] + flips["wrong_to_correct"]
    with sqlite3.connect(out / "quantgate.db") as db:
        assert db.execute("select count(*) from runs").fetchone()[0] == 1
        assert db.execute("select count(*) from candidates").fetchone()[0] == 2

    proc2, out2 = run_cli(tmp_path, "b")  # same config and seed -> same numbers
    (results2,) = out2.glob("*/results.json")
    again = json.loads(results2.read_text())
    assert untimed(again["baseline"]) == untimed(data["baseline"])
    assert untimed(again["candidates"]) == untimed(data["candidates"])


@pytest.mark.heavy
def test_cli_prune_only_and_prune_then_quantize(tmp_path):
    proc, out = run_cli(tmp_path, "prune", "candidates:\n  - {prune: magnitude, sparsity: 0.25}\n"
                        "  - {steps: [{prune: magnitude, sparsity: 0.25}, {quantize: rtn, bits: 8}]}\n",
                        "economics: {measure: false}\n")
    assert proc.returncode in (0, 1), proc.stderr  # 1: no candidate holds the gate (a verdict, not an error)
    assert "Traceback" not in proc.stderr
    (results,) = out.glob("*/results.json")
    pruned, composed = json.loads(results.read_text())["candidates"]
    assert (pruned["name"], pruned["bits"]) == ("magnitude-s25", None)  # nothing quantized: no bit width
    assert (composed["name"], composed["bits"]) == ("magnitude-s25+rtn-w8", 8)
    assert pruned["vs_baseline"]["kld_mean"] > 0 and pruned["modules_changed"] > 0
    with sqlite3.connect(out / "quantgate.db") as db:
        rows = dict(db.execute("select name, bits from candidates").fetchall())
    assert rows == {"magnitude-s25": 32, "magnitude-s25+rtn-w8": 8}  # the store keeps float32 as 32


def untimed(value):
    """The value without wall-clock fields and measured serving economics (the only ones allowed to differ)."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if not k.endswith("_seconds") and k != "economics"}
    if isinstance(value, list):
        return [untimed(v) for v in value]
    return value


def test_smoothing_alone_leaves_the_real_model_unchanged(baseline):
    from quantgate.config import CalibrationConfig
    from quantgate.methods.calibrate import calibration_set
    from test_calibration import smoothing_only_max_diff

    calib = calibration_set(baseline.tokenizer, CalibrationConfig(samples=4, seq_len=64), [])
    text = default_suite(limit=None, cloze_items=0, seed=0).perplexity_text
    ids = torch.tensor([baseline.tokenizer.encode(text)[:96]])
    assert smoothing_only_max_diff(baseline.model, calib, ids) < 1e-4
