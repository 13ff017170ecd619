"""Run-time helpers for the shape, indexing, reduction and normalization ops.

The generated forward calls these by module-level name (so torch.save can pickle an
imported module). Each takes tensors (or Python numbers / lists resolved at import)
and follows the ONNX operator's definition; shape values are int64 tensors on the
data's device, so Shape -> Gather/Slice -> Concat -> Reshape chains run at any input
size.
"""

from __future__ import annotations

import math

import torch

from onnxbn.torch_import.ops import _ints

# ============================================================================ shapes and indexing


def _shape(x, start=0, end=None):
    """ONNX Shape: x's dims [start:end] (negative ends count from the rank) as an int64 tensor."""
    return torch.tensor(list(x.shape)[start:end], dtype=torch.int64, device=x.device)


def _size(x):
    return torch.tensor(x.numel(), dtype=torch.int64, device=x.device)


def _norm_index(idx, n):
    return torch.where(idx < 0, idx + n, idx)


def _gather(x, idx, axis):
    """ONNX Gather: out[..., j..., ...] = x[..., idx[j...], ...] along `axis` (negative indices wrap once)."""
    axis = axis + x.dim() if axis < 0 else axis
    idx = _norm_index(idx.to(torch.int64), x.shape[axis])
    flat = torch.index_select(x, axis, idx.reshape(-1))
    return flat.reshape(tuple(x.shape[:axis]) + tuple(idx.shape) + tuple(x.shape[axis + 1:]))


def _gather_elements(x, idx, axis):
    axis = axis + x.dim() if axis < 0 else axis
    return torch.gather(x, axis, _norm_index(idx.to(torch.int64), x.shape[axis]))


def _slice(x, starts, ends, axes=None, steps=None):
    """ONNX Slice: per axis, start/end clamped to [0, n] (step > 0) or [-1, n-1] (step < 0)."""
    starts, ends = _ints(starts), _ints(ends)
    axes = list(range(len(starts))) if axes is None else _ints(axes)
    steps = [1] * len(starts) if steps is None else _ints(steps)
    for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
        a = a + x.dim() if a < 0 else a
        n = int(x.shape[a])
        s = s + n if s < 0 else s
        e = e + n if e < 0 else e
        if st > 0:
            s, e = min(max(s, 0), n), min(max(e, 0), n)
            x = x.narrow(a, s, max(e - s, 0))
            if st > 1:
                x = torch.index_select(x, a, torch.arange(0, int(x.shape[a]), st, device=x.device))
        else:
            s, e = min(max(s, 0), n - 1), min(max(e, -1), n - 1)
            x = torch.index_select(x, a, torch.arange(s, e, st, device=x.device))
    return x


def _split(x, axis, sizes=None, count=1):
    """ONNX Split: into `sizes` along `axis`, or `count` parts of ceil(n / count) (the last smaller)."""
    if sizes is None:
        n = int(x.shape[axis])
        chunk = -(-n // count)
        sizes = [chunk] * (count - 1) + [n - chunk * (count - 1)]
    return tuple(torch.split(x, _ints(sizes), axis))


def _expand(x, shape):
    """ONNX Expand: x broadcast with `shape` (numpy rule, both ways), as a new tensor."""
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(_ints(shape)))).clone()


def _tile(x, repeats):
    return x.repeat(_ints(repeats))


def _range(start, limit, delta):
    """ONNX Range: start + i*delta for i < max(ceil((limit - start) / delta), 0), in start's dtype."""
    s, lim, d = (v.item() if isinstance(v, torch.Tensor) else v for v in (start, limit, delta))
    n = max(math.ceil((lim - s) / d), 0)
    dtype = start.dtype if isinstance(start, torch.Tensor) else torch.int64
    device = start.device if isinstance(start, torch.Tensor) else None
    step = torch.arange(n, dtype=torch.float64 if dtype.is_floating_point else torch.int64, device=device)
    return (step * d + s).to(dtype)


