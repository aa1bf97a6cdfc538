"""Tests for quantgate.methods.apply: turning a baseline into a quantized candidate."""

from __future__ import annotations

import pytest
import torch

from quantgate.methods.registry import candidate
from quantgate.errors import NothingHappened
from quantgate.methods.apply import make_candidate, spec_of, targets, weight_bytes
from quantgate.methods.rtn import QuantSpec, fake_quantize, packed_bytes
from quantgate.models.arch import ArchInfo, arch_of

pytestmark = pytest.mark.usefixtures("torch_single_thread")

LLAMA = arch_of("llama")
BLOCK_SUFFIXES = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _expected_block_names(model) -> list[str]:
    return [f"model.layers.{i}.{s}" for i in range(model.config.num_hidden_layers) for s in BLOCK_SUFFIXES]


def _expected_bytes(model: torch.nn.Module, quantized: dict[str, QuantSpec]) -> tuple[int, int]:
    """Independent count: named_parameters() yields each (tied) tensor once; quantized ones by
    packed size, the rest 4 bytes (float32) each."""
    total = qparams = 0
    for name, p in model.named_parameters():
        module = name.rsplit(".", 1)[0]
        if module in quantized and name.endswith(".weight"):
            total += packed_bytes(tuple(p.shape), quantized[module])
            qparams += p.numel()
        else:
            assert p.dtype == torch.float32
            total += 4 * p.numel()
    return total, qparams


def test_targets_are_the_block_linears(tiny_llama):
    cand = candidate(bits=4, group_size=32)
    assert sorted(targets(tiny_llama, LLAMA, cand)) == sorted(_expected_block_names(tiny_llama))
    with_emb = targets(tiny_llama, LLAMA, candidate(bits=4, group_size=32, quantize_embeddings=True))
    assert sorted(with_emb) == sorted(_expected_block_names(tiny_llama) + ["model.embed_tokens", "lm_head"])


@pytest.mark.parametrize(
    "cand",
    [
        candidate(bits=4, group_size=32),
        candidate(bits=8),
        candidate(bits=2, group_size=64),
        candidate(bits=3, group_size=40),  # 64 and 96 columns: non-divisible groups
    ],
    ids=lambda c: c.label,
)
def test_candidate_quantizes_block_linears_only(tiny_llama, cand):
    before = _state(tiny_llama)
    result = make_candidate(tiny_llama, LLAMA, cand)

    # 7 linears per layer, each changed
    assert result.modules_changed == 7 * tiny_llama.config.num_hidden_layers == 14
    # the baseline is untouched, and the candidate is a different object
    after = _state(tiny_llama)
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert result.model is not tiny_llama

    spec = spec_of(cand)
    cand_state = result.model.state_dict()
    quantized = {n: spec for n in _expected_block_names(tiny_llama)}
    for key, value in before.items():
        module = key.rsplit(".", 1)[0]
        if module in quantized and key.endswith(".weight"):
            assert torch.equal(cand_state[key], fake_quantize(value, spec)), key
            assert not torch.equal(cand_state[key], value), key
        else:  # embeddings, lm_head, norms: untouched
            assert torch.equal(cand_state[key], value), key

    total, qparams = _expected_bytes(result.model, quantized)
    assert result.weight_bytes == total
    assert result.quantized_params == qparams == sum(
        tiny_llama.get_submodule(n).weight.numel() for n in quantized
    )
    # compressed: smaller than the float32 model
    assert result.weight_bytes < weight_bytes(tiny_llama)[0]


def test_embeddings_quantized_only_when_asked(tiny_llama):
    cand = candidate(bits=4, group_size=32, quantize_embeddings=True)
    before = _state(tiny_llama)
    result = make_candidate(tiny_llama, LLAMA, cand)
    assert result.modules_changed == 14 + 2
    spec = spec_of(cand)
    for name in ("model.embed_tokens", "lm_head"):
        got = result.model.get_submodule(name).weight
        assert torch.equal(got, fake_quantize(before[name + ".weight"], spec))
    assert all(torch.equal(before[k], v) for k, v in tiny_llama.state_dict().items())
    quantized = {n: spec for n in _expected_block_names(tiny_llama) + ["model.embed_tokens", "lm_head"]}
    assert (result.weight_bytes, result.quantized_params) == _expected_bytes(result.model, quantized)


