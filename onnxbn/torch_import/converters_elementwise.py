"""Converters for elementwise ops: unary math, activations, comparisons, logic, Min/Max/Mean, Where, Cast.

Registered in `converters._CONVERTERS` by `_op`; each maps the ONNX op onto the torch
function of the same math (see `functional` for the ones torch has no single call for).
PRelu with a float initializer slope becomes an `OnnxPRelu` module whose slope trains.
"""

from __future__ import annotations

import onnx
import torch
import torch.nn.functional as F

from onnxbn.torch_import.functional import (
    _cast_like,
    _hard_sigmoid,
    _max,
    _mean,
    _min,
    _pow,
    _selu,
    _thresholded_relu,
)
from onnxbn.torch_import.narrow import NARROW, _cast_narrow
from onnxbn.torch_import.ops import DTYPES, OnnxPRelu, _cast, _prelu
from onnxbn.torch_import.registry import ConvertContext, converter

_UNARY = {
    "Abs": torch.abs, "Neg": torch.neg, "Exp": torch.exp, "Log": torch.log, "Sqrt": torch.sqrt,
    "Reciprocal": torch.reciprocal, "Erf": torch.erf, "Sin": torch.sin, "Cos": torch.cos, "Tan": torch.tan,
    "Floor": torch.floor, "Ceil": torch.ceil, "Round": torch.round,  # round half to even, as ONNX
    "Sign": torch.sign, "Not": torch.logical_not, "Softsign": F.softsign, "Mish": F.mish,
    "HardSwish": F.hardswish, "Softplus": F.softplus,
}


@converter(*_UNARY)
def _unary_op(ctx: ConvertContext, a: dict):
    return ctx.call(_UNARY[ctx.node.op_type], ctx.inp(0))


@converter("Elu")
def _elu_op(ctx, a):
    return ctx.call(F.elu, ctx.inp(0), float(a.get("alpha", 1.0)))


@converter("Celu")
def _celu_op(ctx, a):
    return ctx.call(F.celu, ctx.inp(0), float(a.get("alpha", 1.0)))


@converter("Selu")
def _selu_op(ctx, a):
    return ctx.call(_selu, ctx.inp(0), float(a.get("alpha", 1.67326319217681884765625)),
                    float(a.get("gamma", 1.05070102214813232421875)))


@converter("HardSigmoid")
def _hard_sigmoid_op(ctx, a):
    return ctx.call(_hard_sigmoid, ctx.inp(0), float(a.get("alpha", 0.2)), float(a.get("beta", 0.5)))


@converter("ThresholdedRelu")
def _thresholded_relu_op(ctx, a):
    return ctx.call(_thresholded_relu, ctx.inp(0), float(a.get("alpha", 1.0)))


@converter("Gelu")
def _gelu_op(ctx, a):
    approximate = a.get("approximate", "none")
    if approximate not in ("none", "tanh"):
        ctx.fail(f"approximate={approximate!r} is not supported")
    return ctx.call(F.gelu, ctx.inp(0), approximate=approximate)


@converter("PRelu")
def _prelu_op(ctx: ConvertContext, a: dict):
    """y = x < 0 ? slope * x : x, slope broadcast onto x; a float initializer slope is a trainable Parameter."""
    name = ctx.node.input[1]
    if ctx.is_weight(name):
        return ctx.module(OnnxPRelu(ctx.param(name)), ctx.inp(0), params={"weight": name})
    return ctx.call(_prelu, ctx.inp(0), ctx.inp(1))


@converter("Pow")
def _pow_op(ctx, a):
    return ctx.call(_pow, ctx.inp(0), ctx.inp(1))


_COMPARE = {"Equal": torch.eq, "Less": torch.lt, "LessOrEqual": torch.le, "Greater": torch.gt,
            "GreaterOrEqual": torch.ge, "And": torch.logical_and, "Or": torch.logical_or,
            "Xor": torch.logical_xor}


@converter(*_COMPARE)
def _compare_op(ctx, a):
    return ctx.call(_COMPARE[ctx.node.op_type], ctx.inp(0), ctx.inp(1))


@converter("Min", "Max")
def _minmax_op(ctx: ConvertContext, a: dict):
    fn = _min if ctx.node.op_type == "Min" else _max
    return ctx.call(fn, *[ctx.inp(i) for i in range(len(ctx.node.input))])


@converter("Mean")
def _mean_op(ctx: ConvertContext, a: dict):
    return ctx.call(_mean, *[ctx.inp(i) for i in range(len(ctx.node.input))])


@converter("Where")
def _where_op(ctx, a):
    return ctx.call(torch.where, ctx.inp(0), ctx.inp(1), ctx.inp(2))


def torch_dtype(ctx: ConvertContext, elem_type: int, what: str) -> torch.dtype:
    """The torch dtype of an ONNX element type, or a refusal naming it."""
    if elem_type not in DTYPES:
        ctx.fail(f"{what}={onnx.TensorProto.DataType.Name(elem_type)} is not supported")
    return DTYPES[elem_type]


@converter("Cast")
def _cast_op(ctx: ConvertContext, a: dict):
    """Cast to `to` (see `ops._cast`, and `narrow._cast_narrow` for the types narrower than a byte and
    FLOAT8E8M0; `saturate`, from opset 19, concerns 8-bit floats only; `round_mode` FLOAT8E8M0 only)."""
    return _cast_to(ctx, ctx.inp(0), int(a["to"]), "to", a)


def _cast_to(ctx: ConvertContext, x, elem: int, what: str, a: dict):
    saturate = bool(int(a.get("saturate", 1)))
    if elem in NARROW:
        return ctx.call(_cast_narrow, x, elem, saturate, a.get("round_mode", "up"))
    return ctx.call(_cast, x, torch_dtype(ctx, elem, what), saturate)


@converter("CastLike")
def _cast_like_op(ctx: ConvertContext, a: dict):
    target = ctx.elem_type(ctx.node.input[1])
    if target is not None:
        return _cast_to(ctx, ctx.inp(0), target, "target_type", a)
    return ctx.call(_cast_like, ctx.inp(0), ctx.inp(1))
