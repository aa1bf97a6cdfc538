"""Writing models to GGUF: names, q/k row order and metadata survive a round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFWriter
from transformers import AutoModelForCausalLM

from quantgate.errors import UserError
from quantgate.models.arch import arch_of
from quantgate.models.gguf_export import gguf_name, rope_permute, write_gguf


def reference_metadata(model: torch.nn.Module, path: Path) -> Path:
    """A metadata-only GGUF describing the tiny Llama (what a model's original GGUF provides)."""
    cfg = model.config
    w = GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_chat_template("{{ messages[0]['content'] }}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tiny_model_round_trips_through_transformers_gguf_loader(tiny_llama, tmp_path):
    meta = reference_metadata(tiny_llama, tmp_path / "meta.gguf")
    out = write_gguf(tiny_llama, arch_of("llama"), meta, tmp_path / "tiny-f32.gguf")
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32)
    original = tiny_llama.state_dict()
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    fields = GGUFReader(out).fields
    assert fields["general.name"].contents() == "tiny"  # metadata copied
    assert fields["tokenizer.chat_template"].contents() == "{{ messages[0]['content'] }}"
    assert fields["general.file_type"].contents() == 0  # ALL_F32


def test_f16_keeps_norms_in_f32(tiny_llama, tmp_path):
    meta = reference_metadata(tiny_llama, tmp_path / "meta.gguf")
    out = write_gguf(tiny_llama, arch_of("llama"), meta, tmp_path / "tiny-f16.gguf", dtype="F16")
    types = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.attn_q.weight"] == "F16"
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32)
    q = tiny_llama.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(back.model.layers[0].self_attn.q_proj.weight, q.half().float())


def test_rope_permute_interleaves_halves_per_head():
    d, heads = 4, 2
    w = torch.arange(heads * d, dtype=torch.float32).unsqueeze(1)  # rows 0..7, one column
    # per head, rows (0, 1 | 2, 3) -> (0, 2, 1, 3)
    assert rope_permute(w, heads).squeeze(1).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_unknown_parameter_and_type_are_errors(tiny_llama, tmp_path):
    with pytest.raises(UserError, match="no GGUF name"):
        gguf_name(arch_of("llama"), "model.layers.0.mystery.weight")
    with pytest.raises(UserError, match="GGUF type"):
        write_gguf(tiny_llama, arch_of("llama"), tmp_path / "x.gguf", tmp_path / "y.gguf", dtype="Q5_X")


def test_values_are_written_as_float32_numpy(tiny_llama, tmp_path):
    meta = reference_metadata(tiny_llama, tmp_path / "meta.gguf")
    out = write_gguf(tiny_llama, arch_of("llama"), meta, tmp_path / "t.gguf")
    emb = next(t for t in GGUFReader(out).tensors if t.name == "token_embd.weight")
    np.testing.assert_array_equal(np.asarray(emb.data), tiny_llama.model.embed_tokens.weight.detach().numpy())
