"""Streams: data that arrives as an iterator (a torch DataLoader, a generator of batches) rather than an indexable set.

A stream yields (x) or (x, y) batches of any size; `Stream` re-batches them to the batch size asked for,
and a shard I/N keeps the items whose index is I modulo N.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import numpy.typing as npt

from onnxbn.errors import UserError


def as_numpy(value) -> np.ndarray:
    """A numpy view of an array or a torch tensor (moved to the CPU, detached)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def split_batch(item) -> tuple[np.ndarray, np.ndarray | None]:
    """x, or (x, y), or (x, y, ...) -> (x, y or None)."""
    if isinstance(item, (tuple, list)):
        if not item:
            raise UserError("the data source gave an empty item; give x or (x, y)")
        return as_numpy(item[0]), (as_numpy(item[1]) if len(item) > 1 else None)
    if isinstance(item, dict):
        raise UserError("the data source gives dicts; give x or (x, y) (wrap it: ((d['x'], d['y']) for d in source))")
    return as_numpy(item), None


def _labels_of(ys: list[np.ndarray | None]) -> np.ndarray | None:
    """The labels of held batches joined, or None when any batch has none."""
    labels = [y for y in ys if y is not None]
    return np.concatenate(labels) if len(labels) == len(ys) else None


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
            return split_batch(self.source_object[int(self.order[0])])[1] is not None
        if not self._pending:
            iterator = iter(self.source_object)
            first = next(iterator, None)
            if first is None:
                return False
            self._pending = [first, iterator]
        return split_batch(self._pending[0])[1] is not None

    def fingerprint(self) -> str:
        """A stream cannot be hashed without reading it: a fresh token, so no cache ever trusts it."""
        import uuid

        return uuid.uuid4().hex

    def batches(self, batch_size: int, workers: int = 0, strict: bool = False, start: int = 0,
                dtype: npt.DTypeLike = np.float32) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
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
    pairs = [split_batch(item) for item in items]
    x = np.stack([p[0] for p in pairs])
    labels = [p[1] for p in pairs]
    if any(y is None for y in labels):
        return x, None
    return x, np.asarray(labels).astype(np.int64).reshape(len(items))


def _rebatch(items, batch_size: int):
    """Batches of exactly `batch_size` rows (the last one shorter) from batches of any size."""
    xs: list[np.ndarray] = []
    ys: list[np.ndarray | None] = []
    held = 0
    for item in items:
        x, y = split_batch(item)
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
    first = split_batch(data[0])[0]
    source = _hashlib.sha256(f"{name}:{n}:{first.shape}:{first.dtype}".encode() + first.tobytes()).hexdigest()[:16]
    return Stream(f"{name} ({n} items)", data, order=order, source=source)


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
