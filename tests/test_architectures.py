"""Every architecture row (llama, mistral, qwen2, qwen3, gemma3_text, phi3) on a tiny random model:
the torch engine against a plain transformers forward, every method, the calibration driver's
captured inputs against the real model's, the GGUF writer against llama.cpp, and BOS handling
against the tokenizer's own encoding (tests/archs.py builds the models and tokenizers)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from archs import ARCHS, FAMILIES, tiny_model, tiny_tokenizer

from quantgate.engines.torch import TorchEngine, loglikelihood_reference
from quantgate.errors import UserError
from quantgate.evals.datasets import TaskSpec
from quantgate.evals.tasks import encode_pair, encode_text, make_windows, render, text_prefix
from quantgate.methods import apply
from quantgate.methods.apply import make_candidate
from quantgate.methods.calibrate import CalibrationSet, run_blocks, walk_blocks
from quantgate.methods.registry import candidate
from quantgate.models.arch import ARCHITECTURES, arch_for, arch_of

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request):
    """(model type, tiny model); read-only."""
    return request.param, tiny_model(request.param)


def _ids(n: int, length: int, seed: int, vocab: int = 280) -> torch.Tensor:
    return torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def _calib(seed: int = 0) -> CalibrationSet:
    """Windows longer than the tiny models' sliding windows (4 and 6)."""
    return CalibrationSet(_ids(8, 20, seed), "random ids", "x")


def test_every_row_is_a_model_type_transformers_knows():
    assert set(ARCHITECTURES) == set(ARCHS)


# (1) the torch engine's packed scoring against one plain forward per request -------------------

def test_torch_engine_loglikelihoods_equal_a_plain_forward(arch_model):
    """Contexts longer than the sliding windows, several options sharing a prefix: the packed 4-D
    masks must give every layer the window it has in the real model."""
    _, model = arch_model
    rng = np.random.default_rng(1)
    requests = []
    for n_ctx in (3, 9, 17):
        ctx = tuple(int(t) for t in rng.integers(3, 280, n_ctx))
        common = tuple(int(t) for t in rng.integers(3, 280, 2))
        requests += [(ctx, common + tuple(int(t) for t in rng.integers(3, 280, k))) for k in (1, 4, 7)]
    ref, ref_greedy = loglikelihood_reference(model, requests)
    got, greedy = TorchEngine(model, max_batch_size=4, batch_tokens=128).loglikelihood(requests)
    assert np.max(np.abs(got - ref)) < 1e-4
    np.testing.assert_array_equal(greedy, ref_greedy)


# (2) every method runs; smoothing alone changes nothing ---------------------------------------

METHODS = [
    dict(method="rtn", bits=4, group_size=32),
    dict(method="gptq", bits=4, group_size=32),
    dict(method="awq", bits=4, group_size=32, grid=4),
    dict(method="smoothquant"),
    dict(method="prune", prune="wanda", sparsity=0.5),
    dict(method="prune", prune="sparsegpt", sparsity=0.5),
]


@pytest.mark.parametrize("fields", METHODS, ids=lambda f: f.get("prune", f["method"]))
def test_every_method_runs(arch_model, fields):
    model_type, model = arch_model
    made = make_candidate(model, arch_of(model_type), candidate(**fields), _calib())
    n_linears = sum(isinstance(m, torch.nn.Linear) and arch_of(model_type).is_block_linear(n)
                    for n, m in model.named_modules())
    assert made.modules_changed == n_linears
    with torch.no_grad():
        base, cand = model(_ids(2, 12, 5)).logits, made.model(_ids(2, 12, 5)).logits
    assert torch.isfinite(cand).all() and not torch.equal(base, cand)


