"""The plan of a recalibration: which BN nodes, the tensors their statistics go to, and the order.

Training-mode BN (training_mode=1 from opset 14, or running/saved statistics outputs
before it) is converted to inference mode with the recalibrated statistics: the extra
outputs go (refused while anything reads them), the first output keeps its name. Such
a node is always recalibrated. A BN whose mean/var initializer (or Constant) is shared
with another node gets a fresh initializer; the shared tensor is left alone.

level(b) = 0 when no selected BN lies upstream of b, else 1 + the highest level upstream: exact
mode measures level k in pass k. The cut after pass k: the tensors later passes read that no
longer change (`cut_after`), kept between passes while they fit in the cache (`choose_cut`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxbn.errors import UserError
from onnxbn.graph import GraphIndex, graph_inputs, reads, tensor_shape
from onnxbn.io.model import Model
from onnxbn.recalibration.report import BNRecord

MEAN, VAR = 3, 4  # BatchNormalization input slots


class Staged(Protocol):
    """What the level-by-level passes (`exact.run_levels`) need of an item: a BN to recalibrate (BNRecord), a
    quantized layer to correct (quantization.recovery). Its level's pass measures `input`; after it, the
    parameters of the node whose first output is `key` change."""

    @property
    def node(self) -> str: ...
    @property
    def key(self) -> str: ...
    @property
    def input(self) -> str: ...
    level: int


def bn_label(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def select_bns(model: onnx.ModelProto, nodes) -> list[onnx.NodeProto]:
    """The BN nodes to recalibrate, in graph order: the named ones (default all), plus every training-mode one."""
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    if not bns:
        raise UserError("the model has no BatchNormalization node; to recalibrate a model without BN, insert identity "
                        "BN first (onnxbn stats + onnxbn insert) and recalibrate that model")
    if nodes is None:
        return bns
    names = [n.strip() for n in (nodes.split(",") if isinstance(nodes, str) else nodes) if n.strip()]
    if not names:
        raise UserError("--nodes names no node; give BatchNormalization node names, comma separated")
    by_name = {n.name: n for n in model.graph.node if n.name}
    for name in names:
        node = by_name.get(name)
        if node is None:
            raise UserError(f"no node named {name!r} in the model; BatchNormalization nodes: "
                            + ", ".join(bn_label(b) for b in bns[:8]) + (", ..." if len(bns) > 8 else ""))
        if node.op_type != "BatchNormalization":
            raise UserError(f"node {name!r} is a {node.op_type}, not a BatchNormalization; name BN nodes only")
    wanted = set(names)
    return [b for b in bns if b.name in wanted or _in_training_mode(b)]


def _in_training_mode(node: onnx.NodeProto) -> bool:
    """training_mode=1 (opset 14+), or running/saved statistics outputs (before opset 14)."""
    mode = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "training_mode"), 0)
    return bool(mode) or len([o for o in node.output[1:] if o]) > 0


def _to_inference(index: GraphIndex, node: onnx.NodeProto) -> None:
    """Drop the training outputs and training_mode; refuse when something reads those outputs."""
    for extra in node.output[1:]:
        if extra and index.read_count.get(extra):
            raise UserError(f"BatchNormalization {bn_label(node)!r} is in training mode and its statistics output "
                            f"{extra!r} is read by the graph; recalibrate converts the node to inference mode, which "
                            "has no such output: remove that use first")
    index.keep_outputs(node, 1)
    kept = [a for a in node.attribute if a.name != "training_mode"]
    del node.attribute[:]
    node.attribute.extend(kept)


def _own_slot(index: GraphIndex, node: onnx.NodeProto, slot: int, elem: int,
              reads_before: dict[str, int]) -> tuple[np.ndarray | None, bool]:
    """Make `node.input[slot]` a tensor this BN alone reads and recalibrate may write: its initializer or
    Constant when nothing else read it (`reads_before`: read counts before any change), else a fresh
    initializer (a shared tensor is never changed). Returns (old value in float64, or None when it is
    computed at run time; whether a fresh initializer was made)."""
    name = node.input[slot]
    tensor = index.initializers.get(name)
    if tensor is None:
        tensor = resolve_constant(index, name)
    old = None if tensor is None else index.tensor_array(tensor).astype(np.float64).reshape(-1)
    own = reads_before.get(name) == 1 and name not in index.outputs and (
        name in index.initializers or _constant_node(index, name) is not None)
    if own:
        return old, False
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type if tensor is not None else elem)
    size = int(old.size) if old is not None else _channels(index, node)
    value = (old if old is not None else np.zeros(size)).astype(dtype)
    index.set_input(node, slot, index.add_initializer(value, f"{bn_label(node)}.{'mean' if slot == MEAN else 'var'}"))
    return old, True


def _constant_node(index: GraphIndex, name: str) -> onnx.NodeProto | None:
    """The Constant node writing `name` with a `value` tensor attribute (writable in place), or None."""
    node = index.producers.get(name)
    if node is not None and node.op_type == "Constant" and any(a.name == "value" for a in node.attribute):
        return node
    return None


def resolve_constant(index: GraphIndex, name: str) -> onnx.TensorProto | None:
    """`index.constant(name)`, also through Identity nodes (torch's exporter writes a parameter equal to
    another one as an Identity of it)."""
    while name in index.producers and index.producers[name].op_type == "Identity":
        name = index.producers[name].input[0]
    return index.constant(name)


def _channels(index: GraphIndex, node: onnx.NodeProto) -> int:
    for slot in (1, 2, MEAN, VAR):
        value = resolve_constant(index, node.input[slot])
        if value is not None:
            return int(np.prod(value.dims))
    raise UserError(f"BatchNormalization {bn_label(node)!r}: none of its parameters is a constant, so its channel "
                    "count is unknown; recalibrate needs constant BN parameters")


def prepare(model: Model, selected: list[onnx.NodeProto], types: dict) -> list[BNRecord]:
    """Convert training-mode BNs, give each selected BN mean/var tensors of its own; record the old values."""
    index = GraphIndex(model)
    reads_before = dict(index.read_count)
    records = []
    for node in selected:
        training = _in_training_mode(node)
        if training:
            _to_inference(index, node)
        elem = types[node.input[0]].tensor_type.elem_type if node.input[0] in types else onnx.TensorProto.FLOAT
        old_mean, fresh_mean = _own_slot(index, node, MEAN, elem, reads_before)
        old_var, fresh_var = _own_slot(index, node, VAR, elem, reads_before)
        records.append(BNRecord(node=bn_label(node), key=node.output[0], input=node.input[0],
                                channels=_channels(index, node), training_mode=training,
                                fresh=[s for s, f in (("mean", fresh_mean), ("var", fresh_var)) if f],
                                old_mean=old_mean, old_var=old_var))
    return records


def write_stats(model: Model, bn: BNRecord, mean: np.ndarray, var: np.ndarray) -> None:
    """Store mean/var in the BN's own tensors (prepared by `_own_slot`), in their dtype: an initializer
    through `Model.set_array`, a Constant node's value in place."""
    index = GraphIndex(model.proto)
    node = index.producers[bn.key]
    for slot, value in ((MEAN, mean), (VAR, var)):
        name = node.input[slot]
        tensor = index.initializers.get(name)
        constant = _constant_node(index, name) if tensor is None else None
        target = tensor if constant is None else next(a.t for a in constant.attribute if a.name == "value")
        assert target is not None, "own_slot gave the BN an initializer or a Constant of its own"
        cast = np.asarray(value, np.float64).astype(helper.tensor_dtype_to_np_dtype(target.data_type))
        if not np.isfinite(cast).all():
            raise UserError(f"BN {bn.node!r}: the new {'mean' if slot == MEAN else 'var'} does not fit its type "
                            f"{onnx.TensorProto.DataType.Name(target.data_type)} (max |value| "
                            f"{np.abs(value).max():.3g}); nothing written")
        cast = cast.reshape(tuple(target.dims))
        if tensor is not None:
            model.set_array(name, cast)
        else:
            target.CopyFrom(numpy_helper.from_array(cast, target.name))


