"""The calibration data and the layer-by-layer driver shared by GPTQ, AWQ and SmoothQuant."""

from __future__ import annotations

import pytest
import torch

from quantgate.methods.registry import candidate
from quantgate.config import CalibrationConfig
from quantgate.errors import UserError
from quantgate.evals import prose
from quantgate.evals.datasets import default_suite
from quantgate.methods import apply
from quantgate.methods.apply import make_candidate
from quantgate.methods.calibrate import CalibrationSet, calibration_set, check_disjoint, run_blocks
from quantgate.models.arch import arch_of


def test_default_calibration_pool_is_disjoint_from_the_default_suite():
    check_disjoint(prose.pool_text("calibration"), default_suite(limit=None, cloze_items=200, seed=0).texts())


def test_overlap_with_eval_text_is_refused(tmp_path, char_tokenizer):
    sentence = "the quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat"
    with pytest.raises(UserError, match="overlaps the eval set"):
        check_disjoint(f"Some text. {sentence.upper()}! More.", ["unrelated", f"x {sentence} y"])
    calib = tmp_path / "calib.txt"
    calib.write_text(("filler words " * 400) + sentence)
    cfg = CalibrationConfig(data=str(calib), samples=2, seq_len=16)
    with pytest.raises(UserError, match="overlaps"):
        calibration_set(char_tokenizer, cfg, [sentence])
    calibration_set(char_tokenizer, cfg, ["nothing in common here at all"])  # disjoint: accepted


def test_calibration_windows_are_deterministic_and_sized(tmp_path, char_tokenizer):
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join('{"text": "line %d of calibration text"}' % i for i in range(200)))
    cfg = CalibrationConfig(data=str(calib), samples=5, seq_len=32, seed=3)
    a, b = calibration_set(char_tokenizer, cfg, []), calibration_set(char_tokenizer, cfg, [])
    assert a.windows.shape == (5, 32) and torch.equal(a.windows, b.windows) and a.digest == b.digest
    other = calibration_set(char_tokenizer, cfg.model_copy(update={"seed": 4}), [])
    assert not torch.equal(a.windows, other.windows)
    with pytest.raises(UserError, match="need"):
        calibration_set(char_tokenizer, cfg.model_copy(update={"samples": 10_000}), [])


def _calib(vocab: int = 128, samples: int = 8, seq_len: int = 24) -> CalibrationSet:
    g = torch.Generator().manual_seed(0)
    return CalibrationSet(torch.randint(0, vocab, (samples, seq_len), generator=g), "random ids", "x")


@pytest.mark.parametrize("method", ["gptq", "awq", "smoothquant"])
def test_driver_quantizes_every_block_linear_and_leaves_the_baseline(tiny_llama, method, torch_single_thread):
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    kwargs = {} if method == "smoothquant" else {"bits": 4, "group_size": 32}
    cand = candidate(method=method, **kwargs)
    blocks_seen = []
    made = make_candidate(tiny_llama, arch_of("llama"), cand, _calib(), on_block=blocks_seen.append)
    n_layers = tiny_llama.config.num_hidden_layers
    assert made.modules_changed == 7 * n_layers
    assert blocks_seen == list(range(n_layers))
    assert all(torch.equal(before[k], v) for k, v in tiny_llama.state_dict().items())
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        assert not torch.allclose(made.model(ids).logits, tiny_llama(ids).logits)


def test_calibrated_method_without_data_is_an_error(tiny_llama):
    with pytest.raises(ValueError, match="calibration"):
        make_candidate(tiny_llama, arch_of("llama"), candidate(method="gptq", bits=4), None)


def smoothing_only_max_diff(model: torch.nn.Module, calib: CalibrationSet, ids: torch.Tensor) -> float:
    """Fold SmoothQuant's scales into a copy of the model without quantizing; max |Δ logits|."""
    import copy

    smoothed = copy.deepcopy(model)
    arch = arch_of(model.config.model_type)
    cand = candidate(method="smoothquant", alpha=0.5)
    method = apply._smoothquant_block(cand, arch, model.config, quantize=False)
    changed = run_blocks(smoothed, arch, calib, {"absmax"}, method, seed=0)
    assert changed > 0
    with torch.no_grad():
        return float((smoothed(ids).logits - model(ids).logits).abs().max())


def test_smoothing_alone_leaves_the_tiny_model_unchanged(tiny_llama, torch_single_thread):
    assert smoothing_only_max_diff(tiny_llama, _calib(), torch.randint(0, 128, (2, 20))) < 1e-4


def test_w8a8_with_quantized_embeddings_runs(tiny_llama):
    # the activation hook must not touch the embedding, whose input is token ids
    made = make_candidate(tiny_llama, arch_of("llama"), candidate(method="w8a8", quantize_embeddings=True))
    assert not made.model.model.embed_tokens._forward_pre_hooks  # ids would be silently rounded
    assert made.model.model.layers[0].self_attn.q_proj._forward_pre_hooks
    with torch.no_grad():
        assert torch.isfinite(made.model(torch.randint(0, 128, (1, 8))).logits).all()
