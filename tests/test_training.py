"""Fine-tuning on cached features, write-back, evaluation."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import small_cnn
from onnx import TensorProto, helper, numpy_helper
from oracles import exposed

import onnxbn
from onnxbn.cli import main
from onnxbn.errors import UserError
from onnxbn.runtimes.ort_backend import make_session
from onnxbn.torch_import.writeback import write_into
from onnxbn.training import default_freeze_node


def labelled(n=48, seed=0, size=8):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 3, size, size)).astype(np.float32), rng.integers(0, 10, n)


def init(model, name):
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def test_finetune_small_model(tmp_path):
    x, y = labelled()
    model = small_cnn()
    bn = onnxbn.insert_bn(model, onnxbn.collect_stats(model, x, after="dense"))
    result = onnxbn.finetune(bn, (x, y), (x[:16], y[:16]), epochs=3, lr=1e-3, batch_size=16, cache=tmp_path)
    out = result.model
    assert [(n.op_type, n.name) for n in out.graph.node] == [(n.op_type, n.name) for n in bn.graph.node]
    assert result.log["freeze_through"] == "relu2"
    for frozen in ("c1.w", "c1.b", "c2.w", "c2.b"):
        np.testing.assert_array_equal(init(out, frozen), init(bn, frozen))
    for trained in ("f1.w", "f2.w", "f3.w"):
        assert not np.array_equal(init(out, trained), init(bn, trained))
    assert len(result.log["history"]) == 3
    assert result.log["val_after"]["loss"] < result.log["val_before"]["loss"]  # 16 memorisable samples
    assert result.log["write_back_check"]["checked"] is True  # the gate ran (it raises past 1e-5: see below)
    assert result.log["cache"]["train"]["hit"] is False and result.log["cache"]["train"]["seconds"] > 0
    assert result.log["import_seconds"] > 0
    again = onnxbn.finetune(bn, (x, y), (x[:16], y[:16]), epochs=1, lr=1e-3, batch_size=16, cache=tmp_path)
    assert again.log["cache"]["train"]["hit"] is True and again.log["cache"]["val"]["hit"] is True
    assert again.log["cache"]["train"]["seconds"] == 0  # nothing was computed
    assert again.log["write_back_check"]["checked"] is True  # the gate's inputs come from the cache entry too
    # the model without BN has the same frozen part (the BN sit after the cut): same features
    plain = onnxbn.finetune(model, (x, y), epochs=1, lr=1e-3, batch_size=16, cache=tmp_path)
    assert plain.log["cache"]["train"]["hit"] is True
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    for t in changed.graph.initializer:
        if t.name == "c2.b":
            t.CopyFrom(numpy_helper.from_array(init(model, "c2.b") + 1, "c2.b"))
    assert onnxbn.finetune(changed, (x, y), epochs=1, lr=1e-3, cache=tmp_path).log["cache"]["train"]["hit"] is False


def test_bn_running_stats_follow_torch_momentum(tmp_path):
    x, y = labelled(n=32)
    model = small_cnn()
    bn = onnxbn.insert_bn(model, onnxbn.collect_stats(model, x[:8], after="dense"))
    bn_node = next(n for n in bn.graph.node if n.op_type == "BatchNormalization")
    old_mean, old_var = init(bn, bn_node.input[3]), init(bn, bn_node.input[4])
    # one step on one batch of all 32 samples: the first BN sees relu(fc1(...)) of the frozen features
    out = onnxbn.finetune(bn, (x, y), epochs=1, lr=1e-3, batch_size=32, optimizer="sgd").model
    h = exposed(model, ["h1"], x)[0].astype(np.float64)
    np.testing.assert_allclose(init(out, bn_node.input[3]), 0.9 * old_mean + 0.1 * h.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(init(out, bn_node.input[4]), 0.9 * old_var + 0.1 * h.var(0, ddof=1), rtol=1e-5, atol=1e-6)


def test_freeze_node_explicit_and_bad(tmp_path):
    x, y = labelled(n=16)
    model = small_cnn()
    out = onnxbn.finetune(model, (x, y), epochs=1, lr=1e-3, batch_size=8, freeze_through="relu3").model
    np.testing.assert_array_equal(init(out, "f1.w"), init(model, "f1.w"))
    assert not np.array_equal(init(out, "f2.w"), init(model, "f2.w"))
    with pytest.raises(onnxbn.UserError, match="no ONNX node"):
        onnxbn.finetune(model, (x, y), freeze_through="nope")
    with pytest.raises(onnxbn.UserError, match="labels span"):
        onnxbn.finetune(model, (x, y + 100))


def test_evaluate_logits_and_softmax_models():
    x, y = labelled(n=20)
    model = small_cnn()
    result = onnxbn.evaluate(model, (x, y))
    logits = make_session(model, "cpu").run(None, {"input": x})[0].astype(np.float64)
    lp = logits - logits.max(1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(1, keepdims=True))
    assert result["loss"] == pytest.approx(-lp[np.arange(20), y].mean(), rel=1e-9)
    assert result["top1"] == pytest.approx(np.mean(lp.argmax(1) == y))
    soft = onnx.ModelProto()
    soft.CopyFrom(model)
    soft.graph.node[-1].output[0] = "pre"
    soft.graph.node.append(helper.make_node("Softmax", ["pre"], ["logits"], name="softmax", axis=1))
    assert onnxbn.evaluate(soft, (x, y))["loss"] == pytest.approx(result["loss"], rel=1e-5)


def test_cli_finetune_and_eval(tmp_path, capsys):
    x, y = labelled()
    np.savez(tmp_path / "train.npz", x=x, y=y)
    onnx.save(small_cnn(), str(tmp_path / "m.onnx"))
    code = main(["finetune", str(tmp_path / "m.onnx"), "--train", str(tmp_path / "train.npz"), "--val",
                 str(tmp_path / "train.npz"), "--epochs", "2", "--lr", "1e-3", "-o", str(tmp_path / "ft.onnx")])
    assert code == 0
    log = json.loads((tmp_path / "ft.onnx.log.json").read_text())
    assert [e["epoch"] for e in log["history"]] == [1, 2] and "val_loss" in log["history"][0]
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "ft.onnx"), "--data", str(tmp_path / "train.npz"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["samples"] == 48 and result["loss"] == pytest.approx(log["val_after"]["loss"], rel=1e-4)


@pytest.mark.slow
def test_finetune_full_vgg16(vgg16, tmp_path):
    model = onnx.load(str(vgg16))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 3, 224, 224)).astype(np.float32)
    y = rng.integers(0, 1000, 6)
    bn = onnxbn.insert_bn(model, onnxbn.collect_stats(model, x, after="dense"))
    assert default_freeze_node(bn) == "/avgpool/AveragePool"
    result = onnxbn.finetune(bn, (x, y), epochs=1, lr=1e-4, batch_size=6, cache=tmp_path)
    out = result.model
    assert [(n.op_type, n.name) for n in out.graph.node] == [(n.op_type, n.name) for n in bn.graph.node]
    for name in ("features.0.weight", "features.28.weight", "features.28.bias"):
        np.testing.assert_array_equal(init(out, name), init(bn, name))
    for name in ("classifier.0.weight", "classifier.6.weight"):
        assert not np.array_equal(init(out, name), init(bn, name))
    assert result.log["cache"]["train"]["shape"] == [512, 7, 7]
    assert result.log["write_back_check"]["checked"] is True
    first_bn = next(n for n in bn.graph.node if n.op_type == "BatchNormalization")
    h = exposed(model, [first_bn.output[0]], x)[0].astype(np.float64)
    np.testing.assert_allclose(init(out, first_bn.input[3]), 0.9 * init(bn, first_bn.input[3]) + 0.1 * h.mean(0),
                               rtol=1e-4, atol=1e-6)


def drifting_write_back(model, module):
    """write_into, then one trained weight drifted by 1e-3 (what the gate must catch)."""
    written = write_into(model, module)
    written.set_array("f3.w", written.array("f3.w") * 1.001)
    return written


def test_write_back_gate_catches_a_wrong_written_model(monkeypatch):
    """The gate compares onnxruntime on the written model with torch: a write-back that drifts by
    1e-3 in one trained weight must stop finetune, not be reported as checked."""
    import onnxbn.torch_import.writeback
    import onnxbn.training

    monkeypatch.setattr(onnxbn.torch_import.writeback, "write_into", drifting_write_back)
    x, y = labelled()
    model = small_cnn()
    with pytest.raises(RuntimeError, match="write-back check failed"):
        onnxbn.training.finetune(model, (x, y), epochs=1, lr=1e-3, batch_size=16)


def test_finetune_command_gates_the_staged_file_and_leaves_nothing_when_it_fails(monkeypatch, tmp_path, capsys):
    """The command runs the gate on the staged output file: a drifted write-back exits 2 with the reason,
    and neither the output nor a staged file is left; without the drift the same run writes the model."""
    import onnxbn.torch_import.writeback

    x, y = labelled()
    onnx.save(small_cnn(), str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "d.npz", x=x, y=y)
    argv = ["finetune", str(tmp_path / "m.onnx"), "--train", str(tmp_path / "d.npz"), "--epochs", "1", "--lr", "1e-3",
            "--batch-size", "16", "-o", str(tmp_path / "out.onnx")]
    with monkeypatch.context() as patch:
        patch.setattr(onnxbn.torch_import.writeback, "write_into", drifting_write_back)
        assert main(argv) == 2 and "write-back check failed" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz", "m.onnx"]
    assert main(argv) == 0
    log = json.loads((tmp_path / "out.onnx.log.json").read_text())
    assert log["write_back_check"]["checked"] and log["write_back_check"]["max_rel_error"] <= 1e-5


def test_finetune_to_file_gates_the_staged_file_and_leaves_nothing_when_it_fails(monkeypatch, tmp_path):
    """The Python API of the command: a drifted write-back raises with the reason and leaves neither the
    output nor a staged file; without the drift the written file's outputs are the fine-tuned model's
    (`finetune` in memory, same seed: the judge is onnxruntime on both)."""
    import onnxbn.torch_import.writeback
    from onnxbn.training import finetune_to_file

    x, y = labelled()
    onnx.save(small_cnn(), str(tmp_path / "m.onnx"))
    options = dict(epochs=1, lr=1e-3, batch_size=16, device="cpu")
    with monkeypatch.context() as patch:
        patch.setattr(onnxbn.torch_import.writeback, "write_into", drifting_write_back)
        with pytest.raises(RuntimeError, match="write-back check failed"):
            finetune_to_file(tmp_path / "m.onnx", tmp_path / "out.onnx", (x, y), **options)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    log = finetune_to_file(tmp_path / "m.onnx", tmp_path / "out.onnx", (x, y), **options)
    assert log["write_back_check"]["checked"] and log["write_back_check"]["max_rel_error"] <= 1e-5
    expected = onnxbn.finetune(str(tmp_path / "m.onnx"), (x, y), **options).model
    got = onnx.load(str(tmp_path / "out.onnx"))
    feed = {"input": x[:8]}
    np.testing.assert_allclose(make_session(got, "cpu").run(None, feed)[0],
                               make_session(expected, "cpu").run(None, feed)[0], rtol=1e-6, atol=1e-6)
    before = (tmp_path / "m.onnx").read_bytes()
    with pytest.raises(onnxbn.errors.UserError, match="is also an input"):
        finetune_to_file(tmp_path / "m.onnx", tmp_path / "m.onnx", (x, y), **options)
    assert (tmp_path / "m.onnx").read_bytes() == before


def with_shrink_after(model: onnx.ModelProto, tensor: str) -> onnx.ModelProto:
    """`model` with a Shrink (lambd = bias = 0: the identity but at 0; an op onnxruntime runs and the
    torch importer does not know) between `tensor` and its readers."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        node.input[:] = [f"{tensor}/shrunk" if i == tensor else i for i in node.input]
    at = next(i for i, n in enumerate(out.graph.node) if tensor in n.output) + 1
    out.graph.node.insert(at, helper.make_node("Shrink", [tensor], [f"{tensor}/shrunk"], name=f"{tensor}/shrink"))
    return out


