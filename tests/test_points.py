"""onnxbn.points: which tensors are BN points (a rank-3 MatMul output is not one)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxbn
from onnxbn.errors import UserError


def test_rank3_matmul_output_is_not_a_bn_point():
    w = numpy_helper.from_array(np.ones((4, 5), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["t"], name="proj"), helper.make_node("Relu", ["t"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="head")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 7, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 7, 3])],
                              [w, numpy_helper.from_array(np.ones((5, 3), np.float32), "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    with pytest.raises(UserError, match=r"rank-3 MatMul output: its features are on the last axis"):
        onnxbn.select_points(model, ["t"])
    with pytest.raises(UserError, match="matches no tensor"):
        onnxbn.select_points(model, "linear")
    assert [p.tensor for p in onnxbn.select_points(model, "relu")] == ["r"]  # a Relu output: the user's choice
