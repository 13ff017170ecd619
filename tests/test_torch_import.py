"""onnxbn.torch_import: ONNX -> torch.fx import, write-back, split.

Every op is checked against onnxruntime on small models built with onnx.helper, at
several opsets; the round trip (train in torch, write back, run in onnxruntime) and
training parity with a hand-written torch network are checked on values.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from onnxbn.errors import UserError
from onnxbn.runtimes.ort_backend import make_session
from onnxbn.torch_import import OnnxDropout, split_at, to_torch, write_back

F32 = TensorProto.FLOAT
RTOL = 1e-5


def _ir(opset: int) -> int:
    return 8 if opset <= 18 else 9 if opset <= 20 else 10


def _model(nodes, inputs, outputs, inits=(), opset=13, ir=None, name="g"):
    """inputs/outputs: (name, shape, elem_type) or names (float, unknown shape)."""
    def vi(spec):
        if isinstance(spec, str):
            return helper.make_tensor_value_info(spec, F32, None)
        n, shape, *t = spec
        return helper.make_tensor_value_info(n, t[0] if t else F32, shape)
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in dict(inits).items()]
    graph = helper.make_graph(nodes, name, [vi(i) for i in inputs], [vi(o) for o in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              ir_version=_ir(opset) if ir is None else ir)
    return model


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12)) if a.size else 0.0


def _ort(model, feeds):
    sess = make_session(model, device="cpu", threads=1)
    return sess.run(None, feeds)


def _torch(module, feeds, order):
    with torch.no_grad():
        out = module.eval()(*[torch.from_numpy(feeds[n].copy()) for n in order])
    out = list(out) if isinstance(out, tuple) else [out]
    return [o.numpy() for o in out]


def _check(model, feeds, tol=RTOL):
    module = to_torch(model)
    order = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    ref = _ort(model, feeds)
    got = _torch(module, feeds, order)
    assert len(ref) == len(got)
    for r, g in zip(ref, got, strict=True):
        assert r.dtype == g.dtype
        assert _rel(g, r) <= tol, _rel(g, r)
    return module


def _rand(*shape, seed=0, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


# ============================================================================ single ops

def _conv_cases():
    w = _rand(4, 3, 3, 3, seed=1, scale=0.3)
    b = _rand(4, seed=2)
    x = _rand(2, 3, 9, 8, seed=3)
    cases = []
    for opset in (9, 11, 13, 17, 21):
        cases.append((f"conv_sym_{opset}", opset, dict(pads=[1, 1, 1, 1]), w, b, x))
    cases += [
        ("conv_asym", 13, dict(pads=[0, 1, 2, 0], strides=[2, 1]), w, b, x),
        ("conv_same_upper_s2", 13, dict(auto_pad="SAME_UPPER", strides=[2, 2]), w, b, x),
        ("conv_same_lower_s2", 11, dict(auto_pad="SAME_LOWER", strides=[2, 2]), w, b, x),
        ("conv_same_upper_even_k", 17, dict(auto_pad="SAME_UPPER"), _rand(4, 3, 2, 2, seed=4), None, x),
        ("conv_valid", 13, dict(auto_pad="VALID", strides=[2, 2]), w, b, x),
        ("conv_dilated_nobias", 13, dict(dilations=[2, 2], pads=[2, 2, 2, 2]), w, None, x),
        ("conv_group", 13, dict(group=2), _rand(4, 2, 3, 3, seed=5), b, _rand(2, 4, 7, 7, seed=6)),
        ("conv1d", 13, dict(pads=[1, 1]), _rand(4, 3, 3, seed=7), b, _rand(2, 3, 10, seed=8)),
        ("conv3d", 18, dict(pads=[1, 1, 1, 1, 1, 1]), _rand(2, 3, 3, 3, 3, seed=9), None, _rand(1, 3, 5, 4, 6, seed=10)),
    ]
    return cases


@pytest.mark.parametrize("case", _conv_cases(), ids=lambda c: c[0])
def test_conv(case):
    _, opset, attrs, w, b, x = case
    inits = {"W": w} | ({"B": b} if b is not None else {})
    node = helper.make_node("Conv", ["x", "W"] + (["B"] if b is not None else []), ["y"], name="conv0", **attrs)
    model = _model([node], [("x", list(x.shape))], ["y"], inits, opset)
    module = _check(model, {"x": x})
    conv = module.get_submodule("conv0")
    assert isinstance(conv, nn.modules.conv._ConvNd)
    assert isinstance(conv.weight, nn.Parameter) and conv.weight.requires_grad
    assert module.onnx_tensors["conv0.weight"] == "W"


def test_conv_dynamic_same_padding_and_functional_weight():
    x = _rand(2, 3, 9, 8)
    w = _rand(4, 3, 3, 3, seed=1)
    # SAME with stride 2 and unknown spatial size: padding computed at run time
    node = helper.make_node("Conv", ["x", "W"], ["y"], name="c", auto_pad="SAME_UPPER", strides=[2, 2])
    model = _model([node], [("x", ["N", 3, "H", "W"])], ["y"], {"W": w}, 13)
    module = _check(model, {"x": x})
    _check(model, {"x": _rand(1, 3, 11, 6, seed=5)})
    assert isinstance(module.get_submodule("c"), nn.Conv2d)
    # weight fed at run time: functional convolution with asymmetric pads
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 0, 0, 2])
    model = _model([node], [("x", [2, 3, 9, 8]), ("w", [4, 3, 3, 3])], ["y"], opset=13)
    _check(model, {"x": x, "w": w})


def _pool_cases():
    x = _rand(2, 3, 9, 10, seed=11)
    cases = []
    for op in ("MaxPool", "AveragePool"):
        cases += [
            (op, 9, dict(kernel_shape=[2, 2], strides=[2, 2]), x),
            (op, 9, dict(kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1]), x),
            (op, 11, dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1), x),
            (op, 13, dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1), x),
            (op, 13, dict(kernel_shape=[3, 2], strides=[2, 2], pads=[0, 1, 2, 0]), x),
            (op, 17, dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER"), x),
            (op, 17, dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_LOWER"), x),
            (op, 21, dict(kernel_shape=[2, 2], strides=[2, 2], auto_pad="VALID"), x),
            (op, 13, dict(kernel_shape=[3], strides=[2], pads=[1, 1]), _rand(2, 3, 11, seed=12)),
            (op, 13, dict(kernel_shape=[2, 2, 2], strides=[2, 2, 2]), _rand(1, 2, 4, 5, 6, seed=13)),
        ]
    cases += [
        ("MaxPool", 11, dict(kernel_shape=[2, 2], dilations=[2, 2], strides=[1, 1]), x),
        ("MaxPool", 12, dict(kernel_shape=[3, 3], dilations=[2, 1], strides=[2, 2], ceil_mode=1, pads=[1, 0, 1, 0]), x),
        ("MaxPool", 11, dict(kernel_shape=[2, 2], storage_order=1), x),
        ("AveragePool", 13, dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1), x),
        ("AveragePool", 13, dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1,
                                 ceil_mode=1), x),
        ("AveragePool", 13, dict(kernel_shape=[3, 2], pads=[2, 0, 0, 1], count_include_pad=1), x),
        ("AveragePool", 19, dict(kernel_shape=[2, 2], dilations=[2, 2], pads=[1, 1, 1, 1]), x),
    ]
    return cases


@pytest.mark.parametrize("case", _pool_cases(), ids=lambda c: f"{c[0]}_{c[1]}_{sorted(c[2].items())}")
def test_pool(case):
    op, opset, attrs, x = case
    model = _model([helper.make_node(op, ["x"], ["y"], **attrs)], [("x", list(x.shape))], ["y"], opset=opset)
    _check(model, {"x": x})
    # the same with unknown spatial sizes (run-time padding)
    model = _model([helper.make_node(op, ["x"], ["y"], **attrs)], [("x", ["N", x.shape[1]] + ["?"] * (x.ndim - 2))],
                   ["y"], opset=opset)
    _check(model, {"x": x})


@pytest.mark.parametrize("op", ["GlobalAveragePool", "GlobalMaxPool"])
def test_global_pool(op):
    x = _rand(2, 3, 5, 4)
    _check(_model([helper.make_node(op, ["x"], ["y"])], [("x", [2, 3, 5, 4])], ["y"], opset=13), {"x": x})


@pytest.mark.parametrize("opset", [9, 11, 13, 17, 21])
def test_gemm_linear(opset):
    w, c = _rand(5, 6, seed=1), _rand(5, seed=2)
    node = helper.make_node("Gemm", ["x", "W", "C"], ["y"], name="fc", transB=1)
    module = _check(_model([node], [("x", ["N", 6])], ["y"], {"W": w, "C": c}, opset), {"x": _rand(3, 6)})
    fc = module.get_submodule("fc")
    assert isinstance(fc, nn.Linear) and isinstance(fc.weight, nn.Parameter) and fc.weight.requires_grad
    assert fc.bias.requires_grad and module.onnx_tensors == {"fc.weight": "W", "fc.bias": "C"}


@pytest.mark.parametrize("attrs,cshape", [
    (dict(transA=1, alpha=0.5, beta=2.0), [1, 5]),
    (dict(alpha=1.5), None),
    (dict(transB=1, beta=0.25), []),
    (dict(transB=0), [4, 5]),
])
def test_gemm_general(attrs, cshape):
    ta, tb = attrs.get("transA", 0), attrs.get("transB", 0)
    a = _rand(*((6, 4) if ta else (4, 6)), seed=3)
    w = _rand(*((5, 6) if tb else (6, 5)), seed=4)
    inits = {"W": w}
    ins = ["a", "W"]
    if cshape is not None:
        inits["C"] = _rand(*cshape, seed=5) if cshape else np.array(0.7, np.float32)
        ins.append("C")
    model = _model([helper.make_node("Gemm", ins, ["y"], name="g", **attrs)], [("a", list(a.shape))], ["y"], inits, 13)
    module = _check(model, {"a": a})
    assert isinstance(module.get_submodule("g").weight, nn.Parameter)
    # everything fed at run time: functional path
    feeds = {"a": a, "w": w} | ({"c": inits["C"]} if cshape is not None else {})
    model = _model([helper.make_node("Gemm", ["a", "w"] + (["c"] if cshape is not None else []), ["y"], **attrs)],
                   [(k, list(v.shape)) for k, v in feeds.items()], ["y"], opset=11)
    _check(model, feeds)


def test_matmul_and_bias():
    w, b = _rand(6, 5, seed=1), _rand(5, seed=2)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("Add", ["h", "B"], ["y"], name="bias"),
             helper.make_node("MatMul", ["y", "z"], ["o"], name="mm2")]
    model = _model(nodes, [("x", ["N", 3, 6]), ("z", [5, 2])], ["o"], {"W": w, "B": b}, 13)
    module = _check(model, {"x": _rand(2, 3, 6), "z": _rand(5, 2, seed=9)})
    assert isinstance(module.get_submodule("mm").weight, nn.Parameter)
    assert isinstance(module.get_submodule("bias").weight, nn.Parameter)
    assert module.onnx_tensors == {"mm.weight": "W", "bias.weight": "B"}


@pytest.mark.parametrize("opset", [9, 13, 14])
@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div"])
def test_binary(op, opset):
    k = (np.abs(_rand(1, 3, 1, 1, seed=4)) + 0.5).astype(np.float32)
    nodes = [helper.make_node(op, ["x", "y"], ["t"]), helper.make_node(op, ["K", "t"], ["u"], name="const")]
    model = _model(nodes, [("x", [2, 3, 4, 5]), ("y", [5])], ["u"], {"K": k}, opset)
    module = _check(model, {"x": _rand(2, 3, 4, 5), "y": np.abs(_rand(5, seed=2)) + 0.5})
    assert not list(module.parameters())  # a constant operand is not a layer weight
    model = _model([helper.make_node(op, ["x", "y"], ["z"])], [("x", [3], TensorProto.INT32), ("y", [3], TensorProto.INT32)],
                   [("z", [3], TensorProto.INT32)], opset=opset)
    _check(model, {"x": np.array([7, -7, 9], np.int32), "y": np.array([2, 2, -4], np.int32)})


def test_sum_and_activations():
    for opset in (9, 13, 21):
        nodes = [helper.make_node("Sum", ["a", "b", "c"], ["s"]),
                 helper.make_node("Relu", ["s"], ["r"]),
                 helper.make_node("LeakyRelu", ["s"], ["l"], alpha=0.2),
                 helper.make_node("LeakyRelu", ["s"], ["l2"]),
                 helper.make_node("Sigmoid", ["s"], ["g"]),
                 helper.make_node("Tanh", ["s"], ["t"]),
                 helper.make_node("Sum", ["a"], ["one"])]
        feeds = {n: _rand(2, 3, 4, seed=i) for i, n in enumerate("abc")}
        _check(_model(nodes, [(n, [2, 3, 4]) for n in "abc"], ["r", "l", "l2", "g", "t", "one"], opset=opset), feeds)


@pytest.mark.parametrize("opset,inputs,attrs", [
    (9, [], dict(min=-0.5, max=0.7)),
    (9, [], dict(max=0.2)),
    (11, ["lo"], {}),
    (13, ["lo", "hi"], {}),
    (13, ["", "hi"], {}),
    (13, [], {}),
])
def test_clip(opset, inputs, attrs):
    inits = {"lo": np.array(-0.3, np.float32), "hi": np.array(0.4, np.float32)}
    node = helper.make_node("Clip", ["x"] + inputs, ["y"], **attrs)
    _check(_model([node], [("x", [3, 4])], ["y"], {k: v for k, v in inits.items() if k in inputs}, opset),
           {"x": _rand(3, 4)})


@pytest.mark.parametrize("opset", [9, 11, 13, 18])
@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("axis", [None, 0, 1, -1, 2])
def test_softmax(op, opset, axis):
    attrs = {} if axis is None else {"axis": axis}
    model = _model([helper.make_node(op, ["x"], ["y"], **attrs)], [("x", [2, 3, 4])], ["y"], opset=opset)
    _check(model, {"x": _rand(2, 3, 4)})


@pytest.mark.parametrize("opset,axis", [(9, 0), (9, 1), (9, 2), (9, 4), (13, 3), (13, -1), (13, -3), (21, 1), (21, -4)])
def test_flatten(opset, axis):
    model = _model([helper.make_node("Flatten", ["x"], ["y"], axis=axis)], [("x", ["N", 3, 4, 5])], ["y"], opset=opset)
    _check(model, {"x": _rand(2, 3, 4, 5)})
    _check(model, {"x": _rand(3, 3, 4, 5)})


@pytest.mark.parametrize("opset,shape,allowzero", [
    (9, [0, -1], 0), (13, [0, -1], 0), (13, [-1, 12], 0), (14, [0, 3, -1], 0), (14, [2, 0, 30], 1), (21, [0, 5, 4, 3], 0),
])
def test_reshape(opset, shape, allowzero):
    attrs = {"allowzero": allowzero} if opset >= 14 else {}
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"], **attrs)]
    x = np.zeros((2, 0, 30), np.float32) if allowzero else _rand(2, 3, 4, 5)
    model = _model(nodes, [("x", ["N"] + list(x.shape[1:]))], ["y"], {"shape": np.array(shape, np.int64)}, opset)
    module = _check(model, {"x": x})
    if not allowzero:
        _check(model, {"x": _rand(*([4] + list(x.shape[1:])))})
    assert "_onnx_constants" not in module.code  # the shape is a literal in the generated forward


def test_reshape_shape_from_constant_and_dynamic_shape():
    nodes = [helper.make_node("Constant", [], ["s"], value=numpy_helper.from_array(np.array([0, -1], np.int64))),
             helper.make_node("Reshape", ["x", "s"], ["y"]),
             helper.make_node("Reshape", ["x", "t"], ["z"])]
    model = _model(nodes, [("x", ["N", 3, 4]), ("t", [2], TensorProto.INT64)], ["y", "z"], opset=13)
    _check(model, {"x": _rand(5, 3, 4), "t": np.array([-1, 4], np.int64)})


def test_transpose_concat_identity_constant():
    for opset in (9, 13, 21):
        nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1]),
                 helper.make_node("Transpose", ["x"], ["r"]),
                 helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(_rand(2, 4, 2, seed=3))),
                 helper.make_node("Concat", ["t", "k", "K"], ["c"], axis=-1 if opset >= 11 else 2),
                 helper.make_node("Identity", ["c"], ["y"])]
        feeds = {"x": _rand(2, 3, 4)}
        _check(_model(nodes, [("x", [2, 3, 4])], ["y", "r"], {"K": _rand(2, 4, 1, seed=4)}, opset), feeds)
    nodes = [helper.make_node("Constant", [], ["a"], value_float=1.5),
             helper.make_node("Constant", [], ["b"], value_floats=[1.0, 2.0]),
             helper.make_node("Constant", [], ["i"], value_ints=[2, 1]),
             helper.make_node("Add", ["x", "a"], ["xa"]), helper.make_node("Mul", ["xa", "b"], ["y"]),
             helper.make_node("Identity", ["i"], ["j"])]
    _check(_model(nodes, [("x", [3, 2])], ["y", ("j", [2], TensorProto.INT64)], opset=13), {"x": _rand(3, 2)})


def test_constant_of_shape():
    value = numpy_helper.from_array(np.array([2.5], np.float32))
    nodes = [helper.make_node("Constant", [], ["s"], value=numpy_helper.from_array(np.array([2, 3], np.int64))),
             helper.make_node("ConstantOfShape", ["s"], ["c"], value=value),
             helper.make_node("Add", ["x", "c"], ["y"]),
             helper.make_node("ConstantOfShape", ["t"], ["z"]),
             helper.make_node("ConstantOfShape", ["t"], ["zi"], value=numpy_helper.from_array(np.array([7], np.int64)))]
    model = _model(nodes, [("x", [2, 3]), ("t", [3], TensorProto.INT64)],
                   ["y", "z", ("zi", None, TensorProto.INT64)], opset=9)
    _check(model, {"x": _rand(2, 3), "t": np.array([1, 2, 2], np.int64)})


@pytest.mark.parametrize("opset", [9, 11, 13, 21])
def test_squeeze_unsqueeze(opset):
    axes_u, axes_s = [0, -1] if opset >= 11 else [0, 4], [1, -1] if opset >= 11 else [1, 4]
    if opset >= 13:
        nodes = [helper.make_node("Unsqueeze", ["x", "au"], ["u"]), helper.make_node("Squeeze", ["u", "as"], ["s"]),
                 helper.make_node("Squeeze", ["u"], ["all"])]
        inits = {"au": np.array(axes_u, np.int64), "as": np.array(axes_s, np.int64)}
    else:
        nodes = [helper.make_node("Unsqueeze", ["x"], ["u"], axes=axes_u),
                 helper.make_node("Squeeze", ["u"], ["s"], axes=axes_s),
                 helper.make_node("Squeeze", ["u"], ["all"])]
        inits = {}
    _check(_model(nodes, [("x", [1, 3, 4])], ["u", "s", "all"], inits, opset), {"x": _rand(1, 3, 4)})


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
@pytest.mark.parametrize("opset", [9, 11, 13, 18, 21])
def test_pad(mode, opset):
    pads = [0, 1, 2, 1, 0, 0, 1, 3]
    x = _rand(2, 3, 4, 5)
    if opset < 11:
        node = helper.make_node("Pad", ["x"], ["y"], mode=mode, pads=pads, value=0.5)
        inits = {}
    else:
        node = helper.make_node("Pad", ["x", "pads", "v"], ["y"], mode=mode)
        inits = {"pads": np.array(pads, np.int64), "v": np.array(0.5, np.float32)}
    _check(_model([node], [("x", list(x.shape))], ["y"], inits, opset), {"x": x})
    if opset >= 18:  # axes input, negative pads (crop)
        node = helper.make_node("Pad", ["x", "pads", "", "axes"], ["y"], mode=mode)
        inits = {"pads": np.array([1, -1, 2, 1], np.int64), "axes": np.array([-1, 2], np.int64)}
        if mode != "constant":
            inits["pads"] = np.array([1, 0, 2, 1], np.int64)
        _check(_model([node], [("x", list(x.shape))], ["y"], inits, opset), {"x": x})


@pytest.mark.parametrize("size", [3, 5])
def test_lrn(size):
    node = helper.make_node("LRN", ["x"], ["y"], size=size, alpha=0.001, beta=0.75, bias=2.0)
    _check(_model([node], [("x", [2, 7, 4, 3])], ["y"], opset=13), {"x": _rand(2, 7, 4, 3, scale=3.0)})


def test_lrn_even_size_against_the_spec():
    """onnxruntime refuses even sizes; the spec's window is [c - 1, c + 2] for size 4."""
    x = _rand(2, 7, 3, 2, scale=3.0)
    node = helper.make_node("LRN", ["x"], ["y"], size=4, alpha=0.01, beta=0.5, bias=1.5)
    got = _torch(to_torch(_model([node], [("x", list(x.shape))], ["y"], opset=13)), {"x": x}, ["x"])[0]
    sq = np.zeros_like(x)
    for c in range(7):
        sq[:, c] = (x[:, max(0, c - 1):min(7, c + 3)] ** 2).sum(axis=1)
    assert _rel(got, x / (1.5 + 0.01 / 4 * sq) ** 0.5) <= RTOL


