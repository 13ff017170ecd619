"""Reading model files: the structure without its large weights, every tensor checked before any read.

Models are read with their external data (locations must stay inside the model's folder: `../`, absolute
paths and symlinks that leave it are refused before any read). `load_structure` scans the file at the
protocol-buffer level (`io.wire`) and leaves large weights in the file; `load_model` reads them in.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from onnxbn.errors import UserError
from onnxbn.io import wire
from onnxbn.io.tensors import (
    GRAPH_FIELD,
    INITIALIZER_FIELD,
    PACKED_BITS,
    RAW_DATA_FIELD,
    FileRange,
    all_tensors,
    data_source,
    element_count,
    external_entries,
    file_chunks,
    materialize,
    nested_graphs,
    nested_tensors,
    tensor_nbytes,
)


def _check_external(tensor: onnx.TensorProto, root: Path) -> None:
    """Refuse, before any read, external data of `tensor` that is not a file inside `root` or that
    the file cannot hold. A tensor with any `external_data` entry is checked, whatever its
    data_location; entries on a tensor not marked EXTERNAL (which onnx.load ignores) are dropped."""
    if not len(tensor.external_data):
        return
    entries = external_entries(tensor)
    location = entries.get("location", "")
    if not location or "\0" in location or os.path.isabs(location) or Path(location).drive:
        raise UserError(f"tensor {tensor.name!r}: external data location {location!r} is not a relative path; "
                        "refusing to read it")
    target = (root / location).resolve()
    if root != target and root not in target.parents:
        raise UserError(f"tensor {tensor.name!r}: external data {location!r} lies outside the model's folder "
                        f"({root}); refusing to read it")
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        tensor.ClearField("external_data")
        return
    if not target.is_file():
        raise UserError(f"tensor {tensor.name!r}: external data file {location!r} is missing next to the model "
                        f"(in {root})")
    _check_external_extent(tensor, entries, location, target.stat().st_size)


def _check_external_extent(tensor: onnx.TensorProto, entries: dict[str, str], location: str, file_size: int) -> None:
    """Refuse declared offsets, lengths and shapes that the data file cannot hold (before any read)."""
    try:
        offset, length = int(entries.get("offset", 0)), entries.get("length")
        length = int(length) if length is not None else None
    except ValueError:
        raise UserError(f"tensor {tensor.name!r}: malformed external data entry for {location!r}") from None
    needed = tensor_nbytes(tensor)
    length = needed if length is None else length
    if offset < 0 or offset + length > file_size or needed != length:
        raise UserError(f"tensor {tensor.name!r}: declares {needed} bytes at offset {offset} (length {length}) "
                        f"but {location!r} holds {file_size}; the model or its data file is damaged")
    inline = (tensor.raw_data if tensor.HasField("raw_data") else b"") or _typed_values(tensor)
    if len(inline):
        raise UserError(f"tensor {tensor.name!r}: holds data both inline and in {location!r}; the model file is damaged")


def _typed_values(tensor: onnx.TensorProto):
    """The repeated field that holds `tensor`'s values when they are not in raw_data."""
    return getattr(tensor, onnx.helper.tensor_dtype_to_field(tensor.data_type))


