"""Converters for layers beyond converters.py's: ConvTranspose, the normalizations
(Layer/Instance/Group/Lp), the Reduce* family and ArgMax/ArgMin.

ConvTranspose with an initializer weight is an `OnnxConvTranspose` module, and
Layer/Instance/GroupNormalization with initializer scale (and bias) an `OnnxNorm`
module: their weights are nn.Parameters recorded for write-back, as Conv's are.
"""

from __future__ import annotations

from onnxbn.torch_import.converters import _spatial_attrs
from onnxbn.torch_import.converters_shape import _const_ints, outputs
from onnxbn.torch_import.functional import _arg_reduce, _lp_norm, _reduce
from onnxbn.torch_import.ops import (
    OnnxConvTranspose,
    OnnxNorm,
    _conv_transpose,
    _group_norm,
    _instance_norm,
    _layer_norm,
)
from onnxbn.torch_import.registry import ConvertContext, converter


@converter("ConvTranspose")
def _conv_transpose_op(ctx: ConvertContext, a: dict):
    node = ctx.node
    w_name = node.input[1]
    b_name = node.input[2] if len(node.input) > 2 else ""
    nd = len(a["kernel_shape"]) if "kernel_shape" in a else (ctx.rank(w_name) or 4) - 2
    if nd not in (1, 2, 3):
        ctx.fail(f"{nd}-D transposed convolution")
    strides, dilations, pads, auto_pad = _spatial_attrs(ctx, a, nd)
    attrs = dict(strides=strides, dilations=dilations, group=int(a.get("group", 1)), pads=pads,
                 output_padding=list(a.get("output_padding", [0] * nd)),
                 output_shape=list(a["output_shape"]) if a.get("output_shape") else None, auto_pad=auto_pad)
    if ctx.is_weight(w_name) and (not b_name or ctx.is_weight(b_name)):
        params = {"weight": w_name} | ({"bias": b_name} if b_name else {})
        mod = OnnxConvTranspose(ctx.param(w_name), ctx.param(b_name) if b_name else None, **attrs)
        return ctx.module(mod, ctx.inp(0), params=params)
    return ctx.call(_conv_transpose, ctx.inp(0), ctx.inp(1), ctx.inp(2), **attrs)


def _norm(ctx: ConvertContext, kind: str, n_out: int = 1, **settings):
    """An OnnxNorm module when scale (and bias) are float initializers, else the functional form."""
    node = ctx.node
    s_name = node.input[1]
    b_name = node.input[2] if len(node.input) > 2 else ""
    eps = float(f"{float(settings.pop('eps')):.7g}")  # float32 attribute: keep the exporter's decimal
    if ctx.is_weight(s_name) and (not b_name or ctx.is_weight(b_name)):
        params = {"weight": s_name} | ({"bias": b_name} if b_name else {})
        mod = OnnxNorm(kind, ctx.param(s_name), ctx.param(b_name) if b_name else None, eps, **settings)
        out = ctx.module(mod, ctx.inp(0), params=params)
    elif kind == "layer":
        out = ctx.call(_layer_norm, ctx.inp(0), ctx.inp(1), ctx.inp(2), settings["axis"], eps, settings["stats"])
    elif kind == "instance":
        out = ctx.call(_instance_norm, ctx.inp(0), ctx.inp(1), ctx.inp(2), eps)
    else:
        out = ctx.call(_group_norm, ctx.inp(0), ctx.inp(1), ctx.inp(2), settings["groups"], eps,
                       settings["per_group"])
    return outputs(ctx, out, n_out) if n_out > 1 else out


@converter("LayerNormalization")
def _layer_norm_op(ctx: ConvertContext, a: dict):
    """Normalized over axes [axis, rank), in float32 for half inputs (stash_type 1); outputs Mean and
    InvStdDev when the node asks for them."""
    stash = int(a.get("stash_type", 1))
    if stash != 1:
        ctx.fail(f"stash_type={stash} is not supported")
    n_out = max(i + 1 for i, o in enumerate(ctx.node.output) if o)
    return _norm(ctx, "layer", n_out, eps=a.get("epsilon", 1e-5), axis=int(a.get("axis", -1)), stats=n_out > 1)


@converter("InstanceNormalization")
def _instance_norm_op(ctx, a):
    return _norm(ctx, "instance", eps=a.get("epsilon", 1e-5))


@converter("GroupNormalization")
def _group_norm_op(ctx: ConvertContext, a: dict):
    """scale/bias per group at opset 18, per channel from opset 21."""
    stash = int(a.get("stash_type", 1))
    if stash != 1:
        ctx.fail(f"stash_type={stash} is not supported")
    return _norm(ctx, "group", eps=a.get("epsilon", 1e-5), groups=int(a["num_groups"]), per_group=ctx.opset < 21)


@converter("LpNormalization")
def _lp_norm_op(ctx: ConvertContext, a: dict):
    p = int(a.get("p", 2))
    if p not in (1, 2):
        ctx.fail(f"p={p} is not supported (1 or 2)")
    return ctx.call(_lp_norm, ctx.inp(0), int(a.get("axis", -1)), p)


_REDUCE = {"ReduceMean": "Mean", "ReduceSum": "Sum", "ReduceMax": "Max", "ReduceMin": "Min", "ReduceProd": "Prod",
           "ReduceL1": "L1", "ReduceL2": "L2", "ReduceLogSumExp": "LogSumExp", "ReduceSumSquare": "SumSquare"}


@converter(*_REDUCE)
def _reduce_op(ctx: ConvertContext, a: dict):
    """axes: an attribute until opset 12 (ReduceSum) / 17 (the others), then an optional input;
    no axes reduce all, or none when noop_with_empty_axes=1."""
    op = ctx.node.op_type
    axes_input_from = 13 if op == "ReduceSum" else 18
    if ctx.opset < axes_input_from:
        axes = list(a["axes"]) if "axes" in a else None
    else:
        axes = _const_ints(ctx.inp(1))
    return ctx.call(_reduce, ctx.inp(0), _REDUCE[op], axes, bool(int(a.get("keepdims", 1))),
                    bool(int(a.get("noop_with_empty_axes", 0))))


@converter("ArgMax", "ArgMin")
def _arg_op(ctx: ConvertContext, a: dict):
    kind = "max" if ctx.node.op_type == "ArgMax" else "min"
    return ctx.call(_arg_reduce, ctx.inp(0), kind, int(a.get("axis", 0)), bool(int(a.get("keepdims", 1))),
                    bool(int(a.get("select_last_index", 0))))

