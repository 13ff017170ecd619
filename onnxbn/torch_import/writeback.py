"""Trained weights back into the ONNX graph (`write_back`), and cutting a module in two (`split_at`)."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import torch
import torch.fx as fx
from torch import nn

from onnxbn.errors import UserError
from onnxbn.io.copies import set_metadata
from onnxbn.io.model import Model
from onnxbn.io.tensors import FileRange, file_chunks
from onnxbn.torch_import.importer import _attach, _structure_key


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
    return write_into(Model.open(model), module).to_proto()


def write_into(model: Model, module: fx.GraphModule) -> Model:
    """`write_back` as a Model transform (`model` left as it is): each written initializer's values are an
    array of the result that shares the module's memory where the dtype allows (so it changes when the
    module does); the other weights stay where they were (in the model's file, for one opened from a path)."""
    mapping = getattr(module, "onnx_tensors", None)
    if mapping is None:
        raise UserError("this module was not made by onnxbn.to_torch (no onnx_tensors map); import the model with to_torch")
    key = getattr(module, "onnx_structure", None)
    if key is not None and key != _structure_key(model.proto):
        raise UserError("the module was imported from a different model (nodes differ); "
                        "write back into the model it came from")
    result = model.copy()
    by_name = {t.name: t for t in result.proto.graph.initializer}
    written, changed = 0, 0
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
        if not _same(model, target, arr):
            changed += 1
        written += 1
        result.set_array(init_name, arr)
    set_metadata(result.proto, {"onnxbn.write_back": json.dumps({"tensors": written, "changed": changed},
                                                                separators=(",", ":"))})
    return result


def _same(model: Model, tensor: onnx.TensorProto, values: np.ndarray) -> bool:
    """Whether `tensor` of `model` holds `values` (np.array_equal); data in a file is compared 16 MiB at a time."""
    source = model.source(tensor.name)
    if not isinstance(source, FileRange):
        old = model.tensor_array(tensor)
        return old.shape == values.shape and np.array_equal(old, values)
    if source.length != values.nbytes:
        return False
    flat, done = values.reshape(-1), 0
    for chunk in file_chunks(source, size=(16 << 20) // values.itemsize * values.itemsize):
        old = np.frombuffer(chunk, dtype=values.dtype.newbyteorder("<"))
        if not np.array_equal(old, flat[done:done + old.size]):
            return False
        done += old.size
    return True


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
