"""INT8 quantization (onnxbn.quantization) and its ranges (onnxbn.ranges), judged by numpy and plain onnxruntime.

The judges here never call the code under test: activations come from a plain onnxruntime
session with every tensor exposed, histograms and quantization from numpy.
"""

from __future__ import annotations

import numpy as np
import onnx
import oracles
import pytest
from onnx import TensorProto, helper, numpy_helper
from oracles import session

from models import Net, inputs_for, small_cnn
from onnxbn.errors import UserError
from onnxbn.quantization import quantize_with_report
from onnxbn.ranges import BINS, HALF, collect_ranges, load_ranges, merge_ranges

WIDE_BN = {"scale": (1.0, 0.5), "B": (0.0, 0.5), "mean": (0.0, 1.0), "var": (0.2, 3.0)}


def bn_cnn(seed: int = 0, w: int = 8, size: int = 8, opset: int = 13) -> onnx.ModelProto:
    """Conv-BN-Relu x2 (the second depthwise), pool, 1x1 Conv-BN-Relu, GAP, Gemm (10 classes)."""
    n = Net(seed, bn=WIDE_BN)
    y = n.node("Relu", [n.bn(n.conv("input", 3, w, "conv1", bias=False), w, "bn1")], "r1")
    y = n.node("Relu", [n.bn(n.conv(y, w, w, "conv2", bias=False, group=w), w, "bn2")], "r2")
    y = n.node("MaxPool", [y], "p1", kernel_shape=[2, 2], strides=[2, 2])
    y = n.node("Relu", [n.bn(n.conv(y, w, 2 * w, "conv3", bias=False, k=1, pad=0), 2 * w, "bn3")], "r3")
    y = n.node("Flatten", [n.node("GlobalAveragePool", [y], "gap")], "flat")
    n.gemm(y, 2 * w, 10, "fc", out="logits")
    return n.model({"input": ["N", 3, size, size]}, {"logits": ["N", 10]}, opset)


CONV_TO_BN = {"conv1": "bn1.out", "conv2": "bn2.out", "conv3": "bn3.out"}


def exposed(model: onnx.ModelProto, names: list[str], x: np.ndarray, batch: int = 16) -> dict[str, np.ndarray]:
    """oracles.exposed by name, `batch` samples at a time as the code under test runs them (same kernels)."""
    return dict(zip(names, oracles.exposed(model, names, x, batch=batch), strict=True))


def float_tensors(model: onnx.ModelProto) -> list[str]:
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    return ["input"] + [o for n in model.graph.node for o in n.output if types.get(o) == TensorProto.FLOAT]


# ----------------------------------------------------------------------------- ranges

def numpy_hist(values: np.ndarray, exp: int | None) -> np.ndarray:
    assert exp is not None, "no histogram"
    j = np.floor(values.astype(np.float64).reshape(-1) * (HALF / 2.0 ** exp))
    return np.bincount(np.clip(j, -HALF, HALF - 1).astype(np.int64) + HALF, minlength=BINS)


def test_ranges_min_max_and_histogram_equal_numpy():
    model, x = small_cnn(), inputs_for([3, 8, 8], 40, seed=3)
    ranges = collect_ranges(model, x, batch_size=16, device="cpu")
    names = float_tensors(model)
    assert list(ranges.tensors) == names
    values = exposed(model, names, x)
    for name, r in ranges.tensors.items():
        v = values[name].astype(np.float64)
        amax = np.abs(v).max()
        assert (r.min, r.max, r.count) == (v.min(), v.max(), v.size), name
        assert r.exp is not None and r.exp == int(np.floor(np.log2(amax))) + 2 and 2.0 ** r.exp > amax
        assert np.array_equal(r.hist, numpy_hist(v, r.exp)), name


def test_moments_gathered_in_the_ranges_pass_equal_numpy():
    """collect_ranges(moments=...) adds per-channel moments to the same pass (quantize's bias correction reads
    the float model's there): numpy's mean and population variance per channel, over batches; the ranges
    themselves unchanged."""
    model, x = small_cnn(), inputs_for([3, 8, 8], 40, seed=3)
    names = float_tensors(model)
    alone = collect_ranges(model, x, batch_size=16, device="cpu")
    both = collect_ranges(model, x, batch_size=16, device="cpu", moments=names[1:4])
    values = exposed(model, names, x)
    assert list(both.moments) == names[1:4]
    for name, m in both.moments.items():
        v = np.moveaxis(values[name].astype(np.float64), 1, 0).reshape(values[name].shape[1], -1)
        scale = np.abs(v).max()  # row sums run in float32 in the graph (onnxbn.stats): float32 rounding
        assert m.mean is not None
        np.testing.assert_allclose(m.mean, v.mean(axis=1), rtol=1e-6, atol=1e-6 * scale)
        np.testing.assert_allclose(m.var, v.var(axis=1), rtol=1e-6, atol=1e-6 * scale ** 2)
    for name, r in alone.tensors.items():
        s = both.tensors[name]
        assert (s.min, s.max, s.count, s.exp) == (r.min, r.max, r.count, r.exp) and np.array_equal(s.hist, r.hist)


def test_a_nan_in_the_data_is_refused_though_onnxruntime_reductions_skip_it():
    """onnxruntime's ReduceMax skips a NaN that is not first in its block (the judge: a bare ReduceMax session
    on the same batch returns a number); the ranges pass refuses the batch in one line naming its samples."""
    model, x = small_cnn(), inputs_for([3, 8, 8], 12, seed=3)
    x[5, 1, 4, 4] = np.nan
    probe = helper.make_model(helper.make_graph(
        [helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3, 8, 8])],
        [helper.make_tensor_value_info("m", TensorProto.FLOAT, [])]),
        opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    assert np.isfinite(session(probe).run(None, {"x": x[4:8]})[0])  # the NaN goes unseen there
    with pytest.raises(UserError, match=r"NaN or Inf values in samples 4\.\.7"):
        collect_ranges(model, x, batch_size=4, device="cpu", histograms=False)


