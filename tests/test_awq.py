"""Tests for quantgate.methods.awq: activation-aware scales, folding, and clip search."""

from __future__ import annotations

import pytest
import torch

from quantgate.methods.awq import (
    apply_scales,
    fold_into_previous,
    scaled_fake_quantize,
    search_clip,
    search_scales,
)
from quantgate.methods.rtn import QuantSpec, fake_quantize
from conftest import gen, outlier_activations

pytestmark = pytest.mark.usefixtures("torch_single_thread")

OUTLIERS = [5, 17, 60, 101]


def _activations(n: int, cols: int, seed: int, outlier_gain: float = 20.0) -> torch.Tensor:
    """[n, cols] activations whose OUTLIERS channels are `outlier_gain` times larger."""
    return outlier_activations(n, cols, seed, OUTLIERS, outlier_gain)


def _heavy_tailed(out: int, cols: int, seed: int) -> torch.Tensor:
    """Laplace weights [out, cols]: heavier tails than a Gaussian, so the min/max range that RTN
    uses is set by a few large weights and wastes levels on the bulk."""
    u = torch.rand(2, out, cols, generator=gen(seed))
    return torch.log1p(-u[1]) - torch.log1p(-u[0])  # difference of two Exp(1); 1 - u > 0


def _output_mse(x: torch.Tensor, w: torch.Tensor, w_q: torch.Tensor) -> float:
    return (x @ w.T - x @ w_q.T).pow(2).mean().item()


def _row_group_errors(x: torch.Tensor, w: torch.Tensor, w_q: torch.Tensor, g: int) -> torch.Tensor:
    """Independent re-implementation of the clip objective: [out, n_groups] of
    mean_n((x[:, grp] @ (w - w_q)[:, grp]ᵀ)²), looping over explicit column ranges."""
    d = w - w_q
    cols = [(a, min(a + g, w.shape[1])) for a in range(0, w.shape[1], g)]
    return torch.stack([(x[:, a:b] @ d[:, a:b].T).pow(2).mean(0) for a, b in cols], dim=1)


@pytest.mark.parametrize("spec", [QuantSpec(4, None, True), QuantSpec(3, 32, False), QuantSpec(4, 50, False)])
def test_unit_scales_equal_rtn_exactly(spec):
    w = torch.randn(24, 128, generator=gen(0))
    assert torch.equal(scaled_fake_quantize(w, torch.ones(128), spec), fake_quantize(w, spec))
    found = search_scales(_activations(64, 128, seed=1), [w], spec, grid=1)  # grid 1: only α = 0
    assert found.alpha == 0.0 and torch.equal(found.scales, torch.ones(128))
    assert found.error == found.error_at_one


@pytest.mark.parametrize("bits,group_size", [(4, None), (4, 32), (3, 32), (3, None)])
def test_search_beats_rtn_on_outlier_channels(bits, group_size):
    spec = QuantSpec(bits, group_size, False)
    x = _activations(256, 128, seed=2)
    weights = [torch.randn(out, 128, generator=gen(3 + out)) for out in (32, 48)]  # e.g. q and k
    found = search_scales(x, weights, spec)
    assert found.scales.dtype == torch.float32 and found.scales.shape == (128,)
    assert torch.all(found.scales > 0) and 0 < found.alpha < 1
    assert found.error <= found.error_at_one
    # The reported objective is what the scales achieve, and RTN is what α = 0 achieves.
    recomputed = sum(_output_mse(x, w, scaled_fake_quantize(w, found.scales, spec)) for w in weights)
    rtn = sum(_output_mse(x, w, fake_quantize(w, spec)) for w in weights)
    assert recomputed == pytest.approx(found.error, rel=1e-4)
    assert rtn == pytest.approx(found.error_at_one, rel=1e-4)
    assert found.error < 0.8 * rtn
    # Held-out activations from the same distribution benefit as well.
    x_new = _activations(256, 128, seed=9)
    held_out = sum(_output_mse(x_new, w, scaled_fake_quantize(w, found.scales, spec)) for w in weights)
    assert held_out < 0.8 * sum(_output_mse(x_new, w, fake_quantize(w, spec)) for w in weights)


@pytest.mark.parametrize("seed", range(4))
def test_search_never_worse_than_unit_scales(seed):
    # No outliers: the search may well settle on α = 0, but never on something worse.
    x = torch.randn(64, 64, generator=gen(seed))
    w = torch.randn(16, 64, generator=gen(seed + 10))
    found = search_scales(x, [w], QuantSpec(3, 16, True), grid=10)
    assert found.error <= found.error_at_one
    assert found.alpha in [k / 10 for k in range(10)]


