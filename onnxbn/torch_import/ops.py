"""Run-time pieces of an imported module: the nn.Module classes and the tensor helpers.

The generated forward (and torch.save) refers to these by module-level name, so they
live here, apart from the import machinery: OnnxGemm, OnnxMatMul, OnnxElementwise,
OnnxDropout, OnnxPRelu, OnnxNorm, OnnxConvTranspose, _BatchNormAnyD, and functional ONNX ops
(_conv, _conv_transpose, _pool, _pad, _clip, the normalizations, ...); `DTYPES` maps ONNX
element types to torch dtypes.
`_to_tensor` turns an initializer or Constant value into a torch tensor.
"""

from __future__ import annotations

import math
import operator

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from onnxbn.io.model import Model
from onnxbn.io.tensors import tensor_array
from onnxbn.torch_import.narrow import NARROW

# ONNX element type -> torch dtype of its values inside an imported module, for the types the
# importer runs (others are refused at import). uint16/32/64, which torch computes little with,
# are held as int64 (exact for uint16/32; uint64 arithmetic is modular, comparisons and
# division of values >= 2**63 are not) and cast back to their type at graph outputs.
UNSIGNED_WIDE: dict[int, torch.dtype] = {onnx.TensorProto.UINT16: torch.uint16, onnx.TensorProto.UINT32: torch.uint32,
                 onnx.TensorProto.UINT64: torch.uint64}
DTYPES: dict[int, torch.dtype] = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT8: torch.int8, onnx.TensorProto.INT16: torch.int16, onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.UINT8: torch.uint8, onnx.TensorProto.BOOL: torch.bool,
} | {t: torch.int64 for t in UNSIGNED_WIDE}
# 8-bit floats: torch's own dtypes; ONNX lets only data-movement ops (Cast, Reshape, ...) take them
FLOAT8: dict[int, torch.dtype] = {
    onnx.TensorProto.FLOAT8E4M3FN: torch.float8_e4m3fn, onnx.TensorProto.FLOAT8E4M3FNUZ: torch.float8_e4m3fnuz,
    onnx.TensorProto.FLOAT8E5M2: torch.float8_e5m2, onnx.TensorProto.FLOAT8E5M2FNUZ: torch.float8_e5m2fnuz}
DTYPES |= FLOAT8
DTYPES |= NARROW  # 4/2-bit integers and floats, FLOAT8E8M0: carried in a wider dtype (see narrow.py)

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


