"""onnxbn.insert: BN inserted where a float16 activation's variance does not fit float16.

Expected values are computed with numpy/onnxruntime, never with the code under test."""

from __future__ import annotations

import numpy as np
from onnx import numpy_helper
from oracles import ort_outputs

import onnxbn
from models import conv_model


def test_float16_insert_with_sigma_over_256_stays_finite_and_exact():
    """var = sigma^2 > 65504 does not fit float16: the BN runs in float32 between Casts."""
    model = conv_model(np.float16, scale=60.0)
    x = np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float16)
    stats = onnxbn.collect_stats(model, x, after=["c", "r"], device="cpu", workers=0)
    assert np.sqrt(stats.var("c")).max() > 256  # the case the fix is for
    with_bn = onnxbn.insert_bn(model, stats)
    params = [numpy_helper.to_array(t) for t in with_bn.graph.initializer if "/onnxbn_bn." in t.name]
    assert all(np.isfinite(p).all() for p in params)
    casts = [n for n in with_bn.graph.node if n.op_type == "Cast"]
    assert len(casts) >= 2
    a = ort_outputs(model, x)[0].astype(np.float64)
    b = ort_outputs(with_bn, x)[0].astype(np.float64)
    assert np.abs(a - b).max() <= 2.0**-10 * np.abs(a).max()  # float16 rounding of the output
