"""Tests for quantgate.methods.smoothquant: smoothing scales and per-token activation quantization."""

from __future__ import annotations

import pytest
import torch

from conftest import gen, outlier_activations
from quantgate.methods.rtn import fake_quantize
from quantgate.methods.smoothquant import (
    W8_SPEC,
    accumulate_absmax,
    apply_scales,
    fake_quantize_activations,
    smoothing_scales,
    weight_absmax,
)

pytestmark = pytest.mark.usefixtures("torch_single_thread")

OUTLIERS = [3, 30, 77, 90]


def _activations(n: int, cols: int, seed: int) -> torch.Tensor:
    """LLM-like activations [n, cols]: a few channels ~50x larger than the rest, in every token."""
    return outlier_activations(n, cols, seed, OUTLIERS, scale=5.0, shift=50.0)


def _w8a8(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
    """Output of a W8A8 linear on x, optionally smoothed with s: Qa(x / s) @ Qw(W·diag(s))ᵀ."""
    if s is not None:
        x, w = x / s, apply_scales(w, s)
    return fake_quantize_activations(x) @ fake_quantize(w, W8_SPEC).T


def test_smoothing_alone_leaves_the_product_unchanged():
    x = _activations(64, 128, seed=0)
    w = torch.randn(32, 128, generator=gen(1)) / 10
    s = smoothing_scales(x.abs().amax(0), weight_absmax([w]), alpha=0.5)
    ref = x @ w.T
    smoothed = (x / s) @ apply_scales(w, s).T
    assert (smoothed - ref).abs().max() < 1e-4 * ref.abs().max()


@pytest.mark.parametrize("seed", range(3))
def test_smoothing_lowers_w8a8_error_on_outlier_channels(seed):
    x = _activations(256, 128, seed=seed)
    weights = [torch.randn(out, 128, generator=gen(10 + seed + out)) / 10 for out in (48, 64)]
    s = smoothing_scales(accumulate_absmax(accumulate_absmax(None, x[:100]), x[100:]), weight_absmax(weights))
    for w in weights:
        ref = x @ w.T
        naive = (_w8a8(x, w, None) - ref).pow(2).mean()
        smooth = (_w8a8(x, w, s) - ref).pow(2).mean()
        assert smooth < 0.5 * naive


def test_scale_formula_and_its_endpoints():
    act = torch.tensor([4.0, 0.25, 100.0, 0.0])
    w = torch.tensor([0.5, 2.0, 0.01, 1.0])
    # α = 0.5: s = sqrt(act / w); both sides end up with sqrt(act · w).
    half = smoothing_scales(act, w, alpha=0.5)
    torch.testing.assert_close(half[:3], (act[:3] / w[:3]).sqrt())
    torch.testing.assert_close((act / half)[:3], (w * half)[:3])
    # α = 0: s = 1 / w (weights normalised to absmax 1); α = 1: s = act (activations to absmax 1).
    torch.testing.assert_close(smoothing_scales(act, w, alpha=0.0), 1.0 / w)
    torch.testing.assert_close(smoothing_scales(act, w, alpha=1.0)[:3], act[:3])
    # A channel that never fires is clamped away from zero, not a zero scale.
    assert torch.all(smoothing_scales(act, w, alpha=1.0) > 0)
    assert smoothing_scales(act, torch.zeros(4), alpha=0.5).isfinite().all()
    with pytest.raises(ValueError):
        smoothing_scales(act, w, alpha=1.5)


def test_weight_and_activation_absmax():
    a = torch.tensor([[1.0, -3.0], [0.5, 2.0]])
    b = torch.tensor([[-2.0, 1.0]])
    torch.testing.assert_close(weight_absmax([a, b]), torch.tensor([2.0, 3.0]))
    running = accumulate_absmax(accumulate_absmax(None, a), b.reshape(1, 1, 2))  # any [..., in]
    torch.testing.assert_close(running, torch.tensor([2.0, 3.0]))


@pytest.mark.parametrize("bits", [4, 8])
def test_activation_error_is_at_most_half_a_step(bits):
    x = _activations(64, 128, seed=5).reshape(4, 16, 128)  # [batch, seq, in]: rows are tokens
    q = fake_quantize_activations(x, bits)
    assert q.shape == x.shape and q.dtype == x.dtype
    step = x.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
    assert torch.all((q - x).abs() <= step / 2 * (1 + 1e-5))
    # Every token uses its own step: q is an integer multiple of it, within the code range.
    codes = q / step
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-3)
    assert codes.abs().max() <= 2 ** (bits - 1) - 1 + 1e-3


def test_zero_rows_stay_zero_and_dtype_is_kept():
    x = torch.randn(5, 16, generator=gen(6))
    x[2] = 0.0
    q = fake_quantize_activations(x)
    assert torch.equal(q[2], torch.zeros(16)) and torch.isfinite(q).all()
    half = fake_quantize_activations(x.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16 and torch.equal(half[2], torch.zeros(16, dtype=torch.bfloat16))
