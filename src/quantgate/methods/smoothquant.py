"""SmoothQuant (Xiao et al. 2022): W8A8 with the activation outliers migrated into the weights.
Pure tensor functions.

Activations have a few input channels with huge magnitudes, which wreck per-token int8
quantization; weights are easy. Dividing channel j of the activations by s_j and multiplying
column j of every linear that reads them by s_j leaves the float function unchanged
((x / s) (W·diag(s))ᵀ = x Wᵀ) and balances the two ranges:
    s_j = max|x_j|^α / max|W_:,j|^(1-α).
α = 0: s_j = 1 / max|W_:,j| (every weight column gets absmax 1; the activations keep all the
difficulty, times the weight range). α = 1: s_j = max|x_j| (every activation channel gets absmax 1;
all the difficulty moves into the weights). α = 0.5 splits it evenly: both get sqrt(max|x|·max|W|).
Weights are then int8 per-channel symmetric RTN (W8_SPEC), activations int8 per-token dynamic.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from quantgate.methods.awq import apply_scales, fold_into_previous
from quantgate.methods.rtn import QuantSpec

__all__ = [
    "W8_SPEC",
    "accumulate_absmax",
    "apply_scales",
    "fake_quantize_activations",
    "fold_into_previous",
    "smoothing_scales",
    "weight_absmax",
]

W8_SPEC = QuantSpec(bits=8, group_size=None, symmetric=True)  # int8 per output channel


def accumulate_absmax(current: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """Running per-channel max|x|: current float32 [in] (None before the first batch), x [..., in].
    Returns a new float32 [in]."""
    batch = x.detach().reshape(-1, x.shape[-1]).abs().amax(0).float()  # [in]
    return batch if current is None else torch.maximum(current, batch)


def weight_absmax(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """max |W[:, j]| over every weight [out_i, in] that reads the same input -> float32 [in]."""
    return torch.stack([w.detach().abs().amax(0).float() for w in weights]).amax(0)


def smoothing_scales(
    act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float = 0.5, eps: float = 1e-5
) -> torch.Tensor:
    """Per-input-channel smoothing factors s [in] (float32, >= eps).

    act_absmax: max|x_j| over the calibration tokens, [in]. weight_absmax: max|W[:, j]| over all
    linears reading x, [in] (see weight_absmax). Both are floored at eps, then
    s_j = act_j^α / w_j^(1-α), floored at eps. Use x / s (fold_into_previous) and W·diag(s)
    (apply_scales). α = 0: s = 1 / w; α = 1: s = act (see the module docstring).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    act = act_absmax.float().clamp(min=eps)
    w = weight_absmax.float().clamp(min=eps)
    return (act.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=eps)


def fake_quantize_activations(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Per-token dynamic symmetric fake quantization of x [..., in] (any float dtype).

    Each row over the last dim gets step = max|x_row| / (2^(bits-1) - 1); values are rounded to
    the nearest multiple of the step (codes in ±(2^(bits-1) - 1), so the error per element is at
    most half a step). Rows of zeros stay zero. Returns x's shape and dtype (float32 math).
    """
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be in 2..16, got {bits}")
    qmax = 2 ** (bits - 1) - 1
    xf = x.float()
    step = xf.abs().amax(-1, keepdim=True) / qmax  # [..., 1]
    step = torch.where(step > 0, step, torch.ones_like(step))  # zero rows: any step gives 0
    return (torch.round(xf / step).clamp(-qmax, qmax) * step).to(x.dtype)
