"""ONNX -> torch.fx GraphModule, and trained weights back into the ONNX graph.

`to_torch(model)` builds a `torch.fx.Graph` node by node from the ONNX graph (no
tracing) and returns a `GraphModule` whose forward takes the graph's run-time
inputs in graph-input order and returns one tensor (one graph output) or a tuple
in graph-output order. Layers become ordinary torch modules named after their
ONNX nodes (sanitised to attribute names, unique, deterministic):
Conv -> nn.Conv{1,2,3}d, Gemm -> nn.Linear (transA=0, transB=1, alpha=beta=1,
1-D or no bias) or `OnnxGemm`, MatMul with a 2-D float initializer -> `OnnxMatMul`,
BatchNormalization -> nn.BatchNorm{1,2,3}d with `momentum_torch = 1 - momentum_onnx`,
Dropout -> `OnnxDropout` (an nn.Dropout: live in train mode, identity in eval).
Every weight is an nn.Parameter holding exactly the initializer's shape and layout;
BN mean/var are the BN modules' running-stat buffers. A float initializer added to
(or multiplied with) the output of Conv/Gemm/MatMul is a bias and trainable too
(`OnnxElementwise`). Every other initializer (Reshape shapes, constants) is a
constant: folded at import where all of an op's inputs are constant, otherwise a
non-trainable buffer. An op or attribute outside the supported set fails at import
with a UserError naming the node, the op and the opset.

The module carries the maps that make write-back exact:
`onnx_names` (module path -> ONNX node name) and `onnx_tensors` (state_dict key ->
initializer name). `write_back(module, model)` returns a copy of the model with
exactly those initializers replaced (cast to their original dtype, shapes checked)
and a `onnxbn.write_back` metadata entry; nodes, names, opset and other metadata are
untouched. `split_at(module, node)` cuts the module after an ONNX node into a
prefix and a suffix that share the original's parameters:
`suffix(*as_tuple(prefix(*inputs))) == module(*inputs)`.
"""

from __future__ import annotations

import hashlib
import json
import keyword
import math
import operator
import os
import re
from typing import Any, Callable

import numpy as np
import onnx
import torch
import torch.fx as fx
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from onnxbn.errors import UserError
from onnxbn.graph import load_model, opset_version, tensor_shape, unique_name, value_types, with_metadata

__all__ = ["to_torch", "write_back", "split_at", "SUPPORTED_OPS", "OnnxGemm", "OnnxMatMul",
           "OnnxElementwise", "OnnxDropout"]

MIN_OPSET = 7
LINEAR_PRODUCERS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


# ============================================================================ modules

class OnnxGemm(nn.Module):
    """ONNX Gemm with its B (and C) as parameters in ONNX layout: Y = alpha*A'B' + beta*C."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, alpha: float, beta: float,
                 trans_a: bool, trans_b: bool):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.alpha, self.beta, self.trans_a, self.trans_b = alpha, beta, trans_a, trans_b

    def forward(self, a: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        return _gemm(a, self.weight, self.bias if c is None else c, self.alpha, self.beta, self.trans_a, self.trans_b)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, transA={int(self.trans_a)}, transB={int(self.trans_b)}"


class OnnxMatMul(nn.Module):
    """MatMul with a trainable constant operand (`weight`, ONNX layout)."""

    def __init__(self, weight: nn.Parameter, weight_first: bool):
        super().__init__()
        self.weight = weight
        self.weight_first = weight_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.weight, x) if self.weight_first else torch.matmul(x, self.weight)


class OnnxElementwise(nn.Module):
    """Add/Sub/Mul/Div with a trainable constant operand (a bias or a scale after a linear layer)."""

    _OPS = {"Add": operator.add, "Sub": operator.sub, "Mul": operator.mul, "Div": operator.truediv}

    def __init__(self, op: str, param: nn.Parameter, param_first: bool):
        super().__init__()
        self.op = op
        self.param_first = param_first
        self.weight = param

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = self._OPS[self.op]
        return fn(self.weight, x) if self.param_first else fn(x, self.weight)

    def extra_repr(self) -> str:
        return f"op={self.op}, param_first={self.param_first}"


class OnnxDropout(nn.Dropout):
    """nn.Dropout (live in train mode, identity in eval) that can also return ONNX's mask output."""

    def __init__(self, p: float = 0.5, return_mask: bool = False):
        super().__init__(p)
        self.return_mask = return_mask

    def forward(self, x: torch.Tensor, ratio: torch.Tensor | None = None):
        p = float(ratio) if ratio is not None else self.p
        if not self.return_mask:
            return F.dropout(x, p, self.training)
        if not self.training or p == 0.0:
            return x, torch.ones(x.shape, dtype=torch.bool, device=x.device)
        mask = torch.rand(x.shape, device=x.device) >= p
        return x * mask.to(x.dtype) / (1.0 - p), mask


class _BatchNormAnyD(nn.modules.batchnorm._BatchNorm):
    """BatchNorm for an input whose rank shape inference could not tell."""

    def _check_input_dim(self, input):  # noqa: A002 - torch's name
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


