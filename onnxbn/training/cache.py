"""The feature cache: the frozen prefix's outputs over a data set, computed once in onnxruntime.

Layout: `CACHE/<key>/{features.npy, labels.npy, probe.npy, meta.json}` (probe.npy: the inputs of the
first rows, one or the model's fixed batch, for the write-back gate), where the key hashes the frozen part
(its ONNX graph and weights, so models that differ only after the cut share features; versioned by
`_CACHE_FORMAT`), the data (file names, sizes and times, or array bytes) and the preprocessing; a
finished entry is renamed into place atomically, so a killed run never leaves a half cache that a
later run trusts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxbn.errors import UserError
from onnxbn.feeding import check_batch_shape, fixed_batch, progress
from onnxbn.io.model import Model

log = logging.getLogger("onnxbn")

# Version of what a cache entry holds: the frozen prefix's outputs as onnxruntime computes them on the
# ONNX graph (entries of earlier releases, computed by the torch import, are never read: other keys).
# 2: probe.npy added.
_CACHE_FORMAT = "onnxruntime-prefix-2"



def prefix_fingerprint(prefix: Model) -> str:
    """Hash of what the frozen part computes: its graph and every weight it reads (from where it lives)."""
    return hashlib.sha256(f"{_CACHE_FORMAT}\0{prefix.sha256()}".encode()).hexdigest()


@dataclass
class Features:
    """Cached prefix outputs (memory-mapped) and their labels; `seconds` it took to compute them (0 on a hit);
    `probe`: the inputs whose outputs are the first rows of `x` (one, or the model's fixed batch)."""

    x: np.ndarray
    y: np.ndarray
    hit: bool
    probe: np.ndarray
    seconds: float = 0.0


def _run_prefix(prefix, dataset, folder: Path, batch_size: int, workers: int, desc: str, shape,
                poll: Callable[[], None]):
    """Run the prefix (`(session, input name, cut)` of onnxruntime) over `dataset` into `folder`'s memory maps;
    `poll()` after each batch may raise to abandon the pass."""
    session, name, cut = prefix
    n = len(dataset)
    features = labels = None
    written = 0
    fixed = fixed_batch(shape)  # onnxruntime holds the model to its fixed batch size
    with progress(n, desc) as bar:
        for x, y in dataset.batches(fixed or batch_size, workers):
            check_batch_shape(x, shape, dataset.description)
            if fixed is not None and len(x) != fixed:
                raise UserError(f"{dataset.description}: {len(x)} samples left for a model whose batch size is fixed "
                                f"at {fixed}; give a multiple of {fixed} samples (--limit)")
            out = np.asarray(session.run([cut], {name: x})[0], dtype=np.float32)
            if features is None or labels is None:
                features = np.lib.format.open_memmap(folder / "features.npy", mode="w+", dtype=np.float32,
                                                     shape=(n, *out.shape[1:]))
                labels = np.lib.format.open_memmap(folder / "labels.npy", mode="w+", dtype=np.int64, shape=(n,))
            if written == 0:
                np.save(folder / "probe.npy", x[:fixed or 1])
            features[written:written + len(out)] = out
            labels[written:written + len(out)] = y
            written += len(out)
            bar.update(len(x))
            poll()
    if features is None or labels is None:
        raise UserError(f"{dataset.description}: no sample could be read")
    features.flush()
    labels.flush()
    (folder / "meta.json").write_text(json.dumps({"samples": written, "shape": list(features.shape[1:]),
                                                  "skipped": dataset.skipped[:20]}))
    return written


def cached_features(prefix, dataset, key: str, cache_dir: Path, batch_size: int, workers: int,
                    desc: str, shape, poll: Callable[[], None] = lambda: None) -> Features:
    """The prefix's outputs over `dataset` (`prefix`: onnxruntime's `(session, input name, cut tensor)`),
    from `cache_dir/key` or computed into it (`poll()` after each batch may raise to abandon the pass)."""
    entry = cache_dir / key
    started = time.perf_counter()
    if not (entry / "meta.json").is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key[:12]}.", dir=cache_dir))
        try:
            _run_prefix(prefix, dataset, staging, batch_size, workers, desc, shape, poll)
            try:
                os.replace(staging, entry)
            except OSError:  # another run finished the same entry first
                shutil.rmtree(staging, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        hit = False
    else:
        hit = True
        log.info("feature cache hit: %s", entry)
    meta = json.loads((entry / "meta.json").read_text())
    x = np.load(entry / "features.npy", mmap_mode="r")[:meta["samples"]]
    y = np.load(entry / "labels.npy", mmap_mode="r")[:meta["samples"]]
    return Features(x, np.asarray(y), hit, np.load(entry / "probe.npy"),
                    0.0 if hit else round(time.perf_counter() - started, 3))