def test_histogram_merge_of_halves_equals_one_pass(tmp_path):
    model = small_cnn()
    x = inputs_for([3, 8, 8], 48, seed=4)
    x[24:] *= 8  # the second half needs a coarser grid: merging rebins the first half's histograms
    one = collect_ranges(model, x, batch_size=48, device="cpu")
    halves = [collect_ranges(model, x, batch_size=b, device="cpu", shard=f"{i}/2") for i, b in ((0, 5), (1, 7))]
    for i, h in enumerate(halves):
        h.save(tmp_path / f"r{i}.npz")
    merged = merge_ranges([tmp_path / "r0.npz", tmp_path / "r1.npz"])
    assert any(a.exp != b.exp for a, b in zip(*(h.tensors.values() for h in halves), strict=True))
    for name, r in one.tensors.items():
        m = merged.tensors[name]
        assert (m.count, m.min, m.max, m.exp) == (r.count, r.min, r.max, r.exp), name
        assert np.array_equal(m.hist, r.hist), name
    # and the one pass is numpy's histogram of all the data
    values = exposed(model, ["c2"], x)["c2"]
    assert np.array_equal(one.tensors["c2"].hist, numpy_hist(values, one.tensors["c2"].exp))
    assert merged.meta["samples"] == 48


def numpy_stride(per_sample: int, keep: int) -> int:
    """The largest odd s <= max(1, per_sample / keep), by search."""
    return max(s for s in range(1, per_sample + 1, 2) if s == 1 or s * keep <= per_sample)


def test_sampled_histograms_equal_numpy_of_every_stride_th_value(monkeypatch):
    """Past 3 * HISTOGRAM_VALUES values per sample, the histogram counts every s-th value of each sample
    (flat C order from 0); min, max and count stay those of every value."""
    import onnxbn.ranges as ranges_module

    monkeypatch.setattr(ranges_module, "HISTOGRAM_VALUES", 16)
    model, x = small_cnn(), inputs_for([3, 8, 8], 40, seed=5)
    ranges = collect_ranges(model, x, batch_size=16, device="cpu")
    values = exposed(model, list(ranges.tensors), x)
    assert ranges.meta["histogram_values"] == 16
    strides = {}
    for name, r in ranges.tensors.items():
        v = values[name].astype(np.float64).reshape(len(x), -1)
        strides[name] = stride = numpy_stride(v.shape[1], 16)
        assert (r.stride, r.count, r.min, r.max) == (stride, v.size, v.min(), v.max()), name
        assert r.exp == int(np.floor(np.log2(np.abs(v).max()))) + 2
        assert np.array_equal(r.hist, numpy_hist(v[:, ::stride], r.exp)), name
    assert strides["input"] == 11 and strides["c1"] == 15 and strides["g1"] == 1  # 192, 256 and 16 per sample


def test_sampled_histogram_merge_of_halves_equals_one_pass(tmp_path, monkeypatch):
    """The subsample depends on the sample alone: shards in other batch sizes merge to the one-pass histogram."""
    import onnxbn.ranges as ranges_module

    monkeypatch.setattr(ranges_module, "HISTOGRAM_VALUES", 8)
    model = small_cnn()
    x = inputs_for([3, 8, 8], 48, seed=6)
    x[24:] *= 8
    one = collect_ranges(model, x, batch_size=48, device="cpu")
    for i, b in ((0, 5), (1, 7)):
        collect_ranges(model, x, batch_size=b, device="cpu", shard=f"{i}/2").save(tmp_path / f"r{i}.npz")
    merged = merge_ranges([tmp_path / "r0.npz", tmp_path / "r1.npz"])
    assert one.tensors["c2"].stride == 15  # 128 values per sample
    for name, r in one.tensors.items():
        m = merged.tensors[name]
        assert (m.stride, m.count, m.min, m.max, m.exp) == (r.stride, r.count, r.min, r.max, r.exp), name
        assert np.array_equal(m.hist, r.hist), name
    c2 = exposed(model, ["c2"], x)["c2"].reshape(len(x), -1)
    assert np.array_equal(one.tensors["c2"].hist, numpy_hist(c2[:, ::15], one.tensors["c2"].exp))


def test_merging_ranges_of_other_subsamples_is_refused(tmp_path, monkeypatch):
    import onnxbn.ranges as ranges_module
    from onnxbn.errors import UserError

    model, x = small_cnn(), inputs_for([3, 8, 8], 8, seed=7)
    collect_ranges(model, x, device="cpu", shard="0/2").save(tmp_path / "r0.npz")
    monkeypatch.setattr(ranges_module, "HISTOGRAM_VALUES", 8)
    collect_ranges(model, x, device="cpu", shard="1/2").save(tmp_path / "r1.npz")
    with pytest.raises(UserError, match="histogram_values"):
        merge_ranges([tmp_path / "r0.npz", tmp_path / "r1.npz"])


@pytest.mark.parametrize("opset", [11, 13])
def test_histograms_of_an_older_opset_equal_numpy(opset):
    """The histogram graph (Flatten, Slice, Cast, Mul, Floor) runs at any opset from 11: the model is not converted."""
    model, x = small_cnn(opset=opset), inputs_for([3, 8, 8], 24, seed=13)
    ranges = collect_ranges(model, x, batch_size=8, device="cpu", tensors=["c1", "g2"])
    values = exposed(model, ["c1", "g2"], x, batch=8)
    for name, r in ranges.tensors.items():
        assert np.array_equal(r.hist, numpy_hist(values[name], r.exp)), name


