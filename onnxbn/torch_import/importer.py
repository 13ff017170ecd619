"""The import plumbing: `to_torch` and `_Importer`, which walks the ONNX graph node by node.

`_Importer` holds the fx graph being built, the root module, the values of ONNX
tensors seen so far and the write-back maps; each node goes to its converter in
`registry.CONVERTERS`. `_attach` sets the onnx_* attributes on a GraphModule so they
survive copy.deepcopy; `_OnnxTracer` is the tracer torch.load rebuilds the graph with;
`_structure_key` fingerprints a model's nodes for write-back. Graph inputs of a type the
module does not run are refused here; uint16/32/64 inputs are widened to int64 and the
graph outputs of those types narrowed back (see `ops.DTYPES`).
"""

from __future__ import annotations

import hashlib
import inspect
import keyword
import os
import re
from typing import Any, Callable, cast

import onnx
import torch
import torch.fx as fx
from torch import nn
from torch.fx import graph_module
from torch.fx.node import map_aggregate

from onnxbn.errors import UserError
from onnxbn.graph import (
    FLOAT_TYPES,
    GraphIndex,
    opset_version,
    require_opset,
    tensor_shape,
    unique_name,
    value_types,
)
from onnxbn.io.model import Model
from onnxbn.torch_import import (  # noqa: F401 (each converter module registers its ops on import)
    converters,
    converters_elementwise,
    converters_nn,
    converters_shape,
    functional,
    narrow,
    ops,
    resize,
)
from onnxbn.torch_import.ops import DTYPES, UNSIGNED_WIDE, _cast, _to_tensor
from onnxbn.torch_import.registry import CONVERTERS

_RESERVED = set(dir(fx.GraphModule)) | {"onnx_names", "onnx_tensors", "onnx_inputs", "onnx_outputs",
                                          "onnx_opset", "onnx_structure", "self"}
_CONSTANTS = "_onnx_constants"


def _sanitize(name: str, fallback: str) -> str:
    s = re.sub(r"\W", "_", name or "", flags=re.ASCII).strip("_") or fallback
    if s[0].isdigit():
        s = "n" + s
    if keyword.iskeyword(s) or s in _RESERVED:
        s = s + "_"
    return s


def _structure_key(model: onnx.ModelProto) -> str:
    h = hashlib.sha256()
    for n in model.graph.node:
        h.update(f"{n.op_type}|{n.name}|{','.join(n.input)}|{','.join(n.output)}\n".encode())
    return h.hexdigest()[:16]


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out



