"""Splice identity BatchNormalization nodes at the tensors a stats file describes.

ONNX BatchNormalization computes y = scale * (x - mean) / sqrt(var + eps) + B per
channel (axis 1). With the tensor's measured statistics mu and sigma^2:

    mean = mu,  var = sigma^2,  scale = sqrt(sigma^2 + eps)  (float64, then cast),  B = mu

so y = x up to float rounding, for every input, not just the calibration data.
Channels with zero variance (dead ReLU units) stay exact: scale = sqrt(eps) cancels
the denominator. Once fine-tuned, the BN layers normalise with these statistics.

The BN node takes over the tensor's name: its producer now writes `<name>/pre_bn`
and BN writes `<name>`, so every consumer reads the BN output, graph output names
never change, and the original and the BN model share all tensor names (which lets
`onnxbn check --layerwise` point at the exact layer of a bad splice). A graph input
keeps its name; its consumers are rewired to the BN output instead.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxbn.errors import UserError
from onnxbn.graph import (graph_inputs, load_model, model_sha256, producers, require_opset, tensor_shape,
                          set_metadata, unique_name, value_types)
from onnxbn.stats import Stats, load_stats

BN_SUFFIX = "/onnxbn_bn"


def identity_bn_params(mean: np.ndarray, var: np.ndarray, eps: float, dtype: np.dtype) -> dict[str, np.ndarray]:
    """scale, B, mean, var that make BatchNormalization the identity (see module docstring)."""
    mean = np.asarray(mean, dtype=np.float64)
    var = np.maximum(np.asarray(var, dtype=np.float64), 0.0)
    return {"scale": np.sqrt(var + eps).astype(dtype), "B": mean.astype(dtype),
            "mean": mean.astype(dtype), "var": var.astype(dtype)}


def dead_channels(stats: Stats) -> dict[str, int]:
    """Number of zero-variance channels per tensor (dead ReLU units, constant features)."""
    return {name: int(np.count_nonzero(m.var == 0)) for name, m in stats.moments.items()}


def _check_stats_match(model: onnx.ModelProto, stats: Stats, types: dict) -> None:
    digest = stats.meta.get("model_sha256")
    if digest and digest != model_sha256(model):
        raise UserError("the stats file was gathered on a different model (model_sha256 differs); "
                        "run `onnxbn stats` on this model first")
    known = set(producers(model.graph)) | {i.name for i in graph_inputs(model)}
    for name, m in stats.moments.items():
        if name not in known:
            raise UserError(f"the stats name tensor {name!r}, which is not in this model; were they gathered on another model?")
        shape = tensor_shape(types.get(name))
        if shape and len(shape) > 1 and isinstance(shape[1], int) and shape[1] > 0 and shape[1] != m.mean.size:
            raise UserError(f"tensor {name!r} has {shape[1]} channels but the stats have {m.mean.size}; "
                            "were they gathered on another model?")


def insert_bn(model, stats, eps: float = 1e-5) -> onnx.ModelProto:
    """A copy of `model` with an identity BatchNormalization after every tensor in `stats`.

    `model`: path or ModelProto; `stats`: path or Stats. See the module docstring.
    """
    if not eps > 0:
        raise UserError(f"--eps must be positive (got {eps})")
    proto = load_model(model)
    stats = load_stats(stats)
    require_opset(proto)
    types = value_types(proto)
    _check_stats_match(proto, stats, types)
    if proto is model:  # the caller's proto: work on a copy (a model loaded from a path is ours)
        out = onnx.ModelProto()
        out.CopyFrom(proto)
    else:
        out = proto
    graph = out.graph
    prods = producers(graph)
    taken = {n for node in graph.node for n in list(node.input) + list(node.output)}
    taken |= {t.name for t in graph.initializer} | {n.name for n in graph.node}
    input_names = {i.name for i in graph.input}
    new_nodes: dict[int, list[onnx.NodeProto]] = {}  # BN nodes to put after a producer (by id)
    leading: list[onnx.NodeProto] = []          # BN nodes on graph inputs
    for tensor, m in stats.moments.items():
        elem = types[tensor].tensor_type.elem_type if tensor in types else onnx.TensorProto.FLOAT
        dtype = helper.tensor_dtype_to_np_dtype(elem)
        producer = prods.get(tensor)
        base = (producer.name or tensor) if producer is not None else tensor
        node_name = unique_name(base + BN_SUFFIX, taken)
        params = identity_bn_params(m.mean, m.var, eps, dtype)
        param_names = []
        for key in ("scale", "B", "mean", "var"):
            pname = unique_name(f"{node_name}.{key}", taken)
            graph.initializer.append(numpy_helper.from_array(params[key], pname))
            if out.ir_version < 4:  # IR 3: every initializer must also be a graph input
                graph.input.append(helper.make_tensor_value_info(pname, elem, params[key].shape))
            param_names.append(pname)
        if tensor in input_names:
            bn_out = unique_name(f"{tensor}/bn", taken)
            for node in graph.node:
                node.input[:] = [bn_out if i == tensor else i for i in node.input]
            bn = helper.make_node("BatchNormalization", [tensor, *param_names], [bn_out], name=node_name, epsilon=eps)
            leading.append(bn)
        else:
            pre = unique_name(f"{tensor}/pre_bn", taken)
            producer.output[:] = [pre if o == tensor else o for o in producer.output]
            bn = helper.make_node("BatchNormalization", [pre, *param_names], [tensor], name=node_name, epsilon=eps)
            new_nodes[id(producer)] = new_nodes.get(id(producer), []) + [bn]
    ordered = list(leading)
    for node in graph.node:
        ordered.append(node)
        ordered.extend(new_nodes.get(id(node), []))
    del graph.node[:]
    graph.node.extend(ordered)
    dead = dead_channels(stats)
    set_metadata(out, {"onnxbn.insert": json.dumps({
        "bn_inserted": len(stats.moments),
        "eps": eps,
        "selector": stats.meta.get("selector"),
        "stats_samples": stats.meta.get("samples"),
        "stats_model_sha256": stats.meta.get("model_sha256"),
        "dead_channels": sum(dead.values()),
    })})
    return out
