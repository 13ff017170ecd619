"""Resize (opsets 10-19+) and Upsample: the converters and the run-time `_resize`.

`_resize` follows the ONNX reference's separable definition. Per resized axis with
input size n, output size m and scale s (the `scales` value, or m / n with `sizes`):
each output index y maps to a source coordinate x by coordinate_transformation_mode
(half_pixel: (y + 0.5) / s - 0.5; asymmetric: y / s; align_corners: y (n-1)/(m-1);
pytorch_half_pixel: like half_pixel but -0.5 when m = 1; half_pixel_symmetric;
tf_crop_and_resize from the roi, with extrapolation_value outside [0, n-1]); the output
is a weighted sum of the input at the k indices nearest to x (clamped into [0, n-1],
i.e. edge padding): nearest (k = 1, rounded by nearest_mode), linear (k = 2), cubic
(k = 4, cubic_coeff_a), antialias widening the linear/cubic filter by 1/s when
downsampling; exclude_outside zeroes the weights of indices outside the input and
renormalizes. Output sizes from scales are floor(n * s); keep_aspect_ratio_policy and
axes (opset 18) as specified. Before opset 11 (Resize-10, Upsample-9) the mapping is
asymmetric and nearest rounds down when upsampling and up when downsampling.
Integer inputs are rounded and clamped to their type's range.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F

from onnxbn.torch_import.ops import _ints
from onnxbn.torch_import.registry import ConvertContext, converter

_COORD_MODES = ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners", "asymmetric",
                "tf_crop_and_resize")
_NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil", "simple")


def _source_coords(mode, m, n, scale, roi, device):
    """Source coordinate of each of the m outputs (float32, as onnxruntime computes them), and the
    extrapolated mask or None."""
    y = torch.arange(m, dtype=torch.float32, device=device)
    width = scale * n
    if mode == "align_corners":
        return (torch.zeros_like(y) if width == 1 else y * (n - 1) / (width - 1)), None
    if mode == "asymmetric":
        return y / scale, None
    if mode == "tf_crop_and_resize":
        lo, hi = roi
        x = torch.full_like(y, (hi - lo) * (n - 1) / 2) if width == 1 else y * (hi - lo) * (n - 1) / (width - 1)
        x = x + lo * (n - 1)
        return x, (x < 0) | (x > n - 1)
    if mode == "pytorch_half_pixel":
        return (torch.full_like(y, -0.5) if width == 1 else (y + 0.5) / scale - 0.5), None
    if mode == "half_pixel_symmetric":
        offset = n / 2 * (1 - m / width)
        return offset + (y + 0.5) / scale - 0.5, None
    return (y + 0.5) / scale - 0.5, None


def _cubic(t, a):
    t = t.abs()
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return torch.where(t <= 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


def _taps(mode, x, scale, n, cubic_a, antialias, exclude_outside):
    """(indices (m, k), weights (m, k)) of the interpolation filter at source coordinates x."""
    floor = torch.floor(x)
    ratio = torch.where(x == floor, torch.ones_like(x), x - floor)  # in (0, 1]: prefer the left pixel
    if mode == "linear" and not (antialias and scale < 1):
        coeffs = torch.stack([1 - ratio, ratio], 1)
    elif mode == "linear":
        start = math.floor(-1 / scale) + 1
        offsets = torch.arange(start, 2 - start, dtype=x.dtype, device=x.device)
        coeffs = torch.clamp(1 - ((offsets[None] - ratio[:, None]) * scale).abs(), 0, 1)
        coeffs = coeffs / coeffs.sum(1, keepdim=True)
    elif not (antialias and scale < 1):
        offsets = torch.tensor([-1.0, 0.0, 1.0, 2.0], dtype=x.dtype, device=x.device)
        coeffs = _cubic(offsets[None] - ratio[:, None], cubic_a)
    else:
        start = math.floor(-2 / scale) + 1
        offsets = torch.arange(start, 2 - start, dtype=x.dtype, device=x.device)
        coeffs = _cubic((offsets[None] - ratio[:, None]) * scale, cubic_a)
        coeffs = coeffs / coeffs.sum(1, keepdim=True)
    k = coeffs.shape[1]
    pad = -(-k // 2)
    xp = x + pad
    p = torch.floor(xp)
    frac = xp - p
    if k % 2 == 0:
        offset = torch.where(frac == 0, -(k // 2), -(k // 2) + 1)
    else:
        offset = torch.where(frac <= 0.5, -((k - 1) // 2), -((k - 1) // 2) + 1)
    idx = (p.to(torch.int64) + offset)[:, None] + torch.arange(k, device=x.device)[None] - pad
    if exclude_outside:
        coeffs = torch.where((idx < 0) | (idx >= n), torch.zeros_like(coeffs), coeffs)
        total = coeffs.sum(1, keepdim=True)
        coeffs = coeffs / torch.where(total == 0, torch.ones_like(total), total)
    return idx.clamp(0, n - 1), coeffs


def _nearest_index(x, nearest_mode, scale, n):
    """The input index nearest to each source coordinate, rounded by nearest_mode ("simple":
    down when upsampling, up when downsampling, as before opset 11), clamped into [0, n-1]."""
    if nearest_mode == "simple":
        idx = torch.ceil(x) if scale < 1 else torch.floor(x)
    elif nearest_mode == "floor":
        idx = torch.floor(x)
    elif nearest_mode == "ceil":
        idx = torch.ceil(x)
    elif nearest_mode == "round_prefer_ceil":
        idx = torch.floor(x + 0.5)
    else:
        idx = torch.ceil(x - 0.5)
    return idx.to(torch.int64).clamp(0, n - 1)


def _resize(x, scales=None, sizes=None, roi=None, axes=None, mode="nearest", coord="half_pixel",
            nearest_mode="round_prefer_floor", cubic_a=-0.75, exclude_outside=False, extrapolation=0.0,
            antialias=False, policy="stretch"):
    """ONNX Resize; see the module docstring."""
    rank = x.dim()
    axes = list(range(rank)) if axes is None else [a + rank if a < 0 else a for a in _ints(axes)]
    shape = [int(v) for v in x.shape]
    if sizes is not None:
        sizes = _ints(sizes)
        scale = [sizes[i] / shape[a] for i, a in enumerate(axes)]
        if policy != "stretch":
            s = min(scale) if policy == "not_larger" else max(scale)
            scale = [s] * len(axes)
            sizes = [int(s * shape[a] + 0.5) for a in axes]
    elif scales is not None:
        scale = [float(v) for v in (scales.reshape(-1).tolist() if isinstance(scales, torch.Tensor) else scales)]
        sizes = [int(s * shape[a]) for s, a in zip(scale, axes, strict=True)]
    else:
        raise ValueError("Resize needs scales or sizes")  # the converters refuse such a node at import
    if roi is not None:
        roi = [float(v) for v in (roi.reshape(-1).tolist() if isinstance(roi, torch.Tensor) else roi)]
        k = len(roi) // 2
        roi = [(roi[i], roi[i + k]) for i in range(k)] if roi else None
        if roi is not None and len(roi) == rank and len(axes) < rank:
            roi = [roi[a] for a in axes]
    fast = _interpolate(x, shape, axes, scale, sizes, mode, coord, cubic_a, exclude_outside, antialias)
    if fast is not None:
        return fast
    dtype = x.dtype
    y = x if x.is_floating_point() else x.to(torch.float32)
    for i, a in enumerate(axes):
        n, m, s = shape[a], sizes[i], scale[i]
        box = roi[i] if roi is not None and coord == "tf_crop_and_resize" else (0.0, 1.0)
        if m == n and math.isclose(s, 1.0) and box == (0.0, 1.0):
            continue
        src, outside = _source_coords(coord, m, n, s, box, y.device)
        if mode == "nearest":
            y = _take(y, a, _nearest_index(src, nearest_mode, s, n))
        else:
            idx, w = _taps(mode, src, s, n, cubic_a, antialias, exclude_outside)
            w = w.to(y.dtype).reshape((m, idx.shape[1]) + (1,) * (rank - a - 1))
            # a sum of tensors (at least one tap) is a tensor, where Python's sum is typed int | tensor
            y = cast(torch.Tensor, sum(_take(y, a, idx[:, j]) * w[:, j] for j in range(idx.shape[1])))
        if outside is not None and bool(outside.any()):
            fill = torch.tensor(extrapolation, dtype=y.dtype, device=y.device)
            y = torch.where(outside.reshape((m,) + (1,) * (rank - a - 1)), fill, y)
    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        y = torch.round(y).clamp(info.min, info.max).to(dtype)
    return y


_TORCH_MODES = {("linear", 1): "linear", ("linear", 2): "bilinear", ("linear", 3): "trilinear", ("cubic", 2): "bicubic"}


def _interpolate(x, shape, axes, scale, sizes, mode, coord, cubic_a, exclude_outside, antialias):
    """F.interpolate where it computes exactly what ONNX defines, else None: linear (1-3 spatial
    axes) or cubic (2, a = -0.75, exclude_outside 0) on a float input whose batch and channel
    axes keep their size, no antialias; half_pixel (torch's align_corners=False, with the ONNX
    scales passed as they are), pytorch_half_pixel when every output length exceeds 1, or
    align_corners when every output length is n * scale exactly."""
    nd = x.dim() - 2
    torch_mode = _TORCH_MODES.get((mode, nd))
    if torch_mode is None or antialias or not x.is_floating_point() or \
            mode == "cubic" and (cubic_a != -0.75 or exclude_outside):
        return None
    full_scale, full_size = [1.0] * x.dim(), list(shape)
    for a, s, m in zip(axes, scale, sizes, strict=True):
        full_scale[a], full_size[a] = s, m
    if full_size[:2] != shape[:2] or full_scale[:2] != [1.0, 1.0]:
        return None
    spatial_scale, spatial_size = full_scale[2:], full_size[2:]
    if coord == "align_corners":
        if any(abs(n * s - m) > 1e-6 * m for m, n, s in zip(spatial_size, shape[2:], spatial_scale, strict=True)):
            return None
        return F.interpolate(x, size=spatial_size, mode=torch_mode, align_corners=True)
    if coord == "half_pixel" or coord == "pytorch_half_pixel" and min(spatial_size) > 1:
        return F.interpolate(x, scale_factor=spatial_scale, mode=torch_mode, align_corners=False,
                             recompute_scale_factor=False)
    return None


def _take(y, axis, idx):
    """y[..., idx, ...] along `axis` (advanced indexing: much faster than index_select on the last axis)."""
    return y[(slice(None),) * axis + (idx,)]


def _const_floats(v):
    return [float(f) for f in v.reshape(-1).tolist()] if isinstance(v, torch.Tensor) else v


@converter("Resize")
def _resize_op(ctx: ConvertContext, a: dict):
    """Inputs: (X, scales) at opset 10; (X, roi, scales, sizes) from 11 (roi, scales optional from 13);
    antialias, axes and keep_aspect_ratio_policy from 18; half_pixel_symmetric from 19."""
    mode = a.get("mode", "nearest")
    if mode not in ("nearest", "linear", "cubic") or ctx.opset < 11 and mode == "cubic":
        ctx.fail(f"mode={mode!r} is not supported")
    if ctx.opset < 11:
        return ctx.call(_resize, ctx.inp(0), _const_floats(ctx.inp(1)), None, None, None, mode, "asymmetric", "simple")
    coord = a.get("coordinate_transformation_mode", "half_pixel")
    nearest_mode = a.get("nearest_mode", "round_prefer_floor")
    policy = a.get("keep_aspect_ratio_policy", "stretch")
    if coord not in _COORD_MODES or coord == "half_pixel_symmetric" and ctx.opset < 19:
        ctx.fail(f"coordinate_transformation_mode={coord!r} is not supported")
    if nearest_mode not in _NEAREST_MODES[:4]:
        ctx.fail(f"nearest_mode={nearest_mode!r} is not supported")
    if policy not in ("stretch", "not_larger", "not_smaller"):
        ctx.fail(f"keep_aspect_ratio_policy={policy!r} is not supported")
    antialias = bool(int(a.get("antialias", 0)))
    if antialias and mode == "nearest":
        ctx.fail("antialias=1 with mode 'nearest' is not supported")
    roi, scales, sizes = ctx.inp(1), ctx.inp(2), ctx.inp(3)
    if isinstance(scales, torch.Tensor) and scales.numel() == 0:
        scales = None
    if isinstance(sizes, torch.Tensor) and sizes.numel() == 0:
        sizes = None
    if isinstance(roi, torch.Tensor) and roi.numel() == 0:
        roi = None
    if scales is None and sizes is None:
        ctx.fail("neither scales nor sizes given")
    axes = list(a["axes"]) if "axes" in a else None
    return ctx.call(_resize, ctx.inp(0), _const_floats(scales), _ints(sizes) if isinstance(sizes, torch.Tensor)
                    else sizes, _const_floats(roi), axes, mode, coord, nearest_mode,
                    float(a.get("cubic_coeff_a", -0.75)), bool(int(a.get("exclude_outside", 0))),
                    float(a.get("extrapolation_value", 0.0)), antialias, policy)


@converter("Upsample")
def _upsample_op(ctx: ConvertContext, a: dict):
    """Upsample-9 (the importer's oldest opset; deprecated at 10): scales as the second input,
    asymmetric mapping. (Upsample-7's scales attribute becomes that input in
    onnx.version_converter's conversion to opset 9, which the importer asks for.)"""
    mode = a.get("mode", "nearest")
    if mode not in ("nearest", "linear", "bilinear"):
        ctx.fail(f"mode={mode!r} is not supported")
    return ctx.call(_resize, ctx.inp(0), _const_floats(ctx.inp(1)), None, None, None,
                    "nearest" if mode == "nearest" else "linear", "asymmetric", "simple")
