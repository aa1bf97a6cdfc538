"""The ONNX Runtime engine (issue 15): MatMulNBits packing carries quantgate's exact codes, the
fp32 graph reproduces torch, a candidate's graph computes what its torch fake-quant computes,
and what ORT cannot serve is refused at config time, naming the nearest scheme it can."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from conftest import gen, single_thread
from quantgate.config import RunConfig, check_supported
from quantgate.engines import onnxruntime as qo
from quantgate.errors import UserError
from quantgate.gate import RuleKind
from quantgate.methods.calibrate import CalibrationSet
from quantgate.methods.registry import candidate
from quantgate.methods.rtn import QuantSpec, dequantize, quantize

HAVE_ORT = all(importlib.util.find_spec(m) for m in ("onnxruntime", "onnx", "onnxruntime_genai"))
needs_ort = pytest.mark.skipif(not HAVE_ORT, reason="onnxruntime, onnx or onnxruntime-genai not installed "
                                                    "(pip install 'quantgate[onnx]')")
# ORT fp32 (fused attention, its own GEMM) vs torch float32 on the tiny model's log-probs.
LOGPROB_ATOL = 1e-4


# -- packing: pure array functions -------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size,cols", [(32, 576), (128, 576), (64, 200), (None, 576)])
def test_packing_round_trips_codes_exactly(bits, symmetric, group_size, cols):
    """576 = 18 x 32 (divides), 576 with 128 and 200 with 64 leave a shorter last group."""
    spec = QuantSpec(bits, group_size, symmetric)
    q = quantize(torch.randn(24, cols, generator=gen(bits)), spec)
    w = qo.from_quantized(q)
    assert w.packed.dtype == np.uint8 and w.packed.shape == (24, -(-cols // w.block_size), w.block_size * bits // 8)
    codes, zeros = qo.unpack_nbits(w)
    np.testing.assert_array_equal(codes, q.codes.numpy())
    if symmetric:
        assert zeros is None and w.zeros is None
    else:
        per_block = zeros if group_size else zeros[:, :1]
        np.testing.assert_array_equal(per_block, q.zeros.numpy())
    np.testing.assert_array_equal(qo.dequantize_nbits(w), dequantize(q).numpy())  # the same weights, bit for bit


def test_low_bits_first_along_k():
    w = qo.pack_nbits(np.array([[1, 2, 3] + [0] * 29]), np.ones((1, 1), np.float16), np.array([[0]]), 4, 32)
    assert w.packed[0, 0, :2].tolist() == [0x21, 0x03]
    assert w.zeros.tolist() == [[0]]


def test_what_matmulnbits_cannot_hold_is_refused_by_the_packer():
    codes, scales = np.zeros((2, 64), int), np.ones((2, 1), np.float16)
    with pytest.raises(ValueError, match="3-bit codes: MatMulNBits serves 2, 4, 8 bits"):
        qo.pack_nbits(codes, scales, None, 3, 64)
    with pytest.raises(ValueError, match="group size 48 is not a MatMulNBits block size"):
        qo.pack_nbits(codes, scales, None, 4, 48)


@needs_ort
@pytest.mark.parametrize("bits,symmetric,group_size", [(4, False, 32), (4, True, 128), (8, True, None), (2, False, 16)])
def test_ort_computes_what_the_packed_layout_says(bits, symmetric, group_size):
    """One MatMulNBits node in ORT (accuracy_level 0) against the dequantized weights."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    q = quantize(torch.randn(40, 200, generator=gen(1)), QuantSpec(bits, group_size, symmetric))
    w = qo.from_quantized(q)
    matmul = helper.make_node("MatMul", ["A", "W"], ["Y"], name="/m/MatMul")
    node, inits = qo.nbits_node(matmul, w, accuracy_level=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, 200])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 40])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 200, generator=gen(2)).numpy()
    expected = x.astype(np.float64) @ dequantize(q).double().numpy().T
    np.testing.assert_allclose(session.run(None, {"A": x})[0], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


# -- config-time refusals ---------------------------------------------------------------------


def _check(*cands: dict, engine: str = "onnxruntime") -> None:
    check_supported(RunConfig.model_validate({"serving": {"engine": engine}, "candidates": list(cands)}))


@needs_ort
@pytest.mark.parametrize("cand,message", [
    ({"method": "rtn", "bits": 3, "group_size": 64},
     r"candidate rtn-w3-g64: int3 g64 asym: bits 3 cannot be served by MatMulNBits .*nearest servable: int4 g64 asym"),
    ({"method": "gptq", "bits": 4, "group_size": 100},
     r"gptq-w4-g100: .*group_size 100 cannot be served .*block sizes 16, 32, 64, 128, 256\); nearest servable: int4 g128"),
    ({"method": "rtn", "bits": 6, "group_size": 48}, r"bits 6 and group_size 48 .* nearest servable: int8 g64 asym"),
    ({"method": "smoothquant"}, r"per-token int8 activations .* nearest servable: \{method: rtn, bits: 8, accuracy_level: 4\}"),
    ({"prune": "magnitude", "sparsity": 0.5}, r"only quantized candidates"),
])
def test_an_unservable_scheme_is_one_clear_line_naming_the_nearest_servable(cand, message):
    with pytest.raises(UserError, match=message) as e:
        _check(cand)
    assert "\n" not in str(e.value)


@needs_ort
def test_unservable_simulate_lets_the_config_through():
    cand = {"method": "rtn", "bits": 3, "group_size": 64}
    with pytest.raises(UserError, match=r"or set serving.unservable: simulate"):
        _check(cand)
    check_supported(RunConfig.model_validate({"serving": {"engine": "onnxruntime", "unservable": "simulate"},
                                              "candidates": [cand]}))
    with pytest.raises(ValueError, match="unservable"):
        RunConfig.model_validate({"serving": {"unservable": "skip"}})


@needs_ort
def test_servable_schemes_pass_and_accuracy_level_is_labelled():
    _check({"method": "rtn", "bits": 8}, {"method": "rtn", "bits": 4, "group_size": 32},
           {"method": "gptq", "bits": 4, "group_size": 128, "accuracy_level": 4}, {"method": "awq", "bits": 2, "group_size": 16})
    assert candidate(method="gptq", bits=4, group_size=64, accuracy_level=4).label == "gptq-w4-g64-acc4"
    assert candidate(method="rtn", bits=8).label == "rtn-w8"
    assert "accuracy_level" not in candidate(method="rtn", bits=8).model_dump()  # stored settings unchanged


def test_accuracy_level_is_refused_on_engines_that_do_not_use_it():
    with pytest.raises(UserError, match="candidate rtn-w4-g64-acc4: accuracy_level is a setting of serving.engine "
                                        "onnxruntime, not torch"):
        _check({"method": "rtn", "bits": 4, "group_size": 64, "accuracy_level": 4}, engine="torch")
    with pytest.raises(ValueError, match="accuracy_level"):
        candidate(method="rtn", bits=4, accuracy_level=5)


# -- graphs on a tiny model (hidden width 576, as SmolLM2's) ----------------------------------


def tiny_576() -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=576, intermediate_size=192, num_hidden_layers=2,
                                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=512,
                                      initializer_range=0.05, tie_word_embeddings=True)
    with single_thread():
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(config).eval()


