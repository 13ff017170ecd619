"""onnxbn.graph: the one graph core (GraphIndex: reads inside subgraphs, replace_uses, prune, constants,
topological order, ancestors; unique_name), and a grep that no other module builds producer maps or
unique names.

Expected values are read off the hand-built graphs or computed with numpy/onnxruntime,
never with the code under test."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from oracles import ort_outputs

from models import small_cnn
from onnxbn.graph import GraphIndex, unique_name

ROOT = Path(__file__).resolve().parents[1]


def if_model(ir_version: int = 8) -> onnx.ModelProto:
    """x -> Relu -> r; If(cond) { then: Add(r, w) ; else: Mul(r, w) } -> y; w is read only inside the branches."""
    then = helper.make_graph([helper.make_node("Add", ["r", "w"], ["t"], name="then_add")], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Mul", ["r", "w"], ["e"], name="else_mul")], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Constant", [], ["cond"], name="cond", value=numpy_helper.from_array(np.array(True))),
             helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then, else_branch=other)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                              [numpy_helper.from_array(np.full((2, 3), 2.0, np.float32), "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=ir_version)


def test_index_counts_reads_inside_subgraphs():
    index = GraphIndex(if_model())
    assert index.producers["r"].name == "relu" and index.producers["y"].name == "branch"
    assert [n.name for n in index.consumers["w"]] == ["branch"]  # read in both branches, one consumer
    assert index.read_count["w"] == 2 and index.read_count["r"] == 2 and index.read_count["y"] == 1  # output
    assert {"then_add", "else_mul", "t", "e", "then", "else"} <= index.taken
    assert index.unique_name("t") == "t_1" and index.unique_name("then_add") == "then_add_1"


def test_replace_uses_reaches_subgraphs_and_prune_keeps_what_they_read():
    model = if_model()
    index = GraphIndex(model)
    index.add_initializer(np.full((2, 3), 3.0, np.float32), "w")  # named w_1
    index.replace_uses("w", "w_1")
    index.prune(["w", "w_1"])
    assert [t.name for t in model.graph.initializer] == ["w_1"]
    (out,) = ort_outputs(model, np.array([[-1, 0, 2], [3, -4, 5]], np.float32))
    np.testing.assert_array_equal(out, np.maximum([[-1, 0, 2], [3, -4, 5]], 0) + 3.0)


def test_add_initializer_lists_ir3_initializers_as_inputs():
    for ir, listed in ((3, True), (8, False)):
        model = if_model(ir)
        name = GraphIndex(model).add_initializer(np.zeros(3, np.float32), "extra")
        assert (name in {i.name for i in model.graph.input}) is listed


def test_constants_from_constant_and_constant_of_shape_nodes():
    nodes = [helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(np.array([2, 2], np.int64))),
             helper.make_node("ConstantOfShape", ["shape"], ["fill"],
                              value=numpy_helper.from_array(np.array([1.5], np.float32))),
             helper.make_node("Constant", [], ["f"], value_floats=[1.0, 2.0]),
             helper.make_node("Add", ["x", "fill"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2]),
                                           helper.make_tensor_value_info("d", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
                              [numpy_helper.from_array(np.ones(2, np.float32), "d")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    index = GraphIndex(model)
    np.testing.assert_array_equal(index.constant_array("fill"), np.full((2, 2), 1.5, np.float32))
    np.testing.assert_array_equal(index.constant_array("f"), [1.0, 2.0])
    assert index.constant("d") is None  # an initializer that is also an input (IR >= 4) can be overridden
    assert index.constant("x") is None
    index.prune(["fill"])  # still read by Add: stays
    assert len(model.graph.node) == 4
    index.set_input(model.graph.node[3], 1, "x")  # edits go through the index, which stays exact
    index.prune(["fill"])  # ConstantOfShape and the Constant feeding it go, transitively
    assert [n.output[0] for n in model.graph.node] == ["f", "y"]


def test_sort_and_ancestors():
    model = small_cnn()
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    index = GraphIndex(model)
    index.sort()
    assert [n.name for n in model.graph.node] == [n.name for n in nodes]
    assert [n.name for n in GraphIndex(model).ancestors(["r2"])] == ["conv1", "relu1", "pool1", "conv2", "relu2"]


def test_unique_name():
    taken = {"a", "a_1"}
    assert unique_name("a", taken) == "a_2" and "a_2" in taken
    assert unique_name("b", taken) == "b"


def test_only_graph_py_builds_producer_maps_or_unique_names():
    """One graph core: no other module builds a tensor-name -> node map or invents unique names."""
    patterns = [re.compile(p) for p in (
        r"for \w+ in (\w+\.)*(graph\.)?node for \w+ in \w+\.output",   # {out: node for node in ... for out in node.output}
        r"for \w+ in \w+\.output if \w+\}",
        r"def \w*unique\w*\(",
        r"while \w+ in taken",
        r"def (producers|consumers)\(",
    )]
    offenders = []
    for path in sorted((ROOT / "onnxbn").rglob("*.py")):
        if path.name == "graph.py" and path.parent.name == "onnxbn":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if any(p.search(line) for p in patterns):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []
