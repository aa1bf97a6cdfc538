"""AWQ (Lin et al. 2023): activation-aware weight quantization. Pure tensor functions.

Input channels that carry large activations matter most for the output. AWQ multiplies those
weight columns by s > 1 before quantizing (W·diag(s): their relative rounding error shrinks) and
divides the activations by s, which is folded into the operation that produces them (a norm's
weight, or the previous linear's output rows), so the float function is unchanged:
    (W·diag(s)) (x / s) = W x.
Per-channel scales come from a small grid search over s = mean|x|^α; an optional clip search then
shrinks each row-group's range where that lowers its output error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from quantgate.methods.rtn import QuantSpec, fake_quantize

SCALE_FLOOR = 1e-4  # mean|x|^α is clamped to at least this before normalising (dead channels)


@dataclass(frozen=True)
class AwqScales:
    scales: torch.Tensor  # float32 [in], > 0; all ones when alpha == 0
    alpha: float  # the chosen exponent, in {0, 1/grid, ..., (grid-1)/grid}
    error: float  # search objective at the chosen alpha
    error_at_one: float  # search objective with all scales 1 (plain RTN); error <= error_at_one


def apply_scales(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """W·diag(s): weight [out, in] with column j multiplied by scales[j] (scales [in]).
    Returns float32 [out, in]. Pair with fold_into_previous so the float function is unchanged."""
    return weight.float() * scales.float()


def fold_into_previous(prev_weight: torch.Tensor, scales: torch.Tensor, offset: float = 0.0) -> torch.Tensor:
    """Divide what produces the scaled layer's input by s, so the layer sees x / s.

    prev_weight: a norm's weight [in] (y = (offset + weight) ⊙ normalized(x); offset 1 for norms
    stored as w and applied as 1 + w, e.g. Gemma), a bias [in], or the previous linear's weight
    [in, k] (its output rows are our input channels; offset 0). scales: [in].
    Returns float32, same shape as prev_weight: (offset + row/entry j) / scales[j] - offset, so the
    effective factor offset + w is divided by s exactly (in real arithmetic).
    """
    if prev_weight.shape[0] != scales.shape[0] or prev_weight.dim() > 2:
        raise ValueError(f"cannot fold scales [{scales.shape[0]}] into a tensor of shape "
                         f"{tuple(prev_weight.shape)} (expected [in] or [in, k])")
    if offset and prev_weight.dim() != 1:
        raise ValueError("a norm offset applies to a norm's weight [in] only")
    s = scales.float() if prev_weight.dim() == 1 else scales.float().unsqueeze(1)
    return (prev_weight.float() + offset) / s - offset


def scaled_fake_quantize(weight: torch.Tensor, scales: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Q(W·diag(s))·diag(1/s): what the layer computes on x after AWQ with scales s [in], as an
    effective float32 [out, in] weight (Q = rtn.fake_quantize). With s = 1 this is plain RTN."""
    return fake_quantize(apply_scales(weight, scales), spec) / scales.float()


def search_scales(
    x: torch.Tensor, weights: Sequence[torch.Tensor], spec: QuantSpec, *, grid: int = 20
) -> AwqScales:
    """Grid-search per-input-channel AWQ scales for linears that all read x.

    x: calibration inputs [n, in] (any float dtype). weights: each [out_i, in].
    For α in {0, 1/grid, ..., (grid-1)/grid}: s_j = (mean over rows of |x_j|)^α, floored at
    SCALE_FLOOR, then divided by sqrt(max(s)·min(s)); the objective is
        Σ_i mean over [n, out_i] of (x Wᵢᵀ - x scaled_fake_quantize(Wᵢ, s, spec)ᵀ)².
    Returns the α with the lowest objective (the earliest on ties; α = 0 gives s = 1 exactly).
    """
    if grid < 1 or not weights:
        raise ValueError(f"need grid >= 1 and at least one weight, got {grid} and {len(weights)}")
    x = x.detach().float()  # [n, in]
    mean_abs = x.abs().mean(0)  # [in]
    candidates = [_scales_at(mean_abs, k / grid) for k in range(grid)]  # candidates[0]: all ones
    errors = [sum(_output_mse(x, w, scaled_fake_quantize(w, s, spec)) for w in weights) for s in candidates]
    k = min(range(grid), key=errors.__getitem__)  # the first minimum
    return AwqScales(scales=candidates[k], alpha=k / grid, error=errors[k], error_at_one=errors[0])