def test_the_frozen_part_runs_in_onnxruntime_and_its_features_equal_the_torch_prefixs(tmp_path):
    """The cached features are onnxruntime's on the ONNX prefix: equal to the torch import's prefix
    (split_at) to 1e-5 where both run, and a prefix holding an op the importer lacks fine-tunes."""
    import torch

    from onnxbn.torch_import import split_at, to_torch

    x, y = labelled()
    model = small_cnn()
    onnxbn.finetune(model, (x, y), epochs=0, batch_size=16, cache=tmp_path / "cache")
    (entry,) = (tmp_path / "cache").iterdir()
    cached = np.load(entry / "features.npy")
    prefix, _ = split_at(to_torch(model), "relu2")
    with torch.no_grad():
        expected = prefix(torch.from_numpy(x)).numpy()
    assert cached.shape == expected.shape
    assert float(np.abs(cached - expected).max() / np.abs(expected).max()) <= 1e-5
    # the write-back gate's input: the first sample, whose features are the first row
    np.testing.assert_array_equal(np.load(entry / "probe.npy"), x[:1])
    (relu2,) = exposed(model, ["r2"], x[:1])
    np.testing.assert_allclose(cached[:1], relu2, rtol=1e-6, atol=1e-7)

    foreign = with_shrink_after(model, "r1")  # in the frozen part
    with pytest.raises(onnxbn.errors.UserError, match="Shrink"):
        to_torch(foreign)
    result = onnxbn.finetune(foreign, (x, y), epochs=1, lr=1e-3, batch_size=16)
    assert result.log["write_back_check"]["checked"] is True
    assert not np.array_equal(init(result.model, "f1.w"), init(model, "f1.w"))
    np.testing.assert_array_equal(init(result.model, "c2.w"), init(model, "c2.w"))


