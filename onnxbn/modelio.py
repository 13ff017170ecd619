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
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from onnxbn import wire
from onnxbn.errors import UserError

PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_THRESHOLD = 1024  # bytes: smaller tensors stay inside the .onnx file when weights go external


def _nested_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    for node in graph.node:
        for attr in node.attribute:
            for g in [attr.g] if attr.HasField("g") else []:
                yield g
                yield from _nested_graphs(g)
            for g in attr.graphs:
                yield g
                yield from _nested_graphs(g)


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
    for g in _nested_graphs(model.graph):
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


def _external_entries(tensor: onnx.TensorProto) -> dict[str, str]:
    entries: dict[str, str] = {}
    for entry in tensor.external_data:
        if entry.key in entries:
            raise UserError(f"tensor {tensor.name!r}: external data key {entry.key!r} is given twice; "
                            "the model file is damaged")
        entries[entry.key] = entry.value
    return entries


def _check_external(tensor: onnx.TensorProto, root: Path) -> None:
    """Refuse, before any read, external data of `tensor` that is not a file inside `root` or that
    the file cannot hold. A tensor with any `external_data` entry is checked, whatever its
    data_location; entries on a tensor not marked EXTERNAL (which onnx.load ignores) are dropped."""
    if not len(tensor.external_data):
        return
    entries = _external_entries(tensor)
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
    needed = _nbytes(tensor)
    length = needed if length is None else length
    if offset < 0 or offset + length > file_size or needed != length:
        raise UserError(f"tensor {tensor.name!r}: declares {needed} bytes at offset {offset} (length {length}) "
                        f"but {location!r} holds {file_size}; the model or its data file is damaged")
    inline = (tensor.raw_data if tensor.HasField("raw_data") else b"") or _typed_values(tensor)
    if len(inline):
        raise UserError(f"tensor {tensor.name!r}: holds data both inline and in {location!r}; the model file is damaged")


_PACKED_BITS = {getattr(onnx.TensorProto, name): bits for name, bits in
                (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2))
                if hasattr(onnx.TensorProto, name)}


def _element_count(tensor: onnx.TensorProto) -> int:
    return int(np.prod([int(d) for d in tensor.dims], dtype=object))


