"""The inputs `compare` and `save_outputs` feed: a data source (image folder, .npz, array; onnxbn.feeding),
or N seeded standard-normal samples generated batch by batch within RANDOM_BATCH_BYTES.
"""

from __future__ import annotations

import math
import os
from typing import Iterator

import numpy as np
import numpy.typing as npt
import onnx

from onnxbn.errors import UserError
from onnxbn.feeding import fit_batch_size, fixed_batch, model_input, open_model_data

RANDOM_BATCH_BYTES = 2**30  # the most one batch of --random inputs may take (a sample over it is refused)


class RandomInputs:
    """`count` seeded standard-normal samples of shape `dims`, generated batch by batch.

    A dataset for `run_batches`: each batch is made in the type asked for (the model's input
    type), a sample at a time, so only one batch of that type and one float64 sample are ever
    held. The values are those of `np.random.default_rng(seed).standard_normal((count, *dims))`
    cast to that type (one stream, drawn in the same order)."""

    is_images = False

    def __init__(self, dims: tuple[int, ...], count: int, seed: int):
        self.dims, self.total, self.seed = dims, count, seed
        self.description = f"random N(0,1), seed {seed}"
        self.skipped: list[str] = []
        self.consumed = 0

    def has_labels(self) -> bool:
        return False

    def batches(self, batch_size: int, workers: int = 0, strict: bool = False, start: int = 0,
                dtype: npt.DTypeLike = np.float32) -> Iterator[tuple[np.ndarray, None]]:
        """(x of `dtype`, None) batches of `batch_size` samples from sample `start` on."""
        if batch_size < 1:
            raise UserError(f"--batch-size must be at least 1 (got {batch_size})")
        rng = np.random.default_rng(self.seed)
        for _ in range(start):
            rng.standard_normal(self.dims)
        for begin in range(start, self.total, batch_size):
            x = np.empty((min(batch_size, self.total - begin), *self.dims), dtype=dtype)
            for i in range(len(x)):
                x[i] = rng.standard_normal(self.dims)
            self.consumed = begin + len(x)
            yield x, None


def random_inputs(model: onnx.ModelProto, count: int, seed: int = 0, batch_size: int = 32) -> tuple[RandomInputs, int]:
    """`count` seeded standard-normal inputs of the model's input shape and type, and the batch size
    to feed them at: `batch_size`, lowered where that many samples would take more than
    RANDOM_BATCH_BYTES. A UserError when the shape past the batch axis is not fixed, or when one
    sample (or the model's fixed batch) alone takes more than RANDOM_BATCH_BYTES."""
    _, dtype, shape = model_input(model)
    dims = shape[1:]
    if not shape or any(not (isinstance(d, int) and d > 0) for d in dims):
        raise UserError(f"the model's input shape {shape} is not fixed past the batch axis; give --data instead of --random")
    if count < 1:
        raise UserError(f"--random must be at least 1 (got {count})")
    sample_bytes = math.prod(dims) * np.dtype(dtype).itemsize
    fixed = fixed_batch(shape)
    smallest = (fixed or 1) * sample_bytes
    if smallest > RANDOM_BATCH_BYTES:
        raise UserError(f"--random: the model's input ({', '.join(map(str, shape))}) {np.dtype(dtype).name} takes "
                        f"{smallest / 2**30:.1f} GiB per {'batch' if fixed else 'sample'}, over the "
                        f"{RANDOM_BATCH_BYTES / 2**30:g} GiB that generated inputs may take; give --data with real "
                        "inputs, or use a model with smaller fixed dims")
    return RandomInputs(tuple(dims), count, seed), min(batch_size, RANDOM_BATCH_BYTES // sample_bytes)


def open_inputs(model: onnx.ModelProto, data, random: int | None, seed: int, limit: int | None, preset,
                batch_size: int):
    """(dataset, description, batch size) of compare's inputs: `data`, or `random` seeded normal inputs."""
    _, _, shape = model_input(model)
    if data is None:
        if limit is not None:
            raise UserError("--limit samples --data; with --random N, N is the number of inputs")
        dataset, batch_size = random_inputs(model, random if random is not None else 8, seed, batch_size)
        description = dataset.description
    else:
        description = str(data) if isinstance(data, (str, os.PathLike)) else "array"
        dataset = open_model_data(model, data, preset=preset, limit=limit, seed=seed)
    return dataset, description, fit_batch_size(shape, batch_size, dataset.total)


def require_samples(dataset, samples: int, min_samples: int) -> None:
    """A UserError when fewer than `min_samples` samples were compared: a check of nothing never passes."""
    if samples < min_samples:
        skipped = f"; {len(dataset.skipped)} unreadable, e.g. {dataset.skipped[0]}" if dataset.skipped else ""
        raise UserError(f"{dataset.description}: only {samples} sample(s) could be compared (at least {min_samples} "
                        f"needed){skipped}; nothing was verified")
