"""Calibration and training data: image folders, .npz arrays, numpy arrays, torch datasets, streams.

An image folder with class sub-folders (ImageNet layout) gives labels from the
folder names, sorted; a folder of loose images gives none. A `.npz` holds `x`
(N, C, H, W float, already preprocessed) and optionally `y` (N integers); an
uncompressed `.npz` (`np.savez`) is memory-mapped, so its size does not matter. A folder in
ONNX's test-data layout (`test_data_set_<i>/input_0.pb`, as in the ONNX model zoo and onnx's
backend tests) gives its sets' inputs, concatenated along the first axis in set order.

Preprocessing presets, at the model's input size S (224 for VGG):
  imagenet      RGB, resize the short side to round(S*256/224), centre crop S, /255,
                subtract mean (0.485, 0.456, 0.406), divide by std (0.229, 0.224, 0.225);
  imagenet-squash  RGB squashed to S x S, then as imagenet (/255, mean, std); for
                models trained on images already at their input size;
  caffe-squash  the 2017 notebook's: RGB squashed to S x S, 0..255, subtract
                (123.68, 116.779, 103.939), channels reversed to BGR.
Images of any mode (L, LA, P, RGBA, CMYK, I;16, ...) are converted to RGB; 16-bit
images are scaled to 8 bits first.

Images are decoded in worker processes (a torch DataLoader) a bounded number of batches
ahead of the consumer, so decoding overlaps inference and memory does not grow with the data.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence, cast

import numpy as np

from onnxbn.errors import UserError

PRESETS = ("imagenet", "imagenet-squash", "caffe-squash")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jfif")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
CAFFE_MEAN_RGB = np.array([123.68, 116.779, 103.939], dtype=np.float32)


# ----------------------------------------------------------------------------- preprocessing

def _to_rgb(img):
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        scale = 255.0 / (65535.0 if img.mode.startswith("I;16") else max(float(np.asarray(img).max()), 1.0))
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) * scale, 0, 255).astype(np.uint8))
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8))
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")


def preprocess(img, preset: str, size: int) -> np.ndarray:
    """One PIL image -> float32 (3, size, size) under `preset`."""
    from PIL import Image

    img = _to_rgb(img)
    if preset == "imagenet":
        short = round(size * 256 / 224)
        w, h = img.size
        scale = short / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BILINEAR)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
        arr = (np.asarray(img, dtype=np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    elif preset == "imagenet-squash":
        img = img.resize((size, size), Image.Resampling.BILINEAR) if img.size != (size, size) else img
        arr = (np.asarray(img, dtype=np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    elif preset == "caffe-squash":
        img = img.resize((size, size), Image.Resampling.BILINEAR)
        arr = (np.asarray(img, dtype=np.float32) - CAFFE_MEAN_RGB)[:, :, ::-1]
    else:
        raise UserError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
    return np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32)


def decode_batch(paths: Sequence[str], preset: str, size: int) -> tuple[np.ndarray, list[bool], list[str]]:
    """Decode and preprocess `paths`: (images that decoded, ok mask, error messages)."""
    from PIL import Image

    arrays, ok, errors = [], [], []
    for path in paths:
        try:
            with Image.open(path) as img:
                img.load()
                arrays.append(preprocess(img, preset, size))
            ok.append(True)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            ok.append(False)
            errors.append(f"{path}: {type(exc).__name__}: {exc}")
    x = np.stack(arrays) if arrays else np.zeros((0, 3, size, size), np.float32)
    return x, ok, errors


# ----------------------------------------------------------------------------- npz

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


# ----------------------------------------------------------------------------- datasets

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
                dtype=np.float32) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
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
        for begin, (x, ok, errors) in _decode_in_order(chunks, self.preset, self.size, workers):
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


def _numpy(value) -> np.ndarray:
    """A numpy view of an array or a torch tensor (moved to the CPU, detached)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _split(item) -> tuple[np.ndarray, np.ndarray | None]:
    """x, or (x, y), or (x, y, ...) -> (x, y or None)."""
    if isinstance(item, (tuple, list)):
        if not item:
            raise UserError("the data source gave an empty item; give x or (x, y)")
        return _numpy(item[0]), (_numpy(item[1]) if len(item) > 1 else None)
    if isinstance(item, dict):
        raise UserError("the data source gives dicts; give x or (x, y) (wrap it: ((d['x'], d['y']) for d in source))")
    return _numpy(item), None


