"""Tests for quantgate.methods.rtn: round-to-nearest integer quantization (pure tensor functions)."""

from __future__ import annotations

import math

import pytest
import torch

from quantgate.methods.rtn import (
    QuantizedWeight,
    QuantSpec,
    compute_scales,
    dequantize,
    fake_quantize,
    n_groups,
    packed_bytes,
    quantize,
)

BITS = (2, 3, 4, 8)
# (in_features, group_size): per-row, divisible, and non-divisible (576 = 5*100 + 76 = 82*7 + 2).
GROUPINGS = ((576, None), (576, 32), (576, 64), (576, 100), (576, 7), (130, 64))


def _group_ranges(cols: int, group_size: int | None) -> list[tuple[int, int]]:
    g = cols if group_size is None else group_size
    return [(a, min(a + g, cols)) for a in range(0, cols, g)]


def _expand(per_group: torch.Tensor, cols: int, group_size: int | None) -> torch.Tensor:
    """Independent re-implementation: [out, n_groups] -> [out, cols] via explicit column ranges."""
    out = torch.empty(per_group.shape[0], cols, dtype=per_group.dtype)
    for j, (a, b) in enumerate(_group_ranges(cols, group_size)):
        out[:, a:b] = per_group[:, j : j + 1]
    return out


def _on_grid(spec: QuantSpec, out: int, cols: int, seed: int) -> QuantizedWeight:
    """A random QuantizedWeight whose every group uses its lowest and highest code, so the group's
    min/max are exactly the grid's ends and the min/max scale search must recover the same grid."""
    gen = torch.Generator().manual_seed(seed)
    groups = n_groups(cols, spec)
    codes = torch.randint(spec.qmin, spec.qmax + 1, (out, cols), generator=gen)
    for a, b in _group_ranges(cols, spec.group_size):
        assert b - a >= 2, "test construction needs >= 2 columns per group"
        pos = a + torch.randperm(b - a, generator=gen)[:2]
        codes[:, pos[0]] = spec.qmin
        codes[:, pos[1]] = spec.qmax
    # Scales: float16 values in a comfortably normal range (exactly representable in float16).
    scales = (torch.rand(out, groups, generator=gen) * 0.1 + 1e-3).to(torch.float16)
    zeros = None
    if not spec.symmetric:
        # Integer zero points inside the code range: the grid then always contains 0, i.e. the
        # group's range [-z*s, (qmax - z)*s] already satisfies the module's 0-inclusion rule.
        # Include the extremes z = 0 (all weights >= 0) and z = qmax (all weights <= 0).
        zeros = torch.randint(0, spec.qmax + 1, (out, groups), generator=gen)
        zeros[0, :] = 0
        zeros[1, :] = spec.qmax
        zeros = zeros.to(torch.int16)
    return QuantizedWeight(codes=codes.to(torch.int16), scales=scales, zeros=zeros, spec=spec)


# ---------------------------------------------------------------- exact reproduction of on-grid weights


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("cols,group_size", GROUPINGS)
def test_on_grid_weights_roundtrip_exactly(bits, symmetric, cols, group_size):
    spec = QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric)
    grid = _on_grid(spec, out=6, cols=cols, seed=bits * 1000 + cols + (group_size or 0))
    w = dequantize(grid)

    q = quantize(w, spec)
    assert torch.equal(q.scales, grid.scales)
    if symmetric:
        assert q.zeros is None
    else:
        assert torch.equal(q.zeros, grid.zeros)
    assert torch.equal(q.codes, grid.codes)
    assert torch.equal(dequantize(q), w)
    assert torch.equal(fake_quantize(w, spec), w)


def test_dequantize_formula_by_hand():
    spec = QuantSpec(bits=4, group_size=2, symmetric=False)
    q = QuantizedWeight(
        codes=torch.tensor([[0, 15, 3]], dtype=torch.int16),
        scales=torch.tensor([[0.5, 2.0]], dtype=torch.float16),
        zeros=torch.tensor([[4, 1]], dtype=torch.int16),
        spec=spec,
    )
    # group 0 (cols 0,1): (code - 4) * 0.5; group 1 (col 2): (3 - 1) * 2
    assert dequantize(q).tolist() == [[-2.0, 5.5, 4.0]]
    sym = QuantizedWeight(
        codes=torch.tensor([[-7, 7, 1]], dtype=torch.int16),
        scales=torch.tensor([[0.25]], dtype=torch.float16),
        zeros=None,
        spec=QuantSpec(bits=4, group_size=None, symmetric=True),
    )
    assert dequantize(sym).tolist() == [[-1.75, 1.75, 0.25]]


