"""Quantization-aware recovery (method qat): the learnable grid (methods/qat.py), the block-wise
driver (methods/apply.py), its config, and its calibration data."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from conftest import build_tiny_llama, single_thread

from quantgate.config import RunConfig
from quantgate.errors import UserError
from quantgate.export.codes import recover_codes
from quantgate.methods import qat
from quantgate.methods.apply import make_candidate, spec_of, targets
from quantgate.methods.calibrate import CalibrationSet
from quantgate.methods.gptq import gptq_quantize
from quantgate.methods.registry import candidate, shorthand
from quantgate.methods.rtn import QuantizedWeight, QuantSpec, dequantize, quantize
from quantgate.models.arch import arch_of

LLAMA = arch_of("llama")
SPECS = [QuantSpec(3, 64, False), QuantSpec(4, 64, True), QuantSpec(4, None, True)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _quantized(spec: QuantSpec, seed: int = 0) -> tuple[torch.Tensor, QuantizedWeight]:
    """A float weight [48, 576] (576 = 9 groups of 64, SmolLM2's width) and its GPTQ codes."""
    w = torch.randn(48, 576, generator=_gen(seed)) * 0.05
    x = torch.randn(800, 576, generator=_gen(seed + 1))
    return w, gptq_quantize(w, x.T @ x / 800, spec)


# -- the learnable grid (pure tensor functions) ---------------------------------------------------


@pytest.mark.parametrize("rounding", [True, False])
@pytest.mark.parametrize("spec", SPECS)
def test_untrained_parameters_are_the_init_bit_for_bit(spec, rounding):
    _, q = _quantized(spec)
    p = qat.learnable(q, rounding=rounding)
    assert (p.offset is None) == (not rounding)
    assert torch.equal(qat.weight(p), dequantize(q))
    back = qat.finalize(p)
    assert torch.equal(back.codes, q.codes) and torch.equal(back.scales, q.scales)
    assert (back.zeros is None) == (q.zeros is None) and (q.zeros is None or torch.equal(back.zeros, q.zeros))


@pytest.mark.parametrize("spec", SPECS)
def test_offsets_past_one_half_move_a_code_and_the_grid_range_holds(spec):
    _, q = _quantized(spec)
    p = qat.learnable(q)
    with torch.no_grad():
        p.offset.fill_(0.6)  # every code one up, clamped at qmax
        p.log_scale.fill_(0.01)  # scales 1% larger, then rounded to float16
    got = qat.finalize(p)
    assert torch.equal(got.codes, (q.codes + 1).clamp(max=spec.qmax))
    assert spec.qmin <= int(got.codes.min()) and int(got.codes.max()) <= spec.qmax
    assert got.scales.dtype == torch.float16 and not torch.equal(got.scales, q.scales)
    fake = dequantize(got)
    assert torch.equal(dequantize(recover_codes(fake, spec)), fake)  # on the grid the export packs
    assert torch.allclose(qat.weight(p), fake, rtol=1e-3, atol=0)  # only the scales' float16 rounding differs


def test_gradients_pass_straight_through_the_rounding():
    spec = QuantSpec(3, 64, False)
    _, q = _quantized(spec)
    p = qat.learnable(q)
    g = torch.randn(q.codes.shape, generator=_gen(5))
    (qat.weight(p) * g).sum().backward()
    s = q.scales.float().repeat_interleave(64, dim=1)
    assert torch.allclose(p.offset.grad, g * s)  # d ŵ / dV = s (STE)
    c = (q.codes.float() - q.zeros.float().repeat_interleave(64, dim=1))
    expect = (g * c * s).view(48, 9, 64).sum(-1)  # d ŵ / dρ = s · c, summed over each group
    assert torch.allclose(p.log_scale.grad, expect, rtol=1e-5, atol=1e-7)


def _linear_problem(spec: QuantSpec, steps: int, seed: int = 0, lr: float = 0.01,
                    rounding_lr: float = 0.0) -> tuple[qat.LearnableWeight, qat.Reconstruction]:
    """Fit the RTN grid of one linear layer to its float outputs on random inputs; V starts at
    the float weight's place in its code's cell."""
    w, _ = _quantized(spec)
    x = torch.randn(32, 16, 576, generator=_gen(7))  # [windows, L, in]
    targets = x @ w.T
    p = qat.learnable(quantize(w, spec), w)
    loss = qat.output_error(lambda params, idx: x[idx] @ params["w"].T, targets)
    fit = qat.reconstruct(loss, len(x), {"w": p}, {}, steps=steps, lr=lr, rounding_lr=rounding_lr, batch=4,
                          seed=seed, probe=range(8))
    return p, fit


@pytest.mark.parametrize("rounding_lr, ratio", [(0.0, 0.95), (0.005, 0.9)])  # measured 0.933, 0.877
def test_reconstruction_lowers_the_output_error_and_is_deterministic(rounding_lr, ratio):
    spec = QuantSpec(3, 64, False)
    init = quantize(_quantized(spec)[0], spec)
    p, fit = _linear_problem(spec, steps=100, rounding_lr=rounding_lr)
    assert fit.steps == 100 and not fit.kept_init and fit.loss_after < ratio * fit.loss_before
    got = qat.finalize(p)
    assert torch.equal(got.codes, init.codes) == (rounding_lr == 0)  # codes move only with rounding_lr
    again, fit2 = _linear_problem(spec, steps=100, rounding_lr=rounding_lr)
    assert fit2 == fit and torch.equal(got.scales, qat.finalize(again).scales)
    other, _ = _linear_problem(spec, steps=100, seed=1, rounding_lr=rounding_lr)
    assert not torch.equal(got.scales, qat.finalize(other).scales)  # the seed orders the windows


def test_a_rounding_lr_needs_learnable_rounding():
    p = qat.learnable(_quantized(QuantSpec(3, 64, False))[1], rounding=False)
    with pytest.raises(ValueError, match="rounding=True"):
        qat.reconstruct(lambda params, idx: params["w"].sum(), 4, {"w": p}, {}, steps=1, lr=0.01, rounding_lr=0.01,
                        batch=1, seed=0, probe=[0])


def test_zero_steps_change_nothing():
    p, fit = _linear_problem(QuantSpec(3, 64, False), steps=0)
    assert fit.loss_after == fit.loss_before and fit.steps == 0 and not p.log_scale.any()


def test_distillation_is_the_kl_divergence_the_gate_reports():
    from quantgate.evals.tasks import kl_divergence

    teacher_logits = torch.randn(3, 5, 576, generator=_gen(2)) * 3  # [windows, L, vocab]
    student_logits = teacher_logits + torch.randn(3, 5, 576, generator=_gen(3))
    ref = torch.log_softmax(teacher_logits, -1)
    loss = qat.distillation(lambda params, idx: params["x"][idx], lambda idx: ref[idx])
    idx = torch.tensor([0, 2])
    expect = kl_divergence(ref[idx].flatten(0, 1), torch.log_softmax(student_logits[idx], -1).flatten(0, 1)).mean()
    assert float(loss({"x": student_logits}, idx)) == pytest.approx(float(expect), rel=1e-5)
    assert float(loss({"x": teacher_logits + 7.0}, idx)) == pytest.approx(0.0, abs=1e-5)  # same distribution


def test_training_that_raises_the_loss_is_dropped_for_the_init():
    spec = QuantSpec(3, 64, False)
    p, fit = _linear_problem(spec, steps=5, lr=1.0)  # scales ×e per step: far past the optimum
    init = quantize(_quantized(spec)[0], spec)
    assert fit.kept_init and fit.loss_after > fit.loss_before
    got = qat.finalize(p)
    assert torch.equal(got.codes, init.codes) and torch.equal(got.scales, init.scales)


# -- the driver on tiny models --------------------------------------------------------------------


def tiny_576() -> transformers.LlamaForCausalLM:
    """2 blocks 576 wide (SmolLM2's width: 9 groups of 64), 9 heads of 64, 3 KV heads."""
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=576, intermediate_size=192, num_hidden_layers=2,
                                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=256,
                                      initializer_range=0.05)
    with single_thread():
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model576() -> transformers.LlamaForCausalLM:
    return tiny_576()


