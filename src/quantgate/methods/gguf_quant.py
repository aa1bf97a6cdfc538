"""llama.cpp's own quantizer (exposed by llama-cpp-python): a float GGUF in, a quantized GGUF out.

The types are llama.cpp's file types; K-quants mix block formats per tensor the way llama.cpp
chooses (e.g. Q4_K_M keeps some attention/ffn_down tensors at Q6_K).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from gguf import GGUFReader

from quantgate.errors import NothingHappened, UserError

# quantgate name -> llama_cpp constant name (llama.h's llama_ftype)
GGUF_TYPES = {
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "Q3_K_M": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "Q2_K": "LLAMA_FTYPE_MOSTLY_Q2_K",
    "IQ4_XS": "LLAMA_FTYPE_MOSTLY_IQ4_XS",
}


def quantize_gguf(source: Path, out: Path, gguf_type: str, *, threads: int = 0) -> Path:
    """Quantize a float GGUF file to `gguf_type` with llama.cpp; returns `out`."""
    if gguf_type not in GGUF_TYPES:
        raise UserError(f"GGUF type '{gguf_type}': expected one of {', '.join(GGUF_TYPES)}")
    try:
        import llama_cpp
    except ImportError:
        raise UserError("GGUF quantization needs the package llama-cpp-python") from None
    if not source.is_file():
        raise UserError(f"{source}: GGUF file not found")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, GGUF_TYPES[gguf_type])
    params.nthread = threads
    out.parent.mkdir(parents=True, exist_ok=True)
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params)
    if status != 0 or not out.is_file():
        raise NothingHappened(f"llama.cpp could not quantize {source} to {gguf_type} (status {status})")
    return out


def tensor_types(path: Path) -> Counter[str]:
    """How many tensors of a GGUF file are stored in each type, e.g. {'Q8_0': 180, 'Q6_K': 31,
    'F32': 61}: a K-quant file whose rows do not divide into 256 is largely other types."""
    return Counter(t.tensor_type.name for t in GGUFReader(path).tensors)