def test_histograms_past_two_to_the_twelve_keep_tiny_negatives_below_zero():
    """R = 2^14 > 2^12: float32's x * (4096 / R) underflows to -0 for the smallest negative subnormal (bin 0
    instead of -1); the float64 product puts it below zero as numpy does."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"], name="id")], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    tiny = np.float32(-1.4e-45)  # the smallest negative subnormal
    data = np.array([[5000.0, -3000.5, tiny, 0.0, 1e-3, -7.25]] * 4, np.float32)
    assert np.float32(tiny) * np.float32(0.25) == 0  # what float32 alone would have binned at 0
    ranges = collect_ranges(model, data, batch_size=2, device="cpu")
    for name in ("x", "y"):
        r = ranges.tensors[name]
        assert r.exp == 14 and np.array_equal(r.hist, numpy_hist(data, r.exp)), name
        assert r.hist[HALF - 1] == 4  # the subnormals, one bin below zero


def test_min_max_only_ranges_refuse_histogram_methods():
    from onnxbn.errors import UserError
    from onnxbn.ranges import tensor_range

    model, x = small_cnn(), inputs_for([3, 8, 8], 16, seed=14)
    ranges = collect_ranges(model, x, device="cpu", histograms=False)
    values = exposed(model, ["c2"], x)["c2"]
    assert tensor_range(ranges.tensors["c2"], "minmax") == (values.min(), values.max())
    with pytest.raises(UserError, match="needs histograms"):
        tensor_range(ranges.tensors["c2"], "entropy")


def test_interrupted_and_resumed_ranges_equal_one_pass(tmp_path, monkeypatch):
    import onnxbn.ranges as ranges_module

    model, x = small_cnn(), inputs_for([3, 8, 8], 40, seed=16)
    one = collect_ranges(model, x, batch_size=8, device="cpu")
    real = ranges_module.run_batches

    def interrupted(*args, **kwargs):
        for i, item in enumerate(real(*args, **kwargs)):
            if i == 3:
                raise KeyboardInterrupt
            yield item
    monkeypatch.setattr(ranges_module, "run_batches", interrupted)
    state = tmp_path / "r.checkpoint.npz"
    with pytest.raises(KeyboardInterrupt):
        collect_ranges(model, x, batch_size=8, device="cpu", checkpoint=state, checkpoint_every=0)
    assert load_ranges(state).meta["samples"] == 24
    monkeypatch.setattr(ranges_module, "run_batches", real)
    with pytest.raises(Exception, match="other settings"):  # another batch size may not continue it
        collect_ranges(model, x, batch_size=4, device="cpu", checkpoint=state, resume=True)
    resumed = collect_ranges(model, x, batch_size=8, device="cpu", checkpoint=state, resume=True)
    assert resumed.meta["samples"] == 40
    for name, r in one.tensors.items():
        m = resumed.tensors[name]
        assert (m.count, m.min, m.max, m.exp) == (r.count, r.min, r.max, r.exp) and np.array_equal(m.hist, r.hist)


# ----------------------------------------------------------------------------- Q/DQ = numpy

def fake_quant(x, scale, zero, qmin, qmax):
    return (np.clip(np.round(x / scale) + zero, qmin, qmax) - zero) * scale


@pytest.mark.parametrize("activations", ["uint8", "int8"])
def test_tensors_left_unobserved_do_not_change_the_int8_model(activations):
    """quantize observes only the tensors whose ranges onnxruntime's placement reads: with every other
    range replaced by a placeholder, onnxruntime writes the same model byte for byte as with all real ranges."""
    from onnxbn.quantization import UNREAD_RANGE, place_qdq, quantized_tensors
    from onnxbn.ranges import activation_tensors

    model = small_cnn(opset=13)
    names = activation_tensors(model)
    rng = np.random.default_rng(7)
    real = {n: (-float(rng.uniform(0.5, 2)), float(rng.uniform(0.5, 3))) for n in names}
    used = quantized_tensors(model, names, activations=activations)
    relu_inputs = {"c1", "c2", "g1", "g2"}  # onnxruntime drops a ReLU after them for uint8, keeps it for int8
    assert set(names) - set(used) >= {"p1", "flat"}  # MaxPool and Flatten reuse their input's scale
    assert (relu_inputs & set(used)) == (set() if activations == "uint8" else relu_inputs)
    full = place_qdq(model, real, activations=activations)
    partial = place_qdq(model, {n: real[n] if n in used else UNREAD_RANGE for n in names}, activations=activations)
    assert full.SerializeToString() == partial.SerializeToString()


def test_qdq_weights_and_activations_equal_numpy():
    model, x = small_cnn(opset=13), inputs_for([3, 8, 8], 32, seed=5)
    qdq, _ = quantize_with_report(model, x, recover="none", device="cpu")
    inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "c2.w")).astype(np.float64)
    scale = np.abs(w).reshape(len(w), -1).max(axis=1) / 127  # per output channel, zero point 0
    np.testing.assert_allclose(inits["c2.w_scale"], scale, rtol=1e-6)
    assert not inits["c2.w_zero_point"].any()
    q = np.clip(np.round(w / scale[:, None, None, None]), -127, 127)
    assert np.array_equal(inits["c2.w_quantized"].astype(np.int64), q.astype(np.int64))
    # the graph's dequantized weight in onnxruntime is numpy's
    deq = exposed(qdq, ["c2.w_DequantizeLinear_Output"], x, batch=len(x))["c2.w_DequantizeLinear_Output"]
    np.testing.assert_allclose(deq, q * inits["c2.w_scale"][:, None, None, None], rtol=1e-6)
    # the input's activation: uint8 over [min(x, 0), max(x, 0)], as onnxruntime's own QDQ computes it
    lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
    s, z = (hi - lo) / 255, np.round(-lo / ((hi - lo) / 255))
    np.testing.assert_allclose(inits["input_scale"], s, rtol=1e-6)
    assert int(inits["input_zero_point"]) == z
    got = exposed(qdq, ["input_DequantizeLinear_Output"], x)["input_DequantizeLinear_Output"]
    want = fake_quant(x.astype(np.float64), np.float64(inits["input_scale"]), z, 0, 255)
    np.testing.assert_allclose(got, want, atol=1e-6 * np.abs(want).max())


def test_int8_activations_are_symmetric():
    x = inputs_for([3, 8, 8], 32, seed=5)
    qdq, report = quantize_with_report(small_cnn(), x, activations="int8", recover="none", device="cpu")
    inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    assert inits["input_zero_point"].dtype == np.int8 and int(inits["input_zero_point"]) == 0
    np.testing.assert_allclose(inits["input_scale"], np.abs(x).max() / 127, rtol=1e-6)
    got = exposed(qdq, ["input_DequantizeLinear_Output"], x)["input_DequantizeLinear_Output"]
    want = fake_quant(x.astype(np.float64), np.float64(inits["input_scale"]), 0, -128, 127)
    np.testing.assert_allclose(got, want, atol=1e-6 * np.abs(want).max())
    assert report.passed


# ----------------------------------------------------------------------------- placement in memory

def quantize_static_placement(model, ranges, per_channel, activations, exclude=()):
    """The judge: onnxruntime's public entry point, quantize_static with the ranges as a calibration cache,
    through its files."""
    import logging
    import tempfile
    from pathlib import Path

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

    data = TensorsData(CalibrationMethod.MinMax, {n: TensorData(lowest=np.array(lo, np.float32),
                                                                highest=np.array(hi, np.float32))
                                                  for n, (lo, hi) in ranges.items()})
    with tempfile.TemporaryDirectory() as tmp:
        cache, out = Path(tmp) / "ranges.json", Path(tmp) / "int8.onnx"
        save_tensors_data(data, cache)
        logging.disable(logging.WARNING)
        try:
            quantize_static(model, out, None, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                            calibration_cache_path=cache, nodes_to_exclude=list(exclude),
                            extra_options={"ActivationSymmetric": activations == "int8", "WeightSymmetric": True})
        finally:
            logging.disable(logging.NOTSET)
        return onnx.load(str(out))


def placement_models():
    """small_cnn, and modern CNNs as the TorchScript exporter writes them (BN folded, opset 13, as quantize
    places them): depthwise + squeeze-excite + hardswish, grouped residual, LayerNorm written out."""
    from test_matrix_modern import model_of

    from onnxbn.graph import opset_version
    from onnxbn.io.model import Model
    from onnxbn.quantization.prepare import fold_batchnorm, raise_opset
    from onnxbn.quantization.report import QuantizeReport

    yield "small_cnn", small_cnn(opset=13)
    for arch in ("mobilenetv3", "resnext", "convnext"):
        folded, _ = fold_batchnorm(Model(model_of(arch, "ts11")), QuantizeReport("minmax", True, "uint8", [], (11, 11)))
        model = folded.whole()
        yield arch, raise_opset(model, 13) if opset_version(model) < 13 else model


def same_placement(ours, judge, name=""):
    """Nodes (serialized), initializers (values and types), inputs, outputs and opsets are the same."""
    assert [n.SerializeToString() for n in ours.graph.node] == [n.SerializeToString() for n in judge.graph.node], name
    a = {t.name: numpy_helper.to_array(t) for t in ours.graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in judge.graph.initializer}
    assert a.keys() == b.keys(), name
    assert all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and np.array_equal(a[k], b[k]) for k in a), name
    assert (list(ours.graph.input), list(ours.graph.output)) == (list(judge.graph.input), list(judge.graph.output))
    assert list(ours.opset_import) == list(judge.opset_import)


def spied_fill(monkeypatch) -> list[bool]:
    """What each fill_weights call of place_qdq returned (False: it placed again with the real weights)."""
    import onnxbn.quantization.placement as placement

    calls, real = [], placement.fill_weights
    monkeypatch.setattr(placement, "fill_weights", lambda *a: calls.append(real(*a)) or calls[-1])
    return calls


@pytest.mark.parametrize("stub_elements", [8, 1024])
@pytest.mark.parametrize(("per_channel", "activations"), [(True, "uint8"), (False, "int8")])
def test_in_memory_placement_equals_quantize_static(per_channel, activations, stub_elements, monkeypatch):
    """place_qdq calls onnxruntime's QDQ quantizer in memory on stand-in weights and computes the weights'
    integers in numpy; quantize_static (files, reloads, its own integers) on the same ranges writes the same
    model: nodes, initializers (values and types), inputs, outputs, opsets. With 8, every weight and bias of
    these models is a stand-in (computed by fill_weights); with 1024 (the default) few are. The discovery with
    stand-in weights names the tensors the placement with the real ones reads."""
    import onnxbn.quantization.placement as placement
    from onnxbn.quantization.placement import UNREAD_RANGE, constant_ranges, place_qdq, quantized_tensors, read_ranges
    from onnxbn.ranges import activation_tensors

    monkeypatch.setattr(placement, "STUB_ELEMENTS", stub_elements)
    filled = spied_fill(monkeypatch)
    rng = np.random.default_rng(3)
    for name, model in placement_models():
        floats, fixed = activation_tensors(model), constant_ranges(model)
        ranges = {**fixed, **{t: (-float(rng.uniform(0, 2)), float(rng.uniform(0.1, 3))) for t in floats}}
        ours = place_qdq(model, ranges, per_channel=per_channel, activations=activations)
        assert filled[-1], name  # no second placement
        same_placement(ours, quantize_static_placement(model, ranges, per_channel, activations), name)
        placed = quantize_static_placement(model, {**fixed, **dict.fromkeys(floats, UNREAD_RANGE)}, per_channel,
                                           activations)
        stand_in = quantized_tensors(model, floats, fixed, per_channel=per_channel, activations=activations)
        assert stand_in == read_ranges(placed, floats, fixed), name
        assert 0 < len(stand_in) < len(floats), name


def edge_weights_model():
    """Weights that take onnxruntime's other branches: an all-zero output channel (scale 1), a channel of tiny
    weights under a large bias (its weight scale is raised so the int32 bias does not overflow), a
    ConvTranspose (channel axis 1), a Gemm with transB=0 (axis 1) and beta 0.5, a large float initializer added
    to an activation (quantized as an activation, asymmetric uint8), and an excluded Gemm (kept in float)."""
    n = Net(11)
    w = n.random((6, 3, 3, 3))
    w[0] = 0.0
    w[1] *= 1e-9
    b = np.array([0.3, 40.0, -0.2, 0.1, 0.0, -0.5], np.float32)
    y = n.node("Conv", ["input", n.init("c1.W", w), n.init("c1.b", b)], "c1", pads=[1] * 4, kernel_shape=[3, 3])
    y = n.node("Relu", [y], "r1")
    y = n.linear("ConvTranspose", y, (6, 4, 3, 3), "ct", bias=4, bias_scale=0.2, pads=[1] * 4, kernel_shape=[3, 3])
    y = n.node("Add", [y, n.weight("shift", (1, 4, 8, 8), 0.5)], "shifted")
    y = n.node("Flatten", [n.node("Relu", [y], "r2")], "flat")
    y = n.node("Gemm", [y, n.weight("fc.W", (256, 10)), n.weight("fc.b", (10,), 0.1)], "fc", beta=0.5)
    n.node("Gemm", [y, n.weight("head.W", (5, 10)), n.weight("head.b", (5,), 0.1)], "logits", name="head",
           transB=1)
    return n.model({"input": ["N", 3, 8, 8]}, {"logits": ["N", 5]}, 13)


@pytest.mark.parametrize(("per_channel", "activations"), [(True, "uint8"), (True, "int8"), (False, "uint8")])
def test_weight_integers_equal_onnxruntimes_on_its_edge_cases(per_channel, activations, monkeypatch):
    """fill_weights on onnxruntime's other branches (edge_weights_model, every initializer a stand-in) gives
    quantize_static's model; the zero channel's scale is 1 and the tiny channel's int32 bias fits (numpy)."""
    import onnxbn.quantization.placement as placement
    from onnxbn.quantization.placement import place_qdq
    from onnxbn.ranges import activation_tensors

    monkeypatch.setattr(placement, "STUB_ELEMENTS", 0)
    filled = spied_fill(monkeypatch)
    model = edge_weights_model()
    rng = np.random.default_rng(5)
    ranges = {t: (-float(rng.uniform(0, 2)), float(rng.uniform(0.1, 3))) for t in activation_tensors(model)}
    ours = place_qdq(model, ranges, per_channel=per_channel, activations=activations, exclude=["head"])
    assert filled == [True]
    same_placement(ours, quantize_static_placement(model, ranges, per_channel, activations, exclude=["head"]))
    inits = {t.name: numpy_helper.to_array(t) for t in ours.graph.initializer}
    assert inits["head.W"].dtype == np.float32  # the excluded Gemm's weight is back, in float
    np.testing.assert_array_equal(inits["head.W"], numpy_helper.to_array(
        next(t for t in model.graph.initializer if t.name == "head.W")))
    if per_channel:
        assert inits["c1.W_scale"][0] == 1.0 and not inits["c1.W_quantized"][0].any()
        bias = inits["c1.b_quantized"].astype(np.float64) * inits["c1.b_quantized_scale"].astype(np.float64)
        np.testing.assert_allclose(bias[1], 40.0, rtol=1e-6)  # not clipped at 2^31 steps
        assert abs(int(inits["c1.b_quantized"][1])) < 2 ** 31 - 1
        assert inits["ct.W_scale"].shape == (4,) and inits["fc.W_scale"].shape == (10,)


