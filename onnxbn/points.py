"""BN points: the tensors where a BatchNormalization layer can go, picked by a selector.

Selectors: `dense` (the activation after each hidden Gemm/MatMul, the notebook's
choice), `conv` (the activation after each Conv), `relu` (every Relu output),
`linear` (every Conv/ConvTranspose/Gemm/MatMul output, pre-activation), or explicit
tensor names. A point's channel axis is 1: (N, C, ...) tensors only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

import onnx

from onnxbn.errors import UserError
from onnxbn.graph import FLOAT_TYPES, GraphIndex, tensor_shape, value_types
from onnxbn.io.load import load_model

SELECTORS = ("dense", "conv", "relu", "linear")
ACTIVATIONS = {"Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Sigmoid", "Tanh", "Clip", "HardSigmoid",
               "HardSwish", "Gelu", "Softplus", "Mish", "Celu", "ThresholdedRelu"}
LINEAR_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


@dataclass(frozen=True)
class Point:
    """A tensor where a BN layer can go: its name, producer, channel count and shape."""

    tensor: str
    producer: str
    producer_op: str
    channels: int | None
    shape: list | None
    dtype: str

    def to_dict(self) -> dict:
        return asdict(self)


def _is_hidden_linear(node: onnx.NodeProto, cons: dict, seen_ops: set[str]) -> bool:
    """True when another Gemm/MatMul/Conv lies downstream of `node` (it is not the classifier)."""
    stack, visited = list(node.output), set()
    while stack:
        t = stack.pop()
        for c in cons.get(t, []):
            if id(c) in visited:
                continue
            visited.add(id(c))
            if c.op_type in seen_ops:
                return True
            stack.extend(c.output)
    return False


def _linear_output(node: onnx.NodeProto, cons: dict, inits: set[str]) -> str:
    """The layer's output: a MatMul's bias Add output when the MatMul feeds exactly one Add."""
    out = node.output[0]
    if node.op_type == "MatMul":
        users = cons.get(out, [])
        if len(users) == 1 and users[0].op_type == "Add" and any(i in inits for i in users[0].input):
            return users[0].output[0]
    return out


def _activation_after(tensor: str, cons: dict) -> onnx.NodeProto | None:
    users = cons.get(tensor, [])
    if len(users) == 1 and users[0].op_type in ACTIVATIONS:
        return users[0]
    return None


def _matmul_features_last(index: GraphIndex, name: str, shape: list | None) -> bool:
    """True when `name` comes out of a MatMul (or its bias Add) with rank != 2: (N, T, D) keeps its
    features on the last axis, where BN's channel axis 1 would normalise over T instead."""
    node = index.producers.get(name)
    if node is not None and node.op_type == "Add":
        node = next((index.producers[i] for i in node.input if i in index.producers
                     and index.producers[i].op_type == "MatMul"), node)
    return node is not None and node.op_type == "MatMul" and shape is not None and len(shape) != 2


def select_points(model, after: str | Iterable[str] = "dense") -> list[Point]:
    """The tensors a selector picks, in graph order; `model` is a path or a ModelProto.

    dense:  the activation output after each hidden Gemm/MatMul (the notebook's choice;
            the classifier, with no dense layer after it, is not hidden);
    conv:   the activation output after each Conv;
    relu:   every Relu output;
    linear: every Conv/ConvTranspose/Gemm/MatMul output (with its bias Add), pre-activation,
            except the last layer's (with no linear layer after it: the classifier, also
            when a Softmax follows it) and the model's final outputs;
    or explicit tensor names (a list, or a comma separated string).

    BN normalises axis 1. A MatMul output of rank 3 or more, (N, T, D), has its features on
    the last axis: selectors pass over it and an explicit name of one is refused.
    """
    model = load_model(model)
    index = GraphIndex(model)
    graph, cons, prods = model.graph, index.consumers, index.producers
    inits = set(index.initializers)
    outputs = index.outputs
    types = value_types(model)
    if isinstance(after, str) and after in SELECTORS:
        names: list[str] = []
        for node in graph.node:
            if after == "relu" and node.op_type == "Relu":
                names.append(node.output[0])
            elif after == "linear" and node.op_type in LINEAR_OPS:
                if node.op_type == "MatMul" and node.input[1] not in inits:
                    continue  # attention-style MatMul of two activations, not a layer
                out = _linear_output(node, cons, inits)
                # the last layer (the classifier, even when a Softmax follows it) gets no BN
                if out not in outputs and _is_hidden_linear(node, cons, LINEAR_OPS):
                    names.append(out)
            elif after in ("dense", "conv"):
                ops = {"Gemm", "MatMul"} if after == "dense" else {"Conv"}
                if node.op_type not in ops or (node.op_type == "MatMul" and node.input[1] not in inits):
                    continue
                if after == "dense" and not _is_hidden_linear(node, cons, {"Gemm", "MatMul"}):
                    continue
                out = _linear_output(node, cons, inits)
                act = _activation_after(out, cons)
                names.append(act.output[0] if act is not None else out)
        names = [n for n in names if not _matmul_features_last(index, n, tensor_shape(types.get(n)))]
        if not names:
            raise UserError(f"selector {after!r} matches no tensor in this model; "
                            f"try another selector ({', '.join(SELECTORS)}) or name tensors (see `onnxbn points`)")
    else:
        names = [n.strip() for n in (after.split(",") if isinstance(after, str) else after) if n.strip()]
        if not names:
            raise UserError("no tensor names given; pass a selector (dense, conv, relu, linear) or tensor names")
        missing = [n for n in names if not index.known_tensor(n)]
        if missing:
            raise UserError(f"tensor {missing[0]!r} is not in the model "
                            "(see `onnxbn points MODEL --after linear` for names)")
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise UserError(f"tensor {sorted(dup)[0]!r} is named twice")
        for name in names:
            shape = tensor_shape(types.get(name))
            if shape is not None and _matmul_features_last(index, name, shape):
                raise UserError(f"tensor {name!r} is a rank-{len(shape)} MatMul output: its features are on the last "
                                "axis, and BN normalises axis 1; pick a tensor of shape (N, C, ...)")
    points = []
    for name in names:
        prod = prods.get(name)
        shape = tensor_shape(types.get(name))
        elem = types[name].tensor_type.elem_type if name in types else onnx.TensorProto.FLOAT
        if shape is not None and len(shape) < 2:
            raise UserError(f"tensor {name!r} has rank {len(shape)}; BN needs (N, C, ...) with the channel axis 1")
        if elem not in FLOAT_TYPES:
            raise UserError(f"tensor {name!r} is {onnx.TensorProto.DataType.Name(elem)}; BN needs a floating point tensor")
        channels = shape[1] if shape and isinstance(shape[1], int) and shape[1] > 0 else None
        points.append(Point(tensor=name, producer=prod.name if prod else "", producer_op=prod.op_type if prod else "input",
                            channels=channels, shape=shape, dtype=onnx.TensorProto.DataType.Name(elem).lower()))
    return points