@pytest.mark.parametrize("opset", [9, 12, 13, 22])
def test_dropout(opset):
    x = _rand(8, 64)
    if opset >= 12:
        node = helper.make_node("Dropout", ["x", "r"], ["y", "mask"], name="drop")
        model = _model([node], [("x", [8, 64])], ["y", ("mask", None, TensorProto.BOOL)],
                       {"r": np.array(0.3, np.float32)}, opset)
    else:
        node = helper.make_node("Dropout", ["x"], ["y"], name="drop", ratio=0.3)
        model = _model([node], [("x", [8, 64])], ["y"], opset=opset)
    module = _check(model, {"x": x})
    drop = module.get_submodule("drop")
    assert isinstance(drop, nn.Dropout) and drop.p == pytest.approx(0.3)
    module.train()
    torch.manual_seed(0)
    t = torch.from_numpy(x)
    first, second = module(t), module(t)
    if opset >= 12:
        first, second = first[0], second[0]
    assert not torch.equal(first, second)
    assert (first == 0).float().mean().item() == pytest.approx(0.3, abs=0.1)
    module.eval()
    a, b = module(t), module(t)
    if opset >= 12:
        assert torch.all(a[1])
        a, b = a[0], b[0]
    assert torch.equal(a, b) and torch.equal(a, t)