def _nbytes(tensor: onnx.TensorProto) -> int:
    """Bytes of a tensor's data, from its type and dims (sub-byte types packed, as in raw_data)."""
    if not tensor.data_type:
        return 0
    count = _element_count(tensor)
    if tensor.data_type in _PACKED_BITS:
        return -(-count * _PACKED_BITS[tensor.data_type] // 8)
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


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
    count, bits = _element_count(tensor), _PACKED_BITS.get(tensor.data_type)
    if tensor.HasField("raw_data"):
        held, needed, unit = len(tensor.raw_data), _nbytes(tensor), "bytes"
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
    for g in (model.graph, *_nested_graphs(model.graph)):
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


# Protocol-buffer field numbers on the path to a weight's bytes: ModelProto.graph (7),
# GraphProto.initializer (5) and TensorProto.raw_data (9).
_GRAPH, _INITIALIZER, _RAW_DATA = 7, 5, 9


def _light_tensor(src: wire.Source, start: int, end: int, keep_bytes: int) -> tuple[bytes, tuple[int, int] | None]:
    """A TensorProto's bytes without its raw_data when that is over `keep_bytes`, and where that raw_data
    lies ((offset, length), else None). Of repeated raw_data fields the last one counts, as in protobuf."""
    if end - start <= keep_bytes:
        return src.read(start, end - start), None
    kept, raws = [], []
    for field in wire.fields(src, start, end):
        if field.number == _RAW_DATA and field.wire == 2:
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
        if field.number != _GRAPH or field.wire != 2:
            model.append(src.read(field.tag_at, field.end - field.tag_at))
            continue
        graph = []
        for g in wire.fields(src, field.pos, field.end):
            if g.number == _INITIALIZER and g.wire == 2:
                tensor, raw = _light_tensor(src, g.pos, g.end, keep_bytes)
                if raw is not None:
                    offsets[index] = raw
                index += 1
                graph.append(wire.submessage(_INITIALIZER, tensor))
            else:
                graph.append(src.read(g.tag_at, g.end - g.tag_at))
        model.append(wire.submessage(_GRAPH, b"".join(graph)))
    return b"".join(model), offsets


def load_structure(path: str | os.PathLike, keep_bytes: int = 4096) -> tuple[onnx.ModelProto, Path]:
    """(the model at `path` without the bytes of its large weights, which stay in the file; its folder).

    The file is scanned at the protocol-buffer level (`wire`: protobuf's framing rules, read
    in windows, no memory map): every top-level initializer's raw_data over `keep_bytes` is left
    out, and the tensor instead points into the model file itself as external data (location =
    the file's name, offset, length), so onnxruntime reads the weights straight from the file
    (`runtime.make_session(..., folder=folder)`) and Python never holds them. A symlinked model
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
    if isinstance(model, onnx.ModelProto):  # load_model handed the caller's proto back
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
        if self.file is not None:
            return str(self.file)
        assert self.model is not None, "the staged model was committed already"
        return self.model

    def commit(self) -> Path:
        if self.file is not None:
            os.replace(self.file, self.path)
            self.file = None
        else:
            assert self.model is not None, "the staged model was committed already"
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
    return _external_entries(tensor).get("location", "")


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
    entries = _external_entries(tensor)
    length = int(entries["length"]) if "length" in entries else _nbytes(tensor)
    return FileRange(Path(folder) / location, int(entries.get("offset", 0)), length)


def _source_size(source: np.ndarray | FileRange | onnx.TensorProto) -> int:
    if isinstance(source, np.ndarray):
        return source.nbytes
    return source.length if isinstance(source, FileRange) else _nbytes(source)


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


def _write_model(model: onnx.ModelProto, dest: Path, data: Path | None, data_name: str, weights: dict,
                 folder) -> None:
    """Serialise `model` into `dest`, streaming the data of its top-level initializers (see `save_model`).

    With `data` (a file named `data_name` in the end), the tensors held outside the proto and every
    initializer of EXTERNAL_THRESHOLD bytes or more are appended there and point to it. Without, each
    streamed tensor is written inline: the model is serialised with those tensors reduced to their
    headers, and at the protocol-buffer level each header gets its raw_data field (9) appended, the
    bytes copied from their source. Fields this onnx does not know (at model and graph level too)
    are written as they were read."""
    sources: list = []
    for t in model.graph.initializer:
        source = data_source(t, weights, folder)
        if source is None and data is not None and t.HasField("raw_data") and _nbytes(t) >= EXTERNAL_THRESHOLD:
            source = t  # moved to the data file from its own raw_data
        sources.append(source)
    if not any(source is not None for source in sources):
        dest.write_bytes(model.SerializeToString())
        return
    light = onnx.ModelProto()
    _copy_fields(model, light, skip="graph")
    _copy_fields(model.graph, light.graph, skip="initializer")
    g = light.graph
    for t, source in zip(model.graph.initializer, sources, strict=True):
        g.initializer.append(t if source is None else _header(t))
    if data is not None:
        with open(data, "wb") as out:
            for t, source in zip(g.initializer, sources, strict=True):
                if source is None:
                    continue
                out.write(b"\0" * (-out.tell() % 4096))
                offset = out.tell()
                _copy_source(source, out)
                t.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", data_name), ("offset", str(offset)),
                                   ("length", str(out.tell() - offset))):
                    t.external_data.add(key=key, value=value)
        dest.write_bytes(light.SerializeToString())
        return
    _write_inline(light, dest, sources)


def _write_inline(light: onnx.ModelProto, dest: Path, streamed: list) -> None:
    """Write `light` with streamed[k]'s bytes as the raw_data of its k-th initializer (None: as it is)."""
    buf = light.SerializeToString()
    src = wire.Source(buf)
    pieces: list = []  # bytes, or a source to copy
    for field in wire.fields(src, 0, len(buf)):
        if field.number != _GRAPH or field.wire != 2:
            pieces.append(buf[field.tag_at:field.end])
            continue
        graph_pieces, k = [], 0
        for g in wire.fields(src, field.pos, field.end):
            if g.number == _INITIALIZER and g.wire == 2:
                source, k = streamed[k], k + 1
                if source is not None:
                    size = _source_size(source)
                    raw_head = wire.length_prefix(_RAW_DATA, size)
                    header = buf[g.pos:g.end]
                    graph_pieces += [wire.length_prefix(_INITIALIZER, len(header) + len(raw_head) + size)
                                     + header + raw_head, source]
                    continue
            graph_pieces.append(buf[g.tag_at:g.end])
        size = sum(len(p) if isinstance(p, bytes) else _source_size(p) for p in graph_pieces)
        pieces += [wire.length_prefix(_GRAPH, size)] + graph_pieces
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
        h.update(np.ascontiguousarray(array).view(np.uint8).data if array.dtype != object else str(array.tolist()).encode())
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
    """`model` with the initializers `stubbed(t)` picks reduced to name, type and dims (every other
    field, sparse initializers and functions included, as it is)."""
    light = onnx.ModelProto()
    _copy_fields(model, light, skip="graph")
    _copy_fields(model.graph, light.graph, skip="initializer")
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
