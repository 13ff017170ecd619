"""Loading and saving models safely, graph helpers, and the choice of BN points.

Models are read with their external data (locations must stay inside the model's
folder: `../`, absolute paths and symlinks that leave it are refused before any
read) and written atomically: to a temporary file in the target folder, then
renamed, so an interrupted run leaves either the old file or the new one, never
half of one. Models whose tensors exceed protobuf's 2 GB limit are written with
external data next to the model file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from onnxbn.errors import UserError

PROTOBUF_LIMIT = 2**31 - 1
SELECTORS = ("dense", "conv", "relu", "linear")
ACTIVATIONS = {"Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Sigmoid", "Tanh", "Clip", "HardSigmoid",
               "HardSwish", "Gelu", "Softplus", "Mish", "Celu", "ThresholdedRelu"}
LINEAR_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
# Ops a tensor passes through between a linear layer and the next one without
# mixing channels (used to decide whether a Gemm/MatMul is "hidden").
_PASSTHROUGH = {"Dropout", "Flatten", "Reshape", "Identity"} | ACTIVATIONS | {"Add", "MaxPool", "AveragePool"}


# ----------------------------------------------------------------------------- files

def _check_external_locations(model: onnx.ModelProto, folder: Path) -> None:
    root = folder.resolve()
    for tensor in _all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if not location or os.path.isabs(location) or Path(location).drive:
            raise UserError(f"tensor {tensor.name!r}: external data location {location!r} is not a relative path; refusing to read it")
        target = (root / location).resolve()
        if root != target and root not in target.parents:
            raise UserError(f"tensor {tensor.name!r}: external data {location!r} lies outside the model's folder; refusing to read it")
        if not target.is_file():
            raise UserError(f"tensor {tensor.name!r}: external data file {location!r} is missing next to the model")
        _check_external_extent(tensor, location, target.stat().st_size)


def _check_external_extent(tensor: onnx.TensorProto, location: str, file_size: int) -> None:
    """Refuse declared offsets, lengths and shapes that the data file cannot hold (before any read)."""
    entries = {e.key: e.value for e in tensor.external_data}
    try:
        offset, length = int(entries.get("offset", 0)), entries.get("length")
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (ValueError, TypeError, KeyError):
        raise UserError(f"tensor {tensor.name!r}: malformed external data entry for {location!r}") from None
    needed = int(np.prod([max(int(d), 0) for d in tensor.dims], dtype=object)) * itemsize
    length = int(length) if length is not None else needed
    if offset < 0 or offset + length > file_size or needed != length:
        raise UserError(f"tensor {tensor.name!r}: declares {needed} bytes at offset {offset} (length {length}) "
                        f"but {location!r} holds {file_size}; the model or its data file is damaged")


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    def walk(graph: onnx.GraphProto):
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        yield from walk(g)
    yield from walk(model.graph)


def load_model(model: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """The ModelProto for a path (with its external data) or the proto itself."""
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise UserError(f"{path}: no such model file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise UserError(f"{path}: not a readable ONNX model ({type(exc).__name__}); is the file complete?") from exc
    if not proto.graph.node and not proto.graph.output:
        raise UserError(f"{path}: not an ONNX model (no graph found); is the file complete?")
    _check_external_locations(proto, path.parent)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in _all_tensors(proto)):
        try:
            onnx.load_external_data_for_model(proto, str(path.parent))
        except Exception as exc:
            raise UserError(f"{path}: cannot read its external data ({exc})") from exc
    return proto


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return os.path.samefile(pa, pb)
    return pa.resolve() == pb.resolve()


def refuse_overwrite(output: str | os.PathLike, inputs: Iterable[str | os.PathLike], force: bool = False) -> None:
    """UserError when `output` is one of `inputs` (an input file is never overwritten)."""
    for inp in inputs:
        if inp is not None and not isinstance(inp, onnx.ModelProto) and isinstance(inp, (str, os.PathLike)) \
                and same_file(output, inp) and not force:
            raise UserError(f"output {output} is also an input; choose another -o path (or --force)")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only on success."""
    path = Path(path)
    if path.parent and not path.parent.exists():
        raise UserError(f"{path.parent}: output folder does not exist; create it first")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def save_model(model: onnx.ModelProto, path: str | os.PathLike, inputs: Iterable = (), force: bool = False) -> Path:
    """Write `model` to `path` atomically; external data (`<name>.data`) past 2 GB.

    Refuses to overwrite any of `inputs` unless `force`.
    """
    path = Path(path)
    refuse_overwrite(path, inputs, force)
    if weight_bytes(model) < PROTOBUF_LIMIT - (1 << 26):  # 64 MB for everything but the weights
        with atomic_path(path) as tmp:
            tmp.write_bytes(model.SerializeToString())
        return path
    data_name = path.name + ".data"
    staged_model = onnx.ModelProto()  # onnx.save_model moves the weights out of the proto it is given
    staged_model.CopyFrom(model)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmpdir:
        staged = Path(tmpdir) / path.name
        onnx.save_model(staged_model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        os.replace(Path(tmpdir) / data_name, path.parent / data_name)
        os.replace(staged, path)
    return path


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor data in the model, from shapes and types (ByteSize() takes seconds on VGG16)."""
    total = 0
    for t in _all_tensors(model):
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize if t.data_type else 0
        total += int(np.prod(t.dims, dtype=np.int64)) * itemsize
    return total


def model_sha256(model: onnx.ModelProto, weights: dict[str, np.ndarray] | None = None) -> str:
    """Hash of the model's graph and weights (metadata excluded), for provenance checks.

    The graph without weight data is serialised, then every initializer's values
    (taken from `weights`, the arrays of `detach_weights`, where given) are hashed.
    """
    h = hashlib.sha256()
    h.update(skeleton(model, keep_elements=0).graph.SerializeToString(deterministic=True))
    for t in model.graph.initializer:
        array = weights[t.name] if weights is not None and t.name in weights else numpy_helper.to_array(t)
        h.update(t.name.encode() + b"\0")
        h.update(np.ascontiguousarray(array).view(np.uint8) if array.dtype != object else str(array.tolist()).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- proto helpers

def opset_version(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 1


MIN_OPSET = 9


def require_opset(model: onnx.ModelProto) -> int:
    """The model's opset, or a UserError when it is older than onnxbn supports."""
    opset = opset_version(model)
    if opset < MIN_OPSET:
        raise UserError(f"the model uses opset {opset}; onnxbn needs {MIN_OPSET} or later: convert it with "
                        f"onnx.version_converter.convert_version(model, 13)")
    return opset


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def set_metadata(model: onnx.ModelProto, entries: dict[str, str]) -> None:
    """Set `entries` in metadata_props in place (existing keys replaced); for fresh copies."""
    merged = metadata(model) | {k: str(v) for k, v in entries.items()}
    del model.metadata_props[:]
    for key, value in merged.items():
        model.metadata_props.add(key=key, value=value)


def with_metadata(model: onnx.ModelProto, entries: dict[str, str]) -> onnx.ModelProto:
    """A copy of `model` with `entries` set in metadata_props (existing keys replaced)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    set_metadata(out, entries)
    return out


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Inputs that are fed at run time (initializers listed as inputs, IR < 4, excluded)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output if out}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    table: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                table.setdefault(name, []).append(node)
    return table


IN_MEMORY = "onnxbn:in-memory"  # external-data location of weights handed to onnxruntime as arrays
_DETACHABLE = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.INT64,
               onnx.TensorProto.INT32, onnx.TensorProto.INT8, onnx.TensorProto.UINT8}


def empty_like(model: onnx.ModelProto) -> onnx.ModelProto:
    """A model with `model`'s header (IR, opsets, producer, functions, graph name) and an empty graph."""
    out = onnx.ModelProto()
    for field_name in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(out, field_name, getattr(model, field_name))
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    out.graph.name = model.graph.name
    return out


def _light_copy(model: onnx.ModelProto, stubbed) -> onnx.ModelProto:
    """`model` with the initializers `stubbed(t)` picks reduced to name, type and dims."""
    graph, light = model.graph, empty_like(model)
    g = light.graph
    g.node.extend(graph.node)
    g.input.extend(graph.input)
    g.output.extend(graph.output)
    g.value_info.extend(graph.value_info)
    for t in graph.initializer:
        if stubbed(t):
            stub = g.initializer.add(name=t.name, data_type=t.data_type)
            stub.dims.extend(t.dims)
        else:
            g.initializer.append(t)
    return light


def skeleton(model: onnx.ModelProto, keep_elements: int = 64) -> onnx.ModelProto:
    """A copy of `model` without the data of large initializers (dims and types kept).

    Shape inference only needs the shapes of weights, plus the values of small
    tensors such as Reshape targets; skipping the data makes it fast on VGG-size models.
    """
    return _light_copy(model, lambda t: int(np.prod(t.dims)) > keep_elements)


def detach_weights(model: onnx.ModelProto, keep_elements: int = 1024) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """(light model, arrays): the large initializers become in-memory external data.

    onnxruntime takes the arrays as they are (`add_external_initializers`), so a
    VGG16 is neither serialised nor parsed again to build a session.
    """
    picked = {t.name for t in model.graph.initializer
              if int(np.prod(t.dims)) > keep_elements and t.data_type in _DETACHABLE
              and t.data_location != onnx.TensorProto.EXTERNAL}
    light = _light_copy(model, lambda t: t.name in picked)
    for t in light.graph.initializer:
        if t.name in picked:
            t.data_location = onnx.TensorProto.EXTERNAL
            t.external_data.add(key="location", value=IN_MEMORY)
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in picked}
    return light, weights


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
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


