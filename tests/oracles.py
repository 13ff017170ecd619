"""The independent judges tests (and tools/benchmarks) share: plain onnxruntime, numpy, float64.

None of these goes through onnxbn, so a test that compares onnxbn's result with them checks
onnxbn against an implementation it does not share.

- `session(model)`: a plain onnxruntime CPU session (warnings silenced; `level` sets the graph
  optimization level where a test needs onnxruntime's own fusions off).
- `ort_outputs(model, x)`: every graph output on `x`; `exposed(model, names, x)`: the tensors `names`
  on `x`, made the graph outputs of a copy of `model` (`expose`, what a calibrator does). Both take `batch`:
  run that many samples at a time and concatenate, so onnxruntime picks the kernels the code under
  test picks (and a model with a fixed batch dimension can be fed).
- `moments(t)`: per-channel (axis 1) mean and population variance of `t` in float64:
  mean_c = sum_{i in c} t_i / n_c,  var_c = sum_{i in c} (t_i - mean_c)^2 / n_c  (numpy, two-pass);
  `moment_sums(t)` the same as (n_c, mean_c, M2_c = n_c var_c), the form statistics are merged in.
- `rel_error(a, b)`: max|a - b| / max|a| over the whole tensor, in float64 (a is the reference).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper


def feed_name(model: onnx.ModelProto) -> str:
    """The one graph input fed at run time (initializers listed as inputs, IR < 4, skipped)."""
    inits = {t.name for t in model.graph.initializer}
    return next(i.name for i in model.graph.input if i.name not in inits)


def session(model: onnx.ModelProto, level=None):
    """A plain onnxruntime CPU session of `model`; `level` an onnxruntime.GraphOptimizationLevel."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if level is not None:
        options.graph_optimization_level = level
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _run(model: onnx.ModelProto, names: list[str] | None, x: np.ndarray, batch: int | None, level) -> list[np.ndarray]:
    s, feed = session(model, level), feed_name(model)
    step = batch or len(x)
    parts = [s.run(names, {feed: x[i:i + step]}) for i in range(0, len(x), step)]
    return [np.concatenate([np.asarray(p[k]) for p in parts]) for k in range(len(parts[0]))]


def ort_outputs(model: onnx.ModelProto, x: np.ndarray, batch: int | None = None, level=None) -> list[np.ndarray]:
    """All outputs of `model` on `x` (in `batch`-sample runs, concatenated), through a plain CPU session."""
    return _run(model, None, x, batch, level)


def exposed(model: onnx.ModelProto, names: list[str], x: np.ndarray, batch: int | None = None,
            level=None) -> list[np.ndarray]:
    """The values of the tensors `names` on `x`, in that order, through `expose(model, names)`."""
    return _run(expose(model, names), list(names), x, batch, level)


def expose(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` whose graph outputs are exactly `names` (their types left to onnxruntime)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    return probe


def moments(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (axis 1) mean and population variance of `t`, in float64 (numpy)."""
    t = np.moveaxis(np.asarray(t, np.float64), 1, 0).reshape(t.shape[1], -1)
    return t.mean(axis=1), t.var(axis=1)


def moment_sums(t: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """(count per channel, mean, M2 = count * variance) of `t` along axis 1, in float64."""
    mean, var = moments(t)
    count = t.size // t.shape[1]
    return count, mean, var * count


def rel_error(a, b) -> float:
    """max|a - b| / max|a| over the whole tensor, in float64 (`a` the reference; same shapes)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / np.abs(a).max())