def test_weights_shared_by_two_layers_are_placed_by_onnxruntime(monkeypatch):
    """A weight and bias read by two Convs (onnxruntime copies the bias for the second): fill_weights declines
    and place_qdq places again with the real weights, which is quantize_static's model."""
    import onnxbn.quantization.placement as placement
    from onnxbn.quantization.placement import place_qdq
    from onnxbn.ranges import activation_tensors

    monkeypatch.setattr(placement, "STUB_ELEMENTS", 0)
    filled = spied_fill(monkeypatch)
    n = Net(12)
    w, b = n.weight("c.W", (3, 3, 3, 3)), n.weight("c.b", (3,), 0.1)
    y = n.node("Relu", [n.node("Conv", ["input", w, b], "c1", pads=[1] * 4, kernel_shape=[3, 3])], "r1")
    n.node("Conv", [y, w, b], "out", name="c2", pads=[1] * 4, kernel_shape=[3, 3])
    model = n.model({"input": ["N", 3, 8, 8]}, {"out": ["N", 3, 8, 8]}, 13)
    ranges = {t: (-1.0, 2.0) for t in activation_tensors(model)}
    ours = place_qdq(model, ranges)
    assert filled == [False]
    same_placement(ours, quantize_static_placement(model, ranges, True, "uint8"))


