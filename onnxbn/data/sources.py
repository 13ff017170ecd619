"""Calibration and training data: image folders, .npz arrays, numpy arrays, torch datasets, streams.

An image folder with class sub-folders (ImageNet layout) gives labels from the
folder names, sorted; a folder of loose images gives none. A `.npz` holds `x`
(N, C, H, W float, already preprocessed) and optionally `y` (N integers); an
uncompressed `.npz` (`np.savez`) is memory-mapped, so its size does not matter.
`open_data` opens any of them as a `Dataset` (or a `Stream`); images are decoded as `data.images` says.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import numpy.typing as npt

from onnxbn.data.images import IMAGE_EXTENSIONS, PRESETS, decode_in_order, list_images
from onnxbn.data.streams import Stream, as_numpy, open_stream, parse_shard
from onnxbn.errors import UserError


def _mmap_npz(path: Path, key: str) -> np.ndarray | None:
    """Memory-map member `key` of an uncompressed .npz, or None when it is compressed."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{key}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        with open(path, "rb") as fh:
            fh.seek(info.header_offset)
            local = fh.read(30)
            name_len = int.from_bytes(local[26:28], "little")
            extra_len = int.from_bytes(local[28:30], "little")
            start = info.header_offset + 30 + name_len + extra_len
            fh.seek(start)
            version = np.lib.format.read_magic(fh)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(fh)
            offset = fh.tell()
    if dtype.hasobject:
        raise UserError(f"{path}: '{key}' holds Python objects; store numbers only")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def _load_npz(path: Path, input_name: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(x, y or None): the inputs are `x`, or the array named `input_name` (the model's input, as
    `onnxbn reduce` writes them)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            key = "x" if "x" in keys or input_name not in keys else input_name
            if key not in keys:
                raise UserError(f"{path}: no array 'x' in the .npz (found: {', '.join(sorted(keys)) or 'nothing'}); "
                                "store inputs as x=(N,C,H,W) float32")
            x = _mmap_npz(path, key)
            if x is None:
                x = npz[key]
            y = npz["y"] if "y" in keys else None
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"{path}: not a readable .npz ({type(exc).__name__}: {exc})") from exc
    return x, y


