"""Write a loaded model to a GGUF file (F32, F16 or BF16) with the `gguf` package, as llama.cpp's
converter (convert_hf_to_gguf.py) would, for the architectures that have a row in models/arch.py.

Tensors come from the model being written: names from the `gguf` package's own tensor-name map for
the row's llama.cpp architecture (biases and Qwen 3's q_norm/k_norm included); q/k rows permuted
only where llama.cpp's converter permutes them (rope "permute": the Llama architecture); norms
stored as w for (1 + w) written as 1 + w (Gemma); a tied output head not written.

Metadata: copied from a reference GGUF of the same model when there is one (for the packaged
default model, the very file the baseline was read from, so llama.cpp tokenizes exactly as the
original), with the sizes a pruned model changes taken from its config. Without one, written from
the config (hyper-parameters, per-layer sliding window and rope bases) and the Hugging Face
tokenizer (tokens, merges, special ids, whether it adds BOS, chat template).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType, TokenType

from quantgate.errors import UserError
from quantgate.models.arch import ArchInfo, head_dim, layer_kinds, require_row

# Keys the writer sets itself or that describe the tensors being replaced.
_SKIP_KEYS = ("GGUF.", "general.architecture", "general.file_type", "general.quantization_version")
# Hyper-parameters written from the model's own config, not copied from the reference (a
# structurally pruned model is narrower than its reference): GGUF key after "{arch}." -> attribute.
_FROM_CONFIG = {
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",  # llama.cpp's default n_embd / n_head is wrong once heads go
    "attention.value_length": "head_dim",
}
_TYPES = {
    "F32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32, np.float32),
    "F16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16, np.float16),
    "BF16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16, None),
}


def _arch(arch: ArchInfo) -> gguf.MODEL_ARCH:
    if arch.gguf_arch is None:
        raise UserError(f"model type '{arch.model_type}': its architecture row names no llama.cpp architecture")
    return gguf.MODEL_ARCH[arch.gguf_arch]


@functools.lru_cache(maxsize=32)
def _name_map(arch: gguf.MODEL_ARCH, n_blocks: int) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(arch, n_blocks)


def gguf_name(arch: ArchInfo, hf_name: str) -> str:
    """GGUF tensor name of a Hugging Face parameter name (".weight" or ".bias"), from the gguf
    package's tensor-name map for the row's llama.cpp architecture."""
    block = re.search(r"\.(\d+)\.", hf_name)
    name = _name_map(_arch(arch), int(block.group(1)) + 1 if block else 1).get_name(
        hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise UserError(f"no GGUF name for parameter '{hf_name}' in llama.cpp's {arch.gguf_arch} tensor map")
    return name


def rope_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face q/k rows [heads·d, in] -> llama.cpp's interleaved rotary order (the inverse of
    what transformers' GGUF loader undoes): per head, rows (0..d/2, d/2..d) interleave."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def exact_length(arch: ArchInfo, config) -> int | None:
    """Tokens up to which llama.cpp's run of the written file equals transformers': the config's
    sliding window when llama.cpp's architecture runs without one (ArchInfo.gguf_sliding_window);
    None when there is no such limit."""
    window = getattr(config, "sliding_window", None)
    if window and "sliding_attention" in layer_kinds(config) and not arch.gguf_sliding_window:
        return int(window)
    return None


def gguf_tensor(arch: ArchInfo, config, hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The float32 values llama.cpp expects for a parameter: q/k rows permuted for rope
    "permute" rows, norms with the row's norm offset added (Gemma's 1 + w)."""
    w = tensor.detach().float()
    if arch.rope == "permute" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
        heads = config.num_attention_heads if hf_name.endswith("q_proj.weight") else config.num_key_value_heads
        w = rope_permute(w, heads)
    if arch.norm_offset and hf_name.endswith("norm.weight"):
        w = w + arch.norm_offset
    return w


def write_gguf(model: torch.nn.Module, arch: ArchInfo, metadata_from: Path | None, out: Path, dtype: str = "F32",
               tokenizer=None) -> Path:
    """Write `model` (a *ForCausalLM) to `out` as GGUF with the given tensor type; norms and other
    1-D tensors stay F32. Metadata from the reference GGUF `metadata_from`, else from the config
    and `tokenizer`. Returns `out`."""
    if dtype not in _TYPES:
        raise UserError(f"GGUF type '{dtype}': expected one of {', '.join(_TYPES)}")
    cfg = model.config
    require_row(arch, getattr(cfg, "model_type", ""), "writing GGUF")
    qtype, file_type, np_dtype = _TYPES[dtype]
    _check_biases(model, arch)
    if metadata_from is not None:
        reader = GGUFReader(metadata_from)
        arch_name = reader.fields["general.architecture"].contents()
        writer = GGUFWriter(str(out), arch_name)
        _copy_metadata(reader, writer, arch_name, cfg)
    else:
        if tokenizer is None:
            raise UserError("writing GGUF without a reference file needs the model's tokenizer")
        writer = GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[_arch(arch)])
        _hyperparameters(writer, arch, cfg)
        _vocabulary(writer, tokenizer, cfg.vocab_size)
    writer.add_file_type(file_type)
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    head_weight = next((f"{n}.weight" for n, m in model.named_modules() if m is head), None)
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == head_weight:
            continue  # a tied output head is the token embedding in llama.cpp
        w = gguf_tensor(arch, cfg, hf_name, tensor)
        name = gguf_name(arch, hf_name)
        if w.dim() == 1 or dtype == "F32":
            writer.add_tensor(name, w.numpy().astype(np.float32))
        elif np_dtype is not None:
            writer.add_tensor(name, w.numpy().astype(np_dtype))
        else:  # BF16: the raw upper halves of the float32 bits, tagged as BF16
            raw = w.to(torch.bfloat16).view(torch.int16).numpy()
            writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _check_biases(model: torch.nn.Module, arch: ArchInfo) -> None:
    """Linear biases llama.cpp's architecture does not read are refused, not dropped."""
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and m.bias is not None and arch.is_block_linear(name):
            if not name.endswith(tuple("." + b for b in arch.biases)):
                raise UserError(f"{name} has a bias; llama.cpp's {arch.gguf_arch} architecture as quantgate writes "
                                f"it reads biases of {', '.join(arch.biases) or 'no linear'} only")