def _calib(samples: int = 8, seq_len: int = 32) -> CalibrationSet:
    return CalibrationSet(torch.randint(0, 128, (samples, seq_len), generator=_gen(0)), "random ids", "x")


def _made(model: torch.nn.Module, **settings) -> dict[str, torch.Tensor]:
    with single_thread():
        return make_candidate(model, LLAMA, candidate(**settings), _calib(), seed=0).model.state_dict()


@pytest.mark.parametrize("init", [{"method": "rtn"}, {"method": "gptq", "act_order": True}, {"method": "awq"}])
def test_zero_training_steps_reproduce_the_init_candidate_exactly(model576, init):
    grid = {"bits": 3, "group_size": 64}
    expected = _made(model576, **init, **grid)
    got = _made(model576, method="qat", init=init, steps=0, e2e_steps=0, **grid)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)  # every parameter, bit for bit


def _losses(line: str) -> tuple[float, float]:
    """(before, after) of a progress line '... loss A -> B (...)' or '... KL A -> B (...)'."""
    before, after = line.split(" (")[0].split(" ")[-3::2]
    return float(before), float(after)


def test_trained_weights_are_on_the_grid_and_lower_each_blocks_loss(model576, capsys):
    cand = candidate(method="qat", bits=3, group_size=64, init="gptq", steps=30, lr=0.02, e2e_steps=32)
    with single_thread():
        made = make_candidate(model576, LLAMA, cand, _calib(), seed=0)
    init = _made(model576, method="gptq", bits=3, group_size=64)
    spec = spec_of(cand)
    names = targets(made.model, LLAMA, cand)
    assert made.modules_changed == len(names) == 14
    moved = 0
    for name in names:
        w = made.model.get_submodule(name).weight.data
        codes = recover_codes(w, spec)  # raises unless exactly (q - z) · s on the 3-bit grid
        assert torch.equal(dequantize(codes), w)
        moved += int((w != init[f"{name}.weight"]).sum())
    assert moved > 0  # training changed codes or scales
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith(cand.label)]
    assert [ln.split(":")[0] for ln in lines] == [f"{cand.label} block 0", f"{cand.label} block 1"] + [
        f"{cand.label} end to end"] * 3  # 2 progress lines (every 16 steps), then the result
    assert "step 16/32, KL" in lines[2] and "step 32/32, KL" in lines[3]
    for line in lines[:2] + lines[-1:]:  # "... block i: loss A -> B (30 steps, ...)", "... end to end: KL A -> B"
        before, after = _losses(line)
        assert after < before, line


