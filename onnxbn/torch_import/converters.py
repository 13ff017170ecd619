"""The layer converters: `@converter("Conv")` registers `_conv_op` (the contract: `registry`).

A converter gets the importer (`ctx`: the current node, its inputs as values or fx
nodes, and `ctx.call` / `ctx.module` to emit graph nodes) and the node's attributes,
and returns the node's output value(s), or refuses with `ctx.fail(why)` (a one-line
UserError naming the node, op, opset and the attribute value). `SUPPORTED_OPS` is the set
of registered ops. This module holds the registry and the layer converters (Conv,
pooling, Gemm, MatMul, elementwise with trainable operands, BN, Reshape family, Pad, ...);
converters_elementwise, converters_shape, converters_nn and resize register the rest when
imported at the bottom of this module.
"""

from __future__ import annotations

import operator

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from onnxbn.graph import FLOAT_TYPES
from onnxbn.torch_import.ops import (
    _AVGPOOL_FN,
    _MAXPOOL_FN,
    OnnxDropout,
    OnnxElementwise,
    OnnxGemm,
    OnnxMatMul,
    _batch_norm_training,
    _BatchNormAnyD,
    _clip,
    _constant_of_shape,
    _conv,
    _div,
    _flatten,
    _gemm,
    _global_pool,
    _ints,
    _lrn,
    _max_pool_indices,
    _pad,
    _pad_same,
    _pad_spatial,
    _pool,
    _reshape,
    _same_pads,
    _softmax_2d,
    _squeeze,
    _to_tensor,
    _transpose,
    _unsqueeze,
)
from onnxbn.torch_import.registry import ConvertContext, converter

LINEAR_PRODUCERS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}



def _spatial_attrs(ctx: ConvertContext, a: dict, nd: int):
    """strides, dilations, pads (an empty list is the default, as onnxruntime reads it) and auto_pad;
    a list of another length than the `nd` spatial axes need is refused."""
    strides = list(a.get("strides") or [1] * nd)
    dilations = list(a.get("dilations") or [1] * nd)
    pads = list(a.get("pads") or [0] * (2 * nd))
    for name, values, size in (("strides", strides, nd), ("dilations", dilations, nd), ("pads", pads, 2 * nd)):
        if len(values) != size:
            ctx.fail(f"{name} {values} does not fit {nd} spatial axes")
    auto_pad = a.get("auto_pad", "NOTSET") or "NOTSET"
    if auto_pad not in ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"):
        ctx.fail(f"auto_pad {auto_pad!r} unknown")
    return strides, dilations, pads, auto_pad


def _static_pads(ctx: ConvertContext, x_name: str, kernel, strides, dilations, pads, auto_pad):
    """(begins, ends) at import, or None when SAME padding depends on an unknown input size."""
    nd = len(kernel)
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
    if auto_pad == "VALID":
        return [0] * nd, [0] * nd
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if all(s == 1 for s in strides):
            return _same_pads([1] * nd, eff, strides, auto_pad == "SAME_UPPER")
        shape = ctx.shape(x_name)
        if shape is None or len(shape) != nd + 2 or not all(isinstance(n, int) and n > 0 for n in shape[2:]):
            return None
        return _same_pads(shape[2:], eff, strides, auto_pad == "SAME_UPPER")
    return list(pads[:nd]), list(pads[nd:])


@converter("Conv")
def _conv_op(ctx: ConvertContext, a: dict):
    node = ctx.node
    x = ctx.inp(0)
    w_name = node.input[1]
    b_name = node.input[2] if len(node.input) > 2 else ""
    group = int(a.get("group", 1))
    if ctx.is_weight(w_name) and (not b_name or ctx.is_weight(b_name)):
        w = ctx.param(w_name)
        nd = w.dim() - 2
        if nd not in (1, 2, 3):
            ctx.fail(f"{nd}-D convolution")
        kernel = list(a.get("kernel_shape", w.shape[2:]))
        strides, dilations, pads, auto_pad = _spatial_attrs(ctx, a, nd)
        static = _static_pads(ctx, node.input[0], kernel, strides, dilations, pads, auto_pad)
        padding = [0] * nd
        if static is None:
            eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
            x = ctx.call(_pad_same, x, eff, strides, auto_pad == "SAME_UPPER")
        elif static[0] == static[1]:
            padding = static[0]
        else:
            x = ctx.call(_pad_spatial, x, static[0], static[1])
        cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]
        mod = cls(w.shape[1] * group, w.shape[0], kernel, stride=strides, padding=padding,
                  dilation=dilations, groups=group, bias=bool(b_name), device="meta")
        mod.weight = w
        params = {"weight": w_name}
        if b_name:
            mod.bias = ctx.param(b_name)
            params["bias"] = b_name
        return ctx.module(mod, x, params=params)
    w, b = ctx.inp(1), ctx.inp(2)
    nd = len(a["kernel_shape"]) if "kernel_shape" in a else (ctx.rank(w_name) or 4) - 2
    strides, dilations, pads, auto_pad = _spatial_attrs(ctx, a, nd)
    return ctx.call(_conv, x, w, b, strides, pads, dilations, group, auto_pad)