@pytest.mark.parametrize("method", ["awq", "smoothquant"])
def test_smoothing_without_quantization_leaves_outputs_unchanged(arch_model, method):
    """Scales folded into the feeders (Gemma's (1 + w) norms, Phi-3's fused up half and v rows)
    and multiplied into the linears: the float function is the same."""
    model_type, model = arch_model
    arch, smoothed = arch_of(model_type), copy.deepcopy(model)
    if method == "awq":
        block = apply._awq_block(candidate(method="awq", bits=4, group_size=32, grid=4), arch, model.config,
                                 quantize=False)
        needs = {"rows"}
    else:
        block = apply._smoothquant_block(candidate(method="smoothquant"), arch, model.config, quantize=False)
        needs = {"absmax"}
    assert run_blocks(smoothed, arch, _calib(), needs, block, seed=0) > 0
    ids = _ids(2, 16, 7)
    with torch.no_grad():
        diff = (smoothed(ids).logits - model(ids).logits).abs().max().item()
    assert diff < 1e-4
    changed = [n for n, p in smoothed.named_parameters() if not torch.equal(p, model.get_parameter(n))]
    assert any(n.endswith("norm.weight") for n in changed)  # something was really folded


def test_rtn_and_magnitude_pruning_need_no_row_but_calibrated_methods_say_so():
    model = tiny_model("llama")
    model.config.model_type = "newfamily"  # a model type without a row
    arch = arch_for(model)
    assert not arch.has_row and arch.blocks == "model.layers"
    assert make_candidate(model, arch, candidate(method="rtn", bits=4, group_size=32)).modules_changed == 14
    assert make_candidate(model, arch, candidate(method="prune", prune="magnitude", sparsity=0.5)).modules_changed == 14
    with pytest.raises(UserError, match=r"model type 'newfamily' has no entry .*calibrated methods"):
        make_candidate(model, arch, candidate(method="gptq", bits=4), _calib())


# (3) the driver's captured inputs are the real model's, block by block -------------------------

