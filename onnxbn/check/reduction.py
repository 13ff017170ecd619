"""Reduce: the smallest pair of subgraphs on which a candidate still fails against its reference.

    result = reduce("ref.onnx", "cand.onnx", "x.npz", "repro")
    result.command   # onnxbn check repro/ref.onnx repro/cand.onnx --data repro/inputs.npz

1. The first `samples` inputs go through `compare(..., layerwise=True)`: when the outputs
   agree there is nothing to reduce. Otherwise the target T is the first diverging shared
   activation in the reference's order (or, with none, the first failing output).
2. A cut is one tensor C that both graphs compute (an activation of both, or the graph
   input) and that every path from the graph input to T passes through, in both graphs
   (C dominates T). Between C and T lie the nodes that compute T from C and constants;
   the subgraphs are those nodes, C their one input, T their one output. The cuts are tried
   nearest to T first, so the first that still fails gives the smallest subgraph; the graph
   input itself is the last (the whole prefix, which fails by step 1).
3. Each sample's own value of C comes from the REFERENCE run on that sample (the reference
   with C exposed, all samples at once), so the subgraphs see exactly what the reference
   fed its nodes, sample by sample. A cut fails when `compare` of the two subgraphs on
   those values fails under the same rule (tolerances and runtimes as given).

The repro folder holds ref.onnx and cand.onnx (the subgraphs), inputs.npz (C's values,
keyed by C's tensor name, one row per sample) and is written whole or not at all.
`onnxbn check` reads such a .npz by the model's input name, so the printed command replays it.
A single tensor as the cut keeps the repro a one-input model that `check` can run; the
price is that a failure right after a join (Add, Concat) of two branches reduces to the
nodes from the branches' common source, not to the join alone.
"""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from onnxbn.check.activations import LAYERWISE_SAMPLES, MAX_MARKED, activation_names
from onnxbn.check.comparison import compare
from onnxbn.check.report import Report
from onnxbn.errors import UserError
from onnxbn.feeding import check_batch_shape, model_input, open_model_data
from onnxbn.graph import GraphIndex, graph_inputs, reads, value_types
from onnxbn.io.copies import empty_like
from onnxbn.io.load import load_model
from onnxbn.runtimes.base import expose
from onnxbn.runtimes.sessions import open_session


@dataclass
class ReduceResult:
    """What `reduce` found: `failing` False when the outputs agree (nothing written); else the target
    tensor, the cut (the subgraphs' input), the node names of each subgraph, the report of the
    subgraphs' check, the folder written and the command that replays it."""

    failing: bool
    samples: int
    target: str | None = None
    cut: str | None = None
    reference_nodes: list[str] = field(default_factory=list)
    candidate_nodes: list[str] = field(default_factory=list)
    cuts_tried: int = 0
    report: Report | None = None
    folder: str | None = None
    command: str | None = None

    def summary(self) -> str:
        if not self.failing:
            return (f"nothing to reduce: the candidate agrees with the reference on the first {self.samples} "
                    "samples (no output fails)")
        return (f"reduced to {len(self.reference_nodes)} reference node(s) {self.reference_nodes} and "
                f"{len(self.candidate_nodes)} candidate node(s) {self.candidate_nodes}: {self.cut!r} -> "
                f"{self.target!r} still fails ({self.cuts_tried} cut(s) tried); wrote {self.folder}")


def _between(model: onnx.ModelProto, cut: str, target: str, runtime_inputs: set[str]) -> list[onnx.NodeProto] | None:
    """The nodes (graph order) that compute `target` from `cut` and constants, or None when `cut` does
    not dominate `target` (a path from another run-time input, or `target` does not read `cut`)."""
    keep = GraphIndex(model).ancestors([target], stop=[cut])
    read = {name for node in keep for name in reads(node)}
    produced = {name for node in keep for name in node.output}
    if cut not in read or cut in produced or target not in produced or (read - produced) & (runtime_inputs - {cut}):
        return None
    return keep


def _subgraph(model: onnx.ModelProto, nodes: list[onnx.NodeProto], cut: str, target: str, types: dict) -> onnx.ModelProto:
    """A model of `nodes` (with the initializers they read) taking `cut` (batch axis free) and returning `target`."""
    out = empty_like(model)
    out.graph.name = f"{model.graph.name or 'graph'}: {cut} -> {target}"
    out.graph.node.extend(nodes)
    read = {name for node in nodes for name in reads(node)}
    out.graph.initializer.extend(t for t in model.graph.initializer if t.name in read)
    cut_type = onnx.TypeProto()
    cut_type.CopyFrom(types[cut])
    if cut_type.tensor_type.HasField("shape") and cut_type.tensor_type.shape.dim:
        cut_type.tensor_type.shape.dim[0].Clear()
        cut_type.tensor_type.shape.dim[0].dim_param = "N"
    out.graph.input.append(helper.make_value_info(cut, cut_type))
    out.graph.output.append(helper.make_tensor_value_info(target, types[target].tensor_type.elem_type, None))
    return out


