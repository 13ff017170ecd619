"""BN folding: every fold is checked with onnxruntime (outputs before vs after), the BN
count, explain_fold's verdicts and the onnx checker. Relative error below means
max|after - before| / max|before| over the whole output tensor."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from oracles import rel_error

import onnxbn
from models import BN_WIDE, Net, bn_count, dynamo_bias_model
from onnxbn.fold import explain_fold, fold_bn
from onnxbn.runtimes.ort_backend import make_session

FLOAT32_BOUND = 1e-5
FLOAT16_BOUND = 4e-3  # four fp16 ulps (2**-10) of the largest output: weights, BN and the sums each round


# ----------------------------------------------------------------------------- builder and checks

class Builder(Net):
    """models.Net as these tests use it: LeCun-normal weights (gain 1), N(0, 1) biases, widely
    spread BN parameters; the model at IR 8 (unless told), with metadata source=test (check_fold
    asserts it survives), the checker left to the test."""

    def __init__(self, seed: int = 0, dtype=np.float32):
        super().__init__(seed, dtype, gain=1.0, bn=BN_WIDE)

    def model(self, inputs: dict, outputs: dict, opset: int = 13, ir_version: int | None = None) -> onnx.ModelProto:
        return super().model(inputs, outputs, opset, ir_version=ir_version or 8, metadata={"source": "test"},
                             check=False, producer=None, graph_name="g")


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return make_session(model, "cpu").run(None, feeds)


def feeds_for(model: onnx.ModelProto, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        shape = [d.dim_value if d.HasField("dim_value") else 3 for d in vi.type.tensor_type.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        feeds[vi.name] = rng.normal(0, 1, shape).astype(dtype)
    return feeds


def check_fold(model: onnx.ModelProto, bn_left: int, bound: float = FLOAT32_BOUND) -> tuple[onnx.ModelProto, float]:
    """Fold, then assert: input untouched, checker passes, BN count, outputs equal within `bound`."""
    before_bytes = model.SerializeToString()
    folded = fold_bn(model)
    assert model.SerializeToString() == before_bytes, "fold_bn changed its input"
    onnx.checker.check_model(folded, full_check=True)
    assert bn_count(folded) == bn_left
    assert [o.name for o in folded.graph.output] == [o.name for o in model.graph.output]
    assert folded.opset_import == model.opset_import
    assert {p.key: p.value for p in folded.metadata_props}["source"] == "test"
    feeds = feeds_for(model)
    error = max(rel_error(a, b) for a, b in zip(run(model, feeds), run(folded, feeds), strict=True))
    assert error <= bound, error
    return folded, error


def verdicts(model: onnx.ModelProto) -> list[tuple]:
    return [(e["bn"], e["action"], e["into"], e["direction"]) for e in explain_fold(model)]


def conv_bn(opset=13, bias=True, group=1, seed=0) -> onnx.ModelProto:
    b = Builder(seed)
    ins = ["x", b.weight("conv.W", (6, 4 // group, 3, 3))] + ([b.init("conv.b", b.rng.normal(0, 1, 6))] if bias else [])
    y = b.node("Conv", ins, "conv.out", name="conv", pads=[1, 1, 1, 1], group=group)
    b.node("Relu", [b.bn(y, 6, "bn")], "y")
    return b.model({"x": [2, 4, 7, 7]}, {"y": [2, 6, 7, 7]}, opset)


# ----------------------------------------------------------------------------- backward folds

@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_bn_folds_into_conv(opset, bias):
    model = conv_bn(opset, bias)
    folded, _ = check_fold(model, 0)
    assert verdicts(model) == [("bn", "folded", "conv", "backward")]
    conv = next(n for n in folded.graph.node if n.op_type == "Conv")
    assert conv.name == "conv" and len(conv.input) == 3  # a bias was created when there was none
    assert {t.name for t in folded.graph.initializer} >= {"conv.W"}
    assert not any(t.name.startswith("bn.") for t in folded.graph.initializer)
    assert {p.key: p.value for p in folded.metadata_props}["onnxbn.fold"] == "folded 1 of 1 BN"


def test_grouped_conv_bn():
    check_fold(conv_bn(group=2), 0)


@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose_bn(group):
    b = Builder(3)
    y = b.node("ConvTranspose", ["x", b.weight("ct.W", (4, 6 // group, 3, 3)), b.init("ct.b", b.rng.normal(0, 1, 6))],
               "ct.out", name="ct", strides=[2, 2], group=group)
    b.bn(y, 6, "bn", out="y")
    model = b.model({"x": [2, 4, 5, 5]}, {"y": [2, 6, 11, 11]})
    check_fold(model, 0)
    assert verdicts(model) == [("bn", "folded", "ct", "backward")]


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("with_c", [True, False])
def test_gemm_bn_honours_trans_b_alpha_beta(trans_b, with_c):
    b = Builder(4)
    w = b.weight("fc.W", (5, 12) if trans_b else (12, 5))
    ins = ["x", w] + ([b.init("fc.C", b.rng.normal(0, 1, 5))] if with_c else [])
    y = b.node("Gemm", ins, "fc.out", name="fc", transB=trans_b, alpha=0.7, beta=-1.3)
    b.bn(y, 5, "bn", out="y")
    model = b.model({"x": [3, 12]}, {"y": [3, 5]})
    folded, _ = check_fold(model, 0)
    assert verdicts(model) == [("bn", "folded", "fc", "backward")]
    gemm = folded.graph.node[0]
    assert not {a.name for a in gemm.attribute} & {"alpha", "beta"}  # baked into W and C


@pytest.mark.parametrize("bias_first", [False, True])
def test_matmul_add_bn(bias_first):
    b = Builder(5)
    y = b.node("MatMul", ["x", b.weight("mm.W", (12, 5))], "mm.out", name="mm")
    bias = b.init("mm.b", b.rng.normal(0, 1, 5))
    z = b.node("Add", [bias, y] if bias_first else [y, bias], "add.out", name="add")
    b.node("Relu", [b.bn(z, 5, "bn")], "y")
    model = b.model({"x": [3, 12]}, {"y": [3, 5]})
    check_fold(model, 0)
    assert verdicts(model) == [("bn", "folded", "mm", "backward")]


def test_bn_as_last_node_keeps_output_name():
    b = Builder(6)
    y = b.node("Conv", ["x", b.weight("conv.W", (3, 2, 1, 1))], "conv.out", name="conv")
    b.bn(y, 3, "bn", out="logits")
    model = b.model({"x": [1, 2, 4, 4]}, {"logits": [1, 3, 4, 4]})
    folded, _ = check_fold(model, 0)
    assert folded.graph.node[0].output[0] == "logits"


def test_two_bn_in_a_row_both_fold():
    b = Builder(7)
    y = b.node("Conv", ["x", b.weight("conv.W", (3, 2, 3, 3))], "conv.out", name="conv")
    b.bn(b.bn(y, 3, "bn1"), 3, "bn2", out="y")
    model = b.model({"x": [1, 2, 6, 6]}, {"y": [1, 3, 4, 4]})
    check_fold(model, 0)
    assert verdicts(model) == [("bn1", "folded", "conv", "backward"), ("bn2", "folded", "conv", "backward")]


def test_constant_node_weight_is_accepted():
    b = Builder(8)
    w = b.rng.normal(0, 0.5, (3, 2, 3, 3)).astype(np.float32)
    b.nodes.append(helper.make_node("Constant", [], ["conv.W"], name="wconst", value=numpy_helper.from_array(w)))
    y = b.node("Conv", ["x", "conv.W"], "conv.out", name="conv")
    b.bn(y, 3, "bn", out="y")
    model = b.model({"x": [1, 2, 6, 6]}, {"y": [1, 3, 4, 4]})
    folded, _ = check_fold(model, 0)
    assert [n.op_type for n in folded.graph.node] == ["Conv"]  # the Constant's value moved into an initializer


# ----------------------------------------------------------------------------- forward folds

@pytest.mark.parametrize("path", [["Flatten"], ["Dropout", "Flatten"], ["Reshape"], ["Flatten", "Identity"]])
def test_relu_bn_folds_forward_into_gemm(path):
    b = Builder(9)
    y = b.linear("Conv", "x", (4, 3, 3, 3), "conv", bias=4)
    t = b.bn(b.node("Relu", [y], "relu.out"), 4, "bn")
    for op in path:
        extra = [b.init("flat.shape", [0, -1], np.int64)] if op == "Reshape" else []
        t = b.node(op, [t, *extra], f"{op.lower()}.out")
    b.node("Gemm", [t, b.weight("fc.W", (10, 4 * 5 * 5)), b.init("fc.b", b.rng.normal(0, 1, 10))], "y", name="fc", transB=1)
    model = b.model({"x": [2, 3, 7, 7]}, {"y": [2, 10]})
    check_fold(model, 0)
    assert verdicts(model) == [("bn", "folded", "fc", "forward")]


def test_torch_style_view_with_dynamic_batch_and_constant_node_bn():
    """x.view(x.size(0), -1): the BN output is also read by Shape; the BN parameters are Constant nodes."""
    b = Builder(20)
    t = b.node("Relu", ["x"], "relu.out")
    params = []
    for key, value in {"scale": b.rng.normal(1, .5, 4), "B": b.rng.normal(0, .5, 4),
                       "mean": b.rng.normal(0, 1, 4), "var": b.rng.uniform(.2, 2, 4)}.items():
        b.nodes.append(helper.make_node("Constant", [], [f"bn.{key}"], name=f"bn.{key}",
                                        value=numpy_helper.from_array(value.astype(np.float32))))
        params.append(f"bn.{key}")
    t = b.node("BatchNormalization", [t, *params], "bn.out", name="bn")
    batch = b.node("Gather", [b.node("Shape", [t], "shape"), b.init("zero", 0, np.int64)], "batch", axis=0)
    target = b.node("Concat", [b.node("Unsqueeze", [batch, b.init("axis0", [0], np.int64)], "batch1"),
                               b.init("minus1", [-1], np.int64)], "target", axis=0)
    b.node("Gemm", [b.node("Reshape", [t, target], "flat"), b.weight("fc.W", (5, 4 * 3 * 3))], "y", name="fc", transB=1)
    model = b.model({"x": ["N", 4, 3, 3]}, {"y": ["N", 5]})
    folded, _ = check_fold(model, 0)
    assert verdicts(model) == [("bn", "folded", "fc", "forward")]
    assert not any(n.op_type == "Constant" and n.output[0].startswith("bn.") for n in folded.graph.node)
    assert next(n for n in folded.graph.node if n.op_type == "Shape").input[0] == "relu.out"


def test_reshape_that_does_not_flatten_per_sample_is_kept():
    b = Builder(21)
    t = b.bn(b.node("Relu", ["x"], "relu.out"), 4, "bn")
    rows = b.node("Reshape", [t, b.init("shape", [-1, 9], np.int64)], "rows")
    b.linear("Gemm", rows, (9, 5), "fc", bias=5, out="y")
    model = b.model({"x": [2, 4, 3, 3]}, {"y": [8, 5]})
    check_fold(model, 1)
    assert explain_fold(model)[0]["reason"] == "Gemm has 9 input features, the BN provides 36"


def test_dense_bn_folds_forward_into_matmul_add():
    b = Builder(10)
    h = b.node("Relu", [b.node("Gemm", ["x", b.weight("fc1.W", (8, 6))], "fc1.out", name="fc1")], "relu.out")
    t = b.node("Dropout", [b.bn(h, 6, "bn")], "drop.out")
    m = b.node("MatMul", [t, b.weight("fc2.W", (6, 3))], "fc2.out", name="fc2")
    b.node("Add", [m, b.init("fc2.b", b.rng.normal(0, 1, 3))], "y")
    model = b.model({"x": [4, 8]}, {"y": [4, 3]})
    check_fold(model, 0)
    assert verdicts(model) == [("bn", "folded", "fc2", "forward")]


@pytest.mark.parametrize("group", [1, 2])
def test_relu_bn_folds_into_unpadded_conv(group):
    b = Builder(11)
    t = b.bn(b.node("Relu", ["x"], "relu.out"), 4, "bn")
    b.node("Conv", [t, b.weight("conv.W", (6, 4 // group, 3, 3)), b.init("conv.b", b.rng.normal(0, 1, 6))], "y",
           name="conv", pads=[0, 0, 0, 0], group=group)
    model = b.model({"x": [2, 4, 6, 6]}, {"y": [2, 6, 4, 4]})
    check_fold(model, 0)
    assert verdicts(model) == [("bn", "folded", "conv", "forward")]


@pytest.mark.parametrize("padding", [{"pads": [1, 1, 1, 1]}, {"auto_pad": "SAME_UPPER"}])
def test_bn_before_padded_conv_is_kept(padding):
    b = Builder(12)
    t = b.bn(b.node("Relu", ["x"], "relu.out"), 4, "bn")
    b.node("Conv", [t, b.weight("conv.W", (6, 4, 3, 3))], "y", name="conv", **padding)
    model = b.model({"x": [2, 4, 6, 6]}, {"y": [2, 6, 6, 6]})
    folded, error = check_fold(model, 1)
    assert error == 0.0
    [entry] = explain_fold(model)
    assert entry["action"] == "kept" and entry["into"] is None and entry["direction"] is None
    assert "padding" in entry["reason"]
    assert {p.key: p.value for p in folded.metadata_props}["onnxbn.fold"].startswith("folded 0 of 1 BN; kept bn (")


def test_bn_before_maxpool_is_kept():
    b = Builder(13)
    y = b.node("Conv", ["x", b.weight("conv.W", (4, 3, 3, 3))], "conv.out", name="conv")
    t = b.bn(b.node("Relu", [y], "relu.out"), 4, "bn")
    p = b.node("MaxPool", [t], "pool.out", name="pool", kernel_shape=[2, 2], strides=[2, 2])
    b.node("Gemm", [b.node("Flatten", [p], "flat.out"), b.weight("fc.W", (16, 5))], "y", name="fc")
    model = b.model({"x": [2, 3, 6, 6]}, {"y": [2, 5]})
    check_fold(model, 1)
    [entry] = explain_fold(model)
    assert entry["action"] == "kept"
    assert entry["reason"] == "no linear layer to fold into: BN does not fold through MaxPool 'pool'"


def test_kept_reasons():
    b = Builder(14)
    h = b.node("Relu", ["x"], "h")
    two = b.bn(h, 6, "two_consumers")  # read by two Gemms
    b.node("Gemm", [two, b.weight("fc1.W", (6, 3))], "y1", name="fc1")
    b.node("Gemm", [two, b.weight("fc2.W", (6, 3))], "y2", name="fc2")
    dyn = b.bn(h, 6, "dynamic_weight")
    b.node("Gemm", [dyn, "w"], "y3", name="fc3")
    b.bn(h, 6, "last", out="y4")
    model = b.model({"x": [2, 6], "w": [6, 3]}, {"y1": [2, 3], "y2": [2, 3], "y3": [2, 3], "y4": [2, 6]})
    check_fold(model, 3)
    reasons = {e["bn"]: e["reason"] for e in explain_fold(model)}
    assert reasons == {"two_consumers": "BN output has 2 consumers",
                       "dynamic_weight": "Gemm weight is not an initializer",
                       "last": "no linear layer to fold into: BN output is a graph output"}


def test_forward_and_backward_into_the_same_conv():
    b = Builder(15)
    t = b.bn(b.node("Relu", ["x"], "relu.out"), 3, "bn_in")
    y = b.node("Conv", [t, b.weight("conv.W", (5, 3, 2, 2))], "conv.out", name="conv")
    b.bn(y, 5, "bn_out", out="y")
    model = b.model({"x": [2, 3, 5, 5]}, {"y": [2, 5, 4, 4]})
    check_fold(model, 0)
    assert verdicts(model) == [("bn_in", "folded", "conv", "forward"), ("bn_out", "folded", "conv", "backward")]


# ----------------------------------------------------------------------------- weights, dtypes, IR

def test_shared_weight_is_copied_not_corrupted():
    b = Builder(16)
    w = b.weight("shared.W", (4, 3, 3, 3))
    b.bn(b.node("Conv", ["x", w], "c1.out", name="c1"), 4, "bn", out="y1")
    b.node("Conv", ["x", w], "y2", name="c2")
    model = b.model({"x": [1, 3, 6, 6]}, {"y1": [1, 4, 4, 4], "y2": [1, 4, 4, 4]})
    folded, _ = check_fold(model, 0)
    feeds = feeds_for(model)
    assert np.array_equal(run(model, feeds)[1], run(folded, feeds)[1])  # the other Conv, bit for bit
    original = numpy_helper.to_array(model.graph.initializer[0])
    kept = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    assert np.array_equal(kept["shared.W"], original)
    c1, c2 = (n for n in folded.graph.node if n.op_type == "Conv")
    assert c2.input[1] == "shared.W" and c1.input[1] not in ("shared.W",) and c1.input[1] in kept


@pytest.mark.parametrize("op", ["Gemm", "Conv"])
def test_float16_model(op):
    b = Builder(17, dtype=np.float16)
    if op == "Gemm":
        y = b.node("Gemm", ["x", b.weight("fc.W", (16, 8)), b.init("fc.b", b.rng.normal(0, 1, 8))], "fc.out", name="fc")
        inputs, outputs = {"x": [4, 16]}, {"y": [4, 8]}
    else:
        y = b.node("Conv", ["x", b.weight("conv.W", (8, 4, 3, 3))], "conv.out", name="conv", pads=[1, 1, 1, 1])
        inputs, outputs = {"x": [2, 4, 6, 6]}, {"y": [2, 8, 6, 6]}
    b.bn(y, 8, "bn", out="y")
    model = b.model(inputs, outputs)
    folded, _ = check_fold(model, 0, bound=FLOAT16_BOUND)
    assert all(t.data_type == TensorProto.FLOAT16 for t in folded.graph.initializer)


def test_ir3_opset9_initializers_listed_as_inputs():
    b = Builder(18)
    y = b.node("Conv", ["x", b.weight("conv.W", (4, 3, 3, 3))], "conv.out", name="conv")
    t = b.bn(b.node("Relu", [b.bn(y, 4, "bn1")], "relu.out"), 4, "bn2")
    b.linear("Gemm", b.node("Flatten", [t], "flat.out"), (64, 5), "fc", bias=5, out="y")
    model = b.model({"x": [2, 3, 6, 6]}, {"y": [2, 5]}, opset=9, ir_version=3)
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in model.graph.initializer)
    onnx.checker.check_model(model)
    folded, _ = check_fold(model, 0)
    assert verdicts(model) == [("bn1", "folded", "conv", "backward"), ("bn2", "folded", "fc", "forward")]
    inputs, inits = {i.name for i in folded.graph.input}, {t.name for t in folded.graph.initializer}
    assert inits <= inputs and inputs - inits == {"x"}
    assert not any(name.startswith("bn") for name in inputs)


def test_folded_size_matches_the_model_without_bn():
    def vgg_like(with_bn: bool) -> onnx.ModelProto:
        b = Builder(19)
        y = b.linear("Conv", "x", (32, 3, 3, 3), "c1", bias=32, pads=[1, 1, 1, 1])
        y = b.node("Relu", [b.bn(y, 32, "bn1") if with_bn else y], "r1")
        y = b.linear("Conv", y, (32, 32, 3, 3), "c2", bias=32, pads=[1, 1, 1, 1])
        y = b.node("Relu", [b.bn(y, 32, "bn2") if with_bn else y], "r2")
        y = b.node("Flatten", [b.node("MaxPool", [y], "p", kernel_shape=[2, 2], strides=[2, 2])], "f")
        y = b.node("Relu", [b.linear("Gemm", y, (512, 64), "fc1", bias=64)], "r3")
        b.linear("Gemm", b.bn(y, 64, "bn3") if with_bn else y, (64, 10), "fc2", bias=10, out="y")
        return b.model({"x": [1, 3, 8, 8]}, {"y": [1, 10]})

    plain, folded = vgg_like(False), fold_bn(vgg_like(True))
    assert [e["action"] for e in explain_fold(vgg_like(True))] == ["folded"] * 3
    assert abs(folded.ByteSize() - plain.ByteSize()) < 512  # only the onnxbn.fold metadata entry differs
    assert folded.ByteSize() < vgg_like(True).ByteSize()


# ----------------------------------------------------------------------------- property

@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["Conv", "Gemm"]), forward=st.booleans(), seed=st.integers(0, 2**16),
       out_ch=st.integers(1, 9), in_ch=st.integers(1, 6), kernel=st.integers(1, 3), group=st.sampled_from([1, 2, 3]),
       trans_b=st.integers(0, 1), bias=st.booleans(), alpha=st.floats(0.25, 4.0), beta=st.floats(-2.0, 2.0))
def test_fold_is_exact_property(kind, forward, seed, out_ch, in_ch, kernel, group, trans_b, bias, alpha, beta):
    """Backward (layer -> BN) or forward (Relu -> BN -> layer; Conv unpadded) folds are exact."""
    b = Builder(seed)
    if kind == "Conv":
        in_ch, out_ch = in_ch * group, out_ch * group
        pad = 0 if forward else kernel // 2
        side = 5 + 2 * pad - kernel + 1
        w_shape = (out_ch, in_ch // group, kernel, kernel)
        inputs, outputs = {"x": [2, in_ch, 5, 5]}, {"y": [2, out_ch, side, side]}
        attrs = {"group": group, "pads": [pad] * 4}
    else:
        w_shape, inputs, outputs = (out_ch, in_ch) if trans_b else (in_ch, out_ch), {"x": [3, in_ch]}, {"y": [3, out_ch]}
        attrs = {"transB": trans_b, "alpha": alpha, "beta": beta}
    x = b.bn(b.node("Relu", ["x"], "relu.out"), in_ch, "bn") if forward else "x"
    ins = [x, b.weight("W", w_shape)] + ([b.init("b", b.rng.normal(0, 1, out_ch))] if bias else [])
    y = b.node(kind, ins, "y" if forward else "lin.out", name="lin", **attrs)
    if not forward:
        b.bn(y, out_ch, "bn", out="y")
    check_fold(b.model(inputs, outputs), 0)
    assert verdicts(b.model(inputs, outputs)) == [("bn", "folded", "lin", "forward" if forward else "backward")]


# ----------------------------------------------------------------------------- tensor names after a fold

def test_folded_tensor_names_keep_their_values_so_layerwise_finds_no_divergence():
    """Conv -> BN (backward fold), Relu -> BN -> Flatten -> Gemm (forward fold), a MatMul+Add -> BN:
    every name the folded model shares with the original holds the same values (numpy judges on
    both graphs with every shared tensor exposed), the BN outputs included, and check --layerwise
    agrees."""
    import onnxbn

    b = Builder(3)
    y = b.bn(b.conv("input", 3, 4, "conv", pad=0), 4, "bn1", out="bn1_out")
    y = b.bn(b.node("Relu", [y], "relu"), 4, "bn2", out="bn2_out")
    y = b.node("Flatten", [y], "flat")
    y = b.node("Relu", [b.gemm(y, 4 * 4 * 4, 6, "fc")], "relu_fc")
    y = b.node("Add", [b.node("MatMul", [y, b.weight("mm.W", (6, 5))], "mm"), b.weight("mm.b", (5,))], "mm_add")
    y = b.bn(y, 5, "bn3", out="bn3_out")
    y = b.bn(b.node("Relu", [y], "relu3"), 5, "bn4")
    b.node("Add", [b.node("MatMul", [y, b.weight("mm2.W", (5, 5))], "mm2"), b.weight("mm2.b", (5,))],
           "logits")
    model = b.model({"input": ["N", 3, 6, 6]}, {"logits": ["N", 5]})
    folded = fold_bn(model)
    assert bn_count(folded) == 0 and [d["direction"] for d in explain_fold(model)] == ["backward", "forward",
                                                                                       "backward", "forward"]
    x = np.random.default_rng(0).standard_normal((4, 3, 6, 6)).astype(np.float32)

    def all_values(m):
        m2 = onnx.ModelProto()
        m2.CopyFrom(m)
        names = [o for n in m2.graph.node for o in n.output if o not in {v.name for v in m2.graph.output}]
        m2.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
        return dict(zip([o.name for o in m2.graph.output], run(m2, {"input": x}), strict=True))

    before, after = all_values(model), all_values(folded)
    shared = sorted(set(before) & set(after))
    assert {"bn1_out", "relu", "bn3_out", "logits"} <= set(shared)
    assert not {"flat", "mm", "mm2"} & set(shared)  # renamed: they hold other values now
    for name in shared:
        assert rel_error(before[name], after[name]) <= FLOAT32_BOUND, name
    report = onnxbn.compare(model, folded, x, batch_size=4, layerwise=True)
    assert report.passed and report.layerwise["first_divergence"] is None
    assert sorted(t["tensor"] for t in report.layerwise["tensors"]) == shared


def test_bias_computed_as_dynamo_writes_it_folds():
    """torch's dynamo exporter without its optimizer writes a Conv's zero bias as
    Expand(CastLike(0, x), Expand(Shape(W, end=1), [1])): the BN folds (it was kept: "Conv bias is not an
    initializer"), the chain goes, and the weight is written in place (one copy, not two)."""
    model = dynamo_bias_model("x")
    folded = fold_bn(model)
    onnx.checker.check_model(folded)
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu"]
    assert len(folded.graph.initializer) == 2 and "w" in {t.name for t in folded.graph.initializer}  # and the bias
    x = np.random.default_rng(1).standard_normal((4, 3, 8, 8)).astype(np.float32)
    expected = make_session(model, "cpu").run(None, {"x": x})[0]
    assert rel_error(expected, make_session(folded, "cpu").run(None, {"x": x})[0]) <= 1e-6


# ----------------------------------------------------------------------------- moved from test_graph_core.py

def test_bfloat16_bn_folds_like_float32():
    """bfloat16 is a float type everywhere: fold merges a bf16 BN into its Conv, exactly as numpy computes it."""
    import ml_dtypes

    bf16 = ml_dtypes.bfloat16
    rng = np.random.default_rng(2)
    w, b = rng.standard_normal((4, 3, 1, 1)).astype(bf16), rng.standard_normal(4).astype(bf16)
    scale, shift, mean = (rng.standard_normal(4).astype(bf16) for _ in range(3))
    var = rng.uniform(0.5, 2, 4).astype(bf16)
    inits = {"w": w, "b": b, "s": scale, "t": shift, "m": mean, "v": var}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "s", "t", "m", "v"], ["y"], name="bn", epsilon=1e-5)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["N", 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, ["N", 4, 4, 4])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)], ir_version=8)
    assert [p.dtype for p in onnxbn.select_points(model, ["c"])] == ["bfloat16"]
    decisions = onnxbn.explain_fold(model)
    assert decisions[0]["action"] == "folded" and decisions[0]["into"] == "conv"
    folded = onnxbn.fold_bn(model)
    got = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in folded.graph.initializer}
    f = {k: v.astype(np.float64) for k, v in inits.items()}
    s = f["s"] / np.sqrt(f["v"] + 1e-5)
    np.testing.assert_array_equal(got["w"], (f["w"] * s[:, None, None, None]).astype(bf16).astype(np.float64))
    np.testing.assert_array_equal(got["b"], ((f["b"] - f["m"]) * s + f["t"]).astype(bf16).astype(np.float64))
