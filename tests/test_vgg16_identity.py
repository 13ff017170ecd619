"""Full-size VGG16 (random torchvision-style weights): stats -> insert -> check is an identity."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from oracles import exposed, moments

import onnxbn
import onnxbn.fold
import onnxbn.io.model
from onnxbn.cli import main
from onnxbn.feeding import open_model_data
from onnxbn.io.copies import metadata

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vgg_model(vgg16):
    return onnx.load(str(vgg16))


@pytest.fixture(scope="module")
def vgg_inputs(vgg_model, vgg16_images):
    """The 16 generated images, preprocessed once (the imagenet preset from the metadata)."""
    data = open_model_data(vgg_model, vgg16_images)
    return np.concatenate([x for x, _ in data.batches(16)])


def test_export_metadata_and_shape(vgg_model):
    meta = metadata(vgg_model)
    assert meta["onnxbn.weights"] == "random"
    assert meta["onnxbn.preset"] == "imagenet"
    assert meta["onnxbn.arch"] == "vgg16"
    batch_dim = vgg_model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param == "batch"
    ops = [n.op_type for n in vgg_model.graph.node]
    assert ops.count("Conv") == 13 and ops.count("Gemm") == 3 and "Identity" not in ops
    # every layer owns its parameters (the exporter's shared zero bias is split up)
    weights = [i for n in vgg_model.graph.node if n.op_type in ("Conv", "Gemm") for i in n.input[1:]]
    assert len(weights) == len(set(weights)) == 32


@pytest.mark.parametrize("selector,count", [("dense", 2), ("linear", 15), ("relu", 15)])
def test_identity_insert_is_exact(vgg_model, vgg_inputs, selector, count):
    stats = onnxbn.collect_stats(vgg_model, vgg_inputs, after=selector, batch_size=8)
    assert len(stats.tensors) == count and stats.meta["samples"] == 16
    bn_model = onnxbn.insert_bn(vgg_model, stats)
    onnx.checker.check_model(bn_model)
    onnx.shape_inference.infer_shapes(bn_model, strict_mode=True)
    assert [o.name for o in bn_model.graph.output] == ["logits"]
    assert sum(n.op_type == "BatchNormalization" for n in bn_model.graph.node) == count

    report = onnxbn.compare(vgg_model, bn_model, vgg_inputs, batch_size=8)
    logits = report.to_dict()["outputs"]["logits"]
    assert report.passed
    assert logits["max_rel_error"] <= 1e-6
    assert logits["top1_agreement"] == 1.0 and logits["top5_agreement"] == 1.0
    assert logits["cosine_similarity"] > 1 - 1e-9

    # The BN parameters are numpy's statistics of the exposed tensors on the same inputs.
    values = exposed(vgg_model, stats.tensors, vgg_inputs)
    inits = {t.name: numpy_helper.to_array(t) for t in bn_model.graph.initializer}
    bn_nodes = {n.output[0]: n for n in bn_model.graph.node if n.op_type == "BatchNormalization"}
    for name, value in zip(stats.tensors, values, strict=True):
        mu, var = moments(value)
        node = bn_nodes[name]
        scale, bias, mean, bn_var = (inits[i].astype(np.float64) for i in node.input[1:])
        np.testing.assert_allclose(mean, mu, rtol=1e-5, atol=1e-5 * np.abs(mu).max())
        np.testing.assert_allclose(bn_var, var, rtol=1e-5, atol=1e-5 * var.max())
        np.testing.assert_allclose(bias, mu, rtol=1e-5, atol=1e-5 * np.abs(mu).max())
        np.testing.assert_allclose(scale, np.sqrt(var + 1e-5), rtol=1e-5)
    record = json.loads(metadata(bn_model)["onnxbn.insert"])
    assert record["bn_inserted"] == count and record["selector"] == selector

    # fold for deployment: everything folds for dense/linear; for relu the BN before a
    # padded Conv or a MaxPool stay, with the reason
    folded_model, fold_report = onnxbn.fold.fold(onnxbn.io.model.Model.open(bn_model))
    folded, decisions = folded_model.to_proto(), fold_report.decisions
    kept = [d for d in decisions if d["action"] == "kept"]
    remaining = sum(n.op_type == "BatchNormalization" for n in folded.graph.node)
    if selector == "relu":
        assert len(kept) == 13 and remaining == 13
        assert all("pad" in d["reason"] or "MaxPool" in d["reason"] for d in kept)
    else:
        assert kept == [] and remaining == 0
        assert abs(folded.ByteSize() - vgg_model.ByteSize()) < 4096  # same weights, a little metadata
    fold_report = onnxbn.compare(bn_model, folded, vgg_inputs[:8], batch_size=8)
    assert fold_report.passed and fold_report.to_dict()["outputs"]["logits"]["max_rel_error"] <= 1e-5


def test_notebook_mistake_is_caught(vgg_model, vgg_inputs, tmp_path):
    """The 2017 notebook set BN's gamma to the variance instead of sqrt(var + eps)."""
    stats = onnxbn.collect_stats(vgg_model, vgg_inputs, after="dense", batch_size=16)
    wrong = onnxbn.insert_bn(vgg_model, stats)
    inits = {t.name: t for t in wrong.graph.initializer}
    for node in wrong.graph.node:
        if node.op_type == "BatchNormalization":
            var = numpy_helper.to_array(inits[node.input[4]])
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(var, node.input[1]))
    ref_path, wrong_path, report_path = tmp_path / "ref.onnx", tmp_path / "wrong.onnx", tmp_path / "report.json"
    onnx.save(vgg_model, str(ref_path))
    onnx.save(wrong, str(wrong_path))
    np.savez(tmp_path / "x.npz", x=vgg_inputs)
    code = main(["check", str(ref_path), str(wrong_path), "--data", str(tmp_path / "x.npz"),
                 "--report", str(report_path), "--layerwise", "--batch-size", "8"])
    assert code == 1
    report = json.loads(report_path.read_text())
    logits = report["outputs"]["logits"]
    assert report["passed"] is False and logits["passed"] is False
    assert logits["max_rel_error"] > 1e-2 and logits["violations"] > 0
    # --layerwise names the first wrong BN output (it keeps the original tensor name)
    assert report["layerwise"]["first_divergence"]["tensor"] == stats.tensors[0]
