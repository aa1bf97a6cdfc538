"""Pruning: the pure mask / SparseGPT / unit functions, and the driver on the tiny Llama
(unstructured, 2:4, structured shrinking, composition with a quantizer)."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import gen, outlier_activations
from quantgate.methods.registry import candidate
from quantgate.errors import NothingHappened, UserError
from quantgate.methods import prune
from quantgate.methods.apply import make_candidate, shrink_config, shrink_units, weight_bytes
from quantgate.methods.calibrate import CalibrationSet
from quantgate.methods.gptq import accumulate_hessian, gptq_quantize
from quantgate.methods.rtn import QuantSpec, dequantize
from quantgate.models.arch import arch_of

LLAMA = arch_of("llama")
BLOCK_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _calib(samples: int = 8, seq_len: int = 24) -> CalibrationSet:
    return CalibrationSet(torch.randint(0, 128, (samples, seq_len), generator=gen(0)), "random ids", "x")


def correlated_problem(seed: int, rows: int = 64, cols: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight [rows, cols], activations X [2048, cols] with outlier channels mixed into their
    neighbours, H = 2/n XᵀX): LLM-like inputs whose channels are not independent."""
    x = outlier_activations(2048, cols, seed, channels=[3, 40, 77], scale=8.0)
    x = x @ (torch.eye(cols) + 0.5 * torch.randn(cols, cols, generator=gen(seed + 100)) / cols**0.5)
    w = torch.randn(rows, cols, generator=gen(seed + 1))
    return w, x, accumulate_hessian(None, x, 0)[0]


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


# -- pure functions ------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_magnitude_mask_prunes_the_exact_count_of_the_smallest(sparsity):
    w = torch.randn(48, 96, generator=gen(1))
    keep = prune.magnitude_mask(w, sparsity)
    assert int((~keep).sum()) == prune.count_of(sparsity, w.numel())
    assert w.abs()[keep].min() >= w.abs()[~keep].max()


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.6])
def test_wanda_mask_prunes_the_exact_count_per_row_by_weight_times_input_norm(sparsity):
    w = torch.randn(48, 96, generator=gen(2))
    norm = torch.rand(96, generator=gen(3)) * 10
    keep = prune.wanda_mask(w, norm, sparsity)
    per_row = prune.count_of(sparsity, 96)
    assert ((~keep).sum(1) == per_row).all()
    score = w.abs() * norm
    for r in range(w.shape[0]):
        assert score[r][keep[r]].min() >= score[r][~keep[r]].max()
    # a channel with a large input norm keeps its weights that magnitude alone would drop
    assert not torch.equal(keep, prune.score_mask(w.abs(), sparsity, None, per_row=True))
    flat = prune.wanda_mask(w, torch.ones(96), sparsity)  # uniform norms: |W| per row
    assert torch.equal(flat, prune.score_mask(w.abs(), sparsity, None, per_row=True))


def _assert_two_of_four(kept: torch.Tensor) -> None:
    groups = kept.reshape(kept.shape[0], -1, 4)
    assert (groups.sum(-1) == 2).all()


def test_two_four_pattern_for_every_score():
    w, _, H = correlated_problem(0)
    mag = prune.magnitude_mask(w, nm=(2, 4))
    _assert_two_of_four(mag)
    groups = w.abs().reshape(64, -1, 4)
    kept_min = torch.where(mag.reshape(64, -1, 4), groups, torch.inf).amin(-1)
    dropped_max = torch.where(mag.reshape(64, -1, 4), -torch.inf, groups).amax(-1)
    assert (kept_min >= dropped_max).all()  # the two largest of each four
    _assert_two_of_four(prune.wanda_mask(w, prune.act_norm_from_hessian(H), nm=(2, 4)))
    _assert_two_of_four(prune.sparsegpt_prune(w, H, nm=(2, 4)) != 0)