def char_tokenizer_fast() -> transformers.PreTrainedTokenizerFast:
    """One token per character (what the builder needs: a tokenizer it can load and save)."""
    from tokenizers import Tokenizer, models

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{chr(32 + i): 3 + i for i in range(95)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<pad>"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<pad>")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    if not HAVE_ORT:
        pytest.skip("onnxruntime, onnx or onnxruntime-genai not installed (pip install 'quantgate[onnx]')")
    from quantgate.models.arch import arch_of
    from quantgate.models.load import Baseline

    mp = pytest.MonkeyPatch()
    mp.setenv("QUANTGATE_CACHE", str(tmp_path_factory.mktemp("cache")))
    baseline = Baseline(tiny_576(), char_tokenizer_fast(), arch_of("llama"), "tiny-576", "0123456789abcdef-tiny", "tiny")
    graph = qo.float_graph(baseline, tmp_path_factory.mktemp("logs") / "builder.log")
    yield baseline, graph
    mp.undo()


WINDOW = torch.randint(3, 98, (60,), generator=gen(3)).tolist()
REQUESTS = [((1, 40, 41, 42), (50, 51)), ((1, 40, 41, 42), (50, 52, 53)), ((1, 40, 41, 42), (60,)), ((1, 7), (8, 9, 10))]