def test_float_constants_are_quantized_from_their_values():
    """A float Constant read by an op onnxruntime quantizes (a written-out LayerNorm's epsilon, here a Mul's
    factor) gets the range of its values: numpy's uint8 scale and zero point over [min(c, 0), max(c, 0)]."""
    n = Net(4)
    y = n.node("Relu", [n.conv("input", 3, 4, "conv1")], "r1")
    k = np.array([0.5, -0.25, 2.0, 1.0], np.float32).reshape(1, 4, 1, 1)
    y = n.node("Mul", [y, n.const("k", k)], "scaled")
    y = n.node("Flatten", [n.node("GlobalAveragePool", [y], "gap")], "flat")
    n.gemm(y, 4, 3, "fc", out="logits")
    model = n.model({"input": ["N", 3, 8, 8]}, {"logits": ["N", 3]}, 13)
    qdq, _ = quantize_with_report(model, inputs_for([3, 8, 8], 16), recover="none", device="cpu", verify=False)
    inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    lo, hi = min(float(k.min()), 0.0), max(float(k.max()), 0.0)
    np.testing.assert_allclose(inits["k_scale"], (hi - lo) / 255, rtol=1e-6)
    assert int(inits["k_zero_point"]) == round(-lo / ((hi - lo) / 255))


def test_nonnegative_tensors_hold_no_negative_value():
    """The tensors nonnegative_tensors names are those the graph makes >= 0 whatever the input; numpy checks
    each on data that drives every other tensor below 0."""
    from onnxbn.ranges import nonnegative_tensors

    n = Net(5)
    r = n.node("Relu", [n.conv("input", 3, 4, "conv1")], "r")
    c = n.conv("input", 3, 4, "conv2")
    zero, neg = n.const("zero", np.float32(0.0)), n.const("minus1", np.float32(-1.0))
    n.node("Clip", [c, zero], "clip0")
    n.node("Clip", [c, neg], "clip_neg")
    p = n.node("MaxPool", [r], "pool", kernel_shape=[2, 2], strides=[2, 2])
    n.node("Concat", [r, n.node("Sigmoid", [c], "sig")], "cat_pos", axis=1)
    n.node("Concat", [r, c], "cat_mixed", axis=1)
    n.node("Reshape", [p, n.const("shape", np.array([0, -1], np.int64))], "flat")
    n.node("Add", [r, r], "sum")  # >= 0, but not an op the analysis follows
    names = ["r", "clip0", "clip_neg", "pool", "sig", "cat_pos", "cat_mixed", "flat", "sum"]
    outs = dict.fromkeys(names)
    model = n.model({"input": ["N", 3, 8, 8]}, outs, 13, check=False)
    found = nonnegative_tensors(model)
    assert found & set(names) == {"r", "clip0", "pool", "sig", "cat_pos", "flat"}
    values = exposed(model, names + [c], inputs_for([3, 8, 8], 16, seed=2))
    assert all(values[name].min() >= 0 for name in found & set(names))
    assert values[c].min() < 0 and values["clip_neg"].min() < 0 and values["cat_mixed"].min() < 0