def test_end_to_end_distillation_lowers_the_kl_to_the_baseline_on_the_grid(model576, capsys):
    """Blocks left at the init (steps 0), only the end-to-end stage trains: every linear stays
    on the grid with the init's codes, the scales move, the KL on the probe windows falls."""
    cand = candidate(method="qat", bits=3, group_size=64, init="rtn", steps=0, e2e_steps=24, e2e_lr=0.01)
    with single_thread():
        made = make_candidate(model576, LLAMA, cand, _calib(), seed=0).model
    init = _made(model576, method="rtn", bits=3, group_size=64)
    spec = spec_of(cand)
    for name in targets(made, LLAMA, cand):
        got = recover_codes(made.get_submodule(name).weight.data, spec)
        start = recover_codes(init[f"{name}.weight"], spec)
        assert torch.equal(got.codes, start.codes) and not torch.equal(got.scales, start.scales), name
    line = capsys.readouterr().err.splitlines()[-1]
    assert line.startswith(f"{cand.label} end to end: KL") and "(24 steps" in line
    before, after = _losses(line)
    assert after < 0.9 * before, line


def test_end_to_end_stage_that_raises_the_kl_keeps_the_blocks_fit(model576, capsys):
    settings = {"method": "qat", "bits": 3, "group_size": 64, "init": "rtn", "steps": 0}
    expected = _made(model576, **settings, e2e_steps=0)
    got = _made(model576, **settings, e2e_steps=3, e2e_lr=1.0)  # scales ×e per step
    assert capsys.readouterr().err.splitlines()[-1].endswith(": higher, the blocks' scales kept")
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_same_seed_same_candidate(model576):
    settings = {"method": "qat", "bits": 4, "group_size": 64, "init": "rtn", "steps": 5}
    a, b = _made(model576, **settings), _made(model576, **settings)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_baseline_is_left_untouched(tiny_llama):
    before = copy.deepcopy(tiny_llama.state_dict())
    _made(tiny_llama, method="qat", bits=4, group_size=32, init="rtn", steps=3)
    assert all(torch.equal(before[k], v) for k, v in tiny_llama.state_dict().items())
    assert all(p.grad is None for p in tiny_llama.parameters())


