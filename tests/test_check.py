"""onnxbn.check: --random inputs within a memory budget, tolerances by the model's float type,
non-numeric outputs compared exactly."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxbn
import onnxbn.check.inputs
from models import Net, ort_outputs, small_net
from onnxbn.check.inputs import RANDOM_BATCH_BYTES, random_inputs
from onnxbn.cli import main


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
    monkeypatch.setattr(onnxbn.check.inputs, "RANDOM_BATCH_BYTES", 5 * sample)
    model = small_net(13)
    dataset, batch = random_inputs(model, 12, batch_size=32)
    assert batch == 5
    assert [len(x) for x, _ in dataset.batches(batch)] == [5, 5, 2]
    report = onnxbn.compare(model, model, random=12, atol=0, rtol=0)
    assert report.passed and report.samples == 12 and report.inputs == "random N(0,1), seed 0"


def test_random_refuses_a_fixed_batch_over_the_budget(monkeypatch):
    monkeypatch.setattr(onnxbn.check.inputs, "RANDOM_BATCH_BYTES", 3 * 3 * 8 * 8 * 4)
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


# ----------------------------------------------------------------------------- float16 / bfloat16 tolerances

F16_WHY = "the model computes in f16: a change to it moves the outputs by f16 rounding"


def test_float16_insert_check_and_fold_use_the_f16_default(tmp_path, capsys):
    """The identity BN rounds at float16: the check passes at f16's default tolerance and says why;
    the same check at float32's 1e-5 fails, as it did when that was the default."""
    model, bn, folded = tmp_path / "m.onnx", tmp_path / "bn.onnx", tmp_path / "deploy.onnx"
    onnx.save(small_net(13, dtype=np.float16), str(model))
    x = np.random.default_rng(1).standard_normal((16, 3, 8, 8)).astype(np.float16)
    np.savez(tmp_path / "x.npz", x=x)
    assert run(capsys, "stats", model, "--data", tmp_path / "x.npz", "--after", "relu",
               "-o", tmp_path / "s.npz")[0] == 0
    assert run(capsys, "insert", model, "--stats", tmp_path / "s.npz", "-o", bn)[0] == 0
    code, out, _ = run(capsys, "check", model, bn, "--data", tmp_path / "x.npz", "--report", tmp_path / "r.json")
    report = json.loads((tmp_path / "r.json").read_text())
    assert code == 0 and report["passed"] and "(default for f16)" in out
    assert (report["tolerance"], report["atol"], report["rtol"], report["scaled_atol"]) == ("f16", 1e-5, 4e-3, 4e-3)
    assert report["tolerance_reason"] == F16_WHY
    a, b = ort_outputs(onnx.load(str(model)), x)[0], ort_outputs(onnx.load(str(bn)), x)[0]
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    assert report["outputs"]["logits"]["max_abs_error"] == diff.max() > 1e-4  # float16 rounding, not 1e-5
    code, _, _ = run(capsys, "check", model, bn, "--data", tmp_path / "x.npz", "--atol", "1e-5", "--rtol", "1e-5",
                     "--report", tmp_path / "r32.json")
    report = json.loads((tmp_path / "r32.json").read_text())
    assert code == 1 and report["tolerance"] == "given" and report["tolerance_reason"] == "atol and rtol given"
    assert report["outputs"]["logits"]["violations"] == int((diff > 1e-5 + 1e-5 * np.abs(a.astype(np.float64))).sum())

    code, out, _ = run(capsys, "fold", bn, "--data", tmp_path / "x.npz", "--json", "-o", folded)
    check = json.loads(out)["check"]
    assert code == 0 and folded.exists() and check["passed"]
    assert (check["tolerance"], check["rtol"], check["tolerance_reason"]) == ("f16", 4e-3, F16_WHY)
    folded.unlink()
    code, _, err = run(capsys, "fold", bn, "--data", tmp_path / "x.npz", "--atol", "1e-5", "--rtol", "1e-5",
                       "-o", folded)
    assert code == 1 and "nothing written" in err and not folded.exists()


def test_one_tolerance_given_takes_the_other_from_the_model_type():
    model = small_net(13, dtype=np.float16)
    x = np.random.default_rng(2).standard_normal((4, 3, 8, 8)).astype(np.float16)
    report = onnxbn.compare(model, model, data=x, atol=1e-3)
    d = report.to_dict()
    assert (d["atol"], d["rtol"], d["scaled_atol"], d["tolerance"]) == (1e-3, 4e-3, 0.0, "given")
    assert d["tolerance_reason"] == f"atol given; rtol the f16 default ({F16_WHY})"
    d = onnxbn.compare(small_net(13), small_net(13), random=4).to_dict()
    assert (d["atol"], d["rtol"], d["tolerance"]) == (1e-5, 1e-5, "f32")
    assert d["tolerance_reason"] == "both sides run the same arithmetic at full precision"


def _typed_model(inputs: int, outputs: int, weights: dict[int, int]) -> onnx.ModelProto:
    """x -> Identity -> y with these element types, and initializers of `weights` {type: elements}
    (unused: only their types count)."""
    inits = [helper.make_tensor(f"w{i}", t, [n], np.zeros(n).tolist() if t != TensorProto.BFLOAT16 else [0] * n)
             for i, (t, n) in enumerate(weights.items())]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", inputs, ["N", 4])],
                              [helper.make_tensor_value_info("y", outputs, ["N", 4])], initializer=inits)
    return helper.make_model(graph)


