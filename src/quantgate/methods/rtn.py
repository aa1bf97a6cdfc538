"""Round-to-nearest (RTN) integer quantization of a weight matrix: pure tensor functions.

Grid. Asymmetric b-bit: codes q in [0, 2^b - 1], w ≈ (q - z) * s, with the range widened to include
0 so the integer zero point z lies in the code range. Symmetric b-bit: codes in
[-(2^(b-1) - 1), 2^(b-1) - 1], w ≈ q * s (the most negative code is unused, as is customary).
Scales are stored in float16; they are rounded to float16 *before* the codes are computed, so the
fake-quantized weights are exactly what a packed checkpoint holds.

Groups run along the input dimension (columns). When the group size does not divide the number of
columns, the last group is shorter (e.g. 576 = 9 × 64, but 576 with group 100 gives 5 × 100 + 76).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCALE_BYTES = 2  # float16 scales


@dataclass(frozen=True)
class QuantSpec:
    bits: int  # 2..8
    group_size: int | None  # columns per group; None = one group per output row
    symmetric: bool

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be in 2..8, got {self.bits}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1


@dataclass(frozen=True)
class QuantizedWeight:
    codes: torch.Tensor  # int16 [out, in], values in [spec.qmin, spec.qmax]
    scales: torch.Tensor  # float16 [out, n_groups]
    zeros: torch.Tensor | None  # int16 [out, n_groups] (asymmetric) or None (symmetric)
    spec: QuantSpec


def n_groups(in_features: int, spec: QuantSpec) -> int:
    return 1 if spec.group_size is None else math.ceil(in_features / spec.group_size)


def _group_bounds(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group min and max of w [out, in] -> two tensors [out, n_groups]. Padding is ignored."""
    out, cols = w.shape
    g = cols if spec.group_size is None else spec.group_size
    pad = -cols % g
    lo = torch.nn.functional.pad(w, (0, pad), value=math.inf).view(out, -1, g).amin(-1)
    hi = torch.nn.functional.pad(w, (0, pad), value=-math.inf).view(out, -1, g).amax(-1)
    return lo, hi


def _expand(per_group: torch.Tensor, cols: int, spec: QuantSpec) -> torch.Tensor:
    """[out, n_groups] -> [out, cols], each group's value repeated over its columns."""
    g = cols if spec.group_size is None else spec.group_size
    return per_group.repeat_interleave(g, dim=1)[:, :cols]


def _fp16_at_least(x: torch.Tensor) -> torch.Tensor:
    """Round x (float32, > 0) to float16, rounding up where nearest rounding went down, so a
    scale never shrinks below what the range needs (which would clip the extreme weight)."""
    h = x.to(torch.float16)
    up = torch.nextafter(h, torch.full_like(h, math.inf))  # next float16 (not float32) up
    h = torch.where(h.float() < x, up, h)
    return torch.where(h > 0, h, torch.finfo(torch.float16).tiny)


def compute_scales(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (float16 [out, n_groups]) and zero points (int16 [out, n_groups] or None) for w [out, in]."""
    lo, hi = _group_bounds(w.float(), spec)
    if spec.symmetric:
        absmax = torch.maximum(lo.abs(), hi.abs())
        return _fp16_at_least(absmax / spec.qmax), None
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    scales = _fp16_at_least((hi - lo) / spec.qmax)
    zeros = torch.round(-lo / scales.float()).clamp(0, spec.qmax).to(torch.int16)
    return scales, zeros


def quantize_with(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, spec: QuantSpec
) -> QuantizedWeight:
    """Codes of w [out, in] on a given grid (scales/zeros [out, n_groups]): round to nearest, clamp."""
    cols = w.shape[1]
    s = _expand(scales.float(), cols, spec)
    q = torch.round(w.float() / s)
    if zeros is not None:
        q = q + _expand(zeros.float(), cols, spec)
    codes = q.clamp(spec.qmin, spec.qmax).to(torch.int16)
    return QuantizedWeight(codes=codes, scales=scales, zeros=zeros, spec=spec)


def quantize(w: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """RTN-quantize a weight matrix w [out, in] (any float dtype) with min/max scales."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    scales, zeros = compute_scales(w, spec)
    return quantize_with(w, scales, zeros, spec)


def dequantize(q: QuantizedWeight) -> torch.Tensor:
    """float32 [out, in] weights represented by q."""
    cols = q.codes.shape[1]
    codes = q.codes.float()
    if q.zeros is not None:
        codes = codes - _expand(q.zeros.float(), cols, q.spec)
    return codes * _expand(q.scales.float(), cols, q.spec)


def fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """quantize -> dequantize, returned in w's dtype."""
    return dequantize(quantize(w, spec)).to(w.dtype)


def packed_bytes(shape: tuple[int, int], spec: QuantSpec) -> int:
    """Exact bytes of a packed checkpoint of a [out, in] weight: codes at `bits` per weight, each
    row padded to whole bytes, float16 scales, and b-bit zero points (asymmetric) packed per row."""
    out, cols = shape
    groups = n_groups(cols, spec)
    codes = out * math.ceil(cols * spec.bits / 8)
    scales = out * groups * SCALE_BYTES
    zeros = 0 if spec.symmetric else out * math.ceil(groups * spec.bits / 8)
    return codes + scales + zeros
