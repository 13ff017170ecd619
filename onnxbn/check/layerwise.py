"""Layerwise comparison: the activations two graphs share, exposed as graph outputs and compared on the
first few samples (LAYERWISE_SAMPLES), at most `max_marked` per runtime session, under the same element
rule as the outputs; the first that fails, in the reference's topological order, is the first divergence.
Per tensor: max, mean and p99 |a - b| and max |a - b| / max |a|. Where a runtime cannot load the exposed
graph, the result says so instead of comparing.
"""

from __future__ import annotations

import math

import numpy as np

from onnxbn.check.activations import MAX_MARKED, activation_names, chunks
from onnxbn.check.metrics import OutputMetrics
from onnxbn.errors import UserError
from onnxbn.graph import FLOAT_TYPES, value_types
from onnxbn.io.model import Model
from onnxbn.runtimes.base import expose
from onnxbn.runtimes.sessions import open_session
from onnxbn.tolerances import QuantileGate

LAYERWISE_STATS = ("max_abs_error", "mean_abs_error", "p99_abs_error", "max_rel_error")


def compare_layerwise(ref: Model, cand: Model, x: np.ndarray, feed_name: str, atol, rtol,
                      ref_side: dict, cand_side: dict, scaled: float = 0.0, max_marked: int = MAX_MARKED):
    """Every float activation the two graphs share (onnxbn.check.activations: not initializers, Constant
    outputs or what is computed from them alone), compared on the first inputs under the same rule,
    at most `max_marked` exposed per session (one run of both sides per group of tensors).

    Per tensor: max, mean and 99th-percentile |a - b| (the percentile as the tolerance files' p99
    gate computes it, at most 0.1 % low) and max |a - b| / max |a|. `ref_side` / `cand_side`:
    open_session keyword arguments (runtime, device, precision). A runtime that cannot load the
    exposed graph gives {"available": False, "reason": ...}.
    """
    if max_marked < 1:
        raise UserError(f"--max-marked must be at least 1 (got {max_marked})")
    ref_types, cand_types = value_types(ref.proto), value_types(cand.proto)
    cand_names = set(activation_names(cand.proto))
    names = [o for o in activation_names(ref.proto)  # in the reference's node order
             if o in cand_names and o in ref_types and o in cand_types
             and ref_types[o].tensor_type.elem_type in FLOAT_TYPES]
    tensors, first = [], None
    for group in chunks(names, max_marked):
        values = []
        for model, types, side in ((ref, ref_types, ref_side), (cand, cand_types, cand_side)):
            try:
                session = open_session(model.with_graph(expose(model.proto, group, types)), **side)
                values.append(session.run(group, {feed_name: x}))
            except UserError as exc:
                return {"available": False, "compared": 0, "first_divergence": None, "tensors": [],
                        "reason": f"{side['runtime']} cannot return this graph's intermediate tensors ({exc})"}
        for name, a, b in zip(group, *values, strict=True):
            if a.shape != b.shape:
                entry = {"tensor": name, "passed": False, "max_abs_error": math.inf,
                         "reason": f"shape {a.shape} vs {b.shape}"}
            else:
                m = OutputMetrics(quantiles={"p99_abs": QuantileGate(0.99, math.inf)})
                m.update(a, b, atol, rtol, scaled)
                stats = m.metrics()
                entry = {"tensor": name, "passed": m.passed, **{k: stats[k] for k in LAYERWISE_STATS}}
            tensors.append(entry)
            if first is None and not entry["passed"]:
                first = entry
        del values
    out = {"compared": len(names), "max_marked": max_marked, "passes": -(-len(names) // max_marked),
           "first_divergence": first, "tensors": tensors}
    if {ref_side["runtime"], cand_side["runtime"]} - {"onnxruntime", "reference"}:
        out["method"] = ("intermediate tensors exposed as graph outputs: an optimising runtime may fuse less "
                         "around them than in the deployed graph")
    return out
