"""Activations: the tensors of a graph that its run-time inputs flow into, and reading them from a
runtime a bounded number at a time.

A tensor is an activation when the node that writes it reads a run-time input (a graph input
that is not an initializer) or another activation, directly or inside one of its subgraphs.
Initializers, Constant outputs and everything computed only from them are not: they are the
same for every input, so comparing them says nothing about a run.

Callers read activations by adding them as graph outputs (runtimes.base.expose), at most
`max_marked` to one runtime session (`chunks`; sessions one after another, each a full run over
the same inputs), so the values held at once are bounded by `max_marked` tensors, not by the
size of the model.
"""

from __future__ import annotations

from typing import Iterator

import onnx

from onnxbn.graph import graph_inputs, reads

LAYERWISE_SAMPLES = 4  # inputs check --layerwise and reduce run on: up to MAX_MARKED tensors of them held at once
MAX_MARKED = 64  # tensors exposed per session by default: one pass for most CNNs, bounded memory for any


def activation_names(model: onnx.ModelProto) -> list[str]:
    """The activations of `model`'s top-level graph (see the module docstring), in node order."""
    live = {i.name for i in graph_inputs(model)}
    names = []
    for node in model.graph.node:
        if any(name in live for name in reads(node)):
            outputs = [o for o in node.output if o]
            live.update(outputs)
            names.extend(outputs)
    return names


def chunks(names: list[str], max_marked: int) -> Iterator[list[str]]:
    """`names` in consecutive groups of at most `max_marked`."""
    for start in range(0, len(names), max_marked):
        yield names[start:start + max_marked]
