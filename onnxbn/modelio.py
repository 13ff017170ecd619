"""Model files: load, save, atomic writes, external data, provenance hash, weights for onnxruntime.

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
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import numpy as np
import onnx
from onnx import numpy_helper

from onnxbn.errors import UserError

PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_THRESHOLD = 1024  # bytes: smaller tensors stay inside the .onnx file when weights go external


def _check_external_locations(model: onnx.ModelProto, folder: Path) -> None:
    root = folder.resolve()
    for tensor in all_tensors(model):
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


def all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
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
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in all_tensors(proto)):
        try:
            onnx.load_external_data_for_model(proto, str(path.parent))
        except Exception as exc:
            raise UserError(f"{path}: cannot read its external data ({exc})") from exc
    return proto


# Protocol-buffer field numbers on the path to a weight's bytes: ModelProto.graph (7),
# GraphProto.initializer (5), TensorProto.name (8) and TensorProto.raw_data (9).
_GRAPH, _INITIALIZER, _NAME, _RAW_DATA = 7, 5, 8, 9


def _varint(buf, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, start of the field's tag, start of its payload, end) of each field."""
    pos = start
    while pos < end:
        tag_at = pos
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, after = _varint(buf, pos)
        elif wire == 1:
            after = pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            after = pos + length
        elif wire == 5:
            after = pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if after > end:
            raise ValueError("truncated protobuf field")
        yield number, wire, tag_at, pos, after
        pos = after


def _without_raw_data(buf, start: int, end: int, keep_bytes: int, offsets: dict, base: int) -> bytes:
    """A TensorProto's bytes without a raw_data over `keep_bytes`; its (offset, length) go to `offsets`."""
    out, name, raw = bytearray(), None, None
    for number, wire, tag_at, pos, after in _fields(buf, start, end):
        if number == _NAME and wire == 2:
            name = bytes(buf[pos:after]).decode()
        if number == _RAW_DATA and wire == 2 and after - pos > keep_bytes:
            raw = (base + pos, after - pos)
            continue
        out += buf[tag_at:after]
    if raw is not None:
        offsets[name] = raw
    return bytes(out)


def _submessage(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | 2) + _encode_varint(len(payload)) + payload


def load_structure(path: str | os.PathLike, keep_bytes: int = 4096) -> onnx.ModelProto:
    """The model at `path` without the bytes of its large weights, which stay in the file.

    The file is scanned at the protocol-buffer level: every top-level initializer's raw_data
    over `keep_bytes` is left out, and the tensor instead points into the model file itself
    as external data (location = the file's name, offset, length), so onnxruntime can read the
    weights straight from the file (`runtime.make_session(..., folder=path's folder)`) and
    Python never holds them. Names, types, dims and every other field are as in the file.
    Weights already stored as external data keep their own locations (checked as in
    `load_model`). Metadata of a large model costs milliseconds, not a parse of its weights.
    """
    import mmap

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such model file")
    offsets: dict[str, tuple[int, int]] = {}
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            model = bytearray()
            for number, wire, tag_at, pos, after in _fields(buf, 0, len(buf)):
                if number != _GRAPH or wire != 2:
                    model += buf[tag_at:after]
                    continue
                graph = bytearray()
                for g_number, g_wire, g_tag, g_pos, g_after in _fields(buf, pos, after):
                    if g_number == _INITIALIZER and g_wire == 2:
                        graph += _submessage(_INITIALIZER, _without_raw_data(buf, g_pos, g_after, keep_bytes, offsets, 0))
                    else:
                        graph += buf[g_tag:g_after]
                model += _submessage(_GRAPH, bytes(graph))
        proto = onnx.load_from_string(bytes(model))
    except Exception as exc:  # a truncated scan (ValueError, IndexError), an OSError, protobuf's DecodeError
        raise UserError(f"{path}: not a readable ONNX model ({type(exc).__name__}); is the file complete?") from exc
    if not proto.graph.node and not proto.graph.output:
        raise UserError(f"{path}: not an ONNX model (no graph found); is the file complete?")
    _check_external_locations(proto, path.parent)
    for t in proto.graph.initializer:
        if t.name in offsets:
            offset, length = offsets[t.name]
            t.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", path.name), ("offset", str(offset)), ("length", str(length))):
                t.external_data.add(key=key, value=value)
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