def test_a_bf16_model_is_refused_in_one_line():
    from quantgate.errors import NotSupportedYet

    model = tiny_576().to(torch.bfloat16)
    with pytest.raises(NotSupportedYet, match="qat trains a float32 model; this baseline is torch.bfloat16"):
        _made(model, method="qat", bits=4, group_size=64, init="rtn", steps=1)


# -- config ---------------------------------------------------------------------------------------


def test_config_defaults_labels_and_round_trip():
    c = candidate(method="qat", bits=3, group_size=64)
    assert c.label == "qat-w3-g64" and c.scheme == "int3 g64 asym"
    assert c.init.label == "gptq-w3-g64-actorder"  # the init takes the candidate's grid
    assert c.calibration_needs() == {"hessian", "blocks"}
    assert candidate(method="qat", bits=4, group_size=64, init="rtn", steps=10).label == "qat-w4-g64-rtn-steps10"
    assert candidate(method="qat", bits=4, init={"method": "awq", "grid": 5}).label == "qat-w4-awq-grid5"
    assert candidate(method="qat", bits=4, init="rtn").calibration_needs() == {"blocks"}
    assert candidate(**shorthand("qat:3:g64:init=rtn:steps=10")).label == "qat-w3-g64-rtn-steps10"  # --candidate
    assert candidate(method="qat", bits=3, group_size=64, e2e_steps=0).label == "qat-w3-g64-e2e0"
    assert candidate(method="qat", bits=3, group_size=64, e2e_lr=0.003).label == "qat-w3-g64-e2elr0.003"
    for c in (candidate(method="qat", bits=3, group_size=64, init={"method": "gptq", "damp": 0.05}, lr=0.003),):
        assert candidate(**c.model_dump(mode="json")) == c


@pytest.mark.parametrize("settings, message", [
    ({"init": "smoothquant"}, "init: method is one of rtn, gptq, awq"),
    ({"init": {"method": "gptq", "bits": 4}}, "leave out bits"),
    ({"init": "gptq", "act_order": True}, "act_order"),  # an init setting belongs inside init
    ({"steps": -1}, "steps"),
    ({"lr": 0}, "lr"),
    ({"e2e_steps": -1}, "e2e_steps"),
    ({"e2e_lr": 2}, "e2e_lr"),
])
def test_bad_settings_are_refused(settings, message, tmp_path):
    from quantgate.config import load_config

    path = tmp_path / "q.yaml"
    path.write_text("candidates:\n  - {method: qat, bits: 3, group_size: 64, "
                    + ", ".join(f"{k}: {v}" for k, v in settings.items()).replace("'", "") + "}\n")
    with pytest.raises(UserError, match=message):
        load_config(path)


# -- calibration: the pool only, never the eval text ----------------------------------------------


def test_calibration_that_overlaps_the_eval_set_is_refused_before_any_training(tmp_path):
    from test_export import char_tokenizer_files

    from quantgate.run import prepare_inputs

    model_dir = tmp_path / "tiny"
    build_tiny_llama().save_pretrained(model_dir)
    char_tokenizer_files(model_dir)
    query = "which of these animals sleeps most of the day in a warm place near the old stone house"
    evals = tmp_path / "eval.jsonl"
    evals.write_text("\n".join(f'{{"id": "q{i}", "query": "{query} {i}", "choices": ["a cat", "a fish"], "gold": 0}}'
                               for i in range(4)) + "\n")
    calib = tmp_path / "calib.txt"
    calib.write_text("plain filler text about nothing much. " * 300 + query)
    cfg = RunConfig.model_validate({
        "model": {"base": str(model_dir)}, "candidates": [{"method": "qat", "bits": 4, "init": "rtn", "steps": 1}],
        "quality_gate": {"eval_set": str(evals), "min_items": 1}, "calibration": {"data": str(calib), "samples": 2,
                                                                                  "seq_len": 32},
    })
    assert cfg.needs_calibration
    with pytest.raises(UserError, match="overlaps the eval set"):
        prepare_inputs(cfg)
    calib.write_text("plain filler text about nothing much. " * 300)
    assert prepare_inputs(cfg).calib is not None  # disjoint: accepted