def _real_block_inputs(model: torch.nn.Module, ids: torch.Tensor) -> list[tuple[torch.Tensor, dict]]:
    """What each block is called with in one plain forward of the unchanged model."""
    seen: list[tuple[torch.Tensor, dict]] = []

    def hook(_module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"], dict(kwargs)))

    handles = [b.register_forward_pre_hook(hook, with_kwargs=True) for b in model.model.layers]
    try:
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_captured_block_inputs_equal_the_real_models(arch_model):
    """Gemma 3's second block is a full-attention layer with another rope base: block 0's mask and
    position embeddings are wrong for it."""
    model_type, model = arch_model
    windows = _ids(3, 20, 11)
    real = _real_block_inputs(model, windows)
    with torch.inference_mode():
        for i, _block, inputs in walk_blocks(copy.deepcopy(model), arch_of(model_type), windows):
            ((hidden, kwargs),) = inputs  # one micro-batch
            real_hidden, real_kwargs = real[i]
            torch.testing.assert_close(hidden, real_hidden, rtol=0, atol=1e-5)
            for key in ("attention_mask", "position_embeddings"):
                got, want = kwargs.get(key), real_kwargs.get(key)
                for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
                    assert (g is None and w is None) or torch.equal(g, w), (i, key)


# (4) the GGUF writer's file in llama.cpp ------------------------------------------------------

def test_gguf_file_loads_in_llamacpp_and_matches_torch(arch_model, tmp_path):
    """Within the float32 noise floor (KLD < 1e-5 per position, same argmax) on a 24-token window,
    or, where llama.cpp runs the architecture without its sliding window (mistral here, window
    6), on the tokens inside the window, and measurably not past it."""
    pytest.importorskip("llama_cpp")
    from quantgate.engines.llamacpp import LlamaCppEngine
    from quantgate.models.gguf_export import exact_length, write_gguf

    model_type, model = arch_model
    arch = arch_of(model_type)
    path = write_gguf(model, arch, None, tmp_path / f"{model_type}.gguf", tokenizer=tiny_tokenizer(model_type))
    window = [int(t) for t in _ids(1, 24, 3)[0]]
    got = LlamaCppEngine(path, n_ctx=64).window_logprobs(window)  # [23, V] float32
    with torch.inference_mode():
        want = torch.log_softmax(model(torch.tensor([window])).logits[0, :-1].double(), -1).numpy()
    assert got.shape == want.shape
    kld = (np.exp(want) * (want - got)).sum(-1)  # [23] KL(torch || llama.cpp)
    exact = exact_length(arch, model.config) or len(kld)
    assert exact == (6 if model_type == "mistral" else len(kld))
    assert kld[:exact].max() < 1e-5 and (got.argmax(-1) == want.argmax(-1))[:exact].all(), kld.max()
    if exact < len(kld):
        assert kld[exact:].max() > 1e-2  # what the limit is about


# (5) BOS: the tokenizer's own rule, on every path ----------------------------------------------

@pytest.mark.parametrize("model_type", ARCHS)
def test_token_ids_follow_the_tokenizers_own_encoding(model_type):
    tok, fam = tiny_tokenizer(model_type), FAMILIES[model_type]
    assert text_prefix(tok) == ((tok.bos_token_id,) if fam.adds_bos else ())
    ctx, cont = "The quick brown fox", " jumps over the lazy dog."
    own = tok(ctx + cont)["input_ids"]
    got_ctx, got_cont = encode_pair(tok, ctx, cont)
    assert list(got_ctx + got_cont) == own and list(got_ctx) == tok(ctx)["input_ids"]
    text = " ".join(["Sliding-window attention looks back a fixed number of tokens."] * 6)
    windows = make_windows(tok, text, 16, 2)
    assert windows[0] == tok(text)["input_ids"][:16]  # the first window is the text as the tokenizer encodes it
    assert all(w[: len(text_prefix(tok))] == list(text_prefix(tok)) for w in windows)
    message = [{"role": "user", "content": "Hello there"}]
    templated = tok.apply_chat_template(message, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert encode_text(tok, render(tok, "Hello there", TaskSpec(chat_template=True)), special=False) == templated
    # one BOS, written by the template where the family's template writes it, never doubled
    assert templated.count(tok.bos_token_id) == ("bos_token" in fam.chat_template) or tok.bos_token_id is None


@pytest.mark.parametrize("model_type", ARCHS)
def test_bos_on_the_llamacpp_and_openai_paths(model_type, tmp_path):
    """llama.cpp gets token ids from quantgate, but a llama.cpp server tokenizes text itself: the
    written file's tokenizer adds BOS exactly when the Hugging Face tokenizer does, and the text
    the openai engine sends for ids tokenizes back to those ids (its BOS left to the server)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from quantgate.engines.openai import OpenAIEngine
    from quantgate.models.gguf_export import write_gguf

    tok = tiny_tokenizer(model_type)
    text = "The quick brown fox, 123 jumps! Hello world."
    own = tok(text)["input_ids"]
    path = write_gguf(tiny_model(model_type), arch_of(model_type), None, tmp_path / "t.gguf", tokenizer=tok)
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    assert llm.tokenize(text.encode(), add_bos=True, special=True) == own
    engine = OpenAIEngine("http://127.0.0.1:9/v1", tokenizer=tok, probe_ids=own)  # never contacted
    sent = engine.prompt_text(own)
    assert tok(sent)["input_ids"] == own and llm.tokenize(sent.encode(), add_bos=True, special=True) == own


@pytest.mark.parametrize("window, refused", [(6, True), (4096, False)])
def test_llamacpp_refuses_sequences_past_a_sliding_window_it_does_not_run(tmp_path, window, refused):
    """llama.cpp runs Mistral without its sliding window: an eval set with longer sequences would
    be scored by a different function than the model's; within the window it is the same."""
    pytest.importorskip("llama_cpp")
    from quantgate.config import RunConfig
    from quantgate.engines.llamacpp import LlamaCppBackend, longest_sequence
    from quantgate.engines.registry import BACKENDS, RunContext
    from quantgate.evals.datasets import default_suite
    from quantgate.evals.tasks import prepare
    from quantgate.models.load import load_baseline

    folder = tmp_path / "mistral"
    tiny_model("mistral", sliding_window=window).save_pretrained(folder)
    tiny_tokenizer("mistral").save_pretrained(folder)
    baseline = load_baseline(str(folder))
    prepared = prepare(default_suite(limit=2, cloze_items=2, seed=0), baseline.tokenizer, window_tokens=32, n_windows=1)
    assert 6 < longest_sequence(prepared) < 4096
    ctx = RunContext(RunConfig(), baseline, None, tmp_path, lambda d, n: (lambda k: None), [], None)
    backend = LlamaCppBackend(BACKENDS["llamacpp"])
    if refused:
        with pytest.raises(UserError, match="without its sliding window of 6 tokens"):
            backend.prepare(ctx, prepared)
    else:
        assert backend.prepare(ctx, prepared) == (prepared, [])