def _new_file_mode() -> int:
    """The permissions open() gives a new file under the current umask (mkstemp makes it 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def load_own(model: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """A ModelProto the caller may edit: the one loaded from a path, or a copy of the caller's proto."""
    proto = load_model(model)
    if proto is model:
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
    return proto


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only on success."""
    path = Path(path)
    if path.parent and not path.parent.exists():
        raise UserError(f"{path.parent}: output folder does not exist; create it first")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, _new_file_mode())
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def save_model(model: onnx.ModelProto, path: str | os.PathLike, inputs: Iterable = (), force: bool = False, *,
               weights: dict[str, np.ndarray] | None = None, folder: str | os.PathLike | None = None) -> Path:
    """Write `model` to `path` atomically; refuses to overwrite any of `inputs` unless `force`.

    The file holds every tensor's data: IN_MEMORY stubs take theirs from `weights`, and tensors
    whose data lies in a file of `folder` (a `load_structure` model, edited) are copied from
    that file in 1 MiB reads, so the weights are never held whole. Past protobuf's 2 GB limit,
    the initializers of at least EXTERNAL_THRESHOLD bytes go to `<name>.data` next to the model
    (each at a 4 KiB-aligned offset).
    """
    path = Path(path)
    refuse_overwrite(path, inputs, force)
    external = weight_bytes(model) >= PROTOBUF_LIMIT - (1 << 26)  # 64 MB for everything but the weights
    with atomic_path(path) as tmp:
        if not external:
            _write_model(model, tmp, None, "", weights or {}, folder)
            return path
        data_name = path.name + ".data"
        with atomic_path(path.parent / data_name) as data:
            _write_model(model, tmp, data, data_name, weights or {}, folder)
            empty = not data.stat().st_size
        if empty:  # no tensor reached the threshold
            (path.parent / data_name).unlink()
    return path


def stage_model(model: onnx.ModelProto, path: str | os.PathLike, *, weights: dict[str, np.ndarray] | None = None,
                folder: str | os.PathLike | None = None) -> Path:
    """Write `model` (under protobuf's limit; tensors as in `save_model`) to a hidden temporary file next
    to `path` and return it, for a caller that checks it before renaming it onto `path` (or deleting it)."""
    path = Path(path)
    if not path.parent.exists():
        raise UserError(f"{path.parent}: output folder does not exist; create it first")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.onnx", dir=path.parent)
    os.fchmod(fd, _new_file_mode())
    os.close(fd)
    try:
        _write_model(model, Path(tmp), None, "", weights or {}, folder)
    except BaseException:
        os.unlink(tmp)
        raise
    return Path(tmp)


class StagedOutput:
    """A model written next to `path` for a check before it takes `path`'s place (a context manager).

    The model goes to a hidden temporary file (`stage_model`; tensors as in `save_model`), so a
    check can run from the file (`candidate` is its path) while Python drops its copies; past
    protobuf's limit it is kept in memory instead (`candidate` is the whole ModelProto) and
    saved with external data. `commit()` puts it at `path`; leaving the block without a commit
    deletes the staged file, so nothing is half-written.
    """

    def __init__(self, model: onnx.ModelProto, path: str | os.PathLike, inputs: Iterable = (), force: bool = False,
                 *, weights: dict[str, np.ndarray] | None = None, folder: str | os.PathLike | None = None):
        self.path, self.inputs, self.force = Path(path), inputs, force
        refuse_overwrite(self.path, inputs, force)
        if weight_bytes(model) < PROTOBUF_LIMIT // 2:
            self.file, self.model = stage_model(model, path, weights=weights, folder=folder), None
        else:
            self.file, self.model = None, materialize(model, weights, folder)

    @property
    def candidate(self) -> str | onnx.ModelProto:
        return str(self.file) if self.file is not None else self.model

    def commit(self) -> Path:
        if self.file is not None:
            os.replace(self.file, self.path)
            self.file = None
        else:
            save_model(self.model, self.path, self.inputs, self.force)
        return self.path

    def __enter__(self) -> "StagedOutput":
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.unlink(missing_ok=True)


def _location(tensor: onnx.TensorProto) -> str | None:
    """The external-data location of `tensor`, or None when its data is inline."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return next((e.value for e in tensor.external_data if e.key == "location"), "")


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
    entries = {e.key: e.value for e in tensor.external_data}
    return FileRange(Path(folder) / location, int(entries.get("offset", 0)), int(entries["length"]))


def _source_size(source: np.ndarray | FileRange | onnx.TensorProto) -> int:
    if isinstance(source, np.ndarray):
        return source.nbytes
    return source.length if isinstance(source, FileRange) else _nbytes(source)


def _nbytes(tensor: onnx.TensorProto) -> int:
    """Bytes of a tensor's data, from its type and dims."""
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize if tensor.data_type else 0
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def _copy_source(source: np.ndarray | FileRange | onnx.TensorProto, out) -> None:
    """Write the data of `source` (an array, a file range, or a tensor's own raw_data) to `out`."""
    if isinstance(source, np.ndarray):
        out.write(source.reshape(-1).view(np.uint8))
    elif isinstance(source, FileRange):
        for chunk in file_chunks(source):
            out.write(chunk)
    else:
        out.write(source.raw_data)


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


def _header(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """`tensor` without its data and its external-data fields (name, type, dims, doc kept)."""
    header = onnx.TensorProto()
    header.CopyFrom(tensor)
    for name in ("raw_data", "external_data", "data_location"):
        header.ClearField(name)
    return header


def _copy_fields(source, target, skip: str) -> None:
    """Copy every set field of the message `source` but `skip` into `target` (same message type)."""
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        if field.is_repeated:
            getattr(target, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def _write_model(model: onnx.ModelProto, dest: Path, data: Path | None, data_name: str, weights: dict,
                 folder) -> None:
    """Serialise `model` into `dest`, streaming the data of its top-level initializers (see `save_model`).

    With `data` (a file named `data_name` in the end), the tensors held outside the proto and every
    initializer of EXTERNAL_THRESHOLD bytes or more are appended there and point to it. Without, each
    streamed tensor is written inline: the model is serialised with those tensors reduced to their
    headers, and at the protocol-buffer level each header gets its raw_data field (9) appended, the
    bytes copied from their source."""
    sources = {}
    for t in model.graph.initializer:
        source = data_source(t, weights, folder)
        if source is None and data is not None and t.HasField("raw_data") and _nbytes(t) >= EXTERNAL_THRESHOLD:
            source = t  # moved to the data file from its own raw_data
        if source is not None:
            sources[t.name] = source
    if not sources:
        dest.write_bytes(model.SerializeToString())
        return
    light = onnx.ModelProto()
    _copy_fields(model, light, skip="graph")
    _copy_fields(model.graph, light.graph, skip="initializer")
    g = light.graph
    for t in model.graph.initializer:
        g.initializer.append(_header(t) if t.name in sources else t)
    if data is not None:
        with open(data, "wb") as out:
            for t in g.initializer:
                if t.name not in sources:
                    continue
                out.write(b"\0" * (-out.tell() % 4096))
                offset = out.tell()
                _copy_source(sources[t.name], out)
                t.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", data_name), ("offset", str(offset)),
                                   ("length", str(out.tell() - offset))):
                    t.external_data.add(key=key, value=value)
        dest.write_bytes(light.SerializeToString())
        return
    _write_inline(light, dest, [sources.get(t.name) for t in g.initializer])


def _write_inline(light: onnx.ModelProto, dest: Path, streamed: list) -> None:
    """Write `light` with streamed[k]'s bytes as the raw_data of its k-th initializer (None: as it is)."""
    buf = light.SerializeToString()
    pieces: list = []  # bytes, or a source to copy
    for number, wire, tag_at, pos, after in _fields(buf, 0, len(buf)):
        if number != _GRAPH or wire != 2:
            pieces.append(buf[tag_at:after])
            continue
        graph_pieces, k = [], 0
        for g_number, g_wire, g_tag, g_pos, g_after in _fields(buf, pos, after):
            if g_number == _INITIALIZER and g_wire == 2:
                source, k = streamed[k], k + 1
                if source is not None:
                    size = _source_size(source)
                    raw_head = _encode_varint(_RAW_DATA << 3 | 2) + _encode_varint(size)
                    header = buf[g_pos:g_after]
                    graph_pieces += [_encode_varint(_INITIALIZER << 3 | 2)
                                     + _encode_varint(len(header) + len(raw_head) + size) + header + raw_head, source]
                    continue
            graph_pieces.append(buf[g_tag:g_after])
        size = sum(len(p) if isinstance(p, bytes) else _source_size(p) for p in graph_pieces)
        pieces += [_encode_varint(_GRAPH << 3 | 2) + _encode_varint(size)] + graph_pieces
    with open(dest, "wb") as out:
        for piece in pieces:
            if isinstance(piece, bytes):
                out.write(piece)
            else:
                _copy_source(piece, out)


def materialize(model: onnx.ModelProto, weights: dict[str, np.ndarray] | None = None,
                folder: str | os.PathLike | None = None) -> onnx.ModelProto:
    """`model` (edited in place) with the data of every top-level initializer inside the proto: IN_MEMORY
    stubs from `weights`, external data of `folder` read from its file (`save_model` streams instead)."""
    for t in model.graph.initializer:
        source = data_source(t, weights or {}, folder)
        if source is None:
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
        return weights[tensor.name]
    path, offset, length = source
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
    count = int(np.prod(tensor.dims, dtype=np.int64))
    if count * dtype.itemsize == length:  # one element per item (not a packed 4-bit type): read as it is
        array = np.empty(tuple(tensor.dims), dtype)  # owns its memory: a caller may keep it without a copy
        with open(path, "rb") as fh:
            fh.seek(offset)
            if fh.readinto(array.reshape(-1).view(np.uint8)) != length:
                raise UserError(f"{path}: ends before the data of tensor {tensor.name!r}; the model file is damaged")
        return array
    copy = _header(tensor)
    copy.raw_data = b"".join(file_chunks(source, size=length))
    return numpy_helper.to_array(copy)


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor data in the model, from shapes and types (ByteSize() takes seconds on VGG16)."""
    return sum(_nbytes(t) for t in all_tensors(model))


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
        h.update(np.ascontiguousarray(array).view(np.uint8) if array.dtype != object else str(array.tolist()).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- metadata

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


# ----------------------------------------------------------------------------- light copies

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


def memory_stub(name: str, data_type: int, dims) -> onnx.TensorProto:
    """A tensor whose values are held in a weights dict (location IN_MEMORY), as `detach_weights` makes."""
    stub = onnx.TensorProto(name=name, data_type=data_type, dims=list(dims), data_location=onnx.TensorProto.EXTERNAL)
    stub.external_data.add(key="location", value=IN_MEMORY)
    return stub


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