def test_min_left_unmeasured_on_nonnegative_tensors_changes_no_int8_model(monkeypatch):
    """quantize does not measure the min of tensors that cannot go below 0 (recorded 0, the bound a range
    takes anyway): the INT8 model is the one measuring every min gives, byte for byte; the ranges pass's
    max stays numpy's."""
    import onnxbn.quantization.api as api
    from onnxbn.ranges import nonnegative_tensors

    model, x = bn_cnn(seed=2), inputs_for([3, 8, 8], 24, seed=6)
    for method in ("minmax", "percentile"):
        skipped, _ = quantize_with_report(model, x, method=method, recover="none", device="cpu", verify=False)
        with monkeypatch.context() as m:
            m.setattr(api, "nonnegative_tensors", lambda _model: set())
            measured, _ = quantize_with_report(model, x, method=method, recover="none", device="cpu", verify=False)
        assert skipped.SerializeToString() == measured.SerializeToString(), method
    names = float_tensors(model)
    nonneg = nonnegative_tensors(model) & set(names)
    assert {"r1", "r2", "p1"} <= nonneg
    ranges = collect_ranges(model, x, batch_size=8, device="cpu", tensors=names, histograms=False, nonnegative=nonneg)
    values = exposed(model, names, x)
    for name in names:
        want_min = 0.0 if name in nonneg else values[name].min()
        assert (ranges.tensors[name].min, ranges.tensors[name].max) == (want_min, values[name].max()), name


@pytest.mark.parametrize(("recover", "opset"), [("none", 13), ("cle,bias", 13), ("none", 11)])
def test_a_model_file_is_quantized_as_its_proto_is(tmp_path, recover, opset):
    """quantize reads a model file as its structure (large weights stay in the file, inline or as external
    data; BN-folded ones become arrays): the INT8 model is the one the whole ModelProto gives, byte for byte,
    and the files are left as they were."""
    model, x = bn_cnn(seed=3, w=32, opset=opset), inputs_for([3, 8, 8], 16, seed=2)
    assert any(int(np.prod(t.dims)) > 1024 for t in model.graph.initializer)  # conv3: read from the file
    inline, external = tmp_path / "m.onnx", tmp_path / "ext" / "m.onnx"
    onnx.save(model, inline)
    external.parent.mkdir()
    onnx.save(onnx.load_from_string(model.SerializeToString()), external, save_as_external_data=True,
              location="m.data", size_threshold=0)  # (onnx.save moves the data of the proto it is given)
    files = {p: p.read_bytes() for p in (inline, external, external.with_name("m.data"))}
    want, _ = quantize_with_report(model, x, recover=recover, device="cpu", verify=False)
    for path in (inline, external):
        got, report = quantize_with_report(path, x, recover=recover, device="cpu", verify=True)
        assert got.SerializeToString() == want.SerializeToString(), path
        assert report.passed and report.check["samples"] == len(x)
    assert all(p.read_bytes() == data for p, data in files.items())


def test_a_range_the_discovery_missed_is_gathered_and_placed(monkeypatch):
    """Should the stand-in discovery ever miss a tensor the real placement reads, quantize gathers its range
    in a second pass and places again: the same model as when the discovery names it."""
    import onnxbn.quantization.api as api
    from onnxbn.quantization.placement import quantized_tensors

    model, x = bn_cnn(seed=1), inputs_for([3, 8, 8], 16, seed=4)
    want, _ = quantize_with_report(model, x, recover="none", device="cpu", verify=False)
    monkeypatch.setattr(api, "quantized_tensors", lambda *a, **k: quantized_tensors(*a, **k)[1:])
    got, _ = quantize_with_report(model, x, recover="none", device="cpu", verify=False)
    assert got.SerializeToString() == want.SerializeToString()


# ----------------------------------------------------------------------------- recovery

def mean_errors(qdq, model, x, convs):
    """Per conv: max over channels |mean(y_q - y_float)| / max |y_float|, judged on exposed tensors."""
    q_out = {n.name: n.output[0] for n in qdq.graph.node if n.name in convs}
    qv = exposed(qdq, list(q_out.values()), x)
    fv = exposed(model, [CONV_TO_BN[c] for c in convs], x)
    out = {}
    for c in convs:
        err = qv[q_out[c]].astype(np.float64) - fv[CONV_TO_BN[c]]
        out[c] = np.abs(err.mean(axis=(0, 2, 3))).max() / np.abs(fv[CONV_TO_BN[c]]).max()
    return out


def test_bias_correction_zeroes_the_mean_error_per_channel():
    model, x = bn_cnn(), inputs_for([3, 8, 8], 64, seed=6)
    plain, _ = quantize_with_report(model, x, recover="none", device="cpu")
    fixed, report = quantize_with_report(model, x, recover="bias", device="cpu")
    assert report.bn_folded == ["bn1", "bn2", "bn3"] and report.passes == 4  # 4 levels (float means: the ranges pass)
    before, after = mean_errors(plain, model, x, CONV_TO_BN), mean_errors(fixed, model, x, CONV_TO_BN)
    assert max(before.values()) > 1e-3  # the judge can see the error bias correction removes
    assert max(after.values()) < 1e-4, after


def test_bn_reestimation_gives_each_channel_the_bn_mean():
    model, x = bn_cnn(), inputs_for([3, 8, 8], 64, seed=6)
    qdq, _ = quantize_with_report(model, x, recover="bn", device="cpu", min_cosine=0, min_top1=0)
    beta = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    dq = {o: n for n in qdq.graph.node for o in n.output}
    convs = {n.name: n for n in qdq.graph.node if n.name in CONV_TO_BN}
    values = exposed(qdq, [c.output[0] for c in convs.values()], x)
    for name, conv in convs.items():
        v = values[conv.output[0]].astype(np.float64)
        b = beta[CONV_TO_BN[name].replace(".out", ".B")]
        step = inits[dq[conv.input[2]].input[1]]  # the int32 bias's scale: its rounding is the floor of the error
        assert np.all(np.abs(v.mean(axis=(0, 2, 3)) - b) <= 0.5 * step + 1e-5 * np.abs(v).max()), name


