"""The llama.cpp engine on GGUF files the project writes, against the torch engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("llama_cpp")

from quantgate.engines.llamacpp import LlamaCppEngine  # noqa: E402
from quantgate.engines.torch import TorchEngine  # noqa: E402
from quantgate.errors import UserError  # noqa: E402
from quantgate.evals.datasets import default_suite  # noqa: E402
from quantgate.evals.tasks import kl_divergence, make_windows, prepare  # noqa: E402
from quantgate.models.gguf_export import write_gguf  # noqa: E402
from quantgate.models.load import load_baseline, locate_packaged  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def baseline():
    return load_baseline("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def f32_gguf(baseline, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "smollm2-f32.gguf"
    return write_gguf(baseline.model, baseline.arch, locate_packaged("smollm2-135m-instruct"), out)


@pytest.fixture(scope="module")
def engines(baseline, f32_gguf):
    return TorchEngine(baseline.model), LlamaCppEngine(f32_gguf, n_ctx=512)


def test_engine_noise_floor_is_below_1e_3(baseline, engines):
    text = default_suite(limit=1, cloze_items=0, seed=0).perplexity_text
    windows = make_windows(baseline.tokenizer, text, 128, 2)
    torch_engine, cpp = engines
    kld, agree = [], []
    for ref, lp in zip(torch_engine.token_logprobs(windows), cpp.token_logprobs(windows)):
        kld.append(kl_divergence(ref, lp))
        agree.append((ref.argmax(-1) == lp.argmax(-1)).float().mean().item())
    assert float(np.mean(np.concatenate(kld))) < 1e-3
    assert min(agree) > 0.97


def test_multiple_choice_scores_match_torch(baseline, engines):
    prepared = prepare(default_suite(limit=12, cloze_items=6, seed=0), baseline.tokenizer, window_tokens=16, n_windows=1)
    torch_engine, cpp = engines
    ll_t, greedy_t = torch_engine.loglikelihood(prepared.requests)
    ll_c, greedy_c = cpp.loglikelihood(prepared.requests)
    np.testing.assert_allclose(ll_c, ll_t, rtol=1e-3, atol=0.05)
    assert (greedy_c == greedy_t).mean() > 0.9


def test_same_token_ids_on_both_engines(baseline, engines):
    _, cpp = engines
    tok = baseline.tokenizer
    chat = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}], add_generation_prompt=True,
                                   tokenize=False)
    for text in ("The capital of France is Paris.", "  leading spaces, émigré, 東京 and\nnew lines", chat):
        hf = tok.encode(text, add_special_tokens=False)
        cpp_ids = cpp.llm.tokenize(text.encode(), add_bos=False, special=True)
        assert cpp_ids == hf, text


def test_greedy_generation_matches_torch(baseline, engines):
    torch_engine, cpp = engines
    prompt = baseline.tokenizer.encode("Question: What is the capital of France?\nAnswer:")
    assert cpp.generate([prompt], 8) == torch_engine.generate([prompt], 8)


def test_corrupted_or_truncated_gguf_is_a_clear_error(f32_gguf, tmp_path):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(f32_gguf.read_bytes()[: 1 << 20])
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 100)
    for bad in (truncated, garbage, tmp_path / "missing.gguf"):
        with pytest.raises(UserError, match=str(bad.name)):
            LlamaCppEngine(bad)


@pytest.mark.parametrize("dtype", ["F16", "BF16"])
def test_half_precision_gguf_loads_and_stays_within_the_floor(baseline, engines, f32_gguf, tmp_path, dtype):
    # Measured on the default model over these 254 tokens: F16 KLD 1.5e-05, BF16 1.7e-04 (8 mantissa
    # bits); the tolerance is the engine noise floor's, 1e-3.
    out = write_gguf(baseline.model, baseline.arch, locate_packaged("smollm2-135m-instruct"),
                     tmp_path / f"{dtype}.gguf", dtype=dtype)
    assert out.stat().st_size < 0.55 * f32_gguf.stat().st_size
    text = default_suite(limit=1, cloze_items=0, seed=0).perplexity_text
    windows = make_windows(baseline.tokenizer, text, 128, 2)
    reference = list(engines[0].token_logprobs(windows))
    half = list(LlamaCppEngine(out, n_ctx=512).token_logprobs(windows))
    kld = np.concatenate([kl_divergence(r, lp) for r, lp in zip(reference, half)])
    top1 = np.concatenate([(r.argmax(-1) == lp.argmax(-1)).numpy() for r, lp in zip(reference, half)])
    assert kld.mean() < 1e-3 and top1.mean() >= 0.99


def test_llamacpp_quantizer_orders_quality_by_bits(baseline, engines, f32_gguf, tmp_path):
    from quantgate.methods.gguf_quant import quantize_gguf, tensor_types

    text = default_suite(limit=1, cloze_items=0, seed=0).perplexity_text
    windows = make_windows(baseline.tokenizer, text, 128, 2)
    reference = list(engines[0].token_logprobs(windows))
    kld = {}
    for gguf_type in ("Q8_0", "Q4_K_M", "Q2_K"):
        out = quantize_gguf(f32_gguf, tmp_path / f"{gguf_type}.gguf", gguf_type)
        assert out.stat().st_size < f32_gguf.stat().st_size
        stored = tensor_types(out)
        assert stored["F32"] < sum(stored.values())  # quantized tensors, of whatever types llama.cpp chose
        if gguf_type == "Q8_0":
            assert stored["Q8_0"] > 0  # (on this model Q2_K stores no Q2_K tensor: rows are not 256-wide)
        cpp = LlamaCppEngine(out, n_ctx=512)
        kld[gguf_type] = float(np.mean(np.concatenate(
            [kl_divergence(r, lp) for r, lp in zip(reference, cpp.token_logprobs(windows))])))
    assert kld["Q8_0"] < kld["Q4_K_M"] < kld["Q2_K"]
    with pytest.raises(UserError, match="GGUF type"):
        quantize_gguf(f32_gguf, tmp_path / "x.gguf", "Q9_Z")
