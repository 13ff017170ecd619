"""The one graph index every transform uses, and the facts about ONNX graphs they share.

`GraphIndex(model)` looks at a model's top-level graph and answers, for every tensor
name: who writes it (`producers`), which top-level nodes read it (`consumers`, a node
counted once even when the read happens inside one of its If/Loop/Scan subgraphs, at
any depth), how often it is read (`read_count`: every read, subgraph reads and graph
outputs included), and its value when it is fixed (`constant`: an initializer that a
caller cannot override, a Constant node, or a ConstantOfShape of a fixed shape). It
owns the one set of taken names (node names, tensor names, initializers, graph inputs,
outputs and value_info, subgraphs included), so `unique_name` never collides, and it
edits the graph the way ONNX requires: `add_initializer` lists a new initializer as a
graph input too when the model's IR version is below 4; `replace_uses` rewires reads
(subgraphs included, graph outputs never); `prune` drops initializers and Constant
nodes nobody reads; `ancestors` lists the nodes a set of tensors needs, in order;
`sort` puts the nodes in topological order. Every edit keeps the index exact (see `GraphIndex`),
so a transform never rebuilds it.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from onnxbn.errors import UserError
from onnxbn.io.copies import empty_like, skeleton
from onnxbn.io.model import Model

FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                         onnx.TensorProto.BFLOAT16})
# The oldest opset every onnxbn step reads (stats, insert, fold, to_torch). Older models:
# onnx.version_converter.convert_version(model, 13) first.
MIN_OPSET = 9


# ----------------------------------------------------------------------------- model facts

def opset_version(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 1


def require_opset(model: onnx.ModelProto) -> int:
    """The model's opset, or a UserError when it is older than onnxbn supports."""
    opset = opset_version(model)
    if opset < MIN_OPSET:
        raise UserError(f"the model uses opset {opset}; onnxbn needs {MIN_OPSET} or later: convert it with "
                        f"onnx.version_converter.convert_version(model, 13)")
    return opset


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Inputs that are fed at run time (initializers listed as inputs, IR < 4, excluded)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference on the model's skeleton, tolerant of models onnx cannot fully infer."""
    light = skeleton(model)
    try:
        return onnx.shape_inference.infer_shapes(light, data_prop=True)
    except Exception:
        return light


def value_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    inferred = infer_shapes(model)
    g = inferred.graph
    table = {vi.name: vi.type for vi in list(g.value_info) + list(g.input) + list(g.output)}
    for t in g.initializer:
        table[t.name] = onnx.helper.make_tensor_type_proto(t.data_type, list(t.dims))
    return table


def tensor_shape(type_proto: onnx.TypeProto | None) -> list[int | str | None] | None:
    if type_proto is None or not type_proto.tensor_type.HasField("shape"):
        return None
    dims = []
    for d in type_proto.tensor_type.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return dims


def unique_name(base: str, taken: set[str]) -> str:
    """`base`, or `base_1`, `base_2`, ... : the first name not in `taken` (which then holds it)."""
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


# ----------------------------------------------------------------------------- subgraphs

def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The graphs held in `node`'s attributes (If branches, Loop and Scan bodies)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def reads(node: onnx.NodeProto) -> list[str]:
    """Every tensor name `node` reads, its subgraphs' reads at any depth included (one entry per read).

    A subgraph also reads its own inner names; they never collide with outer ones in a
    valid model, so they count as reads of names the outer graph does not have.
    """
    names = list(node.input)
    for sub in subgraphs(node):
        for inner in sub.node:
            names.extend(reads(inner))
        names.extend(o.name for o in sub.output)
    return [n for n in names if n]


def _names_in(graph: onnx.GraphProto) -> Iterator[str]:
    yield graph.name
    for field in (graph.input, graph.output, graph.value_info):
        yield from (v.name for v in field)
    yield from (t.name for t in graph.initializer)
    for node in graph.node:
        yield from _node_names(node)


def _node_names(node: onnx.NodeProto) -> Iterator[str]:
    yield node.name
    yield from node.input
    yield from node.output
    for sub in subgraphs(node):
        yield from _names_in(sub)