@dataclass
class Dataset:
    """Inputs (image files or an array) and optional integer labels, in a fixed order."""

    description: str
    files: list[str] | None = None
    array: np.ndarray | None = None
    index: np.ndarray | None = None
    labels: np.ndarray | None = None
    classes: list[str] | None = None
    preset: str | None = None
    size: int = 224
    skipped: list[str] = field(default_factory=list)
    consumed: int = 0
    source: str = ""  # identity of the whole data source, before --limit and --shard (see source_id)

    def __len__(self) -> int:
        return len(self.files) if self.files is not None else len(self._rows()[1])

    def _rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(array, index) of an array dataset: `open_data` sets both exactly when `files` is None."""
        assert self.array is not None and self.index is not None, "an array Dataset holds its array and index"
        return self.array, self.index

    @property
    def total(self) -> int:
        """The number of items (a Stream's may be None: unknown)."""
        return len(self)

    @property
    def is_images(self) -> bool:
        return self.files is not None

    def has_labels(self) -> bool:
        return self.labels is not None

    def batches(self, batch_size: int, workers: int = 0, strict: bool = False, start: int = 0,
                dtype: npt.DTypeLike = np.float32) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """(x of `dtype`, y or None) batches in order, from item `start` on (arrays are converted
        straight from their own type, so a float64 array fed as float64 loses nothing); unreadable images
        are skipped and recorded in `self.skipped` (or fail with `strict`). After each
        batch, `self.consumed` is the number of items read so far (skipped ones included),
        the offset to resume from."""
        if batch_size < 1:
            raise UserError(f"--batch-size must be at least 1 (got {batch_size})")
        self.consumed = start
        if self.files is None:
            array, index = self._rows()
            for begin in range(start, len(index), batch_size):
                rows = index[begin:begin + batch_size]
                x = np.asarray(array[rows], dtype=dtype)  # reads only these rows of a memmap
                y = None if self.labels is None else self.labels[begin:begin + batch_size]
                self.consumed = begin + len(rows)
                yield x, y
            return
        chunks = [(b, self.files[b:b + batch_size]) for b in range(start, len(self.files), batch_size)]
        for begin, (x, ok, errors) in decode_in_order(chunks, self.preset, self.size, workers):
            if errors:
                if strict:
                    raise UserError(f"cannot read image {errors[0]} (drop --strict to skip unreadable images)")
                self.skipped.extend(errors)
            y = None
            if self.labels is not None:
                y = self.labels[begin:begin + len(ok)][np.array(ok, dtype=bool)]
            self.consumed = begin + len(ok)
            if len(x):
                yield x.astype(dtype, copy=False), y

    def fingerprint(self) -> str:
        """Hash of the inputs (file names, sizes and times, or array bytes), labels and preprocessing."""
        h = hashlib.sha256()
        if self.files is not None:
            for f in self.files:
                st = os.stat(f)
                h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            h.update(f"{self.preset}/{self.size}".encode())
        else:
            array, index = self._rows()
            h.update(np.ascontiguousarray(index).tobytes())
            for begin in range(0, len(index), 1024):
                h.update(np.ascontiguousarray(array[index[begin:begin + 1024]]).tobytes())
        if self.labels is not None:
            h.update(np.ascontiguousarray(self.labels).tobytes())
        return h.hexdigest()


def _is_stream(data) -> bool:
    """A torch Dataset/DataLoader or any iterable that is not a path, an array or an (x, y) tuple."""
    if isinstance(data, (str, os.PathLike, np.ndarray, Dataset, Stream, tuple)):
        return False
    return hasattr(data, "__iter__") or (hasattr(data, "__getitem__") and hasattr(data, "__len__"))


def test_data_sets(folder: Path) -> list[Path]:
    """The `test_data_set_<i>` folders of an ONNX test-data folder in numeric order (empty: not one)."""
    sets = [p for p in Path(folder).glob("test_data_set_*") if p.is_dir() and p.name[14:].isdigit()]
    return sorted(sets, key=lambda p: int(p.name[14:]))


def read_tensors(data_set: Path, kind: str) -> list[np.ndarray]:
    """The arrays of `<kind>_0.pb`, `<kind>_1.pb`, ... (TensorProto files) in one test-data set."""
    from onnx import TensorProto, numpy_helper

    files = sorted((p for p in data_set.glob(f"{kind}_*.pb") if p.stem[len(kind) + 1:].isdigit()),
                   key=lambda p: int(p.stem[len(kind) + 1:]))
    arrays = []
    for k, path in enumerate(files):
        if path.stem != f"{kind}_{k}":
            raise UserError(f"{data_set}: {kind}_{k}.pb is missing (found {path.name})")
        tensor = TensorProto()
        try:
            tensor.ParseFromString(path.read_bytes())
            arrays.append(numpy_helper.to_array(tensor))
        except Exception as exc:
            raise UserError(f"{path}: not a readable TensorProto file ({type(exc).__name__})") from exc
    return arrays


def concat_sets(arrays: list[np.ndarray], what: str) -> np.ndarray:
    """Per-set arrays joined along the first axis; a UserError when their shapes past it or types differ."""
    first = arrays[0]
    for k, a in enumerate(arrays):
        if a.ndim == 0 or a.shape[1:] != first.shape[1:] or a.dtype != first.dtype:
            raise UserError(f"{what}: set {k} holds {a.dtype} {a.shape}, set 0 {first.dtype} {first.shape}; onnxbn "
                            "joins the sets along the first axis, so their shapes past it and types must agree")
    return np.concatenate(arrays)


def read_test_inputs(folder: Path) -> np.ndarray:
    """The inputs of an ONNX test-data folder (one input per set: onnxbn feeds single-input models)."""
    arrays = []
    for data_set in test_data_sets(folder):
        inputs = read_tensors(data_set, "input")
        if len(inputs) != 1:
            raise UserError(f"{data_set}: holds {len(inputs)} inputs; onnxbn feeds single-input models (input_0.pb only)")
        arrays.append(inputs[0])
    return concat_sets(arrays, f"{folder} inputs")


def balanced_sample(labels: np.ndarray | None, n_items: int, limit: int, seed: int) -> np.ndarray:
    """Indices of a seeded random sample of `limit` items, spread evenly over classes.

    Classes take turns in a seeded order, each giving its next not-yet-taken item in
    a seeded shuffle, until `limit` items are taken. Returned sorted.
    """
    rng = np.random.default_rng(seed)
    if labels is None:
        return np.sort(rng.permutation(n_items)[:limit])
    queues = [rng.permutation(np.flatnonzero(labels == c)) for c in rng.permutation(np.unique(labels))]
    taken, depth = [], 0
    while len(taken) < limit:
        row = [q[depth] for q in queues if depth < len(q)]
        if not row:
            break
        taken.extend(row[: limit - len(taken)])
        depth += 1
    return np.sort(np.array(taken, dtype=np.int64))


def source_id(files: list[str] | None, root: Path | None, array: np.ndarray | None, labels: np.ndarray | None) -> str:
    """A short hash naming a data source as a whole, cheap to compute: an image folder by its files'
    relative paths and sizes; an array by its shape, dtype and 64 evenly spaced rows; plus the labels.
    Shards of one source share it, so `merge` can tell shards of different data apart."""
    h = hashlib.sha256()
    if files is not None:
        for f in files:
            h.update(f"{os.path.relpath(f, root)}\0{os.path.getsize(f)}\n".encode())
    else:
        assert array is not None, "a data source is image files or an array"
        h.update(f"{array.shape}{array.dtype}".encode())
        for row in np.unique(np.linspace(0, len(array) - 1, 64).astype(np.int64)):
            h.update(np.ascontiguousarray(array[row]).tobytes())
    if labels is not None:
        h.update(np.ascontiguousarray(labels).tobytes())
    return h.hexdigest()[:16]


def open_data(data, *, preset: str | None = None, size: int = 224, limit: int | None = None,
              seed: int = 0, shard: str | tuple[int, int] | None = None,
              input_name: str | None = None) -> Dataset | Stream:
    """A Dataset from a folder, a .npz path or a numpy array (x) / (x, y) tuple; a Stream from a
    torch Dataset, a DataLoader or any iterable of batches (see Stream); a tuple is always (x, y).
    A .npz without `x` may hold the inputs under `input_name` (the model's input tensor name).

    `limit` takes a seeded, class-balanced random sample; `shard` "I/N" then keeps
    every N-th item starting at I, so N shards partition the (limited) data.
    """
    if isinstance(data, (Dataset, Stream)):
        return data
    if _is_stream(data):
        return open_stream(data, limit=limit, seed=seed, shard=shard)
    labels = classes = files = array = None
    if isinstance(data, tuple):
        if len(data) != 2:
            raise UserError(f"data as a tuple must be (x, y); got {len(data)} items")
        array, labels = (None if v is None else as_numpy(v) for v in data)  # numpy arrays or torch tensors
        description = "array"
    elif isinstance(data, np.ndarray):
        array, description = data, "array"
    else:
        path = Path(data)
        description = str(path)
        if path.is_dir() and test_data_sets(path):
            array = read_test_inputs(path)
        elif path.is_dir():
            files, labels, classes = list_images(path)
            if not files:
                raise UserError(f"{path}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}, "
                                "in class sub-folders or directly in the folder)")
            if preset is None:
                preset = "imagenet"
            if preset not in PRESETS:
                raise UserError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
        elif path.suffix.lower() == ".npz" and path.is_file():
            array, labels = _load_npz(path, input_name)
        elif not path.exists():
            raise UserError(f"{path}: no such file or folder")
        else:
            raise UserError(f"{path}: data must be an image folder or a .npz with x (and y)")
    if array is not None:
        if array.ndim < 2 or array.dtype.kind not in "fiu":
            raise UserError(f"{description}: x must be a numeric array (N, C, ...), got {array.dtype} {array.shape}")
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != (len(array),) or labels.dtype.kind not in "iu":
                raise UserError(f"{description}: y must be N integers matching x "
                                f"(got {labels.dtype} {labels.shape} for {len(array)} inputs)")
            labels = labels.astype(np.int64)
        if len(array) == 0:
            raise UserError(f"{description}: x holds no samples")
    if files is not None:
        n = len(files)
    else:
        assert array is not None, "every branch above sets files or array, or raises"
        n = len(array)
    source = source_id(files, path if files is not None else None, array, labels)
    order = np.arange(n)
    if limit is not None:
        if limit < 1:
            raise UserError(f"--limit must be at least 1 (got {limit})")
        order = balanced_sample(labels, n, min(limit, n), seed)
    index, count = parse_shard(shard)
    order = order[index::count]
    if len(order) == 0:
        raise UserError(f"{description}: shard {index}/{count} is empty ({n} items); use fewer shards")
    if files is not None:
        files = [files[i] for i in order]
    if labels is not None:
        labels = labels[order]
    return Dataset(description, files=files, array=array, index=None if files is not None else order,
                   labels=labels, classes=classes, preset=preset, size=size, source=source)