def test_asymmetric_range_includes_zero():
    """An all-positive (all-negative) group widens its range to 0: zero point 0 (qmax), and 0.0
    is exactly representable on the grid."""
    spec = QuantSpec(bits=4, group_size=4, symmetric=False)
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0, -1.0, -2.0, -3.0, -6.0]])
    scales, zeros = compute_scales(w, spec)
    assert zeros.tolist() == [[0, 15]]
    # range [0, 4] and [-6, 0] over 15 steps (rounded up to float16 if needed)
    assert scales[0, 0].item() >= 4 / 15 and scales[0, 0].item() == pytest.approx(4 / 15, rel=1e-3)
    assert scales[0, 1].item() >= 6 / 15 and scales[0, 1].item() == pytest.approx(6 / 15, rel=1e-3)
    assert fake_quantize(torch.zeros(1, 8) + torch.tensor([[0, 1, 2, 4, 0, -1, -2, -6.0]]), spec)[0, 0] == 0.0


# ---------------------------------------------------------------- error bound


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("cols,group_size", [(576, None), (576, 64), (576, 100), (576, 7)])
def test_error_at_most_half_a_step(bits, symmetric, cols, group_size):
    spec = QuantSpec(bits=bits, group_size=group_size, symmetric=symmetric)
    gen = torch.Generator().manual_seed(bits + cols + (group_size or 0))
    w = torch.randn(32, cols, generator=gen) * 0.05
    w[0, 3] = 1.5  # an outlier in one group
    scales, _ = compute_scales(w, spec)
    step = _expand(scales.float(), cols, group_size)
    err = (w - fake_quantize(w, spec)).abs()
    bound = step / 2 * (1 + 1e-6) + 1e-6 * w.abs()
    assert bool((err <= bound).all()), f"max excess {(err - step / 2).max().item()}"
    # and the quantization actually did something (not a no-op)
    assert (err > 0).any()


def test_fake_quantize_keeps_dtype_and_shape():
    spec = QuantSpec(bits=4, group_size=32, symmetric=False)
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    out = fake_quantize(w, spec)
    assert out.dtype == torch.bfloat16 and out.shape == w.shape
    assert dequantize(quantize(w, spec)).dtype == torch.float32


# ---------------------------------------------------------------- non-divisible groups