def assign_levels(index: GraphIndex, bns: Sequence[Staged]) -> dict[str, int]:
    """Set each item's level; return up[t] = the highest level of the items upstream of tensor t
    (the item's node itself included for its output; -1: none)."""
    by_key = {b.key: b for b in bns}
    up: dict[str, int] = {}
    for node in index.graph.node:
        level = max((up.get(t, -1) for t in reads(node)), default=-1)
        bn = by_key.get(node.output[0]) if node.output else None
        if bn is not None:
            bn.level = level = level + 1
        for out in node.output:
            up[out] = level
    return up


def dynamic_tensors(index: GraphIndex, model: onnx.ModelProto) -> set[str]:
    """Tensors that depend on a run-time input (the rest is constant and recomputed where needed)."""
    dyn = {i.name for i in graph_inputs(model)}
    for node in index.graph.node:
        if any(t in dyn for t in reads(node)):
            dyn.update(o for o in node.output if o)
    return dyn


def cut_after(index: GraphIndex, bns: Sequence[Staged], k: int, up: dict[str, int], dyn: set[str]) -> list[str]:
    """The tensors later passes need that are final after pass k: read by a node that still changes
    (downstream of an item of level >= k, or its own node) and needed after pass k, written by one that does not."""
    later = [b.input for b in bns if b.level > k]
    changing = [n for n in index.ancestors(later) if max(up.get(o, -1) for o in n.output) >= k]
    written = {o for n in changing for o in n.output}
    return list(dict.fromkeys(_quantized_source(index, t, dyn) for n in changing for t in reads(n)
                              if t not in written and t in dyn))