def _depth_to_space(x, block, mode):
    """ONNX DepthToSpace: DCR (depth-column-row, the default) or CRD (torch's pixel_shuffle)."""
    b, c, h, w = x.shape
    if mode == "CRD":
        y = x.reshape(b, c // (block * block), block, block, h, w).permute(0, 1, 4, 2, 5, 3)
    else:
        y = x.reshape(b, block, block, c // (block * block), h, w).permute(0, 3, 4, 1, 5, 2)
    return y.reshape(b, c // (block * block), h * block, w * block)


def _space_to_depth(x, block, mode="DCR"):
    """ONNX SpaceToDepth, the inverse of DepthToSpace in the same mode (CRD: opset 28's option)."""
    b, c, h, w = x.shape
    y = x.reshape(b, c, h // block, block, w // block, block)
    y = y.permute(0, 1, 3, 5, 2, 4) if mode == "CRD" else y.permute(0, 3, 5, 1, 2, 4)
    return y.reshape(b, c * block * block, h // block, w // block)


# ============================================================================ elementwise

def _cast_like(x, like):
    return x.to(like.dtype)


def _min(*xs):
    """ONNX Min over any number of broadcast inputs (NaN propagates)."""
    acc = xs[0]
    for v in xs[1:]:
        acc = torch.minimum(acc, v)
    return acc


def _max(*xs):
    acc = xs[0]
    for v in xs[1:]:
        acc = torch.maximum(acc, v)
    return acc


def _mean(*xs):
    acc = xs[0]
    for v in xs[1:]:
        acc = acc + v
    return acc / len(xs)


def _pow(x, y):
    """ONNX Pow: x ** y in x's dtype."""
    return torch.pow(x, y).to(x.dtype)


def _hard_sigmoid(x, alpha, beta):
    return torch.clamp(alpha * x + beta, 0.0, 1.0)


def _thresholded_relu(x, alpha):
    return torch.where(x > alpha, x, torch.zeros_like(x))


def _selu(x, alpha, gamma):
    return gamma * torch.where(x > 0, x, alpha * torch.expm1(x))


# ============================================================================ reductions

def _reduce(x, kind, axes=None, keepdims=True, noop=False):
    """ONNX Reduce*: over `axes` (all when None/empty, none when empty and noop).

    Over no axes each reduction is its elementwise part (SumSquare -> x*x, L1 -> |x|, ...),
    as in the ONNX reference. Integer inputs keep their dtype (the result is computed in
    float64 and cast, truncating, for Mean/L2/LogSumExp); empty reductions give the
    operation's identity (0, 1, -inf, +inf)."""
    axes = None if axes is None else _ints(axes)
    if not axes:
        if noop:
            return _NO_AXES.get(kind, torch.clone)(x)
        axes = list(range(x.dim()))
    dims = sorted({a + x.dim() if a < 0 else a for a in axes})
    dtype = x.dtype
    if kind in ("Mean", "L2", "LogSumExp") and not dtype.is_floating_point:
        x = x.to(torch.float64)
    if kind in ("Max", "Min") and dtype == torch.bool:
        x = x.to(torch.uint8)
    if x.numel() == 0 and kind in ("Max", "Min"):
        shape = [1 if d in dims else n for d, n in enumerate(x.shape)] if keepdims else \
            [n for d, n in enumerate(x.shape) if d not in dims]
        if x.is_floating_point():
            fill = float("-inf") if kind == "Max" else float("inf")
        else:
            fill = torch.iinfo(x.dtype).min if kind == "Max" else torch.iinfo(x.dtype).max
        return torch.full(shape, fill, dtype=dtype, device=x.device)
    x = _REDUCE_PRE.get(kind, lambda v: v)(x)
    if kind == "Prod":
        for d in reversed(dims):
            x = torch.prod(x, d, keepdim=bool(keepdims))
        y = x
    elif kind == "LogSumExp":
        y = torch.logsumexp(x, dims, keepdim=bool(keepdims))
    else:
        y = _REDUCE_FN[kind](x, dims, keepdim=bool(keepdims))
    if kind == "L2":
        y = torch.sqrt(y)
    return y.to(dtype)


_NO_AXES = {"SumSquare": torch.square, "L1": torch.abs, "L2": torch.abs}
_REDUCE_PRE = {"SumSquare": torch.square, "L1": torch.abs, "L2": torch.square}
_REDUCE_FN = {"Sum": torch.sum, "SumSquare": torch.sum, "L1": torch.sum, "L2": torch.sum, "Mean": torch.mean,
              "Max": torch.amax, "Min": torch.amin}


def _arg_reduce(x, kind, axis, keepdims, last):
    """ArgMax/ArgMin along `axis`: the first (or, select_last_index, the last) extreme index."""
    axis = axis + x.dim() if axis < 0 else axis
    fn = torch.argmax if kind == "max" else torch.argmin
    if x.dtype == torch.bool:
        x = x.to(torch.uint8)
    if not last:
        return fn(x, axis, keepdim=bool(keepdims))
    n = x.shape[axis]
    return (n - 1) - fn(torch.flip(x, (axis,)), axis, keepdim=bool(keepdims))


# ============================================================================ normalization

def _lp_norm(x, axis, p):
    """ONNX LpNormalization: x / ||x||_p along `axis` (p = 1 or 2); 0 where the norm is 0."""
    norm = torch.linalg.vector_norm(x, p, dim=axis, keepdim=True)
    return torch.where(norm == 0, torch.zeros_like(x), x / torch.where(norm == 0, torch.ones_like(norm), norm))