@pytest.mark.parametrize("opset,rank", [(9, 4), (14, 4), (15, 2), (15, 3), (21, 5), (9, 2)])
def test_batchnorm(opset, rank):
    c = 3
    shape = [2, c, 4, 5, 3][:rank]
    inits = {"s": _rand(c, seed=1), "b": _rand(c, seed=2), "m": _rand(c, seed=3), "v": np.abs(_rand(c, seed=4)) + 0.1}
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], name="bn", epsilon=1e-3, momentum=0.8)
    module = _check(_model([node], [("x", ["N"] + shape[1:])], ["y"], inits, opset), {"x": _rand(*shape, seed=5)})
    bn = module.get_submodule("bn")
    expect = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[rank]
    assert type(bn) is expect
    assert bn.momentum == pytest.approx(0.2) and bn.eps == pytest.approx(1e-3)
    np.testing.assert_array_equal(bn.running_mean.numpy(), inits["m"])
    np.testing.assert_array_equal(bn.running_var.numpy(), inits["v"])
    assert isinstance(bn.weight, nn.Parameter) and isinstance(bn.bias, nn.Parameter)
    # scale/B/mean/var fed at run time: functional, inference semantics
    model = _model([helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"])],
                   [("x", shape)] + [(k, [c]) for k in "sbmv"], ["y"], opset=opset)
    _check(model, {"x": _rand(*shape, seed=5)} | inits)


def test_batchnorm_default_momentum_is_torch_0_1():
    inits = {k: np.ones(3, np.float32) for k in "sbmv"}
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], name="bn")
    module = to_torch(_model([node], [("x", ["N", 3, 4, 4])], ["y"], inits, 13))
    assert isinstance(module.bn, nn.BatchNorm2d)
    assert module.bn.momentum == pytest.approx(0.1) and module.bn.eps == pytest.approx(1e-5)


# ============================================================================ errors

def test_unsupported_op_names_op_opset_node():
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("GridSample", ["r", "grid"], ["y"], name="foo")]
    model = _model(nodes, [("x", [1, 1, 2, 2])], ["y"], {"grid": np.zeros((1, 2, 2, 2), np.float32)}, 17)
    with pytest.raises(UserError, match=r"cannot import node 'foo' \(GridSample, opset 17\): op not supported"):
        to_torch(model)


def test_unsupported_attribute_and_output():
    # MaxPool's Indices and BN's training_mode=1 import (tests/test_import_extra_outputs.py); BN's
    # training outputs before opset 14 (saved mean/var of the old definition) are still refused
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y", "rm", "rv"], name="bnt")
    inits = {k: np.ones(2, np.float32) for k in "sbmv"}
    with pytest.raises(UserError, match=r"'bnt' \(BatchNormalization, opset 12\): training outputs"):
        to_torch(_model([node], [("x", [2, 2])], ["y", "rm", "rv"], inits, 12))
    node = helper.make_node("Relu", ["x"], ["y"], name="r", domain="com.example")
    model = _model([node], [("x", [2])], ["y"], opset=13)
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(UserError, match="domain 'com.example'"):
        to_torch(model)


def test_missing_file_is_user_error(tmp_path):
    with pytest.raises(UserError):
        to_torch(tmp_path / "nope.onnx")


# ============================================================================ VGG-like graph

