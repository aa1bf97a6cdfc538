"""Recover the integer codes, float16 scales and zero points behind a fake-quantized weight.

Every quantizer here (RTN, GPTQ, AWQ, SmoothQuant's int8 weights) writes a weight of the form
w = (q - z) · s per group, with integer codes q, an integer zero point z and a float16 scale s;
the float32 product is exact (a code has at most 8 bits, a float16 scale 11). So the grid can be
read back from the weight itself: within a group every w_j is an integer multiple of s, and the
largest float16 of which all of them are integer multiples gives a valid (codes, scale, zero)
triple. It may be coarser than the one the quantizer used (codes sharing a common factor), which
changes nothing: the result is checked to dequantize to the weight bit for bit, or refused.

Groups follow rtn.py (contiguous columns, a shorter last group when group_size does not divide).
"""

from __future__ import annotations

import torch

from quantgate.methods.rtn import QuantizedWeight, QuantSpec, dequantize

_MANTISSA_BITS = 24  # float32 significand, implicit bit included
_FP16_ODD_MAX = 2**11  # a float16 significand holds odd integers below this
_MAX_SPREAD = 38  # exponent spread within a group beyond which the values cannot share a grid


class NotOnGrid(ValueError):
    """The weight is not (q - z) · s on any grid the spec allows."""


def recover_codes(weight: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Codes, scales and zero points of a fake-quantized weight [out, in] (float32 or wider).

    Returns a QuantizedWeight with codes in [spec.qmin, spec.qmax] (int16 [out, in]), float16
    scales [out, n_groups] and, when asymmetric, int16 zero points [out, n_groups] in
    [0, spec.qmax], such that rtn.dequantize(result) equals `weight` exactly. Raises NotOnGrid
    when no such representation exists (the weight was not produced on this spec's grid)."""
    if weight.dim() != 2:
        raise NotOnGrid(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    if weight.dtype not in (torch.float32, torch.float64) or not torch.isfinite(weight).all():
        raise NotOnGrid(f"expected finite float32 weights, got {weight.dtype}")
    out, cols = weight.shape
    g = cols if spec.group_size is None else spec.group_size
    grouped = torch.nn.functional.pad(weight.float(), (0, -cols % g)).view(out, -1, g)  # [out, G, g]
    units, unit_exp = _integer_units(grouped)  # int64 [out, G, g], int64 [out, G, 1]
    common = _gcd_last(units)  # int64 [out, G]: 0 for an all-zero group
    divisor = _smallest_fp16_divisor(common, unit_exp[..., 0], spec.qmax - spec.qmin)
    step = torch.where(common > 0, common // divisor, 1)  # [out, G]: the scale in units
    multiples = (units // step.unsqueeze(-1)).view(out, -1)[:, :cols]  # int64 [out, in]: q - z
    scales = torch.ldexp(step.double(), unit_exp[..., 0].double())
    scales = torch.where(common > 0, scales, torch.finfo(torch.float16).tiny).to(torch.float16)
    codes, zeros = _codes_and_zeros(multiples, spec)
    result = QuantizedWeight(codes=codes, scales=scales, zeros=zeros, spec=spec)
    if not torch.equal(dequantize(result).to(weight.dtype), weight):
        raise NotOnGrid("the recovered codes do not reproduce the weight exactly")
    return result


def _integer_units(grouped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each value as an int64 multiple of its group's smallest binary unit 2^e:
    grouped [out, G, g] float32 -> (values / 2^e as int64 [out, G, g], e as int64 [out, G, 1])."""
    mantissa, exponent = torch.frexp(grouped)  # grouped = mantissa · 2^exponent, |mantissa| in [0.5, 1)
    whole = torch.ldexp(mantissa.double(), torch.tensor(float(_MANTISSA_BITS), dtype=torch.float64))
    whole = whole.to(torch.int64)  # exact: a float32 significand has 24 bits
    exp = exponent.to(torch.int64) - _MANTISSA_BITS
    nonzero = whole != 0
    unit = torch.where(nonzero, exp, torch.iinfo(torch.int64).max).amin(-1, keepdim=True)  # [out, G, 1]
    unit = torch.where(nonzero.any(-1, keepdim=True), unit, 0)
    shift = torch.where(nonzero, exp - unit, 0)
    if int(shift.max()) > _MAX_SPREAD:
        raise NotOnGrid("values of one group span too many binary orders to lie on a common grid")
    return whole << shift, unit


def _gcd_last(x: torch.Tensor) -> torch.Tensor:
    """Greatest common divisor along the last dim of int64 x [..., n] (a pairwise tree) -> [...]."""
    x = x.abs()
    while x.shape[-1] > 1:
        if x.shape[-1] % 2:
            x = torch.nn.functional.pad(x, (0, 1))  # gcd(a, 0) = a
        x = torch.gcd(x[..., 0::2], x[..., 1::2])
    return x[..., 0]


def _smallest_fp16_divisor(common: torch.Tensor, unit_exp: torch.Tensor, max_divisor: int) -> torch.Tensor:
    """Per group, the smallest d in 1..max_divisor dividing `common` such that (common / d) · 2^unit_exp
    is a float16 number (the coarsest float16 grid every value lies on). common, unit_exp: int64
    [out, G]. All-zero groups (common 0) get 1. Raises NotOnGrid when some group has none."""
    divisor = torch.ones_like(common)
    todo = (common > 0) & ~_is_fp16(common, unit_exp)
    for d in range(2, max_divisor + 1):
        if not todo.any():
            break
        fits = todo & (common % d == 0) & _is_fp16(common // d, unit_exp)
        divisor = torch.where(fits, d, divisor)
        todo &= ~fits
    if todo.any():
        raise NotOnGrid("no float16 scale puts every value of a group on an integer code")
    return divisor


def _is_fp16(units: torch.Tensor, unit_exp: torch.Tensor) -> torch.Tensor:
    """Whether units · 2^unit_exp (int64 [out, G] each) is exactly a finite float16 number."""
    value = torch.ldexp(units.double(), unit_exp.double())
    return value.to(torch.float16).double() == value


def _codes_and_zeros(multiples: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """multiples (q - z, int64 [out, in]) -> codes int16 [out, in] and zeros int16 [out, G] (or None)
    on the spec's code range; raises NotOnGrid when a group does not fit it."""
    if spec.symmetric:
        if int(multiples.abs().max()) > spec.qmax:
            raise NotOnGrid(f"codes exceed ±{spec.qmax} for {spec.bits}-bit symmetric")
        return multiples.to(torch.int16), None
    out, cols = multiples.shape
    g = cols if spec.group_size is None else spec.group_size
    padded = torch.nn.functional.pad(multiples, (0, -cols % g)).view(out, -1, g)  # padding 0: on every grid
    zeros = (-padded.amin(-1)).clamp(min=0)  # [out, G]: the smallest zero point that keeps codes >= 0
    if int((padded.amax(-1) + zeros).max()) > spec.qmax or int(zeros.max()) > spec.qmax:
        raise NotOnGrid(f"a group spans more than {spec.qmax + 1} codes for {spec.bits}-bit asymmetric")
    codes = multiples + zeros.repeat_interleave(g, dim=1)[:, :cols]
    return codes.to(torch.int16), zeros.to(torch.int16)
