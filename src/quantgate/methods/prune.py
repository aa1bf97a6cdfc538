"""Pruning: which weights (or whole units) a layer can lose. Pure tensor functions.

Unstructured, per weight matrix W [out, in] (rows = output channels, columns = input channels):
  - magnitude: drop the smallest |W_ij| over the whole matrix (no calibration);
  - wanda (Sun et al. 2023): drop the smallest |W_ij| · ‖X_j‖₂ within each output row, X [n, in]
    being the layer's calibration inputs;
  - sparsegpt (Frantar & Alistarh 2023): an OBS column sweep on H = XᵀX (+ dampening) that picks
    the mask block by block and updates the weights kept to make up for those dropped.
Each takes either a `sparsity` (fraction removed; the count is round-half-up of sparsity × size,
ties go to the lower index) or an n:m pattern `nm=(n, m)`: in every m consecutive input columns
of a row keep n ("2:4" = (2, 4)). Masks are bool tensors, True = kept.

Structured: a *unit* is a set of input columns of an output projection (an MLP neuron = one
column of down_proj; a KV group = the columns of o_proj its query heads write) together with the
rows of the projections that produce them. Removing unit S adds the error X_S W_Sᵀ to that
projection's output; its importance is ‖X_S W_Sᵀ‖_F = sqrt(tr(W_S H_SS W_Sᵀ)) up to a common
factor (H ∝ XᵀX, or I without calibration: the weight norm) — for a single column, ‖X_j‖·‖W_j‖.
"""

from __future__ import annotations

import math

import torch

from quantgate.methods.gptq import _inverse_cholesky_upper

NM = tuple[int, int]  # (kept, group): keep n of every m consecutive input columns


def count_of(fraction: float, total: int) -> int:
    """round-half-up(fraction × total): how many of `total` items a fraction removes."""
    return math.floor(fraction * total + 0.5)


def _check_target(weight: torch.Tensor, sparsity: float | None, nm: NM | None) -> None:
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    if (sparsity is None) == (nm is None):
        raise ValueError("give either sparsity or nm, not both or neither")
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if nm is not None:
        n, m = nm
        if not 0 < n <= m or weight.shape[1] % m:
            raise ValueError(f"n:m pattern {n}:{m} needs 0 < n <= m and m dividing {weight.shape[1]} columns")


def lowest_mask(scores: torch.Tensor, prune: int) -> torch.Tensor:
    """Keep-mask of scores [rows, k]: False at the `prune` lowest scores of each row (ties: lower
    column index goes first)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if prune:
        keep.scatter_(1, torch.sort(scores, dim=1, stable=True).indices[:, :prune], False)
    return keep


def nm_mask(scores: torch.Tensor, nm: NM) -> torch.Tensor:
    """Keep-mask of scores [out, in]: in every group of m consecutive columns of a row, the n
    highest scores are kept (in % m == 0)."""
    n, m = nm
    out, cols = scores.shape
    return lowest_mask(scores.reshape(-1, m), m - n).reshape(out, cols)


def score_mask(scores: torch.Tensor, sparsity: float | None, nm: NM | None, *, per_row: bool) -> torch.Tensor:
    """Keep-mask of scores [out, in] by n:m pattern, or by sparsity within each row (per_row) or
    over the whole matrix."""
    if nm is not None:
        return nm_mask(scores, nm)
    flat = scores if per_row else scores.reshape(1, -1)
    return lowest_mask(flat, count_of(sparsity, flat.shape[1])).reshape(scores.shape)


def magnitude_mask(weight: torch.Tensor, sparsity: float | None = None, nm: NM | None = None) -> torch.Tensor:
    """Keep-mask [out, in] dropping the smallest |W|: exactly count_of(sparsity, out·in) over the
    whole matrix, or m - n of every m columns per row with nm."""
    _check_target(weight, sparsity, nm)
    return score_mask(weight.detach().float().abs(), sparsity, nm, per_row=False)


def act_norm_from_hessian(hessian: torch.Tensor) -> torch.Tensor:
    """‖X_j‖₂ up to a common positive factor, from H [in, in] ∝ XᵀX (gptq.accumulate_hessian):
    sqrt(diag H) [in]."""
    return hessian.diagonal().float().clamp(min=0).sqrt()


def wanda_mask(weight: torch.Tensor, act_norm: torch.Tensor, sparsity: float | None = None,
               nm: NM | None = None) -> torch.Tensor:
    """Keep-mask [out, in] by the score |W_ij| · act_norm_j (act_norm [in] = ‖X_j‖₂, any common
    scale): exactly count_of(sparsity, in) dropped in each row, or m - n of every m with nm."""
    _check_target(weight, sparsity, nm)
    if act_norm.shape != (weight.shape[1],):
        raise ValueError(f"act_norm must be [{weight.shape[1]}], got {tuple(act_norm.shape)}")
    return score_mask(weight.detach().float().abs() * act_norm.float()[None, :], sparsity, nm, per_row=True)


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float | None = None,
                    nm: NM | None = None, *, block_size: int = 128, damp: float = 0.01) -> torch.Tensor:
    """SparseGPT: the pruned weight float32 [out, in] (exact zeros where pruned) given H [in, in].

    Columns are visited in order; Hinv is the upper Cholesky factor of (H + λI)⁻¹ with
    λ = damp · mean(diag H) (gptq's retries). The mask of each block of `block_size` columns is
    chosen when the sweep reaches it, from the current (updated) weights by the OBS saliency
    w² / Hinv_jj²: the count_of(sparsity, out·block) lowest of the block, or with nm the m - n
    lowest of each m columns of a row (block_size must then be a multiple of m). A pruned
    weight's error (w - 0) / Hinv_jj is propagated to the later columns as in GPTQ.
    Dead columns (diag H == 0) get H_jj = 1 and weight 0. A constant-diagonal H (e.g. I) gives
    exactly weight · magnitude_mask(weight, ...) when one block spans all columns (or with nm).
    """
    _check_target(weight, sparsity, nm)
    if hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"hessian must be [{weight.shape[1]}, {weight.shape[1]}], got {tuple(hessian.shape)}")
    if block_size < 1 or (nm is not None and block_size % nm[1]):
        raise ValueError(f"block_size {block_size} must be >= 1 (and a multiple of m with n:m)")
    W = weight.detach().float().clone()  # [out, in], updated in place
    H = hessian.detach().float().clone()  # [in, in]
    out, cols = W.shape
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    Hinv = _inverse_cholesky_upper(H, damp)  # [in, in] upper triangular
    d = Hinv.diagonal()  # [in]
    keep = torch.ones_like(W, dtype=torch.bool)
    for b0 in range(0, cols, block_size):
        b1 = min(b0 + block_size, cols)
        # views of this block, written in place: weights, mask, Hinv, its diagonal
        W1, K1, Hinv1, d1 = W[:, b0:b1], keep[:, b0:b1], Hinv[b0:b1, b0:b1], d[b0:b1]
        err = torch.zeros(out, b1 - b0, device=W.device)
        if nm is None:  # saliency w² / Hinv_jj², ranked as |w| / Hinv_jj
            K1[:] = score_mask(W1.abs() / d1[None, :], sparsity, None, per_row=False)
        for t in range(b1 - b0):
            if nm is not None and t % nm[1] == 0:  # (a name of its own: `cols` is the width above)
                window = slice(t, t + nm[1])
                K1[:, window] = nm_mask(W1[:, window].abs() / d1[None, window], nm)
            e = W1[:, t] * ~K1[:, t] / Hinv1[t, t]  # [out]: nonzero where pruned
            W1[:, t:] -= e[:, None] * Hinv1[None, t, t:]
            err[:, t] = e
        W[:, b1:] -= err @ Hinv[b0:b1, b1:]  # lazy update of the later blocks
    return W * keep


def prune_weight(weight: torch.Tensor, score: str, hessian: torch.Tensor | None, sparsity: float | None,
                 nm: NM | None, *, damp: float = 0.01) -> torch.Tensor:
    """The pruned weight (float32 [out, in]) by `score` (magnitude | wanda | sparsegpt); wanda and
    sparsegpt need the input Hessian [in, in] (∝ XᵀX)."""
    if score == "magnitude":
        return weight.float() * magnitude_mask(weight, sparsity, nm)
    if hessian is None:
        raise ValueError(f"{score} pruning needs the layer's input Hessian")
    if score == "wanda":
        return weight.float() * wanda_mask(weight, act_norm_from_hessian(hessian), sparsity, nm)
    if score == "sparsegpt":
        return sparsegpt_prune(weight, hessian, sparsity, nm, damp=damp)
    raise ValueError(f"unknown pruning score '{score}'")


# -- structured: whole units -------------------------------------------------------------------


def unit_channels(units: torch.Tensor, width: int) -> torch.Tensor:
    """Channel indices of units (long [k]) that own `width` consecutive channels each:
    long [k · width], unit u -> u·width .. u·width + width - 1, in the units' order."""
    return (units[:, None] * width + torch.arange(width, device=units.device)[None, :]).reshape(-1)


def unit_importance(weight: torch.Tensor, n_units: int, hessian: torch.Tensor | None = None) -> torch.Tensor:
    """Importance [n_units] of the units of an output projection weight [out, in]: unit u owns the
    input columns u·w .. u·w + w - 1 (w = in / n_units). Returns sqrt(tr(W_S H_SS W_Sᵀ)) per unit S
    (∝ ‖X_S W_Sᵀ‖_F, the output error its removal adds), H [in, in] ∝ XᵀX or I when None."""
    out, cols = weight.shape
    if n_units < 1 or cols % n_units:
        raise ValueError(f"{cols} input columns do not split into {n_units} units")
    width = cols // n_units
    Ws = weight.detach().float().reshape(out, n_units, width)  # [out, units, w]
    if hessian is None:
        return Ws.pow(2).sum((0, 2)).sqrt()
    H = hessian.detach().float().reshape(n_units, width, n_units, width)
    Hs = H[torch.arange(n_units), :, torch.arange(n_units), :]  # [units, w, w] diagonal blocks
    return torch.einsum("oui,uij,ouj->u", Ws, Hs, Ws).clamp(min=0).sqrt()


def units_to_keep(importance: torch.Tensor, remove: int) -> torch.Tensor:
    """Indices (long, ascending) of the units kept after removing the `remove` least important
    (ties: the lower index goes first)."""
    if not 0 <= remove < importance.numel():
        raise ValueError(f"cannot remove {remove} of {importance.numel()} units (at least one must stay)")
    dropped = torch.sort(importance, stable=True).indices[:remove]
    keep = torch.ones(importance.numel(), dtype=torch.bool)
    keep[dropped] = False
    return keep.nonzero().flatten()