def _vgg_like(opset=13, seed=0, ir=None, inits_as_inputs=False):
    rng = np.random.default_rng(seed)

    def r(*s, scale=0.2):
        return (rng.standard_normal(s) * scale).astype(np.float32)
    inits = {
        "c1.w": r(8, 3, 3, 3), "c1.b": r(8), "c2.w": r(8, 8, 3, 3), "c2.b": r(8),
        "bn.scale": (1 + r(8)).astype(np.float32), "bn.B": r(8), "bn.mean": r(8),
        "bn.var": (np.abs(r(8)) + 0.5).astype(np.float32),
        "c3.w": r(16, 8, 3, 3),
        "fc1.w": r(32, 16 * 4 * 4, scale=0.05), "fc1.b": r(32), "fc2.w": r(10, 32), "fc2.b": r(10),
        "fc3.w": r(32, 10) if opset >= 11 else r(10, 32), "shape": np.array([0, -1], np.int64),
    }
    drop = [helper.make_node("Dropout", ["a5"], ["d5"], name="drop", ratio=0.5)] if opset < 12 else \
        [helper.make_node("Dropout", ["a5", "ratio"], ["d5"], name="drop")]
    if opset >= 12:
        inits["ratio"] = np.array(0.5, np.float32)
    bn_attrs = {"spatial": 1} if opset < 9 else {}
    if opset in (11, 17):
        del inits["shape"]
    nodes = [
        helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["a1"], name="features/conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a1"], ["r1"], name="features/relu1"),
        helper.make_node("Conv", ["r1", "c2.w", "c2.b"], ["a2"], name="features/conv2", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["a2", "bn.scale", "bn.B", "bn.mean", "bn.var"], ["n2"],
                         name="features/bn2", momentum=0.9, **bn_attrs),
        helper.make_node("Relu", ["n2"], ["r2"], name="features/relu2"),
        helper.make_node("MaxPool", ["r2"], ["p2"], name="features/pool2", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p2", "c3.w"], ["a3"], name="features/conv3", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a3"], ["r3"], name="features/relu3"),
        helper.make_node("MaxPool", ["r3"], ["p3"], name="features/pool3", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p3"], ["f"], name="flatten") if opset in (11, 17) else
        helper.make_node("Reshape", ["p3", "shape"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc1.w", "fc1.b"], ["a5"], name="classifier/fc1", transB=1),
        *drop,
        helper.make_node("Relu", ["d5"], ["r5"], name="classifier/relu1"),
        helper.make_node("Gemm", ["r5", "fc2.w", "fc2.b"], ["logits"], name="classifier/fc2", transB=1),
        # no bias; Gemm's C is optional from opset 11 only
        helper.make_node("Gemm", ["logits", "fc3.w"], ["proj"], name="classifier/fc3", transB=1) if opset >= 11 else
        helper.make_node("MatMul", ["logits", "fc3.w"], ["proj"], name="classifier/fc3"),
    ]
    model = _model(nodes, [("x", ["N", 3, 16, 16])], [("logits", ["N", 10]), ("proj", ["N", 32])], inits, opset, ir=ir)
    if inits_as_inputs:
        for t in model.graph.initializer:
            model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    model.metadata_props.add(key="author", value="tests")
    model.producer_name = "onnxbn-tests"
    return model


@pytest.mark.parametrize("opset", [9, 11, 13, 17, 21])
def test_vgg_like_matches_onnxruntime_dynamic_batch(opset):
    model = _vgg_like(opset)
    module = to_torch(model)
    for batch in (1, 5):
        x = _rand(batch, 3, 16, 16, seed=batch)
        ref = _ort(model, {"x": x})
        got = _torch(module, {"x": x}, ["x"])
        assert [_rel(g, r) <= RTOL for g, r in zip(got, ref, strict=True)] == [True, True]
    assert module.onnx_names["features_conv1"] == "features/conv1"
    assert module.onnx_names["classifier_fc2"] == "classifier/fc2"
    assert isinstance(module.features_bn2, nn.BatchNorm2d) and module.features_bn2.momentum == pytest.approx(0.1)
    assert isinstance(module.classifier_fc1, nn.Linear) and isinstance(module.drop, nn.Dropout)
    params = dict(module.named_parameters())
    for key in ("features_conv1.weight", "features_conv2.bias", "classifier_fc1.weight", "classifier_fc3.weight"):
        assert params[key].requires_grad
    assert module.features_conv3.bias is None
    assert getattr(module.classifier_fc3, "bias", None) is None
    assert "_onnx_constants" not in module.code  # the Reshape shape was resolved at import


def test_ir3_initializers_listed_as_inputs():
    model = _vgg_like(9, ir=3, inits_as_inputs=True)
    assert len(model.graph.input) > 1
    module = to_torch(model)
    assert module.onnx_inputs == ["x"]
    x = _rand(3, 3, 16, 16)
    ref = _ort(model, {"x": x})
    got = _torch(module, {"x": x}, ["x"])
    assert all(_rel(g, r) <= RTOL for g, r in zip(got, ref, strict=True))


def test_names_sanitised_unique_deterministic():
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="1 odd/name:0"),
             helper.make_node("Dropout", ["a"], ["b"], name="forward"),
             helper.make_node("Dropout", ["b"], ["c"], name="forward"),
             helper.make_node("Dropout", ["c"], ["d"], name=""),
             helper.make_node("Dropout", ["d"], ["e"], name="class"),
             helper.make_node("Relu", ["e"], ["f"], name="torch"),
             helper.make_node("Sigmoid", ["f"], ["g"], name="self"),
             helper.make_node("Tanh", ["g"], ["h"], name="operator")]
    model = _model(nodes, [("x", [2])], ["h"], opset=11)
    got = _torch(to_torch(model), {"x": np.array([-1.0, 2.0], np.float32)}, ["x"])[0]
    np.testing.assert_allclose(got, np.tanh(1 / (1 + np.exp(-np.array([0.0, 2.0])))), rtol=1e-6)
    m1, m2 = to_torch(model), to_torch(model)
    assert m1.onnx_names == m2.onnx_names
    assert m1.onnx_names == {"forward_": "forward", "forward__1": "forward", "dropout_3": "", "class_": "class"}
    assert "torch.nn.functional.relu(" in m1.code
    copied = copy.deepcopy(m1)
    assert copied.onnx_tensors == m1.onnx_tensors and copied.onnx_names == m1.onnx_names


# ============================================================================ write-back

def _sgd_step(module, seed=0, lr=0.05):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 3, 16, 16, generator=g)
    y = torch.randint(0, 10, (6,), generator=g)
    module.train()
    torch.manual_seed(seed)
    opt = torch.optim.SGD(module.parameters(), lr=lr)
    logits, proj = module(x)
    loss = nn.functional.cross_entropy(logits, y) + proj.pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    module.eval()


@pytest.mark.parametrize("opset", [9, 13, 21])
def test_write_back_round_trip(opset, tmp_path):
    model = _vgg_like(opset)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    module = to_torch(path)
    bn_mean_before = module.features_bn2.running_mean.clone()
    _sgd_step(module)
    assert not torch.equal(bn_mean_before, module.features_bn2.running_mean)
    out = write_back(module, path)
    # onnxruntime on the written model == torch eval output
    x = _rand(4, 3, 16, 16, seed=7)
    got = _torch(module, {"x": x}, ["x"])
    ref = _ort(out, {"x": x})
    assert all(_rel(g, r) <= RTOL for g, r in zip(got, ref, strict=True))
    before = _ort(model, {"x": x})
    assert _rel(before[0], ref[0]) > 1e-3  # the weights really changed
    # same nodes, names, opset, metadata (plus provenance), same initializer set and dtypes
    assert [(n.op_type, n.name) for n in out.graph.node] == [(n.op_type, n.name) for n in model.graph.node]
    assert [(n.input, n.output) for n in out.graph.node] == [(n.input, n.output) for n in model.graph.node]
    assert list(out.opset_import) == list(model.opset_import) and out.ir_version == model.ir_version
    assert out.producer_name == model.producer_name
    meta = {p.key: p.value for p in out.metadata_props}
    assert meta["author"] == "tests"
    info = json.loads(meta["onnxbn.write_back"])
    assert info["tensors"] == len(module.onnx_tensors) == 14  # conv w+b x2, conv w, BN 4, fc1 w+b, fc2 w+b, fc3 w
    assert info["changed"] == 14
    old = {t.name: t for t in model.graph.initializer}
    new = {t.name: t for t in out.graph.initializer}
    assert list(old) == list(new)
    assert all(old[k].data_type == new[k].data_type and list(old[k].dims) == list(new[k].dims) for k in old)
    np.testing.assert_array_equal(numpy_helper.to_array(new["bn.mean"]), module.features_bn2.running_mean.numpy())
    np.testing.assert_array_equal(numpy_helper.to_array(new["shape"]), numpy_helper.to_array(old["shape"]))
    assert [i.name for i in out.graph.input] == [i.name for i in model.graph.input]


def test_write_back_untrained_is_identity_and_checks_shapes():
    model = _vgg_like(13)
    module = to_torch(model)
    out = write_back(module, model)
    for a, b in zip(model.graph.initializer, out.graph.initializer, strict=True):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
    assert json.loads({p.key: p.value for p in out.metadata_props}["onnxbn.write_back"]) == {"tensors": 14, "changed": 0}
    module.classifier_fc1.bias = nn.Parameter(torch.zeros(31))
    with pytest.raises(UserError, match="shape"):
        write_back(module, model)
    other = _vgg_like(11)
    with pytest.raises(UserError, match="different model"):
        write_back(to_torch(model), other)


def test_write_back_ir3_and_float16_dtype():
    model = _vgg_like(9, ir=3, inits_as_inputs=True)
    module = to_torch(model)
    _sgd_step(module)
    out = write_back(module, model)
    x = _rand(2, 3, 16, 16)
    assert all(_rel(g, r) <= RTOL for g, r in zip(_torch(module, {"x": x}, ["x"]), _ort(out, {"x": x}), strict=True))
    # a float16 initializer keeps its dtype
    w = _rand(4, 6).astype(np.float16)
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    m16 = _model([node], [("x", [2, 4], TensorProto.FLOAT16)], [("y", [2, 6], TensorProto.FLOAT16)], {"W": w}, 13)
    mod16 = to_torch(m16)
    with torch.no_grad():
        mod16.mm.weight.mul_(2)
    out16 = write_back(mod16, m16)
    assert out16.graph.initializer[0].data_type == TensorProto.FLOAT16
    np.testing.assert_array_equal(numpy_helper.to_array(out16.graph.initializer[0]), w * 2)


def test_split_at_prefix_suffix():
    model = _vgg_like(13)
    module = to_torch(model).eval()
    prefix, suffix = split_at(module, "features/pool3")
    x = torch.from_numpy(_rand(3, 3, 16, 16))
    with torch.no_grad():
        feats = prefix(x)
        out = suffix(*(feats if isinstance(feats, tuple) else (feats,)))
        ref = module(x)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    assert feats.shape == (3, 16, 4, 4)
    assert suffix.classifier_fc1.weight is module.classifier_fc1.weight
    assert "features_conv1" not in dict(suffix.named_modules())
    with pytest.raises(UserError):
        split_at(module, "nope")


# ============================================================================ training parity

class _Hand(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.bn(self.conv(x))), 1))


def _export_by_hand(net: _Hand) -> onnx.ModelProto:
    sd = {k: v.detach().numpy() for k, v in net.state_dict().items() if k != "bn.num_batches_tracked"}
    nodes = [helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"],
                              ["b"], name="bn", momentum=0.9, epsilon=1e-5),
             helper.make_node("Relu", ["b"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["y"], name="fc", transB=1)]
    return _model(nodes, [("x", ["N", 3, 8, 8])], [("y", ["N", 5])], sd, 13)


def test_training_parity_with_hand_written_module():
    torch.manual_seed(0)
    hand = _Hand()
    with torch.no_grad():
        hand.bn.running_mean.uniform_(-0.5, 0.5)
        hand.bn.running_var.uniform_(0.5, 1.5)
        hand.bn.weight.uniform_(0.5, 1.5)
    model = _export_by_hand(hand)
    imported = to_torch(model)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(5)]
    curves = []
    for net in (hand, imported):
        net.train()
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        losses = []
        for x, y in data:
            loss = nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves.append(np.array(losses))
    assert curves[0][0] != curves[0][-1]
    np.testing.assert_allclose(curves[1], curves[0], rtol=1e-5)
    np.testing.assert_allclose(imported.bn.running_mean.numpy(), hand.bn.running_mean.numpy(), rtol=1e-5, atol=1e-7)
    # and the written-back ONNX model computes what the hand-written module computes
    hand.eval()
    out = write_back(imported, model)
    x = data[0][0].numpy()
    with torch.no_grad():
        ref = hand(data[0][0]).numpy()
    assert _rel(_ort(out, {"x": x})[0], ref) <= RTOL