def _pool_op(ctx: ConvertContext, a: dict, kind: str):
    node = ctx.node
    kernel = list(a["kernel_shape"])
    nd = len(kernel)
    if nd not in (1, 2, 3):
        ctx.fail(f"{nd}-D pooling")
    strides, dilations, pads, auto_pad = _spatial_attrs(ctx, a, nd)
    ceil_mode = int(a.get("ceil_mode", 0))
    cip = int(a.get("count_include_pad", 0))
    x = ctx.inp(0)
    if len(node.output) > 1 and node.output[1]:  # MaxPool's Indices
        both = ctx.call(_max_pool_indices, x, kernel, strides, pads, dilations, ceil_mode, auto_pad,
                        int(a.get("storage_order", 0)))
        return [both[i] if isinstance(both, tuple) else ctx.graph.call_function(operator.getitem, (both, i))
                for i in (0, 1)]
    static = _static_pads(ctx, node.input[0], kernel, strides, dilations, pads, auto_pad)
    if static is not None and static[0] == static[1]:
        pad = static[0]
        same = auto_pad in ("SAME_UPPER", "SAME_LOWER")
        if kind == "max" and all(2 * p <= k for p, k in zip(pad, kernel, strict=True)) and not (same and ceil_mode):
            return ctx.call(_MAXPOOL_FN[nd], x, kernel, strides, pad, dilations, bool(ceil_mode))
        if kind == "avg" and all(d == 1 for d in dilations) and all(2 * p <= k for p, k in zip(pad, kernel, strict=True)) \
                and not (same and ceil_mode) and (cip or not any(pad) or not same):
            return ctx.call(_AVGPOOL_FN[nd], x, kernel, strides, pad, bool(ceil_mode), bool(cip))
    return ctx.call(_pool, x, kind, kernel, strides, pads, dilations, ceil_mode, cip, auto_pad)


@converter("MaxPool")
def _maxpool_op(ctx, a):
    return _pool_op(ctx, a, "max")


@converter("AveragePool")
def _avgpool_op(ctx, a):
    return _pool_op(ctx, a, "avg")


@converter("GlobalAveragePool")
def _gap_op(ctx, a):
    return ctx.call(_global_pool, ctx.inp(0), "avg")


@converter("GlobalMaxPool")
def _gmp_op(ctx, a):
    return ctx.call(_global_pool, ctx.inp(0), "max")


@converter("Gemm")
def _gemm_op(ctx: ConvertContext, a: dict):
    node = ctx.node
    alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
    ta, tb = bool(a.get("transA", 0)), bool(a.get("transB", 0))
    b_name = node.input[1]
    c_name = node.input[2] if len(node.input) > 2 else ""
    x = ctx.inp(0)
    if ctx.is_weight(b_name) and len(ctx.inits[b_name].dims) == 2:
        w = ctx.param(b_name)
        c_const = not c_name or ctx.is_weight(c_name)
        c_dims = list(ctx.inits[c_name].dims) if c_name and c_name in ctx.inits else None
        n_out = w.shape[0] if tb else w.shape[1]
        params = {"weight": b_name}
        if tb and not ta and alpha == 1.0 and (not c_name or beta == 1.0) and c_const \
                and (c_dims is None or c_dims == [n_out]):
            mod = nn.Linear(w.shape[1], w.shape[0], bias=bool(c_name), device="meta")
            mod.weight = w
            if c_name:
                mod.bias = ctx.param(c_name)
                params["bias"] = c_name
            return ctx.module(mod, x, params=params)
        bias = None
        if c_name and c_const:
            bias = ctx.param(c_name)
            params["bias"] = c_name
        mod = OnnxGemm(w, bias, alpha, beta, ta, tb)
        if c_name and not c_const:
            return ctx.module(mod, x, ctx.inp(2), params=params)
        return ctx.module(mod, x, params=params)
    return ctx.call(_gemm, x, ctx.inp(1), ctx.inp(2), alpha, beta, ta, tb)


