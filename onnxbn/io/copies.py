"""Light copies of a model (structure without the data of large weights), its provenance hash, and its metadata.

`skeleton` keeps dims and types for shape inference; `detach_weights` turns large initializers into in-memory
arrays onnxruntime takes as they are; `model_sha256` hashes graph and weights wherever the bytes live.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import onnx
from onnx import numpy_helper

from onnxbn.io import wire
from onnxbn.io.tensors import IN_MEMORY, FileRange, data_source, file_chunks


def copy_fields(source, target, skip: str) -> None:
    """Copy every set field of the message `source` but `skip`, and its unknown fields, into `target`
    (same message type)."""
    target.MergeFromString(wire.unknown_fields(source))
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        if field.is_repeated:
            getattr(target, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def model_sha256(model: onnx.ModelProto, weights: dict[str, np.ndarray] | None = None,
                 folder: str | os.PathLike | None = None) -> str:
    """Hash of the model's graph and weights (metadata excluded), for provenance checks.

    The graph without weight data is serialised, then every initializer's values
    (taken from `weights`, the arrays of `detach_weights`, where given) are hashed. A tensor
    whose data lies in a file (a `load_structure` model; `folder` = the model's folder) is
    hashed from the file in 1 MiB reads, never held whole: the same digest as from memory.
    """
    h = hashlib.sha256()
    h.update(skeleton(model, keep_elements=0).graph.SerializeToString(deterministic=True))
    for t in model.graph.initializer:
        h.update(t.name.encode() + b"\0")
        source = data_source(t, weights or {}, folder)
        if isinstance(source, FileRange):
            for chunk in file_chunks(source):
                h.update(chunk)
            continue
        array = numpy_helper.to_array(t) if source is None else source
        h.update(np.ascontiguousarray(array).view(np.uint8).data if array.dtype != object else str(array.tolist()).encode())
    return h.hexdigest()


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
    """`model` with the initializers `stubbed(t)` picks reduced to name, type and dims (every other
    field, sparse initializers and functions included, as it is)."""
    light = onnx.ModelProto()
    copy_fields(model, light, skip="graph")
    copy_fields(model.graph, light.graph, skip="initializer")
    for t in model.graph.initializer:
        if stubbed(t):
            stub = light.graph.initializer.add(name=t.name, data_type=t.data_type)
            stub.dims.extend(t.dims)
        else:
            light.graph.initializer.append(t)
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