# ----------------------------------------------------------------------------- points

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


def select_points(model: onnx.ModelProto, after: str | Iterable[str] = "dense") -> list[Point]:
    """The tensors a selector picks, in graph order.

    dense:  the activation output after each hidden Gemm/MatMul (the notebook's choice;
            the classifier, with no dense layer after it, is not hidden);
    conv:   the activation output after each Conv;
    relu:   every Relu output;
    linear: every Conv/ConvTranspose/Gemm/MatMul output (with its bias Add), pre-activation,
            except the last layer's (with no linear layer after it: the classifier, also
            when a Softmax follows it) and the model's final outputs;
    or explicit tensor names (a list, or a comma separated string).
    """
    graph = model.graph
    cons = consumers(graph)
    prods = producers(graph)
    inits = {t.name for t in graph.initializer}
    outputs = {o.name for o in graph.output}
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
        if not names:
            raise UserError(f"selector {after!r} matches no tensor in this model; "
                            f"try another selector ({', '.join(SELECTORS)}) or name tensors (see `onnxbn points`)")
    else:
        names = [n.strip() for n in (after.split(",") if isinstance(after, str) else after) if n.strip()]
        if not names:
            raise UserError("no tensor names given; pass a selector (dense, conv, relu, linear) or tensor names")
        known = set(prods) | {i.name for i in graph_inputs(model)}
        missing = [n for n in names if n not in known]
        if missing:
            raise UserError(f"tensor {missing[0]!r} is not in the model (see `onnxbn points MODEL --after linear` for names)")
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise UserError(f"tensor {sorted(dup)[0]!r} is named twice")
    types = value_types(model)
    points = []
    for name in names:
        prod = prods.get(name)
        shape = tensor_shape(types.get(name))
        elem = types[name].tensor_type.elem_type if name in types else onnx.TensorProto.FLOAT
        if shape is not None and len(shape) < 2:
            raise UserError(f"tensor {name!r} has rank {len(shape)}; BN needs (N, C, ...) with the channel axis 1")
        if elem not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16):
            raise UserError(f"tensor {name!r} is {onnx.TensorProto.DataType.Name(elem)}; BN needs a floating point tensor")
        channels = shape[1] if shape and isinstance(shape[1], int) and shape[1] > 0 else None
        points.append(Point(tensor=name, producer=prod.name if prod else "", producer_op=prod.op_type if prod else "input",
                            channels=channels, shape=shape, dtype=onnx.TensorProto.DataType.Name(elem).lower()))
    return points