def test_sparsegpt_reaches_the_exact_sparsity_per_block():
    w, _, H = correlated_problem(1, rows=32, cols=256)
    out = prune.sparsegpt_prune(w, H, 0.5, block_size=128)
    for b in range(2):
        assert int((out[:, b * 128 : (b + 1) * 128] == 0).sum()) == prune.count_of(0.5, 32 * 128)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_with_an_identity_like_hessian_is_magnitude_pruning(nm):
    w = torch.randn(48, 128, generator=gen(4))
    H = 3.0 * torch.eye(128)  # constant diagonal: no error to propagate, saliency ∝ w²
    sparsity = None if nm else 0.5
    expected = w * prune.magnitude_mask(w, sparsity, nm)
    assert torch.equal(prune.sparsegpt_prune(w, H, sparsity, nm, block_size=128), expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_beats_wanda_beats_magnitude_on_output_error(seed, nm):
    w, x, H = correlated_problem(seed)
    sparsity = None if nm else 0.5

    def err(pruned: torch.Tensor) -> float:  # ||X Wᵀ - X W'ᵀ|| / ||X Wᵀ||
        return float((x @ w.T - x @ pruned.T).norm() / (x @ w.T).norm())

    mag = err(w * prune.magnitude_mask(w, sparsity, nm))
    wanda = err(w * prune.wanda_mask(w, prune.act_norm_from_hessian(H), sparsity, nm))
    sgpt = err(prune.sparsegpt_prune(w, H, sparsity, nm))
    assert sgpt < wanda < 0.85 * mag  # measured: sgpt ≈ 0.6 × magnitude, wanda ≈ 0.72 ×


@pytest.mark.parametrize("cols", [576, 200])  # the default model's width; a width not a multiple of 128
@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_on_real_widths(cols, nm):
    """More than one block of columns, the last one partial (it used to raise a TypeError past
    128 columns with 2:4: the block loop reused the name of the width for a slice)."""
    w, x, H = correlated_problem(3, rows=32, cols=cols)
    sparsity = None if nm else 0.5
    out = prune.sparsegpt_prune(w, H, sparsity, nm)
    if nm:
        _assert_two_of_four(out != 0)
    else:
        assert int((out == 0).sum()) == sum(prune.count_of(0.5, 32 * min(128, cols - b)) for b in range(0, cols, 128))

    def err(pruned: torch.Tensor) -> float:
        return float((x @ w.T - x @ pruned.T).norm() / (x @ w.T).norm())

    assert err(out) < 0.85 * err(w * prune.magnitude_mask(w, sparsity, nm))


def test_unit_importance_is_the_output_error_of_removing_the_unit():
    w, x, _ = correlated_problem(5, rows=16, cols=96)
    H = x.double().T @ x.double()  # exact XᵀX (any common factor would do)
    for n_units in (96, 4):  # single columns (MLP neurons) and blocks of 24 (a KV group's heads)
        got = prune.unit_importance(w, n_units, H.float())  # float32 inside
        width = 96 // n_units
        for u in range(n_units):
            cols = slice(u * width, (u + 1) * width)
            direct = (x.double()[:, cols] @ w.double()[:, cols].T).norm()
            torch.testing.assert_close(got[u], direct.float(), rtol=1e-4, atol=0)
    no_calib = prune.unit_importance(w, 4)  # without a Hessian: the weight norm of each block
    torch.testing.assert_close(no_calib, w.reshape(16, 4, 24).pow(2).sum((0, 2)).sqrt())


def test_units_to_keep_drops_the_least_important():
    importance = torch.tensor([5.0, 1.0, 3.0, 1.0, 9.0])
    assert prune.units_to_keep(importance, 2).tolist() == [0, 2, 4]  # tie 1.0: lower index goes first
    assert prune.units_to_keep(importance, 0).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="at least one"):
        prune.units_to_keep(importance, 5)


def test_bad_arguments_are_errors():
    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match="either sparsity or nm"):
        prune.magnitude_mask(w, 0.5, (2, 4))
    with pytest.raises(ValueError, match="dividing"):
        prune.magnitude_mask(torch.randn(8, 10), nm=(2, 4))
    with pytest.raises(ValueError, match="multiple of m"):
        prune.sparsegpt_prune(w, torch.eye(16), nm=(2, 4), block_size=6)


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_with_a_mask_stores_exact_zeros_and_compensates(symmetric):
    w, x, H = correlated_problem(6)
    keep = prune.wanda_mask(w, prune.act_norm_from_hessian(H), 0.5)
    spec = QuantSpec(bits=4, group_size=32, symmetric=symmetric)
    masked = dequantize(gptq_quantize(w * keep, H, spec, keep=keep))
    assert (masked[~keep] == 0).all()
    full = torch.ones_like(keep)
    assert torch.equal(gptq_quantize(w, H, spec, keep=full).codes, gptq_quantize(w, H, spec).codes)
    # re-zeroing after a mask-blind GPTQ loses the compensation of the pruned weights
    blind = dequantize(gptq_quantize(w * keep, H, spec)) * keep

    def err(q: torch.Tensor) -> float:
        return float((x @ (w * keep).T - x @ q.T).norm())

    assert err(masked) < err(blind)