@dataclass
class Stream:
    """A torch `Dataset` (items x or (x, y)), a `DataLoader`, or any iterable of batches (x or (x, y),
    numpy arrays or torch tensors), read as a stream: nothing is materialised beyond one batch.

    An indexable source (a torch Dataset: `__len__` and `__getitem__`) is read in item order and
    supports a seeded `limit` (a uniform sample: its labels are unknown until read, so unlike a
    folder's or an array's it is not class-balanced), `shard`, `start` (resume) and `workers`
    (through a torch DataLoader with prefetch). Any other iterable (a list included; a tuple is always (x, y)) is
    read once as batches, in its own order, and re-batched to the requested batch size (so
    fixed-batch models get full batches); `limit`, `shard` and resuming need an indexable source
    and are refused for it.
    """

    description: str
    source_object: Any  # duck-typed: a torch Dataset, a DataLoader or an iterable (`_indexable` tells which)
    order: np.ndarray | None = None  # item indices of an indexable source
    skipped: list[str] = field(default_factory=list)
    consumed: int = 0
    preset: str | None = None
    source: str = ""
    _pending: list = field(default_factory=list)  # a peeked batch of a one-shot iterable

    is_images = False

    @property
    def total(self) -> int | None:
        """Items to read: known for an indexable source, unknown (None) for a stream of batches."""
        return len(self.order) if self.order is not None else None

    def __len__(self) -> int:
        if self.total is None:
            raise UserError(f"{self.description}: the number of samples is unknown (a generator or iterable); "
                            "this step needs a source with a length: an array, a .npz, a folder or a torch Dataset")
        return self.total

    def has_labels(self) -> bool:
        if self.order is not None:
            return _split(self.source_object[int(self.order[0])])[1] is not None
        if not self._pending:
            iterator = iter(self.source_object)
            first = next(iterator, None)
            if first is None:
                return False
            self._pending = [first, iterator]
        return _split(self._pending[0])[1] is not None

    def fingerprint(self) -> str:
        """A stream cannot be hashed without reading it: a fresh token, so no cache ever trusts it."""
        import uuid

        return uuid.uuid4().hex

    def batches(self, batch_size: int, workers: int = 0, strict: bool = False, start: int = 0,
                dtype=np.float32) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        if batch_size < 1:
            raise UserError(f"--batch-size must be at least 1 (got {batch_size})")
        self.consumed = start
        if self.order is not None:
            for x, y in self._dataset_batches(self.order[start:], batch_size, workers):
                self.consumed += len(x)
                yield x.astype(dtype, copy=False), y
            return
        if start:
            raise UserError(f"{self.description}: resuming needs an indexable source (an array or a torch Dataset)")
        for x, y in _rebatch(self._iterate(), batch_size):
            self.consumed += len(x)
            yield x.astype(dtype, copy=False), y

    def _iterate(self):
        if self._pending:
            first, iterator = self._pending
            self._pending = []
            yield first
            yield from iterator
        else:
            yield from self.source_object

    def _dataset_batches(self, rows: np.ndarray, batch_size: int, workers: int):
        import torch.utils.data as tud

        loader = tud.DataLoader(tud.Subset(self.source_object, rows.tolist()), batch_size=batch_size,
                                num_workers=max(workers, 0), collate_fn=_collate,
                                prefetch_factor=2 if workers > 0 else None)
        yield from loader


def _collate(items: list) -> tuple[np.ndarray, np.ndarray | None]:
    pairs = [_split(item) for item in items]
    x = np.stack([p[0] for p in pairs])
    labels = [p[1] for p in pairs]
    if any(y is None for y in labels):
        return x, None
    return x, np.asarray(labels).astype(np.int64).reshape(len(items))


def _labels_of(ys: list[np.ndarray | None]) -> np.ndarray | None:
    """The labels of held batches joined, or None when any batch has none."""
    labels = [y for y in ys if y is not None]
    return np.concatenate(labels) if len(labels) == len(ys) else None


def _rebatch(items, batch_size: int):
    """Batches of exactly `batch_size` rows (the last one shorter) from batches of any size."""
    xs: list[np.ndarray] = []
    ys: list[np.ndarray | None] = []
    held = 0
    for item in items:
        x, y = _split(item)
        if x.ndim == 0:
            raise UserError("the data source gave a scalar; give batches x of shape (N, C, ...) or (x, y)")
        xs.append(x)
        ys.append(None if y is None else np.asarray(y).astype(np.int64).reshape(len(x)))
        held += len(x)
        while held >= batch_size:
            x_all, y_all = np.concatenate(xs), _labels_of(ys)
            yield x_all[:batch_size], (None if y_all is None else y_all[:batch_size])
            xs, ys = [x_all[batch_size:]], [None if y_all is None else y_all[batch_size:]]
            held -= batch_size
    if held:
        yield np.concatenate(xs), _labels_of(ys)


def _indexable(data) -> bool:
    """A map-style dataset of items (a torch Dataset and the like); a list is read as batches."""
    return hasattr(data, "__getitem__") and hasattr(data, "__len__") and not hasattr(data, "batch_size") \
        and not isinstance(data, list)