@converter("MatMul")
def _matmul_op(ctx: ConvertContext, a: dict):
    n0, n1 = ctx.node.input[0], ctx.node.input[1]
    for idx, name in ((1, n1), (0, n0)):
        other = n0 if idx == 1 else n1
        if ctx.is_weight(name) and len(ctx.inits[name].dims) == 2 and not ctx.is_weight(other):
            mod = OnnxMatMul(ctx.param(name), weight_first=(idx == 0))
            return ctx.module(mod, ctx.inp(1 - idx), params={"weight": name})
    return ctx.call(torch.matmul, ctx.inp(0), ctx.inp(1))


_BINARY = {"Add": operator.add, "Sub": operator.sub, "Mul": operator.mul, "Div": _div}


NORMALIZATIONS = {"BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization"}
_SHAPE_ONLY = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}


def _trainable_operand(ctx: ConvertContext, node: onnx.NodeProto, depth: int = 0) -> int | None:
    """Which input (0 or 1) of an Add/Sub/Mul/Div is a trainable bias or scale, or None.

    It is a float initializer of rank >= 1 applied to the output of a linear layer (Conv,
    ConvTranspose, Gemm, MatMul), of a normalization seen through shape-only ops (GroupNorm
    as exporters write it: InstanceNormalization -> Reshape -> Mul -> Add), or of an
    Add/Sub/Mul/Div that itself holds such a bias or scale (Linear's bias, then a layer scale)."""
    for idx in (1, 0):
        name, other = node.input[idx], node.input[1 - idx]
        if not (ctx.is_weight(name) and not ctx.is_weight(other) and len(ctx.inits[name].dims) >= 1):
            continue
        producer = ctx.producers.get(other)
        if producer is None:
            return None
        if producer.op_type in LINEAR_PRODUCERS:
            return idx
        walk = producer
        while walk is not None and walk.op_type in _SHAPE_ONLY:
            walk = ctx.producers.get(walk.input[0])
        if walk is not None and walk.op_type in NORMALIZATIONS:
            return idx
        if producer.op_type in _BINARY and depth < 8 and _trainable_operand(ctx, producer, depth + 1) is not None:
            return idx
        return None
    return None


@converter("Add", "Sub", "Mul", "Div")
def _binary_op(ctx: ConvertContext, a: dict):
    node = ctx.node
    if ctx.opset < 7 and a.get("broadcast"):
        ctx.fail("legacy broadcast attribute")
    idx = _trainable_operand(ctx, node)
    if idx is not None:
        name = node.input[idx]
        mod = OnnxElementwise(node.op_type, ctx.param(name), param_first=(idx == 0))
        return ctx.module(mod, ctx.inp(1 - idx), params={"weight": name})
    fn = _BINARY[node.op_type]
    if node.op_type == "Div" and ctx.elem_type(node.output[0]) in FLOAT_TYPES:
        fn = operator.truediv
    return ctx.call(fn, ctx.inp(0), ctx.inp(1))


@converter("Sum")
def _sum_op(ctx: ConvertContext, a: dict):
    vals = [ctx.inp(i) for i in range(len(ctx.node.input))]
    acc = vals[0]
    for v in vals[1:]:
        acc = ctx.call(operator.add, acc, v)
    return acc


@converter("Relu")
def _relu_op(ctx, a):
    return ctx.call(F.relu, ctx.inp(0))


@converter("LeakyRelu")
def _leaky_op(ctx, a):
    return ctx.call(F.leaky_relu, ctx.inp(0), float(a.get("alpha", 0.01)))


@converter("Sigmoid")
def _sigmoid_op(ctx, a):
    return ctx.call(torch.sigmoid, ctx.inp(0))


@converter("Tanh")
def _tanh_op(ctx, a):
    return ctx.call(torch.tanh, ctx.inp(0))


