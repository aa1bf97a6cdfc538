"""llama.cpp's own quantizer (exposed by llama-cpp-python): a float GGUF in, a quantized GGUF out.

The types are llama.cpp's file types; K-quants mix block formats per tensor the way llama.cpp
chooses (e.g. Q4_K_M keeps some attention/ffn_down tensors at Q6_K).
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader

from quantgate.methods.registry import GGUF_TYPE_BITS
from quantgate.errors import NothingHappened, NotSupportedYet, UserError
from quantgate.methods.calibrate import CalibrationSet
from quantgate.models.arch import ArchInfo
from quantgate.models.gguf_export import gguf_name, write_gguf
from quantgate.models.load import Baseline, cache_root

# quantgate name -> llama_cpp constant name (llama.h's llama_ftype), for every type the config allows
GGUF_TYPES = {t: f"LLAMA_FTYPE_MOSTLY_{t}" for t in GGUF_TYPE_BITS}


def quantize_gguf(source: Path, out: Path, gguf_type: str, *, threads: int = 0,
                  imatrix: Mapping[str, np.ndarray] | None = None) -> Path:
    """Quantize a float GGUF file to `gguf_type` with llama.cpp; returns `out`. `imatrix` maps
    GGUF tensor names to float32 [in_features] importances (mean squared input per column):
    llama.cpp then weights each column's rounding error by it when choosing scales."""
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
    keep = _imatrix_array(llama_cpp, imatrix) if imatrix else None  # must outlive the call
    if keep is not None:
        params.imatrix = ctypes.cast(keep[0], ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    with _native_output_to(out.parent / "llama-quantize.log"):
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params)
    if status != 0 or not out.is_file():
        raise NothingHappened(f"llama.cpp could not quantize {source} to {gguf_type} (status {status})")
    return out


def tensor_types(path: Path) -> Counter[str]:
    """How many tensors of a GGUF file are stored in each type, e.g. {'Q8_0': 180, 'Q6_K': 31,
    'F32': 61}: a K-quant file whose rows do not divide into 256 is largely other types."""
    return Counter(t.tensor_type.name for t in GGUFReader(path).tensors)


@contextmanager
def _native_output_to(log: Path) -> Iterator[None]:
    """Send what native code prints on stdout/stderr (llama.cpp's per-tensor quantization log)
    to `log` instead of the terminal."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(log, "wb") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def _imatrix_array(llama_cpp, imatrix: Mapping[str, np.ndarray]) -> tuple:
    """A NULL-terminated C array of llama_model_imatrix_data over `imatrix`, plus the Python
    objects its pointers point into (the caller keeps them alive during quantization)."""
    names = [name.encode() for name in imatrix]
    data = [np.ascontiguousarray(v, dtype=np.float32) for v in imatrix.values()]
    entries = (llama_cpp.llama_model_imatrix_data * (len(names) + 1))()
    for entry, name, values in zip(entries, names, data):
        entry.name = name
        entry.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entry.size = values.size
    return entries, names, data


def column_importance(x: torch.Tensor) -> torch.Tensor:
    """Importance of each input column of a linear layer: mean of x² over rows.
    x: [rows, in_features] inputs the layer saw -> float64 [in_features]."""
    return x.double().pow(2).mean(0)


def importance_matrix(model: torch.nn.Module, arch: ArchInfo, windows: torch.Tensor,
                      batch: int = 8) -> dict[str, np.ndarray]:
    """Per block linear (by GGUF tensor name): column_importance of its inputs over the
    calibration windows (long [samples, seq_len]), averaged over every token."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook_for(name: str) -> Callable:
        def hook(_module: torch.nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + column_importance(x) * x.shape[0]
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    with _hooks(model, arch, hook_for), torch.no_grad():
        for i in range(0, windows.shape[0], batch):
            model(windows[i : i + batch])
    if not sums:
        raise NothingHappened("importance matrix: no block linear saw any input")
    return {gguf_name(arch, f"{name}.weight"): (sums[name] / counts[name]).float().numpy() for name in sums}


@contextmanager
def _hooks(model: torch.nn.Module, arch: ArchInfo, hook_for: Callable) -> Iterator[None]:
    handles = [m.register_forward_pre_hook(hook_for(name)) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and arch.is_block_linear(name)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def float_gguf(baseline: Baseline) -> Path:
    """The baseline written as an F32 GGUF, cached by the weights' sha256: metadata (tokenizer,
    chat template) from its source GGUF when it was loaded from one, else from its config and
    tokenizer (models/gguf_export.py)."""
    source = Path(baseline.source)
    if baseline.digest == "unknown":
        raise NotSupportedYet("serving.engine llamacpp for a hub id (its weights have no local files to "
                              "identify the GGUF by); give model.base as a local directory or .gguf file")
    out = _cache_dir(baseline) / "F32.gguf"
    if not out.is_file():
        reference = source if source.suffix == ".gguf" else None
        _finish(lambda tmp: write_gguf(baseline.model, baseline.arch, reference, tmp, tokenizer=baseline.tokenizer),
                out)
    return out


def quantized_gguf(baseline: Baseline, gguf_type: str, calib: CalibrationSet | None = None) -> Path:
    """`float_gguf(baseline)` quantized by llama.cpp to `gguf_type`, with an importance matrix
    from the calibration windows when `calib` is given; cached by (weights, type, calibration)."""
    suffix = f"-imatrix-{calib.digest[:12]}" if calib is not None else ""
    out = _cache_dir(baseline) / f"{gguf_type}{suffix}.gguf"
    if not out.is_file():
        source = float_gguf(baseline)
        imatrix = importance_matrix(baseline.model, baseline.arch, calib.windows) if calib is not None else None
        _finish(lambda tmp: quantize_gguf(source, tmp, gguf_type, imatrix=imatrix), out)
    return out


def _cache_dir(baseline: Baseline) -> Path:
    return cache_root() / "gguf" / baseline.digest[:16]


def _finish(write: Callable[[Path], object], out: Path) -> None:
    """Write to a temporary name beside `out`, then rename: a killed run never leaves a
    half-written file under the final name."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
