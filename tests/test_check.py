"""check.py: --random inputs within a memory budget, tolerances by the model's float type,
non-numeric outputs compared exactly."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import onnx
import pytest

import onnxbn
import onnxbn.check
from onnxbn.check import RANDOM_BATCH_BYTES, random_inputs
from onnxbn.cli import main

from models import Net, small_net


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def conv_bn_net(height: int, width: int, batch="N", dtype=np.float32) -> onnx.ModelProto:
    """x (batch, 3, height, width) -> 1x1 Conv -> BN -> GlobalAveragePool: weights of a few bytes
    whatever the input size."""
    n = Net(3, dtype)
    y = n.bn(n.conv("x", 3, 2, "conv", k=1, pad=0), 2, "bn")
    n.node("GlobalAveragePool", [y], "y")
    return n.model({"x": [batch, 3, height, width]}, {"y": [batch, 2, 1, 1]}, 13)


# ----------------------------------------------------------------------------- --random

@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_random_inputs_are_one_seeded_stream_made_a_batch_at_a_time(dtype):
    """The batches are the rows of default_rng(seed).standard_normal((count, *dims)) in the model's
    type, and only about one batch is held at a time (the old way held all of them in float64)."""
    model = conv_bn_net(64, 64, dtype=dtype)
    dataset, batch = random_inputs(model, 300, seed=7, batch_size=16)
    assert batch == 16 and dataset.total == 300
    expected = np.random.default_rng(7).standard_normal((300, 3, 64, 64)).astype(dtype)
    begin = 0
    for x, y in dataset.batches(batch, dtype=dtype):
        assert y is None and x.dtype == dtype and len(x) == min(16, 300 - begin)
        np.testing.assert_array_equal(x, expected[begin:begin + len(x)])
        begin += len(x)
    assert begin == 300
    del expected, x
    tracemalloc.start()
    try:
        for x, _ in dataset.batches(batch, dtype=dtype):
            del x
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    one_batch = 16 * 3 * 64 * 64 * np.dtype(dtype).itemsize
    # the batch handed out and the next one being made, and one float64 sample; all 300 in float64: 29 MiB
    assert peak < 2 * one_batch + 3 * 64 * 64 * 8 + 2**16


def test_random_batch_shrinks_to_the_budget_and_compares_the_same(monkeypatch):
    sample = 3 * 8 * 8 * 4
    monkeypatch.setattr(onnxbn.check, "RANDOM_BATCH_BYTES", 5 * sample)
    model = small_net(13)
    dataset, batch = random_inputs(model, 12, batch_size=32)
    assert batch == 5
    assert [len(x) for x, _ in dataset.batches(batch)] == [5, 5, 2]
    report = onnxbn.compare(model, model, random=12, atol=0, rtol=0)
    assert report.passed and report.samples == 12 and report.inputs == "random N(0,1), seed 0"


def test_random_refuses_a_fixed_batch_over_the_budget(monkeypatch):
    monkeypatch.setattr(onnxbn.check, "RANDOM_BATCH_BYTES", 3 * 3 * 8 * 8 * 4)
    with pytest.raises(onnxbn.UserError, match=r"input \(4, 3, 8, 8\) float32 takes 0.0 GiB per batch"):
        random_inputs(small_net(13, batch=4), 8)
    assert random_inputs(small_net(13, batch=3), 9)[1] == 3  # exactly at the budget: accepted


def test_random_refuses_a_sample_over_the_budget_exit_2_nothing_written(tmp_path, capsys):
    """A valid model declaring (N, 3, 20000, 20000) float32: 4.5 GiB a sample. check and fold refuse
    it in one line, exit 2, before generating anything (the old code allocated 8 x 9.6 GB)."""
    assert RANDOM_BATCH_BYTES == 2**30
    path = tmp_path / "big.onnx"
    onnx.save(conv_bn_net(20000, 20000), str(path))
    expected = ("onnxbn: error: --random: the model's input (N, 3, 20000, 20000) float32 takes 4.5 GiB per sample, "
                "over the 1 GiB that generated inputs may take; give --data with real inputs, or use a model with "
                "smaller fixed dims")
    code, out, err = run(capsys, "check", path, path, "--random", "2", "--report", tmp_path / "r.json")
    assert code == 2 and err.strip().splitlines() == [expected] and out == ""
    code, out, err = run(capsys, "fold", path, "--random", "2", "-o", tmp_path / "deploy.onnx")
    assert code == 2 and err.strip().splitlines() == [expected]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx"]


def test_random_with_limit_is_refused():
    model = small_net(13)
    with pytest.raises(onnxbn.UserError, match="--limit samples --data"):
        onnxbn.compare(model, model, random=8, limit=4)
