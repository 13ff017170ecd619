"""Types narrower than torch's (INT4/INT2/UINT4/UINT2, FLOAT4E2M1, FLOAT8E8M0) through the torch importer:
Cast to them judged against the ONNX spec, ml_dtypes' conversions and onnx's reference e8m0 rounding; graph inputs and
initializers of them carried in int8/uint8/float32 holding the same values."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnxbn.torch_import import to_torch

_NP = {TensorProto.INT4: ml_dtypes.int4, TensorProto.INT2: ml_dtypes.int2, TensorProto.UINT4: ml_dtypes.uint4,
       TensorProto.UINT2: ml_dtypes.uint2, TensorProto.FLOAT4E2M1: ml_dtypes.float4_e2m1fn,
       TensorProto.FLOAT8E8M0: ml_dtypes.float8_e8m0fnu}
_CARRIER = {TensorProto.INT4: np.int8, TensorProto.INT2: np.int8, TensorProto.UINT4: np.uint8,
            TensorProto.UINT2: np.uint8, TensorProto.FLOAT4E2M1: np.float32, TensorProto.FLOAT8E8M0: np.float32}


def _cast_model(src: int, to: int, opset: int = 25, **attrs) -> onnx.ModelProto:
    node = helper.make_node("Cast", ["x"], ["y"], to=to, **attrs)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", src, [None])],
                          [helper.make_tensor_value_info("y", to, [None])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _floats(seed=0):
    rng = np.random.default_rng(seed)
    special = [0.0, -0.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -7.5, 8.0, -8.5, 15.9, 16.0, 1e6,
               1e-7, np.inf, -np.inf, np.nan]
    return np.concatenate([special, rng.normal(0, 6, 200), rng.uniform(-20, 20, 200)]).astype(np.float32)


@pytest.mark.parametrize("to", [TensorProto.INT4, TensorProto.INT2, TensorProto.UINT4, TensorProto.UINT2])
def test_cast_float_and_int_to_sub_byte_int(to):
    """A float truncates toward zero where that fits the type (the ONNX spec); where it does not (NaN, inf too)
    the spec leaves the value undefined and onnxbn writes 0, as ml_dtypes >= 0.7 does (older ones wrap)."""
    x = _floats()
    lo, hi = {TensorProto.INT4: (-8, 7), TensorProto.INT2: (-2, 1),
              TensorProto.UINT4: (0, 15), TensorProto.UINT2: (0, 3)}[to]
    t = np.trunc(x.astype(np.float64))
    inside = (t >= lo) & (t <= hi)  # False for NaN
    want = np.where(inside, t, 0).astype(_CARRIER[to])
    got = to_torch(_cast_model(TensorProto.FLOAT, to))(torch.from_numpy(x)).numpy()
    assert got.dtype == _CARRIER[to] and np.array_equal(got, want)
    assert np.array_equal(got[inside], x[inside].astype(_NP[to]).astype(_CARRIER[to]))  # ml_dtypes agrees
    i = np.arange(-300, 300, dtype=np.int32)
    got = to_torch(_cast_model(TensorProto.INT32, to))(torch.from_numpy(i)).numpy()
    assert np.array_equal(got, i.astype(_NP[to]).astype(_CARRIER[to]))  # wraps


def test_cast_to_float4e2m1():
    x = _floats(1)
    grid = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)
    want = x.astype(ml_dtypes.float4_e2m1fn).astype(np.float32)
    got = to_torch(_cast_model(TensorProto.FLOAT, TensorProto.FLOAT4E2M1))(torch.from_numpy(x)).numpy()
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))  # same values, same signs of zero
    assert np.isin(np.abs(got), grid).all()


@pytest.mark.parametrize("round_mode", ["up", "down", "nearest"])
@pytest.mark.parametrize("saturate", [0, 1])
def test_cast_to_float8e8m0(round_mode, saturate):
    rng = np.random.default_rng(2)
    x = np.concatenate([_floats(2), np.exp2(rng.integers(-149, 128, 100)).astype(np.float32),
                        np.exp2(rng.uniform(-140, 128, 300)).astype(np.float32),
                        np.array([3e38, np.float32(2.0 ** 127) * 1.5, 1e-45, 0.75 * 2.0 ** -126], np.float32)])
    want = onnx.numpy_helper.to_float8e8m0(x, bool(saturate), round_mode).astype(np.float32)
    m = _cast_model(TensorProto.FLOAT, TensorProto.FLOAT8E8M0, saturate=saturate, round_mode=round_mode)
    got = to_torch(m)(torch.from_numpy(x)).numpy()
    assert np.array_equal(got, want, equal_nan=True)


@pytest.mark.parametrize("elem", list(_NP))
def test_narrow_input_and_initializer_carry_values(elem):
    """A graph input of a narrow type takes its carrier; an initializer of it imports its values."""
    rng = np.random.default_rng(3)
    lo = 0.01 if elem == TensorProto.FLOAT8E8M0 else -10  # e8m0 has no sign

    def draw():
        with np.errstate(invalid="ignore"):
            return rng.uniform(lo, 10, 12).astype(np.float32).astype(_NP[elem])
    vals = draw()
    init = numpy_helper.from_array(vals, "w")
    node_add = helper.make_node("Cast", ["w"], ["wf"], to=TensorProto.FLOAT)
    node_x = helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT)
    add = helper.make_node("Add", ["xf", "wf"], ["y"])
    g = helper.make_graph([node_add, node_x, add], "g", [helper.make_tensor_value_info("x", elem, [12])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [12])], [init])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 25)])
    x = draw()
    got = to_torch(m)(torch.from_numpy(x.astype(_CARRIER[elem]))).numpy()
    assert np.array_equal(got, x.astype(np.float32) + vals.astype(np.float32))
