"""The one builder of tiny test models: onnx.helper graphs with seeded numpy weights.

Nothing is downloaded; a model is a function of its arguments (same seed, same bytes).

`Net` appends nodes and initializers and finishes with `model()`. Weights are normal
with standard deviation sqrt(gain / fan_in): gain 2 (He, the default) or 1 (LeCun).
BatchNormalization parameters are drawn from one of two spreads: `BN_NARROW` (near the
identity, the default) or `BN_WIDE` (means far from 0, variances 0.2..3, for fold tests).

The ready-made models: `small_cnn` (VGG in miniature, the conftest fixture's model) and
`small_net` (the same shape with `Net`'s layer names, any dtype). `inputs_for` gives
seeded inputs; `bn_count` and `weight_values` read a model back. The judges that run a model
(onnxruntime, numpy moments, rel_error) are in oracles.py.

Every model a test builds names its ir_version (here: the oldest its opset allows): helper.make_model's
default is the newest the installed onnx knows (14 with onnx 1.23), which an older onnxruntime that
onnxbn supports refuses to load (1.30 reads up to 13).
"""

from __future__ import annotations

import numpy as np
import onnx
from numpy.typing import DTypeLike
from onnx import TensorProto, helper, numpy_helper

# (mean, standard deviation) of scale, B and mean; (low, high) of the uniform variance.
BN_NARROW: dict[str, tuple[float, float]] = {"scale": (1.0, 0.3), "B": (0.0, 0.3), "mean": (0.0, 0.3), "var": (0.5, 2.0)}
BN_WIDE: dict[str, tuple[float, float]] = {"scale": (1.0, 0.5), "B": (0.0, 0.5), "mean": (0.0, 1.0), "var": (0.2, 3.0)}


