"""Quantization-aware recovery by block-wise reconstruction: pure tensor functions.

A transformer block whose linears sit on an integer grid (an init candidate: RTN, GPTQ, AWQ) is
trained to reproduce a target output (the full-precision model's output of that block) on
cached calibration inputs. What is learned are the quantization parameters themselves, so the
weights are on the grid at every step and exactly on it at the end:

    per linear, with the init's codes q0 [out, in], zero points z [out, G] (0 when symmetric)
    and float16 scales s0 [out, G]:
        c0 = q0 - z                    integer code offsets (fixed)
        ρ  [out, G]  float32, init 0   log scale factors (learned): s = s0 · exp(ρ)
        V  [out, in] float32           rounding offsets in code units (learned only with a
                                       rounding lr; they start inside (-1/2, 1/2), see learnable)
        ŵ  = s · clamp(round_ste(c0 + V), qmin - z, qmax - z)
    round_ste rounds in the forward pass and passes gradients straight through (STE); the clamp
    keeps every code inside the grid's range. Learning ρ fits each group's step size to its
    codes on the block's real inputs (LSQ's learned step size; OmniQuant's learnable clipping
    seen from the scale's side). Learning V moves a weight to a neighbouring code when its
    offset crosses ±1/2 (AutoRound's learnable rounding). The zero points stay the init's:
    they are integer codes of the grid.

`finalize` rounds the trained scales to float16 and returns the codes as a QuantizedWeight: its
rtn.dequantize is the weight the exported checkpoint holds (export/codes.recover_codes reads the
codes back). Untrained (ρ = 0, |V| < 1/2), finalize returns the init's codes and scales bit for
bit.

Two objectives share one optimisation loop, `reconstruct` (Adam, seeded minibatches of
calibration windows, a probe before and after); it sees only a loss of (weights, windows):
- `output_error`: block by block, the squared error of the block's output to the
  full-precision block's (the driver runs the block through torch.func.functional_call);
- `distillation`: end to end, after every block was fitted, the KL divergence from the
  full-precision model's next-token distribution to the quantized model's, which fits the
  scales of all blocks jointly to what the model outputs (EfficientQAT's end-to-end stage,
  with the baseline's distribution as the target instead of the next token).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from quantgate.evals.tasks import kl_rows
from quantgate.methods.rtn import QuantizedWeight, QuantSpec, _expand

@dataclass
class LearnableWeight:
    """One linear's grid with its learnable parameters (see the module docstring)."""

    base: torch.Tensor  # float32 [out, in]: c0 = q0 - z, integer values
    scales0: torch.Tensor  # float32 [out, G]: the init's float16 scales, widened
    zeros: torch.Tensor | None  # int16 [out, G] (asymmetric) or None
    log_scale: torch.Tensor  # float32 [out, G], requires grad: ρ
    spec: QuantSpec
    # Without learnable rounding (scales only: codes fixed, 1/4 of the memory) these are None.
    offset: torch.Tensor | None = None  # float32 [out, in]: V (learned only with a rounding lr)
    low: torch.Tensor | None = None  # float32 [out, in]: qmin - z, per column (expanded from its group)
    high: torch.Tensor | None = None  # float32 [out, in]: qmax - z


# Offsets start strictly inside (-1/2, 1/2), so that round(c0 + V) = c0 holds in float32.
OFFSET_LIMIT = 0.499


def learnable(q: QuantizedWeight, start: torch.Tensor | None = None, *, rounding: bool = True) -> LearnableWeight:
    """The learnable form of a quantized weight (codes [out, in], scales [out, G]), ρ = 0.

    rounding=False: scales only, the codes fixed (no V; reconstruct then refuses a rounding lr).
    start (float [out, in], optional): the weight before quantization. V starts at its position
    inside its code's rounding cell, (start / s0 - c0), where it lies in that cell, so that
    weights near a cell's edge move first; at 0 elsewhere (codes the init moved away from the
    nearest one, e.g. by GPTQ's error compensation) and without `start`. Either way the codes
    are the init's until training moves an offset past ±1/2."""
    cols, spec = q.codes.shape[1], q.spec
    zeros = torch.zeros_like(q.scales, dtype=torch.float32) if q.zeros is None else q.zeros.float()
    z = _expand(zeros, cols, spec)  # [out, in]
    base = q.codes.float() - z
    p = LearnableWeight(base=base, scales0=q.scales.float(), zeros=q.zeros,
                        log_scale=torch.zeros(q.scales.shape, requires_grad=True), spec=spec)
    if not rounding:
        return p
    offset = torch.zeros(q.codes.shape)
    if start is not None:
        frac = start.float() / _expand(q.scales.float(), cols, spec) - base
        offset = torch.where(frac.abs() <= OFFSET_LIMIT, frac, 0.0)
    p.offset, p.low, p.high = offset.requires_grad_(True), spec.qmin - z, spec.qmax - z
    return p


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def _codes(p: LearnableWeight) -> torch.Tensor:
    """c = clamp(round(c0 + V), qmin - z, qmax - z), float32 [out, in], STE-differentiable in V
    (c0 itself without V: codes fixed)."""
    if p.offset is None:
        return p.base
    return torch.clamp(_round_ste(p.base + p.offset), p.low, p.high)


def _scales(p: LearnableWeight) -> torch.Tensor:
    """s = s0 · exp(ρ), float32 [out, G] (exactly s0 when ρ = 0)."""
    return p.scales0 * torch.exp(p.log_scale)


def weight(p: LearnableWeight) -> torch.Tensor:
    """The dequantized weight ŵ = s · c, float32 [out, in], differentiable in V (STE) and ρ."""
    return _codes(p) * _expand(_scales(p), p.base.shape[1], p.spec)


def finalize(p: LearnableWeight) -> QuantizedWeight:
    """The trained grid: integer codes in [qmin, qmax] (int16 [out, in]), scales rounded to
    float16 (kept positive), the init's zero points. rtn.dequantize of it is the final weight."""
    with torch.no_grad():
        codes = _codes(p)
        if p.zeros is not None:
            codes = codes + _expand(p.zeros.float(), codes.shape[1], p.spec)
        scales = _scales(p).to(torch.float16)
        scales = torch.where(scales > 0, scales, torch.finfo(torch.float16).tiny)
    return QuantizedWeight(codes=codes.to(torch.int16), scales=scales, zeros=p.zeros, spec=p.spec)


@dataclass(frozen=True)
class Reconstruction:
    """The loss over the probe windows before and after training, the steps taken, and whether
    the trained parameters were dropped for the init's (training raised the probe loss)."""

    loss_before: float
    loss_after: float
    steps: int
    kept_init: bool = False


# (weights by parameter name, minibatch of window indices) -> the scalar loss of those windows
WindowLoss = Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]


def output_error(forward: Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor],
                 targets: torch.Tensor) -> WindowLoss:
    """forward(params, idx) -> a block's output [b, L, D]; targets float32 [windows, L, D]. The
    loss: mean squared error to targets[idx] divided by the targets' mean square."""
    def loss(params: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
        out, target = forward(params, idx), targets[idx]
        return (out - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12)
    return loss


def distillation(student: Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor],
                 teacher: Callable[[torch.Tensor], torch.Tensor]) -> WindowLoss:
    """student(params, idx) -> logits [b, L, V]; teacher(idx) -> the full-precision model's
    log-probabilities [b, L, V] (no gradient). The loss: KL(teacher ‖ student) in nats, the
    mean over the b·L positions (the quantity the gate's KLD reports)."""
    def loss(params: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
        return kl_rows(teacher(idx), torch.log_softmax(student(params, idx).float(), dim=-1)).mean()
    return loss


def reconstruct(
    loss: WindowLoss,
    windows: int,
    weights: dict[str, LearnableWeight],
    extra: dict[str, torch.Tensor],
    *,
    steps: int,
    lr: float,
    rounding_lr: float,
    batch: int,
    seed: int,
    probe: Sequence[int],
    on_step: Callable[[int, float], None] | None = None,
) -> Reconstruction:
    """Fit `weights` (quantized linears, by parameter name) and `extra` (float parameters
    trained as they are, e.g. norm weights; leaf tensors with requires_grad) to lower
    loss(params, idx) over `windows` calibration windows (idx: long [b] of window indices).

    Each of `steps` Adam steps draws `batch` windows, sweeping a seeded permutation of all
    windows (a new one per pass). The log scales and `extra` learn at `lr`; the rounding
    offsets at `rounding_lr`, and not at all when it is 0 (then every code stays the init's).
    `probe` (window indices) is measured without gradients before and after; when training
    raised its loss, every parameter is put back as it started (kept_init). on_step(step,
    loss) after each step. Same inputs and seed: same result (on the same thread count)."""
    rng = torch.Generator().manual_seed(seed)
    offsets = [p.offset for p in weights.values() if p.offset is not None]
    if rounding_lr > 0 and len(offsets) < len(weights):
        raise ValueError("a rounding lr needs every weight made learnable with rounding=True")
    groups = [{"params": [p.log_scale for p in weights.values()] + list(extra.values()), "lr": lr}]
    if rounding_lr > 0:
        groups.append({"params": offsets, "lr": rounding_lr})
    for offset in offsets:
        offset.requires_grad_(rounding_lr > 0)
    opt = torch.optim.Adam(groups)
    start = [t.detach().clone() for g in groups for t in g["params"]]
    probe_idx = torch.tensor(list(probe))
    before = _probe_loss(loss, weights, extra, probe_idx)
    order = torch.empty(0, dtype=torch.long)
    for step in range(steps):
        if len(order) < batch:
            order = torch.cat([order, torch.randperm(windows, generator=rng)])
        idx, order = order[:batch], order[batch:]
        value = loss(_params(weights, extra), idx)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        if on_step is not None:
            on_step(step, float(value.detach()))
    if steps == 0:
        return Reconstruction(before, before, 0)
    after = _probe_loss(loss, weights, extra, probe_idx)
    if after <= before:
        return Reconstruction(before, after, steps)
    with torch.no_grad():
        for t, t0 in zip((t for g in groups for t in g["params"]), start):
            t.copy_(t0)
    return Reconstruction(before, after, steps, kept_init=True)


def _params(weights: dict[str, LearnableWeight], extra: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**{name: weight(p) for name, p in weights.items()}, **extra}


def _probe_loss(loss: WindowLoss, weights: dict[str, LearnableWeight], extra: dict[str, torch.Tensor],
                idx: torch.Tensor) -> float:
    with torch.no_grad():
        return float(loss(_params(weights, extra), idx))
