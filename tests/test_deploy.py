"""fold_verified through the Python API: the written model computes what the input does (onnxruntime
on both files, compared in numpy), a fold that changes the outputs writes nothing and its reported
error is numpy's on the same seeded inputs, bad input is a UserError before anything is written.
Relative error is max|a - b| / max|a| over the whole output."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from oracles import ort_outputs, rel_error

from models import BN_WIDE, Net, bn_count, inputs_for
from onnxbn.deploy import fold_verified
from onnxbn.errors import UserError
from onnxbn.io.model import Model


def bn_net(seed: int = 3) -> onnx.ModelProto:
    """Conv+BN+Relu, GlobalAveragePool, Flatten, Gemm: the BN folds backward into the Conv."""
    n = Net(seed, bn=BN_WIDE)
    y = n.node("Relu", [n.bn(n.conv("input", 3, 6, "conv"), 6, "bn")], "relu")
    n.gemm(n.node("Flatten", [n.node("GlobalAveragePool", [y], "gap")], "flat"), 6, 4, "fc", out="logits")
    return n.model({"input": ["N", 3, 8, 8]}, {"logits": ["N", 4]}, 13)


@pytest.fixture
def bn_file(tmp_path):
    path = tmp_path / "bn.onnx"
    onnx.save(bn_net(), str(path))
    return path


def test_fold_verified_writes_a_model_that_computes_the_same(bn_file, tmp_path):
    x = inputs_for([3, 8, 8], 6, seed=2)
    np.savez(tmp_path / "x.npz", x=x)
    result = fold_verified(bn_file, tmp_path / "deploy.onnx", data=tmp_path / "x.npz", batch_size=4)
    assert result.written and result.passed and result.failed == [] and result.verify_on == {}
    assert [(d["bn"], d["action"], d["direction"]) for d in result.decisions] == [("bn", "folded", "backward")]
    deploy = onnx.load(str(tmp_path / "deploy.onnx"))
    assert bn_count(deploy) == 0 and bn_count(onnx.load(str(bn_file))) == 1
    want, got = ort_outputs(onnx.load(str(bn_file)), x)[0], ort_outputs(deploy, x)[0]
    assert rel_error(want, got) <= 1e-5
    assert result.check.samples == 6 and result.check.outputs["logits"].violations == 0
    assert set(result.to_dict()) == {"decisions", "check"} and result.to_dict()["check"]["passed"]


def test_fold_verified_writes_nothing_when_the_fold_changes_the_outputs(bn_file, tmp_path, skewed_fold):
    import onnxbn.fold

    real = onnxbn.fold.fold
    skewed_fold("fc.W")
    result = fold_verified(bn_file, tmp_path / "deploy.onnx", random=5, seed=4)
    assert not result.written and result.failed == ["onnxruntime"]
    assert list(tmp_path.iterdir()) == [bn_file]  # no output, no staged file left behind
    # the same seeded inputs compare makes (one standard-normal stream), through both models in numpy terms
    x = np.random.default_rng(4).standard_normal((5, 3, 8, 8)).astype(np.float32)
    ref = onnx.load(str(bn_file))
    want = ort_outputs(ref, x)[0].astype(np.float64)
    bad = onnx.load(str(bn_file))
    folded, _ = real(Model.open(bad))
    folded.set_array("fc.W", (folded.array("fc.W") * 1.01).astype(np.float32))
    got = ort_outputs(folded.to_proto(), x)[0].astype(np.float64)
    assert result.check.outputs["logits"].max_abs_error == pytest.approx(float(np.abs(want - got).max()), rel=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    ({"output": "same"}, "is also an input"),
    ({"precision": "bf16"}, "--precision bf16 applies to --verify-on openvino; onnxruntime alone"),
    ({"verify_on": ["nosuch"]}, "unknown runtime 'nosuch'"),
])
def test_fold_verified_refuses_bad_input_before_any_work(bn_file, tmp_path, kwargs, message):
    output = bn_file if kwargs.pop("output", None) else tmp_path / "deploy.onnx"
    before = bn_file.read_bytes()
    with pytest.raises(UserError, match=message):
        fold_verified(bn_file, output, random=2, **kwargs)
    assert list(tmp_path.iterdir()) == [bn_file] and bn_file.read_bytes() == before
