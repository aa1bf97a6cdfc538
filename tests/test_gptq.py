"""Tests for quantgate.methods.gptq: GPTQ error-compensating quantization (pure tensor functions)."""

from __future__ import annotations

import pytest
import torch

from quantgate.methods.gptq import HessianError, accumulate_hessian, gptq_quantize
from quantgate.methods.rtn import QuantSpec, dequantize, quantize

pytestmark = pytest.mark.usefixtures("torch_single_thread")

# (in_features, group_size): per-row, divisible, non-divisible (130 = 2*64 + 2, 130 = 18*7 + 4).
GROUPINGS = ((130, None), (128, 32), (130, 64), (130, 7))


def _weight(out: int, cols: int, seed: int) -> torch.Tensor:
    return torch.randn(out, cols, generator=torch.Generator().manual_seed(seed))


def _activations(n: int, cols: int, seed: int) -> torch.Tensor:
    """Correlated activations [n, cols]: a low-rank shared component plus noise, uneven scales."""
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randn(n, 8, generator=gen) @ torch.randn(8, cols, generator=gen)
    scale = torch.rand(cols, generator=gen) * 2 + 0.2
    return (shared + 0.5 * torch.randn(n, cols, generator=gen)) * scale


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return 2.0 / x.shape[0] * x.T @ x


def _output_error(w: torch.Tensor, w_q: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)ᵀ): the layer-output squared error the Hessian measures."""
    d = w - w_q
    return torch.trace(d @ H @ d.T).item()


def _assert_same(a, b) -> None:
    assert torch.equal(a.codes, b.codes)
    assert torch.equal(a.scales, b.scales)
    assert (a.zeros is None and b.zeros is None) or torch.equal(a.zeros, b.zeros)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("cols,group_size", GROUPINGS)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_identity_hessian_equals_rtn(bits, cols, group_size, symmetric):
    spec = QuantSpec(bits, group_size, symmetric)
    w = _weight(24, cols, seed=bits)
    got = gptq_quantize(w, 3.0 * torch.eye(cols), spec, block_size=16)
    _assert_same(got, quantize(w, spec))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("cols,group_size", GROUPINGS)
def test_diagonal_hessian_with_act_order_equals_rtn(cols, group_size, symmetric):
    # A diagonal H propagates no error, so even in a scrambled traversal order every group keeps
    # its contiguous columns and its RTN scale: the result is RTN, in the original column order.
    spec = QuantSpec(3, group_size, symmetric)
    w = _weight(24, cols, seed=cols)
    H = torch.diag(torch.rand(cols, generator=torch.Generator().manual_seed(1)) + 0.1)
    _assert_same(gptq_quantize(w, H, spec, block_size=16, act_order=True), quantize(w, spec))


@pytest.mark.parametrize("group_size", [None, 32, 7])
def test_act_order_is_identity_when_the_diagonal_is_constant(group_size):
    # A correlation matrix (unit diagonal) times c: correlated, but every diag(H) entry ties, so the
    # stable sort keeps the original order.
    x = _activations(256, 96, seed=1)
    cov = x.T @ x
    d = cov.diagonal().sqrt()
    H = 2.5 * cov / d[:, None] / d[None, :]
    H.diagonal().fill_(2.5)
    spec = QuantSpec(4, group_size, False)
    w = _weight(16, 96, seed=2)
    _assert_same(gptq_quantize(w, H, spec, act_order=True), gptq_quantize(w, H, spec))


def test_act_order_equals_plain_gptq_on_presorted_columns():
    # Per-channel: act_order on (W, H) is plain GPTQ on columns sorted by descending diag(H).
    x = _activations(256, 64, seed=3)
    H = _hessian(x)
    w = _weight(16, 64, seed=4)
    spec = QuantSpec(3, None, True)
    perm = torch.sort(-H.diagonal(), stable=True).indices
    plain = gptq_quantize(w[:, perm], H[perm][:, perm], spec)
    ordered = gptq_quantize(w, H, spec, act_order=True)
    assert torch.equal(ordered.codes[:, perm], plain.codes)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gptq_beats_rtn_on_layer_output_error(seed, bits, group_size, act_order):
    x = _activations(512, 128, seed=seed)
    H = _hessian(x)
    w = _weight(48, 128, seed=100 + seed)
    spec = QuantSpec(bits, group_size, seed % 2 == 0)
    q = gptq_quantize(w, H, spec, block_size=32, act_order=act_order)
    assert q.codes.min() >= spec.qmin and q.codes.max() <= spec.qmax
    assert q.scales.shape == quantize(w, spec).scales.shape
    assert _output_error(w, dequantize(q), H) < 0.9 * _output_error(w, dequantize(quantize(w, spec)), H)


def test_block_size_only_changes_rounding():
    # The lazy batch updates are exact algebra: any block size gives (nearly) the same result.
    x = _activations(256, 80, seed=5)
    H = _hessian(x)
    w = _weight(16, 80, seed=6)
    spec = QuantSpec(4, 16, False)
    errors = [_output_error(w, dequantize(gptq_quantize(w, H, spec, block_size=b)), H) for b in (1, 16, 128)]
    assert max(errors) - min(errors) < 1e-3 * max(errors)


def test_dead_columns_are_quantized_as_zero():
    x = _activations(256, 64, seed=7)
    x[:, [3, 40]] = 0.0  # these input channels never fire: diag(H) == 0 there
    w = _weight(8, 64, seed=8)
    spec = QuantSpec(4, 16, False)
    q = gptq_quantize(w, _hessian(x), spec)
    assert torch.all(dequantize(q)[:, [3, 40]] == 0)
    assert torch.isfinite(dequantize(q)).all()


def test_singular_hessian_is_dampened_and_bad_hessian_raises():
    x = _activations(8, 64, seed=9)  # rank <= 8 < 64: singular H, the dampening makes it PD
    w = _weight(8, 64, seed=10)
    q = gptq_quantize(w, _hessian(x), QuantSpec(4, None, True), damp=0.0)
    assert torch.isfinite(dequantize(q)).all()
    bad = -torch.eye(64)  # negative definite: no dampening in the retries fixes it
    with pytest.raises(HessianError, match="not positive definite"):
        gptq_quantize(w, bad, QuantSpec(4, None, True))


def test_input_dtype_and_shape_checks():
    w = _weight(8, 32, seed=11)
    q = gptq_quantize(w.to(torch.bfloat16), torch.eye(32), QuantSpec(4, None, True))
    assert torch.equal(q.codes, quantize(w.to(torch.bfloat16), QuantSpec(4, None, True)).codes)
    with pytest.raises(ValueError):
        gptq_quantize(w, torch.eye(31), QuantSpec(4, None, True))


def test_hessian_accumulates_in_chunks():
    x = _activations(300, 48, seed=12).reshape(3, 100, 48)  # [batch, seq, in]
    H, n = None, 0
    for chunk in (x[0], x[1, :37], x[1, 37:], x[2:]):  # 2-D and 3-D chunks of uneven sizes
        H, n = accumulate_hessian(H, chunk, n)
    assert n == 300
    full = _hessian(x.reshape(-1, 48))
    torch.testing.assert_close(H, full, rtol=1e-5, atol=1e-4)


def test_hessian_accumulation_does_not_modify_its_input():
    H, n = accumulate_hessian(None, torch.ones(4, 3), 0)
    before = H.clone()
    H2, n2 = accumulate_hessian(H, torch.zeros(4, 3), n)
    assert torch.equal(H, before) and n2 == 8
    torch.testing.assert_close(H2, before / 2)
