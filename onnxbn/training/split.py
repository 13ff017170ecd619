"""Where fine-tuning cuts a model: after the last convolution block (`default_freeze_node`), into an
ONNX prefix that runs frozen in onnxruntime and a suffix that is imported into torch and trained
(`split_model`)."""

from __future__ import annotations

import onnx

from onnxbn.errors import UserError
from onnxbn.feeding import model_input
from onnxbn.graph import FLOAT_TYPES, GraphIndex, graph_inputs, pruned_copy, reads, tensor_shape, value_types
from onnxbn.io.copies import empty_like
from onnxbn.points import ACTIVATIONS

DENSE_OPS = {"Gemm", "MatMul"}
# Ops whose output has the rank of their first input (for models whose shapes onnx cannot infer).
_RANK_KEEPING = {"Conv", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "BatchNormalization",
                 "Dropout", "Identity", "LRN"} | ACTIVATIONS
_BROADCASTING = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum"}
# Ops between the last convolution block and the first dense layer (VGG: avgpool, Flatten).
_HEAD_PASSTHROUGH = {"Flatten", "Reshape", "Dropout", "Identity", "AveragePool", "GlobalAveragePool",
                     "MaxPool", "GlobalMaxPool", "BatchNormalization"} | ACTIVATIONS


def default_freeze_node(model: onnx.ModelProto) -> str:
    """The node whose output is the last convolution block's: the last spatial (rank >= 3)
    tensor on the way from the first dense layer back to the convolutions."""
    index = GraphIndex(model)
    producers = index.producers
    first_dense = next((n for n in model.graph.node if n.op_type in DENSE_OPS
                        and any(index.constant(i) is not None for i in n.input[:2])), None)
    if first_dense is None:
        raise UserError("the model has no dense (Gemm/MatMul) layer to fine-tune; give --freeze-through NODE")
    types = value_types(model)

    def rank(tensor: str) -> int | None:
        """The tensor's rank from shape inference, else through ops that keep their input's rank, a
        Reshape to a shape of known length, or a broadcast (the largest known rank of its inputs)."""
        shape = tensor_shape(types.get(tensor))
        if shape is not None:
            return len(shape)
        node = producers.get(tensor)
        if node is None:
            return None
        if node.op_type in _RANK_KEEPING:
            return rank(node.input[0])
        if node.op_type == "Reshape":
            target = tensor_shape(types.get(node.input[1]))
            return target[0] if target and isinstance(target[0], int) else None
        if node.op_type in _BROADCASTING:
            known = [r for r in map(rank, node.input) if r is not None]
            return max(known) if known else None
        return None

    tensor = first_dense.input[0]
    while tensor in producers:
        node = producers[tensor]
        if (rank(tensor) or 0) >= 3:
            return node.name
        if node.op_type not in _HEAD_PASSTHROUGH:
            break
        tensor = node.input[0]
    raise UserError(f"no convolution block found before the first dense layer {first_dense.name!r}; "
                    "give --freeze-through NODE (an ONNX node name)")


def split_model(model: onnx.ModelProto, node_name: str) -> tuple[onnx.ModelProto, onnx.ModelProto, str]:
    """(prefix, suffix, cut): `model` cut after the node `node_name`, at its first output `cut`.

    The prefix computes `cut` from the model's inputs (only the nodes and initializers it needs; its
    one output is `cut`); the suffix computes the model's outputs from `cut` (its one input) and
    the initializers and constants of the layers after the cut, float Constant nodes turned into
    initializers of their output's name (so weights exporters keep in Constant nodes train; write-back
    puts them back into their nodes). Refused: a cut that is not the
    only tensor the layers after it read from before it (a skip connection across the cut). The batch
    size read from the model's input (`Shape(input, start=0, end=1)`, as torch's dynamo exporter writes
    `x.size(0)`) is read from `cut` instead: one feature row per sample, the same batch size."""
    node = next(n for n in model.graph.node if n.name == node_name)
    cut = node.output[0]
    needed, suffix_nodes = {o.name for o in model.graph.output}, []
    inputs = {i.name for i in graph_inputs(model)}
    for n in reversed(model.graph.node):
        if cut not in n.output and any(o in needed for o in n.output):
            if n.op_type == "Shape" and n.input[0] in inputs and \
                    {(a.name, a.i) for a in n.attribute} in ({("end", 1)}, {("start", 0), ("end", 1)}):
                n = onnx.helper.make_node("Shape", [cut], list(n.output), name=n.name, start=0, end=1)
            suffix_nodes.append(n)
            needed.update(reads(n))
    crossing = sorted(needed & inputs)
    if crossing:
        raise UserError(f"--freeze-through {node_name!r}: the layers after it also read what comes before it (through "
                        f"{crossing[0]!r}, not only {cut!r}); choose a node that all later layers depend on alone")
    types = value_types(model)
    elem = model_input(model)[1]
    cut_info = onnx.ValueInfoProto(name=cut, type=types[cut]) if cut in types else \
        onnx.helper.make_tensor_value_info(cut, onnx.helper.np_dtype_to_tensor_dtype(elem), None)
    prefix = pruned_copy(model, {cut})
    prefix.graph.output.append(cut_info)
    suffix = empty_like(model)
    for n in suffix_nodes[::-1]:
        value = next((a.t for a in n.attribute if a.name == "value"), None) if n.op_type == "Constant" else None
        if value is not None and value.data_type in FLOAT_TYPES:  # a weight as exporters such as Paddle write it:
            weight = suffix.graph.initializer.add()  # an initializer of the suffix, so it trains like one
            weight.CopyFrom(value)
            weight.name = n.output[0]
        else:
            suffix.graph.node.append(n)
    suffix.graph.input.append(cut_info)
    suffix.graph.initializer.extend(t for t in model.graph.initializer if t.name in needed)
    suffix.graph.output.extend(model.graph.output)
    suffix.graph.value_info.extend(v for v in model.graph.value_info if v.name != cut)
    return prefix, suffix, cut
