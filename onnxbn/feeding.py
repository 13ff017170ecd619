"""Feeding a dataset to a session: the one loop (`run_batches`), the model's input, batch sizes.

`run_batches` is the one loop that feeds a dataset to a session (stats, check, eval):
batches cast to the model's input type, checked against its input shape, with a
progress bar. `rel_error(a, b) = max|a - b| / max|a|` is the one relative error.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from onnxbn.data.sources import open_data
from onnxbn.errors import UserError
from onnxbn.graph import graph_inputs, tensor_shape
from onnxbn.io.copies import metadata


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |a| in float64: the error relative to the reference's scale (0 when both are 0)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    diff = float(np.abs(a - b).max()) if a.size else 0.0
    scale = float(np.abs(a).max()) if a.size else 0.0
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


def model_input(model: onnx.ModelProto) -> tuple[str, np.dtype, list]:
    """(name, numpy dtype, shape) of the model's single run-time input."""
    inputs = graph_inputs(model)
    if len(inputs) != 1:
        raise UserError(f"the model has {len(inputs)} run-time inputs ({', '.join(i.name for i in inputs)}); "
                        "onnxbn feeds data to single-input models")
    vi = inputs[0]
    dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
    return vi.name, dtype, tensor_shape(vi.type) or []


def fixed_batch(input_shape: list) -> int | None:
    """The model's batch size when its batch axis is fixed, else None."""
    return input_shape[0] if input_shape and isinstance(input_shape[0], int) and input_shape[0] > 0 else None


def fit_batch_size(input_shape: list, batch_size: int, samples: int | None) -> int:
    """`batch_size`, or the model's own when its batch axis is fixed (then `samples` must fill whole
    batches; a stream of unknown length is checked batch by batch in `run_batches`)."""
    fixed = fixed_batch(input_shape)
    if fixed is None:
        return batch_size
    if samples is not None and samples % fixed:
        raise UserError(f"the model's batch size is fixed at {fixed} and {samples} samples do not fill whole "
                        f"batches; give a multiple of {fixed} samples (--limit, --random)")
    return fixed


def image_size_for(model: onnx.ModelProto) -> int:
    """The spatial size a model expects (its input's H when fixed, else 224)."""
    _, _, shape = model_input(model)
    if len(shape) == 4 and isinstance(shape[2], int) and shape[2] > 0:
        return shape[2]
    return 224


def check_batch_shape(x: np.ndarray, shape: list, source: str) -> None:
    expected = shape[1:]
    if len(x.shape) != len(shape) or any(isinstance(e, int) and e > 0 and e != g
                                         for e, g in zip(expected, x.shape[1:], strict=True)):
        raise UserError(f"{source}: inputs have shape {tuple(x.shape[1:])} per sample, the model expects "
                        f"{tuple(e if isinstance(e, int) and e > 0 else '?' for e in expected)}")


def check_finite_input(x: np.ndarray, seen: int) -> None:
    """A UserError when a float batch (samples seen..) holds NaN or Inf: caught here, in numpy, because
    onnxruntime's ReduceMin/ReduceMax and max pooling skip a NaN that is not first in its block."""
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise UserError(f"the data has NaN or Inf values in samples {seen}..{seen + len(x) - 1}; clean or drop "
                        "them; nothing written")


def open_model_data(model: onnx.ModelProto, data, *, preset=None, limit=None, seed=0, shard=None):
    """open_data with the preset and image size taken from the model when not given, and a .npz's
    inputs found under `x` or the model's input name."""
    return open_data(data, preset=preset or metadata(model).get("onnxbn.preset") or "imagenet",
                     size=image_size_for(model), limit=limit, seed=seed, shard=shard, input_name=model_input(model)[0])


def progress(total: int, desc: str, unit: str = "img"):
    """A tqdm bar on a terminal, silent in logs and pipes."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=None, leave=False, dynamic_ncols=True)


def run_batches(session, dataset, fetch: list[str], model: onnx.ModelProto, batch_size: int, *, workers: int = 0,
                strict: bool = False, start: int = 0, desc: str = "run"):
    """Feed `dataset` through `session` batch by batch; yield (x, y, outputs of `fetch`).

    x is cast to the model's input type and checked against its input shape; the
    progress bar counts items read (skipped ones included) from item `start` on.
    """
    name, dtype, shape = model_input(model)
    fixed = fixed_batch(shape)
    with progress(dataset.total, desc) as bar:
        bar.update(start)
        for x, y in dataset.batches(batch_size, workers, strict=strict, start=start, dtype=dtype):
            check_batch_shape(x, shape, dataset.description)
            if fixed is not None and len(x) != fixed:
                raise UserError(f"{dataset.description}: a batch of {len(x)} samples reached a model whose batch size "
                                f"is fixed at {fixed}; give a multiple of {fixed} samples")
            yield x, y, session.run(fetch, {name: x})
            bar.update(dataset.consumed - bar.n)