def test_dropout_module_type():
    assert issubclass(OnnxDropout, nn.Dropout)


# ============================================================================ the ops of today's vision models
# Each op at every opset from 9 to 22 where its definition changes (`_versions`), judged by onnxruntime.

I64, BOOL = TensorProto.INT64, TensorProto.BOOL


def _versions(op: str, lo: int = 9, hi: int = 22) -> list[int]:
    """The opsets in [lo, hi] at which `op` exists with a definition different from the opset before."""
    out, since = [], None
    for v in range(lo, hi + 1):
        try:
            s = onnx.defs.get_schema(op, v).since_version
        except onnx.defs.SchemaError:
            continue
        if s != since:
            out.append(v)
            since = s
    return out


def _typed(model):
    """The model with its graph outputs typed by onnx's shape inference (outputs given by name only)."""
    return onnx.shape_inference.infer_shapes(model)


def _check_any(nodes, feeds, outputs, inits=(), opset=13, tol=RTOL):
    """Build a model with `feeds` as typed inputs, compare to_torch with onnxruntime: same dtype and
    shape, floats within `tol` (relative to the largest reference value), other types exactly."""
    inputs = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
              for k, v in feeds.items()]
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in dict(inits).items()]
    graph = helper.make_graph(nodes, "g", inputs, [onnx.ValueInfoProto(name=o) for o in outputs], inits)
    model = _typed(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=_ir(opset)))
    ref = _ort(model, feeds)
    got = _torch(to_torch(model), feeds, list(feeds))
    for r, g in zip(ref, got, strict=True):
        assert g.dtype == r.dtype and g.shape == r.shape, (g.dtype, r.dtype, g.shape, r.shape)
        if r.dtype.kind == "f":
            assert _rel(g, r) <= tol, _rel(g, r)
        else:
            np.testing.assert_array_equal(g, r)
    return model


_UNARY_INPUT = {"Log": lambda x: np.abs(x) + 0.1, "Sqrt": lambda x: np.abs(x), "Reciprocal": lambda x: np.abs(x) + 0.5}
_UNARY_ATTRS = {"Elu": dict(alpha=0.7), "Selu": dict(alpha=1.5, gamma=1.1), "Celu": dict(alpha=2.0),
                "HardSigmoid": dict(alpha=0.3, beta=0.4), "ThresholdedRelu": dict(alpha=0.3)}
_UNARY = ["Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Erf", "Sin", "Cos", "Floor", "Ceil", "Round", "Sign",
          "HardSigmoid", "HardSwish", "Elu", "Selu", "Celu", "Softplus", "Softsign", "Mish", "ThresholdedRelu"]


@pytest.mark.parametrize("op,opset", [(op, v) for op in _UNARY for v in _versions(op)])
def test_unary(op, opset):
    x = _rand(2, 3, 5, seed=1, scale=2.0)
    x.flat[:4] = [0.5, -0.5, 1.5, -2.5]  # Round: halves to even
    x = _UNARY_INPUT.get(op, lambda v: v)(x).astype(np.float32)
    _check_any([helper.make_node(op, ["x"], ["y"])], {"x": x}, ["y"], opset=opset)
    if op in _UNARY_ATTRS:
        _check_any([helper.make_node(op, ["x"], ["y"], **_UNARY_ATTRS[op])], {"x": x}, ["y"], opset=opset)


@pytest.mark.parametrize("opset", [20, 22])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu(opset, approximate):
    _check_any([helper.make_node("Gelu", ["x"], ["y"], approximate=approximate)], {"x": _rand(3, 7)}, ["y"],
               opset=opset)


@pytest.mark.parametrize("opset", _versions("PRelu"))
def test_prelu_trainable_slope(opset):
    slope = _rand(3, 1, 1, seed=2)
    x = _rand(2, 3, 4, 4)
    model = _check_any([helper.make_node("PRelu", ["x", "slope"], ["y"], name="act")], {"x": x}, ["y"],
                       {"slope": slope}, opset)
    module = to_torch(model)
    assert isinstance(module.act.weight, nn.Parameter) and module.onnx_tensors["act.weight"] == "slope"
    # slope as a run-time input (broadcast from the last axis)
    _check_any([helper.make_node("PRelu", ["x", "s"], ["y"])], {"x": x, "s": _rand(4, seed=3)}, ["y"], opset=opset)


@pytest.mark.parametrize("op,opset", [(op, v) for op in ("Min", "Max", "Mean") for v in _versions(op)])
def test_variadic(op, opset):
    feeds = {"a": _rand(2, 3, 4, seed=1), "b": _rand(3, 1, seed=2), "c": _rand(4, seed=3)}
    _check_any([helper.make_node(op, ["a", "b", "c"], ["y"]), helper.make_node(op, ["a"], ["one"])],
               feeds, ["y", "one"], opset=opset)
    if op != "Mean" and opset >= 12:  # integer inputs from opset 12
        ints = {"a": np.array([[1, -5], [7, 2]], np.int64), "b": np.array([3, 0], np.int64)}
        _check_any([helper.make_node(op, ["a", "b"], ["y"])], ints, ["y"], opset=opset)


@pytest.mark.parametrize("op,opset", [(op, v) for op in ("Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual",
                                                         "And", "Or", "Not", "Where", "Pow")
                                      for v in _versions(op)])
def test_compare_logic_where_pow(op, opset):
    a, b = _rand(2, 3, seed=1), _rand(3, seed=2)
    a[0, :] = b  # ties
    if op in ("And", "Or"):
        feeds = {"a": a > 0, "b": b > 0}
    elif op == "Not":
        feeds = {"a": a > 0}
    elif op == "Where":
        feeds = {"c": a > 0, "a": a, "b": b}
    elif op == "Pow":
        feeds = {"a": np.abs(a) + 0.1, "b": b}
    elif op == "Equal" and opset < 11:  # integers only before 11
        feeds = {"a": (a * 3).astype(np.int64), "b": (b * 3).astype(np.int64)}
    else:
        feeds = {"a": a, "b": b}
    _check_any([helper.make_node(op, list(feeds), ["y"])], feeds, ["y"], opset=opset)
    if op == "Equal":
        _check_any([helper.make_node(op, ["a", "b"], ["y"])], {"a": np.array([1, 2, 3]), "b": np.array([3, 2, 1])},
                   ["y"], opset=opset)
    if op == "Pow" and opset >= 12:  # integer exponent, integer base
        _check_any([helper.make_node(op, ["a", "b"], ["y"])], {"a": _rand(4), "b": np.array([2, 3, 0, 1])},
                   ["y"], opset=opset)
        _check_any([helper.make_node(op, ["a", "b"], ["y"])], {"a": np.array([2, 3, 4]), "b": np.array([2, 1, 0])},
                   ["y"], opset=opset)


@pytest.mark.parametrize("opset", sorted(set(_versions("Cast")) | set(_versions("CastLike"))))
def test_cast_and_cast_like(opset):
    x = np.array([[-2.7, -0.5, 0.0, 0.4, 3.9, 200.0]], np.float32)
    targets = [TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.INT32, TensorProto.INT64, TensorProto.INT8,
               TensorProto.UINT8, TensorProto.BOOL]
    nodes = [helper.make_node("Cast", ["x"], [f"y{t}"], to=t) for t in targets if t != TensorProto.UINT8]
    outputs = [n.output[0] for n in nodes]
    if opset >= 15:
        nodes.append(helper.make_node("CastLike", ["x", "like"], ["z"]))
        outputs.append("z")
        _check_any(nodes, {"x": x, "like": np.array([1], np.int32)}, outputs, opset=opset)
    else:
        _check_any(nodes, {"x": x}, outputs, opset=opset)
    # INT4 and the other narrow types import (tests/test_narrow_types.py); strings do not
    node = helper.make_node("Cast", ["x"], ["y"], to=TensorProto.STRING)
    model = _model([node], [("x", [1, 6])], [("y", [1, 6], TensorProto.STRING)], opset=opset)
    with pytest.raises(UserError, match=r"\(Cast, opset \d+\): to=STRING is not supported"):
        to_torch(model)


@pytest.mark.parametrize("to", [TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E4M3FNUZ, TensorProto.FLOAT8E5M2,
                                TensorProto.FLOAT8E5M2FNUZ])
@pytest.mark.parametrize("saturate", [1, 0])
def test_cast_float8_rounds_and_saturates(to, saturate):
    x = np.array([0.0, -0.3, 1.0e-3, 0.1, 2.7, -17.3, 300.0, 464.0, 470.0, 1.0e5, -1.0e6, np.inf, -np.inf, np.nan],
                 np.float32)
    nodes = [helper.make_node("Cast", ["x"], ["q"], to=to, saturate=saturate),
             helper.make_node("Cast", ["q"], ["y"], to=TensorProto.FLOAT)]
    model = _typed(_model(nodes, [("x", [14])], [("y", [14])], opset=19))
    ref = _ort(model, {"x": x})[0]
    got = _torch(to_torch(model), {"x": x}, ["x"])[0]
    np.testing.assert_array_equal(got, ref)


def test_unsupported_input_type_refused():
    model = _model([helper.make_node("Identity", ["x"], ["y"])], [("x", [2], TensorProto.STRING)],
                   [("y", [2], TensorProto.STRING)], opset=13)
    with pytest.raises(UserError, match=r"graph input 'x' \(opset 13\): element type STRING is not supported"):
        to_torch(model)


