"""Numerical equivalence of two models on the same inputs, on one runtime or across two.

Per output, over all samples: max/mean/relative |a - b|, cosine similarity, PSNR and top-1/top-5
agreement, and whether every element is within |a - b| <= atol + rtol * |a| (onnxbn.check.metrics).
Each side runs on a runtime of `onnxbn.runtimes` (onnxruntime by default; openvino, tract,
reference), so one model can be checked on the runtime it ships to against another on
onnxruntime; the report names each side's runtime, version, device and precision and the
tolerances that applied and why (onnxbn.check.report). `tolerances` (a file or dict, see
onnxbn.tolerances) gives outputs their own element rule and gates. The reference may be golden
outputs stored earlier (onnxbn.check.golden, `save_outputs`). `layerwise` names the first shared
activation that fails the same rule (onnxbn.check.layerwise); `reduce` cuts a failing pair down to
the smallest failing subgraph (onnxbn.check.reduction).

Rooms, each one job, imports running down this list:
    activations  the activations of a graph and the `--max-marked` grouping
    metrics      OutputMetrics: streaming error metrics and the element rule of one output
    report       Report: the result and its renderings (table, JSON, Markdown, JUnit, node data, plot)
    inputs       the data to feed, or seeded random inputs within a memory budget
    golden       golden outputs: storing, reading, checking a candidate's inputs against them
    layerwise    shared activations compared, the first divergence
    comparison   compare and save_outputs
    reduction    reduce: the smallest failing subgraph pair and its repro folder
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from onnxbn.check.comparison import compare, save_outputs
    from onnxbn.check.inputs import random_inputs
    from onnxbn.check.metrics import OutputMetrics
    from onnxbn.check.report import Report

# imported on first use, as the top-level package does: `onnxbn.check.activations` (which the command line
# reads at start) stays light
_API = {"compare": "onnxbn.check.comparison", "save_outputs": "onnxbn.check.comparison",
        "random_inputs": "onnxbn.check.inputs", "OutputMetrics": "onnxbn.check.metrics",
        "Report": "onnxbn.check.report"}

__all__ = ["OutputMetrics", "Report", "compare", "random_inputs", "save_outputs"]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'onnxbn.check' has no attribute {name!r}")