def _quantized_source(index: GraphIndex, tensor: str, dyn: set[str]) -> str:
    """The integer tensor a DequantizeLinear of an activation makes `tensor` from (kept instead: a quarter of
    the bytes, and the next pass runs DequantizeLinear -> Conv -> QuantizeLinear, which onnxruntime fuses into
    its integer kernels as in the deployed model), else `tensor`."""
    node = index.producers.get(tensor)
    if node is not None and node.op_type == "DequantizeLinear" and node.input[0] in dyn:
        return node.input[0]
    return tensor


def graph_slice(index: GraphIndex, targets: list[str], fed: list[str]) -> tuple[list[onnx.NodeProto], list[str]]:
    """(nodes, fed tensors used): the nodes computing `targets` from the tensors in `fed` and constants."""
    base, needed, keep = set(fed), set(targets), []
    for node in reversed(index.graph.node):
        if any(o in needed and o not in base for o in node.output):
            keep.append(node)
            needed.update(reads(node))
    keep.reverse()
    written = {o for n in keep for o in n.output}
    return keep, [t for t in fed if t in needed and t not in written]


def bytes_per_sample(names: list[str], types: dict) -> int | None:
    """Bytes of one sample of `names` from the inferred shapes, or None when a shape is not known."""
    total = 0
    for name in names:
        shape = tensor_shape(types.get(name))
        dims = [d for d in (shape or [None])[1:] if isinstance(d, int) and d > 0]
        if shape is None or len(dims) != len(shape) - 1:
            return None
        itemsize = helper.tensor_dtype_to_np_dtype(types[name].tensor_type.elem_type).itemsize
        total += int(np.prod(dims, dtype=np.int64)) * itemsize
    return total


def choose_cut(index, bns, k, levels, up, dyn, types, base, input_name, n_samples, budget) -> list[str]:
    """The tensors to keep after pass k: the cut when it fits in the budget (or its size is unknown: then
    it is kept while it fits), else the model input when the data is read from disk and that fits, else none."""
    if k == levels - 1 or budget <= 0:
        return []
    cut = cut_after(index, bns, k, up, dyn)
    per_sample = bytes_per_sample(cut, types)
    if per_sample is None or n_samples is None or per_sample * n_samples <= budget:
        return cut
    if base is None:
        per_input = bytes_per_sample([input_name], types)
        if per_input is not None and per_input * n_samples <= budget:
            return [input_name]
    return []