def test_uint32_held_as_int64():
    feeds = {"a": np.array([1, 4000000000], np.uint32), "b": np.array([3, 5], np.uint32)}
    _check_any([helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("Less", ["a", "b"], ["l"]),
                helper.make_node("Max", ["a", "b"], ["m"])], feeds, ["s", "l", "m"], opset=13)


# ---------------------------------------------------------------- shape and indexing

@pytest.mark.parametrize("opset", sorted(set(_versions("Shape")) | set(_versions("Size"))))
def test_shape_size(opset):
    x = _rand(2, 3, 4)
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Size", ["x"], ["n"])]
    outputs = ["s", "n"]
    if opset >= 15:
        nodes += [helper.make_node("Shape", ["x"], ["s1"], start=1), helper.make_node("Shape", ["x"], ["s2"], end=-1),
                  helper.make_node("Shape", ["x"], ["s3"], start=-2, end=10)]
        outputs += ["s1", "s2", "s3"]
    _check_any(nodes, {"x": x}, outputs, opset=opset)


@pytest.mark.parametrize("opset", sorted(set(_versions("Gather")) | set(_versions("GatherElements"))))
def test_gather(opset):
    x = _rand(3, 4, 5)
    feeds = {"x": x, "i": np.array([[0, -1], [2, 1]], np.int64), "j": np.array(-2, np.int64),
             "e": np.array([[[1, -1, 0, 2, 3]] * 4] * 3, np.int64)[:, :2]}
    nodes = [helper.make_node("Gather", ["x", "i"], ["g0"], axis=1), helper.make_node("Gather", ["x", "j"], ["g1"]),
             helper.make_node("Gather", ["x", "i"], ["g2"], axis=-1),
             helper.make_node("GatherElements", ["x", "e"], ["ge"], axis=1) if opset >= 11 else
             helper.make_node("Identity", ["x"], ["ge"])]
    _check_any(nodes, feeds, ["g0", "g1", "g2", "ge"], opset=opset)


@pytest.mark.parametrize("opset", _versions("Slice"))
def test_slice(opset):
    x = _rand(4, 5, 6)
    if opset < 10:
        nodes = [helper.make_node("Slice", ["x"], ["y"], starts=[1, -4], ends=[100, -1], axes=[0, 2]),
                 helper.make_node("Slice", ["x"], ["z"], starts=[0, 1, 2], ends=[2, 3, 4])]
        _check_any(nodes, {"x": x}, ["y", "z"], opset=opset)
        return
    inits = {"st": np.array([1, -4, 5], np.int64), "en": np.array([100, -1, -100], np.int64),
             "ax": np.array([0, 2, 1], np.int64), "sp": np.array([2, 1, -2], np.int64)}
    nodes = [helper.make_node("Slice", ["x", "st", "en", "ax", "sp"], ["y"]),
             helper.make_node("Slice", ["x", "st", "en"], ["z"])]
    _check_any(nodes, {"x": x}, ["y", "z"], inits, opset)


@pytest.mark.parametrize("opset", _versions("Split"))
def test_split(opset):
    x = _rand(2, 7, 3)
    if opset < 13:
        nodes = [helper.make_node("Split", ["x"], ["a", "b", "c"], axis=1, split=[2, 4, 1]),
                 helper.make_node("Split", ["x"], ["d", "e"], axis=-1, split=[1, 2])]
        _check_any(nodes, {"x": x}, ["a", "b", "c", "d", "e"], opset=opset)
    else:
        nodes = [helper.make_node("Split", ["x", "sp"], ["a", "b", "c"], axis=1),
                 helper.make_node("Split", ["x", "sp2"], ["d", "e"], axis=-1)]
        _check_any(nodes, {"x": x}, ["a", "b", "c", "d", "e"], {"sp": np.array([2, 4, 1]), "sp2": np.array([1, 2])},
                   opset)
    if opset >= 18:  # num_outputs: ceil(7 / 3) = 3, 3, 1
        _check_any([helper.make_node("Split", ["x"], ["a", "b", "c"], axis=1, num_outputs=3)], {"x": x},
                   ["a", "b", "c"], opset=opset)
    else:  # equal parts
        _check_any([helper.make_node("Split", ["x"], ["a", "b", "c"], axis=2)], {"x": x}, ["a", "b", "c"], opset=opset)


@pytest.mark.parametrize("op,opset", [(op, v) for op in ("Expand", "Tile", "Range") for v in _versions(op)])
def test_expand_tile_range(op, opset):
    x = _rand(3, 1)
    if op == "Expand":
        _check_any([helper.make_node(op, ["x", "s"], ["y"]), helper.make_node(op, ["x", "t"], ["z"])], {"x": x},
                   ["y", "z"], {"s": np.array([2, 1, 4]), "t": np.array([1, 1])}, opset)
    elif op == "Tile":
        _check_any([helper.make_node(op, ["x", "r"], ["y"])], {"x": x}, ["y"], {"r": np.array([2, 3])}, opset)
    else:
        feeds = {"a": np.array(1.5, np.float32), "b": np.array(-2.0, np.float32), "d": np.array(-0.75, np.float32),
                 "i": np.array(10), "j": np.array(2), "k": np.array(-3)}
        _check_any([helper.make_node(op, ["a", "b", "d"], ["y"]), helper.make_node(op, ["i", "j", "k"], ["z"])],
                   feeds, ["y", "z"], opset=opset)


@pytest.mark.parametrize("op,opset", [(op, v) for op in ("DepthToSpace", "SpaceToDepth") for v in _versions(op)])
def test_depth_space(op, opset):
    x = _rand(2, 8, 3, 4) if op == "DepthToSpace" else _rand(2, 2, 6, 4)
    modes = ["DCR", "CRD"] if op == "DepthToSpace" and opset >= 11 else [None]
    for mode in modes:
        attrs = {"mode": mode} if mode else {}
        _check_any([helper.make_node(op, ["x"], ["y"], blocksize=2, **attrs)], {"x": x}, ["y"], opset=opset)


@pytest.mark.parametrize("opset", _versions("Einsum"))
@pytest.mark.parametrize("equation,shapes", [("bij, bjk -> bik", [(2, 3, 4), (2, 4, 5)]), ("...ii->...i", [(3, 4, 4)]),
                                             ("ij->", [(3, 4)]), ("nchw,c->nhw", [(2, 3, 4, 5), (3,)])])
def test_einsum(opset, equation, shapes):
    feeds = {f"x{i}": _rand(*s, seed=i) for i, s in enumerate(shapes)}
    _check_any([helper.make_node("Einsum", list(feeds), ["y"], equation=equation)], feeds, ["y"], opset=opset)


# ---------------------------------------------------------------- Resize, Upsample