@converter("Clip")
def _clip_op(ctx: ConvertContext, a: dict):
    x = ctx.inp(0)
    if ctx.opset < 11:
        lo, hi = a.get("min"), a.get("max")
        return ctx.call(_clip, x, None if lo is None else float(lo), None if hi is None else float(hi))
    lo, hi = ctx.inp(1), ctx.inp(2)
    lo = lo.item() if isinstance(lo, torch.Tensor) else lo
    hi = hi.item() if isinstance(hi, torch.Tensor) else hi
    return ctx.call(_clip, x, lo, hi)


def _softmax_common(ctx: ConvertContext, a: dict, log: bool):
    x = ctx.inp(0)
    rank = ctx.rank(ctx.node.input[0])
    if ctx.opset >= 13:
        return ctx.call(F.log_softmax if log else F.softmax, x, int(a.get("axis", -1)))
    axis = int(a.get("axis", 1))
    if rank is not None and (axis == -1 or axis == rank - 1):
        return ctx.call(F.log_softmax if log else F.softmax, x, -1)
    return ctx.call(_softmax_2d, x, axis, log)


@converter("Softmax")
def _softmax_op(ctx, a):
    return _softmax_common(ctx, a, False)


@converter("LogSoftmax")
def _logsoftmax_op(ctx, a):
    return _softmax_common(ctx, a, True)


@converter("Flatten")
def _flatten_op(ctx: ConvertContext, a: dict):
    axis = int(a.get("axis", 1))
    rank = ctx.rank(ctx.node.input[0])
    if axis == 1 and rank is not None and rank >= 2:
        return ctx.call(torch.flatten, ctx.inp(0), 1)
    return ctx.call(_flatten, ctx.inp(0), axis)


@converter("Reshape")
def _reshape_op(ctx: ConvertContext, a: dict):
    if ctx.opset < 5:
        ctx.fail("shape attribute (opset < 5)")
    x, shape = ctx.inp(0), ctx.inp(1)
    allowzero = int(a.get("allowzero", 0))
    if isinstance(shape, torch.Tensor):
        dims = _ints(shape)
        if allowzero or 0 not in dims:
            return ctx.call(torch.reshape, x, dims)
        return ctx.call(_reshape, x, dims, 0)
    return ctx.call(_reshape, x, shape, allowzero)


@converter("Transpose")
def _transpose_op(ctx: ConvertContext, a: dict):
    perm = a.get("perm")
    if perm is None:
        return ctx.call(_transpose, ctx.inp(0))
    return ctx.call(torch.permute, ctx.inp(0), list(perm))


@converter("Concat")
def _concat_op(ctx: ConvertContext, a: dict):
    vals = [ctx.inp(i) for i in range(len(ctx.node.input))]
    return ctx.call(torch.cat, vals, int(a["axis"]))


@converter("Dropout")
def _dropout_op(ctx: ConvertContext, a: dict):
    node = ctx.node
    ratio = float(a.get("ratio", 0.5))
    dyn_ratio = None
    if ctx.opset >= 12 and len(node.input) > 1 and node.input[1]:
        r = ctx.inp(1)
        if isinstance(r, torch.Tensor):
            ratio = float(r.reshape(-1)[0])
        else:
            dyn_ratio = r
    want_mask = len(node.output) > 1 and bool(node.output[1])
    mod = OnnxDropout(ratio, return_mask=want_mask)
    out = ctx.module(mod, ctx.inp(0)) if dyn_ratio is None else ctx.module(mod, ctx.inp(0), dyn_ratio)
    if not want_mask:
        return out
    return [ctx.graph.call_function(operator.getitem, (out, 0)), ctx.graph.call_function(operator.getitem, (out, 1))]


