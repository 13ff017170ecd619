"""The torch importer's extra outputs: MaxPool's Indices and BatchNormalization's training-mode outputs,
judged against onnx's reference implementation (onnx.reference.ReferenceEvaluator)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from onnxbn.torch_import import to_torch


def _model(node, inputs: dict, outputs: list[str], opset: int):
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT if n != "i" else TensorProto.INT64, None)
                           for n in outputs])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


_POOLS = list(itertools.product((1, 2, 3), (0, 1), (0, 1), ("none", "sym", "asym", "same")))


@pytest.mark.parametrize("nd,storage_order,ceil_mode,pads", _POOLS)
def test_maxpool_indices(nd, storage_order, ceil_mode, pads):
    """Indices count over the whole tensor (planes n, c in order), row- or column-major in a plane."""
    attrs = dict(kernel_shape=[3, 2, 2][:nd], strides=[2, 1, 2][:nd], storage_order=storage_order, ceil_mode=ceil_mode)
    if pads == "sym":
        attrs["pads"] = [1] * nd * 2
    elif pads == "asym":
        attrs["pads"] = [0] * nd + [1] * nd
    elif pads == "same":
        attrs["auto_pad"] = "SAME_UPPER"
    shape = [2, 3] + [7, 6, 5][:nd]
    m = _model(helper.make_node("MaxPool", ["x"], ["y", "i"], **attrs), {"x": shape}, ["y", "i"], 22)
    x = np.random.default_rng(nd).standard_normal(shape).astype(np.float32)
    want_y, want_i = ReferenceEvaluator(m).run(None, {"x": x})
    got_y, got_i = to_torch(m)(torch.from_numpy(x))
    assert np.array_equal(got_y.numpy(), want_y)
    assert got_i.dtype == torch.int64 and np.array_equal(got_i.numpy(), want_i)


@pytest.mark.parametrize("shape,outputs", [([2, 3, 4, 5], 3), ([4, 3], 3), ([2, 3, 4, 2, 2], 1)])
def test_batchnorm_training_mode(shape, outputs):
    """training_mode=1: Y from the batch's mean and population variance; running stats updated by momentum."""
    names = ["y", "rm", "rv"][:outputs]
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], names, training_mode=1, momentum=0.8,
                            epsilon=1e-3)
    c = shape[1]
    m = _model(node, {"x": shape, "s": [c], "b": [c], "m": [c], "v": [c]}, names, 15)
    rng = np.random.default_rng(len(shape))
    feeds = {"x": rng.standard_normal(shape), "s": rng.uniform(0.5, 2, c), "b": rng.standard_normal(c),
             "m": rng.standard_normal(c), "v": rng.uniform(0.5, 2, c)}
    feeds = {k: v.astype(np.float32) for k, v in feeds.items()}
    want = ReferenceEvaluator(m).run(None, feeds)
    got = to_torch(m)(*[torch.from_numpy(feeds[k]) for k in "xsbmv"])
    got = got if isinstance(got, tuple) else (got,)
    assert len(got) == outputs
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-5, atol=1e-6)