_COORD = ["half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "tf_crop_and_resize"]


def _resize_variants(opset):
    """(attrs, roi, scales, sizes, axes) for Resize at `opset`: every mode, coordinate mode and nearest mode.

    Not here: align_corners / tf_crop_and_resize with scales whose n * scale is not a whole number,
    where onnxruntime divides by the integer output length and the ONNX reference (whose backend
    test data the importer follows, tests/test_conformance.py) by n * scale."""
    up, down = np.array([1, 1, 2.0, 1.5], np.float32), np.array([1, 1, 0.5, 0.8], np.float32)
    sizes = np.array([2, 3, 7, 3], np.int64)
    roi = np.array([0, 0, 0.1, 0.3, 1, 1, 0.8, 0.9], np.float32)
    out = []
    for coord in _COORD + (["half_pixel_symmetric"] if opset >= 19 else []):
        for mode in ("nearest", "linear", "cubic"):
            attrs = dict(mode=mode, coordinate_transformation_mode=coord)
            r = roi if coord == "tf_crop_and_resize" else None
            if coord == "tf_crop_and_resize":
                attrs["extrapolation_value"] = -1.0
            out += [(attrs, r, up, None, None), (attrs, r, None, sizes, None)]
            if coord not in ("align_corners", "tf_crop_and_resize"):
                out.append((attrs, r, down, None, None))
        out.append((dict(mode="cubic", coordinate_transformation_mode=coord, exclude_outside=1, cubic_coeff_a=-0.5),
                    None if coord != "tf_crop_and_resize" else roi, up, None, None))
    for nearest_mode in ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil"):
        for coord in ("half_pixel", "asymmetric", "align_corners"):
            attrs = dict(mode="nearest", coordinate_transformation_mode=coord, nearest_mode=nearest_mode)
            out += [(attrs, None, up, None, None), (attrs, None, None, sizes, None)]
            if coord != "align_corners":
                out.append((attrs, None, down, None, None))
    if opset >= 18:
        for mode in ("linear", "cubic"):
            out.append((dict(mode=mode, antialias=1), None, np.array([0.5, 0.6], np.float32), None, [2, 3]))
        for policy in ("not_larger", "not_smaller"):
            out.append((dict(mode="linear", keep_aspect_ratio_policy=policy), None, None, np.array([5, 9]), [2, 3]))
        out.append((dict(mode="nearest"), None, None, np.array([9, 4]), [-1, 2]))
    return out


@pytest.mark.parametrize("opset", [v for v in _versions("Resize") if v >= 11])
def test_resize(opset):
    x = _rand(2, 3, 5, 4)
    for attrs, roi, scales, sizes, axes in _resize_variants(opset):
        inits = {"roi": roi if roi is not None else np.zeros(0, np.float32)}
        names = ["x", "roi", "", ""]
        if scales is not None:
            inits["scales"], names[2] = scales, "scales"
        else:
            inits["sizes"], names[3] = sizes, "sizes"
        if opset < 13 and scales is None:
            inits["scales"], names[2] = np.zeros(0, np.float32), "scales"  # required (empty) before 13
        extra = {"axes": axes} if axes is not None else {}
        node = helper.make_node("Resize", [n for n in names if n or names.index(n) < 3], ["y"], **attrs, **extra)
        node.input[:] = names[:4] if names[3] else names[:3]
        try:
            _check_any([node], {"x": x}, ["y"], inits, opset, tol=1e-5)
        except AssertionError as exc:
            raise AssertionError(f"{attrs} scales={scales} sizes={sizes} axes={axes}: {exc}") from None


@pytest.mark.parametrize("opset,op", [(10, "Resize"), (9, "Upsample")])
@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resize10_upsample9(opset, op, mode):
    x = _rand(1, 2, 5, 4)
    for scales in ([1, 1, 2, 3], [1, 1, 1.5, 2.5], [1, 1, 0.5, 0.75]):
        if op == "Upsample" and min(scales) < 1:
            continue
        _check_any([helper.make_node(op, ["x", "s"], ["y"], mode=mode)], {"x": x}, ["y"],
                   {"s": np.array(scales, np.float32)}, opset)


def test_resize_sizes_at_run_time():
    # FPN-style: the coarse map resized to the fine map's H, W from Shape -> Slice -> Concat
    nodes = [helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Slice", ["s", "st", "en"], ["hw"]),
             helper.make_node("Concat", ["nc", "hw"], ["sizes"], axis=0),
             helper.make_node("Resize", ["p", "", "", "sizes"], ["y"], mode="linear")]
    inits = {"st": np.array([2]), "en": np.array([4]), "nc": np.array([1, 3])}
    model = _model(nodes, [("x", [1, 3, "H", "W"])], [("y", [1, 3, "H", "W"])], inits, 13)
    module = to_torch(model)
    for shape in ((1, 3, 8, 6), (1, 3, 11, 7)):
        x = _rand(*shape, seed=shape[2])
        ref = _ort(model, {"x": x})[0]
        got = _torch(module, {"x": x}, ["x"])[0]
        assert got.shape == shape and _rel(got, ref) <= RTOL


# ---------------------------------------------------------------- ConvTranspose, normalizations

def _conv_transpose_cases():
    w = _rand(4, 3, 3, 3, seed=1, scale=0.3)   # (C_in, C_out / group, k, k)
    w2 = _rand(4, 2, 3, 2, seed=2, scale=0.3)  # group 2: C_out = 4
    return [
        ("plain", w, {}),
        ("stride_pads", w, dict(strides=[2, 2], pads=[1, 0, 1, 2])),
        ("output_padding", w, dict(strides=[2, 3], output_padding=[1, 2])),
        ("dilation", w, dict(dilations=[2, 1], pads=[1, 1, 0, 0])),
        ("group", w2, dict(group=2, strides=[2, 1])),
        ("output_shape", w, dict(strides=[2, 2], output_shape=[10, 12])),
        ("same_upper", w, dict(strides=[2, 2], auto_pad="SAME_UPPER")),
        ("same_lower", w, dict(strides=[2, 2], auto_pad="SAME_LOWER")),
        ("valid", w, dict(strides=[2, 2], auto_pad="VALID")),
    ]


@pytest.mark.parametrize("opset", _versions("ConvTranspose"))
@pytest.mark.parametrize("case", _conv_transpose_cases(), ids=lambda c: c[0])
def test_conv_transpose(opset, case):
    _, w, attrs = case
    b = _rand(w.shape[1] * attrs.get("group", 1), seed=5)
    x = _rand(2, 4, 5, 6)
    model = _check_any([helper.make_node("ConvTranspose", ["x", "W", "B"], ["y"], name="up", **attrs)], {"x": x},
                       ["y"], {"W": w, "B": b}, opset)
    module = to_torch(model)
    assert isinstance(module.up.weight, nn.Parameter) and module.up.weight.requires_grad
    assert module.onnx_tensors["up.weight"] == "W" and module.onnx_tensors["up.bias"] == "B"
    # the weight as a run-time input, 1-D
    _check_any([helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2], output_padding=[1])],
               {"x": _rand(2, 4, 7), "w": _rand(4, 3, 3, seed=6)}, ["y"], opset=opset)


def test_conv_transpose_writes_back(tmp_path):
    model = _check_any([helper.make_node("ConvTranspose", ["x", "W", "B"], ["y"], name="up", strides=[2, 2])],
                       {"x": _rand(1, 4, 3, 3)}, ["y"], {"W": _rand(4, 2, 2, 2), "B": _rand(2)}, 17)
    module = to_torch(model)
    with torch.no_grad():
        module.up.weight.mul_(2.0)
        module.up.bias.add_(1.0)
    written = write_back(module, model)
    x = _rand(1, 4, 3, 3, seed=9)
    assert _rel(_ort(written, {"x": x})[0], _torch(module, {"x": x}, ["x"])[0]) <= RTOL


@pytest.mark.parametrize("op,opset", [(op, v) for op in ("LayerNormalization", "InstanceNormalization",
                                                         "GroupNormalization", "LpNormalization")
                                      for v in _versions(op)])
def test_normalizations(op, opset):
    x = _rand(2, 4, 3, 5, scale=3.0)
    if op == "LayerNormalization":
        for axis, shape in ((-1, (5,)), (1, (4, 3, 5)), (2, (1, 5))):
            model = _check_any([helper.make_node(op, ["x", "s", "b"], ["y", "m", "inv"], name="ln", axis=axis,
                                                 epsilon=1e-3)],
                               {"x": x}, ["y", "m", "inv"], {"s": _rand(*shape, seed=1), "b": _rand(*shape, seed=2)},
                               opset)
        _check_any([helper.make_node(op, ["x", "s"], ["y"])], {"x": x, "s": _rand(5, seed=1)}, ["y"], opset=opset)
    elif op == "InstanceNormalization":
        model = _check_any([helper.make_node(op, ["x", "s", "b"], ["y"], name="ln", epsilon=1e-4)], {"x": x}, ["y"],
                           {"s": _rand(4, seed=1), "b": _rand(4, seed=2)}, opset)
    elif op == "GroupNormalization":
        n = 2 if opset < 21 else 4  # scale/bias per group at 18, per channel from 21
        model = _check_any([helper.make_node(op, ["x", "s", "b"], ["y"], name="ln", num_groups=2, epsilon=1e-4)],
                           {"x": x}, ["y"], {"s": _rand(n, seed=1), "b": _rand(n, seed=2)}, opset)
    else:
        x[0, 0] = 0.0  # a zero norm gives 0
        for p, axis in ((2, -1), (1, 1), (2, 0)):
            _check_any([helper.make_node(op, ["x"], ["y"], p=p, axis=axis)], {"x": np.abs(x) if p == 1 else x},
                       ["y"], opset=opset)
        return
    module = to_torch(model)
    assert isinstance(module.ln.weight, nn.Parameter) and module.onnx_tensors["ln.weight"] == "s"
    assert module.onnx_tensors["ln.bias"] == "b"


# ---------------------------------------------------------------- reductions

_REDUCE_OPS = ["ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
               "ReduceLogSumExp", "ReduceSumSquare"]


@pytest.mark.parametrize("op,opset", [(op, v) for op in _REDUCE_OPS for v in _versions(op)])
def test_reduce(op, opset):
    x = _rand(2, 3, 4, scale=0.8)
    axes_input = opset >= (13 if op == "ReduceSum" else 18)
    for axes, keepdims in (([1], 1), ([0, -1], 0), (None, 1), (None, 0)):
        if axes_input:
            inits = {} if axes is None else {"axes": np.array(axes, np.int64)}
            node = helper.make_node(op, ["x"] + (["axes"] if axes is not None else []), ["y"], keepdims=keepdims)
        else:
            inits = {}
            node = helper.make_node(op, ["x"], ["y"], keepdims=keepdims, **({"axes": axes} if axes else {}))
        _check_any([node], {"x": x}, ["y"], inits, opset)
    if axes_input:  # noop_with_empty_axes, and axes as a run-time input
        _check_any([helper.make_node(op, ["x"], ["y"], noop_with_empty_axes=1)], {"x": x}, ["y"], opset=opset)
        _check_any([helper.make_node(op, ["x", "axes"], ["y"], keepdims=0)], {"x": x, "axes": np.array([2, 0])},
                   ["y"], opset=opset)
    if op in ("ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd"):  # integers keep their type
        ints = {"x": np.array([[3, -1, 7], [2, 5, -4]], np.int64)}
        node = helper.make_node(op, ["x"] + (["axes"] if axes_input else []), ["y"], keepdims=0,
                                **({} if axes_input else {"axes": [1]}))
        _check_any([node], ints, ["y"], {"axes": np.array([1])} if axes_input else {}, opset)


@pytest.mark.parametrize("op,opset", [(op, v) for op in ("ArgMax", "ArgMin") for v in _versions(op)])
def test_arg_reduce(op, opset):
    x = np.array([[[1, 5, 5, 0], [2, 2, -1, -1], [0, 5, -1, 3]]], np.float32)
    for axis, keepdims in ((1, 1), (-1, 0), (0, 1)):
        _check_any([helper.make_node(op, ["x"], ["y"], axis=axis, keepdims=keepdims)], {"x": x}, ["y"], opset=opset)
        if opset >= 12:
            _check_any([helper.make_node(op, ["x"], ["y"], axis=axis, keepdims=keepdims, select_last_index=1)],
                       {"x": x}, ["y"], opset=opset)


# ---------------------------------------------------------------- Pad (all modes), Clip (tensor bounds)