def test_quantized_cnn_agrees_with_float_on_held_out_data():
    """The seeded BN CNN, calibrated on 128 samples: top-1 agreement >= 0.95, cosine >= 0.999 on 512 others."""
    model = bn_cnn(w=16)
    x, held_out = inputs_for([3, 8, 8], 128, seed=7), inputs_for([3, 8, 8], 512, seed=8)
    qdq, report = quantize_with_report(model, x, verify_data=held_out, device="cpu")
    check = report.check["outputs"]["logits"]
    assert report.passed and report.check["samples"] == 512
    assert check["top1_agreement"] >= 0.95 and check["cosine_similarity"] >= 0.999
    a, b = (np.asarray(session(m).run(None, {"input": held_out})[0]) for m in (model, qdq))
    assert np.mean(a.argmax(1) == b.argmax(1)) == check["top1_agreement"]  # the report says what numpy sees
    ops = {n.op_type for n in qdq.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and "BatchNormalization" not in ops


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
def test_methods_clip_within_min_max(method):
    model, x = small_cnn(), inputs_for([3, 8, 8], 32, seed=9)
    ranges = collect_ranges(model, x, device="cpu")
    from onnxbn.ranges import tensor_range

    for name, r in ranges.tensors.items():
        lo, hi = tensor_range(r, method)
        assert min(r.min, 0) <= lo <= 0 <= hi <= max(r.max, 0), (name, method)
    r1 = ranges.tensors["r1"]  # ReLU output: all mass at 0 and above; percentile keeps at least 99.99%
    lo, hi = tensor_range(r1, "percentile", 90.0)
    assert lo == 0 and 0 < hi < r1.max


def test_percentile_and_mse_against_numpy_on_the_values():
    model, x = small_cnn(), inputs_for([3, 8, 8], 64, seed=11)
    ranges = collect_ranges(model, x, device="cpu")
    values = exposed(model, ["c1", "r1", "g1"], x)
    from onnxbn.ranges import mse_range, percentile_range

    for name in ("c1", "g1"):
        r, v = ranges.tensors[name], values[name].astype(np.float64).reshape(-1)
        lo, hi = percentile_range(r, 99.0)
        s = np.sort(v)
        # hi: the upper edge of the bin of the ceil(0.99 n)-th smallest value; lo: the lower edge of the bin of
        # the ceil(0.01 n)-th
        k_hi, k_lo = int(np.ceil(0.99 * v.size)), int(np.ceil(0.01 * v.size))
        assert s[k_hi - 1] < hi <= s[k_hi - 1] + r.width
        assert lo <= s[k_lo - 1] < lo + r.width
    r, v = ranges.tensors["r1"], values["r1"].astype(np.float64).reshape(-1)
    _, t = mse_range(r)

    def mse(t):  # the real quantization error of the values at threshold t (255 steps over [0, t])
        step = t / 255
        return np.mean((np.clip(np.round(v / step), 0, 255) * step - v) ** 2)

    best = min(mse(c) for c in np.linspace(0.05, 1.0, 200) * v.max())
    assert mse(t) <= 1.05 * best


def test_entropy_threshold_ignores_rare_outliers():
    from onnxbn.ranges import TensorRange, entropy_range

    rng = np.random.default_rng(12)
    v = np.concatenate([np.abs(rng.standard_normal(200_000)), [40.0, 45.0]])  # ReLU-like, two far outliers
    exp = int(np.floor(np.log2(v.max()))) + 2
    r = TensorRange()
    r.merge(v.size, v.min(), v.max(), exp, numpy_hist(v, exp))
    lo, hi = entropy_range(r)
    assert lo == v.min() and np.quantile(v, 0.999) < hi < 10
    from onnxbn.ranges import mse_range

    _, t = mse_range(r)

    def mse(t):
        step = t / 255
        return np.mean((np.clip(np.round(v / step), 0, 255) * step - v) ** 2)

    # with two outliers in 200k values the squared error prefers keeping them: mse follows the real error
    assert mse(t) <= 1.05 * min(mse(c) for c in np.linspace(0.02, 1.0, 300) * v.max())


def test_cross_layer_equalization_keeps_the_function_and_balances_ranges():
    from onnxbn.fold import fold_bn
    from onnxbn.quantization import equalize

    model, x = fold_bn(bn_cnn(w=8)), inputs_for([3, 8, 8], 16, seed=15)
    before = np.asarray(session(model).run(None, {"input": x})[0])
    scales = equalize(model)
    assert set(scales) == {"conv1", "conv2"}  # conv1 -> relu -> depthwise conv2; conv2 -> relu -> pool -> conv3
    after = np.asarray(session(model).run(None, {"input": x})[0])
    np.testing.assert_allclose(after, before, atol=1e-5 * np.abs(before).max())
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    conv = {n.name: n for n in model.graph.node}
    w1, w2, w3 = (w[conv[c].input[1]] for c in ("conv1", "conv2", "conv3"))
    r = lambda a: np.abs(a).reshape(len(a), -1).max(axis=1)  # noqa: E731 - per first-axis channel
    np.testing.assert_allclose(r(w2), r(w3.transpose(1, 0, 2, 3)), rtol=1e-6)  # the last pair, balanced last
    np.testing.assert_allclose(r(w1), r(w2), rtol=1e-2)  # the first pair, balanced up to the later sweeps' drift


# ----------------------------------------------------------------------------- command line

@pytest.fixture
def files(tmp_path):
    onnx.save(small_cnn(opset=11), str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "cal.npz", x=inputs_for([3, 8, 8], 48, seed=10))
    return tmp_path


def test_cli_quantize_stats_ranges_and_merge(files, cli):
    m, cal = files / "m.onnx", files / "cal.npz"
    for i in range(2):
        assert cli("stats", m, "--data", cal, "--ranges", "--shard", f"{i}/2", "-o", files / f"r{i}.npz")[0] == 0
    assert not list(files.glob("*.checkpoint.npz"))  # removed on success
    assert cli("merge", files / "r0.npz", files / "r1.npz", "-o", files / "r.npz")[0] == 0
    one = collect_ranges(str(m), str(cal), device="cpu")
    merged = load_ranges(files / "r.npz")
    assert all(np.array_equal(merged.tensors[k].hist, v.hist) for k, v in one.tensors.items())
    code, _, err = cli("quantize", m, "--data", cal, "--ranges", files / "r.npz", "-o", files / "q.onnx")
    assert code == 2 and "--recover cle" in err and not (files / "q.onnx").exists()  # the default recovery has cle
    code, out, _ = cli("quantize", m, "--data", cal, "--ranges", files / "r.npz", "--recover", "bias",
                       "-o", files / "q.onnx")
    assert code == 0 and "PASS" in out
    q = onnx.load(str(files / "q.onnx"))
    assert max(o.version for o in q.opset_import if o.domain in ("", "ai.onnx")) == 13  # raised from 11
    assert np.asarray(session(q).run(None, {"input": inputs_for([3, 8, 8], 2)})[0]).shape == (2, 10)


def int_model():
    x = helper.make_tensor_value_info("x", TensorProto.INT64, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, ["N", 4])
    node = helper.make_node("Add", ["x", "x"], ["y"], name="add")
    return helper.make_model(helper.make_graph([node], "g", [x], [y]), opset_imports=[helper.make_opsetid("", 13)],
                             ir_version=8)


def softmax_model():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    node = helper.make_node("Softmax", ["x"], ["y"], name="softmax")
    return helper.make_model(helper.make_graph([node], "g", [x], [y]), opset_imports=[helper.make_opsetid("", 13)],
                             ir_version=8)


@pytest.mark.parametrize("case", ["quantized", "no-float", "nothing-to-quantize", "exclude", "recover", "opset"])
def test_cli_refusals_exit_2_one_line_nothing_written(files, cli, monkeypatch, case):
    cal = files / "cal.npz"
    model, extra = files / "m.onnx", []
    if case == "quantized":
        qdq, _ = quantize_with_report(small_cnn(), inputs_for([3, 8, 8], 8), recover="none", device="cpu")
        onnx.save(qdq, str(files / "q.onnx"))
        model = files / "q.onnx"
    elif case == "no-float":
        onnx.save(int_model(), str(files / "i.onnx"))
        model = files / "i.onnx"
    elif case == "nothing-to-quantize":
        onnx.save(softmax_model(), str(files / "s.onnx"))
        np.savez(cal, x=inputs_for([4], 8))
        model = files / "s.onnx"
    elif case == "exclude":
        extra = ["--exclude", "conv1,nope"]
    elif case == "opset":  # m.onnx is opset 11: per-channel Q/DQ needs 13, and the conversion fails
        from onnx import version_converter

        def fail(*_):
            raise RuntimeError("no adapter")
        monkeypatch.setattr(version_converter, "convert_version", fail)
    else:
        extra = ["--recover", "bias,dfq"]
    code, out, err = cli("quantize", model, "--data", cal, *extra, "-o", files / "out.onnx")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("onnxbn: error: ")
    assert not (files / "out.onnx").exists()


@pytest.mark.parametrize("opset", [11, 13, 18, 22])
@pytest.mark.parametrize("histograms", [False, True])
def test_ranges_of_every_rank_and_type_equal_numpy_across_batches(opset, histograms):
    """min/max leave the runtime per sample for ranks >= 2 (Reduce* axes as attribute before opset 18, as input
    from 18) and as one value below: on tensors of ranks 0-5, float32 and float16, batch/H/W dynamic, over
    batches of 3 (the last short), min/max/count equal numpy's over each batch's values, batch by batch."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])
    shape = {"r5": [0, 0, 1, 0, -1], "r4": [0, 3, 1, -1], "r1": [-1]}
    nodes = [helper.make_node("Reshape", ["x", f"{k}_shape"], [k], name=k) for k in shape]
    nodes += [helper.make_node("Flatten", ["x"], ["r2"], name="r2", axis=1),
              helper.make_node("ReduceMax", ["x"], ["r0"], name="r0", keepdims=0),
              helper.make_node("Cast", ["x"], ["h4"], name="h4", to=TensorProto.FLOAT16)]
    inits = [numpy_helper.from_array(np.array(v, np.int64), f"{k}_shape") for k, v in shape.items()]
    names = ["x", "r5", "r4", "r2", "r1", "r0", "h4"]
    outputs = [helper.make_empty_tensor_value_info(n) for n in names[1:]]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], outputs, inits),
                              opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    data = np.random.default_rng(21).standard_normal((10, 3, 5, 7)).astype(np.float32) * 3
    ranges = collect_ranges(model, data, batch_size=3, device="cpu", tensors=names, histograms=histograms)
    probe = session(oracles.expose(model, names))
    per_batch = [probe.run(names, {"x": data[i:i + 3]}) for i in range(0, len(data), 3)]
    for k, name in enumerate(names):
        r = ranges.tensors[name]
        values = [np.asarray(b[k]) for b in per_batch]
        assert r.min == min(v.min() for v in values) and r.max == max(v.max() for v in values), name
        assert r.count == sum(v.size for v in values), name


def test_staged_recovery_equals_recovery_from_the_data_each_level(monkeypatch):
    """Bias correction runs its levels from the activations kept on disk between passes (the integer tensors
    before each DequantizeLinear); with no room to keep them, every level's pass runs from the data: the same
    INT8 model, byte for byte, and the kept activations' files are gone afterwards."""
    import tempfile
    from pathlib import Path

    import onnxbn.quantization.recovery as recovery
    from onnxbn.recalibration import exact

    model, x = bn_cnn(seed=3), inputs_for([3, 8, 8], 40, seed=8)
    kept = []
    add = exact._Cut.add
    monkeypatch.setattr(exact._Cut, "add", lambda cut, values, n: (kept.append(values), add(cut, values, n))[1])
    folders = []
    real = tempfile.TemporaryDirectory

    def recorded(*args, **kwargs):
        folder = real(*args, **kwargs)
        folders.append(Path(folder.name))
        return folder
    monkeypatch.setattr(tempfile, "TemporaryDirectory", recorded)
    staged, report = quantize_with_report(model, x, recover="bias", batch_size=16, device="cpu", verify=False)
    assert report.passes == max(entry["level"] for entry in report.layers) > 2  # one pass per level
    assert folders and not any(f.exists() for f in folders)
    assert kept and all(v.dtype == np.uint8 for values in kept for v in values.values())  # quantized activations
    kept.clear()
    monkeypatch.setattr(recovery, "CACHE_MB", 0.0)
    fresh, _ = quantize_with_report(model, x, recover="bias", batch_size=16, device="cpu", verify=False)
    assert not kept and staged.SerializeToString() == fresh.SerializeToString()
