"""GPTQ (Frantar et al. 2022): quantize a weight matrix column by column, spreading each column's
rounding error over the columns not yet quantized so the layer *output* error on calibration
activations stays small. Pure tensor functions; the grid is rtn's (same codes, scales, zeros).

Notation (inside functions): W [out, in] weights, H [in, in] = 2/n · Σ xᵀx the Hessian of the
layer-output squared error, Hinv the upper Cholesky factor of H⁻¹ (after dampening).
"""

from __future__ import annotations

import dataclasses

import torch

from quantgate.methods.rtn import (
    QuantizedWeight,
    QuantSpec,
    compute_scales,
    dequantize,
    n_groups,
    quantize_with,
)

DAMP_RETRIES = 4  # Cholesky attempts; the dampening grows ×10 after each failure


class HessianError(RuntimeError):
    """The dampened Hessian stayed not positive definite (or not finite) after every retry."""


def accumulate_hessian(
    H: torch.Tensor | None, x: torch.Tensor, n_seen: int
) -> tuple[torch.Tensor, int]:
    """Fold a batch of layer inputs into the running Hessian H = 2/n · Σ xᵀx.

    H: float32 [in, in] for the n_seen rows seen so far, or None before the first batch.
    x: the layer's input activations [..., in], any float dtype; every row of the flattened
       [-1, in] view counts as one sample.
    Returns (a new float32 [in, in] H over n_seen + rows(x) rows, that row count). H is not
    modified. Feeding the rows in any chunking gives 2/n · XᵀX of all rows (up to rounding).
    """
    x = x.detach().reshape(-1, x.shape[-1]).float()  # [m, in]
    total = n_seen + x.shape[0]
    if H is None:
        H = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    if total == 0:
        return H.clone(), 0
    # H_new = n_seen/total · H + 2/total · xᵀx
    return torch.addmm(H, x.T, x, beta=n_seen / total, alpha=2.0 / total), total


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    keep: torch.Tensor | None = None,
) -> QuantizedWeight:
    """GPTQ-quantize weight [out, in] (any float dtype) given hessian [in, in] (float, PSD).

    Columns are quantized one at a time (in order, or by descending diag(H) with act_order; the
    sort is stable); each column's rounding error is propagated to the later columns through Hinv,
    applied lazily once per block of `block_size` columns. λ = damp · mean(diag H) is added to the
    diagonal; if the Cholesky fails, damp grows ×10 (DAMP_RETRIES attempts) before HessianError.
    Dead columns (diag H == 0: the input channel was always 0) get H_jj = 1 and weight 0.

    Groups are always the contiguous column groups of the original order (column j is in group
    j // group_size). A group's scales/zeros come from rtn.compute_scales over that group's
    columns as they are (error-updated) when the traversal first reaches any of its columns.

    Returns a QuantizedWeight in the original column order (dequantize with rtn.dequantize).
    A diagonal H with a positive diagonal (e.g. I) gives exactly rtn.quantize(weight, spec).

    keep (bool [out, in], optional; a pruning mask): where False the code of 0 is stored (0 is on
    every grid here: symmetric code 0, asymmetric the integer zero point), the change is
    propagated like a rounding error, and the weight is left out of its group's min/max.
    """
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"expected weight [out, in] and hessian [in, in], got {tuple(weight.shape)} "
                         f"and {tuple(hessian.shape)}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    W = weight.detach().float().clone()  # [out, in], updated in place with propagated errors
    H = hessian.detach().float().clone()  # [in, in]
    out, cols = W.shape
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    # perm[p] = original column at traversal position p; inv[j] = position of original column j.
    perm = torch.arange(cols, device=W.device)
    if act_order:
        perm = torch.sort(-H.diagonal(), stable=True).indices
    inv = torch.argsort(perm)
    W, H = W[:, perm], H[perm][:, perm]
    kept = None if keep is None else keep[:, perm].to(W.device)  # bool [out, in] by position
    Hinv = _inverse_cholesky_upper(H, damp)  # [in, in] upper triangular, positions as in W

    g = cols if spec.group_size is None else spec.group_size
    group_at = (perm // g).tolist()  # original group of the column at each position
    col_spec = dataclasses.replace(spec, group_size=None)  # one group = the columns it is given
    scales = torch.empty(out, n_groups(cols, spec), dtype=torch.float16, device=W.device)
    zeros = None if spec.symmetric else torch.empty_like(scales, dtype=torch.int16)
    have_scale = [False] * scales.shape[1]
    codes = torch.empty(out, cols, dtype=torch.int16, device=W.device)  # by position

    for b0 in range(0, cols, block_size):
        b1 = min(b0 + block_size, cols)
        err = torch.zeros(out, b1 - b0, device=W.device)  # scaled errors of this block's columns

        def current(pos: torch.Tensor | int, t: int) -> torch.Tensor:
            """Weights at positions `pos` (>= b0 + t) with this block's first t errors applied."""
            return W[:, pos] - err[:, :t] @ Hinv[b0 : b0 + t, pos]

        for t, p in enumerate(range(b0, b1)):
            grp = group_at[p]
            if not have_scale[grp]:
                pos = inv[grp * g : (grp + 1) * g]
                s, z = compute_scales(current(pos, t) * (1.0 if kept is None else kept[:, pos]), col_spec)  # [out, 1]
                scales[:, grp : grp + 1] = s
                if zeros is not None:
                    zeros[:, grp : grp + 1] = z
                have_scale[grp] = True
            w = current(p, t).unsqueeze(1)  # [out, 1]
            q = quantize_with(w, scales[:, grp : grp + 1],
                              None if zeros is None else zeros[:, grp : grp + 1], col_spec)
            if kept is not None:  # pruned: the code of exactly 0
                zero = 0 if zeros is None else zeros[:, grp : grp + 1]
                q = dataclasses.replace(q, codes=torch.where(kept[:, p : p + 1], q.codes, zero).to(torch.int16))
            codes[:, p] = q.codes[:, 0]
            err[:, t] = (w - dequantize(q))[:, 0] / Hinv[p, p]
        W[:, b1:] -= err @ Hinv[b0:b1, b1:]  # lazy batch update of the later blocks

    return QuantizedWeight(codes=codes[:, inv], scales=scales, zeros=zeros, spec=spec)


def _inverse_cholesky_upper(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹ (so (H + λI)⁻¹ = UᵀU), H float32 [in, in] with a
    positive diagonal, λ = damp · mean(diag H); retries with damp ×10 (at least 0.01)."""
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    mean_diag = H.diagonal().mean()
    tried = []
    for _ in range(DAMP_RETRIES):
        L, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0 and torch.isfinite(U).all():
                return U
        tried.append(damp)
        damp = max(damp * 10, 0.01)
    raise HessianError(f"GPTQ: the Hessian is not positive definite even with damp {tried} "
                       f"(× mean diagonal {mean_diag.item():.3g}); check the calibration activations")
