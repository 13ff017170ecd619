"""Exact mode (the default): the statistics the deployed, eval-mode model itself sees, level by level.

    mean_c = (1/n) sum x_c,    var_c = (1/n) sum (x_c - mean_c)^2     (population)

over every value of channel c of x (all samples, all positions), x computed by the
eval-mode model whose upstream BNs already hold their new statistics. A BN's input
depends on every BN upstream of it, so the BNs are done level by level: level(b) = 0
when no selected BN lies upstream of b, else 1 + the highest level upstream. Pass k
computes the inputs of the level-k BNs (in-graph reductions, `stats.augment_for_stats`,
batches merged with Chan's formula in float64, as in `onnxbn stats`), then their new
mean/var are written before pass k+1. The result is a fixed point: run the model on
the same data and every BN input has the stored statistics, up to float32 execution
noise (~1e-7 relative on small models; 13 conv layers deep, onnxruntime with and without
its graph optimisations already differs by ~1e-6).

Passes and cost. A model needs L passes over the data, L = the number of selected BNs
on the longest chain of BNs along any path (VGG16-BN: 13; a ResNet with BN after every
Conv: one per Conv on the longest path, the downsample BNs share a level with their
block's first BN). Each pass runs only the part of the graph it needs:

* with the cache (default, up to `cache_mb` of activations): after pass k the boundary
  activations of what is still to come (the "cut": the tensors that later passes read
  and that no longer change) are kept, and pass k+1 starts from them. Every node then
  runs in exactly one pass: all L passes together cost one forward pass up to the last
  BN input, plus the reductions and the copies, and the images are decoded once.
  The cache holds N x (cut size per sample) bytes; a cut that does not fit in
  `cache_mb` is not kept and the next pass starts from the last cut that did; when
  none fits, the decoded model inputs are kept if they fit, else the data is read again.
  While a pass runs, the cut it reads and the one it writes are both held (<= 2 x cache_mb).
* without it (`cache_mb=0`): pass k runs the model from its input up to the level-k BN
  inputs, about (k+1)/L of a forward pass for evenly spread BNs: ~L/2 forward passes
  in all. Memory then does not depend on the number of images.

Measured (tools/bench_recalibrate.py; 2-core CPU shared with other jobs, so ranges over three
runs; set-up included), as multiples of a plain onnxruntime forward pass over the same images:
VGG16-BN at 224, 4 images: 13 passes, 0.7-1.1x with the cache (the forward pass also runs the
classifier, which recalibration does not need), 3.2-4.5x without; ResNet-18 layout at 224, 16
images: 17 passes, 1.5-2.2x and 6.7-9.6x. batch mode: 1.6-2.1x and 1.3-3.5x (torch import and a
train-mode forward pass).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from onnxbn.errors import UserError
from onnxbn.feeding import check_finite_input, model_input, progress, run_batches
from onnxbn.graph import GraphIndex, graph_inputs, reads, tensor_shape, value_types
from onnxbn.io.copies import empty_like
from onnxbn.io.model import Model
from onnxbn.points import Point
from onnxbn.recalibration.plan import (
    Staged,
    assign_levels,
    choose_cut,
    dynamic_tensors,
    graph_slice,
    write_stats,
)
from onnxbn.recalibration.report import BNRecord
from onnxbn.runtimes.ort_backend import make_session, session_provider
from onnxbn.stats import ChannelMoments, StatsGraph, augment_for_stats

DEFAULT_CACHE_MB = 1024.0


def _value_info(name: str, types: dict, array: np.ndarray | None = None) -> onnx.ValueInfoProto:
    t = types.get(name)
    if t is not None and t.HasField("tensor_type"):
        return helper.make_tensor_value_info(name, t.tensor_type.elem_type, tensor_shape(t))
    elem = helper.np_dtype_to_tensor_dtype(array.dtype) if array is not None else onnx.TensorProto.FLOAT
    return helper.make_tensor_value_info(name, elem, None)


def _stage_model(work: onnx.ModelProto, index: GraphIndex, points: list[Point], cut: list[str],
                 base: list[str] | None, types: dict, sample: dict) -> tuple[StatsGraph, list[str], int]:
    """The model of one pass: from the fed tensors (the previous cut, or the model's inputs) to the
    reductions of `points` (per point mean, m2, count) and the tensors of the next `cut`.
    Returns (the stats graph, its model also computing the cut; fed names; number of nodes taken from the
    original graph)."""
    fed_base = list(base) if base is not None else [i.name for i in graph_inputs(work)]
    targets = [p.tensor for p in points] + [t for t in cut if t not in fed_base]
    nodes, fed = graph_slice(index, targets, fed_base)
    fed += [t for t in dict.fromkeys(targets) if t in fed_base and t not in fed]
    sub = empty_like(work)
    sub.graph.node.extend(nodes)
    needed = {t for n in nodes for t in reads(n)} | set(targets)
    sub.graph.initializer.extend(t for t in work.graph.initializer if t.name in needed)
    inits = {t.name for t in sub.graph.initializer}
    sub.graph.input.extend(_value_info(t, types, sample.get(t)) for t in fed)
    sub.graph.input.extend(i for i in work.graph.input if i.name in inits)  # IR < 4 lists initializers as inputs
    graph = augment_for_stats(sub, points)
    augmented = graph.model
    own = {o for n in nodes for o in n.output}
    stage = empty_like(work)
    stage.graph.node.extend(nodes)
    stage.graph.node.extend(n for n in augmented.graph.node if not own.intersection(n.output))
    stage.graph.initializer.extend(sub.graph.initializer)
    stage.graph.initializer.extend(t for t in augmented.graph.initializer if t.name not in inits)
    names = {i.name for i in sub.graph.input}
    stage.graph.input.extend(sub.graph.input)
    stage.graph.input.extend(i for i in augmented.graph.input if i.name not in names)
    stage.graph.output.extend(augmented.graph.output)
    stage.graph.output.extend(_value_info(t, types) for t in cut if t not in fed_base)
    return StatsGraph(stage, graph.outputs), fed, len(nodes)


@dataclass
class _Cut:
    """Boundary activations kept between passes: `names`, and per batch a dict name -> array; in memory, or
    with `spill` in .npy files of that folder read back memory-mapped (page cache, not anonymous memory)."""

    names: list[str]
    spill: Path | None = None
    batches: list[dict] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)  # samples per batch
    nbytes: int = 0

    def add(self, values: dict, samples: int) -> None:
        if self.spill is not None:
            stored = {}
            for i, (name, value) in enumerate(values.items()):
                path = self.spill / f"{id(self)}-{len(self.batches)}-{i}.npy"
                np.save(path, value)
                stored[name] = np.load(path, mmap_mode="r")
            values = stored
        self.batches.append(values)
        self.sizes.append(samples)
        self.nbytes += sum(v.nbytes for v in values.values())

    def drop(self) -> None:
        """Forget the kept activations (and remove their files)."""
        if self.spill is not None:
            for path in self.spill.glob(f"{id(self)}-*.npy"):
                path.unlink()
        self.batches.clear()


@dataclass
class _Pass:
    """One pass: its session and stats graph (whose model also computes the next cut), where its batches
    come from."""

    session: Any              # an onnxruntime InferenceSession
    graph: StatsGraph
    fetch: list[str]          # every output of graph.model
    fed: list[str]
    base: _Cut | None
    keep: list[str]           # the next cut's tensors (computed or carried), empty when none is kept
    budget: int
    spill: Path | None = None  # see _Cut


def _batches(p: _Pass, dataset, model: onnx.ModelProto, batch_size: int, workers: int, strict: bool, desc: str):
    """(feeds, outputs, samples) per batch: from the data through `run_batches`, or from the kept cut."""
    if p.base is None:
        name, seen = model_input(model)[0], 0
        for x, _, values in run_batches(p.session, dataset, p.fetch, model, batch_size, workers=workers,
                                        strict=strict, desc=desc):
            check_finite_input(x, seen)
            seen += len(x)
            yield {name: x}, values, len(x)
        return
    with progress(dataset.total, desc) as bar:
        for feeds, samples in zip(p.base.batches, p.base.sizes, strict=True):
            values = p.session.run(p.fetch, {t: feeds[t] for t in p.fed})
            bar.update(samples)
            yield feeds, values, samples


def _run_pass(p: _Pass, dataset, model, batch_size: int, workers: int, strict: bool,
              desc: str) -> tuple[dict[str, ChannelMoments], _Cut | None, int]:
    """Stream the batches through the pass: merge each batch's moments (Chan, float64), keep the next cut
    while it fits in the budget. Returns (moments per point, the kept cut or None, samples)."""
    moments = {tensor: ChannelMoments() for tensor in p.graph.outputs}
    kept = _Cut(p.keep, p.spill) if p.keep else None
    samples = 0
    for feeds, values, n_batch in _batches(p, dataset, model, batch_size, workers, strict, desc):
        out = dict(zip(p.fetch, values, strict=True))
        p.graph.merge(moments, out, samples, n_batch)
        if kept is not None:
            kept.add({t: out[t] if t in out else feeds[t] for t in p.keep}, n_batch)
            if kept.nbytes > p.budget:
                kept.drop()
                kept = None  # it does not fit after all: the next pass starts from the current base
        samples += n_batch
    return moments, kept, samples


def run_levels(work: Model, items: Sequence[Staged], dataset, batch_size: int, *,
               apply: Callable[[list, dict[str, ChannelMoments]], None], desc: str, workers: int, strict: bool,
               device: str, cache_mb: float, spill: str | os.PathLike | None = None) -> tuple[list[dict], int, str]:
    """Level by level (module docstring): pass k measures the per-channel moments of the level-k items' `input`
    tensors, then `apply(level-k items, moments)` writes their new parameters into `work` before pass k+1.
    Returns (passes, samples, provider). onnxruntime gets the weights where `work` holds them: its arrays as
    they are, the rest read from its files (pass k reads `work.proto`'s initializers as `apply` left them).
    `spill`: a folder the kept activations go to as .npy files (see _Cut), so that anonymous memory does not
    grow with the data (up to `cache_mb` of them on disk)."""
    out = work.proto
    index = GraphIndex(out)
    types = value_types(out)
    up = assign_levels(index, items)
    dyn = dynamic_tensors(index, out)
    budget = int(cache_mb * 2**20)
    levels = max(b.level for b in items) + 1
    input_name = model_input(out)[0]
    base: _Cut | None = None
    passes, samples, provider = [], 0, "cpu"
    for k in range(levels):
        started = time.perf_counter()
        level_items = [b for b in items if b.level == k]
        points = [_point(t, index, types) for t in dict.fromkeys(b.input for b in level_items)]
        keep = choose_cut(index, items, k, levels, up, dyn, types, base, input_name, dataset.total, budget)
        sample = base.batches[0] if base is not None and base.batches else {}
        stage, fed, n_nodes = _stage_model(out, index, points, keep, base.names if base is not None else None,
                                           types, sample)
        session = make_session(work.with_graph(stage.model), device)
        provider = session_provider(session)
        p = _Pass(session, stage, [o.name for o in stage.model.graph.output], fed, base, keep, budget,
                  None if spill is None else Path(spill))
        moments, kept, samples = _run_pass(p, dataset, out, batch_size, workers, strict, f"{desc} {k + 1}/{levels}")
        if samples == 0:
            raise UserError(f"{dataset.description}: no sample could be read; nothing to measure")
        apply(level_items, moments)
        passes.append({"pass": k + 1, "items": [b.node for b in level_items], "nodes": n_nodes,
                       "source": "data" if base is None else "kept activations", "kept": keep if kept else [],
                       "cached_mib": round(kept.nbytes / 2**20, 3) if kept else 0.0,
                       "seconds": round(time.perf_counter() - started, 3)})
        if kept is not None:
            if base is not None:
                base.drop()
            base = kept
        del session, p
    if base is not None:
        base.drop()
    return passes, samples, provider


def run_exact(work: Model, bns: list[BNRecord], dataset, batch_size: int, *, workers: int, strict: bool,
              device: str, cache_mb: float) -> tuple[list[dict], int, str]:
    """Exact-mode recalibration: `run_levels` with each level's new mean/var written into its BNs."""
    assign_levels(GraphIndex(work.proto), bns)
    _check_rereadable(dataset, max(b.level for b in bns) + 1)

    def write(level_bns: list[BNRecord], moments: dict[str, ChannelMoments]) -> None:
        for b in level_bns:
            m = moments[b.input]
            mean, var = m.mean, m.var
            assert mean is not None, "samples were read"
            b.new_mean, b.new_var = mean, var
            write_stats(work, b, mean, var)

    passes, samples, provider = run_levels(work, bns, dataset, batch_size, apply=write, desc="recalibrate pass",
                                           workers=workers, strict=strict, device=device, cache_mb=cache_mb)
    return [{("bns" if key == "items" else key): value for key, value in p.items()} for p in passes], samples, provider


def _point(tensor: str, index: GraphIndex, types: dict) -> Point:
    t = types.get(tensor)
    elem = t.tensor_type.elem_type if t is not None else onnx.TensorProto.FLOAT
    shape = tensor_shape(t)
    producer = index.producers.get(tensor)
    return Point(tensor=tensor, producer=producer.name if producer else "", producer_op=producer.op_type if producer
                 else "input", channels=shape[1] if shape and len(shape) > 1 and isinstance(shape[1], int) else None,
                 shape=shape, dtype=onnx.TensorProto.DataType.Name(elem).lower())


def _check_rereadable(dataset, levels: int) -> None:
    """Exact mode reads the data once per level: a one-shot iterator (a generator) cannot be read again."""
    source = getattr(dataset, "source_object", None)
    if levels > 1 and hasattr(source, "__next__") and getattr(dataset, "order", None) is None:
        raise UserError(f"{dataset.description}: exact mode reads the data once per level of BN nodes ({levels} "
                        "here), and a generator or iterator can be read only once; give an array, a .npz, a "
                        "folder, a list of batches, a torch Dataset or DataLoader, or use --mode batch")