@pytest.mark.parametrize("opset", [v for v in _versions("Pad") if v >= 11])
@pytest.mark.parametrize("mode", ["constant", "reflect", "edge", "wrap"])
def test_pad_modes_and_run_time_pads(opset, mode):
    if mode == "wrap" and opset < 19:
        return
    x = _rand(2, 3, 4, 5)
    feeds = {"x": x, "pads": np.array([0, 1, 2, 1, 0, 2, 1, 3], np.int64)}
    _check_any([helper.make_node("Pad", ["x", "pads"], ["y"], mode=mode)], feeds, ["y"], opset=opset)
    if opset >= 18:
        feeds = {"x": x, "pads": np.array([2, 1, 1, 2], np.int64), "axes": np.array([-1, 1], np.int64)}
        _check_any([helper.make_node("Pad", ["x", "pads", "", "axes"], ["y"], mode=mode)], feeds, ["y"], opset=opset)


@pytest.mark.parametrize("opset", [v for v in _versions("Clip") if v >= 11])
def test_clip_tensor_bounds(opset):
    x = _rand(3, 4, scale=2.0)
    feeds = {"x": x, "lo": np.array(-0.5, np.float32), "hi": np.array(0.7, np.float32)}
    _check_any([helper.make_node("Clip", ["x", "lo", "hi"], ["y"]), helper.make_node("Clip", ["x", "", "hi"], ["z"])],
               feeds, ["y", "z"], opset=opset)
    if opset >= 12:
        ints = {"x": np.array([-5, 0, 3, 9], np.int64), "lo": np.array(-1, np.int64), "hi": np.array(4, np.int64)}
        _check_any([helper.make_node("Clip", ["x", "lo", "hi"], ["y"])], ints, ["y"], opset=opset)


# ---------------------------------------------------------------- run-time shapes in exported models

class _DynamicNet(nn.Module):
    """x.view(x.size(0), -1), F.interpolate(scale_factor=2) and an FPN-style resize to another map's size."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        coarse = torch.nn.functional.max_pool2d(y, 2)
        y = y + torch.nn.functional.interpolate(coarse, size=y.shape[-2:], mode="bilinear", align_corners=False)
        y = self.c2(torch.nn.functional.interpolate(y, scale_factor=2.0))
        y = torch.nn.functional.adaptive_avg_pool2d(y, 1)
        return self.fc(y.view(y.size(0), -1))


def export_and_import(net_class, shape, tmp_path, exporter: str):
    """(the seeded torch net, its ONNX export with dynamic batch, H and W, the export's to_torch import)."""
    torch.manual_seed(0)
    net = net_class().eval()
    path = tmp_path / "m.onnx"
    export_dynamic(net, torch.randn(*shape), path, exporter)
    model = onnx.load(str(path))
    return net, model, to_torch(model)


def export_dynamic(net, x0, path, exporter: str) -> None:
    """Export `net` with dynamic batch, H and W: `exporter` is "dynamo" or "torchscript-OPSET"."""
    if exporter == "dynamo":
        pytest.importorskip("onnxscript", reason="torch's dynamo exporter needs onnxscript")
        dims = {0: torch.export.Dim("N"), 2: torch.export.Dim("H", min=4), 3: torch.export.Dim("W", min=4)}
        torch.onnx.export(net, (x0,), str(path), dynamo=True, input_names=["x"], dynamic_shapes={"x": dims},
                          verbose=False)
    else:
        torch.onnx.export(net, (x0,), str(path), dynamo=False, opset_version=int(exporter.split("-")[1]),
                          input_names=["x"], dynamic_axes={"x": {0: "N", 2: "H", 3: "W"}})


@pytest.mark.parametrize("exporter", ["torchscript-9", "torchscript-11", "torchscript-13", "torchscript-17", "dynamo"])
def test_exported_model_runs_at_any_input_size(exporter, tmp_path):
    _, model, module = export_and_import(_DynamicNet, (2, 3, 8, 8), tmp_path, exporter)
    for shape in ((2, 3, 8, 8), (3, 3, 13, 10)):
        x = _rand(*shape, seed=shape[0])
        ref = _ort(model, {"x": x})[0]
        got = _torch(module, {"x": x}, ["x"])[0]
        assert got.shape == ref.shape == (shape[0], 5)
        assert _rel(got, ref) <= RTOL


class _ModernNet(nn.Module):
    """Blocks of today's CNNs: hard-swish stem, squeeze-excite, a ConvNeXt block (depthwise 7x7,
    LayerNorm, GELU MLP), GroupNorm + SiLU, a U-Net decoder (ConvTranspose, PReLU), a C2f-style
    split and concat with a nearest resize to the decoder's size."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.se = nn.Conv2d(8, 8, 1)
        self.dw = nn.Conv2d(8, 8, 7, padding=3, groups=8)
        self.ln = nn.LayerNorm(8)
        self.pw1, self.pw2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.gn = nn.GroupNorm(2, 8)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.act = nn.PReLU(4)
        self.fuse = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        f = torch.nn.functional
        y = f.hardswish(self.stem(x))
        y = y * f.hardsigmoid(self.se(y.mean((2, 3), keepdim=True)))
        z = self.dw(y).permute(0, 2, 3, 1)
        y = y + self.pw2(f.gelu(self.pw1(self.ln(z)))).permute(0, 3, 1, 2)
        y = f.silu(self.gn(y))
        u = self.act(self.up(y))
        a, b = torch.chunk(u, 2, dim=1)
        y = self.fuse(torch.cat([a, b, f.interpolate(y, size=u.shape[-2:], mode="nearest")[:, :4]], 1))
        return self.fc(f.adaptive_avg_pool2d(y, 1).flatten(1))


@pytest.mark.parametrize("exporter", ["torchscript-17", "dynamo"])
def test_modern_cnn_imports_trains_and_writes_back(exporter, tmp_path):
    net, model, module = export_and_import(_ModernNet, (2, 3, 16, 16), tmp_path, exporter)
    for shape in ((2, 3, 16, 16), (1, 3, 22, 18)):
        x = _rand(*shape, seed=shape[2])
        assert _rel(_torch(module, {"x": x}, ["x"])[0], _ort(model, {"x": x})[0]) <= RTOL
    # every weight of the torch network is a trainable, written-back parameter of the import
    params = dict(module.named_parameters())
    assert len(params) >= sum(1 for _ in net.parameters())
    assert {name for name, _ in net.named_parameters()} - set(module.onnx_tensors.values()) <= \
        {"gn.weight", "gn.bias", "pw1.weight", "pw2.weight", "act.weight"}  # exporters rename these
    module.train()
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    module(torch.from_numpy(_rand(2, 3, 16, 16, seed=7))).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    opt.step()
    written = write_back(module, model)
    x = _rand(2, 3, 12, 20, seed=8)
    assert _rel(_ort(written, {"x": x})[0], _torch(module, {"x": x}, ["x"])[0]) <= RTOL
    assert _rel(_ort(written, {"x": x})[0], _ort(model, {"x": x})[0]) > 1e-4  # the step changed the model


def test_torch_save_load_round_trip(tmp_path):
    """torch.load re-traces an imported module's code: the run-time helpers must stay single calls."""
    nodes = [helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[3, 3], pads=[0, 0, 1, 1]),
             helper.make_node("Shape", ["p"], ["s"]),
             helper.make_node("Slice", ["s", "st", "en"], ["hw"]),
             helper.make_node("Concat", ["nc", "hw"], ["sizes"], axis=0),
             helper.make_node("Resize", ["p", "", "", "sizes"], ["r"], mode="cubic",
                              coordinate_transformation_mode="asymmetric"),
             helper.make_node("ReduceMean", ["r"], ["y"], axes=[2, 3], keepdims=0)]
    inits = {"st": np.array([2]), "en": np.array([4]), "nc": np.array([1, 2])}
    module = to_torch(_model(nodes, [("x", [1, 2, "H", "W"])], ["y"], inits, 13))
    torch.save(module, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    x = torch.from_numpy(_rand(1, 2, 9, 7))
    assert torch.equal(loaded(x), module(x)) and loaded.onnx_opset == 13


def test_initializer_of_an_unsupported_type_refused():
    w = helper.make_tensor("w", TensorProto.STRING, [4], [b"1", b"2", b"3", b"-4"])  # (INT4 imports now)
    nodes = [helper.make_node("Cast", ["w"], ["c"], to=F32), helper.make_node("Add", ["x", "c"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F32, [4])],
                              [helper.make_tensor_value_info("y", F32, [4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    with pytest.raises(UserError, match=r"\(Cast, opset 21\): initializer 'w': STRING tensors are not supported"):
        to_torch(model)


def test_parameter_passed_on_by_identity_is_one_tied_parameter():
    """torch's exporter writes a parameter equal to another (two LayerNorms at their default init) as an
    Identity of the first. Both layers hold that one Parameter, so a trained value is what onnxruntime
    computes with after write-back (the second layer held a frozen copy: 0.06 apart after training)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), "s"),
             numpy_helper.from_array(rng.normal(0, 0.3, 8).astype(np.float32), "b")]
    nodes = [helper.make_node("Identity", ["s"], ["s2"]), helper.make_node("Identity", ["b"], ["b2"]),
             helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"], name="ln1"),
             helper.make_node("LayerNormalization", ["y", "s2", "b2"], ["z"], name="ln2")]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                          [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 8])], inits),
        opset_imports=[helper.make_opsetid("", 17)], ir_version=_ir(17))
    module = to_torch(model)
    assert sorted(p.numel() for p in module.parameters()) == [8, 8]  # one scale, one bias: shared
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(2.0).add_(0.25)
    x = rng.standard_normal((4, 8)).astype(np.float32)
    written = write_back(module, model)
    got = make_session(written, "cpu").run(None, {"x": x})[0]
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