def _copy_metadata(reader: GGUFReader, writer: GGUFWriter, arch_name: str, cfg) -> None:
    sizes = {f"{arch_name}.{key}": getattr(cfg, attr, None) for key, attr in _FROM_CONFIG.items()}
    if sizes[f"{arch_name}.attention.key_length"] is None:  # configs without head_dim
        sizes.update({f"{arch_name}.attention.key_length": head_dim(cfg),
                      f"{arch_name}.attention.value_length": head_dim(cfg)})
    for key, value in sizes.items():
        writer.add_uint32(key, int(value))
    for field in reader.fields.values():
        if field.name.startswith(_SKIP_KEYS) or field.name in sizes:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)


def _rope(cfg, kind: str) -> dict:
    """The rope parameters of an attention kind (transformers 5 keeps one dict, or one per kind)."""
    params = getattr(cfg, "rope_parameters", None) or {"rope_theta": getattr(cfg, "rope_theta", 10000.0)}
    return params.get(kind, params) if isinstance(params.get(kind), dict) else params


def _hyperparameters(writer: GGUFWriter, arch: ArchInfo, cfg) -> None:
    """The architecture's hyper-parameters from the config, as llama.cpp's converter writes them."""
    d = head_dim(cfg)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(d)
    writer.add_value_length(d)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(int(d * getattr(cfg, "partial_rotary_factor", 1.0)))
    full = _rope(cfg, "full_attention")
    writer.add_rope_freq_base(float(full["rope_theta"]))
    _rope_scaling(writer, full)
    kinds = layer_kinds(cfg)
    window = getattr(cfg, "sliding_window", None) if "sliding_attention" in kinds else None
    if window and arch.gguf_sliding_window:  # per layer, each kind with its own rope base
        writer.add_sliding_window(int(window))
        writer.add_sliding_window_pattern([k == "sliding_attention" for k in kinds])
        writer.add_rope_freq_base_swa(float(_rope(cfg, "sliding_attention")["rope_theta"]))
    if arch.gguf_arch == "PHI3":  # as llama.cpp's converter writes Phi-3 (0: no sliding window)
        writer.add_sliding_window(int(window or 0))
        writer.add_rope_scaling_orig_ctx_len(getattr(cfg, "original_max_position_embeddings", None)
                                             or cfg.max_position_embeddings)
    if getattr(cfg, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(cfg.final_logit_softcapping))
    if getattr(cfg, "attn_logit_softcapping", None):
        raise UserError("attn_logit_softcapping: llama.cpp's Gemma 3 has none; this config cannot be written")
    scalar = getattr(cfg, "query_pre_attn_scalar", None)
    if scalar is not None and scalar != d:
        raise UserError(f"query_pre_attn_scalar {scalar} != head_dim {d}: llama.cpp scales queries by "
                        "1/sqrt(head_dim) for this architecture")


def _rope_scaling(writer: GGUFWriter, params: dict) -> None:
    kind = params.get("rope_type", "default")
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
    elif kind != "default":
        raise UserError(f"rope_type '{kind}': the GGUF writer writes default and linear rope only "
                        "(llama.cpp's convert_hf_to_gguf.py writes the others)")


def _vocabulary(writer: GGUFWriter, tokenizer, n_vocab: int) -> None:
    """The tokenizer as llama.cpp's "gpt2" (BPE) vocabulary, padded with unused tokens to the
    embedding's n_vocab rows. quantgate's engines give llama.cpp token ids, so its own text
    tokenization matters only to a server fed text, where it is faithful for byte-level BPE."""
    from quantgate.evals.tasks import text_prefix

    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE":
        raise UserError(f"a {model.get('type')} tokenizer: the GGUF writer writes BPE vocabularies only "
                        "(convert the model with llama.cpp's convert_hf_to_gguf.py)")
    if len(tokenizer) > n_vocab:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens, the embedding {n_vocab} rows")
    special = set(tokenizer.all_special_ids)
    added = set(tokenizer.get_added_vocab().values())
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    types = [TokenType.CONTROL if i in special else TokenType.USER_DEFINED if i in added else TokenType.NORMAL
             for i in range(len(tokens))]
    tokens += [f"[PAD{i}]" for i in range(len(tokens), n_vocab)]
    types += [TokenType.UNUSED] * (n_vocab - len(types))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    for add, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id), (writer.add_eos_token_id,
                          tokenizer.eos_token_id), (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(bool(text_prefix(tokenizer)))  # the tokenizer's own rule
    writer.add_add_eos_token(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