# -- the driver on the tiny Llama ------------------------------------------------------------------


@pytest.mark.parametrize("score", ["magnitude", "wanda", "sparsegpt"])
def test_driver_prunes_every_block_linear_to_the_sparsity(tiny_llama, score, torch_single_thread):
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    made = make_candidate(tiny_llama, LLAMA, candidate(prune=score, sparsity=0.5), _calib())
    n_layers = tiny_llama.config.num_hidden_layers
    assert made.modules_changed == 7 * n_layers
    for i in range(n_layers):
        for name in BLOCK_LINEARS:
            w = made.model.get_submodule(f"model.layers.{i}.{name}").weight
            zeros = (w == 0).sum(1)
            if score == "wanda":  # exactly half of each row
                assert (zeros == w.shape[1] // 2).all(), name
            elif score == "magnitude":  # exactly half of the matrix
                assert int(zeros.sum()) == w.numel() // 2, name
            else:  # exactly half of each 128-column block (these have one)
                assert int(zeros.sum()) == w.numel() // 2, name
    assert all(torch.equal(before[k], v) for k, v in tiny_llama.state_dict().items())
    assert made.weight_bytes == weight_bytes(tiny_llama)[0]  # dense storage: no saving claimed
    assert made.quantized_params == 0
    assert torch.equal(made.model.lm_head.weight, tiny_llama.lm_head.weight)


def test_driver_two_four_on_every_block_linear(tiny_llama, torch_single_thread):
    made = make_candidate(tiny_llama, LLAMA, candidate(prune="sparsegpt", pattern="2:4"), _calib())
    for i in range(tiny_llama.config.num_hidden_layers):
        for name in BLOCK_LINEARS:
            _assert_two_of_four(made.model.get_submodule(f"model.layers.{i}.{name}").weight != 0)


def test_calibration_is_needed_except_for_magnitude(tiny_llama):
    make_candidate(tiny_llama, LLAMA, candidate(prune="magnitude", sparsity=0.5))
    make_candidate(tiny_llama, LLAMA, candidate(prune="magnitude", sparsity=0.5, structure="mlp"))
    with pytest.raises(ValueError, match="calibration"):
        make_candidate(tiny_llama, LLAMA, candidate(prune="wanda", sparsity=0.5))


def test_shrinking_with_no_unit_removed_changes_nothing(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    ids = torch.randint(0, 128, (2, 20), generator=gen(7))
    for kind, n_units in (("mlp", 96), ("heads", 2)):
        units = dict(LLAMA.units)[kind]
        for block in model.model.layers:
            assert shrink_units(block, units, n_units, torch.arange(n_units)) == 0
    assert torch.equal(_logits(model, ids), _logits(tiny_llama, ids))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), tiny_llama.parameters()))