def _scales_at(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """mean_abs [in] ** alpha, floored at SCALE_FLOOR, divided by sqrt(max · min) -> float32 [in].
    alpha = 0 gives exactly 1 everywhere (0 ** 0 = 1)."""
    s = mean_abs.pow(alpha).clamp(min=SCALE_FLOOR)
    return s / (s.max() * s.min()).sqrt()


def search_clip(
    x: torch.Tensor, weight: torch.Tensor, spec: QuantSpec, *, grid: int = 20, max_shrink: float = 0.5
) -> torch.Tensor:
    """Clip each row-group of weight [out, in] to the range that minimises its output error on x.

    x: calibration inputs [n, in]. For each output row and column group (spec.group_size; the whole
    row when None) the range [min(w, 0), max(w, 0)] (symmetric: ±max|w|) is shrunk by ratios
    1, 1 - 1/grid, ..., down to 1 - max_shrink; the weights are clamped to it and RTN-quantized,
    and the ratio with the lowest row-group error mean_n((x_g · (w_g - q_g))²) is kept (ratio 1,
    i.e. plain RTN, on ties). Returns the clipped weight, float32 [out, in]; quantize it with rtn.
    Each row-group's error is never above RTN's (with group_size None: each output's error).
    """
    if grid < 1 or not 0 <= max_shrink < 1:
        raise ValueError(f"need grid >= 1 and 0 <= max_shrink < 1, got {grid} and {max_shrink}")
    w = weight.detach().float()  # [out, in]
    out, cols = w.shape
    g = cols if spec.group_size is None else spec.group_size
    xg = _grouped(x.detach().float(), g)  # [n, G, g], zero padded
    gram = torch.einsum("ngc,ngd->gcd", xg, xg) / xg.shape[0]  # [G, g, g] per-group x_gᵀx_g / n
    wg = _grouped(w, g)  # [out, G, g]
    hi = wg.amax(-1, keepdim=True).clamp(min=0)  # [out, G, 1]; rtn's grid always contains 0
    lo = wg.amin(-1, keepdim=True).clamp(max=0)
    if spec.symmetric:
        hi = torch.maximum(hi, -lo)
        lo = -hi
    best, best_err = wg, torch.full((out, wg.shape[1]), torch.inf, device=w.device)
    for k in range(int(max_shrink * grid + 1e-9) + 1):
        r = 1.0 - k / grid
        cand = torch.minimum(torch.maximum(wg, lo * r), hi * r)  # r = 1: wg unchanged
        flat = cand.reshape(out, -1)[:, :cols]
        d = _grouped(w - fake_quantize(flat, spec), g)  # [out, G, g] error vs the original w
        err = torch.einsum("ogc,gcd,ogd->og", d, gram, d)  # [out, G]
        better = err < best_err
        best = torch.where(better.unsqueeze(-1), cand, best)
        best_err = torch.where(better, err, best_err)
    return best.reshape(out, -1)[:, :cols].contiguous()


def _output_mse(x: torch.Tensor, w: torch.Tensor, w_q: torch.Tensor) -> float:
    """mean((x wᵀ - x w_qᵀ)²) for x [n, in], w and w_q [out, in]."""
    return (x @ (w.float() - w_q).T).pow(2).mean().item()


def _grouped(t: torch.Tensor, g: int) -> torch.Tensor:
    """[..., cols] -> [..., ceil(cols / g), g], the last group zero padded."""
    pad = -t.shape[-1] % g
    return torch.nn.functional.pad(t, (0, pad)).unflatten(-1, (-1, g))
