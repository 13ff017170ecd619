"""Writing model files: atomic, staged for a check before they take their place, never over an input.

A model is written to a temporary file in the target folder, then renamed, so an interrupted run leaves
either the old file or the new one, never half of one. Tensors are copied from wherever their bytes live
(`io.tensors`) 1 MiB at a time. Models whose tensors exceed protobuf's 2 GB limit are written with external
data next to the model file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import onnx

from onnxbn.errors import UserError
from onnxbn.io import wire
from onnxbn.io.copies import copy_fields
from onnxbn.io.tensors import (
    GRAPH_FIELD,
    INITIALIZER_FIELD,
    RAW_DATA_FIELD,
    FileRange,
    data_source,
    file_chunks,
    materialize,
    tensor_header,
    tensor_nbytes,
    weight_bytes,
)

PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_THRESHOLD = 1024  # bytes: smaller tensors stay inside the .onnx file when weights go external


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


def _source_size(source: np.ndarray | FileRange | onnx.TensorProto) -> int:
    if isinstance(source, np.ndarray):
        return source.nbytes
    return source.length if isinstance(source, FileRange) else tensor_nbytes(source)


def _copy_source(source: np.ndarray | FileRange | onnx.TensorProto, out) -> None:
    """Write the data of `source` (an array, a file range, or a tensor's own raw_data) to `out`."""
    if isinstance(source, np.ndarray):
        out.write(source.reshape(-1).view(np.uint8))
    elif isinstance(source, FileRange):
        for chunk in file_chunks(source):
            out.write(chunk)
    else:
        out.write(source.raw_data)


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
        if source is None and data is not None and t.HasField("raw_data") and tensor_nbytes(t) >= EXTERNAL_THRESHOLD:
            source = t  # moved to the data file from its own raw_data
        sources.append(source)
    if not any(source is not None for source in sources):
        dest.write_bytes(model.SerializeToString())
        return
    light = onnx.ModelProto()
    copy_fields(model, light, skip="graph")
    copy_fields(model.graph, light.graph, skip="initializer")
    g = light.graph
    for t, source in zip(model.graph.initializer, sources, strict=True):
        g.initializer.append(t if source is None else tensor_header(t))
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
        if field.number != GRAPH_FIELD or field.wire != 2:
            pieces.append(buf[field.tag_at:field.end])
            continue
        graph_pieces, k = [], 0
        for g in wire.fields(src, field.pos, field.end):
            if g.number == INITIALIZER_FIELD and g.wire == 2:
                source, k = streamed[k], k + 1
                if source is not None:
                    size = _source_size(source)
                    raw_head = wire.length_prefix(RAW_DATA_FIELD, size)
                    header = buf[g.pos:g.end]
                    graph_pieces += [wire.length_prefix(INITIALIZER_FIELD, len(header) + len(raw_head) + size)
                                     + header + raw_head, source]
                    continue
            graph_pieces.append(buf[g.tag_at:g.end])
        size = sum(len(p) if isinstance(p, bytes) else _source_size(p) for p in graph_pieces)
        pieces += [wire.length_prefix(GRAPH_FIELD, size)] + graph_pieces
    with open(dest, "wb") as out:
        for piece in pieces:
            if isinstance(piece, bytes):
                out.write(piece)
            else:
                _copy_source(piece, out)