@pytest.mark.parametrize("inputs, outputs, weights, expected", [
    (TensorProto.FLOAT, TensorProto.FLOAT, {TensorProto.FLOAT: 10}, "f32"),
    (TensorProto.DOUBLE, TensorProto.DOUBLE, {}, "f64"),
    (TensorProto.FLOAT16, TensorProto.FLOAT, {TensorProto.FLOAT: 10}, "f16"),       # f16 input, f32 layers
    (TensorProto.FLOAT, TensorProto.FLOAT, {TensorProto.FLOAT16: 10, TensorProto.FLOAT: 3}, "f16"),  # f16 layers
    (TensorProto.FLOAT, TensorProto.FLOAT, {TensorProto.FLOAT16: 3, TensorProto.FLOAT: 10}, "f32"),
    (TensorProto.INT64, TensorProto.INT64, {TensorProto.BFLOAT16: 10}, "bf16"),     # token ids into bf16 weights
    (TensorProto.INT64, TensorProto.STRING, {}, "f32"),
])
def test_model_precision_is_the_lowest_float_type_of_io_and_weights(inputs, outputs, weights, expected):
    from onnxbn.runtimes.precision import RuntimeInfo, default_tolerance, model_precision, tolerance_choice

    model = _typed_model(inputs, outputs, weights)
    assert model_precision(model) == expected
    side = RuntimeInfo("onnxruntime", "1", "cpu", expected, "default", expected)
    precision, _ = tolerance_choice(side, side)
    assert precision == {"f64": "f32"}.get(expected, expected)
    assert default_tolerance(side, side) == {"f16": (1e-5, 4e-3, 4e-3), "bf16": (1e-5, 3e-2, 3e-2)}.get(
        expected, (1e-5, 1e-5, 0.0))


# ----------------------------------------------------------------------------- non-numeric outputs

def labelled_net(pick: str = "ArgMax") -> onnx.ModelProto:
    """Conv-BN-Relu-pool-Gemm -> logits (float, 3 classes), and label = Cast(pick(logits), STRING):
    a float output beside a string one."""
    n = Net(4)
    y = n.node("Relu", [n.bn(n.conv("x", 3, 4, "conv"), 4, "bn")], "relu")
    n.gemm(n.node("Flatten", [n.node("GlobalAveragePool", [y], "pool")], "flat"), 4, 3, "fc", out="logits")
    model = n.model({"x": ["N", 3, 8, 8]}, {"logits": ["N", 3]}, 13, check=False)
    model.graph.node.append(helper.make_node(pick, ["logits"], ["class"], name="pick", axis=1, keepdims=0))
    model.graph.node.append(helper.make_node("Cast", ["class"], ["label"], name="label", to=TensorProto.STRING))
    model.graph.output.append(helper.make_tensor_value_info("label", TensorProto.STRING, ["N"]))
    onnx.checker.check_model(model, full_check=True)
    return model


def test_string_outputs_are_compared_exactly_by_check_and_fold(tmp_path, capsys):
    reference, other, deploy = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "deploy.onnx"
    onnx.save(labelled_net(), str(reference))
    onnx.save(labelled_net("ArgMin"), str(other))
    x = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    logits = ort_outputs(labelled_net(), x)[0]
    labels = logits.argmax(1).astype(str)
    assert (ort_outputs(labelled_net(), x)[1] == labels).all()

    code, out, _ = run(capsys, "check", reference, reference, "--random", "16", "--report", tmp_path / "same.json")
    label = json.loads((tmp_path / "same.json").read_text())["outputs"]["label"]
    assert code == 0 and label == {"passed": True, "elements": 16, "violations": 0, "comparison": "exact",
                                   "first_mismatch": None}
    assert out.splitlines()[3].split() == ["label", "-", "-", "-", "-", "-", "-", "PASS", "exact"]

    np.savez(tmp_path / "x.npz", x=x)
    code, out, _ = run(capsys, "check", reference, other, "--data", tmp_path / "x.npz", "--report", tmp_path / "r.json")
    report = json.loads((tmp_path / "r.json").read_text())
    differ = labels != logits.argmin(1).astype(str)
    first = int(np.flatnonzero(differ)[0])
    assert code == 1 and report["outputs"]["logits"]["passed"] and report["outputs"]["logits"]["max_abs_error"] == 0
    assert report["outputs"]["label"] == {
        "passed": False, "elements": 16, "violations": int(differ.sum()), "comparison": "exact",
        "first_mismatch": {"sample": first, "index": [], "reference": labels[first],
                           "candidate": str(logits.argmin(1)[first])}}

    code, out, _ = run(capsys, "fold", reference, "--random", "16", "--json", "-o", deploy)
    result = json.loads(out)
    assert code == 0 and deploy.exists() and result["decisions"][0]["action"] == "folded"
    assert result["check"]["outputs"]["label"]["violations"] == 0
    assert (ort_outputs(onnx.load(str(deploy)), x)[1] == labels).all()