def _torch(model):
    from quantgate.engines.torch import TorchEngine

    return TorchEngine(model)


def _kld(ref: np.ndarray, lp: np.ndarray) -> float:
    return float((np.exp(ref) * (ref - lp)).sum(-1).mean())


def test_the_fp32_graph_reproduces_torch(tiny):
    baseline, graph = tiny
    ort_engine = qo.OnnxRuntimeEngine(graph, threads=1)
    with single_thread():
        ref = next(_torch(baseline.model).token_logprobs([WINDOW])).numpy()
        ll, greedy = _torch(baseline.model).loglikelihood(REQUESTS)
        gen_ids = _torch(baseline.model).generate([[1, 40, 41, 42]], 12)
    np.testing.assert_allclose(ort_engine.window_logprobs(WINDOW), ref, atol=LOGPROB_ATOL)
    ort_ll, ort_greedy = ort_engine.loglikelihood(REQUESTS)
    np.testing.assert_allclose(ort_ll, ll, atol=LOGPROB_ATOL * 3)
    assert ort_greedy.tolist() == greedy.tolist()
    assert ort_engine.generate([[1, 40, 41, 42]], 12) == gen_ids
    assert {p.name for p in graph.iterdir()} == {qo.GRAPH, qo.DATA, qo.GENAI_CONFIG}


@pytest.mark.parametrize("cand", [
    {"method": "rtn", "bits": 4, "group_size": 32},
    {"method": "rtn", "bits": 8},  # per channel, symmetric
    {"method": "rtn", "bits": 4, "group_size": 128, "symmetric": True},  # 576 = 4.5 x 128
    {"method": "gptq", "bits": 4, "group_size": 64},
    {"method": "awq", "bits": 4, "group_size": 64},  # its scales folded into the norms the graph holds
    {"method": "rtn", "bits": 4, "group_size": 64, "quantize_embeddings": True},  # the tied lm_head too
    {"method": "rtn", "bits": 8, "quantize_embeddings": True},
])
def test_a_candidate_on_ort_at_accuracy_level_0_matches_it_on_torch(tiny, cand, tmp_path):
    from quantgate.methods.apply import make_candidate

    baseline, graph = tiny
    cand = candidate(**cand)
    calib = CalibrationSet(torch.randint(3, 98, (8, 64), generator=gen(0)), "random ids", "x")
    with single_thread():
        made = make_candidate(baseline.model, baseline.arch, cand, calib if cand.needs_calibration else None)
        ref = next(_torch(made.model).token_logprobs([WINDOW])).numpy()
    weights = qo.candidate_weights(made.model, baseline.arch, cand)
    assert len(weights) == 2 * 7 + cand.quantize_embeddings  # (+ the lm_head, tied to the embedding)
    changed = qo.changed_floats(baseline.model, made.model, set(weights))
    assert bool(changed) == (cand.method == "awq") and all("norm" in n for n in changed)
    folder = qo.candidate_folder(baseline, made.model, cand, tmp_path / "builder.log")
    lp = qo.OnnxRuntimeEngine(folder, threads=1).window_logprobs(WINDOW)
    assert _kld(ref, lp) < 1e-3
    np.testing.assert_allclose(lp, ref, atol=LOGPROB_ATOL)
    assert qo.graph_bytes(folder) < qo.graph_bytes(graph) * (0.75 if cand.bits == 4 else 0.9)
    read_back, _ = qo.graph_weights(folder, baseline.model, baseline.arch.blocks)
    assert read_back.keys() == weights.keys() and all(
        np.array_equal(qo.dequantize_nbits(read_back[n]), qo.dequantize_nbits(w)) for n, w in weights.items())
    assert qo.candidate_graph(graph, weights, baseline.arch.blocks, 0, changed) == folder  # cached by content


