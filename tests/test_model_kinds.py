"""Models from other exporters and eras, built here with onnx.helper (seeded, nothing downloaded).

Every kind goes through the whole pipeline: select_points -> collect_stats -> insert_bn ->
compare (identity: passes, max_rel_error <= 1e-6 in float32) -> fold_bn (compare passes, the
expected number of BN nodes is left) -> to_torch (eval output vs onnxruntime <= 1e-5
relative), or a step refuses with a UserError that names the node and the reason.
"Relative" is max|a - b| / max|a| over the whole output, as in onnxbn.check.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper
from oracles import exposed, ort_outputs, rel_error

import onnxbn.io.save
from models import Net, bn_count, inputs_for, small_net
from onnxbn import UserError, collect_stats, compare, explain_fold, fold_bn, insert_bn, select_points, to_torch
from onnxbn.io.load import load_model
from onnxbn.io.save import save_model

IDENTITY_BOUND = 1e-6   # insert_bn is an identity up to float32 rounding
FOLD_BOUND = 1e-5       # folding re-associates the float32 sums
TORCH_BOUND = 1e-5      # torch and onnxruntime use different float32 kernels
# float16: unit roundoff u = 2**-11 ~ 4.9e-4. The BN splice rounds (x - mean), the scaling
# and the + B, each to half an ulp of the tensor's scale, and every fp16 layer after it rounds
# again; 8u ~ 4e-3 of the output's scale covers that with room, while a wrong identity
# (e.g. gamma = var instead of sqrt(var + eps)) is off by O(1).
FLOAT16_BOUND = 4e-3


# ----------------------------------------------------------------------------- pipeline

def torch_outputs(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    module = to_torch(model).eval()
    with torch.no_grad():
        out = module(torch.from_numpy(x))
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


def pipeline(model, x: np.ndarray, selector, *, kept_after_fold: int, batch_size: int = 8,
             bound: float = IDENTITY_BOUND, fold_bound: float = FOLD_BOUND, torch_bound: float = TORCH_BOUND,
             tol: dict | None = None) -> dict:
    """Run every step on `model` (a proto or a path); returns the intermediate results."""
    tol = tol or {}
    proto = load_model(model)
    points = select_points(proto, selector)
    assert points
    stats = collect_stats(model, x, after=selector, batch_size=batch_size, device="cpu", workers=0)
    assert stats.tensors == [p.tensor for p in points]
    assert all(m.count > 0 and m.mean.size == p.channels for p, m in zip(points, stats.moments.values(), strict=True)
               if p.channels is not None)
    with_bn = insert_bn(model, stats)
    onnx.checker.check_model(with_bn)
    original_bn = bn_count(proto)
    assert bn_count(with_bn) == original_bn + len(points)
    assert [o.name for o in with_bn.graph.output] == [o.name for o in proto.graph.output]
    report = compare(model, with_bn, data=x, batch_size=batch_size, device="cpu", **tol)
    worst = max(m.max_rel_error for m in report.outputs.values())
    assert report.passed and worst <= bound, report.table()
    folded = fold_bn(with_bn)
    onnx.checker.check_model(folded)
    assert bn_count(folded) == kept_after_fold, explain_fold(with_bn)
    report = compare(model, folded, data=x, batch_size=batch_size, device="cpu", **tol)
    worst_fold = max(m.max_rel_error for m in report.outputs.values())
    assert report.passed and worst_fold <= fold_bound, report.table()
    reference = ort_outputs(with_bn, x[:batch_size])
    for a, b in zip(reference, torch_outputs(with_bn, x[:batch_size]), strict=True):
        assert rel_error(a, b) <= torch_bound
    return {"points": points, "stats": stats, "with_bn": with_bn, "folded": folded,
            "identity_error": worst, "fold_error": worst_fold}


# ----------------------------------------------------------------------------- opsets

# (selector, BN left after fold): relu1's BN sits before a MaxPool and stays; every other folds.
SELECTOR_KEPT = [("dense", 0), ("relu", 1), ("linear", 0)]


@pytest.mark.parametrize("opset", [9, 11, 13, 15, 17, 18, 21, 22])
@pytest.mark.parametrize("selector,kept", SELECTOR_KEPT)
def test_opsets(opset, selector, kept):
    model = small_net(opset)
    result = pipeline(model, inputs_for([3, 8, 8]), selector, kept_after_fold=kept)
    assert {"dense": ["relu3"], "relu": ["relu1", "relu2", "relu3"],
            "linear": ["conv1.out", "conv2.out", "fc1.out"]}[selector] == [p.tensor for p in result["points"]]
    assert result["with_bn"].opset_import[0].version == opset


def test_opset_8_is_refused_with_the_fix():
    model = small_net(9)
    model.opset_import[0].version = 8
    with pytest.raises(UserError, match=r"opset 8.*9 or later.*convert_version"):
        insert_bn(model, collect_stats(small_net(9), inputs_for([3, 8, 8]), after="relu", device="cpu", workers=0))


# ----------------------------------------------------------------------------- IR 3

def ir3_net() -> onnx.ModelProto:
    """IR 3 / opset 9, as old converters wrote it: every initializer is also a graph input."""
    n = Net(3)
    y = n.node("Relu", [n.conv("input", 3, 4, "conv1")], "relu1")
    y = n.node("Relu", [n.conv(y, 4, 4, "conv2", pad=0)], "relu2")
    y = n.node("Flatten", [y], "flat")
    y = n.node("Relu", [n.gemm(y, 4 * 6 * 6, 10, "fc1")], "relu3")
    n.gemm(y, 10, 3, "fc2", out="prob")
    return n.model({"input": ["N", 3, 8, 8]}, {"prob": ["N", 3]}, opset=9, ir_version=3, inits_as_inputs=True)


def check_ir3(result) -> None:
    for out in (result["with_bn"], result["folded"]):
        assert out.ir_version == 3
        inputs, inits = {i.name for i in out.graph.input}, {t.name for t in out.graph.initializer}
        assert inits <= inputs and inputs - inits == {"input"}


def test_ir3_initializers_listed_as_inputs():
    """Selecting up to the model output keeps the whole graph in the stats pass (see the xfail below)."""
    model = ir3_net()
    result = pipeline(model, inputs_for([3, 8, 8]), ["relu1", "conv2.out", "relu3", "prob"], kept_after_fold=0)
    check_ir3(result)
    assert [e["action"] for e in explain_fold(result["with_bn"])] == ["folded"] * 4


@pytest.mark.parametrize("selector", ["relu", "linear", "dense"])
def test_ir3_stats_with_a_pruned_head(selector):
    check_ir3(pipeline(ir3_net(), inputs_for([3, 8, 8]), selector, kept_after_fold=0))


# ----------------------------------------------------------------------------- Constant / ConstantOfShape weights

def constant_weight_net(opset: int) -> onnx.ModelProto:
    """Weights from Constant nodes and biases from ConstantOfShape, as tracing exporters write them."""
    n = Net(4)
    const, filled = n.const, n.filled
    y = n.node("Conv", ["input", const("conv1.W", n.random((4, 3, 3, 3))), filled("conv1.b", 4, 0.05)],
               "conv1.out", name="conv1", pads=[1, 1, 1, 1])
    y = n.node("Relu", [y], "relu1")
    y = n.node("Conv", [y, const("conv2.W", n.random((4, 4, 3, 3))), filled("conv2.b", 4, -0.05)],
               "conv2.out", name="conv2")
    y = n.node("Flatten", [n.node("Relu", [y], "relu2")], "flat")
    if opset >= 12:  # value_floats: a Constant whose value is not a tensor attribute
        bias = n.node("Constant", [], "fc1.b", name="fc1.b/const", value_floats=[0.1] * 8)
    else:
        bias = filled("fc1.b", 8, 0.1)
    y = n.node("Gemm", [y, const("fc1.W", n.random((8, 36))), bias], "fc1.out", name="fc1", transB=1)
    y = n.node("Relu", [y], "relu3")
    n.node("Gemm", [y, const("fc2.W", n.random((3, 8))), filled("fc2.b", 3, 0.0)], "logits", name="fc2", transB=1)
    return n.model({"input": ["N", 3, 5, 5]}, {"logits": ["N", 3]}, opset)


@pytest.mark.parametrize("opset", [9, 13, 18])
@pytest.mark.parametrize("selector", ["relu", "linear"])
def test_constant_and_constant_of_shape_weights(opset, selector):
    model = constant_weight_net(opset)
    result = pipeline(model, inputs_for([3, 5, 5]), selector, kept_after_fold=0)
    folded = result["folded"]
    # the folded layers read new initializers; the Constant/ConstantOfShape nodes they replace are gone
    read = {i for node in folded.graph.node for i in node.input} | {o.name for o in folded.graph.output}
    assert all(o in read for node in folded.graph.node for o in node.output)
    assert {t.name for t in folded.graph.initializer} <= read
    left = sorted(n.output[0] for n in folded.graph.node if n.op_type in ("Constant", "ConstantOfShape"))
    assert left == {"relu": ["conv1.W", "conv1.b"], "linear": ["fc2.W", "fc2.b"]}[selector]


# ----------------------------------------------------------------------------- old model-zoo style

def caffenet_like(opset: int) -> onnx.ModelProto:
    """AlexNet/CaffeNet in miniature, as the early converters wrote it: LRN, a Sum of two branches,
    Reshape with a shape initializer, Dropout left in the inference graph, Softmax at the end."""
    n = Net(5)

    def dropout(x: str, name: str) -> str:
        if opset < 12:
            return n.node("Dropout", [x], f"{name}.out", name=name, ratio=0.5)
        return n.node("Dropout", [x, n.init(f"{name}.ratio", np.array(0.5, np.float32))], f"{name}.out", name=name)

    y = n.node("Relu", [n.conv("input", 3, 8, "conv1", pad=0)], "relu1")                  # 14x14
    y = n.node("LRN", [y], "norm1", size=5, alpha=1e-4, beta=0.75, bias=1.0)
    y = n.node("MaxPool", [y], "pool1", kernel_shape=[2, 2], strides=[2, 2])               # 7x7
    y = n.node("Sum", [n.conv(y, 8, 8, "conv2a"), n.conv(y, 8, 8, "conv2b", k=1, pad=0)], "sum2")
    y = n.node("Relu", [y], "relu2")
    y = n.node("LRN", [y], "norm2", size=3, alpha=2e-4, beta=0.75, bias=2.0)
    y = n.node("MaxPool", [y], "pool2", kernel_shape=[3, 3], strides=[2, 2])               # 3x3
    y = n.node("Reshape", [y, n.init("pool2.shape", [-1, 72], dtype=np.int64)], "flat")
    y = dropout(n.node("Relu", [n.gemm(y, 72, 16, "fc6")], "relu6"), "drop6")
    y = dropout(n.node("Relu", [n.gemm(y, 16, 16, "fc7")], "relu7"), "drop7")
    n.node("Softmax", [n.gemm(y, 16, 10, "fc8")], "prob", axis=1)
    return n.model({"input": ["N", 3, 16, 16]}, {"prob": ["N", 10]}, opset)


# relu1/relu2 feed LRN and stay; everything else folds (through Dropout, into the next Gemm).
ZOO = {"dense": (["relu6", "relu7"], 0), "relu": (["relu1", "relu2", "relu6", "relu7"], 2),
       "linear": (["conv1.out", "conv2a.out", "conv2b.out", "fc6.out", "fc7.out"], 0)}


@pytest.mark.parametrize("opset", [9, 10, 12, 13])
@pytest.mark.parametrize("selector", sorted(ZOO))
def test_old_model_zoo_graph(opset, selector):
    model = caffenet_like(opset)
    tensors, kept = ZOO[selector]
    result = pipeline(model, inputs_for([3, 16, 16]), selector, kept_after_fold=kept)
    assert [p.tensor for p in result["points"]] == tensors
    decisions = {e["bn"]: e for e in explain_fold(result["with_bn"])}
    if selector == "relu":
        assert "LRN 'norm1'" in decisions["relu1/onnxbn_bn"]["reason"]
    if selector == "dense":
        assert [(e["into"], e["direction"]) for e in decisions.values()] == [("fc7", "forward"), ("fc8", "forward")]
    # the inference graph still ends in Softmax: the outputs are probabilities
    probs = ort_outputs(result["folded"], inputs_for([3, 16, 16], count=4))[0]
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


# ----------------------------------------------------------------------------- batch dimension

@pytest.mark.parametrize("batch", [1, 4, "N", None])
def test_fixed_and_dynamic_batch(batch):
    """A fixed batch (1 or 4) is fed in batches of exactly that size; 'N' and an unnamed dim are dynamic."""
    model = small_net(13, batch=batch)
    size = batch if isinstance(batch, int) else 8
    result = pipeline(model, inputs_for([3, 8, 8], count=12), "relu", kept_after_fold=1, batch_size=size)
    assert result["stats"].moments["relu1"].count == 12 * 8 * 8
    # compare itself feeds a fixed-batch model in batches of its size, whatever batch_size says
    assert compare(model, result["with_bn"], data=inputs_for([3, 8, 8], count=12), batch_size=32, device="cpu").passed


def test_fixed_batch_refuses_a_partial_last_batch():
    model = small_net(13, batch=4)
    with pytest.raises(UserError, match=r"fixed at 4 and 10 samples.*multiple of 4"):
        compare(model, model, data=inputs_for([3, 8, 8], count=10), device="cpu")


def test_fixed_batch_stats_with_the_default_batch_size():
    """A fixed batch of 4 is used whatever --batch-size says; 10 samples cannot fill it."""
    model = small_net(13, batch=4)
    x = inputs_for([3, 8, 8], count=12)
    stats = collect_stats(model, x, after="relu", device="cpu", workers=0)
    reference = collect_stats(model, x, after="relu", device="cpu", workers=0, batch_size=4)
    for name in stats.tensors:
        np.testing.assert_array_equal(stats.var(name), reference.var(name))
    with pytest.raises(UserError, match="fixed at 4"):
        collect_stats(model, x[:10], after="relu", device="cpu", workers=0)


# ----------------------------------------------------------------------------- float16

def test_float16_model():
    """Statistics in float32/64 from a float16 graph; BN parameters float16; identity to FLOAT16_BOUND."""
    model = small_net(13, dtype=np.float16, seed=6)
    x = inputs_for([3, 8, 8], count=16, dtype=np.float16)
    tol = {"atol": FLOAT16_BOUND, "rtol": FLOAT16_BOUND}
    result = pipeline(model, x, "linear", kept_after_fold=0, bound=FLOAT16_BOUND, fold_bound=FLOAT16_BOUND,
                      torch_bound=FLOAT16_BOUND, tol=tol)
    stats, with_bn = result["stats"], result["with_bn"]
    # The statistics are float64 and match numpy's float64 moments of the float16 activations to
    # within fp16 rounding of the activations (u = 2**-11 of their scale): onnxruntime's CPU
    # provider runs fp16 Conv in float32, and in the stats graph the Cast back to float32 after
    # it can be optimised away, so the stats may see the unrounded values.
    act = exposed(model, ["conv1.out"], x)[0].astype(np.float64)
    m = stats.moments["conv1.out"]
    assert m.mean.dtype == np.float64
    u = 2.0**-11
    np.testing.assert_allclose(m.mean, act.mean(axis=(0, 2, 3)), rtol=0, atol=u * np.abs(act).max())
    np.testing.assert_allclose(m.var, act.var(axis=(0, 2, 3)), rtol=4 * u)
    bn_params = [t for t in with_bn.graph.initializer if "/onnxbn_bn." in t.name]
    assert len(bn_params) == 12 and all(t.data_type == TensorProto.FLOAT16 for t in bn_params)
    assert all(t.data_type == TensorProto.FLOAT16 for t in result["folded"].graph.initializer)


# ----------------------------------------------------------------------------- external data

def test_external_data_model_runs_from_the_saved_files(tmp_path, monkeypatch):
    """A model over protobuf's 2 GB limit is saved as model.onnx + model.onnx.data; here the limit is
    lowered so a small model takes that path, then every step reads the saved files."""
    monkeypatch.setattr(onnxbn.io.save, "PROTOBUF_LIMIT", 1000)
    model = small_net(13)
    before = model.SerializeToString()
    path = save_model(model, tmp_path / "model.onnx")
    assert model.SerializeToString() == before  # saving does not strip the caller's weights
    assert (tmp_path / "model.onnx.data").is_file()
    stored = onnx.load(str(path), load_external_data=False)
    external = [t.name for t in stored.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert "fc1.W" in external  # 12 x 96 float32, over save_model's 1 KiB threshold
    loaded = load_model(path)
    for t in model.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(t), numpy_helper.to_array(
            next(u for u in loaded.graph.initializer if u.name == t.name)))
    x = inputs_for([3, 8, 8])
    result = pipeline(path, x, "relu", kept_after_fold=1)
    bn_path = save_model(result["with_bn"], tmp_path / "model_bn.onnx", inputs=[path])
    assert (tmp_path / "model_bn.onnx.data").is_file()
    report = compare(path, bn_path, data=x, device="cpu")
    assert report.passed and max(m.max_rel_error for m in report.outputs.values()) <= IDENTITY_BOUND


def _with_location(tmp_path, location: str) -> str:
    """model.onnx in tmp_path/model whose fc1.W points at `location`; a real file of the right size
    sits at tmp_path/secret.bin, so only the location check can stop the read."""
    folder = tmp_path / "model"
    folder.mkdir()
    model = small_net(13)
    tensor = next(t for t in model.graph.initializer if t.name == "fc1.W")
    (tmp_path / "secret.bin").write_bytes(tensor.raw_data or numpy_helper.to_array(tensor).tobytes())
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return str(path)


@pytest.mark.parametrize("kind", ["parent", "absolute", "symlink"])
def test_hostile_external_data_locations_are_refused_before_any_read(tmp_path, monkeypatch, kind):
    if kind == "parent":
        path, why = _with_location(tmp_path, "../secret.bin"), "lies outside the model's folder"
    elif kind == "absolute":
        path, why = _with_location(tmp_path, str(tmp_path / "secret.bin")), "is not a relative path"
    else:
        path, why = _with_location(tmp_path, "weights.bin"), "lies outside the model's folder"
        os.symlink(tmp_path / "secret.bin", tmp_path / "model" / "weights.bin")

    def no_read(*args, **kwargs):
        raise AssertionError("external data was read")

    monkeypatch.setattr(onnx, "load_external_data_for_model", no_read)
    monkeypatch.setattr(onnx.external_data_helper, "load_external_data_for_model", no_read)
    monkeypatch.setattr(onnx.external_data_helper, "load_external_data_for_tensor", no_read)
    for step in (load_model, lambda p: collect_stats(p, inputs_for([3, 8, 8]), device="cpu"), to_torch):
        with pytest.raises(UserError, match=f"tensor 'fc1.W': external data .*{why}"):
            step(path)


# ----------------------------------------------------------------------------- ResNet block

def resnet_block() -> onnx.ModelProto:
    """Stem Conv+BN+Relu, a basic block (Conv+BN+Relu, Conv+BN, Add skip, Relu), GlobalAveragePool, Gemm:
    the BN nodes come with the model, the convs have no bias (as torchvision exports them)."""
    n = Net(7)
    y = n.node("Relu", [n.bn(n.conv("input", 3, 8, "stem", bias=False), 8, "stem_bn")], "relu0")
    z = n.node("Relu", [n.bn(n.conv(y, 8, 8, "conv_a", bias=False), 8, "bn_a")], "relu_a")
    z = n.bn(n.conv(z, 8, 8, "conv_b", bias=False), 8, "bn_b")
    z = n.node("Relu", [n.node("Add", [z, y], "add")], "relu_out")
    z = n.node("Flatten", [n.node("GlobalAveragePool", [z], "gap")], "flat")
    n.gemm(z, 8, 5, "fc", out="logits")
    return n.model({"input": ["N", 3, 8, 8]}, {"logits": ["N", 5]}, 13)


# relu: relu0 feeds the block and the skip, relu_a a padded Conv, relu_out a pool: those BN stay.
RESNET = {"linear": (["stem.out", "conv_a.out", "conv_b.out"], 0), "relu": (["relu0", "relu_a", "relu_out"], 3)}


@pytest.mark.parametrize("selector", sorted(RESNET))
def test_resnet_block_with_its_own_bn(selector):
    model = resnet_block()
    tensors, kept = RESNET[selector]
    result = pipeline(model, inputs_for([3, 8, 8]), selector, kept_after_fold=kept)
    assert [p.tensor for p in result["points"]] == tensors
    decisions = {e["bn"]: e for e in explain_fold(result["with_bn"])}
    for original, conv in (("stem_bn", "stem"), ("bn_a", "conv_a"), ("bn_b", "conv_b")):
        assert (decisions[original]["action"], decisions[original]["into"]) == ("folded", conv)
    if selector == "linear":  # the identity BN between Conv and the model's BN folds first
        assert all(decisions[f"{c}/onnxbn_bn"]["into"] == c for c in ("stem", "conv_a", "conv_b"))
    else:
        assert "2 consumers" in decisions["relu0/onnxbn_bn"]["reason"]
        assert "GlobalAveragePool" in decisions["relu_out/onnxbn_bn"]["reason"]
    assert {n.op_type for n in result["folded"].graph.node} >= {"Add", "GlobalAveragePool"}


@pytest.mark.parametrize("entries,dims", [
    ({"length": str(10**15)}, None),              # a length the file cannot hold
    ({"offset": str(2**40)}, None),               # an offset past the end
    ({}, [1 << 20, 1 << 20]),                     # a shape of 4 TiB with a small file behind it
])
def test_absurd_declared_sizes_are_refused_before_any_read(tmp_path, monkeypatch, entries, dims):
    path = _with_location(tmp_path, "weights.bin")
    os.replace(tmp_path / "secret.bin", tmp_path / "model" / "weights.bin")
    model = onnx.load(path, load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.name == "fc1.W")
    for key, value in entries.items():
        tensor.external_data.add(key=key, value=value)
    if dims:
        del tensor.dims[:]
        tensor.dims.extend(dims)
    with open(path, "wb") as fh:
        fh.write(model.SerializeToString())

    def no_read(*args, **kwargs):
        raise AssertionError("external data was read")

    monkeypatch.setattr(onnx, "load_external_data_for_model", no_read)
    with pytest.raises(UserError, match="damaged"):
        load_model(path)


def test_a_well_formed_external_tensor_still_loads(tmp_path):
    path = _with_location(tmp_path, "weights.bin")
    os.replace(tmp_path / "secret.bin", tmp_path / "model" / "weights.bin")
    loaded = load_model(path)
    expected = next(t for t in small_net(13).graph.initializer if t.name == "fc1.W")
    np.testing.assert_array_equal(numpy_helper.to_array(next(t for t in loaded.graph.initializer if t.name == "fc1.W")),
                                  numpy_helper.to_array(expected))