def _replace_reads(node: onnx.NodeProto, old: str, new: str) -> None:
    """`node` reads `new` wherever it read `old`, in its subgraphs too."""
    for i, name in enumerate(node.input):
        if name == old:
            node.input[i] = new
    for sub in subgraphs(node):
        for inner in sub.node:
            _replace_reads(inner, old, new)
        for out in sub.output:
            if out.name == old:  # a body that returns an outer value directly
                out.name = new


# ----------------------------------------------------------------------------- the index

class GraphIndex:
    """Producers, consumers, read counts, constants and taken names of `model`'s top-level graph.

    Edits go to `model` itself (the index never copies) through the editing methods below
    (`add_node`, `remove_node`, `set_input`, `set_output`, `replace_uses`, `add_initializer`,
    `set_initializer`, `remove_initializer`, `prune`, `reorder`, `sort`), and each one keeps every
    lookup exact, the way onnx-ir's `Value.uses()` stays exact: after any sequence of them, the
    lookups equal those of a fresh `GraphIndex` of the graph as it is then (`consumers[name]` as a
    set: an edited node moves to the end of its lists). `taken` only grows, so a name once used is
    never handed out again. A caller that edits the proto itself calls `refresh()` afterwards.

    `model` is a ModelProto or a `Model` (`onnxbn.io.model`), whose proto is indexed and whose weights held
    outside the proto (arrays, files) `tensor_array` reads; `self.model` is the proto, `self.store` the Model.
    """

    def __init__(self, model: onnx.ModelProto | Model):
        self.store = Model.open(model)
        self.model = self.store.proto
        self.graph = self.model.graph
        self.refresh()

    def refresh(self) -> None:
        """Rebuild every lookup from the graph as it is now (for callers that edit the proto directly)."""
        graph = self.graph
        self.producers: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        self.read_count: dict[str, int] = {}
        for node in graph.node:
            self._enter(node)
        self.outputs = {o.name for o in graph.output}
        for name in self.outputs:
            self.read_count[name] = self.read_count.get(name, 0) + 1
        self.initializers = {t.name: t for t in graph.initializer}
        self.inputs = {i.name for i in graph.input}
        # From IR 4 on, an initializer also listed as a graph input is a default the caller may override.
        self.overridable = self.inputs & set(self.initializers) if self.model.ir_version >= 4 else set()
        self.taken = {n for n in _names_in(graph) if n}

    def _enter(self, node: onnx.NodeProto) -> None:
        """Count `node` (an element of the graph) in producers, consumers and read_count."""
        for out in node.output:
            if out:
                self.producers[out] = node
        node_reads = reads(node)
        for name in dict.fromkeys(node_reads):
            self.consumers.setdefault(name, []).append(node)
        for name in node_reads:
            self.read_count[name] = self.read_count.get(name, 0) + 1

    def _leave(self, node: onnx.NodeProto) -> None:
        """Undo `_enter(node)`: the node is about to change or go."""
        for out in node.output:
            if out and self.producers.get(out) is node:
                del self.producers[out]
        node_reads = reads(node)
        for name in dict.fromkeys(node_reads):
            users = [n for n in self.consumers[name] if n is not node]
            if users:
                self.consumers[name] = users
            else:
                del self.consumers[name]
        for name in node_reads:
            self.read_count[name] -= 1
            if not self.read_count[name]:
                del self.read_count[name]

    # -- names

    def unique_name(self, base: str) -> str:
        """A name no node, tensor, initializer or value in the graph (or its subgraphs) has yet."""
        return unique_name(base, self.taken)

    def known_tensor(self, name: str) -> bool:
        """True when `name` is written by a node or fed as a run-time input."""
        return name in self.producers or (name in self.inputs and name not in self.initializers)

    # -- constants

    def constant(self, name: str) -> onnx.TensorProto | None:
        """The tensor behind `name` when it is fixed: an initializer that is not an overridable input,
        a Constant node's value (value, value_float(s), value_int(s)), or a ConstantOfShape of a fixed shape."""
        if name in self.initializers and name not in self.overridable:
            return self.initializers[name]
        node = self.producers.get(name)
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return a.t
                if a.name in ("value_float", "value_floats"):
                    return numpy_helper.from_array(np.array(onnx.helper.get_attribute_value(a), np.float32), name)
                if a.name in ("value_int", "value_ints"):
                    return numpy_helper.from_array(np.array(onnx.helper.get_attribute_value(a), np.int64), name)
        if node is not None and node.op_type == "ConstantOfShape" and node.input:
            shape = self.constant(node.input[0])
            if shape is None:
                return None
            fill = next((a.t for a in node.attribute if a.name == "value"), None)
            fill = numpy_helper.to_array(fill).reshape(-1) if fill is not None else np.zeros(1, np.float32)
            return numpy_helper.from_array(np.full(self.tensor_array(shape).astype(np.int64), fill[0]), name)
        return None

    def constant_array(self, name: str) -> np.ndarray | None:
        tensor = self.constant(name)
        return None if tensor is None else self.tensor_array(tensor)

    def tensor_array(self, tensor: onnx.TensorProto) -> np.ndarray:
        """The values of `tensor`, wherever they are held (see the class docstring)."""
        return self.store.tensor_array(tensor)

    # -- node edits

    def add_node(self, node: onnx.NodeProto) -> onnx.NodeProto:
        """Append a copy of `node` to the graph (`reorder` places it); return the copy, the graph's own."""
        self.graph.node.append(node)
        added = self.graph.node[-1]
        self._enter(added)
        self.taken.update(n for n in _node_names(added) if n)
        return added

    def remove_node(self, node: onnx.NodeProto) -> None:
        """Take `node` (the graph's own object) out of the graph."""
        position = next(i for i, n in enumerate(self.graph.node) if n is node)
        self._leave(node)
        del self.graph.node[position]

    def set_input(self, node: onnx.NodeProto, slot: int, name: str) -> None:
        """`node` reads `name` in input `slot` (missing optional inputs before it become "")."""
        self._leave(node)
        while len(node.input) <= slot:
            node.input.append("")
        node.input[slot] = name
        self._enter(node)
        self.taken.add(name)

    def keep_outputs(self, node: onnx.NodeProto, count: int) -> None:
        """`node` writes only its first `count` outputs (the others are no longer produced)."""
        self._leave(node)
        del node.output[count:]
        self._enter(node)

    def set_output(self, node: onnx.NodeProto, slot: int, name: str) -> None:
        """`node` writes `name` in output `slot`; its readers are not rewired (see `replace_uses`)."""
        self._leave(node)
        node.output[slot] = name
        self._enter(node)
        self.taken.add(name)

    def replace_uses(self, old: str, new: str) -> None:
        """Every node that reads `old` (subgraphs included) reads `new` instead; graph outputs keep their names."""
        for node in list(self.consumers.get(old, [])):
            self._leave(node)
            _replace_reads(node, old, new)
            self._enter(node)
        self.taken.add(new)

    def reorder(self, nodes: list[onnx.NodeProto]) -> None:
        """Put the graph's nodes (all of them, the graph's own objects) in the order of `nodes`."""
        if len(nodes) != len(self.graph.node):
            raise ValueError("reorder needs every node of the graph exactly once")
        del self.graph.node[:]
        self.graph.node.extend(nodes)  # copies: the index now points at the graph's new objects
        moved = {id(old): new for old, new in zip(nodes, self.graph.node, strict=True)}
        self.producers = {name: moved[id(node)] for name, node in self.producers.items()}
        self.consumers = {name: [moved[id(n)] for n in users] for name, users in self.consumers.items()}

    # -- initializer edits

    def add_initializer(self, value: np.ndarray | onnx.TensorProto, base: str) -> str:
        """Add `value` as an initializer under a fresh name made from `base`; return the name.

        IR < 4 requires every initializer to be a graph input as well: it is listed there too.
        """
        tensor = numpy_helper.from_array(value) if isinstance(value, np.ndarray) else value
        name = self.unique_name(base)
        self.set_initializer(name, tensor)
        return name

    def set_initializer(self, name: str, tensor: onnx.TensorProto) -> None:
        """Make initializer `name` hold `tensor` (a copy, renamed `name`): in place when it exists, else a
        new one (IR < 4: listed as a graph input too)."""
        current = self.initializers.get(name)
        if current is not None:
            current.CopyFrom(tensor)
            current.name = name
            return
        self.graph.initializer.append(tensor)
        added = self.graph.initializer[-1]
        added.name = name
        self.initializers[name] = added
        self.taken.add(name)
        if self.model.ir_version < 4:
            self.graph.input.append(onnx.helper.make_tensor_value_info(name, added.data_type, list(added.dims)))
            self.inputs.add(name)
        elif name in self.inputs:
            self.overridable.add(name)

    def remove_initializer(self, name: str) -> None:
        """Drop initializer `name`, and its graph input and value_info (unless it is a graph output)."""
        self._drop_entries(self.graph.initializer, {name})
        self.initializers.pop(name, None)
        if name not in self.outputs:
            self._drop_entries(self.graph.input, {name})
            self._drop_entries(self.graph.value_info, {name})
            self.inputs.discard(name)
        self.overridable.discard(name)

    @staticmethod
    def _drop_entries(field, names: set[str]) -> None:
        """Delete the entries of a repeated initializer/ValueInfo field named in `names` (others stay put)."""
        for i in reversed(range(len(field))):
            if field[i].name in names:
                del field[i]

    def prune(self, candidates: Iterable[str]) -> None:
        """Remove those of `candidates` that nothing reads any more: initializers (and their graph
        inputs and value_info), and the Constant/ConstantOfShape nodes that write them, transitively."""
        dead = {n for n in candidates if n and not self.read_count.get(n)}
        while dead:
            for name in sorted(dead):
                self.remove_initializer(name)
            gone = [n for n in self.graph.node if n.op_type in ("Constant", "ConstantOfShape") and n.output[0] in dead]
            for node in gone:
                self.remove_node(node)
            dead = {i for node in gone for i in node.input if i and not self.read_count.get(i)}

    def ancestors(self, wanted: Iterable[str], stop: Iterable[str] = ()) -> list[onnx.NodeProto]:
        """The nodes (in graph order) that `wanted` tensors depend on, subgraph reads followed; the
        producers of `stop` tensors (and what only they need) are left out."""
        needed, keep, stop = set(wanted), [], set(stop)
        for node in reversed(self.graph.node):
            if any(o in needed for o in node.output):
                keep.append(node)
                needed.update(n for n in reads(node) if n not in stop)
        return keep[::-1]

    def sort(self) -> None:
        """Put the nodes in topological order (stable: a valid order is kept as it is).

        Raises UserError on a cycle or a read of a name nothing provides."""
        graph = self.graph
        available = set(self.inputs) | set(self.initializers) | {""}
        pending = list(graph.node)
        written = {o for n in pending for o in n.output}
        ordered: list[onnx.NodeProto] = []
        while pending:
            rest = []
            for node in pending:
                # names a node reads that no node of this graph writes are outer-scope names
                if all(n in available or n not in written for n in reads(node)):
                    ordered.append(node)
                    available.update(node.output)
                else:
                    rest.append(node)
            if len(rest) == len(pending):
                raise UserError(f"the graph has a cycle through node {rest[0].name or rest[0].op_type!r}")
            pending = rest
        self.reorder(ordered)


def pruned_copy(model: onnx.ModelProto, wanted: set[str]) -> onnx.ModelProto:
    """A new model holding only the nodes and initializers that compute `wanted`, no outputs yet.

    Built up from an empty proto, so each kept weight is copied once and dropped ones
    (the classifier head) never are.
    """
    graph = model.graph
    keep = GraphIndex(model).ancestors(wanted)
    needed = set(wanted) | {n for node in keep for n in reads(node)}
    out = empty_like(model)
    out.graph.node.extend(keep)
    inits = {t.name for t in graph.initializer}
    out.graph.initializer.extend(t for t in graph.initializer if t.name in needed)
    # run-time inputs all stay (they are fed); IR < 4 also lists initializers as inputs
    out.graph.input.extend(i for i in graph.input if i.name not in inits or i.name in needed)
    return out