def test_quantized_embeddings_of_an_untied_model_are_served(tiny, tmp_path):
    """An untied lm_head is a MatMulNBits node of its own codes; the embedding table, quantized
    apart, is the graph's embedding initializer with the candidate's values."""
    from quantgate.methods.apply import make_candidate
    from quantgate.models.load import Baseline

    config = tiny[0].model.config.to_dict() | {"tie_word_embeddings": False}
    with single_thread():
        torch.manual_seed(1)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    # (a digest of its own: graphs are cached by the digest's first 16 characters)
    untied = Baseline(model, tiny[0].tokenizer, tiny[0].arch, "tiny-untied", "fedcba9876543210-untied", "tiny")
    cand = candidate(method="rtn", bits=4, group_size=64, quantize_embeddings=True)
    with single_thread():
        made = make_candidate(model, untied.arch, cand)
        ref = next(_torch(made.model).token_logprobs([WINDOW])).numpy()
    weights = qo.candidate_weights(made.model, untied.arch, cand)
    assert "lm_head" in weights and list(qo.changed_floats(model, made.model, set(weights))) == [
        "model.embed_tokens.weight"]
    folder = qo.candidate_folder(untied, made.model, cand, tmp_path / "builder.log")
    lp = qo.OnnxRuntimeEngine(folder, threads=1).window_logprobs(WINDOW)
    assert _kld(ref, lp) < 1e-3
    np.testing.assert_allclose(lp, ref, atol=LOGPROB_ATOL)


def test_accuracy_level_4_is_a_different_graph_and_measurably_different_numerics(tiny):
    from quantgate.methods.apply import make_candidate

    baseline, graph = tiny
    cand = candidate(method="rtn", bits=4, group_size=32)
    with single_thread():
        made = make_candidate(baseline.model, baseline.arch, cand)
    weights = qo.candidate_weights(made.model, baseline.arch, cand)
    exact, int8 = (qo.candidate_graph(graph, weights, baseline.arch.blocks, level) for level in (0, 4))
    assert exact != int8
    a, b = (qo.OnnxRuntimeEngine(f, threads=1).window_logprobs(WINDOW) for f in (exact, int8))
    assert 0 < _kld(a, b) < 0.05


@pytest.mark.heavy
def test_a_run_on_onnxruntime_through_the_registry(tiny, tmp_path):
    """`serving.engine: onnxruntime` end to end on the tiny model: ORT baseline, an RTN candidate,
    the noise floor against torch float32, economics measured in an engine process."""
    from quantgate.run import execute

    baseline, _ = tiny
    folder = tmp_path / "tiny"
    baseline.model.save_pretrained(folder)
    baseline.tokenizer.save_pretrained(folder)
    cfg = RunConfig.model_validate({
        "model": {"base": str(folder)},
        "serving": {"engine": "onnxruntime", "max_batch_size": 2, "unservable": "simulate"},
        "candidates": [{"method": "rtn", "bits": 8}, {"method": "rtn", "bits": 4, "group_size": 32, "accuracy_level": 4},
                       {"method": "rtn", "bits": 3, "group_size": 32}],
        "evaluation": {"limit": 12, "cloze_items": 8, "ppl_windows": 2, "window_tokens": 64},
        "economics": {"requests": 2, "prompt_tokens": 16, "new_tokens": 8},
        "quality_gate": {"min_items": 10},
    })
    result = execute(cfg, workdir=tmp_path / "work")
    assert [c.name for c in result.candidates] == ["rtn-w8", "rtn-w4-g32-acc4", "rtn-w3-g32"]
    assert (result.noise_floor.engine, result.noise_floor.reference) == ("onnxruntime", "torch float32")
    assert result.noise_floor.kld.mean() < 1e-6
    served, simulated = [result.baseline, *result.candidates[:2]], result.candidates[2]
    # 3-bit codes: scored by fake quantization, speed unmeasured, gate failed as unservable
    assert "bits 3 cannot be served by MatMulNBits" in simulated.unservable
    assert simulated.economics.simulated and simulated.comparison.kld_mean > 0
    verdict = result.decision.verdicts[2]
    assert not verdict.passed and [r.kind for r in verdict.rules if not r.passed][-1] == RuleKind.SERVABLE
    assert any("rtn-w3-g32 is not servable on onnxruntime" in n for n in result.notes)
    for m in served:
        e = m.economics
        assert e.engine == "onnxruntime" and not e.simulated
        assert e.artifact_bytes == m.weight_bytes == qo.graph_bytes(Path(m.artifact).parent)
        assert e.throughput.decode_tokens_per_s.value > 0 and e.peak_rss_bytes.value > 0
    assert "ORT acc4" in result.candidates[1].scheme
    _exports_and_verifies(result, tmp_path)


