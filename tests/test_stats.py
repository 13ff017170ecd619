"""Statistics: in-graph reductions, Chan merging, shards, data sampling and preprocessing."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import write_images
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from oracles import exposed

import onnxbn
from models import small_cnn
from onnxbn.data.images import preprocess
from onnxbn.data.sources import Dataset, balanced_sample, open_data
from onnxbn.points import select_points
from onnxbn.runtimes.ort_backend import make_session
from onnxbn.stats import ChannelMoments, augment_for_stats, load_stats, merge_stats


@given(data=st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=64), min_size=2, max_size=60),
       cuts=st.lists(st.integers(1, 59), max_size=6), order_seed=st.integers(0, 2**16))
@settings(max_examples=150, deadline=None, derandomize=True)
def test_chan_merge_equals_single_pass(data, cuts, order_seed):
    x = np.array(data).reshape(-1, 1)
    bounds = sorted({c for c in cuts if c < len(x)})
    parts = np.split(x, bounds)
    rng = np.random.default_rng(order_seed)
    acc = ChannelMoments()
    for i in rng.permutation(len(parts)):
        p = parts[i]
        if len(p):
            acc.merge(len(p), p.mean(axis=0), ((p - p.mean(axis=0)) ** 2).sum(axis=0))
    assert acc.count == len(x) and acc.mean is not None
    np.testing.assert_allclose(acc.mean, x.mean(axis=0), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(acc.var, x.var(axis=0), rtol=1e-10, atol=1e-7)


@pytest.mark.parametrize("opset", [9, 11, 13, 17, 18, 21])
@pytest.mark.parametrize("selector", ["relu", "linear", "dense", "conv"])
def test_stats_match_numpy(opset, selector, cnn_inputs):
    model = small_cnn(opset)
    stats = onnxbn.collect_stats(model, cnn_inputs, after=selector, batch_size=5)
    values = exposed(model, stats.tensors, cnn_inputs)
    for name, v in zip(stats.tensors, values, strict=True):
        v = v.astype(np.float64)
        axes = (0,) + tuple(range(2, v.ndim))
        np.testing.assert_allclose(stats.mean(name), v.mean(axis=axes), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(stats.var(name), v.var(axis=axes), rtol=1e-6, atol=1e-7)
        assert stats.moments[name].count == v.size // v.shape[1]


def test_selectors_pick_the_documented_tensors(cnn):
    names = lambda sel: [p.tensor for p in select_points(cnn, sel)]  # noqa: E731
    assert names("dense") == ["h1", "h2"]          # activations after the hidden Gemms, not the classifier
    assert names("conv") == ["r1", "r2"]
    assert names("relu") == ["r1", "r2", "h1", "h2"]
    assert names("linear") == ["c1", "c2", "g1", "g2"]  # the logits are a graph output
    assert names("c2, g1") == ["c2", "g1"]
    point = select_points(cnn, "relu")[0]
    assert (point.producer_op, point.channels, point.shape) == ("Relu", 4, ["N", 4, 8, 8])


def test_augmented_graph_fetches_only_channel_vectors(cnn):
    points = select_points(cnn, "dense")
    graph = augment_for_stats(cnn, points)
    augmented = graph.model
    outputs = [o.name for o in augmented.graph.output]
    assert "logits" not in outputs and len(outputs) == 3 * len(points)
    assert list(graph.outputs) == [p.tensor for p in points] and graph.fetch == outputs
    assert "fc3" not in {n.name for n in augmented.graph.node}  # the classifier is pruned away
    x = np.random.default_rng(0).standard_normal((6, 3, 8, 8)).astype(np.float32)
    values = [np.asarray(v) for v in make_session(augmented, "cpu").run(None, {"input": x})]
    assert all(v.size <= 16 for v in values)
    batch = graph.batch_moments(dict(zip(graph.fetch, values, strict=True)))
    assert list(batch) == [p.tensor for p in points]
    for name, v in zip(batch, exposed(cnn, list(batch), x), strict=True):  # numpy on the exposed tensors
        v = np.moveaxis(v.astype(np.float64), 1, 0).reshape(v.shape[1], -1)
        mean, m2, count = batch[name]
        assert count == v.shape[1]
        np.testing.assert_allclose(mean, v.mean(axis=1), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(m2, ((v - v.mean(axis=1, keepdims=True)) ** 2).sum(axis=1), rtol=1e-6, atol=1e-6)


def test_shards_merge_to_a_single_run(cnn, cnn_inputs, tmp_path):
    whole = onnxbn.collect_stats(cnn, cnn_inputs, after="relu", batch_size=4)
    parts = []
    for i in range(3):
        part = onnxbn.collect_stats(cnn, cnn_inputs, after="relu", batch_size=4, shard=f"{i}/3")
        parts.append(part.save(tmp_path / f"s{i}.npz"))
    merged = merge_stats(parts)
    assert merged.meta["samples"] == len(cnn_inputs)
    for name in whole.tensors:
        np.testing.assert_allclose(merged.mean(name), whole.mean(name), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(merged.var(name), whole.var(name), rtol=1e-12, atol=1e-14)


def test_stats_file_is_plain_numpy(cnn, cnn_inputs, tmp_path):
    stats = onnxbn.collect_stats(cnn, cnn_inputs, after="dense")
    path = stats.save(tmp_path / "stats.npz")
    with np.load(path) as npz:
        assert list(npz["tensors"]) == ["h1", "h2"]
        np.testing.assert_array_equal(npz["var_0"], stats.var("h1"))
        np.testing.assert_allclose(npz["m2_0"] / npz["count_0"], npz["var_0"])
    again = load_stats(path)
    assert again.meta["selector"] == "dense" and again.meta["samples"] == 24
    assert again.meta["model_sha256"] == stats.meta["model_sha256"]


def test_limit_is_seeded_and_class_balanced():
    labels = np.repeat(np.arange(10), [50, 50, 50, 50, 50, 50, 50, 50, 50, 3])
    picked = balanced_sample(labels, len(labels), 40, seed=0)
    counts = np.bincount(labels[picked], minlength=10)
    assert counts.sum() == 40 and counts.min() >= 3 and counts.max() <= 5
    assert not np.array_equal(picked, np.arange(40))
    np.testing.assert_array_equal(picked, balanced_sample(labels, len(labels), 40, seed=0))
    assert not np.array_equal(picked, balanced_sample(labels, len(labels), 40, seed=1))


def test_image_folder_limit_spans_classes(tmp_path):
    write_images(tmp_path, n_per_class=5, classes=("a", "b", "c", "d"), fmt="PNG")
    data = open_data(tmp_path, preset="imagenet", size=16, limit=4, seed=0)
    assert isinstance(data, Dataset) and data.labels is not None
    assert sorted(data.labels.tolist()) == [0, 1, 2, 3]
    assert data.classes == ["a", "b", "c", "d"]
    x, y = next(data.batches(8, workers=0))
    assert x.shape == (4, 3, 16, 16) and x.dtype == np.float32


def test_presets_compute_the_documented_values():
    from PIL import Image

    img = Image.new("RGB", (300, 200), (255, 128, 0))
    x = preprocess(img, "imagenet", 224)
    assert x.shape == (3, 224, 224)
    np.testing.assert_allclose(x[:, 100, 100], (np.array([1.0, 128 / 255, 0.0]) - [0.485, 0.456, 0.406])
                               / [0.229, 0.224, 0.225], rtol=1e-6)
    y = preprocess(img, "caffe-squash", 224)
    np.testing.assert_allclose(y[:, 5, 5], [0 - 103.939, 128 - 116.779, 255 - 123.68], rtol=1e-6)  # BGR


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "I", "F", "1"])
def test_any_image_mode_becomes_rgb(mode, tmp_path):
    from PIL import Image

    base = Image.new("RGB", (20, 20), (200, 100, 50)).convert(mode if mode not in ("I;16", "I", "F") else "L")
    if mode in ("I;16", "I", "F"):
        base = Image.fromarray((np.asarray(base, dtype=np.float64) * (257 if mode != "F" else 1)).astype(
            {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]))
    x = preprocess(base, "imagenet", 8)
    assert x.shape == (3, 8, 8) and np.isfinite(x).all()
    if mode in ("L", "I;16", "I"):
        # grey ~121: the same value in all channels before normalisation
        raw = x.transpose(1, 2, 0) * [0.229, 0.224, 0.225] + [0.485, 0.456, 0.406]
        assert np.ptp(raw[4, 4]) < 2 / 255


def test_decoding_in_workers_equals_in_process(tmp_path):
    write_images(tmp_path, n_per_class=6, fmt="JPEG")
    data = open_data(tmp_path, preset="imagenet", size=32)
    inline = np.concatenate([x for x, _ in data.batches(4, workers=0)])
    pooled = np.concatenate([x for x, _ in data.batches(4, workers=2)])
    np.testing.assert_array_equal(inline, pooled)


def test_corrupt_images_are_skipped_and_counted(tmp_path, cnn):
    write_images(tmp_path, n_per_class=3, fmt="PNG", size=(8, 8))
    (tmp_path / "cat" / "broken.png").write_bytes(b"\x89PNG not really")
    stats = onnxbn.collect_stats(cnn, tmp_path, after="dense", workers=0)
    assert stats.meta["samples"] == 6 and stats.meta["skipped"] == 1
    assert "broken.png" in stats.meta["skipped_files"][0]


def test_uncompressed_npz_is_memory_mapped(tmp_path):
    x = np.random.default_rng(0).standard_normal((10, 3, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(10))
    data = open_data(tmp_path / "d.npz")
    assert isinstance(data, Dataset) and isinstance(data.array, np.memmap)
    np.testing.assert_array_equal(np.concatenate([b for b, _ in data.batches(3)]), x)
    np.savez_compressed(tmp_path / "c.npz", x=x)
    compressed = open_data(tmp_path / "c.npz")
    assert isinstance(compressed, Dataset)
    np.testing.assert_array_equal(compressed.array, x)


def _stats_cmd(model, data, out, *extra):
    import sys

    return [sys.executable, "-m", "onnxbn", "-q", "stats", str(model), "--data", str(data), "--after", "relu",
            "--batch-size", "2", "--workers", "0", "-o", str(out), *extra]


def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path):
    """A stats run killed mid-way continues with --resume to the same bits."""
    import os
    import signal
    import subprocess
    import time

    model = small_cnn(size=32)
    onnx.save(model, str(tmp_path / "m.onnx"))
    x = np.random.default_rng(7).standard_normal((3000, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    whole = subprocess.run(_stats_cmd(tmp_path / "m.onnx", tmp_path / "x.npz", tmp_path / "whole.npz"),
                           capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "part.npz"
    checkpoint = tmp_path / "part.npz.checkpoint.npz"
    proc = subprocess.Popen(_stats_cmd(tmp_path / "m.onnx", tmp_path / "x.npz", out, "--checkpoint-every", "0"))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if checkpoint.is_file():
            progress_made = load_stats(checkpoint).meta["consumed"]
            if progress_made >= 200:
                break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "a killed run must not leave an output file"
    stopped_at = load_stats(checkpoint).meta["consumed"]
    assert 0 < stopped_at < 3000
    refused = subprocess.run(_stats_cmd(tmp_path / "m.onnx", tmp_path / "x.npz", out), capture_output=True, text=True)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    resumed = subprocess.run(_stats_cmd(tmp_path / "m.onnx", tmp_path / "x.npz", out, "--resume"),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert not checkpoint.exists()
    a, b = load_stats(tmp_path / "whole.npz"), load_stats(out)
    assert a.meta["samples"] == b.meta["samples"] == 3000
    for name in a.tensors:
        np.testing.assert_array_equal(b.mean(name), a.mean(name))  # bit-identical, not merely close
        np.testing.assert_array_equal(b.var(name), a.var(name))


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path, cnn, cnn_inputs):
    path = tmp_path / "c.npz"
    onnxbn.collect_stats(cnn, cnn_inputs, after="relu", batch_size=4, checkpoint=path, checkpoint_every=0)
    with pytest.raises(onnxbn.UserError, match="other settings"):
        onnxbn.collect_stats(cnn, cnn_inputs, after="relu", batch_size=8, checkpoint=path, resume=True)


# ----------------------------------------------------------------------------- moved from test_graph_core.py

def test_float64_model_gets_float64_statistics():
    """Large values with a small spread: float32 row sums would be off by ~1e-7 relative; float64 is ~1e-16."""
    w = numpy_helper.from_array(np.random.default_rng(4).uniform(0.5, 2, (1, 4, 1, 1)), "w")
    nodes = [helper.make_node("Mul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "w"], ["c"]),
             helper.make_node("Relu", ["c"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["N", 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["N", 4, 8, 8])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    x = np.random.default_rng(1).standard_normal((6, 4, 8, 8)) + 1e4
    (c,) = exposed(model, ["c"], x)
    stats = onnxbn.collect_stats(model, x, after=["c"], device="cpu", workers=0)
    np.testing.assert_allclose(stats.mean("c"), c.mean(axis=(0, 2, 3)), rtol=1e-13)
    np.testing.assert_allclose(stats.var("c"), c.var(axis=(0, 2, 3)), rtol=1e-11)