@pytest.mark.parametrize(
    "cols,group_size,expected_groups", [(576, 100, 6), (576, 7, 83), (576, 64, 9), (576, None, 1), (5, 8, 1)]
)
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_scale_shapes(cols, group_size, expected_groups, symmetric):
    spec = QuantSpec(bits=4, group_size=group_size, symmetric=symmetric)
    assert n_groups(cols, spec) == expected_groups == math.ceil(cols / (group_size or cols))
    w = torch.randn(10, cols, generator=torch.Generator().manual_seed(0))
    scales, zeros = compute_scales(w, spec)
    assert scales.shape == (10, expected_groups) and scales.dtype == torch.float16
    if symmetric:
        assert zeros is None
    else:
        assert zeros.shape == (10, expected_groups) and zeros.dtype == torch.int16
    q = quantize(w, spec)
    assert q.codes.shape == (10, cols) and q.codes.dtype == torch.int16


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group_size", [100, 7])
def test_short_last_group_uses_only_its_own_columns(symmetric, group_size):
    cols = 576
    spec = QuantSpec(bits=4, group_size=group_size, symmetric=symmetric)
    last = (cols // group_size) * group_size  # first column of the short last group
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(12, cols, generator=gen) * 0.02
    # The last group is strictly positive, so padding (if it leaked in) would change its min.
    w[:, last:] = w[:, last:].abs() + 0.5
    scales, zeros = compute_scales(w, spec)

    # The short group's grid equals that of quantizing its columns alone as one group.
    alone = QuantSpec(bits=4, group_size=None, symmetric=symmetric)
    s_alone, z_alone = compute_scales(w[:, last:], alone)
    assert torch.equal(scales[:, -1:], s_alone)
    if not symmetric:
        assert torch.equal(zeros[:, -1:], z_alone)
        assert bool((zeros[:, -1] == 0).all())  # all-positive group: zero point at code 0
    # Fake quantization splits the same way.
    fq = fake_quantize(w, spec)
    assert torch.equal(fq[:, last:], fake_quantize(w[:, last:], alone))
    assert torch.equal(fq[:, :last], fake_quantize(w[:, :last], spec))

    # A huge outlier in the last short group changes that group's scale only.
    w2 = w.clone()
    w2[:, -1] = 1000.0
    scales2, zeros2 = compute_scales(w2, spec)
    assert torch.equal(scales2[:, :-1], scales[:, :-1])
    assert bool((scales2[:, -1] > scales[:, -1] * 100).all())
    if not symmetric:
        assert torch.equal(zeros2[:, :-1], zeros[:, :-1])
    assert torch.equal(fake_quantize(w2, spec)[:, :last], fq[:, :last])

    # ... and an outlier in the first group does not change the last group's scale.
    w3 = w.clone()
    w3[:, 0] = -1000.0
    scales3, _ = compute_scales(w3, spec)
    assert torch.equal(scales3[:, 1:], scales[:, 1:])


# ---------------------------------------------------------------- codes and scales


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", BITS)
def test_codes_within_range_and_extremes_not_clipped(bits, symmetric):
    spec = QuantSpec(bits=bits, group_size=64, symmetric=symmetric)
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(64, 576, generator=gen) * torch.logspace(-3, 1, 64).unsqueeze(1)
    q = quantize(w, spec)
    assert q.codes.dtype == torch.int16
    assert int(q.codes.min()) >= spec.qmin and int(q.codes.max()) <= spec.qmax
    if symmetric:
        assert (spec.qmin, spec.qmax) == (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
    else:
        assert (spec.qmin, spec.qmax) == (0, 2**bits - 1)
        assert int(q.zeros.min()) >= 0 and int(q.zeros.max()) <= spec.qmax
    assert q.scales.dtype == torch.float16 and bool((q.scales > 0).all())

    # Scales are never below what the range needs: the extreme value is representable without
    # clamping, i.e. the unclamped code of every weight lies within [qmin - 1/2, qmax + 1/2].
    s = _expand(q.scales.float(), 576, 64)
    raw = w / s
    if not symmetric:
        raw = raw + _expand(q.zeros.float(), 576, 64)
    assert float(raw.max()) <= spec.qmax + 0.5 + 1e-4
    assert float(raw.min()) >= spec.qmin - 0.5 - 1e-4
    lo, hi = w.view(64, 9, 64).amin(-1), w.view(64, 9, 64).amax(-1)
    if symmetric:
        need = torch.maximum(lo.abs(), hi.abs()) / spec.qmax
    else:
        need = (hi.clamp(min=0) - lo.clamp(max=0)) / spec.qmax
    assert bool((q.scales.float() >= need).all())
    # ... and not more than one float16 step above it (2^-24 absolute for float16 subnormals)
    assert bool((q.scales.float() <= need * (1 + 2**-10) + 2**-24).all())


def test_symmetric_8bit_per_channel():
    spec = QuantSpec(bits=8, group_size=None, symmetric=True)
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(16, 96, generator=gen)
    q = quantize(w, spec)
    assert q.scales.shape == (16, 1) and q.zeros is None
    assert int(q.codes.min()) >= -127 and int(q.codes.max()) <= 127
    # Every row's largest-magnitude weight gets code ±127 (the float16 scale is rounded up at most
    # by a relative 2^-10, so its code rounds back to 127).
    idx = w.abs().argmax(1)
    extreme_codes = q.codes[torch.arange(16), idx]
    assert torch.equal(extreme_codes.abs(), torch.full((16,), 127, dtype=torch.int16))
    assert torch.equal(torch.sign(extreme_codes), torch.sign(w[torch.arange(16), idx]).to(torch.int16))
    expected = (w.abs().amax(1, keepdim=True) / 127).to(torch.float16)
    # nearest float16 or the next one up
    assert bool(((q.scales == expected) | (q.scales.float() > expected.float())).all())
    err = (fake_quantize(w, spec) - w).abs()
    assert bool((err <= q.scales.float() / 2 * (1 + 1e-6)).all())


def test_scale_rounds_up_where_float16_nearest_rounds_down():
    # absmax / 127 = 1 + 2^-12, whose nearest float16 is 1.0 (too small: 127 * 1.0 < absmax).
    spec = QuantSpec(bits=8, group_size=None, symmetric=True)
    w = torch.tensor([[127 * (1 + 2**-12), 0.5, -3.0]])
    scales, _ = compute_scales(w, spec)
    assert scales.item() == 1 + 2**-10  # the next float16 above 1.0
    q = quantize(w, spec)
    assert q.codes[0, 0].item() == 127
    # The exact case stays exact: absmax / 127 = 0.5 is a float16.
    scales_exact, _ = compute_scales(torch.tensor([[63.5, -1.0]]), spec)
    assert scales_exact.item() == 0.5


def test_all_zero_rows_get_a_positive_scale():
    for symmetric in (True, False):
        spec = QuantSpec(bits=4, group_size=4, symmetric=symmetric)
        w = torch.zeros(3, 8)
        w[1, 5] = 0.25
        q = quantize(w, spec)
        assert bool((q.scales > 0).all())
        assert torch.isfinite(dequantize(q)).all()
        assert torch.equal(dequantize(q)[0], torch.zeros(8))


# ---------------------------------------------------------------- packed size


def test_packed_bytes_hand_computed():
    # [576, 576], 4-bit, groups of 64, asymmetric:
    #   codes  576 rows * 576*4/8 = 288 bytes          = 165888
    #   scales 576 * 9 groups * 2 bytes                 =  10368
    #   zeros  576 rows * ceil(9*4/8) = 5 bytes         =   2880
    assert packed_bytes((576, 576), QuantSpec(4, 64, False)) == 165888 + 10368 + 2880 == 179136
    # the same symmetric: no zero points
    assert packed_bytes((576, 576), QuantSpec(4, 64, True)) == 165888 + 10368
    # 8-bit per-channel symmetric: 576*576 codes + one float16 scale per row
    assert packed_bytes((576, 576), QuantSpec(8, None, True)) == 331776 + 1152 == 332928
    # [1536, 576] (an MLP down projection), 2-bit g64 asymmetric:
    #   1536 * 144 + 1536 * 9 * 2 + 1536 * ceil(18/8)=3
    assert packed_bytes((1536, 576), QuantSpec(2, 64, False)) == 1536 * 144 + 1536 * 18 + 1536 * 3


def test_packed_bytes_non_divisible():
    # 576 columns, 3-bit, group 100 (6 groups, the last of 76), asymmetric:
    #   codes  576 * ceil(576*3/8)=216; scales 576*6*2; zeros 576 * ceil(6*3/8)=3
    assert packed_bytes((576, 576), QuantSpec(3, 100, False)) == 576 * 216 + 576 * 12 + 576 * 3 == 133056
    # group 7: 83 groups; 3-bit zeros: ceil(249/8) = 32 bytes per row
    assert packed_bytes((10, 576), QuantSpec(3, 7, False)) == 10 * 216 + 10 * 83 * 2 + 10 * 32
    # rows are padded to whole bytes separately: [10, 7] at 3 bits is 3 bytes a row (21 bits),
    # 30 in all, not ceil(210/8) = 27
    assert packed_bytes((10, 7), QuantSpec(3, None, True)) == 10 * 3 + 10 * 2 == 50
    assert packed_bytes((10, 7), QuantSpec(3, None, False)) == 30 + 20 + 10 * 1


def test_packed_bytes_smaller_than_float():
    for bits in BITS:
        for g in (None, 32, 64, 100):
            for sym in (True, False):
                assert packed_bytes((576, 576), QuantSpec(bits, g, sym)) < 576 * 576 * 2


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs", [dict(bits=1), dict(bits=9), dict(bits=0), dict(group_size=0), dict(group_size=-4)]
)
def test_quant_spec_rejects_bad_values(kwargs):
    args = dict(bits=4, group_size=64, symmetric=False) | kwargs
    with pytest.raises(ValueError):
        QuantSpec(**args)


@pytest.mark.parametrize("bits", [2, 8])
def test_quant_spec_accepts_bounds(bits):
    assert QuantSpec(bits=bits, group_size=1, symmetric=True).bits == bits


@pytest.mark.parametrize("shape", [(16,), (2, 4, 8), ()])
def test_quantize_rejects_non_2d(shape):
    with pytest.raises(ValueError):
        quantize(torch.ones(shape), QuantSpec(4, None, True))
    with pytest.raises(ValueError):
        fake_quantize(torch.ones(shape), QuantSpec(4, None, True))