def _exports_and_verifies(result, tmp_path):
    """--format onnx copies the graph folder the run evaluated (sha256 as recorded), with the
    tokenizer; verify re-measures it on onnxruntime; with the cached folder gone the export makes
    the same graph again; a simulated candidate has no graph to export."""
    import shutil

    from quantgate.export.build import export_candidate
    from quantgate.export.verify import verify
    from quantgate.record import build_record, dump_record

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    record = build_record(result)
    (run_dir / "results.json").write_text(dump_record(record))
    evaluated = Path(record.candidates[0].artifact.path)
    exported = export_candidate(run_dir, "rtn-w8", "onnx", tmp_path / "onnx")
    assert exported.files[qo.GRAPH]["sha256"] == record.candidates[0].artifact.sha256
    assert (exported.directory / qo.DATA).read_bytes() == (evaluated.parent / qo.DATA).read_bytes()
    assert (exported.directory / "tokenizer_config.json").is_file()
    doc = json.loads(exported.manifest.read_text())
    assert doc["scheme"]["format"] == "onnx" and doc["scheme"]["block_size"] == qo.PER_CHANNEL_BLOCK
    assert verify(exported.directory).ok
    shutil.rmtree(evaluated.parent)
    again = export_candidate(run_dir, "rtn-w8", "onnx", tmp_path / "onnx-again")
    assert again.files[qo.GRAPH]["sha256"] == exported.files[qo.GRAPH]["sha256"]
    with pytest.raises(UserError, match="no evaluated onnx artifact.*bits 3 cannot be served"):
        export_candidate(run_dir, "rtn-w3-g32", "onnx", tmp_path / "w3")
    with pytest.raises(UserError, match="copied as evaluated"):
        export_candidate(run_dir, "rtn-w8", "onnx", tmp_path / "dtype", "float16")


def test_export_reuses_the_codes_of_the_evaluated_graph(tiny, tmp_path, monkeypatch):
    """An ONNX-evaluated candidate is exported from the codes its graph holds: nothing is made
    again (make_candidate is not called), and the exported integer weights equal those of the
    candidate made independently from the config, bit for bit."""
    import io

    from quantgate.export import stored
    from quantgate.export.build import export_candidate
    from quantgate.export.formats import load_torch_artifact
    from quantgate.methods.apply import make_candidate
    from quantgate.record import build_record, dump_record
    from quantgate.report.progress import Feedback
    from quantgate.run import execute

    baseline, _ = tiny
    folder = tmp_path / "tiny"
    baseline.model.save_pretrained(folder)
    baseline.tokenizer.save_pretrained(folder)
    cand = {"method": "rtn", "bits": 4, "group_size": 32}
    cfg = RunConfig.model_validate({
        "model": {"base": str(folder)}, "serving": {"engine": "onnxruntime", "max_batch_size": 1},
        "candidates": [cand], "evaluation": {"limit": 6, "cloze_items": 4, "ppl_windows": 1, "window_tokens": 32},
        "economics": {"measure": False}, "quality_gate": {"min_items": 4},
    })
    with single_thread():
        result = execute(cfg, workdir=tmp_path / "work")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text(dump_record(build_record(result)))
    with single_thread():
        independent = make_candidate(baseline.model, baseline.arch, cfg.resolved_candidates[0]).model
    monkeypatch.setattr(stored, "make_candidate", lambda *a, **k: pytest.fail("the candidate was made again"))
    said = io.StringIO()
    with single_thread(), Feedback(stream=said) as feedback:
        exported = export_candidate(run_dir, "rtn-w4-g32", "compressed-tensors", tmp_path / "ct", feedback=feedback)
    assert "reusing rtn-w4-g32's codes" in said.getvalue()
    scheme = json.loads(exported.manifest.read_text())["scheme"]
    loaded = load_torch_artifact(exported.directory, scheme)
    for name in scheme["targets"]:
        assert torch.equal(loaded.get_submodule(name).weight, independent.get_submodule(name).weight), name