@converter("BatchNormalization")
def _bn_op(ctx: ConvertContext, a: dict):
    node = ctx.node
    if ctx.opset < 9 and not int(a.get("spatial", 1)):
        ctx.fail("spatial=0 is not supported")
    # attributes are float32: 0.9f -> 0.10000002; keep the decimal the exporter meant
    eps = float(f"{float(a.get('epsilon', 1e-5)):.7g}")
    momentum = float(f"{float(a.get('momentum', 0.9)):.7g}")
    if int(a.get("training_mode", 0)):  # opset 14+: batch statistics, and the updated running ones
        outs = ctx.call(_batch_norm_training, *(ctx.inp(i) for i in range(5)), eps, momentum)
        return [outs[i] if isinstance(outs, tuple) else ctx.graph.call_function(operator.getitem, (outs, i))
                for i in range(3)]
    if len([o for o in node.output if o]) > 1:
        ctx.fail("training outputs (running mean/var, saved mean/var) are not supported")
    names = list(node.input[1:5])
    if all(ctx.is_weight(n) for n in names):
        scale, bias = ctx.param(names[0]), ctx.param(names[1])
        rank = ctx.rank(node.input[0])
        known = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
        cls = known[rank] if rank in known else _BatchNormAnyD  # rank None: unknown
        mod = cls(scale.shape[0], eps=eps, momentum=float(f"{1.0 - momentum:.7g}"), device="meta")
        mod.weight, mod.bias = scale, bias
        mod.running_mean = ctx.init_tensor(names[2])
        mod.running_var = ctx.init_tensor(names[3])
        buffers = {"running_mean": names[2], "running_var": names[3]}
        mod.num_batches_tracked = torch.tensor(0, dtype=torch.long)
        return ctx.module(mod, ctx.inp(0), params={"weight": names[0], "bias": names[1]}, buffers=buffers)
    x, scale, bias, mean, var = (ctx.inp(i) for i in range(5))
    return ctx.call(F.batch_norm, x, mean, var, scale, bias, False, 0.0, eps)


@converter("LRN")
def _lrn_op(ctx: ConvertContext, a: dict):
    return ctx.call(_lrn, ctx.inp(0), int(a["size"]), float(a.get("alpha", 1e-4)), float(a.get("beta", 0.75)),
                    float(a.get("bias", 1.0)))


@converter("Identity")
def _identity_op(ctx: ConvertContext, a: dict):
    return ctx.inp(0)


@converter("Constant")
def _constant_op(ctx: ConvertContext, a: dict):
    if "value" in a:
        if a["value"].data_type == onnx.TensorProto.STRING:
            ctx.fail("string constants are not supported")
        return _to_tensor(a["value"])
    if "value_float" in a:
        return torch.tensor(float(a["value_float"]), dtype=torch.float32)
    if "value_floats" in a:
        return torch.tensor(list(a["value_floats"]), dtype=torch.float32)
    if "value_int" in a:
        return torch.tensor(int(a["value_int"]), dtype=torch.int64)
    if "value_ints" in a:
        return torch.tensor(list(a["value_ints"]), dtype=torch.int64)
    ctx.fail(f"attribute {next(iter(a), '?')!r} is not supported")


@converter("ConstantOfShape")
def _cos_op(ctx: ConvertContext, a: dict):
    value = _to_tensor(a["value"]) if "value" in a else torch.zeros(1, dtype=torch.float32)
    return ctx.call(_constant_of_shape, ctx.inp(0), value)


@converter("Unsqueeze")
def _unsqueeze_op(ctx: ConvertContext, a: dict):
    axes = ctx.inp(1) if ctx.opset >= 13 else list(a["axes"])
    if isinstance(axes, torch.Tensor):
        axes = _ints(axes)
    return ctx.call(_unsqueeze, ctx.inp(0), axes)


@converter("Squeeze")
def _squeeze_op(ctx: ConvertContext, a: dict):
    axes = ctx.inp(1) if ctx.opset >= 13 else a.get("axes")
    if isinstance(axes, torch.Tensor):
        axes = _ints(axes)
    elif isinstance(axes, (list, tuple)):
        axes = list(axes)
    return ctx.call(_squeeze, ctx.inp(0), axes)


@converter("Pad")
def _pad_op(ctx: ConvertContext, a: dict):
    mode = a.get("mode", "constant") or "constant"
    if mode not in ("constant", "reflect", "edge", "wrap"):
        ctx.fail(f"mode {mode!r} is not supported")
    if ctx.opset < 11:
        pads = list(a.get("pads", a.get("paddings", [])))
        return ctx.call(_pad, ctx.inp(0), pads, mode, float(a.get("value", 0.0)), None)
    pads, value, axes = ctx.inp(1), ctx.inp(2), ctx.inp(3)
    if isinstance(pads, torch.Tensor):
        pads = _ints(pads)
    if isinstance(axes, torch.Tensor):
        axes = _ints(axes)
    if isinstance(value, torch.Tensor):
        value = value.reshape(-1)[0].item() if value.numel() else None
    return ctx.call(_pad, ctx.inp(0), pads, mode, value, axes)