def _masked_original(model: torch.nn.Module, kind: str, removed: list[torch.Tensor]) -> torch.nn.Module:
    """The model with the removed units' input columns of the reading projection zeroed."""
    masked = copy.deepcopy(model)
    units = dict(LLAMA.units)[kind]
    for block, gone in zip(masked.model.layers, removed):
        w = block.get_submodule(units.cols).weight
        n_units = (masked.config.intermediate_size if kind == "mlp" else masked.config.num_key_value_heads)
        w.data[:, prune.unit_channels(gone, w.shape[1] // n_units)] = 0
    return masked


@pytest.mark.parametrize("kind,n_units,removed", [("mlp", 96, 24), ("heads", 2, 1)])
def test_shrunk_model_matches_the_masked_original(tiny_llama, kind, n_units, removed):
    units = dict(LLAMA.units)[kind]
    model = copy.deepcopy(tiny_llama)
    gone = [torch.randperm(n_units, generator=gen(10 + i))[:removed].sort().values for i in range(2)]
    for block, g in zip(model.model.layers, gone):
        keep = torch.tensor([u for u in range(n_units) if u not in g.tolist()])
        assert shrink_units(block, units, n_units, keep) == len(units.rows) + 1
    shrink_config(model.config, units, n_units, n_units - removed)
    ids = torch.randint(0, 128, (2, 20), generator=gen(8))
    small, masked = _logits(model, ids), _logits(_masked_original(tiny_llama, kind, gone), ids)
    assert (small - masked).abs().max() < 1e-5
    assert (small - _logits(tiny_llama, ids)).abs().max() > 1e-3  # the units did matter


@pytest.mark.parametrize("kind,sparsity", [("mlp", 0.25), ("heads", 0.5)])
def test_driver_structured_pruning_shrinks_shapes_and_config(tiny_llama, kind, sparsity, torch_single_thread):
    cand = candidate(prune="wanda", sparsity=sparsity, structure=kind)
    made = make_candidate(tiny_llama, LLAMA, cand, _calib())
    cfg, base = made.model.config, tiny_llama.config
    layers = made.model.model.layers
    if kind == "mlp":
        assert cfg.intermediate_size == 72 and made.modules_changed == 3 * 2
        assert all(b.mlp.down_proj.weight.shape == (64, 72) and b.mlp.up_proj.weight.shape == (72, 64) for b in layers)
        kept = [(ob.mlp.gate_proj.weight[:, None, :] == b.mlp.gate_proj.weight[None]).all(-1).any(1)
                for b, ob in zip(layers, tiny_llama.model.layers)]  # which original rows are still there
    else:
        assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (2, 1, 16)
        assert made.modules_changed == 4 * 2
        assert all(b.self_attn.q_proj.weight.shape == (32, 64) for b in layers)
        assert all(b.self_attn.o_proj.weight.shape == (64, 32) for b in layers)
        kept = [torch.tensor([torch.equal(b.self_attn.k_proj.weight, ob.self_attn.k_proj.weight[g * 16 : (g + 1) * 16])
                              for g in range(2)]) for b, ob in zip(layers, tiny_llama.model.layers)]
    assert base.intermediate_size == 96 and base.num_attention_heads == 4  # the baseline's config is untouched
    assert made.weight_bytes == 4 * sum(p.numel() for p in made.model.parameters())  # the real smaller size
    assert not any(p.is_inference() for p in made.model.parameters())  # usable outside inference mode
    assert made.weight_bytes < weight_bytes(tiny_llama)[0]
    gone = [(~k).nonzero().flatten() for k in kept]
    ids = torch.randint(0, 128, (2, 20), generator=gen(9))
    masked = _logits(_masked_original(tiny_llama, kind, gone), ids)
    assert (_logits(made.model, ids) - masked).abs().max() < 1e-5


def test_structured_counts_that_remove_nothing_or_everything_are_errors(tiny_llama):
    with pytest.raises(NothingHappened, match="pruned 0"):  # 0.2 × 2 KV groups rounds to 0
        make_candidate(tiny_llama, LLAMA, candidate(prune="magnitude", sparsity=0.2, structure="heads"))
    with pytest.raises(UserError, match="all 2"):
        make_candidate(tiny_llama, LLAMA, candidate(prune="magnitude", sparsity=0.9, structure="heads"))


@pytest.mark.parametrize("quantizer", [{"quantize": "rtn"}, {"quantize": "gptq"}, {"quantize": "awq"}])
def test_prune_then_quantize_keeps_the_pruned_zeros(tiny_llama, quantizer, torch_single_thread):
    wanda = candidate(prune="wanda", sparsity=0.5)
    pruned = make_candidate(tiny_llama, LLAMA, wanda, _calib()).model
    steps = [{"prune": "wanda", "sparsity": 0.5}, {**quantizer, "bits": 4, "group_size": 32}]  # asymmetric grid
    cand = candidate(steps=steps)
    made = make_candidate(tiny_llama, LLAMA, cand, _calib())
    assert made.modules_changed == 14 + 14
    alone_cand = candidate(method=quantizer["quantize"], bits=4, group_size=32)
    alone = make_candidate(tiny_llama, LLAMA, alone_cand, _calib())
    assert (made.weight_bytes, made.quantized_params) == (alone.weight_bytes, alone.quantized_params)
    for i in range(2):
        for name in BLOCK_LINEARS:
            zero = pruned.get_submodule(f"model.layers.{i}.{name}").weight == 0
            w = made.model.get_submodule(f"model.layers.{i}.{name}").weight
            assert (w[zero] == 0).all(), name
            assert (w != 0).float().mean() > 0.4, name  # the kept weights are mostly still there


def test_structured_then_unstructured_then_quantize(tiny_llama, torch_single_thread):
    cand = candidate(steps=[{"prune": "wanda", "sparsity": 0.25, "structure": "mlp"},
                                  {"prune": "sparsegpt", "pattern": "2:4"}, {"quantize": "rtn", "bits": 8}])
    made = make_candidate(tiny_llama, LLAMA, cand, _calib())
    assert made.model.config.intermediate_size == 72
    assert made.modules_changed == 6 + 14 + 14
    nonzero = (made.model.model.layers[1].mlp.down_proj.weight != 0).reshape(64, -1, 4).sum(-1)
    assert (nonzero <= 2).all() and nonzero.float().mean() > 1.9  # int8 may round a tiny kept weight to 0
    assert torch.isfinite(_logits(made.model, torch.tensor([[1, 5, 9]]))).all()


def test_structurally_pruned_model_round_trips_through_gguf(tiny_llama, tmp_path):
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    from quantgate.models.gguf_export import write_gguf
    from test_gguf_export import reference_metadata

    cand = candidate(steps=[{"prune": "magnitude", "sparsity": 0.25, "structure": "mlp"},
                                  {"prune": "magnitude", "sparsity": 0.5, "structure": "heads"}])
    made = make_candidate(tiny_llama, LLAMA, cand).model
    meta = reference_metadata(tiny_llama, tmp_path / "meta.gguf")  # describes the unpruned model
    out = write_gguf(made, LLAMA, meta, tmp_path / "pruned.gguf")
    fields = GGUFReader(out).fields
    sizes = {k: fields[f"llama.{k}"].contents() for k in
             ("feed_forward_length", "attention.head_count", "attention.head_count_kv", "attention.key_length")}
    assert sizes == {"feed_forward_length": 72, "attention.head_count": 2, "attention.head_count_kv": 1,
                     "attention.key_length": 16}
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32)
    original = made.state_dict()
    assert all(torch.equal(t, original[name]) for name, t in back.state_dict().items())


# -- the real default model (slow) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def real():
    from quantgate.models.load import load_baseline

    return load_baseline("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def real_windows(real):
    from quantgate.evals.datasets import default_suite
    from quantgate.evals.tasks import make_windows

    return make_windows(real.tokenizer, default_suite(limit=1, cloze_items=0, seed=0).perplexity_text, 96, 2)


def _mean_kld(reference: list[torch.Tensor], model: torch.nn.Module, windows: list[list[int]]) -> float:
    from quantgate.engines.torch import TorchEngine
    from quantgate.evals.tasks import kl_divergence

    return float(torch.cat([torch.from_numpy(kl_divergence(r, lp)) for r, lp in
                            zip(reference, TorchEngine(model).token_logprobs(windows))]).mean())


@pytest.mark.slow
def test_real_model_wanda_beats_magnitude_at_half_sparsity(real, real_windows):
    from quantgate.config import CalibrationConfig
    from quantgate.engines.torch import TorchEngine
    from quantgate.evals.datasets import default_suite
    from quantgate.methods.calibrate import calibration_set

    calib = calibration_set(real.tokenizer, CalibrationConfig(samples=8, seq_len=128),
                            default_suite(limit=None, cloze_items=0, seed=0).texts())
    reference = list(TorchEngine(real.model).token_logprobs(real_windows))
    kld = {}
    for score in ("magnitude", "wanda"):
        made = make_candidate(real.model, real.arch, candidate(prune=score, sparsity=0.5), calib)
        assert made.modules_changed == 30 * 7
        down = made.model.model.layers[7].mlp.down_proj.weight
        assert int((down == 0).sum()) == down.numel() // 2
        kld[score] = _mean_kld(reference, made.model, real_windows)
    assert kld["wanda"] < 0.8 * kld["magnitude"], kld


@pytest.mark.slow
@pytest.mark.heavy
def test_real_model_structured_pruning_runs_on_llama_cpp(real, real_windows, tmp_path):
    pytest.importorskip("llama_cpp")
    from quantgate.engines.llamacpp import LlamaCppEngine
    from quantgate.engines.torch import TorchEngine
    from quantgate.evals.tasks import kl_divergence
    from quantgate.models.gguf_export import write_gguf
    from quantgate.models.load import locate_packaged

    cand = candidate(steps=[{"prune": "magnitude", "sparsity": 0.25, "structure": "mlp"},
                                  {"prune": "magnitude", "sparsity": 0.34, "structure": "heads"}])
    made = make_candidate(real.model, real.arch, cand)
    cfg = made.model.config
    assert (cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (1152, 6, 2)
    path = write_gguf(made.model, real.arch, locate_packaged("smollm2-135m-instruct"), tmp_path / "pruned.gguf")
    ours = TorchEngine(made.model).token_logprobs(real_windows)
    theirs = LlamaCppEngine(path, n_ctx=256).token_logprobs(real_windows)
    kld = torch.cat([torch.from_numpy(kl_divergence(a, b)) for a, b in zip(ours, theirs)])
    assert float(kld.mean()) < 1e-3  # the engine noise floor: llama.cpp runs the narrower model as torch does