# ============================================================================ run-time helpers
# Module-level functions so the generated forward (and torch.save) can refer to them.

def _ints(v) -> list[int]:
    if isinstance(v, torch.Tensor):
        return [int(i) for i in v.reshape(-1).tolist()]
    return [int(i) for i in v]


def _same_pads(spatial, eff_kernel, strides, upper: bool) -> tuple[list[int], list[int]]:
    begins, ends = [], []
    for n, k, s in zip(spatial, eff_kernel, strides):
        out = -(-int(n) // s)
        total = max((out - 1) * s + k - int(n), 0)
        small, big = total // 2, total - total // 2
        begins.append(small if upper else big)
        ends.append(big if upper else small)
    return begins, ends


def _torch_pad_list(begins, ends) -> list[int]:
    """F.pad's order (last dim first) for pads on the trailing len(begins) dims."""
    out: list[int] = []
    for b, e in zip(reversed(list(begins)), reversed(list(ends))):
        out += [int(b), int(e)]
    return out


def _pad_spatial(x, begins, ends, value=0.0):
    if not any(begins) and not any(ends):
        return x
    return F.pad(x, _torch_pad_list(begins, ends), value=value)


def _pad_same(x, eff_kernel, strides, upper, value=0.0):
    begins, ends = _same_pads(x.shape[2:], eff_kernel, strides, upper)
    return _pad_spatial(x, begins, ends, value)


_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_MAXPOOL_FN = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVGPOOL_FN = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _resolve_pads(x, kernel, strides, pads, dilations, auto_pad):
    nd = len(kernel)
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return _same_pads(x.shape[2:], eff, strides, auto_pad == "SAME_UPPER")
    if auto_pad == "VALID" or not pads:
        return [0] * nd, [0] * nd
    return list(pads[:nd]), list(pads[nd:])


def _conv(x, w, b, strides, pads, dilations, group, auto_pad="NOTSET"):
    """Functional ONNX Conv (any padding) for weights that are not initializers."""
    nd = w.dim() - 2
    kernel = list(w.shape[2:])
    begins, ends = _resolve_pads(x, kernel, strides, pads, dilations, auto_pad)
    if begins != ends:
        x = _pad_spatial(x, begins, ends)
        begins = [0] * nd
    return _CONV_FN[nd](x, w, b, strides, begins, dilations, group)


def _pool(x, kind, kernel, strides, pads, dilations, ceil_mode, count_include_pad, auto_pad="NOTSET"):
    """ONNX MaxPool/AveragePool for any padding, dilation and ceil mode.

    Output size per axis: floor or ceil((n + pads - eff) / s) + 1, less one when the last
    window would start in the end padding (torch's rule, ONNX's since opset 19). The
    input is padded explicitly (-inf for max; zeros for average, with a mask that
    counts the explicit pads only when count_include_pad), pooled without padding
    and cropped to that size.
    """
    nd = len(kernel)
    spatial = [int(n) for n in x.shape[2:]]
    begins, ends = _resolve_pads(x, kernel, strides, pads, dilations, auto_pad)
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    ceil_mode = bool(ceil_mode) and auto_pad not in ("SAME_UPPER", "SAME_LOWER")
    outs, extra = [], []
    for n, b, e, k, s in zip(spatial, begins, ends, eff, strides):
        span = n + b + e - k
        out = (-(-span // s) if ceil_mode else span // s) + 1
        if ceil_mode and (out - 1) * s >= n + b:
            out -= 1
        out = max(out, 0)
        outs.append(out)
        extra.append(max(0, (out - 1) * s + k - (n + b + e)))
    ends_x = [e + x_ for e, x_ in zip(ends, extra)]
    if kind == "max":
        low = float("-inf") if x.is_floating_point() else torch.iinfo(x.dtype).min
        y = _MAXPOOL_FN[nd](_pad_spatial(x, begins, ends_x, low), kernel, strides, 0, dilations)
    else:
        channels = x.shape[1]
        ones_k = torch.ones((channels, 1, *kernel), dtype=x.dtype, device=x.device)
        total = _CONV_FN[nd](_pad_spatial(x, begins, ends_x), ones_k, None, strides, 0, dilations, channels)
        mask = torch.ones((1, 1, *spatial), dtype=x.dtype, device=x.device)
        mask = _pad_spatial(mask, begins, ends, 1.0 if count_include_pad else 0.0)
        mask = _pad_spatial(mask, [0] * nd, extra, 0.0)
        count = _CONV_FN[nd](mask, ones_k[:1], None, strides, 0, dilations)
        y = total / count
    for axis, out in enumerate(outs):
        if y.shape[2 + axis] != out:
            y = y.narrow(2 + axis, 0, out)
    return y


def _global_pool(x, kind):
    dims = tuple(range(2, x.dim()))
    if kind == "max":
        return torch.amax(x, dim=dims, keepdim=True)
    return torch.mean(x, dim=dims, keepdim=True)


def _gemm(a, b, c, alpha, beta, trans_a, trans_b):
    y = torch.matmul(a.t() if trans_a else a, b.t() if trans_b else b)
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return y


def _div(a, b):
    if a.is_floating_point() or b.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


def _flatten(x, axis):
    rank = x.dim()
    axis = axis + rank if axis < 0 else axis
    outer = math.prod(int(n) for n in x.shape[:axis])
    inner = math.prod(int(n) for n in x.shape[axis:])
    return x.reshape(outer, inner)


def _reshape(x, shape, allowzero=0):
    dims = _ints(shape)
    if not allowzero:
        dims = [int(x.shape[i]) if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _softmax_2d(x, axis, log):
    """Softmax/LogSoftmax before opset 13: over all axes from `axis` on, as a 2-D matrix."""
    shape = x.shape
    axis = axis + x.dim() if axis < 0 else axis
    flat = x.reshape(math.prod(int(n) for n in shape[:axis]), -1)
    y = F.log_softmax(flat, dim=1) if log else F.softmax(flat, dim=1)
    return y.reshape(shape)


def _unsqueeze(x, axes):
    axes = _ints(axes)
    rank = x.dim() + len(axes)
    for a in sorted(a + rank if a < 0 else a for a in axes):
        x = x.unsqueeze(a)
    return x


def _squeeze(x, axes=None):
    if axes is None:
        return torch.squeeze(x)
    axes = _ints(axes)
    if not axes:
        return torch.squeeze(x)
    return torch.squeeze(x, tuple(a + x.dim() if a < 0 else a for a in axes))


def _transpose(x, perm=None):
    return x.permute(list(range(x.dim() - 1, -1, -1)) if perm is None else perm)


def _pad_indices(n: int, before: int, after: int, mode: str, device) -> torch.Tensor:
    idx = torch.arange(-before, n + after, device=device)
    if mode == "edge":
        return idx.clamp(0, n - 1)
    if mode == "wrap":
        return torch.remainder(idx, n)
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    idx = torch.remainder(idx.abs(), period)
    return torch.where(idx >= n, period - idx, idx)


def _pad(x, pads, mode="constant", value=None, axes=None):
    """ONNX Pad: pads = [begins..., ends...] over `axes` (default all); negative pads crop."""
    pads = _ints(pads)
    rank = x.dim()
    axes = list(range(rank)) if axes is None else [a + rank if a < 0 else a for a in _ints(axes)]
    k = len(axes)
    begins = dict(zip(axes, pads[:k]))
    ends = dict(zip(axes, pads[k:]))
    if mode == "constant":
        flat: list[int] = []
        for d in range(rank - 1, -1, -1):
            flat += [begins.get(d, 0), ends.get(d, 0)]
        if isinstance(value, torch.Tensor):
            value = value.item() if value.numel() else 0
        return F.pad(x, flat, value=0 if value is None else value)
    for d in axes:
        b, e = begins[d], ends[d]
        if b < 0:
            x, b = x.narrow(d, -b, x.shape[d] + b), 0
        if e < 0:
            x, e = x.narrow(d, 0, x.shape[d] + e), 0
        if b or e:
            x = torch.index_select(x, d, _pad_indices(int(x.shape[d]), b, e, mode, x.device))
    return x


def _lrn(x, size, alpha, beta, bias):
    """ONNX LRN: x / (bias + alpha/size * sum of squares over [c - (size-1)//2, c + ceil((size-1)/2)])^beta."""
    n, c = x.shape[0], x.shape[1]
    sq = (x * x).reshape(n, 1, c, -1)
    sq = F.pad(sq, (0, 0, (size - 1) // 2, size - 1 - (size - 1) // 2))
    total = F.avg_pool2d(sq, (size, 1), stride=1) * size
    return x / (bias + alpha / size * total.reshape(x.shape)) ** beta


def _constant_of_shape(shape, value):
    dims = _ints(shape)
    device = shape.device if isinstance(shape, torch.Tensor) else None
    return torch.full(dims, value.reshape(-1)[0].item(), dtype=value.dtype, device=device)


def _clip(x, lo=None, hi=None):
    if lo is None and hi is None:
        return x
    return torch.clamp(x, lo, hi)


# ============================================================================ importer

_RESERVED = set(dir(fx.GraphModule)) | {"onnx_names", "onnx_tensors", "onnx_inputs", "onnx_outputs",
                                          "onnx_opset", "onnx_structure", "self"}
_CONSTANTS = "_onnx_constants"


def _sanitize(name: str, fallback: str) -> str:
    s = re.sub(r"\W", "_", name or "", flags=re.ASCII).strip("_") or fallback
    if s[0].isdigit():
        s = "n" + s
    if keyword.iskeyword(s) or s in _RESERVED:
        s = s + "_"
    return s


def _structure_key(model: onnx.ModelProto) -> str:
    h = hashlib.sha256()
    for n in model.graph.node:
        h.update(f"{n.op_type}|{n.name}|{','.join(n.input)}|{','.join(n.output)}\n".encode())
    return h.hexdigest()[:16]


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def _to_tensor(proto: onnx.TensorProto) -> torch.Tensor:
    if proto.data_type == onnx.TensorProto.STRING:
        raise TypeError("string tensor")
    arr = numpy_helper.to_array(proto)
    if proto.data_type == onnx.TensorProto.BFLOAT16:
        return torch.from_numpy(arr.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.array(arr, copy=True))


class _Unsupported(Exception):
    pass


class _Importer:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.opset = opset_version(model)
        self.graph = fx.Graph()
        self.root = nn.Module()
        self.consts = nn.Module()
        self.root.add_module(_CONSTANTS, self.consts)
        self.taken: set[str] = {_CONSTANTS}
        self.const_names: set[str] = set()
        self.const_nodes: dict[int, fx.Node] = {}
        self.env: dict[str, Any] = {}
        self.inits = {t.name: t for t in model.graph.initializer}
        self.init_values: dict[str, torch.Tensor] = {}
        self.params: dict[str, nn.Parameter] = {}        # initializer -> Parameter
        self.param_keys: dict[str, str] = {}             # initializer -> state_dict key of its Parameter
        self.onnx_names: dict[str, str] = {}
        self.onnx_tensors: dict[str, str] = {}
        self.recorded: set[str] = set()
        self.types = value_types(model)
        self.producer_op = {o: n.op_type for n in model.graph.node for o in n.output if o}
        self.node: onnx.NodeProto | None = None

    # ------------------------------------------------------------------ values
    def fail(self, why: str):
        raise _Unsupported(why)

    def value(self, name: str):
        if not name:
            return None
        if name in self.env:
            return self.env[name]
        if name in self.param_keys:  # a weight also used as a plain value elsewhere
            return self.graph.get_attr(self.param_keys[name])
        if name in self.inits:
            if name not in self.init_values:
                try:
                    self.init_values[name] = _to_tensor(self.inits[name])
                except TypeError:
                    self.fail(f"initializer {name!r} is a string tensor")
            return self.init_values[name]
        self.fail(f"input {name!r} is not produced by any earlier node")

    def inp(self, i: int):
        return self.value(self.node.input[i]) if i < len(self.node.input) else None

    def shape(self, name: str) -> list | None:
        return tensor_shape(self.types.get(name))

    def rank(self, name: str) -> int | None:
        s = self.shape(name)
        return None if s is None else len(s)

    def elem_type(self, name: str) -> int | None:
        t = self.types.get(name)
        return t.tensor_type.elem_type if t is not None and t.HasField("tensor_type") else None

    def tensor_node(self, t: torch.Tensor, hint: str = "c") -> fx.Node:
        key = id(t)
        if key not in self.const_nodes:
            name = unique_name(_sanitize(hint, "c"), self.const_names)
            self.consts.register_buffer(name, t)
            self.const_nodes[key] = self.graph.get_attr(f"{_CONSTANTS}.{name}")
        return self.const_nodes[key]

    def _lift(self, a):
        if isinstance(a, torch.Tensor):
            hint = next((n for n, v in self.init_values.items() if v is a), "c")
            return self.tensor_node(a, hint)
        if isinstance(a, (list, tuple)):
            return type(a)(self._lift(x) for x in a)
        return a

    @staticmethod
    def _dynamic(args) -> bool:
        found = False

        def visit(a):
            nonlocal found
            if isinstance(a, fx.Node):
                found = True
            return a
        fx.node.map_aggregate(args, visit)
        return found

    def call(self, fn: Callable, *args, **kwargs):
        """fn(*args): evaluated now when every input is constant, else a graph node."""
        if not self._dynamic((args, kwargs)):
            with torch.no_grad():
                return fn(*args, **kwargs)
        hint = _sanitize(self.node.name, self.node.op_type.lower())
        n = self.graph.create_node("call_function", fn, self._lift(args), self._lift(kwargs), name=hint)
        n.meta["onnx_node"] = self.node.name
        return n

    def module(self, mod: nn.Module, *args, params: dict[str, str] | None = None,
               buffers: dict[str, str] | None = None) -> fx.Node:
        path = unique_name(_sanitize(self.node.name, f"{self.node.op_type.lower()}_{self.index}"), self.taken)
        self.root.add_module(path, mod)
        self.onnx_names[path] = self.node.name
        for attr, init in (params or {}).items():
            self.param_keys.setdefault(init, f"{path}.{attr}")
            if init not in self.recorded:
                self.onnx_tensors[f"{path}.{attr}"] = init
                self.recorded.add(init)
        for attr, init in (buffers or {}).items():
            if init not in self.recorded:  # else: a private copy, not written back
                self.onnx_tensors[f"{path}.{attr}"] = init
                self.recorded.add(init)
        n = self.graph.call_module(path, self._lift(args))
        n.meta["onnx_node"] = self.node.name
        return n

    def param(self, init: str) -> nn.Parameter:
        if init not in self.params:
            self.params[init] = nn.Parameter(_to_tensor(self.inits[init]))
        return self.params[init]

    def is_weight(self, name: str) -> bool:
        return bool(name) and name in self.inits and name not in self.env and \
            self.inits[name].data_type in _FLOAT_TYPES

    # ------------------------------------------------------------------ driver
    def run(self) -> fx.GraphModule:
        g = self.model.graph
        if self.opset < MIN_OPSET:
            raise UserError(f"opset {self.opset} is older than {MIN_OPSET}, the oldest onnxbn's torch importer reads; "
                            "convert the model with onnx.version_converter first")
        arg_names: set[str] = set()
        inputs = []
        for vi in g.input:
            if vi.name in self.inits:
                continue
            ph = self.graph.placeholder(unique_name(_sanitize(vi.name, "input"), arg_names | self.taken))
            arg_names.add(ph.target)
            self.env[vi.name] = ph
            inputs.append(vi.name)
        for self.index, node in enumerate(g.node):
            self.node = node
            label = f"cannot import node {node.name!r} ({node.op_type}, opset {self.opset})"
            if node.domain not in ("", "ai.onnx"):
                raise UserError(f"{label}: domain {node.domain!r} not supported by onnxbn's torch importer")
            conv = _CONVERTERS.get(node.op_type)
            if conv is None:
                raise UserError(f"{label}: op not supported by onnxbn's torch importer")
            try:
                outs = conv(self, _attrs(node))
            except _Unsupported as exc:
                raise UserError(f"{label}: {exc}") from None
            if not isinstance(outs, (list, tuple)):
                outs = [outs]
            for i, name in enumerate(node.output):
                if not name:
                    continue
                if i >= len(outs) or outs[i] is None:
                    raise UserError(f"{label}: output {i} ({name!r}) not supported by onnxbn's torch importer")
                self.env[name] = outs[i]
        results = []
        for vi in g.output:
            if vi.name not in self.env and vi.name not in self.inits:
                raise UserError(f"graph output {vi.name!r} is not produced by any node")
            self.node = onnx.helper.make_node("Identity", [], [], name="")
            v = self.value(vi.name)
            results.append(self._lift(v) if isinstance(v, torch.Tensor) else v)
        self.graph.output(results[0] if len(results) == 1 else tuple(results))
        gm = fx.GraphModule(self.root, self.graph, class_name="OnnxGraphModule")
        _attach(gm, {"onnx_names": dict(self.onnx_names), "onnx_tensors": dict(self.onnx_tensors),
                     "onnx_inputs": inputs, "onnx_outputs": [vi.name for vi in g.output],
                     "onnx_opset": self.opset, "onnx_structure": _structure_key(self.model)})
        return gm


_PRESERVED = getattr(fx.graph_module, "_USER_PRESERVED_ATTRIBUTES_KEY", "_user_preserved_attributes")


def _attach(gm: fx.GraphModule, info: dict[str, Any]) -> None:
    """Set the onnx_* attributes so that they survive copy.deepcopy (and torch.save)."""
    for k, v in info.items():
        setattr(gm, k, v)
    gm.meta.setdefault(_PRESERVED, {}).update(info)


# ============================================================================ converters

_CONVERTERS: dict[str, Callable[[_Importer, dict], Any]] = {}


def _op(*names):
    def deco(fn):
        for n in names:
            _CONVERTERS[n] = fn
        return fn
    return deco


def _spatial_attrs(ctx: _Importer, a: dict, nd: int):
    strides = list(a.get("strides", [1] * nd))
    dilations = list(a.get("dilations", [1] * nd))
    pads = list(a.get("pads", [0] * (2 * nd)))
    auto_pad = a.get("auto_pad", "NOTSET") or "NOTSET"
    if auto_pad not in ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"):
        ctx.fail(f"auto_pad {auto_pad!r} unknown")
    return strides, dilations, pads, auto_pad


def _static_pads(ctx: _Importer, x_name: str, kernel, strides, dilations, pads, auto_pad):
    """(begins, ends) at import, or None when SAME padding depends on an unknown input size."""
    nd = len(kernel)
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
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


@_op("Conv")
def _conv_op(ctx: _Importer, a: dict):
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
            eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
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


def _pool_op(ctx: _Importer, a: dict, kind: str):
    node = ctx.node
    if len([o for o in node.output if o]) > 1:
        ctx.fail("the Indices output is not supported")
    if int(a.get("storage_order", 0)) and len(node.output) > 1:
        ctx.fail("storage_order with Indices")
    kernel = list(a["kernel_shape"])
    nd = len(kernel)
    if nd not in (1, 2, 3):
        ctx.fail(f"{nd}-D pooling")
    strides, dilations, pads, auto_pad = _spatial_attrs(ctx, a, nd)
    ceil_mode = int(a.get("ceil_mode", 0))
    cip = int(a.get("count_include_pad", 0))
    x = ctx.inp(0)
    static = _static_pads(ctx, node.input[0], kernel, strides, dilations, pads, auto_pad)
    if static is not None and static[0] == static[1]:
        pad = static[0]
        same = auto_pad in ("SAME_UPPER", "SAME_LOWER")
        if kind == "max" and all(2 * p <= k for p, k in zip(pad, kernel)) and not (same and ceil_mode):
            return ctx.call(_MAXPOOL_FN[nd], x, kernel, strides, pad, dilations, bool(ceil_mode))
        if kind == "avg" and all(d == 1 for d in dilations) and all(2 * p <= k for p, k in zip(pad, kernel)) \
                and not (same and ceil_mode) and (cip or not any(pad) or not same):
            return ctx.call(_AVGPOOL_FN[nd], x, kernel, strides, pad, bool(ceil_mode), bool(cip))
    return ctx.call(_pool, x, kind, kernel, strides, pads, dilations, ceil_mode, cip, auto_pad)


@_op("MaxPool")
def _maxpool_op(ctx, a):
    return _pool_op(ctx, a, "max")


@_op("AveragePool")
def _avgpool_op(ctx, a):
    return _pool_op(ctx, a, "avg")


@_op("GlobalAveragePool")
def _gap_op(ctx, a):
    return ctx.call(_global_pool, ctx.inp(0), "avg")


@_op("GlobalMaxPool")
def _gmp_op(ctx, a):
    return ctx.call(_global_pool, ctx.inp(0), "max")


@_op("Gemm")
def _gemm_op(ctx: _Importer, a: dict):
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


@_op("MatMul")
def _matmul_op(ctx: _Importer, a: dict):
    n0, n1 = ctx.node.input[0], ctx.node.input[1]
    for idx, name in ((1, n1), (0, n0)):
        other = n0 if idx == 1 else n1
        if ctx.is_weight(name) and len(ctx.inits[name].dims) == 2 and not ctx.is_weight(other):
            mod = OnnxMatMul(ctx.param(name), weight_first=(idx == 0))
            return ctx.module(mod, ctx.inp(1 - idx), params={"weight": name})
    return ctx.call(torch.matmul, ctx.inp(0), ctx.inp(1))


_BINARY = {"Add": operator.add, "Sub": operator.sub, "Mul": operator.mul, "Div": _div}


@_op("Add", "Sub", "Mul", "Div")
def _binary_op(ctx: _Importer, a: dict):
    node = ctx.node
    if ctx.opset < 7 and a.get("broadcast"):
        ctx.fail("legacy broadcast attribute")
    n0, n1 = node.input[0], node.input[1]
    for idx, name in ((1, n1), (0, n0)):
        other = n0 if idx == 1 else n1
        if ctx.is_weight(name) and not ctx.is_weight(other) and ctx.producer_op.get(other) in LINEAR_PRODUCERS \
                and len(ctx.inits[name].dims) >= 1:
            mod = OnnxElementwise(node.op_type, ctx.param(name), param_first=(idx == 0))
            return ctx.module(mod, ctx.inp(1 - idx), params={"weight": name})
    fn = _BINARY[node.op_type]
    if node.op_type == "Div" and ctx.elem_type(node.output[0]) in _FLOAT_TYPES:
        fn = operator.truediv
    return ctx.call(fn, ctx.inp(0), ctx.inp(1))


@_op("Sum")
def _sum_op(ctx: _Importer, a: dict):
    vals = [ctx.inp(i) for i in range(len(ctx.node.input))]
    acc = vals[0]
    for v in vals[1:]:
        acc = ctx.call(operator.add, acc, v)
    return acc


@_op("Relu")
def _relu_op(ctx, a):
    return ctx.call(F.relu, ctx.inp(0))


@_op("LeakyRelu")
def _leaky_op(ctx, a):
    return ctx.call(F.leaky_relu, ctx.inp(0), float(a.get("alpha", 0.01)))


@_op("Sigmoid")
def _sigmoid_op(ctx, a):
    return ctx.call(torch.sigmoid, ctx.inp(0))


@_op("Tanh")
def _tanh_op(ctx, a):
    return ctx.call(torch.tanh, ctx.inp(0))


@_op("Clip")
def _clip_op(ctx: _Importer, a: dict):
    x = ctx.inp(0)
    if ctx.opset < 11:
        lo, hi = a.get("min"), a.get("max")
        return ctx.call(_clip, x, None if lo is None else float(lo), None if hi is None else float(hi))
    lo, hi = ctx.inp(1), ctx.inp(2)
    lo = lo.item() if isinstance(lo, torch.Tensor) else lo
    hi = hi.item() if isinstance(hi, torch.Tensor) else hi
    return ctx.call(_clip, x, lo, hi)


def _softmax_common(ctx: _Importer, a: dict, log: bool):
    x = ctx.inp(0)
    rank = ctx.rank(ctx.node.input[0])
    if ctx.opset >= 13:
        return ctx.call(F.log_softmax if log else F.softmax, x, int(a.get("axis", -1)))
    axis = int(a.get("axis", 1))
    if rank is not None and (axis == -1 or axis == rank - 1):
        return ctx.call(F.log_softmax if log else F.softmax, x, -1)
    return ctx.call(_softmax_2d, x, axis, log)


@_op("Softmax")
def _softmax_op(ctx, a):
    return _softmax_common(ctx, a, False)


@_op("LogSoftmax")
def _logsoftmax_op(ctx, a):
    return _softmax_common(ctx, a, True)


@_op("Flatten")
def _flatten_op(ctx: _Importer, a: dict):
    axis = int(a.get("axis", 1))
    rank = ctx.rank(ctx.node.input[0])
    if axis == 1 and rank is not None and rank >= 2:
        return ctx.call(torch.flatten, ctx.inp(0), 1)
    return ctx.call(_flatten, ctx.inp(0), axis)


@_op("Reshape")
def _reshape_op(ctx: _Importer, a: dict):
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


@_op("Transpose")
def _transpose_op(ctx: _Importer, a: dict):
    perm = a.get("perm")
    if perm is None:
        return ctx.call(_transpose, ctx.inp(0))
    return ctx.call(torch.permute, ctx.inp(0), list(perm))


@_op("Concat")
def _concat_op(ctx: _Importer, a: dict):
    vals = [ctx.inp(i) for i in range(len(ctx.node.input))]
    return ctx.call(torch.cat, vals, int(a["axis"]))


@_op("Dropout")
def _dropout_op(ctx: _Importer, a: dict):
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


@_op("BatchNormalization")
def _bn_op(ctx: _Importer, a: dict):
    node = ctx.node
    if len([o for o in node.output if o]) > 1:
        ctx.fail("training outputs (running mean/var, saved mean/var) are not supported")
    if int(a.get("training_mode", 0)):
        ctx.fail("training_mode=1 is not supported")
    if ctx.opset < 9 and not int(a.get("spatial", 1)):
        ctx.fail("spatial=0 is not supported")
    # attributes are float32: 0.9f -> 0.10000002; keep the decimal the exporter meant
    eps = float(f"{float(a.get('epsilon', 1e-5)):.7g}")
    momentum = float(f"{float(a.get('momentum', 0.9)):.7g}")
    names = list(node.input[1:5])
    if all(ctx.is_weight(n) for n in names):
        scale, bias = ctx.param(names[0]), ctx.param(names[1])
        rank = ctx.rank(node.input[0])
        cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(rank, _BatchNormAnyD)
        mod = cls(scale.shape[0], eps=eps, momentum=float(f"{1.0 - momentum:.7g}"), device="meta")
        mod.weight, mod.bias = scale, bias
        mod.running_mean = _to_tensor(ctx.inits[names[2]])
        mod.running_var = _to_tensor(ctx.inits[names[3]])
        buffers = {"running_mean": names[2], "running_var": names[3]}
        mod.num_batches_tracked = torch.tensor(0, dtype=torch.long)
        return ctx.module(mod, ctx.inp(0), params={"weight": names[0], "bias": names[1]}, buffers=buffers)
    x, scale, bias, mean, var = (ctx.inp(i) for i in range(5))
    return ctx.call(F.batch_norm, x, mean, var, scale, bias, False, 0.0, eps)


@_op("LRN")
def _lrn_op(ctx: _Importer, a: dict):
    return ctx.call(_lrn, ctx.inp(0), int(a["size"]), float(a.get("alpha", 1e-4)), float(a.get("beta", 0.75)),
                    float(a.get("bias", 1.0)))


@_op("Identity")
def _identity_op(ctx: _Importer, a: dict):
    return ctx.inp(0)


@_op("Constant")
def _constant_op(ctx: _Importer, a: dict):
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


@_op("ConstantOfShape")
def _cos_op(ctx: _Importer, a: dict):
    value = _to_tensor(a["value"]) if "value" in a else torch.zeros(1, dtype=torch.float32)
    return ctx.call(_constant_of_shape, ctx.inp(0), value)


@_op("Unsqueeze")
def _unsqueeze_op(ctx: _Importer, a: dict):
    axes = ctx.inp(1) if ctx.opset >= 13 else list(a["axes"])
    if isinstance(axes, torch.Tensor):
        axes = _ints(axes)
    return ctx.call(_unsqueeze, ctx.inp(0), axes)


@_op("Squeeze")
def _squeeze_op(ctx: _Importer, a: dict):
    axes = ctx.inp(1) if ctx.opset >= 13 else a.get("axes")
    if isinstance(axes, torch.Tensor):
        axes = _ints(axes)
    elif isinstance(axes, (list, tuple)):
        axes = list(axes)
    return ctx.call(_squeeze, ctx.inp(0), axes)


@_op("Pad")
def _pad_op(ctx: _Importer, a: dict):
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


SUPPORTED_OPS = frozenset(_CONVERTERS)


# ============================================================================ public API

def to_torch(model: onnx.ModelProto | str | os.PathLike) -> fx.GraphModule:
    """Import an ONNX model (proto or path) as a torch.fx GraphModule; see the module docstring."""
    proto = load_model(model)
    return _Importer(proto).run()


def _module_tensor(module: nn.Module, key: str) -> torch.Tensor:
    path, _, attr = key.rpartition(".")
    owner = module.get_submodule(path) if path else module
    t = getattr(owner, attr, None)
    if not isinstance(t, torch.Tensor):
        raise UserError(f"module has no tensor {key!r}; was it changed after to_torch?")
    return t


def write_back(module: fx.GraphModule, model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    """A copy of `model` with the initializers `module` owns replaced by the module's values.

    Weights, biases, BN scale/B and BN running mean/var are written, cast to each
    initializer's original dtype; nothing else in the model changes except a
    `onnxbn.write_back` metadata entry (JSON: tensors written, tensors changed).
    """
    mapping = getattr(module, "onnx_tensors", None)
    if mapping is None:
        raise UserError("this module was not made by onnxbn.to_torch (no onnx_tensors map); import the model with to_torch")
    proto = load_model(model)
    key = getattr(module, "onnx_structure", None)
    if key is not None and key != _structure_key(proto):
        raise UserError("the module was imported from a different model (nodes differ); write back into the model it came from")
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    by_name = {t.name: t for t in out.graph.initializer}
    written = changed = 0
    for state_key, init_name in mapping.items():
        target = by_name.get(init_name)
        if target is None:
            raise UserError(f"initializer {init_name!r} (module tensor {state_key!r}) is not in the model")
        value = _module_tensor(module, state_key).detach().to("cpu")
        if list(value.shape) != list(target.dims):
            raise UserError(f"module tensor {state_key!r} has shape {list(value.shape)} but initializer "
                            f"{init_name!r} has {list(target.dims)}; shapes must match to write back")
        np_dtype = onnx.helper.tensor_dtype_to_np_dtype(target.data_type)
        arr = value.float().numpy() if value.dtype == torch.bfloat16 else value.numpy()
        arr = np.ascontiguousarray(arr.astype(np_dtype, copy=False))
        old = numpy_helper.to_array(target)
        if old.shape != arr.shape or not np.array_equal(old, arr):
            changed += 1
        new = numpy_helper.from_array(arr, init_name)
        target.CopyFrom(new)
        written += 1
    return with_metadata(out, {"onnxbn.write_back": json.dumps({"tensors": written, "changed": changed},
                                                               separators=(",", ":"))})


def split_at(module: fx.GraphModule, node: str) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Cut `module` after the ONNX node named `node` (everything up to and including its outputs).

    The prefix takes the module's inputs and returns every value the rest of the
    graph needs (one tensor, or a tuple); the suffix takes those values and returns
    the module's outputs: `suffix(*as_tuple(prefix(*inputs)))` equals `module(*inputs)`.
    Both share the module's submodules and parameters, so training the suffix trains
    `module`, and `write_back(module, ...)` sees the result. Freeze the prefix with
    `prefix.eval()` and `requires_grad_(False)` on its parameters.
    """
    names = getattr(module, "onnx_names", None)
    if names is None:
        raise UserError("this module was not made by onnxbn.to_torch")
    nodes = list(module.graph.nodes)
    owner = [n for n in nodes if node and n.meta.get("onnx_node") == node]
    if not owner:
        raise UserError(f"no computing node named {node!r} in the module (nodes folded at import, such as "
                        "Constant or Identity, cannot be split at; ONNX node names: see module.onnx_names)")
    cut = max(nodes.index(n) for n in owner)
    prefix_nodes = [n for n in nodes[:cut + 1] if n.op != "get_attr"]
    prefix_set = set(prefix_nodes)
    suffix_nodes = [n for n in nodes[cut + 1:] if n.op not in ("output",)]
    output_node = nodes[-1]
    boundary: list[fx.Node] = []
    for n in suffix_nodes + [output_node]:
        for used in n.all_input_nodes:
            if used in prefix_set and used not in boundary:
                boundary.append(used)
    boundary.sort(key=nodes.index)

    pre = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in nodes[:cut + 1]:
        env[n] = pre.node_copy(n, lambda x: env[x])
    outs = [env[b] for b in boundary]
    pre.output(outs[0] if len(outs) == 1 else tuple(outs))

    suf = fx.Graph()
    env2: dict[fx.Node, fx.Node] = {}
    for b in boundary:
        env2[b] = suf.placeholder(b.name)
    for n in nodes:
        if n in env2 or (n in prefix_set):
            continue
        if n.op == "placeholder":
            continue
        env2[n] = suf.node_copy(n, lambda x: env2[x])
    prefix = fx.GraphModule(module, pre, class_name="OnnxPrefix")
    suffix = fx.GraphModule(module, suf, class_name="OnnxSuffix")
    for gm in (prefix, suffix):
        mods = dict(gm.named_modules())
        _attach(gm, {"onnx_names": {p: o for p, o in names.items() if p in mods}})
    return prefix, suffix