def _check_tensor(tensor: onnx.TensorProto) -> None:
    """Refuse a tensor whose type is unknown or whose inline data does not fit its dims."""
    name = tensor.name
    known = tensor.data_type in onnx.helper.get_all_tensor_dtypes() and tensor.data_type != onnx.TensorProto.UNDEFINED
    if not known:
        raise UserError(f"tensor {name!r}: unknown data type {tensor.data_type}; the model file is damaged "
                        "(or needs a newer onnx)")
    if any(d < 0 for d in tensor.dims):
        raise UserError(f"tensor {name!r}: negative dimension in {list(tensor.dims)}; the model file is damaged")
    if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.data_type == onnx.TensorProto.STRING:
        return
    count, bits = element_count(tensor), PACKED_BITS.get(tensor.data_type)
    if tensor.HasField("raw_data"):
        held, needed, unit = len(tensor.raw_data), tensor_nbytes(tensor), "bytes"
    else:
        held, unit = len(_typed_values(tensor)), "values"
        complex_pair = tensor.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128)
        needed = count * 2 if complex_pair else count
        if bits and held in (-(-count * bits // 8), -(-count * bits // 32)):
            return  # sub-byte types may pack their values into int32_data
    if held != needed:
        raise UserError(f"tensor {name!r}: holds {held} {unit} where its dims {list(tensor.dims)} need {needed}; "
                        "the model file is damaged")


def _check_strings(message) -> None:
    """Refuse a string field that is not valid UTF-8 (protobuf hands it over as bytes) anywhere in `message`."""
    for field, value in message.ListFields():
        values = value if field.is_repeated else [value]
        if field.type == field.TYPE_STRING and not all(isinstance(v, str) for v in values):
            raise UserError(f"a {type(message).__name__}'s {field.name} is not valid UTF-8; the model file is damaged")
        if field.type == field.TYPE_MESSAGE:
            for item in values:
                _check_strings(item)


def _check_value_types(model: onnx.ModelProto) -> None:
    """Refuse graph inputs, outputs and value_info of an unknown element type."""
    for g in (model.graph, *nested_graphs(model.graph)):
        for info in (*g.input, *g.output, *g.value_info):
            if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type not in \
                    onnx.helper.get_all_tensor_dtypes():
                raise UserError(f"{info.name!r}: unknown element type {info.type.tensor_type.elem_type}; "
                                "the model file is damaged (or needs a newer onnx)")


def _check_model(model: onnx.ModelProto, folder: Path) -> None:
    """Everything `load_structure` refuses in a parsed model (see there)."""
    if not model.graph.node and not model.graph.output:
        raise UserError("not an ONNX model (no graph found); is the file complete?")
    _check_strings(model)
    _check_value_types(model)
    for tensor in all_tensors(model):
        _check_tensor(tensor)
    seen: set[str] = set()
    for name in (t.name for t in model.graph.initializer):
        if name and name in seen:
            raise UserError(f"initializer {name!r} is given twice; ONNX names are unique (onnx.checker refuses this "
                            "model): remove the duplicate")
        seen.add(name)
    root = folder.resolve()
    for tensor in all_tensors(model):
        _check_external(tensor, root)


def load_model(model: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """The ModelProto for a path, every tensor's data inside it, or the proto itself.

    A path is read as `load_structure` reads it (same checks), then the data of its
    large and external weights is read into the proto."""
    if isinstance(model, onnx.ModelProto):
        return model
    proto, folder = load_structure(model)
    return materialize(proto, folder=folder)


def _light_tensor(src: wire.Source, start: int, end: int, keep_bytes: int) -> tuple[bytes, tuple[int, int] | None]:
    """A TensorProto's bytes without its raw_data when that is over `keep_bytes`, and where that raw_data
    lies ((offset, length), else None). Of repeated raw_data fields the last one counts, as in protobuf."""
    if end - start <= keep_bytes:
        return src.read(start, end - start), None
    kept, raws = [], []
    for field in wire.fields(src, start, end):
        if field.number == RAW_DATA_FIELD and field.wire == 2:
            raws.append(field)
        else:
            kept.append(src.read(field.tag_at, field.end - field.tag_at))
    if not raws:
        return b"".join(kept), None
    last = raws[-1]
    if last.end - last.pos <= keep_bytes:
        return b"".join(kept) + src.read(last.tag_at, last.end - last.tag_at), None
    return b"".join(kept), (last.pos, last.end - last.pos)


def _scan(src: wire.Source, keep_bytes: int) -> tuple[bytes, dict[int, tuple[int, int]]]:
    """The model's bytes without the raw_data of large top-level initializers, and where each of
    those lies: {index among the initializers: (offset, length)}."""
    model, offsets, index = [], {}, 0
    for field in wire.fields(src, 0, src.size):
        if field.number != GRAPH_FIELD or field.wire != 2:
            model.append(src.read(field.tag_at, field.end - field.tag_at))
            continue
        graph = []
        for g in wire.fields(src, field.pos, field.end):
            if g.number == INITIALIZER_FIELD and g.wire == 2:
                tensor, raw = _light_tensor(src, g.pos, g.end, keep_bytes)
                if raw is not None:
                    offsets[index] = raw
                index += 1
                graph.append(wire.submessage(INITIALIZER_FIELD, tensor))
            else:
                graph.append(src.read(g.tag_at, g.end - g.tag_at))
        model.append(wire.submessage(GRAPH_FIELD, b"".join(graph)))
    return b"".join(model), offsets


def load_structure(path: str | os.PathLike, keep_bytes: int = 4096) -> tuple[onnx.ModelProto, Path]:
    """(the model at `path` without the bytes of its large weights, which stay in the file; its folder).

    The file is scanned at the protocol-buffer level (`wire`: protobuf's framing rules, read
    in windows, no memory map): every top-level initializer's raw_data over `keep_bytes` is left
    out, and the tensor instead points into the model file itself as external data (location =
    the file's name, offset, length), so onnxruntime reads the weights straight from the file
    (`runtimes.ort_backend.make_session(..., folder=folder)`) and Python never holds them. A symlinked model
    file is resolved first: `folder` is the folder of the file the link points to, where its
    external data must lie. External data of any tensor (whatever its data_location) must be a
    file inside that folder, and hold what the tensor declares; the data of tensors other than
    top-level initializers (Constant nodes, subgraphs, sparse initializers) is read into the proto,
    so a model written elsewhere never points back into this folder. Refused, with one line:
    a file protobuf would not parse, unknown data types, names that are not UTF-8, inline data
    that does not fit its dims, duplicate initializer names. Metadata of a large model costs
    milliseconds, not a parse of its weights.
    """
    given = Path(path)
    try:
        real = given.resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, an embedded NUL
        raise UserError(f"{given}: cannot resolve the model path ({exc})") from None
    if real.is_dir():
        raise UserError(f"{given}: is a folder; give the path of the .onnx file")
    if not real.is_file():
        raise UserError(f"{given}: no such model file")
    try:
        fd = os.open(real, os.O_RDONLY)
        try:
            light, offsets = _scan(wire.Source.of_file(fd), keep_bytes)
        finally:
            os.close(fd)
        proto = onnx.load_from_string(light)
    except (wire.WireError, OSError, DecodeError, RuntimeError) as exc:
        raise UserError(f"{given}: not a readable ONNX model ({type(exc).__name__}); is the file complete?") from None
    try:
        for index, (offset, length) in offsets.items():
            tensor = proto.graph.initializer[index]
            _check_external(tensor, real.parent)  # the file's own entries, if any, before they are replaced
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                raise UserError(f"tensor {tensor.name!r}: holds data both inline and as external data; "
                                "the model file is damaged")
            tensor.ClearField("external_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", real.name), ("offset", str(offset)), ("length", str(length))):
                tensor.external_data.add(key=key, value=value)
        _check_model(proto, real.parent)
    except UserError as exc:
        raise UserError(f"{given}: {exc}") from None
    for tensor in nested_tensors(proto):
        _read_inline(tensor, real.parent)
    return proto, real.parent


def _read_inline(tensor: onnx.TensorProto, folder: Path) -> None:
    """Move the data of an external `tensor` in `folder` into its raw_data."""
    source = data_source(tensor, {}, folder)
    if isinstance(source, FileRange):
        raw = b"".join(file_chunks(source))
        for name in ("external_data", "data_location"):
            tensor.ClearField(name)
        tensor.raw_data = raw


def load_own(model: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """A ModelProto the caller may edit: the one loaded from a path, or a copy of the caller's proto."""
    proto = load_model(model)
    if isinstance(model, onnx.ModelProto):  # load_model handed the caller's proto back
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
    return proto