class Net:
    """Seeded onnx.helper graph builder: weights as initializers unless told otherwise.

    Every random draw comes from `self.rng` in call order, so a model is fixed by its seed
    and the order of the calls that built it.
    """

    def __init__(self, seed: int = 0, dtype: DTypeLike = np.float32, *, gain: float = 2.0,
                 bn: dict[str, tuple[float, float]] = BN_NARROW):
        self.rng = np.random.default_rng(seed)
        self.dtype = np.dtype(dtype)
        self.gain = gain
        self.bn_spread = bn
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    # ------------------------------------------------------------------ tensors

    def init(self, name: str, value, dtype=None) -> str:
        """An initializer `name` holding `value` (in the net's dtype unless `dtype`)."""
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype or self.dtype), name))
        return name

    def random(self, shape, scale: float | None = None) -> np.ndarray:
        """Normal values of standard deviation `scale`, or sqrt(gain / fan_in) (fan_in: the
        product of the dimensions after the first; 1 for a vector)."""
        shape = tuple(shape)
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        return (self.rng.standard_normal(shape) * (scale or np.sqrt(self.gain / fan_in))).astype(self.dtype)

    def weight(self, name: str, shape, scale: float | None = None) -> str:
        """An initializer `name` of `random(shape, scale)` values."""
        return self.init(name, self.random(shape, scale))

    def const(self, name: str, value) -> str:
        """A Constant node producing `name` (the way tracing exporters write weights)."""
        value = np.asarray(value, dtype=self.dtype if np.asarray(value).dtype.kind == "f" else None)
        return self.node("Constant", [], name, name=f"{name}/const", value=numpy_helper.from_array(value, name))

    def filled(self, name: str, size: int, fill: float) -> str:
        """A ConstantOfShape node producing a `size`-vector of `fill` (its shape an int64 initializer)."""
        shape = self.init(f"{name}/shape", [size], dtype=np.int64)
        return self.node("ConstantOfShape", [shape], name, name=f"{name}/fill",
                         value=numpy_helper.from_array(np.array([fill], self.dtype)))

    # ------------------------------------------------------------------ nodes

    def node(self, op: str, inputs, output: str, name: str | None = None, **attrs) -> str:
        """One node with one output; the node's name is the output's unless given."""
        self.nodes.append(helper.make_node(op, list(inputs), [output], name=name or output, **attrs))
        return output

    def linear(self, op: str, x: str, w_shape, name: str, *, bias: int | None = None, bias_scale: float = 1.0,
               out: str | None = None, **attrs) -> str:
        """A Conv/Gemm/ConvTranspose node `name` reading `name.W` (random(w_shape)) and, when
        `bias` is a length, `name.b` (normal, standard deviation `bias_scale`)."""
        inputs = [x, self.weight(f"{name}.W", w_shape)]
        if bias is not None:
            inputs.append(self.weight(f"{name}.b", (bias,), bias_scale))
        return self.node(op, inputs, out or f"{name}.out", name=name, **attrs)

    def conv(self, x: str, cin: int, cout: int, name: str, k: int = 3, pad: int = 1, bias: bool = True,
             out: str | None = None, **attrs) -> str:
        """A k x k Conv with `pad` on every side and a bias of standard deviation 0.1."""
        group = attrs.get("group", 1)
        return self.linear("Conv", x, (cout, cin // group, k, k), name, bias=cout if bias else None, bias_scale=0.1,
                           out=out, pads=[pad] * 4, kernel_shape=[k, k], **attrs)

    def gemm(self, x: str, fin: int, fout: int, name: str, out: str | None = None) -> str:
        """A dense layer (Gemm, transB=1) with a bias of standard deviation 0.1."""
        return self.linear("Gemm", x, (fout, fin), name, bias=fout, bias_scale=0.1, out=out, transB=1)

    def bn(self, x: str, channels: int, name: str, out: str | None = None, *, eps: float = 1e-5,
           var: np.ndarray | None = None) -> str:
        """A BatchNormalization `name` with random scale, B, mean (and var, unless given), drawn
        from the net's BN spread in that order."""
        r, spread = self.rng, self.bn_spread
        values = {k: r.normal(*spread[k], channels) for k in ("scale", "B", "mean")}
        values["var"] = r.uniform(*spread["var"], channels) if var is None else var
        params = [self.init(f"{name}.{k}", v) for k, v in values.items()]
        return self.node("BatchNormalization", [x, *params], out or f"{name}.out", name=name, epsilon=eps)

    # ------------------------------------------------------------------ the model

    def model(self, inputs: dict, outputs: dict, opset: int = 13, *, ir_version: int | None = None,
              inits_as_inputs: bool = False, metadata: dict | None = None, check: bool | str = True,
              producer: str | None = "test", graph_name: str = "net") -> onnx.ModelProto:
        """The model: `inputs`/`outputs` map names to shapes (ints, dim names or None), all of the
        net's dtype. `ir_version` defaults to the oldest one the opset allows; `inits_as_inputs`
        also lists every initializer as a graph input (IR 3 style); `check`: True runs
        onnx.checker, "full" with shape inference too, False not at all."""
        elem = helper.np_dtype_to_tensor_dtype(self.dtype)
        graph_inputs = [helper.make_tensor_value_info(k, elem, v) for k, v in inputs.items()]
        if inits_as_inputs:
            graph_inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in self.inits]
        graph = helper.make_graph(self.nodes, graph_name, graph_inputs,
                                  [helper.make_tensor_value_info(k, elem, v) for k, v in outputs.items()],
                                  initializer=self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        if producer is not None:
            model.producer_name = producer
        model.ir_version = ir_version or helper.find_min_ir_version_for([helper.make_opsetid("", opset)])
        for key, value in (metadata or {}).items():
            model.metadata_props.add(key=key, value=value)
        if check:
            onnx.checker.check_model(model, full_check=check == "full")
        return model


# ----------------------------------------------------------------------------- ready-made models

def small_cnn(opset: int = 17, seed: int = 0, size: int = 8, batch: int | str = "N") -> onnx.ModelProto:
    """Conv-Relu-MaxPool-Conv-Relu-Flatten-Gemm-Relu-Gemm-Relu-Gemm, VGG in miniature.

    Tensors: c1 r1 p1 c2 r2 flat g1 h1 g2 h2 logits (10 classes); weights c1.w, c1.b, ... f3.w,
    f3.b; IR 8 whatever the opset."""
    n = Net(seed)
    y = n.node("Conv", ["input", n.weight("c1.w", (4, 3, 3, 3)), n.weight("c1.b", (4,), 0.1)], "c1", name="conv1",
               pads=[1, 1, 1, 1])
    y = n.node("MaxPool", [n.node("Relu", [y], "r1", name="relu1")], "p1", name="pool1", kernel_shape=[2, 2],
               strides=[2, 2])
    y = n.node("Conv", [y, n.weight("c2.w", (8, 4, 3, 3)), n.weight("c2.b", (8,), 0.1)], "c2", name="conv2",
               pads=[1, 1, 1, 1])
    y = n.node("Flatten", [n.node("Relu", [y], "r2", name="relu2")], "flat", name="flatten")
    flat = 8 * (size // 2) * (size // 2)
    y = n.node("Gemm", [y, n.weight("f1.w", (16, flat)), n.weight("f1.b", (16,), 0.1)], "g1", name="fc1", transB=1)
    y = n.node("Gemm", [n.node("Relu", [y], "h1", name="relu3"), n.weight("f2.w", (16, 16)), n.weight("f2.b", (16,), 0.1)],
               "g2", name="fc2", transB=1)
    n.node("Gemm", [n.node("Relu", [y], "h2", name="relu4"), n.weight("f3.w", (10, 16)), n.weight("f3.b", (10,), 0.1)],
           "logits", name="fc3", transB=1)
    return n.model({"input": [batch, 3, size, size]}, {"logits": [batch, 10]}, opset, ir_version=8, producer=None,
                   graph_name="small_cnn")


def small_net(opset: int, batch: int | str = "N", dtype: DTypeLike = np.float32, seed: int = 0,
              size: int = 8) -> onnx.ModelProto:
    """conv/relu/pool/flatten/gemm: Conv-Relu-MaxPool-Conv-Relu-Flatten-Gemm-Relu-Gemm (5 classes)."""
    n = Net(seed, dtype)
    y = n.node("Relu", [n.conv("input", 3, 4, "conv1")], "relu1")
    y = n.node("MaxPool", [y], "pool1", kernel_shape=[2, 2], strides=[2, 2])
    y = n.node("Relu", [n.conv(y, 4, 6, "conv2")], "relu2")
    y = n.node("Flatten", [y], "flat")
    y = n.node("Relu", [n.gemm(y, 6 * (size // 2) ** 2, 12, "fc1")], "relu3")
    n.gemm(y, 12, 5, "fc2", out="logits")
    return n.model({"input": [batch, 3, size, size]}, {"logits": [batch, 5]}, opset)


def conv_model(dtype: DTypeLike = np.float32, scale=1.0, ir_version=8, opset=13) -> onnx.ModelProto:
    """x (N, 3, 8, 8) -> 3x3 Conv `conv` (padded) -> c -> Relu -> r -> GlobalAveragePool -> y, in `dtype`;
    weights and bias normal times `scale` (seed 3)."""
    rng = np.random.default_rng(3)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    w = (rng.standard_normal((4, 3, 3, 3)) * scale).astype(dtype)
    b = (rng.standard_normal(4) * scale).astype(dtype)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["y"], name="gap")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", elem, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", elem, ["N", 4, 1, 1])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)


def notebook_bn(with_bn: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of an identity-BN model with the 2017 notebook's mistake: every BN's scale (gamma) set
    to its variance."""
    notebook = onnx.ModelProto()
    notebook.CopyFrom(with_bn)
    inits = {t.name: t for t in notebook.graph.initializer}
    for node in notebook.graph.node:
        if node.op_type == "BatchNormalization":
            var = numpy_helper.to_array(inits[node.input[4]])
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(var, node.input[1]))
    return notebook


def inputs_for(shape, count: int = 16, seed: int = 1, dtype: DTypeLike = np.float32) -> np.ndarray:
    """`count` seeded standard-normal samples of `shape` (the batch axis is added)."""
    return np.random.default_rng(seed).standard_normal((count, *shape)).astype(dtype)


# ----------------------------------------------------------------------------- shared checks

def bn_count(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node)


def weight_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node values by name (weights an exporter keeps in Constant nodes count)."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    values.update({n.output[0]: numpy_helper.to_array(a.t) for n in model.graph.node if n.op_type == "Constant"
                   for a in n.attribute if a.name == "value"})
    return values


def changed_weights(before: onnx.ModelProto, after: onnx.ModelProto) -> list[str]:
    """The weights (`weight_values`) whose values differ from `before` to `after`, after asserting that
    `after` is `before`'s graph (the same nodes reading the same tensors) with the same weight names:
    what a write-back may change and what it may not."""
    assert [(n.op_type, list(n.input)) for n in after.graph.node] == \
        [(n.op_type, list(n.input)) for n in before.graph.node]
    old, new = weight_values(before), weight_values(after)
    assert new.keys() == old.keys()
    return [k for k in old if not np.array_equal(old[k], new[k])]


def dynamo_bias_model(input_name: str = "input") -> onnx.ModelProto:
    """Conv whose zero bias is Expand(CastLike(0, x), Expand(Shape(W, end=1), [1])) (as torch's dynamo exporter
    writes it without its optimizer), then BN and Relu; the input is `input_name` (N, 3, 8, 8)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, 4).astype(np.float32), "scale"),
             numpy_helper.from_array(rng.normal(0, 0.3, 4).astype(np.float32), "shift"),
             numpy_helper.from_array(rng.normal(0, 0.3, 4).astype(np.float32), "mean"),
             numpy_helper.from_array(rng.uniform(0.5, 2.0, 4).astype(np.float32), "var")]
    nodes = [helper.make_node("Shape", ["w"], ["cout"], start=0, end=1),
             helper.make_node("Expand", ["cout", "one"], ["bias_shape"]),
             helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0.0, np.float32))),
             helper.make_node("CastLike", ["zero", input_name], ["zero_like"]),
             helper.make_node("Expand", ["zero_like", "bias_shape"], ["bias"]),
             helper.make_node("Conv", [input_name, "w", "bias"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["b"], name="bn"),
             helper.make_node("Relu", ["b"], ["y"])]
    return helper.make_model(
        helper.make_graph(nodes, "g", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], inits),
        opset_imports=[helper.make_opsetid("", 20)], ir_version=9)