def _invalid_attribute(node: onnx.NodeProto, opset: int) -> str | None:
    """Why an attribute of `node` breaks its operator's schema at `opset` (not defined there, or of
    another type), else None. onnxruntime refuses such a node; torch would read a default instead."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
    except onnx.defs.SchemaError:
        return None  # no schema: the converter lookup decides
    for attr in node.attribute:
        if attr.name not in schema.attributes:
            return f"{attr.name!r} is not an attribute of {node.op_type} at this opset"
        expected = cast(int, schema.attributes[attr.name].type)  # an int enum: onnx's stub leaves its value out
        if attr.type not in (expected, onnx.AttributeProto.UNDEFINED):
            return (f"attribute {attr.name!r} is of type {onnx.AttributeProto.AttributeType.Name(attr.type)}, "
                    f"{node.op_type} takes {onnx.AttributeProto.AttributeType.Name(expected)}")
    return None


class _Unsupported(Exception):
    pass


class _Importer:
    def __init__(self, source: Model):
        model = source.proto
        self.model = model
        self.source = source  # where the weights' bytes live
        self.opset = opset_version(model)
        self.graph = fx.Graph()
        self.root = nn.Module()
        self.consts = nn.Module()
        self.root.add_module(_CONSTANTS, self.consts)
        self.taken: set[str] = {_CONSTANTS}
        self.const_names: set[str] = set()
        self.const_nodes: dict[int, fx.Node] = {}
        self.env: dict[str, Any] = {}
        self.inits = {t.name: t for t in model.graph.initializer}
        self.init_values: dict[str, torch.Tensor] = {}
        self.params: dict[str, nn.Parameter] = {}        # initializer -> Parameter
        self.param_keys: dict[str, str] = {}             # initializer -> state_dict key of its Parameter
        self.onnx_names: dict[str, str] = {}
        self.onnx_tensors: dict[str, str] = {}
        self.recorded: set[str] = set()
        self.aliases: dict[str, str] = {}  # Identity output -> the initializer it passes on
        self.types = value_types(model)
        self.producers = GraphIndex(model).producers  # tensor name -> the node that produces it
        self.node = onnx.NodeProto()  # the node being converted (none yet)

    # ------------------------------------------------------------------ values
    def fail(self, why: str):
        raise _Unsupported(why)

    def value(self, name: str):
        if not name:
            return None
        name = self.aliases.get(name, name)
        if name in self.env:
            return self.env[name]
        if name in self.param_keys:  # a weight also used as a plain value elsewhere
            return self.graph.get_attr(self.param_keys[name])
        if name in self.inits:
            if name not in self.init_values:
                try:
                    self.init_values[name] = self.init_tensor(name)
                except TypeError as exc:  # an element type the module does not run
                    self.fail(f"initializer {name!r}: {exc}s are not supported")
            return self.init_values[name]
        self.fail(f"input {name!r} is not produced by any earlier node")

    def init_tensor(self, name: str) -> torch.Tensor:
        """The initializer `name` as a torch tensor of its own."""
        return _to_tensor(self.inits[name], self.source)

    def inp(self, i: int):
        return self.value(self.node.input[i]) if i < len(self.node.input) else None

    def shape(self, name: str) -> list | None:
        return tensor_shape(self.types.get(name))

    def rank(self, name: str) -> int | None:
        s = self.shape(name)
        return None if s is None else len(s)

    def elem_type(self, name: str) -> int | None:
        t = self.types.get(name)
        return t.tensor_type.elem_type if t is not None and t.HasField("tensor_type") else None

    def tensor_node(self, t: torch.Tensor, hint: str = "c") -> fx.Node:
        key = id(t)
        if key not in self.const_nodes:
            name = unique_name(_sanitize(hint, "c"), self.const_names)
            self.consts.register_buffer(name, t)
            self.const_nodes[key] = self.graph.get_attr(f"{_CONSTANTS}.{name}")
        return self.const_nodes[key]

    def _lift(self, a: Any) -> Any:
        if isinstance(a, torch.Tensor):
            hint = next((n for n, v in self.init_values.items() if v is a), "c")
            return self.tensor_node(a, hint)
        if isinstance(a, (list, tuple)):
            return type(a)(self._lift(x) for x in a)
        return a

    @staticmethod
    def _dynamic(args) -> bool:
        found = False

        def visit(a):
            nonlocal found
            if isinstance(a, fx.Node):
                found = True
            return a
        map_aggregate(args, visit)
        return found

    def call(self, fn: Callable, *args, **kwargs):
        """fn(*args): evaluated now when every input is constant, else a graph node."""
        if not self._dynamic((args, kwargs)):
            with torch.no_grad():
                return fn(*args, **kwargs)
        hint = _sanitize(self.node.name, self.node.op_type.lower())
        n = self.graph.create_node("call_function", fn, self._lift(args), self._lift(kwargs), name=hint)
        n.meta["onnx_node"] = self.node.name
        return n

    def module(self, mod: nn.Module, *args, params: dict[str, str] | None = None,
               buffers: dict[str, str] | None = None) -> fx.Node:
        path = unique_name(_sanitize(self.node.name, f"{self.node.op_type.lower()}_{self.index}"), self.taken)
        self.root.add_module(path, mod)
        self.onnx_names[path] = self.node.name
        for attr, init in (params or {}).items():
            self.param_keys.setdefault(init, f"{path}.{attr}")
            if init not in self.recorded:
                self.onnx_tensors[f"{path}.{attr}"] = init
                self.recorded.add(init)
        for attr, init in (buffers or {}).items():
            if init not in self.recorded:  # else: a private copy, not written back
                self.onnx_tensors[f"{path}.{attr}"] = init
                self.recorded.add(init)
        n = self.graph.call_module(path, self._lift(args))
        n.meta["onnx_node"] = self.node.name
        return n

    def param(self, init: str) -> nn.Parameter:
        if init not in self.params:
            self.params[init] = nn.Parameter(self.init_tensor(init))
        return self.params[init]

    def is_weight(self, name: str) -> bool:
        return bool(name) and name in self.inits and name not in self.env and \
            self.inits[name].data_type in FLOAT_TYPES

    # ------------------------------------------------------------------ driver
    def run(self) -> fx.GraphModule:
        g = self.model.graph
        require_opset(self.model)
        arg_names: set[str] = set()
        inputs = []
        for vi in g.input:
            if vi.name in self.inits:
                continue
            elem = vi.type.tensor_type.elem_type if vi.type.HasField("tensor_type") else None
            if elem not in DTYPES:
                kind = "not a tensor" if elem is None else f"element type {onnx.TensorProto.DataType.Name(elem)}"
                raise UserError(f"cannot import graph input {vi.name!r} (opset {self.opset}): {kind} is not "
                                "supported by onnxbn's torch importer")
            arg = unique_name(_sanitize(vi.name, "input"), arg_names | self.taken)
            ph = self.graph.placeholder(arg)
            arg_names.add(arg)
            self.env[vi.name] = ph if elem not in UNSIGNED_WIDE else \
                self.graph.call_function(_cast, (ph, torch.int64))
            inputs.append(vi.name)
        for self.index, node in enumerate(g.node):
            if any(i in self.aliases for i in node.input):
                node = _reading_through(node, self.aliases)
            if node.op_type == "Identity" and node.input[0] in self.inits:
                self.aliases[node.output[0]] = node.input[0]
                continue
            self.node = node
            label = f"cannot import node {node.name!r} ({node.op_type}, opset {self.opset})"
            if node.domain not in ("", "ai.onnx"):
                raise UserError(f"{label}: domain {node.domain!r} not supported by onnxbn's torch importer")
            conv = CONVERTERS.get(node.op_type)
            if conv is None:
                raise UserError(f"{label}: op not supported by onnxbn's torch importer")
            invalid = _invalid_attribute(node, self.opset)
            if invalid:
                raise UserError(f"{label}: {invalid}; the model is not valid ONNX")
            try:
                outs = conv(self, _attrs(node))
            except _Unsupported as exc:
                raise UserError(f"{label}: {exc}") from None
            if not isinstance(outs, (list, tuple)):
                outs = [outs]
            for i, name in enumerate(node.output):
                if not name:
                    continue
                if i >= len(outs) or outs[i] is None:
                    raise UserError(f"{label}: output {i} ({name!r}) not supported by onnxbn's torch importer")
                self.env[name] = outs[i]
        results = []
        for vi in g.output:
            if vi.name not in self.env and vi.name not in self.inits:
                raise UserError(f"graph output {vi.name!r} is not produced by any node")
            self.node = onnx.helper.make_node("Identity", [], [], name="")
            v = self.value(vi.name)
            v = self._lift(v) if isinstance(v, torch.Tensor) else v
            elem = vi.type.tensor_type.elem_type
            results.append(self.graph.call_function(_cast, (v, UNSIGNED_WIDE[elem])) if elem in UNSIGNED_WIDE else v)
        self.graph.output(results[0] if len(results) == 1 else tuple(results))
        gm = fx.GraphModule(self.root, self.graph, class_name="OnnxGraphModule")
        gm._tracer_cls = _OnnxTracer  # torch.load re-traces the code with it
        _attach(gm, {"onnx_names": dict(self.onnx_names), "onnx_tensors": dict(self.onnx_tensors),
                     "onnx_inputs": inputs, "onnx_outputs": [vi.name for vi in g.output],
                     "onnx_opset": self.opset, "onnx_structure": _structure_key(self.model)})
        return gm


def _reading_through(node: onnx.NodeProto, aliases: dict[str, str]) -> onnx.NodeProto:
    """A copy of `node` that reads each initializer passed on by an Identity (torch's exporter writes one
    for a parameter equal to another) from the initializer itself: both layers then hold the one
    Parameter, trained once and written back once, as the ONNX graph shares it."""
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.input[:] = [aliases.get(i, i) for i in node.input]
    return copy


def _run_time_helpers() -> tuple[Callable, ...]:
    """The module-level functions of ops, functional, resize and narrow that generated code calls."""
    found = []
    for mod in (ops, functional, resize, narrow):
        found += [f for name, f in vars(mod).items()
                  if name.startswith("_") and inspect.isfunction(f) and f.__module__ == mod.__name__]
    return tuple(found)


class _OnnxTracer(fx.Tracer):
    """The tracer torch.load uses to rebuild an imported module's graph from its code: onnxbn's
    run-time helpers (which branch on shapes and values) stay single calls, as import made them."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("autowrap_functions", _run_time_helpers())
        super().__init__(*args, **kwargs)


_PRESERVED = getattr(graph_module, "_USER_PRESERVED_ATTRIBUTES_KEY", "_user_preserved_attributes")


SUPPORTED_OPS = frozenset(CONVERTERS)  # every converter module is imported above


def _attach(gm: fx.GraphModule, info: dict[str, Any]) -> None:
    """Set the onnx_* attributes so that they survive copy.deepcopy (and torch.save)."""
    for k, v in info.items():
        setattr(gm, k, v)
    gm.meta.setdefault(_PRESERVED, {}).update(info)



def to_torch(model: Model | onnx.ModelProto | str | os.PathLike) -> fx.GraphModule:
    """Import an ONNX model (Model, proto or path) as a torch.fx GraphModule; see the module docstring.

    A path is read as its structure (`Model.open`) and each weight goes from the file straight
    into its torch tensor."""
    return _Importer(Model.open(model)).run()
