"""Write a loaded Llama-family model to a GGUF file (F32, F16 or BF16) with the `gguf` package.

The metadata (architecture hyper-parameters, tokenizer vocabulary, merges, pre-tokenizer, special
token ids, chat template) is copied from a reference GGUF of the same model — for the packaged
default model, the very file the baseline was read from — so llama.cpp tokenizes exactly as the
original. Tensors come from the model being written; names and the q/k row order follow the
per-architecture table in models/arch.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType

from quantgate.errors import UserError
from quantgate.models.arch import ArchInfo

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


def gguf_name(arch: ArchInfo, hf_name: str) -> str:
    """GGUF tensor name of a Hugging Face parameter name, from the architecture's table."""
    for pattern, target in arch.gguf_names:
        m = re.fullmatch(pattern, hf_name)
        if m:
            return target.format(*m.groups())
    raise UserError(f"no GGUF name for parameter '{hf_name}' in the architecture table")


def rope_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Hugging Face q/k rows [heads·d, in] -> llama.cpp's interleaved rotary order (the inverse of
    what transformers' GGUF loader undoes): per head, rows (0..d/2, d/2..d) interleave."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _copy_metadata(reader: GGUFReader, writer: GGUFWriter, arch_name: str, cfg) -> None:
    sizes = {f"{arch_name}.{key}": getattr(cfg, attr, None) for key, attr in _FROM_CONFIG.items()}
    if sizes[f"{arch_name}.attention.key_length"] is None:  # configs without head_dim
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        sizes.update({f"{arch_name}.attention.key_length": head_dim, f"{arch_name}.attention.value_length": head_dim})
    for key, value in sizes.items():
        writer.add_uint32(key, int(value))
    for field in reader.fields.values():
        if field.name.startswith(_SKIP_KEYS) or field.name in sizes:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)


def write_gguf(model: torch.nn.Module, arch: ArchInfo, metadata_from: Path, out: Path, dtype: str = "F32") -> Path:
    """Write `model` (a *ForCausalLM) to `out` as GGUF with the given tensor type; norms and other
    1-D tensors stay F32. Returns `out`."""
    if dtype not in _TYPES:
        raise UserError(f"GGUF type '{dtype}': expected one of {', '.join(_TYPES)}")
    qtype, file_type, np_dtype = _TYPES[dtype]
    reader = GGUFReader(metadata_from)
    arch_name = reader.fields["general.architecture"].contents()
    cfg = model.config
    writer = GGUFWriter(str(out), arch_name)
    _copy_metadata(reader, writer, arch_name, cfg)
    writer.add_file_type(file_type)
    tied = getattr(cfg, "tie_word_embeddings", False)
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        w = tensor.detach().float()
        if hf_name.endswith("q_proj.weight"):
            w = rope_permute(w, cfg.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            w = rope_permute(w, cfg.num_key_value_heads)
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
