"""Converters for shape and indexing ops: Shape, Size, Gather, GatherElements, Slice, Split,
Expand, Tile, Range, DepthToSpace, SpaceToDepth, Einsum.

Shape values are int64 tensors computed from the input at run time (`functional._shape`),
so Shape -> Gather/Slice -> Concat -> Reshape/Expand chains follow the input's size; when
every input of a node is constant (initializers, Constant nodes, folded results) `ctx.call`
evaluates it at import instead.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from onnxbn.torch_import.functional import (
    _depth_to_space,
    _expand,
    _gather,
    _gather_elements,
    _range,
    _shape,
    _size,
    _slice,
    _space_to_depth,
    _split,
    _tile,
)
from onnxbn.torch_import.ops import _ints
from onnxbn.torch_import.registry import ConvertContext, converter


def outputs(ctx: ConvertContext, result, n: int) -> list:
    """The first n items of a multi-output result: graph getitem nodes, or the folded values."""
    if isinstance(result, fx.Node):
        return [ctx.call(operator.getitem, result, i) for i in range(n)]
    return list(result)[:n]


def _const_ints(v):
    """An import-time constant as a list of ints; a run-time value (fx node) as it is."""
    return _ints(v) if isinstance(v, torch.Tensor) else v


@converter("Shape")
def _shape_op(ctx: ConvertContext, a: dict):
    start, end = int(a.get("start", 0)), a.get("end")
    return ctx.call(_shape, ctx.inp(0), start, None if end is None else int(end))


@converter("Size")
def _size_op(ctx, a):
    return ctx.call(_size, ctx.inp(0))


@converter("Gather")
def _gather_op(ctx, a):
    return ctx.call(_gather, ctx.inp(0), ctx.inp(1), int(a.get("axis", 0)))


@converter("GatherElements")
def _gather_elements_op(ctx, a):
    return ctx.call(_gather_elements, ctx.inp(0), ctx.inp(1), int(a.get("axis", 0)))


@converter("Slice")
def _slice_op(ctx: ConvertContext, a: dict):
    """starts/ends/axes as attributes before opset 10, then inputs (with steps)."""
    if ctx.opset < 10:
        axes = a.get("axes")
        return ctx.call(_slice, ctx.inp(0), list(a["starts"]), list(a["ends"]), None if axes is None else list(axes))
    args = [_const_ints(ctx.inp(i)) for i in range(1, 5)]
    return ctx.call(_slice, ctx.inp(0), *args)


@converter("Split")
def _split_op(ctx: ConvertContext, a: dict):
    """Sizes: the `split` attribute before opset 13, the second input from 13; else equal parts
    (opset 18: `num_outputs` parts of ceil(n / num_outputs), the last smaller)."""
    node = ctx.node
    n = len(node.output)
    axis = int(a.get("axis", 0))
    if ctx.opset < 13:
        sizes = list(a["split"]) if a.get("split") else None
    else:
        sizes = _const_ints(ctx.inp(1))
    if ctx.opset >= 18 and sizes is None and "num_outputs" not in a:
        ctx.fail("neither a split input nor num_outputs")
    count = int(a.get("num_outputs", n))
    if count != n:
        ctx.fail(f"num_outputs={count} but the node has {n} outputs")
    return outputs(ctx, ctx.call(_split, ctx.inp(0), axis, sizes, count), n)


@converter("Expand")
def _expand_op(ctx, a):
    return ctx.call(_expand, ctx.inp(0), _const_ints(ctx.inp(1)))


@converter("Tile")
def _tile_op(ctx, a):
    return ctx.call(_tile, ctx.inp(0), _const_ints(ctx.inp(1)))


@converter("Range")
def _range_op(ctx, a):
    return ctx.call(_range, ctx.inp(0), ctx.inp(1), ctx.inp(2))


@converter("DepthToSpace", "SpaceToDepth")
def _depth_space_op(ctx: ConvertContext, a: dict):
    mode = a.get("mode", "DCR")
    if mode not in ("DCR", "CRD"):
        ctx.fail(f"mode={mode!r} is not supported")
    fn = _depth_to_space if ctx.node.op_type == "DepthToSpace" else _space_to_depth
    return ctx.call(fn, ctx.inp(0), int(a["blocksize"]), mode)


@converter("Einsum")
def _einsum_op(ctx: ConvertContext, a: dict):
    equation = a["equation"].replace(" ", "")
    return ctx.call(torch.einsum, equation, *[ctx.inp(i) for i in range(len(ctx.node.input))])
