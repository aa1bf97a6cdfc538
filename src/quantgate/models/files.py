"""Model files checked before a loader reads them, so that a bad file is a one-line UserError
naming it rather than a traceback from deep inside transformers or the gguf reader:

  - a GGUF file: its magic, then its whole header and tensor table as the gguf package reads
    them (a truncated or corrupt file fails there);
  - a Hugging Face directory: config.json (UTF-8 JSON with a model_type that transformers
    implements; quantgate's own rows, models/arch.py, are asked later, by what needs them), no
    custom code (auto_map: quantgate never runs a model's own code, trust_remote_code), and every
    .safetensors file's header and coverage.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import TYPE_CHECKING

from quantgate import readers
from quantgate.errors import UserError

if TYPE_CHECKING:
    import gguf

GGUF_MAGIC = b"GGUF"
CODE_FILES = ("config.json", "tokenizer_config.json")  # where auto_map names a model's own code


def check_gguf(path: Path) -> gguf.GGUFReader:
    """The file's GGUF reader; UserError when it is not a complete GGUF file."""
    import gguf

    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise UserError(f"{path}: not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})")
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, IndexError, KeyError, struct.error, EOFError, OverflowError) as e:
        raise UserError(f"{path}: truncated or corrupt GGUF file ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:120]})") from None


def check_hf_dir(directory: Path) -> None:
    """Refuse a Hugging Face model directory quantgate cannot load as plain weights."""
    config = readers.read_json(directory / "config.json", "model config (config.json)")
    if not isinstance(config, dict):
        raise UserError(f"{directory / 'config.json'}: expected a JSON object")
    for name in CODE_FILES:
        path = directory / name
        data = config if name == "config.json" else readers.read_json(path) if path.is_file() else {}
        if isinstance(data, dict) and data.get("auto_map"):
            raise UserError(f"{path}: the model needs its own code (auto_map, trust_remote_code); quantgate does "
                            "not run code shipped with a model")
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise UserError(f"{directory / 'config.json'}: no 'model_type' (which architecture is it?)")
    from transformers import CONFIG_MAPPING, __version__

    if model_type not in CONFIG_MAPPING:  # refused here, before any weights are read
        raise UserError(f"{directory / 'config.json'}: model_type '{model_type}' is no architecture transformers "
                        f"{__version__} implements (and quantgate does not run a model's own code)")
    for weights in sorted(directory.glob("*.safetensors")):
        check_safetensors(weights)


def check_safetensors(path: Path) -> None:
    """Refuse a .safetensors file whose header is malformed or does not cover the file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except SafetensorError as e:
        raise UserError(f"{path}: not a valid safetensors file ({' '.join(str(e).split())})") from None


def gguf_params(path: Path) -> float:
    """Parameters in a GGUF file (from its tensor table; nothing is dequantized)."""
    return float(sum(int(t.n_elements) for t in check_gguf(path).tensors))


def safetensors_params(directory: Path) -> float:
    """Parameters in a directory's .safetensors files (from their headers)."""
    import math

    from safetensors import safe_open

    total = 0
    for weights in sorted(directory.glob("*.safetensors")):
        with safe_open(str(weights), framework="pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return float(total)