def _first_samples(ref: onnx.ModelProto, data, samples: int, preset) -> np.ndarray:
    if samples < 1:
        raise UserError(f"--samples must be at least 1 (got {samples})")
    _, dtype, shape = model_input(ref)
    dataset = open_model_data(ref, data, preset=preset)
    batch = next(iter(dataset.batches(samples, dtype=dtype)), None)
    if batch is None:
        raise UserError(f"{dataset.description}: no samples to reduce on")
    check_batch_shape(batch[0], shape, dataset.description)
    return np.ascontiguousarray(batch[0])


def write_temporary(folder: Path, ref: onnx.ModelProto, cand: onnx.ModelProto, cut: str, values: np.ndarray) -> None:
    """ref.onnx, cand.onnx, inputs.npz in `folder` (new, or an empty folder), written in a temporary
    sibling and renamed into place: all three or nothing."""
    if folder.exists() and not (folder.is_dir() and not any(folder.iterdir())):
        raise UserError(f"{folder} exists and is not an empty folder; give a new folder for the repro")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        onnx.save(ref, str(tmp / "ref.onnx"))
        onnx.save(cand, str(tmp / "cand.onnx"))
        arrays: dict[str, Any] = {cut: values}
        np.savez(tmp / "inputs.npz", **arrays)
        if folder.exists():
            folder.rmdir()
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _command(folder: Path, atol, rtol, runtime, reference_runtime, candidate_runtime, precision, device) -> str:
    """The `onnxbn check` line over the repro files, with the options the reduction ran under."""
    words = ["onnxbn", "check", str(folder / "ref.onnx"), str(folder / "cand.onnx"), "--data",
             str(folder / "inputs.npz")]
    for flag, value in (("--atol", atol), ("--rtol", rtol), ("--runtime", runtime),
                        ("--reference-runtime", reference_runtime), ("--candidate-runtime", candidate_runtime),
                        ("--precision", precision)):
        if value is not None:
            words += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    if device != "auto":
        words += ["--device", device]
    return " ".join(shlex.quote(w) for w in words)


def reduce(reference, candidate, data, output=None, *, atol: float | None = None, rtol: float | None = None,
           samples: int = LAYERWISE_SAMPLES, preset: str | None = None, device: str = "auto",
           runtime: str | None = None, reference_runtime: str | None = None, candidate_runtime: str | None = None,
           precision: str | None = None, max_marked: int = MAX_MARKED) -> ReduceResult:
    """The smallest subgraph pair on which `candidate` still fails against `reference` (see the module
    docstring), on the first `samples` inputs of `data`; written to the folder `output` when given
    (ref.onnx, cand.onnx, inputs.npz). Tolerances and runtimes as in `compare`."""
    ref, cand = load_model(reference), load_model(candidate)
    x = _first_samples(ref, data, samples, preset)
    options: dict[str, Any] = dict(atol=atol, rtol=rtol, device=device, runtime=runtime, reference_runtime=reference_runtime,
                   candidate_runtime=candidate_runtime, precision=precision)
    report = compare(ref, cand, x, batch_size=len(x), layerwise=True, max_marked=max_marked, **options)
    result = ReduceResult(failing=not report.passed, samples=len(x))
    if report.passed:
        return result
    layer = report.layerwise or {}
    first = layer.get("first_divergence")
    target = first["tensor"] if first else next(n for n, m in report.outputs.items() if not m.passed)
    feed = model_input(ref)[0]
    ref_types, cand_types = value_types(ref), value_types(cand)
    ref_inputs, cand_inputs = {i.name for i in graph_inputs(ref)}, {i.name for i in graph_inputs(cand)}
    cand_activations = set(activation_names(cand))
    order = [o for o in activation_names(ref) if o in cand_activations]  # shared, in the reference's node order
    cuts = [c for c in reversed(order[:order.index(target)] if target in order else order) if c != target] + [feed]
    ref_side: dict[str, Any] = {"runtime": reference_runtime or runtime or "onnxruntime", "device": device,
                                "precision": "f32"}
    for cut in cuts:
        if cut not in ref_types or cut not in cand_types:
            continue
        ref_nodes = _between(ref, cut, target, ref_inputs)
        cand_nodes = _between(cand, cut, target, cand_inputs)
        if ref_nodes is None or cand_nodes is None:
            continue
        result.cuts_tried += 1
        values = x if cut == feed else open_session(expose(ref, [cut], ref_types), **ref_side).run([cut], {feed: x})[0]
        sub_ref = _subgraph(ref, ref_nodes, cut, target, ref_types)
        sub_cand = _subgraph(cand, cand_nodes, cut, target, cand_types)
        sub_report = compare(sub_ref, sub_cand, values, batch_size=len(values), **options)
        if sub_report.passed:
            continue
        result.target, result.cut, result.report = target, cut, sub_report
        result.reference_nodes = [n.name or n.output[0] for n in ref_nodes]
        result.candidate_nodes = [n.name or n.output[0] for n in cand_nodes]
        if output is not None:
            folder = Path(output)
            write_temporary(folder, sub_ref, sub_cand, cut, values)
            result.folder = str(folder)
            result.command = _command(folder, atol, rtol, runtime, reference_runtime, candidate_runtime, precision,
                                      device)
        return result
    raise UserError(f"the outputs differ, but no subgraph ending at {target!r} fails when fed the reference's own "
                    "values; the difference may need more samples (--samples) or come from the runtime's "
                    "handling of the whole graph")