def test_search_tolerates_dead_channels():
    x = _activations(64, 128, seed=4)
    x[:, :3] = 0.0
    found = search_scales(x, [torch.randn(16, 128, generator=gen(5))], QuantSpec(4, None, False))
    assert torch.isfinite(found.scales).all() and torch.all(found.scales > 0)


def test_apply_and_fold_leave_the_float_function_unchanged():
    x = torch.randn(32, 128, generator=gen(6))
    w = torch.randn(24, 128, generator=gen(7)) / 8
    s = torch.rand(128, generator=gen(8)) * 4 + 0.25
    # (W·diag(s)) applied to x / s equals W applied to x.
    assert (apply_scales(w, s) @ (x / s).T - w @ x.T).abs().max() < 1e-5
    # Folding into the previous linear's output rows (40 -> 128) produces x / s ...
    x_in = torch.randn(32, 40, generator=gen(9))
    prev = torch.randn(128, 40, generator=gen(10)) / 8
    assert (x_in @ fold_into_previous(prev, s).T - (x_in @ prev.T) / s).abs().max() < 1e-5
    # ... and folding into a norm weight (or a bias) divides that channel's output by s.
    norm = torch.rand(128, generator=gen(11)) + 0.5
    assert ((x * fold_into_previous(norm, s)) @ apply_scales(w, s).T - (x * norm) @ w.T).abs().max() < 1e-5
    with pytest.raises(ValueError):
        fold_into_previous(torch.ones(40, 128), s)
    # a norm stored as w and applied as 1 + w (Gemma): the stored weight becomes (1 + w)/s - 1
    stored = torch.randn(128, generator=gen(12)) * 0.3
    folded = fold_into_previous(stored, s, offset=1.0)
    assert ((x * (1 + folded)) @ apply_scales(w, s).T - (x * (1 + stored)) @ w.T).abs().max() < 1e-5
    assert ((x * (1 + stored / s)) @ apply_scales(w, s).T - (x * (1 + stored)) @ w.T).abs().max() > 0.1  # w/s is wrong
    with pytest.raises(ValueError):
        fold_into_previous(prev, s, offset=1.0)  # an offset is a norm's, not a linear's


@pytest.mark.parametrize("spec", [QuantSpec(4, None, True), QuantSpec(3, None, False)])
def test_clip_per_channel_never_worse_than_rtn(spec):
    x = torch.randn(128, 96, generator=gen(12))
    w = torch.randn(32, 96, generator=gen(13))
    clipped = search_clip(x, w, spec)
    assert clipped.shape == w.shape and clipped.dtype == torch.float32
    # Per-channel: a row's group is the whole row, so each output's error is the objective.
    per_row_clip = (x @ (w - fake_quantize(clipped, spec)).T).pow(2).mean(0)
    per_row_rtn = (x @ (w - fake_quantize(w, spec)).T).pow(2).mean(0)
    assert torch.all(per_row_clip <= per_row_rtn * (1 + 1e-5))


@pytest.mark.parametrize("spec", [QuantSpec(4, 32, True), QuantSpec(3, 40, False), QuantSpec(4, None, False)])
def test_clip_helps_heavy_tailed_weights(spec):
    x = torch.randn(128, 96, generator=gen(14))
    w = _heavy_tailed(32, 96, seed=15)
    clipped = search_clip(x, w, spec)
    g = spec.group_size or 96
    err_clip = _row_group_errors(x, w, fake_quantize(clipped, spec), g)
    err_rtn = _row_group_errors(x, w, fake_quantize(w, spec), g)
    assert torch.all(err_clip <= err_rtn * (1 + 1e-4) + 1e-6)
    assert err_clip.sum() < 0.9 * err_rtn.sum()
    assert not torch.equal(clipped, w)
    # Clipping only shrinks ranges toward zero, never past the allowed shrink.
    assert torch.all(clipped.abs() <= w.abs())


def test_clip_with_no_shrink_is_plain_rtn():
    x = torch.randn(64, 64, generator=gen(17))
    w = _heavy_tailed(8, 64, seed=16)
    assert torch.equal(search_clip(x, w, QuantSpec(4, 16, True), max_shrink=0.0), w)
