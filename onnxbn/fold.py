"""BN folding for deployment: merge inference-mode BatchNormalization nodes into linear layers.

An inference-mode BN is the per-channel affine map y = s*x + t with s = scale/sqrt(var + eps)
and t = B - mean*s (channel axis 1). Right after a linear layer y = W x + b (Conv,
ConvTranspose, Gemm, or MatMul with a bias Add) it folds backward into that layer:
W' = W*s along the output channels and b' = (b - mean)*s + B = b*s + t. Right before one
(possibly through Dropout, Identity, Flatten or Reshape, where channel c of an (N, C, H, W)
tensor becomes features c*H*W .. (c+1)*H*W - 1) it folds forward: W' = W*s along the input
channels and b' = b + W t. Forward folding is exact for Gemm and MatMul, and for a Conv only
without padding: padded zeros would not receive the shift t. Gemm's alpha and beta are baked
into W and C (and then dropped). All arithmetic is float64, cast once to each tensor's dtype;
a shared weight is copied, never changed in place. A bias that Shape/Expand/CastLike compute from
fixed tensors (torch's dynamo exporter without its optimizer writes zero biases so) counts as fixed:
it becomes an initializer and its chain goes. A BN that cannot be folded exactly stays,
and `explain_fold` says why.
Every tensor name keeps its value (a folded layer writes the BN's output name; tensors that
now hold other values are renamed: `<name>/pre_bn` before a forward-folded BN, `<name>/bn_folded`
for a MatMul folded with its bias Add), so `check --layerwise` compares like with like.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from onnxbn.graph import FLOAT_TYPES, GraphIndex, require_opset, tensor_shape, value_types
from onnxbn.io.copies import set_metadata
from onnxbn.io.model import Model
from onnxbn.io.tensors import memory_stub

# Ops whose value `_Graph.constant` computes from fixed tensors (a bias as torch's dynamo exporter writes it).
_COMPUTED = {"Shape", "Expand", "CastLike"}
# Ops a BN output may pass through on its way to the layer it folds forward into.
PASSTHROUGH = {"Dropout", "Identity", "Flatten", "Reshape"}
SHAPE_ONLY = {"Shape", "Size"}
BIAS_SLOT = 2  # Conv, ConvTranspose and Gemm keep their bias (C) in input 2


# ----------------------------------------------------------------------------- graph view

class _Graph(GraphIndex):
    """The working copy's graph index plus what folding needs: inferred types, float64 constants,
    weight writes (new values become arrays of the Model, `store`), and the tensors that may
    have lost their last reader (`touched`)."""

    def __init__(self, model: Model, types: dict[str, onnx.TypeProto]):
        self.types = types
        self.touched: set[str] = set()
        super().__init__(model)

    def fixed(self, name: str) -> onnx.TensorProto:
        """`constant(name)` of a tensor that planning found fixed."""
        tensor = self.constant(name)
        if tensor is None:
            raise AssertionError(f"{name!r} was planned as a constant but is not one")
        return tensor

    def array(self, name: str) -> np.ndarray:
        return self.tensor_array(self.fixed(name)).astype(np.float64)

    def constant(self, name: str) -> onnx.TensorProto | None:
        """GraphIndex.constant, and also what Shape, Expand and CastLike compute from fixed tensors:
        torch's dynamo exporter without its optimizer writes a Conv's zero bias as
        Expand(CastLike(0, x), Expand(Shape(W, end=1), [1])) (CastLike reads x's element type only)."""
        tensor = super().constant(name)
        node = self.producers.get(name)
        if tensor is not None or node is None or node.op_type not in _COMPUTED:
            return tensor
        if node.op_type == "Shape":
            shape = self.shape(node.input[0])
            if shape is None or not all(isinstance(d, int) for d in shape):
                return None
            value = np.array(shape[_attr(node, "start", 0):_attr(node, "end", len(shape))], np.int64)
        else:
            value, other = self.constant_array(node.input[0]), node.input[1]
            if value is None:
                return None
            if node.op_type == "CastLike":
                elem = self.types[other].tensor_type.elem_type if other in self.types else 0
                if not elem:
                    return None
                value = value.astype(onnx.helper.tensor_dtype_to_np_dtype(elem))
            else:
                shape = self.constant_array(other)
                if shape is None:
                    return None
                value = value * np.ones(shape.astype(np.int64), value.dtype)  # Expand broadcasts both ways
        return numpy_helper.from_array(value, name)

    def own_bias(self, node: onnx.NodeProto, slot: int) -> None:
        """A computed bias (`constant`'s Shape/Expand/CastLike chain) becomes an initializer of its own,
        and the nodes that computed it go once nothing else reads them (so the layer's weight, which
        the chain's Shape read, is written in place)."""
        name = node.input[slot]
        if name in self.initializers or self.producers.get(name) is None or \
                self.producers[name].op_type not in _COMPUTED:
            return
        self.set_input(node, slot, self.add_initializer(self.fixed(name), name))
        todo, freed = [name], set()
        while todo:
            producer = self.producers.get(todo.pop())
            if producer is None or producer.op_type not in _COMPUTED | {"Constant"} or \
                    any(self.read_count.get(o) or o in self.outputs for o in producer.output):
                continue
            self.remove_node(producer)
            todo.extend(i for i in producer.input if i)
            freed.update(producer.input)
        self.prune(freed)  # the chain's initializers nothing else reads

    def shape(self, name: str) -> list | None:
        return tensor_shape(self.types.get(name))

    def write(self, node: onnx.NodeProto, slot: int, value: np.ndarray, data_type: int, base: str) -> None:
        """Make `node.input[slot]` hold `value` (of ONNX type `data_type`): in place when only that slot
        reads the initializer, otherwise as a new initializer (the old tensor stays for its other readers)."""
        name = node.input[slot] if slot < len(node.input) else ""
        current = self.initializers.get(name)
        if current is not None and self.read_count.get(name) == 1 and list(current.dims) == list(value.shape):
            self.set_initializer(name, memory_stub(name, data_type, value.shape))
            self.store.arrays[name] = value
            return
        new_name = self.add_initializer(memory_stub("", data_type, value.shape), f"{name or base}_folded")
        self.store.arrays[new_name] = value
        self.set_input(node, slot, new_name)
        self.touched.add(name)

    def drop_value_info(self, name: str) -> None:
        kept = [v for v in self.graph.value_info if v.name != name]
        del self.graph.value_info[:]
        self.graph.value_info.extend(kept)


# ----------------------------------------------------------------------------- weight layout

def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


@dataclass(frozen=True)
class _Layout:
    """Where a layer's weight W keeps its output channels and its input features.

    out_index / in_index give, for each element of W, its output channel and input feature
    (arrays broadcastable to W's shape); out_axis is W's output axis (None when output channels
    span two axes, as in a grouped ConvTranspose).
    """

    outputs: int
    inputs: int
    out_axis: int | None
    out_index: np.ndarray
    in_index: np.ndarray


def _along(axis: int, values: np.ndarray, rank: int) -> np.ndarray:
    return values.reshape([-1 if i == axis else 1 for i in range(rank)])


def _layout(layer: onnx.NodeProto, shape: tuple[int, ...]) -> _Layout:
    rank, group = len(shape), _attr(layer, "group", 1)
    if layer.op_type == "Conv":  # W: (M, C/group, k...)
        m, c_per_group = shape[0], shape[1]
        first_input = _along(0, (np.arange(m) // (m // group)) * c_per_group, rank)
        return _Layout(m, c_per_group * group, 0, _along(0, np.arange(m), rank),
                       first_input + _along(1, np.arange(c_per_group), rank))
    if layer.op_type == "ConvTranspose":  # W: (C, M/group, k...)
        c, m_per_group = shape[0], shape[1]
        first_output = _along(0, (np.arange(c) // (c // group)) * m_per_group, rank)
        return _Layout(m_per_group * group, c, 1 if group == 1 else None,
                       first_output + _along(1, np.arange(m_per_group), rank), _along(0, np.arange(c), rank))
    out_axis = 0 if layer.op_type == "Gemm" and _attr(layer, "transB", 0) else 1  # Gemm or MatMul
    in_axis = 1 - out_axis
    return _Layout(shape[out_axis], shape[in_axis], out_axis,
                   _along(out_axis, np.arange(shape[out_axis]), 2), _along(in_axis, np.arange(shape[in_axis]), 2))


# ----------------------------------------------------------------------------- planning

@dataclass(frozen=True)
class _Plan:
    """How one BN folds: into `layer`, whose bias is input `bias_slot` of `bias_node` (the layer
    itself, or the Add after a MatMul); `repeat` input features per BN channel (after Flatten)."""

    layer: onnx.NodeProto
    direction: str
    bias_node: onnx.NodeProto
    bias_slot: int
    repeat: int = 1


def _label(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def _constant_problem(g: _Graph, name: str, what: str) -> str | None:
    tensor = g.constant(name)
    if tensor is None:
        return f"{what} is not an initializer"
    if tensor.data_type not in FLOAT_TYPES:
        return f"{what} is {onnx.TensorProto.DataType.Name(tensor.data_type)}, not a float tensor"
    return None


def _bn_problem(g: _Graph, bn: onnx.NodeProto) -> str | None:
    if _attr(bn, "training_mode", 0):
        return "BN runs in training mode"
    if not _attr(bn, "spatial", 1):
        return "BN with spatial=0 normalizes per activation, not per channel"
    if any(name and name in g.read_count for name in bn.output[1:]):
        return "BN's running statistics outputs are used"
    for name in bn.input[1:5]:
        problem = _constant_problem(g, name, f"BN parameter {name!r}")
        if problem:
            return problem
    return None


def _layer_problem(g: _Graph, layer: onnx.NodeProto, bias_node: onnx.NodeProto, bias_slot: int,
                   channels: int, direction: str) -> str | None:
    """Why `layer` cannot absorb `channels` BN channels on its output (backward) or input (forward) side."""
    op = layer.op_type
    problem = _constant_problem(g, layer.input[1], f"{op} weight")
    if problem:
        return problem
    bias = bias_node.input[bias_slot] if bias_slot < len(bias_node.input) else ""
    if bias and (problem := _constant_problem(g, bias, f"{op} bias")):
        return problem
    shape = tuple(g.fixed(layer.input[1]).dims)
    if op in ("Gemm", "MatMul") and len(shape) != 2:
        return f"{op} weight has rank {len(shape)}, not 2"
    layout = _layout(layer, shape)
    have = layout.outputs if direction == "backward" else layout.inputs
    if have != channels:
        side = "output channels" if direction == "backward" else "input features"
        return f"{op} has {have} {side}, the BN provides {channels}"
    return None


def _matmul_bias(g: _Graph, matmul: onnx.NodeProto) -> tuple[onnx.NodeProto, int] | str:
    """The Add that holds a MatMul's bias, and the bias's input slot."""
    out = matmul.output[0]
    readers = g.consumers.get(out, [])
    if out in g.outputs or len(readers) != 1 or readers[0].op_type != "Add" or len(readers[0].input) != 2:
        return "MatMul has no bias Add to take the BN shift"
    add = readers[0]
    slot = 1 if add.input[0] == out else 0
    if add.input[1 - slot] != out or g.constant(add.input[slot]) is None:
        return "MatMul's Add does not add an initializer bias"
    return add, slot


def _plan_backward(g: _Graph, bn: onnx.NodeProto, channels: int) -> _Plan | str | None:
    """Fold into the layer that produces the BN input; None when no linear layer produces it."""
    x = bn.input[0]
    producer = g.producers.get(x)
    if producer is None:
        return None
    layer, bias_node, bias_slot = producer, producer, BIAS_SLOT
    if producer.op_type == "Add":
        matmuls = [g.producers[i] for i in producer.input if i in g.producers and g.producers[i].op_type == "MatMul"]
        if not matmuls:
            return None
        matmul = matmuls[0]
        bias = _matmul_bias(g, matmul)
        if isinstance(bias, str):
            return bias
        layer, (bias_node, bias_slot) = matmul, bias
    elif producer.op_type == "MatMul":
        return "MatMul has no bias Add to take the BN shift"
    elif producer.op_type not in ("Conv", "ConvTranspose", "Gemm"):
        return None
    op = layer.op_type
    if x in g.outputs:
        return f"{op} output is also a graph output"
    if len(g.consumers.get(x, [])) != 1 or g.read_count.get(x) != 1:
        return f"{op} output has {g.read_count.get(x)} consumers"
    if op == "MatMul" and len(g.shape(x) or []) != 2:
        return "MatMul output is not known to be 2-D, so BN's channel axis is not its feature axis"
    return _layer_problem(g, layer, bias_node, bias_slot, channels, "backward") or \
        _Plan(layer, "backward", bias_node, bias_slot)


def _pass_problem(g: _Graph, node: onnx.NodeProto, tensor: str) -> str | None:
    """Why the BN cannot travel through this Dropout/Identity/Flatten/Reshape."""
    if node.input[0] != tensor:
        return f"BN output is not the data input of {node.op_type} {_label(node)!r}"
    if node.op_type == "Dropout":
        if any(name and name in g.read_count for name in node.output[1:]):
            return f"the mask of Dropout {_label(node)!r} is used"
        training = node.input[2] if len(node.input) > 2 else ""
        if training and ((flag := g.constant(training)) is None or g.tensor_array(flag).any()):
            return f"Dropout {_label(node)!r} may run in training mode"
    return None


def _plan_forward(g: _Graph, bn: onnx.NodeProto, channels: int) -> _Plan | str:
    """Fold into the single linear layer that every path from the BN output leads to."""
    tensor, reshaped = bn.output[0], False
    while True:
        what = "BN output" if tensor == bn.output[0] else f"tensor {tensor!r} after the BN"
        if tensor in g.outputs:
            return f"no linear layer to fold into: {what} is a graph output"
        # Shape and Size read only the shape, which folding keeps.
        shape_readers = [n for n in g.consumers.get(tensor, []) if n.op_type in SHAPE_ONLY and list(n.input) == [tensor]]
        readers = [n for n in g.consumers.get(tensor, []) if n not in shape_readers]
        value_reads = g.read_count.get(tensor, 0) - len(shape_readers)
        if not readers:
            return f"no linear layer to fold into: nothing reads the {what}"
        if len(readers) > 1 or value_reads != 1:
            return f"{what} has {value_reads} consumers"
        node = readers[0]
        if node.op_type not in PASSTHROUGH:
            return _forward_into(g, node, tensor, bn, channels, reshaped)
        if problem := _pass_problem(g, node, tensor):
            return problem
        reshaped = reshaped or node.op_type in ("Flatten", "Reshape")
        tensor = node.output[0]


def _conv_padding(conv: onnx.NodeProto) -> str | None:
    auto_pad = _attr(conv, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return f"auto_pad={auto_pad}"
    pads = _attr(conv, "pads", [])
    if auto_pad == "NOTSET" and any(pads):
        return f"pads={list(pads)}"
    return None


def _forward_into(g: _Graph, layer: onnx.NodeProto, tensor: str, bn: onnx.NodeProto,
                  channels: int, reshaped: bool) -> _Plan | str:
    """Plan the forward fold into `layer`, which reads `tensor` (the BN output, or what
    Dropout/Identity/Flatten/Reshape made of it).

    After Flatten/Reshape, a layer that contracts a last axis of length C*H*W sees each sample's
    (C, H, W) block in row-major order, so channel c covers features c*H*W .. (c+1)*H*W - 1;
    the channel-count check below (C*H*W == the layer's input features) guarantees that axis.
    """
    op, label = layer.op_type, _label(layer)
    if op not in ("Conv", "Gemm", "MatMul"):
        return f"no linear layer to fold into: BN does not fold through {op} {label!r}"
    if layer.input[0] != tensor:
        return f"BN output is not the data input of {op} {label!r}"
    shape, repeat = g.shape(bn.input[0]), 1
    if reshaped:
        if op == "Conv":
            return f"BN reaches Conv {label!r} through Flatten/Reshape, which moves its channel axis"
        if shape is None or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
            return f"shape of the BN input is unknown, so its channels cannot be mapped to the features of {op} {label!r}"
        repeat = int(np.prod(shape[2:]))
    bias_node, bias_slot = layer, BIAS_SLOT
    if op == "Conv":
        if padding := _conv_padding(layer):
            return f"input of a Conv with zero padding ({padding}): the padded zeros would miss the BN shift"
    elif op == "Gemm" and _attr(layer, "transA", 0):
        return "Gemm transposes its input (transA=1), so BN's channel axis is not its feature axis"
    elif op == "MatMul":
        if not reshaped and (shape is None or len(shape) != 2):
            return "MatMul input is not known to be 2-D, so BN's channel axis is not its feature axis"
        bias = _matmul_bias(g, layer)
        if isinstance(bias, str):
            return bias
        bias_node, bias_slot = bias
    return _layer_problem(g, layer, bias_node, bias_slot, channels * repeat, "forward") or \
        _Plan(layer, "forward", bias_node, bias_slot, repeat)


def _plan(g: _Graph, bn: onnx.NodeProto) -> _Plan | str:
    """How `bn` folds, or why it stays: backward into its producer if possible, else forward."""
    if problem := _bn_problem(g, bn):
        return problem
    channels = int(np.prod(g.fixed(bn.input[1]).dims))
    backward = _plan_backward(g, bn, channels)
    if isinstance(backward, _Plan):
        return backward
    forward = _plan_forward(g, bn, channels)
    if isinstance(forward, _Plan) or backward is None:
        return forward
    return f"{backward}; {forward}"


# ----------------------------------------------------------------------------- applying

def _bn_affine(g: _Graph, bn: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray]:
    """(s, t) with BN(x) = s*x + t per channel, in float64."""
    scale, bias, mean, var = (g.array(name).reshape(-1) for name in bn.input[1:5])
    s = scale / np.sqrt(var + _attr(bn, "epsilon", 1e-5))
    return s, bias - mean * s


CHUNK = 1 << 22  # weight elements scaled at a time in float64 (32 MiB; a VGG16 fc6 weight has 103M)


def _chunks(shape: tuple[int, ...], layout: _Layout) -> Iterator[tuple[tuple, slice]]:
    """(index into W, its output channels) for slices of W along its output axis of about CHUNK elements."""
    axis = layout.out_axis
    per_output = int(np.prod(shape)) // max(layout.outputs, 1)
    step = layout.outputs if axis is None else max(1, CHUNK // max(per_output, 1))
    for lo in range(0, layout.outputs, step):
        hi = min(lo + step, layout.outputs)
        yield ((slice(None),) * axis + (slice(lo, hi),) if axis is not None else ()), slice(lo, hi)


def _part(index: np.ndarray, where: tuple) -> np.ndarray:
    """The part of a broadcastable index array that lines up with W[where]."""
    return index[tuple(sl if index.shape[i] > 1 else slice(None) for i, sl in enumerate(where))]


def _apply(g: _Graph, bn: onnx.NodeProto, plan: _Plan) -> None:
    layer = plan.layer
    if plan.bias_slot < len(plan.bias_node.input) and plan.bias_node.input[plan.bias_slot]:
        g.own_bias(plan.bias_node, plan.bias_slot)
    weight = g.fixed(layer.input[1])
    layout = _layout(layer, tuple(weight.dims))
    bias_name = plan.bias_node.input[plan.bias_slot] if plan.bias_slot < len(plan.bias_node.input) else ""
    alpha, beta = (_attr(layer, "alpha", 1.0), _attr(layer, "beta", 1.0)) if layer.op_type == "Gemm" else (1.0, 1.0)
    b = g.array(bias_name) * beta if bias_name else np.zeros(layout.outputs)
    s, t = _bn_affine(g, bn)
    if plan.direction == "forward":
        s, t = np.repeat(s, plan.repeat), np.repeat(t, plan.repeat)
    w = g.tensor_array(weight)  # stored type; scaled in float64 a chunk of output channels at a time
    new_w, shift = np.empty(w.shape, onnx.helper.tensor_dtype_to_np_dtype(weight.data_type)), np.zeros(layout.outputs)
    for where, outputs in _chunks(w.shape, layout):
        part = w[where].astype(np.float64)
        if alpha != 1.0:
            part *= alpha
        if plan.direction == "backward":
            part *= s[_part(layout.out_index, where)]
        else:
            moved = np.moveaxis(part * t[_part(layout.in_index, where)], layout.out_axis or 0, 0)
            shift[outputs] = moved.reshape(outputs.stop - outputs.start, -1).sum(axis=1)
            part *= s[_part(layout.in_index, where)]
        new_w[where] = part
    del w
    new_b = b * s + t if plan.direction == "backward" else b + shift
    bias_type = g.fixed(bias_name).data_type if bias_name else weight.data_type
    g.write(layer, 1, new_w, weight.data_type, _label(layer) + "_weight")
    g.write(plan.bias_node, plan.bias_slot, new_b.astype(onnx.helper.tensor_dtype_to_np_dtype(bias_type)), bias_type,
            _label(layer) + "_bias")
    kept = [a for a in layer.attribute if not (layer.op_type == "Gemm" and a.name in ("alpha", "beta"))]
    del layer.attribute[:]
    layer.attribute.extend(kept)
    _remove_bn(g, bn, plan)


def _remove_bn(g: _Graph, bn: onnx.NodeProto, plan: _Plan) -> None:
    """Drop the BN so that every tensor name keeps its value. Backward: the layer (or the Add after
    a MatMul) writes the BN's output name; its own output, which only the BN read, goes. Forward:
    the BN's readers read its input, and the tensors between it and the layer (Dropout, Identity,
    Flatten, Reshape outputs), which now hold values before the BN, are renamed `<name>/pre_bn`
    (none is a graph output: such a BN does not fold forward). A MatMul whose bias Add takes the
    BN's shift computes other values now: its output becomes `<name>/bn_folded`. Graph output
    names never change."""
    x, y = bn.input[0], bn.output[0]
    g.touched.update(bn.input[1:])
    g.remove_node(bn)  # first, so that `y` has one writer at every step
    if plan.direction == "backward":
        producer = g.producers[x]
        g.set_output(producer, list(producer.output).index(x), y)
        g.drop_value_info(x)
    else:
        tensor = y
        while (node := next(n for n in g.consumers[tensor] if n.op_type not in SHAPE_ONLY)) is not plan.layer:
            _rename_output(g, node, g.unique_name(f"{node.output[0]}/pre_bn"))
            tensor = node.output[0]
        g.replace_uses(y, x)
        g.drop_value_info(y)
    if plan.layer is not plan.bias_node:  # a MatMul before its bias Add: it computes other values now
        _rename_output(g, plan.layer, g.unique_name(f"{plan.layer.output[0]}/bn_folded"))


def _rename_output(g: _Graph, node: onnx.NodeProto, name: str) -> None:
    """`node`'s first output (not a graph output) and its reads become `name`."""
    old = node.output[0]
    g.replace_uses(old, name)
    g.set_output(node, 0, name)
    g.drop_value_info(old)


@dataclass
class FoldReport:
    """What `fold` decided, one entry per BN node in graph order: {"bn", "action": "folded"|"kept",
    "into", "direction": "backward"|"forward"|None, "reason"}."""

    decisions: list[dict]

    @property
    def folded(self) -> int:
        return sum(d["action"] == "folded" for d in self.decisions)

    @property
    def kept(self) -> int:
        return len(self.decisions) - self.folded

    def summary(self) -> str:
        return _summary(self.decisions)


def fold(model: Model) -> tuple[Model, FoldReport]:
    """(`model` with every exactly foldable BatchNormalization merged into a linear layer, what was decided);
    `model` is left as it is.

    The weights folding leaves alone stay where they are (in the model's file, for a Model opened from
    a path) and those it computes are arrays of the result (see `onnxbn.io.model`), so a VGG16 folds while
    Python holds only the changed tensors.
    """
    result = model.copy()
    out = result.proto
    require_opset(out)
    g = _Graph(result, value_types(out))
    report = []
    for bn in [n for n in out.graph.node if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx")]:
        plan = _plan(g, bn)
        entry = {"bn": _label(bn), "action": "kept", "into": None, "direction": None, "reason": plan}
        if isinstance(plan, _Plan):
            entry.update(action="folded", into=_label(plan.layer), direction=plan.direction, reason=None)
            _apply(g, bn, plan)
        report.append(entry)
    g.prune(g.touched)
    set_metadata(out, {"onnxbn.fold": _summary(report)})
    kept = {t.name for t in out.graph.initializer}
    result.arrays = {k: v for k, v in result.arrays.items() if k in kept}
    return result, FoldReport(report)


def _summary(report: list[dict]) -> str:
    folded = sum(e["action"] == "folded" for e in report)
    text = f"folded {folded} of {len(report)} BN"
    kept = [f"{e['bn']} ({e['reason']})" for e in report if e["action"] == "kept"]
    return text + ("; kept " + ", ".join(kept) if kept else "")


def fold_bn(model) -> onnx.ModelProto:
    """A copy of `model` with every exactly foldable BatchNormalization merged into a linear layer.

    The input is not modified. Node names, graph output names, opset and metadata are kept;
    metadata_props gains `onnxbn.fold` ("folded K of N BN", plus the BN kept and why).
    """
    return fold(Model.open(model))[0].to_proto()


def explain_fold(model) -> list[dict]:
    """One entry per BN node, in graph order: {"bn", "action": "folded"|"kept", "into",
    "direction": "backward"|"forward"|None, "reason"}, exactly as `fold_bn` decides."""
    return fold(Model.open(model))[1].decisions