def test_weight_bytes_of_the_baseline_is_float32_size(tiny_llama):
    n = sum(p.numel() for p in tiny_llama.parameters())
    assert weight_bytes(tiny_llama) == (4 * n, 0)


@pytest.mark.parametrize("quantize_embeddings", [False, True])
def test_tied_embeddings_counted_once(tiny_llama_tied, quantize_embeddings):
    model = tiny_llama_tied
    emb = model.model.embed_tokens.weight
    unique = {id(p): p for p in model.parameters()}
    assert weight_bytes(model)[0] == 4 * sum(p.numel() for p in unique.values())
    # parameters() skips the tied duplicate; counting it twice would add 128*64*4 bytes
    assert weight_bytes(model)[0] == 4 * (sum(p.numel() for n, p in model.named_parameters()))

    cand = candidate(bits=4, group_size=32, quantize_embeddings=quantize_embeddings)
    before = _state(model)
    result = make_candidate(model, LLAMA, cand)
    out = result.model
    assert out.lm_head.weight is out.model.embed_tokens.weight  # the copy keeps the tie
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.lm_head.weight is emb
    spec = spec_of(cand)
    quantized = {n: spec for n in _expected_block_names(model)}
    if quantize_embeddings:
        # the shared tensor is quantized once (lm_head is skipped as already done)
        assert result.modules_changed == 14 + 1
        expected = fake_quantize(before["model.embed_tokens.weight"], spec)
        assert torch.equal(out.model.embed_tokens.weight, expected)
        quantized["model.embed_tokens"] = spec
    else:
        assert result.modules_changed == 14
        assert torch.equal(out.model.embed_tokens.weight, before["model.embed_tokens.weight"])
    total, qparams = _expected_bytes(out, quantized)
    assert (result.weight_bytes, result.quantized_params) == (total, qparams)
    if quantize_embeddings:
        blocks = sum(model.get_submodule(n).weight.numel() for n in _expected_block_names(model))
        assert result.quantized_params == blocks + emb.numel()


def test_regex_matching_nothing_raises(tiny_llama):
    arch = ArchInfo(block_linears=r"transformer\.h\.\d+\.attn\.c_attn", embeddings=("wte",))
    assert targets(tiny_llama, arch, candidate(bits=4, group_size=32)) == []
    with pytest.raises(NothingHappened):
        make_candidate(tiny_llama, arch, candidate(bits=4, group_size=32))
    # embeddings named in the table that the model lacks are skipped, so this is nothing too
    with pytest.raises(NothingHappened):
        make_candidate(tiny_llama, arch, candidate(bits=4, group_size=32, quantize_embeddings=True))


def test_partial_regex_matches_full_names_only(tiny_llama):
    # fullmatch semantics: a pattern for q_proj alone picks 2 modules, not every name containing it
    arch = ArchInfo(block_linears=r"model\.layers\.\d+\.self_attn\.q_proj", embeddings=())
    result = make_candidate(tiny_llama, arch, candidate(bits=4, group_size=32))
    assert result.modules_changed == 2
    arch_prefix = ArchInfo(block_linears=r"model\.layers\.\d+", embeddings=())  # matches no Linear
    with pytest.raises(NothingHappened):
        make_candidate(tiny_llama, arch_prefix, candidate(bits=4, group_size=32))


def test_candidate_changes_outputs(tiny_llama):
    ids = torch.tensor([[1, 5, 9, 17, 33, 65, 100]])
    result = make_candidate(tiny_llama, LLAMA, candidate(bits=2, group_size=32))
    with torch.no_grad():
        base = tiny_llama(ids).logits
        cand = result.model(ids).logits
    assert not torch.allclose(base, cand)