class OnnxPRelu(nn.Module):
    """PRelu with a trainable slope (`weight`, ONNX layout, broadcast onto x): x < 0 ? slope * x : x."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _prelu(x, self.weight)


class OnnxNorm(nn.Module):
    """LayerNormalization / InstanceNormalization / GroupNormalization with a trainable scale
    (`weight`) and bias (`bias`, None when absent), both in ONNX layout; see `_layer_norm`,
    `_instance_norm`, `_group_norm` for the math."""

    def __init__(self, kind: str, weight: nn.Parameter, bias: nn.Parameter | None, eps: float,
                 axis: int = -1, groups: int = 1, per_group: bool = False, stats: bool = False):
        super().__init__()
        self.kind, self.eps, self.axis, self.groups = kind, eps, axis, groups
        self.per_group, self.stats = per_group, stats
        self.weight = weight
        self.bias = bias

    def forward(self, x: torch.Tensor):
        if self.kind == "layer":
            return _layer_norm(x, self.weight, self.bias, self.axis, self.eps, self.stats)
        if self.kind == "instance":
            return _instance_norm(x, self.weight, self.bias, self.eps)
        return _group_norm(x, self.weight, self.bias, self.groups, self.eps, self.per_group)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, eps={self.eps}, axis={self.axis}, groups={self.groups}"


class OnnxConvTranspose(nn.Module):
    """ConvTranspose with trainable `weight` (C_in, C_out/group, k...) and `bias`; see `_conv_transpose`."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, **attrs):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.attrs = attrs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _conv_transpose(x, self.weight, self.bias, **self.attrs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.attrs.items())


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
    for n, k, s in zip(spatial, eff_kernel, strides, strict=True):
        out = -(-int(n) // s)
        total = max((out - 1) * s + k - int(n), 0)
        small, big = total // 2, total - total // 2
        begins.append(small if upper else big)
        ends.append(big if upper else small)
    return begins, ends


def _torch_pad_list(begins, ends) -> list[int]:
    """F.pad's order (last dim first) for pads on the trailing len(begins) dims."""
    out: list[int] = []
    for b, e in zip(reversed(list(begins)), reversed(list(ends)), strict=True):
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
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
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


_CONV_T_FN = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _conv_transpose(x, w, b, strides, dilations, group, pads=None, output_padding=None, output_shape=None,
                    auto_pad="NOTSET"):
    """ONNX ConvTranspose. The full transposed convolution (size s*(n-1) + (k-1)*d + 1 per axis)
    is extended by output_padding zeros and cropped by pads; with output_shape (or SAME_*
    auto_pad, where output_shape = n*s) the pads total full + output_padding - output_shape,
    split total//2 first for SAME_UPPER and total - total//2 first otherwise."""
    nd = w.dim() - 2
    kernel = list(w.shape[2:])
    spatial = [int(n) for n in x.shape[2:]]
    output_padding = list(output_padding or [0] * nd)
    full = [s * (n - 1) + (k - 1) * d + 1 for s, n, k, d in zip(strides, spatial, kernel, dilations, strict=True)]
    if output_shape or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        out = list(output_shape)[-nd:] if output_shape else [n * s for n, s in zip(spatial, strides, strict=True)]
        total = [f + p - o for f, p, o in zip(full, output_padding, out, strict=True)]
        begins = [t // 2 if auto_pad == "SAME_UPPER" else t - t // 2 for t in total]
    else:
        pads = list(pads or [0] * (2 * nd)) if auto_pad != "VALID" else [0] * (2 * nd)
        begins = pads[:nd]
        out = [f + p - b_ - e for f, p, b_, e in zip(full, output_padding, pads[:nd], pads[nd:], strict=True)]
    y = _CONV_T_FN[nd](x, w, None, strides, 0, 0, group, dilations)
    flat: list[int] = []
    for f, b_, o in reversed(list(zip(full, begins, out, strict=True))):
        flat += [-b_, o + b_ - f]
    if any(flat):
        y = F.pad(y, flat)
    if b is not None:
        y = y + b.reshape((1, -1) + (1,) * nd)
    return y


def _pool_geometry(x, kernel, strides, pads, dilations, ceil_mode, auto_pad):
    """(begin pads, end pads, output sizes, extra end padding that completes the last window) per axis."""
    begins, ends = _resolve_pads(x, kernel, strides, pads, dilations, auto_pad)
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
    ceil_mode = bool(ceil_mode) and auto_pad not in ("SAME_UPPER", "SAME_LOWER")
    outs, extra = [], []
    for n, b, e, k, s in zip((int(n) for n in x.shape[2:]), begins, ends, eff, strides, strict=True):
        span = n + b + e - k
        out = (-(-span // s) if ceil_mode else span // s) + 1
        if ceil_mode and (out - 1) * s >= n + b:
            out -= 1
        out = max(out, 0)
        outs.append(out)
        extra.append(max(0, (out - 1) * s + k - (n + b + e)))
    return begins, ends, outs, extra


def _max_pool_indices(x, kernel, strides, pads, dilations, ceil_mode, auto_pad="NOTSET", storage_order=0):
    """ONNX MaxPool's (Y, Indices): each index counts over the whole input tensor, the planes (n, c) in
    order and, within a plane, the spatial position row-major (storage_order 0) or column-major (1).

    torch gives each maximum's position within its plane of the explicitly padded input (the first of
    equal maxima in scan order, as onnx's reference); it is moved back by the begin pads and flattened
    in the asked order, plus the plane's offset n*C*S + c*S (S: the plane's size)."""
    nd = len(kernel)
    spatial = [int(n) for n in x.shape[2:]]
    begins, ends, outs, extra = _pool_geometry(x, kernel, strides, pads, dilations, ceil_mode, auto_pad)
    low = float("-inf") if x.is_floating_point() else torch.iinfo(x.dtype).min
    padded = _pad_spatial(x, begins, [e + x_ for e, x_ in zip(ends, extra, strict=True)], low)
    y, where = _MAXPOOL_FN[nd](padded, kernel, strides, 0, dilations, return_indices=True)
    for axis, out in enumerate(outs):
        y, where = y.narrow(2 + axis, 0, out), where.narrow(2 + axis, 0, out)
    coords = torch.unravel_index(where, tuple(padded.shape[2:]))
    order = range(nd) if storage_order else reversed(range(nd))  # fastest-varying axis first
    index, step = torch.zeros_like(where), 1
    for axis in order:
        index = index + (coords[axis] - begins[axis]) * step
        step *= spatial[axis]
    planes = torch.arange(x.shape[0] * x.shape[1], device=x.device).reshape(x.shape[0], x.shape[1], *([1] * nd))
    return y, index + planes * step


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
    begins, ends, outs, extra = _pool_geometry(x, kernel, strides, pads, dilations, ceil_mode, auto_pad)
    ends_x = [e + x_ for e, x_ in zip(ends, extra, strict=True)]
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
    begins = dict(zip(axes, pads[:k], strict=True))
    ends = dict(zip(axes, pads[k:], strict=True))
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


def _cast(x, dtype, saturate=True):
    """ONNX Cast (float -> int truncates toward zero; -> bool is x != 0). To an 8-bit float,
    rounded to nearest even; `saturate` clamps to the type's finite range (+-inf too) first,
    else values beyond it become NaN (e4m3fn, the fnuz types) or +-inf (e5m2), as ONNX defines."""
    if dtype not in _FLOAT8_DTYPES or x.dtype == dtype:
        return x.to(dtype)
    top = torch.finfo(dtype).max
    x = x.to(torch.float32)
    if saturate:
        return torch.clamp(x, -top, top).to(dtype)
    if dtype == torch.float8_e4m3fn:  # torch saturates this one; ONNX: NaN beyond max + half a step
        return torch.where(x.abs() > 464.0, torch.full_like(x, float("nan")), x).to(dtype)
    return x.to(dtype)


def _clip(x, lo=None, hi=None):
    if lo is None and hi is None:
        return x
    return torch.clamp(x, lo, hi)


_FLOAT8_DTYPES = frozenset(FLOAT8.values())


def _to_tensor(proto: onnx.TensorProto, model: Model | None = None) -> torch.Tensor:
    """A torch tensor of its own with `proto`'s values (data held outside the proto read where `model`
    keeps it), of the dtype `DTYPES` gives; TypeError("<TYPE> tensor") for an element type outside DTYPES."""
    if proto.data_type not in DTYPES:
        raise TypeError(f"{onnx.TensorProto.DataType.Name(proto.data_type)} tensor")
    arr = tensor_array(proto) if model is None else model.tensor_array(proto)
    if proto.data_type in UNSIGNED_WIDE:
        return torch.from_numpy(arr.astype(np.int64))
    if proto.data_type == onnx.TensorProto.BFLOAT16:
        return torch.from_numpy(arr.astype(np.float32)).to(torch.bfloat16)
    if proto.data_type in NARROW:
        return torch.from_numpy(arr.astype(np.float32)).to(NARROW[proto.data_type])  # each value exact in both
    if proto.data_type in FLOAT8:  # ml_dtypes' array: its bytes, seen as the torch type
        return torch.from_numpy(np.array(arr.view(np.uint8), copy=True)).view(FLOAT8[proto.data_type])
    # an array read from a file is already ours; one that views the proto's bytes is copied
    return torch.from_numpy(arr if arr.flags.owndata and arr.flags.writeable else np.array(arr, copy=True))


def _prelu(x, slope):
    return torch.where(x < 0, x * slope, x)


def _stash(x):
    return x.to(torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else x


def _layer_norm(x, scale, bias, axis, eps, stats=False):
    """ONNX LayerNormalization: (x - mean) / sqrt(var + eps) * scale + bias over axes [axis, rank).

    With `stats`, also the mean and 1/sqrt(var + eps) (keepdims shape), as outputs 1 and 2."""
    axis = axis + x.dim() if axis < 0 else axis
    xs = _stash(x)
    dims = tuple(range(axis, x.dim()))
    mean = xs.mean(dims, keepdim=True)
    inv = torch.rsqrt(((xs - mean) ** 2).mean(dims, keepdim=True) + eps)
    y = (xs - mean) * inv * scale
    if bias is not None:
        y = y + bias
    y = y.to(x.dtype)
    return (y, mean.to(x.dtype), inv.to(x.dtype)) if stats else y


def _batch_norm_training(x, scale, bias, mean, var, eps, momentum):
    """ONNX BatchNormalization with training_mode=1: (Y, running_mean, running_var), where
    Y = (x - m) / sqrt(v + eps) * scale + bias with m, v the batch's mean and population variance per
    channel (axis 1), and running_mean = mean * momentum + m * (1 - momentum), likewise running_var."""
    xs = _stash(x)
    dims = [d for d in range(x.dim()) if d != 1]
    m = xs.mean(dims)
    v = ((xs - _channel_view(m, x)) ** 2).mean(dims)
    y = (xs - _channel_view(m, x)) * torch.rsqrt(_channel_view(v, x) + eps) * _channel_view(scale, x) \
        + _channel_view(bias, x)
    return (y.to(x.dtype), (mean * momentum + m * (1 - momentum)).to(mean.dtype),
            (var * momentum + v * (1 - momentum)).to(var.dtype))


def _channel_view(v, x):
    return v.reshape((1, -1) + (1,) * (x.dim() - 2))


def _instance_norm(x, scale, bias, eps):
    """ONNX InstanceNormalization: per (n, c), normalized over the spatial axes, then * scale[c] + bias[c]."""
    y = F.instance_norm(_stash(x), eps=eps).to(x.dtype)
    return y * _channel_view(scale, x) + _channel_view(bias, x)


def _group_norm(x, scale, bias, groups, eps, per_group):
    """ONNX GroupNormalization: per (n, group), normalized over the group's channels and spatial axes.

    scale/bias hold one value per channel (opset 21) or, `per_group`, one per group (opset 18)."""
    y = F.group_norm(_stash(x), int(groups), eps=eps).to(x.dtype)
    if per_group:
        rep = x.shape[1] // int(groups)
        scale, bias = scale.repeat_interleave(rep), bias.repeat_interleave(rep)
    return y * _channel_view(scale, x) + _channel_view(bias, x)