def test_an_op_the_importer_lacks_in_the_trained_part_is_one_line_with_the_way_out(tmp_path, capsys):
    x, y = labelled()
    onnx.save(with_shrink_after(small_cnn(), "h1"), str(tmp_path / "m.onnx"))  # after the first dense layer
    np.savez(tmp_path / "d.npz", x=x, y=y)
    code = main(["finetune", str(tmp_path / "m.onnx"), "--train", str(tmp_path / "d.npz"), "--epochs", "1",
                 "-o", str(tmp_path / "out.onnx")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "cannot import node 'h1/shrink' (Shrink, opset 17): op not supported" in err[0]
    assert "freeze through that node (--freeze-through NODE) to run it in onnxruntime" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz", "m.onnx"]


@pytest.mark.parametrize("after", ["Identity", "Cast", "Flatten", "Reshape"])
def test_probabilities_behind_shape_ops_are_scored_as_probabilities(after, tmp_path):
    """A Softmax output behind Identity/Cast/Flatten/Reshape: eval's loss and fine-tuning's epoch-0 loss
    are numpy's -log p of onnxruntime's probabilities (not log_softmax of probabilities)."""
    x, y = labelled(n=32)
    model = small_cnn()
    model.graph.node[-1].output[0] = "scores"
    model.graph.node.append(helper.make_node("Softmax", ["scores"], ["probs"], name="softmax", axis=1))
    extra = {"Cast": {"to": onnx.TensorProto.FLOAT}}.get(after, {})
    inputs = ["probs"]
    if after == "Reshape":
        model.graph.initializer.append(numpy_helper.from_array(np.array([0, -1], np.int64), "shape"))
        inputs.append("shape")
    model.graph.node.append(helper.make_node(after, inputs, ["logits"], name="last", **extra))
    probs = make_session(model, "cpu").run(None, {"input": x})[0].astype(np.float64)
    expected = float(-np.log(probs[np.arange(len(y)), y]).mean())
    result = onnxbn.evaluate(model, (x, y), device="cpu")
    assert result["output"] == "probs" and result["output_read_by"] == "graph: the output is a Softmax's"
    assert result["loss"] == pytest.approx(expected, rel=1e-6)
    tuned = onnxbn.finetune(model, (x, y), (x, y), epochs=1, lr=1e-3, batch_size=16, cache=tmp_path)
    assert tuned.log["val_before"]["loss"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("head, kind", [("normalised", "probs"), ("relu", "logits")])
def test_probabilities_without_a_softmax_are_read_from_the_data(head, kind, tmp_path, capsys):
    """exp(z) / sum(exp(z)) written without a Softmax: every row is >= 0 and sums to 1, so eval and fine-tuning
    score -log p (numpy's, of onnxruntime's outputs) and say it was read from the data; Relu(z) rows are
    non-negative but do not sum to 1: logits, log_softmax (numpy's)."""
    x, y = labelled(n=32)
    model = small_cnn()
    model.graph.node[-1].output[0] = "scores"
    if head == "normalised":
        model.graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "axes"))
        model.graph.node.extend([helper.make_node("Exp", ["scores"], ["e"], name="exp"),
                                 helper.make_node("ReduceSum", ["e", "axes"], ["total"], name="total", keepdims=1),
                                 helper.make_node("Div", ["e", "total"], ["logits"], name="normalise")])
    else:
        model.graph.node.append(helper.make_node("Relu", ["scores"], ["logits"], name="last"))
    out = make_session(model, "cpu").run(None, {"input": x})[0].astype(np.float64)
    if kind == "probs":
        expected = float(-np.log(out[np.arange(len(y)), y]).mean())
    else:
        shifted = out - out.max(axis=1, keepdims=True)
        expected = float(-(shifted[np.arange(len(y)), y] - np.log(np.exp(shifted).sum(axis=1))).mean())
    result = onnxbn.evaluate(model, (x, y), device="cpu")
    assert result["output"] == kind and result["loss"] == pytest.approx(expected, rel=1e-6)
    assert result["output_read_by"].startswith("data: every row" if kind == "probs" else "neither")
    tuned = onnxbn.finetune(model, (x, y), (x, y), epochs=1, lr=1e-3, batch_size=16, cache=tmp_path)
    assert tuned.log["output"] == kind and tuned.log["output_read_by"] == result["output_read_by"]
    assert tuned.log["val_before"]["loss"] == pytest.approx(expected, rel=1e-4)
    onnx.save(model, str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "d.npz", x=x, y=y)
    assert main(["eval", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz")]) == 0
    assert f"the output read as {kind} ({result['output_read_by']})" in capsys.readouterr().out


def test_weights_in_constant_nodes_train_and_go_back_into_their_nodes(tmp_path):
    """Every weight a Constant node (as Paddle and TensorFlow exports keep them): the dense layers
    after the cut train, their new values land in the same Constant nodes (names, order, types kept),
    the frozen ones stay bit-identical, and onnxruntime on the written model passes the gate."""
    x, y = labelled()
    model = small_cnn()
    consts = [helper.make_node("Constant", [], [t.name], name=f"{t.name}/const", value=t) for t in model.graph.initializer]
    nodes = consts + list(model.graph.node)
    model.graph.ClearField("initializer")
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    result = onnxbn.finetune(model, (x, y), epochs=1, lr=1e-2, batch_size=16, cache=tmp_path)
    written = result.model
    assert [(n.op_type, n.name, list(n.output)) for n in written.graph.node] == \
        [(n.op_type, n.name, list(n.output)) for n in model.graph.node]
    assert not written.graph.initializer

    def value(m, name):
        node = next(n for n in m.graph.node if n.output[0] == name)
        return numpy_helper.to_array(node.attribute[0].t)
    for frozen in ("c1.w", "c1.b", "c2.w", "c2.b"):
        np.testing.assert_array_equal(value(written, frozen), value(model, frozen))
    for trained in ("f1.w", "f2.w", "f3.w", "f3.b"):
        assert value(written, trained).dtype == np.float32
        assert not np.array_equal(value(written, trained), value(model, trained))
    assert result.log["write_back_check"]["checked"] is True


def test_dynamo_batch_size_and_dynamic_hw_pass_the_write_back_gate():
    """A model with dynamic batch, H and W whose head reshapes to (Shape(input)[0:1], -1), as torch's dynamo
    exporter writes x.view(x.size(0), -1): fine-tuning past the first Conv reads the batch size from the cut
    (it was refused: the layers read 'input'), and the write-back gate runs at the training inputs' H and W
    (it was skipped: "input shape is not fixed")."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(0, 0.3, (4, 4, 1, 1)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus1"),
             numpy_helper.from_array(rng.normal(0, 0.3, (3, 4)).astype(np.float32), "fc"),
             numpy_helper.from_array(np.zeros(3, np.float32), "fc_b")]
    nodes = [helper.make_node("Shape", ["x"], ["n"], name="batch", start=0, end=1),
             helper.make_node("Conv", ["x", "w"], ["c"], name="stem", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["c2"], name="conv2"),
             helper.make_node("GlobalAveragePool", ["c2"], ["p"], name="gap"),
             helper.make_node("Concat", ["n", "minus1"], ["shape"], name="shape", axis=0),
             helper.make_node("Reshape", ["p", "shape"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc", "fc_b"], ["logits"], name="fc", transB=1)]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], inits),
        opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = rng.standard_normal((8, 3, 12, 12)).astype(np.float32)
    y = rng.integers(0, 3, 8)
    result = onnxbn.finetune(model, (x, y), epochs=1, lr=1e-2, batch_size=4, device="cpu", freeze_through="stem")
    assert result.log["write_back_check"]["checked"]
    assert result.log["write_back_check"]["max_rel_error"] <= 1e-5
    written = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert not np.array_equal(written["w2"], numpy_helper.to_array(inits[1]))  # trained past the cut
    assert [n.input for n in result.model.graph.node] == [n.input for n in model.graph.node]  # graph unchanged


def test_a_failing_conversion_stops_the_caching_pass_after_its_batch(monkeypatch, tmp_path):
    """torch's import and the trained part's conversion run beside the caching pass; when the conversion
    fails, the pass stops after the batch it is running (not after the whole data) with the conversion's
    error, and leaves no cache entry."""
    import threading

    import onnxbn.runtimes.ort_backend as ort_backend
    import onnxbn.torch_import as torch_import

    failed = threading.Event()

    def refuse(model):
        failed.set()
        raise onnxbn.errors.UserError("cannot import node 'x' (Foo, opset 17): op not supported")

    runs = []
    real = ort_backend.make_session

    class Counting:
        def __init__(self, session):
            self.session = session

        def run(self, names, feed):
            assert failed.wait(30)  # the conversion has failed before the first batch ends
            runs.append(len(next(iter(feed.values()))))
            return self.session.run(names, feed)

    monkeypatch.setattr(torch_import, "to_torch", refuse)
    monkeypatch.setattr(ort_backend, "make_session", lambda *a, **k: Counting(real(*a, **k)))
    x, y = labelled(n=40)
    with pytest.raises(onnxbn.errors.UserError, match="op not supported; the layers after --freeze-through"):
        onnxbn.finetune(small_cnn(), (x, y), epochs=1, batch_size=4, cache=tmp_path / "cache")
    assert runs == [4]  # one batch of 10
    assert list((tmp_path / "cache").iterdir()) == []


# ----------------------------------------------------------------------------- moved from test_graph_core.py

def test_finetune_merges_a_last_batch_of_one():
    from onnxbn.training.loop import batch_bounds as _batch_bounds

    assert _batch_bounds(17, 16) == [0, 17]
    assert _batch_bounds(24, 16) == [0, 16, 24]
    assert _batch_bounds(39, 16) == [0, 16, 39]
    assert _batch_bounds(40, 16) == [0, 16, 32, 40]
    assert _batch_bounds(32, 16) == [0, 16, 32]
    with pytest.raises(UserError, match="at least 2 training samples"):
        _batch_bounds(1, 16)
    from conftest import small_cnn

    model = small_cnn()
    x = np.random.default_rng(0).standard_normal((17, 3, 8, 8)).astype(np.float32)
    stats = onnxbn.collect_stats(model, x, after="dense", device="cpu", workers=0)
    result = onnxbn.finetune(onnxbn.insert_bn(model, stats), (x, np.arange(17) % 10), epochs=1, batch_size=16,
                             device="cpu", lr=1e-3)  # a batch of 1 would raise in BatchNorm1d
    assert len(result.log["history"]) == 1


@pytest.mark.parametrize("gpus, ranks, rank, asked, expected", [
    (0, 1, 0, "auto", "cpu"), (1, 1, 0, "auto", "cuda:0"), (1, 1, 0, "cpu", "cpu"),
    (2, 2, 1, "auto", "cuda:1"), (2, 2, 1, "cuda", "cuda:1"),
    (1, 2, 1, "auto", "cpu"),  # two ranks and one GPU: both on the CPU (nccl refuses two ranks on one GPU)
    (1, 2, 1, "cuda", "--nproc-per-node"), (0, 1, 0, "cuda", "torch sees no CUDA device"),
])
def test_each_rank_gets_a_gpu_of_its_own_or_the_cpu(monkeypatch, gpus, ranks, rank, asked, expected):
    import torch

    from onnxbn.training.loop import torch_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    if expected.startswith(("cpu", "cuda")):
        assert str(torch_device(asked)) == expected
    else:
        with pytest.raises(UserError, match=expected):
            torch_device(asked)


def test_float32_work_in_torch_runs_with_tf32_off_and_restores_the_flags():
    import torch

    from onnxbn.torch_import.precision import ieee_float32

    def flags():
        return torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision

    before = flags()
    assert before[0] == "tf32"  # torch's default for cuDNN convolutions: the reason for ieee_float32
    with ieee_float32():
        assert flags() == ("ieee", "ieee")
    assert flags() == before
    with pytest.raises(RuntimeError), ieee_float32():
        raise RuntimeError("a failing pass")
    assert flags() == before