def _is_stream(data) -> bool:
    """A torch Dataset/DataLoader or any iterable that is not a path, an array or an (x, y) tuple."""
    if isinstance(data, (str, os.PathLike, np.ndarray, Dataset, Stream, tuple)):
        return False
    return hasattr(data, "__iter__") or (hasattr(data, "__getitem__") and hasattr(data, "__len__"))


def open_stream(data, *, limit: int | None, seed: int, shard) -> Stream:
    """A Stream over a torch Dataset, DataLoader or iterable (see Stream)."""
    import hashlib as _hashlib

    index, count = parse_shard(shard)
    indexable = _indexable(data)
    name = type(data).__name__
    if not indexable:
        if limit is not None or count > 1:
            raise UserError(f"--limit and --shard need an indexable source (an array or a torch Dataset); "
                            f"this {name} can only be read in its own order (for a DataLoader, pass its .dataset)")
        return Stream(f"{name} stream", data, source=f"stream:{name}")
    n = len(data)
    if n == 0:
        raise UserError(f"{name}: the dataset holds no samples")
    order = np.arange(n)
    if limit is not None:
        if limit < 1:
            raise UserError(f"--limit must be at least 1 (got {limit})")
        order = np.sort(np.random.default_rng(seed).permutation(n)[:min(limit, n)])
    order = order[index::count]
    if len(order) == 0:
        raise UserError(f"{name}: shard {index}/{count} is empty ({n} items); use fewer shards")
    first = _split(data[0])[0]
    source = _hashlib.sha256(f"{name}:{n}:{first.shape}:{first.dtype}".encode() + first.tobytes()).hexdigest()[:16]
    return Stream(f"{name} ({n} items)", data, order=order, source=source)


class _DecodedChunks:
    """Map-style view of (start, paths) chunks: item i is (start, decode_batch(paths)); what a
    torch DataLoader hands to its workers (a plain class: no torch import without workers)."""

    def __init__(self, chunks, preset, size):
        self.chunks, self.preset, self.size = chunks, preset, size

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i):
        start, paths = self.chunks[i]
        return start, decode_batch(paths, self.preset, self.size)


def _as_is(item):
    return item


def _decode_in_order(chunks, preset, size, workers):
    """Decoded chunks in order: in-process, or in `workers` processes through a torch DataLoader
    (forked workers, each two chunks ahead: memory stays flat however large the folder)."""
    items = _DecodedChunks(chunks, preset, size)
    if workers <= 0 or len(chunks) <= 1:
        yield from (items[i] for i in range(len(items)))
        return
    import torch.utils.data as tud

    # a map-style dataset by duck typing: torch's Dataset is a nominal class, and importing torch is avoided above
    yield from tud.DataLoader(cast("tud.Dataset", items), batch_size=None, shuffle=False,
                              num_workers=min(workers, len(chunks)), collate_fn=_as_is, prefetch_factor=2)


# ----------------------------------------------------------------------------- ONNX test-data folders

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


def default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 1)))


def _list_images(root: Path) -> tuple[list[str], np.ndarray | None, list[str] | None]:
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    def images_under(folder: Path, recursive: bool) -> list[str]:
        found = folder.rglob("*") if recursive else folder.iterdir()
        return sorted(str(p) for p in found if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                      and not p.name.startswith("."))
    per_class = [(d.name, images_under(d, True)) for d in subdirs]
    per_class = [(name, files) for name, files in per_class if files]
    if per_class:
        classes = [name for name, _ in per_class]
        files = [f for _, fs in per_class for f in fs]
        labels = np.concatenate([np.full(len(fs), i, dtype=np.int64) for i, (_, fs) in enumerate(per_class)])
        return files, labels, classes
    return images_under(root, False), None, None


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


def parse_shard(shard: str | tuple[int, int] | None) -> tuple[int, int]:
    if shard is None:
        return 0, 1
    if isinstance(shard, tuple):
        index, count = shard
    else:
        try:
            index, count = (int(v) for v in shard.split("/"))
        except ValueError:
            raise UserError(f"--shard {shard!r}: write it as I/N, e.g. 0/4") from None
    if not (count >= 1 and 0 <= index < count):
        raise UserError(f"--shard {index}/{count}: need 0 <= I < N")
    return index, count


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
        array, labels = (None if v is None else _numpy(v) for v in data)  # numpy arrays or torch tensors
        description = "array"
    elif isinstance(data, np.ndarray):
        array, description = data, "array"
    else:
        path = Path(data)
        description = str(path)
        if path.is_dir() and test_data_sets(path):
            array = read_test_inputs(path)
        elif path.is_dir():
            files, labels, classes = _list_images(path)
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