def test_quantgate_check_counts_the_training_in_its_estimate(tmp_path):
    """gptq and qat calibrate on the same windows (3 passes of 128 × 256 tokens); qat adds, per
    block, its targets, 64 steps of 2 windows forward and backward, and 2 probes of 8 windows."""
    from test_export import char_tokenizer_files

    from quantgate.plan import make_plan

    model_dir = tmp_path / "tiny"
    build_tiny_llama().save_pretrained(model_dir)
    char_tokenizer_files(model_dir)
    cfg = RunConfig.model_validate({
        "model": {"base": str(model_dir)}, "results_dir": str(tmp_path / "runs"),
        "candidates": [{"method": "gptq", "bits": 3, "group_size": 64}, {"method": "qat", "bits": 3, "group_size": 64}],
        "calibration": {"samples": 128, "seq_len": 256}, "evaluation": {"limit": 4},
    })
    made = {s.what.split(":")[0]: s.seconds for s in make_plan(cfg).steps if s.what.startswith("make ")}
    gptq, qat_ = made["make gptq-w3-g64"], made["make qat-w3-g64"]
    assert qat_ > gptq
    assert candidate(method="qat", bits=3).training_tokens(128, 256) == (128 + 3 * 64 * 2 + 16 + 4 * 64 + 8) * 256
    assert candidate(method="qat", bits=3, e2e_steps=0).training_tokens(128, 256) == (128 + 3 * 64 * 2 + 16) * 256
    assert candidate(method="gptq", bits=3).training_tokens(128, 256) == 0


# -- the real default model, kept short ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.heavy
def test_on_the_default_model_trained_scales_beat_their_rtn_init():
    """int3 g64 from RTN, 6 steps of 2 × 64 tokens per block on 8 calibration windows, then 8
    end-to-end steps of 64 tokens (kept short; the bench trains at the default settings): every
    block linear on the grid, and a KLD on held-out prose below 0.8 × the RTN init's."""
    from quantgate.config import CalibrationConfig
    from quantgate.evals.datasets import default_suite
    from quantgate.evals.tasks import kl_divergence, prepare
    from quantgate.methods.calibrate import calibration_set
    from quantgate.models.load import load_baseline

    baseline = load_baseline("smollm2-135m-instruct")
    suite = default_suite(limit=4, cloze_items=4, seed=0)
    windows = torch.tensor(prepare(suite, baseline.tokenizer, window_tokens=128, n_windows=4).windows)
    calib = calibration_set(baseline.tokenizer, CalibrationConfig(samples=8, seq_len=64), suite.texts())
    cand = candidate(method="qat", bits=3, group_size=64, init="rtn", steps=6, e2e_steps=8)
    rtn = make_candidate(baseline.model, baseline.arch, cand.init, calib).model
    trained = make_candidate(baseline.model, baseline.arch, cand, calib).model
    for name in targets(trained, baseline.arch, cand):
        w = trained.get_submodule(name).weight.data
        assert torch.equal(dequantize(recover_codes(w, spec_of(cand))), w), name

    with torch.no_grad():
        ref = torch.log_softmax(baseline.model(windows).logits, -1).flatten(0, 1)  # [4·128, vocab]

    def kld_and_agreement(model: torch.nn.Module) -> tuple[float, float]:
        with torch.no_grad():
            got = torch.log_softmax(model(windows).logits, -1).flatten(0, 1)
        return float(kl_divergence(ref, got).mean()), float((got.argmax(-1) == ref.argmax(-1)).float().mean())

    (k_rtn, a_rtn), (k_qat, a_qat) = kld_and_agreement(rtn), kld_and_agreement(trained)
    print(f"int3 g64 on 512 held-out tokens: rtn KLD {k_rtn:.4f} top-1 {a_rtn:.4f}; "
          f"qat KLD {k_qat:.4f} top-1 {a_qat:.4f}")
    assert k_qat < 0.8 * k_rtn
