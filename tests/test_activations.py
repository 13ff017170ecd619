"""check --layerwise in bounded memory: at most --max-marked tensors exposed per onnxruntime session
(counted in the models handed to onnxruntime), a tracemalloc bound far below holding every tensor,
activations only (no initializers, Constant outputs or constant-only results), and per-tensor
max/mean/p99/relative errors as numpy computes them."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import onnxbn
from onnxbn.check.activations import activation_names

DEPTH, SHAPE = 40, (4, 16, 32, 32)  # 80 activations of 256 KiB each (4 samples)


def deep_model(shift: float = 0.0) -> onnx.ModelProto:
    """x -> (Mul by k, Add c) x DEPTH; k from a Constant node, c = Constant * Constant (constants only)."""
    nodes = [helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.array(1.01, np.float32), "k")),
             helper.make_node("Constant", [], ["c0"], value=numpy_helper.from_array(np.array(0.5, np.float32), "c0")),
             helper.make_node("Mul", ["c0", "half"], ["c"])]  # computed from constants alone
    y = "x"
    for i in range(DEPTH):
        nodes.append(helper.make_node("Mul", [y, "k"], [f"m{i}"]))
        nodes.append(helper.make_node("Add", [f"m{i}", "c" if i != DEPTH - 1 else "c_last"], [f"a{i}"]))
        y = f"a{i}"
    nodes.append(helper.make_node("Identity", [y], ["y"]))
    inits = [numpy_helper.from_array(np.array(0.5, np.float32), "half"),
             numpy_helper.from_array(np.array(0.25 + shift, np.float32), "c_last")]
    graph = helper.make_graph(nodes, "deep", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 16, 32, 32])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 16, 32, 32])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def expected_activations() -> list[str]:
    return [n for i in range(DEPTH) for n in (f"m{i}", f"a{i}")] + ["y"]


def test_activations_exclude_initializers_constants_and_constant_only_results():
    assert activation_names(deep_model()) == expected_activations()


def test_layerwise_holds_at_most_max_marked_tensors_per_session(monkeypatch):
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    ref, cand = deep_model(), deep_model(shift=1e-2)  # the last Add differs
    # once untraced first: the modules compare imports on first use (3 MB of import-time objects, 8.2 MB peak
    # cold in a fresh Python 3.12) are not what the bound below is about
    onnxbn.compare(ref, cand, x, batch_size=4, layerwise=True, max_marked=4)
    real = ort.InferenceSession
    exposed: list[int] = []

    def counting(payload, *args, **kwargs):
        model = onnx.load_from_string(payload) if isinstance(payload, bytes) else onnx.load(payload)
        exposed.append(len(model.graph.output) - 1)  # outputs beyond the model's own one
        return real(payload, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", counting)
    tracemalloc.start()
    try:
        report = onnxbn.compare(ref, cand, x, batch_size=4, layerwise=True, max_marked=4)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    names = expected_activations()
    layer = report.layerwise
    assert [t["tensor"] for t in layer["tensors"]] == names and layer["compared"] == len(names)
    assert max(exposed) <= 4
    assert len(exposed) == 2 + 2 * math.ceil(len(names) / 4) == 2 + 2 * layer["passes"]  # 2: the outputs' check
    all_at_once = 2 * len(names) * x.nbytes  # both sides' activations held together
    assert peak < 8 * 2**20 < all_at_once / 5, (peak, all_at_once)  # measured 4.1 MiB of 40 MiB
    assert layer["first_divergence"]["tensor"] == f"a{DEPTH - 1}"
    # per-tensor statistics as numpy computes them from the two runs (the only differing tensor)
    a = np.float64(x)
    for _ in range(DEPTH - 1):
        a = (a * np.float32(1.01)).astype(np.float32).astype(np.float64)
        a = (a.astype(np.float32) + np.float32(0.25)).astype(np.float64)
    m = (a.astype(np.float32) * np.float32(1.01)).astype(np.float32)
    want_a, want_b = (m + np.float32(0.25)).astype(np.float64), (m + np.float32(0.26)).astype(np.float64)
    diff = np.abs(want_a - want_b)
    entry = layer["first_divergence"]
    assert entry["max_abs_error"] == pytest.approx(diff.max(), rel=1e-5)
    assert entry["mean_abs_error"] == pytest.approx(diff.mean(), rel=1e-5)
    assert entry["max_rel_error"] == pytest.approx(diff.max() / np.abs(want_a).max(), rel=1e-5)
    assert np.quantile(diff, 0.99) * (1 - 2**-9) <= entry["p99_abs_error"] <= np.quantile(diff, 0.99) * (1 + 1e-6)
    assert all(t["passed"] for t in layer["tensors"][:-2])
    assert "p99 abs" in report.table() and "p99 abs" in report.markdown()


def test_max_marked_below_one_is_refused(tmp_path, capsys):
    from onnxbn.cli import main

    onnx.save(deep_model(), str(tmp_path / "m.onnx"))
    code = main(["check", str(tmp_path / "m.onnx"), str(tmp_path / "m.onnx"), "--random", "2", "--layerwise",
                 "--max-marked", "0"])
    assert code == 2 and "--max-marked must be at least 1" in capsys.readouterr().err
