"""How a classifier's output is read (probabilities, log-probabilities or logits) and checked against labels:
the one rule fine-tuning's loss and `evaluate` share."""

from __future__ import annotations

import logging

import numpy as np
import onnx

from onnxbn.errors import UserError
from onnxbn.graph import GraphIndex

log = logging.getLogger("onnxbn")

_SHAPE_ONLY = {"Identity", "Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze"}


PROBABILITY_SUM_TOLERANCE = 1e-4  # a row of probabilities sums to 1 within this


def are_probabilities(rows) -> bool:
    """True when every row (axis 0; classes on axis 1) is non-negative and sums to 1 within 1e-4."""
    rows = np.asarray(rows, dtype=np.float64)
    return bool(rows.ndim == 2 and rows.size and (rows >= 0).all()
                and (np.abs(rows.sum(axis=1) - 1) <= PROBABILITY_SUM_TOLERANCE).all())


def output_kind(model: onnx.ModelProto, rows_are_probabilities: bool = False) -> tuple[str, str]:
    """(kind, how it was read) of the model's first output: 'probs' when it is a Softmax's, 'logprobs'
    for LogSoftmax (looked for through ops that only reshape or cast: Identity, Cast, Reshape,
    Flatten, Squeeze, Unsqueeze); else 'probs' when the caller saw every output row non-negative and
    summing to 1 within 1e-4 (`are_probabilities`: a normalisation the graph does another way),
    else 'logits'. The one rule for fine-tuning's loss and `evaluate`'s: the negative
    log-likelihood of probabilities is -log p, never log_softmax applied to them."""
    producers = GraphIndex(model).producers
    node = producers.get(model.graph.output[0].name)
    while node is not None and node.op_type in _SHAPE_ONLY and node.input:
        node = producers.get(node.input[0])
    op = node.op_type if node else ""
    if op in ("Softmax", "LogSoftmax"):
        return {"Softmax": "probs", "LogSoftmax": "logprobs"}[op], f"graph: the output is a {op}'s"
    if rows_are_probabilities:
        return "probs", f"data: every row is >= 0 and sums to 1 within {PROBABILITY_SUM_TOLERANCE:g}"
    return "logits", "neither a Softmax/LogSoftmax output nor rows of probabilities"


def log_probs(output, kind: str):
    import torch

    if kind == "probs":
        return torch.log(output.clamp_min(1e-30))
    if kind == "logprobs":
        return output
    return torch.log_softmax(output, dim=1)


def check_labels(y: np.ndarray, classes: int, source: str) -> None:
    if len(y) and (y.min() < 0 or y.max() >= classes):
        raise UserError(f"{source}: labels span {y.min()}..{y.max()} but the model has {classes} outputs; "
                        "the data's classes must map to the model's output units")


def warn_unused_outputs(y: np.ndarray, classes: int, source: str) -> None:
    """Warn when the data uses far fewer classes than the model has outputs (a 1000-way head on 2 classes)."""
    used = int(y.max()) + 1 if len(y) else 0
    if classes >= 10 and used <= classes // 10:
        log.warning(
            "%s: labels use %d of the model's %d outputs; training keeps all %d (the others are pushed down): "
            "for a new task give the model a new classifier first (onnxbn.demo.sweep.new_classifier)",
            source, used, classes, classes)
