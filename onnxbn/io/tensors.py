"""Where a tensor's bytes live, and reading them: inline, external data in a file range, or an array held in memory.

ONNX keeps a tensor's data in the proto (raw_data or typed fields) or, as external data, at `offset`/`length`
of a file named relative to the model's folder. onnxbn adds one more place, an in-memory array (location
IN_MEMORY, values in a weights dict), so a transform can hand new weights to onnxruntime or a writer without
serialising them. `data_source` says which, `tensor_array` reads the values, `materialize` puts them inside.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import onnx
from onnx import numpy_helper

from onnxbn.errors import UserError


def nested_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    for node in graph.node:
        for attr in node.attribute:
            for g in [attr.g] if attr.HasField("g") else []:
                yield g
                yield from nested_graphs(g)
            for g in attr.graphs:
                yield g
                yield from nested_graphs(g)


def _node_tensors(nodes) -> Iterator[onnx.TensorProto]:
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sparse in ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []) + list(attr.sparse_tensors):
                yield from (sparse.values, sparse.indices)


def nested_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of `model` but its top-level initializers: sparse initializers' values and
    indices, Constant-node and other attribute tensors, and all of these in subgraphs and functions."""
    for sparse in model.graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    yield from _node_tensors(model.graph.node)
    for g in nested_graphs(model.graph):
        yield from g.initializer
        for sparse in g.sparse_initializer:
            yield from (sparse.values, sparse.indices)
        yield from _node_tensors(g.node)
    for function in model.functions:
        yield from _node_tensors(function.node)


def all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of `model`: top-level initializers first, then `nested_tensors`."""
    yield from model.graph.initializer
    yield from nested_tensors(model)


def external_entries(tensor: onnx.TensorProto) -> dict[str, str]:
    entries: dict[str, str] = {}
    for entry in tensor.external_data:
        if entry.key in entries:
            raise UserError(f"tensor {tensor.name!r}: external data key {entry.key!r} is given twice; "
                            "the model file is damaged")
        entries[entry.key] = entry.value
    return entries


PACKED_BITS = {getattr(onnx.TensorProto, name): bits for name, bits in
                (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2))
                if hasattr(onnx.TensorProto, name)}


def element_count(tensor: onnx.TensorProto) -> int:
    return int(np.prod([int(d) for d in tensor.dims], dtype=object))


def tensor_nbytes(tensor: onnx.TensorProto) -> int:
    """Bytes of a tensor's data, from its type and dims (sub-byte types packed, as in raw_data)."""
    if not tensor.data_type:
        return 0
    count = element_count(tensor)
    if tensor.data_type in PACKED_BITS:
        return -(-count * PACKED_BITS[tensor.data_type] // 8)
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


# Protocol-buffer field numbers on the path to a weight's bytes: ModelProto.graph (7),
# GraphProto.initializer (5) and TensorProto.raw_data (9).
GRAPH_FIELD, INITIALIZER_FIELD, RAW_DATA_FIELD = 7, 5, 9


def _location(tensor: onnx.TensorProto) -> str | None:
    """The external-data location of `tensor`, or None when its data is inline."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return external_entries(tensor).get("location", "")


class FileRange(NamedTuple):
    """`length` bytes of the file `path` from `offset`: where a tensor's data lies."""

    path: Path
    offset: int
    length: int


def data_source(tensor: onnx.TensorProto, weights: dict, folder) -> np.ndarray | FileRange | None:
    """Where the data of a tensor not held in the proto lies: an array of `weights`, or a FileRange in `folder`."""
    location = _location(tensor)
    if location is None:
        return None
    if location == IN_MEMORY:
        if tensor.name not in weights:
            raise ValueError(f"tensor {tensor.name!r} is held in memory but no array was given for it")
        array = np.ascontiguousarray(weights[tensor.name])
        return array.astype(array.dtype.newbyteorder("<"), copy=False)  # ONNX data is little-endian
    if folder is None:
        return None  # external data of another model, left as it is
    entries = external_entries(tensor)
    length = int(entries["length"]) if "length" in entries else tensor_nbytes(tensor)
    return FileRange(Path(folder) / location, int(entries.get("offset", 0)), length)


def file_chunks(where: FileRange, size: int = 1 << 20) -> Iterator[bytes]:
    """The bytes of `where`, `size` at a time."""
    length = where.length
    with open(where.path, "rb") as fh:
        fh.seek(where.offset)
        while length:
            chunk = fh.read(min(length, size))
            if not chunk:
                raise UserError(f"{where.path}: ends before the tensor data it should hold; the model file is damaged")
            yield chunk
            length -= len(chunk)


def tensor_header(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """`tensor` without its data and its external-data fields (name, type, dims, doc kept)."""
    header = onnx.TensorProto()
    header.CopyFrom(tensor)
    for name in ("raw_data", "external_data", "data_location"):
        header.ClearField(name)
    return header


def materialize(model: onnx.ModelProto, weights: dict[str, np.ndarray] | None = None,
                folder: str | os.PathLike | None = None, largest: int | None = None) -> onnx.ModelProto:
    """`model` (edited in place) with the data of every top-level initializer inside the proto: IN_MEMORY
    stubs from `weights`, external data of `folder` read from its file (`save_model` streams instead).
    `largest`: only those of at most that many elements."""
    for t in model.graph.initializer:
        source = data_source(t, weights or {}, folder)
        if source is None or (largest is not None and element_count(t) > largest):
            continue
        raw = source.tobytes() if isinstance(source, np.ndarray) else b"".join(file_chunks(source, size=source.length))
        for name in ("external_data", "data_location"):
            t.ClearField(name)
        t.raw_data = raw
    return model


def tensor_array(tensor: onnx.TensorProto, weights: dict[str, np.ndarray] | None = None,
                 folder: str | os.PathLike | None = None) -> np.ndarray:
    """The values of `tensor`: from `weights` for an IN_MEMORY stub, read from `folder` for external
    data there (the proto is left as it is), else `numpy_helper.to_array`."""
    source = data_source(tensor, weights or {}, folder)
    if source is None:
        return numpy_helper.to_array(tensor)
    if isinstance(source, np.ndarray):
        assert weights is not None  # data_source took the array from `weights`
        return weights[tensor.name]
    path, offset, length = source
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
    count = int(np.prod(tensor.dims, dtype=np.int64))
    if count * dtype.itemsize == length:  # one element per item (not a packed 4-bit type): read as it is
        array = np.empty(tuple(tensor.dims), dtype)  # owns its memory: a caller may keep it without a copy
        with open(path, "rb") as fh:
            fh.seek(offset)
            if fh.readinto(array.reshape(-1).view(np.uint8).data) != length:
                raise UserError(f"{path}: ends before the data of tensor {tensor.name!r}; the model file is damaged")
        return array
    copy = tensor_header(tensor)
    copy.raw_data = b"".join(file_chunks(source, size=length))
    return numpy_helper.to_array(copy)


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor data in the model, from shapes and types (ByteSize() takes seconds on VGG16)."""
    return sum(tensor_nbytes(t) for t in all_tensors(model))


IN_MEMORY = "onnxbn:in-memory"  # external-data location of weights handed to onnxruntime as arrays


def memory_stub(name: str, data_type: int, dims) -> onnx.TensorProto:
    """A tensor whose values are held in a weights dict (location IN_MEMORY), as `detach_weights` makes."""
    stub = onnx.TensorProto(name=name, data_type=data_type, dims=list(dims), data_location=onnx.TensorProto.EXTERNAL)
    stub.external_data.add(key="location", value=IN_MEMORY)
    return stub
