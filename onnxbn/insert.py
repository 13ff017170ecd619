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

Parameters take the tensor's type; a float16/bfloat16 tensor whose statistics that type
cannot hold (sigma > 256 in float16) gets a float32 BN between two Casts instead
(metadata `float32_bn` counts them).
"""

from __future__ import annotations

import concurrent.futures
import json
from typing import Callable

import numpy as np
import onnx
from onnx import helper

from onnxbn.errors import UserError
from onnxbn.graph import GraphIndex, require_opset, tensor_shape, value_types
from onnxbn.io.copies import set_metadata
from onnxbn.io.model import Model
from onnxbn.stats import Stats, load_stats

BN_SUFFIX = "/onnxbn_bn"


def identity_bn_params(mean: np.ndarray, var: np.ndarray, eps: float, dtype: np.dtype) -> dict[str, np.ndarray]:
    """scale, B, mean, var that make BatchNormalization the identity (see module docstring)."""
    mean = np.asarray(mean, dtype=np.float64)
    var = np.maximum(np.asarray(var, dtype=np.float64), 0.0)
    return {"scale": np.sqrt(var + eps).astype(dtype), "B": mean.astype(dtype),
            "mean": mean.astype(dtype), "var": var.astype(dtype)}


def _identity_bn_nodes(index: GraphIndex, x: str, y: str, name: str, mean: np.ndarray, var: np.ndarray, eps: float,
                       elem: int) -> list[onnx.NodeProto]:
    """The nodes computing y = x through an identity BN named `name`, parameters added to the graph.

    The parameters take the tensor's type. Where that type cannot hold them (float16 and
    bfloat16 overflow past 65504 and ~3.4e38; var = sigma^2 overflows float16 once sigma > 256),
    the BN runs in float32 between two Casts, so its parameters stay finite and exact:
    x -> Cast(float) -> BN -> Cast(type of x) -> y.
    """
    with np.errstate(over="ignore"):  # an overflow is detected below
        params = identity_bn_params(mean, var, eps, helper.tensor_dtype_to_np_dtype(elem))
    if all(np.isfinite(p.astype(np.float64)).all() for p in params.values()):
        names = [index.add_initializer(params[k], f"{name}.{k}") for k in ("scale", "B", "mean", "var")]
        return [helper.make_node("BatchNormalization", [x, *names], [y], name=name, epsilon=eps)]
    params = identity_bn_params(mean, var, eps, np.dtype(np.float32))
    names = [index.add_initializer(params[k], f"{name}.{k}") for k in ("scale", "B", "mean", "var")]
    x32, y32 = index.unique_name(f"{x}/float"), index.unique_name(f"{y}/float")
    return [helper.make_node("Cast", [x], [x32], name=index.unique_name(f"{name}/to_float"), to=onnx.TensorProto.FLOAT),
            helper.make_node("BatchNormalization", [x32, *names], [y32], name=name, epsilon=eps),
            helper.make_node("Cast", [y32], [y], name=index.unique_name(f"{name}/from_float"), to=elem)]


def dead_channels(stats: Stats) -> dict[str, int]:
    """Number of zero-variance channels per tensor (dead ReLU units, constant features)."""
    return {name: int(np.count_nonzero(m.var == 0)) for name, m in stats.moments.items()}


def _provenance(model: Model) -> Callable[[], str]:
    """The model's sha256 (`Model.sha256`), computed in a thread (hashlib releases the GIL) while the
    caller edits a copy; weights in a file are hashed from disk, in 1 MiB reads."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(model.sha256)
    pool.shutdown(wait=False)
    return future.result


def _check_provenance(stats: Stats, digest: Callable[[], str]) -> None:
    expected = stats.meta.get("model_sha256")
    if expected and expected != digest():
        raise UserError("the stats file was gathered on a different model (model_sha256 differs); "
                        "run `onnxbn stats` on this model first")


def _check_stats_match(model: onnx.ModelProto, stats: Stats, types: dict) -> None:
    index = GraphIndex(model)
    for name in stats.tensors:
        if not index.known_tensor(name):
            raise UserError(f"the stats name tensor {name!r}, which is not in this model; "
                            "were they gathered on another model?")
        shape, channels = tensor_shape(types.get(name)), stats.mean(name).size
        if shape and len(shape) > 1 and isinstance(shape[1], int) and shape[1] > 0 and shape[1] != channels:
            raise UserError(f"tensor {name!r} has {shape[1]} channels but the stats have {channels}; "
                            "were they gathered on another model?")


def insert_bn(model, stats, eps: float = 1e-5) -> onnx.ModelProto:
    """A copy of `model` with an identity BatchNormalization after every tensor in `stats`.

    `model`: path or ModelProto; `stats`: path or Stats. See the module docstring.
    """
    return insert(Model.open(model), stats, eps).to_proto()


def insert(model: Model, stats, eps: float = 1e-5) -> Model:
    """`model` (unchanged) with an identity BatchNormalization after every tensor in `stats` (path or
    Stats); weights that stay in a file stay there (see `onnxbn.io.model`)."""
    if not eps > 0:
        raise UserError(f"--eps must be positive (got {eps})")
    digest = _provenance(model)
    result = model.copy()
    out = result.proto
    stats = load_stats(stats)
    require_opset(out)
    types = value_types(out)
    _check_stats_match(out, stats, types)
    index = GraphIndex(out)
    original = list(out.graph.node)
    new_nodes: dict[int, list[onnx.NodeProto]] = {}  # BN nodes to put after a producer (by id)
    leading: list[onnx.NodeProto] = []          # BN nodes on graph inputs
    widened = 0
    for tensor in stats.tensors:
        elem = types[tensor].tensor_type.elem_type if tensor in types else onnx.TensorProto.FLOAT
        producer = index.producers.get(tensor)
        base = (producer.name or tensor) if producer is not None else tensor
        node_name = index.unique_name(base + BN_SUFFIX)
        if producer is None:  # a graph input keeps its name; its readers read the BN output
            x, y = tensor, index.unique_name(f"{tensor}/bn")
            index.replace_uses(tensor, y)
        else:
            x, y = index.unique_name(f"{tensor}/pre_bn"), tensor
            index.set_output(producer, list(producer.output).index(tensor), x)
        nodes = [index.add_node(n) for n in
                 _identity_bn_nodes(index, x, y, node_name, stats.mean(tensor), stats.var(tensor), eps, elem)]
        widened += len(nodes) > 1
        if producer is None:
            leading.extend(nodes)
        else:
            new_nodes.setdefault(id(producer), []).extend(nodes)
    ordered = list(leading)
    for node in original:
        ordered.append(node)
        ordered.extend(new_nodes.get(id(node), []))
    index.reorder(ordered)
    _check_provenance(stats, digest)  # the hash ran alongside the work above
    dead = dead_channels(stats)
    set_metadata(out, {"onnxbn.insert": json.dumps({
        "bn_inserted": len(stats.moments),
        "eps": eps,
        "selector": stats.meta.get("selector"),
        "stats_samples": stats.meta.get("samples"),
        "stats_model_sha256": stats.meta.get("model_sha256"),
        "dead_channels": sum(dead.values()),
        "float32_bn": widened,
    })})
    return result
