"""Element types narrower than any torch dtype, carried in a wider one: INT4/INT2 as int8, UINT4/UINT2
as uint8 (each holding the value), FLOAT4E2M1 and FLOAT8E8M0 as float32 (each holding a value of the
type exactly). A graph input of such a type takes the carrier tensor, a graph output gives it.

Only Cast and CastLike produce new values of these types (ONNX lets data-movement ops alone take them),
so `_cast_narrow` is where the narrowing happens, as onnx's reference Cast (ml_dtypes' conversions):
  to a sub-byte integer of range [lo, hi]: an integer wraps (its low bits, two's complement);
    a float truncates toward zero, and one outside [lo, hi] (NaN too) becomes 0 (the ONNX spec leaves
    it undefined; ml_dtypes writes 0 from 0.7 on and wrapped the truncated value before);
  to FLOAT4E2M1 (values 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives): rounded to nearest, ties to
    even, saturated at +-6 (+-inf too); NaN becomes -0;
  to FLOAT8E8M0 (2**e for e in [-127, 127], and NaN): e is float32's exponent field of x (sign ignored;
    a float32 subnormal has field 0), rounded as `round_mode` says from the mantissa bits: "up" adds 1
    when any is set, "down" none, "nearest" when the guard bit is set and the round, sticky or
    lowest exponent bit is; `saturate` keeps 2**127 from rounding up into NaN; inf and NaN give NaN.
"""

from __future__ import annotations

import onnx
import torch

# ONNX element type -> the torch dtype that carries its values
NARROW: dict[int, torch.dtype] = {onnx.TensorProto.INT4: torch.int8, onnx.TensorProto.INT2: torch.int8,
          onnx.TensorProto.UINT4: torch.uint8, onnx.TensorProto.UINT2: torch.uint8,
          onnx.TensorProto.FLOAT4E2M1: torch.float32, onnx.TensorProto.FLOAT8E8M0: torch.float32}
# sub-byte integers: (bits, signed)
_INTS: dict[int, tuple[int, bool]] = {onnx.TensorProto.INT4: (4, True), onnx.TensorProto.INT2: (2, True),
         onnx.TensorProto.UINT4: (4, False), onnx.TensorProto.UINT2: (2, False)}


def _cast_narrow(x, elem: int, saturate: bool = True, round_mode: str = "up"):
    """ONNX Cast of `x` to the narrow type `elem`, as its carrier (see the module docstring)."""
    if elem in _INTS:
        return _to_small_int(x, *_INTS[elem])
    if elem == onnx.TensorProto.FLOAT4E2M1:
        return _to_float4e2m1(x)
    return _to_float8e8m0(x, saturate, round_mode)


def _to_small_int(x, bits: int, signed: bool):
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    carrier = torch.int8 if signed else torch.uint8
    if x.dtype.is_floating_point:
        t = torch.trunc(x.to(torch.float64))
        inside = (t >= lo) & (t <= hi)  # False for NaN
        return torch.where(inside, t, torch.zeros_like(t)).to(carrier)
    v = x.to(torch.int64) & ((1 << bits) - 1)  # the low bits
    if signed:
        v = torch.where(v > hi, v - (1 << bits), v)
    return v.to(carrier)


def _to_float4e2m1(x):
    x = x.to(torch.float32)
    a = x.abs()
    # spacing of the representable values: 0.5 below 2, 1 in [2, 4), 2 from 4
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0))
    y = torch.clamp(torch.round(a / step) * step, max=6.0)  # torch.round: ties to even
    y = torch.copysign(y, x)
    return torch.where(torch.isnan(x), torch.full_like(x, -0.0), y)


def _to_float8e8m0(x, saturate: bool = True, round_mode: str = "up"):
    bits = x.to(torch.float32).view(torch.int32)
    exp = (bits >> 23) & 0xFF
    frac = bits & 0x7FFFFF
    special = exp == 0xFF
    if round_mode == "up":
        up = frac > 0
    elif round_mode == "nearest":
        up = ((frac & 0x400000) > 0) & (((frac & 0x200000) > 0) | ((frac & 0x1FFFFF) > 0) | (exp > 0))
    else:  # "down"
        up = torch.zeros_like(special)
    if saturate:
        up = up & (exp != 0xFE)
    exp = torch.where(special, exp, exp + up.to(exp.dtype))
    value = torch.pow(2.0, (exp - 127).to(torch.float64)).to(torch.float32)
    return torch.where(exp == 0xFF, torch.full_like(value, float("nan")), value)
