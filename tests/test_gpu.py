"""CUDA paths, against the CPU as the judge. Marked `gpu` (torch on CUDA; onnxruntime on CUDA where it
loads, else its CPU) or `ort_gpu` (onnxruntime's CUDA provider too): skipped, with the reason, where there is none."""

from __future__ import annotations

import numpy as np
import pytest
from onnx.numpy_helper import to_array as onnx_array

import onnxbn
from models import small_cnn

pytestmark = pytest.mark.gpu


def inputs(n=32):
    return np.random.default_rng(0).standard_normal((n, 3, 8, 8)).astype(np.float32)


@pytest.mark.ort_gpu
def test_stats_on_cuda_equal_the_cpu():
    model, x = small_cnn(), inputs()
    cpu = onnxbn.collect_stats(model, x, after="relu", device="cpu", workers=0)
    gpu = onnxbn.collect_stats(model, x, after="relu", device="cuda", workers=0)
    assert gpu.meta["provider"] == "cuda" and cpu.meta["provider"] == "cpu"
    for name in cpu.tensors:
        np.testing.assert_allclose(gpu.mean(name), cpu.mean(name), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(gpu.var(name), cpu.var(name), rtol=1e-5, atol=1e-6)


def test_finetune_on_cuda_matches_the_cpu_run():
    model, x = small_cnn(), inputs()
    y = np.arange(len(x)) % 10
    bn = onnxbn.insert_bn(model, onnxbn.collect_stats(model, x, after="dense", device="cpu", workers=0))
    # SGD: Adam divides by sqrt(v), which turns rounding in near-zero gradients into lr-sized steps
    runs = {d: onnxbn.finetune(bn, (x, y), epochs=1, lr=1e-3, batch_size=16, device=d, dropout=0.0, optimizer="sgd")
            for d in ("cpu", "auto")}
    runs["cuda"] = runs.pop("auto")  # torch on CUDA; the frozen part on onnxruntime's CUDA where it loads
    assert runs["cuda"].log["device"].startswith("cuda")
    a = onnxbn.compare(runs["cpu"].model, runs["cuda"].model, random=8, atol=1e-4, rtol=1e-4, device="cpu")
    assert a.passed, a.table()


def test_batch_recalibration_on_cuda_equals_the_cpu_run():
    model, x = small_cnn(), inputs()
    bn = onnxbn.insert_bn(model, onnxbn.collect_stats(model, x, after="relu", device="cpu", workers=0))
    runs = {d: onnxbn.recalibrate(bn, x, mode="batch", batch_size=8, device=d) for d in ("cpu", "auto")}
    for a, b in zip(runs["cpu"].graph.initializer, runs["auto"].graph.initializer, strict=True):
        assert a.name == b.name
        np.testing.assert_allclose(onnx_array(b), onnx_array(a), rtol=1e-5, atol=1e-6)
