"""Recalibrate: re-estimate the mean/var of a model's BatchNormalization nodes on new data.

An inference-mode BN computes y = scale * (x - mean) / sqrt(var + eps) + B per channel
(axis 1). `recalibrate` measures the statistics of every selected BN node's (default: all)
input x on the given data (below: exact or batch), keeps scale and B, and stores

    mean = (N mu_old + n mu_new)/(N+n),   var = (N (var_old + (mu_old-mu)^2) + n (var_new + (mu_new-mu)^2))/(N+n)

(`blend`: the old statistics count as N = `prior` samples against the n new images; default
N = 2n; N = 0 stores the measurement, AdaBN), with a variance floor: a channel whose var falls
below var_floor x var_old (default 0.01; 0 = off) keeps var_floor x var_old. With labelled
eval_data a guard scores the model before and after and refuses a drop of more than max_drop
top-1 points; prior "auto" picks N from AUTO_GRID x n on that data.
Nothing else changes: nodes, names, opset and metadata survive, and a metadata entry
`onnxbn.recalibrate` records the nodes, the data, the mode and the passes.

exact (the default): the statistics the deployed, eval-mode model itself sees.

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

batch: one pass in training-mode semantics, the convention of torch's
`torch.optim.swa_utils.update_bn`: the model is imported into torch (`to_torch`), the
selected BN modules reset, momentum=None (a cumulative average over batches) and put in
train mode (every other module stays in eval mode: Dropout is off, unselected BNs keep
their statistics), and one forward pass runs over the data batch by batch. Each BN
normalises with its batch's statistics, and the result is

    mean_c = (1/B) sum_b mean_bc,   var_c = (1/B) sum_b n_b/(n_b - 1) var_bc

(B batches, equal weight per batch, unbiased per-batch variances, which leave out
the spread of the batch means): exactly what update_bn gives on the imported module
(where no Dropout lies upstream of a BN: update_bn puts the whole module in train mode).
It depends on the batch size, and is not what the eval-mode model sees.

Training-mode BN (training_mode=1 from opset 14, or running/saved statistics outputs
before it) is converted to inference mode with the recalibrated statistics: the extra
outputs go (refused while anything reads them), the first output keeps its name. Such
a node is always recalibrated. A BN whose mean/var initializer (or Constant) is shared
with another node gets a fresh initializer; the shared tensor is left alone.

Recipe, a model without BN (domain adaptation by feature alignment):

    stats = onnxbn.collect_stats(model, source_data, after="conv")   # source-domain statistics
    with_bn = onnxbn.insert_bn(model, stats)                          # identity BN
    adapted = onnxbn.recalibrate(with_bn, target_data)                # unlabelled target data

Each inserted BN has scale = sqrt(var_s + eps) and B = mean_s; recalibrated, its mean/var
are the target statistics, so on the target data it maps each channel to mean mean_s and
variance (var_s + eps) * var_t / (var_t + eps) ~ var_s: the target features are aligned
to the source statistics that the rest of the network was trained on.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxbn.data.images import default_workers
from onnxbn.errors import UserError
from onnxbn.feeding import check_batch_shape, fit_batch_size, model_input, open_model_data, progress, run_batches
from onnxbn.graph import GraphIndex, graph_inputs, reads, require_opset, tensor_shape, value_types
from onnxbn.io.copies import detach_weights, empty_like, set_metadata
from onnxbn.io.model import Model
from onnxbn.points import Point
from onnxbn.runtimes.ort_backend import make_session, session_provider
from onnxbn.stats import ChannelMoments, augment_for_stats

MODES = ("exact", "batch")
META_KEY = "onnxbn.recalibrate"
DEFAULT_CACHE_MB = 1024.0
# The defaults, chosen from tools/bench_recalibrate.py prior (README "Recalibrating without hurting"; BN CNN,
# 3 seeds): a prior of 2n is the smallest tried that keeps every in-domain calibration set (a random sample or
# 2 of 10 classes, n = 32..500) within 1 point of the model as trained (worst -0.1; prior 0 costs up to 21.3,
# n up to 3.5, the fixed N = 16..256 up to 18.8 at n = 500); it keeps ~10% of what prior 0 gains on a strong
# shift (+3.3..3.8 of +37..39 points): no prior tried does both, so adapting to a shift is asked for
# (prior=0, or "auto" with labelled eval_data). The floor costs nothing there (no channel floored) and
# keeps the demo's clean top-1 after a prior-0 recalibration at 58.6% (50.1% without; 58.9% before).
DEFAULT_PRIOR = "2n"
DEFAULT_VAR_FLOOR = 0.01
DEFAULT_MAX_DROP = 0.5  # points of top-1, with eval_data
AUTO_GRID = (0.0, 0.25, 1.0, 2.0, 4.0, 16.0)  # prior "auto": these multiples of n
MEAN, VAR = 3, 4  # BatchNormalization input slots


# ----------------------------------------------------------------------------- the report

@dataclass
class BNRecord:
    """One recalibrated BN: where it is, its level (the pass that set it), old and new statistics."""

    node: str
    key: str                     # the BN's first output (unique)
    input: str
    channels: int
    level: int = 0
    training_mode: bool = False  # converted from training mode
    fresh: list = field(default_factory=list)   # slots that got a fresh initializer (shared or computed)
    old_mean: np.ndarray | None = None
    old_var: np.ndarray | None = None
    new_mean: np.ndarray | None = None
    new_var: np.ndarray | None = None
    measured_mean: np.ndarray | None = None   # with a prior: what prior 0 measures (new_* is then the blend)
    measured_var: np.ndarray | None = None

    def to_dict(self) -> dict:
        return {"node": self.node, "input": self.input, "channels": self.channels, "pass": self.level + 1,
                "mean_change": change(self.old_mean, self.new_mean), "var_change": change(self.old_var, self.new_var),
                "dead_channels": int(np.count_nonzero(self.new_var <= 0)), "training_mode": self.training_mode,
                "fresh_initializers": self.fresh}


def change(old: np.ndarray | None, new: np.ndarray) -> float | None:
    """max |new - old| / max(|old|, |new|) over the channels: 0 = unchanged, at most 2 (None: no old value)."""
    if old is None:
        return None
    old, new = np.asarray(old, np.float64), np.asarray(new, np.float64)
    scale = max(float(np.abs(old).max(initial=0)), float(np.abs(new).max(initial=0)))
    return float(np.abs(new - old).max(initial=0)) / scale if scale > 0 else 0.0


@dataclass
class RecalibrationReport:
    """What `recalibrate` did: per BN node old vs new statistics, per pass what ran and how long."""

    mode: str
    bns: list[BNRecord]
    passes: list[dict]
    samples: int = 0
    batch_size: int = 0
    data: str = ""
    provider: str = ""
    seconds: float = 0.0
    cache_mb: float = 0.0
    prior: float = 0.0                                     # the prior used (the one auto chose)
    prior_requested: float | str = 0.0                     # as given: a number, a multiple of n ("2n") or "auto"
    prior_not_applied: list = field(default_factory=list)  # BNs whose old mean/var are computed at run time
    var_floor: float = 0.0
    floored: dict = field(default_factory=dict)            # BN -> number of channels whose variance was floored
    floored_channels: dict = field(default_factory=dict)   # BN -> those channels' indices
    prior_grid: list = field(default_factory=list)         # prior auto: {"prior", "top1", "loss"} per grid point
    eval: dict | None = None                               # the guard: eval_data, before, after, drop, max_drop, refused

    def to_dict(self) -> dict:
        return {"mode": self.mode, "samples": self.samples, "batch_size": self.batch_size, "data": self.data,
                "provider": self.provider, "seconds": round(self.seconds, 3), "cache_mb": self.cache_mb,
                "prior": self.prior, "prior_requested": self.prior_requested,
                "prior_not_applied": self.prior_not_applied, "var_floor": self.var_floor, "floored": self.floored,
                "floored_channels": self.floored_channels, "prior_grid": self.prior_grid, "eval": self.eval,
                "passes": self.passes, "nodes": [b.to_dict() for b in self.bns]}

    def table(self) -> str:
        rows = [("BN node", "input", "channels", "pass", "mean change", "var change", "dead")]
        for b in self.bns:
            d = b.to_dict()
            rows.append((b.node + (" (was training mode)" if b.training_mode else ""), b.input, str(b.channels),
                         str(d["pass"]), _fmt(d["mean_change"]), _fmt(d["var_change"]), str(d["dead_channels"])))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        for p in self.passes:
            lines.append(f"pass {p['pass']}: {len(p['bns'])} BN, {p['nodes']} nodes from {p['source']}"
                         + (f", kept {p['cached_mib']:.1f} MiB" if p.get("cached_mib") else "") + f", {p['seconds']:.2f}s")
        lines.append(f"{self.mode}: {len(self.bns)} BN nodes recalibrated in {len(self.passes)} pass(es) over "
                     f"{self.samples} samples (batch {self.batch_size}, {self.data}), {self.seconds:.2f}s on "
                     f"{self.provider}; change = max|new-old| / max(|old|,|new|)")
        if self.prior > 0:
            lines.append(f"prior: the old statistics count as {self.prior:g} samples"
                         + (f" ({self.prior_requested})" if isinstance(self.prior_requested, str) else "")
                         + f" against {self.samples} new (--prior 0: the new statistics only)")
        if self.prior_not_applied:
            lines.append(f"prior not applied to {', '.join(self.prior_not_applied)}: the old mean/var are computed "
                         "at run time (no old value); they hold the new statistics")
        if self.floored:
            lines.append(f"variance floor {self.var_floor:g} x old variance applied to: "
                         + "; ".join(f"{k} ({v} channel{'s' if v > 1 else ''}) [{_channel_list(self.floored_channels[k])}]"
                                     for k, v in self.floored.items())
                         + " (channels (nearly) constant on the new data; without the floor old-domain inputs "
                         "there would be divided by sqrt(eps))")
        if self.eval is not None:
            e = self.eval
            if self.prior_grid:
                lines.append(f"--prior auto on {e['data']} (n = {self.samples}): chose {self.prior:g}")
                lines += [f"  prior {g['prior']:g}: top-1 {100 * g['top1']:.2f}%, loss {g['loss']:.4f}"
                          for g in self.prior_grid]
            lines.append(f"eval on {e['data']}: top-1 {100 * e['before']['top1']:.2f}% -> "
                         f"{100 * e['after']['top1']:.2f}%, loss {e['before']['loss']:.4f} -> {e['after']['loss']:.4f}")
        return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _channel_list(channels: list[int], most: int = 16) -> str:
    return ", ".join(map(str, channels[:most])) + (f", ... ({len(channels) - most} more)" if len(channels) > most else "")


class RecalibrationRefused(UserError):
    """The labelled guard refused the recalibrated model: its top-1 on `eval_data` is more than `max_drop`
    points below the original's. Nothing is returned (the command line writes nothing and exits 1);
    `report` holds the full report, its `eval` the numbers."""

    def __init__(self, report: "RecalibrationReport"):
        e = report.eval
        super().__init__(f"recalibrated top-1 {100 * e['after']['top1']:.2f}% is {e['drop']:.2f} points below the "
                         f"original {100 * e['before']['top1']:.2f}% on {e['data']} (--max-drop {e['max_drop']:g}); "
                         "nothing written")
        self.report = report


# ----------------------------------------------------------------------------- picking and preparing BN nodes

def _bn_label(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def _select(model: onnx.ModelProto, nodes) -> list[onnx.NodeProto]:
    """The BN nodes to recalibrate, in graph order: the named ones (default all), plus every training-mode one."""
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    if not bns:
        raise UserError("the model has no BatchNormalization node; to recalibrate a model without BN, insert identity "
                        "BN first (onnxbn stats + onnxbn insert) and recalibrate that model")
    if nodes is None:
        return bns
    names = [n.strip() for n in (nodes.split(",") if isinstance(nodes, str) else nodes) if n.strip()]
    if not names:
        raise UserError("--nodes names no node; give BatchNormalization node names, comma separated")
    by_name = {n.name: n for n in model.graph.node if n.name}
    for name in names:
        node = by_name.get(name)
        if node is None:
            raise UserError(f"no node named {name!r} in the model; BatchNormalization nodes: "
                            + ", ".join(_bn_label(b) for b in bns[:8]) + (", ..." if len(bns) > 8 else ""))
        if node.op_type != "BatchNormalization":
            raise UserError(f"node {name!r} is a {node.op_type}, not a BatchNormalization; name BN nodes only")
    wanted = set(names)
    return [b for b in bns if b.name in wanted or _in_training_mode(b)]


def _in_training_mode(node: onnx.NodeProto) -> bool:
    """training_mode=1 (opset 14+), or running/saved statistics outputs (before opset 14)."""
    mode = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "training_mode"), 0)
    return bool(mode) or len([o for o in node.output[1:] if o]) > 0


def _to_inference(index: GraphIndex, node: onnx.NodeProto) -> None:
    """Drop the training outputs and training_mode; refuse when something reads those outputs."""
    for extra in node.output[1:]:
        if extra and index.read_count.get(extra):
            raise UserError(f"BatchNormalization {_bn_label(node)!r} is in training mode and its statistics output "
                            f"{extra!r} is read by the graph; recalibrate converts the node to inference mode, which "
                            "has no such output: remove that use first")
    del node.output[1:]
    kept = [a for a in node.attribute if a.name != "training_mode"]
    del node.attribute[:]
    node.attribute.extend(kept)


def _own_slot(index: GraphIndex, node: onnx.NodeProto, slot: int, elem: int,
              reads_before: dict[str, int]) -> tuple[np.ndarray | None, bool]:
    """Make `node.input[slot]` a tensor this BN alone reads and recalibrate may write: its initializer or
    Constant when nothing else read it (`reads_before`: read counts before any change), else a fresh
    initializer (a shared tensor is never changed). Returns (old value in float64, or None when it is
    computed at run time; whether a fresh initializer was made)."""
    name = node.input[slot]
    tensor = index.initializers.get(name)
    if tensor is None:
        tensor = _resolve(index, name)
    old = None if tensor is None else index.tensor_array(tensor).astype(np.float64).reshape(-1)
    own = reads_before.get(name) == 1 and name not in index.outputs and (
        name in index.initializers or _constant_node(index, name) is not None)
    if own:
        return old, False
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type if tensor is not None else elem)
    size = int(old.size) if old is not None else _channels(index, node)
    value = (old if old is not None else np.zeros(size)).astype(dtype)
    node.input[slot] = index.add_initializer(value, f"{_bn_label(node)}.{'mean' if slot == MEAN else 'var'}")
    return old, True


def _constant_node(index: GraphIndex, name: str) -> onnx.NodeProto | None:
    """The Constant node writing `name` with a `value` tensor attribute (writable in place), or None."""
    node = index.producers.get(name)
    if node is not None and node.op_type == "Constant" and any(a.name == "value" for a in node.attribute):
        return node
    return None


def _resolve(index: GraphIndex, name: str) -> onnx.TensorProto | None:
    """`index.constant(name)`, also through Identity nodes (torch's exporter writes a parameter equal to
    another one as an Identity of it)."""
    while name in index.producers and index.producers[name].op_type == "Identity":
        name = index.producers[name].input[0]
    return index.constant(name)


def _channels(index: GraphIndex, node: onnx.NodeProto) -> int:
    for slot in (1, 2, MEAN, VAR):
        value = _resolve(index, node.input[slot])
        if value is not None:
            return int(np.prod(value.dims))
    raise UserError(f"BatchNormalization {_bn_label(node)!r}: none of its parameters is a constant, so its channel "
                    "count is unknown; recalibrate needs constant BN parameters")


def _prepare(model: Model, selected: list[onnx.NodeProto], types: dict) -> list[BNRecord]:
    """Convert training-mode BNs, give each selected BN mean/var tensors of its own; record the old values."""
    index = GraphIndex(model.proto, model.arrays, model.folder)
    reads_before = dict(index.read_count)
    records = []
    for node in selected:
        training = _in_training_mode(node)
        if training:
            _to_inference(index, node)
            index.refresh()
        elem = types[node.input[0]].tensor_type.elem_type if node.input[0] in types else onnx.TensorProto.FLOAT
        old_mean, fresh_mean = _own_slot(index, node, MEAN, elem, reads_before)
        old_var, fresh_var = _own_slot(index, node, VAR, elem, reads_before)
        index.refresh()
        records.append(BNRecord(node=_bn_label(node), key=node.output[0], input=node.input[0],
                                channels=_channels(index, node), training_mode=training,
                                fresh=[s for s, f in (("mean", fresh_mean), ("var", fresh_var)) if f],
                                old_mean=old_mean, old_var=old_var))
    return records


def _write_stats(model: Model, bn: BNRecord, mean: np.ndarray, var: np.ndarray) -> None:
    """Store mean/var in the BN's own tensors (prepared by `_own_slot`), in their dtype: an initializer
    through `Model.set_array`, a Constant node's value in place."""
    index = GraphIndex(model.proto)
    node = index.producers[bn.key]
    for slot, value in ((MEAN, mean), (VAR, var)):
        name = node.input[slot]
        tensor = index.initializers.get(name)
        target = tensor if tensor is not None else next(a.t for a in _constant_node(index, name).attribute
                                                        if a.name == "value")
        cast = np.asarray(value, np.float64).astype(helper.tensor_dtype_to_np_dtype(target.data_type))
        if not np.isfinite(cast).all():
            raise UserError(f"BN {bn.node!r}: the new {'mean' if slot == MEAN else 'var'} does not fit its type "
                            f"{onnx.TensorProto.DataType.Name(target.data_type)} (max |value| "
                            f"{np.abs(value).max():.3g}); nothing written")
        cast = cast.reshape(tuple(target.dims))
        if tensor is not None:
            model.set_array(name, cast)
        else:
            target.CopyFrom(numpy_helper.from_array(cast, target.name))


# ----------------------------------------------------------------------------- levels and cuts

def _levels(index: GraphIndex, bns: list[BNRecord]) -> dict[str, int]:
    """Set each BN's level; return up[t] = the highest level of the selected BNs upstream of tensor t
    (the BN itself included for its output; -1: none)."""
    by_key = {b.key: b for b in bns}
    up: dict[str, int] = {}
    for node in index.graph.node:
        level = max((up.get(t, -1) for t in reads(node)), default=-1)
        bn = by_key.get(node.output[0]) if node.op_type == "BatchNormalization" and node.output else None
        if bn is not None:
            bn.level = level = level + 1
        for out in node.output:
            up[out] = level
    return up


def _dynamic(index: GraphIndex, model: onnx.ModelProto) -> set[str]:
    """Tensors that depend on a run-time input (the rest is constant and recomputed where needed)."""
    dyn = {i.name for i in graph_inputs(model)}
    for node in index.graph.node:
        if any(t in dyn for t in reads(node)):
            dyn.update(o for o in node.output if o)
    return dyn


def _cut(index: GraphIndex, bns: list[BNRecord], k: int, up: dict[str, int], dyn: set[str]) -> list[str]:
    """The tensors later passes need that are final after pass k: read by a node that still changes
    (downstream of a BN of level >= k) and needed after pass k, written by one that does not."""
    later = [b.input for b in bns if b.level > k]
    changing = [n for n in index.ancestors(later) if max(up.get(o, -1) for o in n.output) >= k]
    written = {o for n in changing for o in n.output}
    cut = dict.fromkeys(t for n in changing for t in reads(n) if t not in written and t in dyn)
    return list(cut)


def _slice(index: GraphIndex, targets: list[str], fed: list[str]) -> tuple[list[onnx.NodeProto], list[str]]:
    """(nodes, fed tensors used): the nodes computing `targets` from the tensors in `fed` and constants."""
    base, needed, keep = set(fed), set(targets), []
    for node in reversed(index.graph.node):
        if any(o in needed and o not in base for o in node.output):
            keep.append(node)
            needed.update(reads(node))
    keep.reverse()
    written = {o for n in keep for o in n.output}
    return keep, [t for t in fed if t in needed and t not in written]


def _value_info(name: str, types: dict, array: np.ndarray | None = None) -> onnx.ValueInfoProto:
    t = types.get(name)
    if t is not None and t.HasField("tensor_type"):
        return helper.make_tensor_value_info(name, t.tensor_type.elem_type, tensor_shape(t))
    elem = helper.np_dtype_to_tensor_dtype(array.dtype) if array is not None else onnx.TensorProto.FLOAT
    return helper.make_tensor_value_info(name, elem, None)


def _stage_model(work: onnx.ModelProto, index: GraphIndex, points: list[Point], cut: list[str],
                 base: list[str] | None, types: dict, sample: dict) -> tuple[onnx.ModelProto, list[str], int]:
    """The model of one pass: from the fed tensors (the previous cut, or the model's inputs) to the
    reductions of `points` (per point mean, m2, count) and the tensors of the next `cut`.
    Returns (model, fed names, number of nodes taken from the original graph)."""
    fed_base = list(base) if base is not None else [i.name for i in graph_inputs(work)]
    targets = [p.tensor for p in points] + [t for t in cut if t not in fed_base]
    nodes, fed = _slice(index, targets, fed_base)
    fed += [t for t in dict.fromkeys(targets) if t in fed_base and t not in fed]
    sub = empty_like(work)
    sub.graph.node.extend(nodes)
    needed = {t for n in nodes for t in reads(n)} | set(targets)
    sub.graph.initializer.extend(t for t in work.graph.initializer if t.name in needed)
    inits = {t.name for t in sub.graph.initializer}
    sub.graph.input.extend(_value_info(t, types, sample.get(t)) for t in fed)
    sub.graph.input.extend(i for i in work.graph.input if i.name in inits)  # IR < 4 lists initializers as inputs
    augmented = augment_for_stats(sub, points)
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
    return stage, fed, len(nodes)


def _bytes_per_sample(names: list[str], types: dict) -> int | None:
    """Bytes of one sample of `names` from the inferred shapes, or None when a shape is not known."""
    total = 0
    for name in names:
        shape = tensor_shape(types.get(name))
        if shape is None or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
            return None
        itemsize = helper.tensor_dtype_to_np_dtype(types[name].tensor_type.elem_type).itemsize
        total += int(np.prod(shape[1:], dtype=np.int64)) * itemsize
    return total


# ----------------------------------------------------------------------------- running a pass

@dataclass
class _Cut:
    """Boundary activations kept between passes: `names`, and per batch a dict name -> array."""

    names: list[str]
    batches: list[dict] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)  # samples per batch
    nbytes: int = 0

    def add(self, values: dict, samples: int) -> None:
        self.batches.append(values)
        self.sizes.append(samples)
        self.nbytes += sum(v.nbytes for v in values.values())


@dataclass
class _Pass:
    """One pass: its session and fetch list, the points it reduces, where its batches come from."""

    session: object
    fetch: list[str]
    points: list[Point]
    fed: list[str]
    base: _Cut | None
    keep: list[str]           # the next cut's tensors (computed or carried), empty when none is kept
    budget: int


def _check_finite_input(x: np.ndarray, seen: int) -> None:
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise UserError(f"the data has NaN or Inf values in samples {seen}..{seen + len(x) - 1}; clean or drop "
                        "them; nothing written")


def _batches(p: _Pass, dataset, model: onnx.ModelProto, batch_size: int, workers: int, strict: bool, desc: str):
    """(feeds, outputs, samples) per batch: from the data through `run_batches`, or from the kept cut."""
    if p.base is None:
        name, seen = model_input(model)[0], 0
        for x, _, values in run_batches(p.session, dataset, p.fetch, model, batch_size, workers=workers,
                                        strict=strict, desc=desc):
            _check_finite_input(x, seen)
            seen += len(x)
            yield {name: x}, values, len(x)
        return
    with progress(dataset.total, desc) as bar:
        for feeds, samples in zip(p.base.batches, p.base.sizes):
            values = p.session.run(p.fetch, {t: feeds[t] for t in p.fed})
            bar.update(samples)
            yield feeds, values, samples


def _run_pass(p: _Pass, dataset, model, batch_size: int, workers: int, strict: bool,
              desc: str) -> tuple[dict[str, ChannelMoments], _Cut | None, int]:
    """Stream the batches through the pass: merge each batch's moments (Chan, float64), keep the next cut
    while it fits in the budget. Returns (moments per point, the kept cut or None, samples)."""
    moments = {pt.tensor: ChannelMoments() for pt in p.points}
    kept = _Cut(p.keep) if p.keep else None
    computed = p.fetch[3 * len(p.points):]
    samples = 0
    for feeds, values, n_batch in _batches(p, dataset, model, batch_size, workers, strict, desc):
        for i, pt in enumerate(p.points):
            mean, m2, n = values[3 * i: 3 * i + 3]
            if not (np.isfinite(mean).all() and np.isfinite(m2).all()):
                raise UserError(f"tensor {pt.tensor!r} has NaN or Inf values in the batch of samples {samples}.. "
                                "(an overflow in the model on this data?); nothing written")
            moments[pt.tensor].merge(int(n) // mean.size, mean.reshape(-1), m2.reshape(-1))
        if kept is not None:
            out = dict(zip(computed, values[3 * len(p.points):]))
            kept.add({t: out[t] if t in out else feeds[t] for t in p.keep}, n_batch)
            if kept.nbytes > p.budget:
                kept = None  # it does not fit after all: the next pass starts from the current base
        samples += n_batch
    return moments, kept, samples


def _exact(work: Model, bns: list[BNRecord], dataset, batch_size: int, *, workers: int, strict: bool,
           device: str, cache_mb: float) -> tuple[list[dict], int, str]:
    """Level by level (module docstring): write each level's statistics into `work`. Returns (passes, samples,
    provider). onnxruntime gets the weights where `work` holds them: its arrays as they are, the rest read
    from its files."""
    out = work.proto
    index = GraphIndex(out)
    types = value_types(out)
    up = _levels(index, bns)
    dyn = _dynamic(index, out)
    budget = int(cache_mb * 2**20)
    levels = max(b.level for b in bns) + 1
    _check_rereadable(dataset, levels)
    input_name = model_input(out)[0]
    base: _Cut | None = None
    passes, samples, provider = [], 0, "cpu"
    for k in range(levels):
        started = time.perf_counter()
        level_bns = [b for b in bns if b.level == k]
        points = [_point(t, index, types) for t in dict.fromkeys(b.input for b in level_bns)]
        keep = _choose_cut(index, bns, k, levels, up, dyn, types, base, input_name, dataset.total, budget)
        sample = base.batches[0] if base is not None and base.batches else {}
        stage, fed, n_nodes = _stage_model(out, index, points, keep, base.names if base is not None else None,
                                           types, sample)
        session = make_session(stage, device, weights=work.arrays, folder=work.folder)
        provider = session_provider(session)
        p = _Pass(session, [o.name for o in stage.graph.output], points, fed, base, keep, budget)
        moments, kept, samples = _run_pass(p, dataset, out, batch_size, workers, strict,
                                           f"recalibrate pass {k + 1}/{levels}")
        if samples == 0:
            raise UserError(f"{dataset.description}: no sample could be read; nothing to recalibrate on")
        for b in level_bns:
            m = moments[b.input]
            b.new_mean, b.new_var = m.mean, m.var
            _write_stats(work, b, b.new_mean, b.new_var)
        passes.append({"pass": k + 1, "bns": [b.node for b in level_bns], "nodes": n_nodes,
                       "source": "data" if base is None else "kept activations", "kept": keep if kept else [],
                       "cached_mib": round(kept.nbytes / 2**20, 3) if kept else 0.0,
                       "seconds": round(time.perf_counter() - started, 3)})
        if kept is not None:
            base = kept
        del session, p
    return passes, samples, provider


def _point(tensor: str, index: GraphIndex, types: dict) -> Point:
    t = types.get(tensor)
    elem = t.tensor_type.elem_type if t is not None else onnx.TensorProto.FLOAT
    shape = tensor_shape(t)
    producer = index.producers.get(tensor)
    return Point(tensor=tensor, producer=producer.name if producer else "", producer_op=producer.op_type if producer
                 else "input", channels=shape[1] if shape and len(shape) > 1 and isinstance(shape[1], int) else None,
                 shape=shape, dtype=onnx.TensorProto.DataType.Name(elem).lower())


def _choose_cut(index, bns, k, levels, up, dyn, types, base, input_name, n_samples, budget) -> list[str]:
    """The tensors to keep after pass k: the cut when it fits in the budget (or its size is unknown: then
    it is kept while it fits), else the model input when the data is read from disk and that fits, else none."""
    if k == levels - 1 or budget <= 0:
        return []
    cut = _cut(index, bns, k, up, dyn)
    per_sample = _bytes_per_sample(cut, types)
    if per_sample is None or n_samples is None or per_sample * n_samples <= budget:
        return cut
    if base is None:
        per_input = _bytes_per_sample([input_name], types)
        if per_input is not None and per_input * n_samples <= budget:
            return [input_name]
    return []


def _check_rereadable(dataset, levels: int) -> None:
    """Exact mode reads the data once per level: a one-shot iterator (a generator) cannot be read again."""
    source = getattr(dataset, "source_object", None)
    if levels > 1 and hasattr(source, "__next__") and getattr(dataset, "order", None) is None:
        raise UserError(f"{dataset.description}: exact mode reads the data once per level of BN nodes ({levels} "
                        "here), and a generator or iterator can be read only once; give an array, a .npz, a "
                        "folder, a list of batches, a torch Dataset or DataLoader, or use --mode batch")


# ----------------------------------------------------------------------------- batch mode

def _batch(work: Model, bns: list[BNRecord], dataset, batch_size: int, *, workers: int, strict: bool,
           device: str) -> tuple[list[dict], int, str]:
    """One training-mode pass in torch, update_bn's convention (module docstring); writes into `work`."""
    import torch

    from onnxbn.torch_import import to_torch

    started = time.perf_counter()
    imported = _with_constant_parameters(work.copy().to_proto(), bns)
    module = to_torch(imported)
    modules = _bn_modules(module, imported, bns)
    dev = torch.device("cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    if device == "cuda" and dev.type != "cuda":
        raise UserError("--device cuda: torch sees no CUDA device here; use --device cpu or auto")
    module.to(dev).eval()
    for bn in modules.values():
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    _, dtype, shape = model_input(work.proto)
    samples = 0
    with torch.no_grad(), progress(dataset.total, "recalibrate (batch)") as bar:
        for x, _ in dataset.batches(batch_size, workers, strict=strict, dtype=dtype):
            check_batch_shape(x, shape, dataset.description)
            _check_finite_input(x, samples)
            _forward(module, torch.from_numpy(np.ascontiguousarray(x)).to(dev))
            samples += len(x)
            bar.update(dataset.consumed - bar.n)
    if samples == 0:
        raise UserError(f"{dataset.description}: no sample could be read; nothing to recalibrate on")
    for b in bns:
        bn = modules[b.key]
        b.new_mean = bn.running_mean.detach().double().cpu().numpy()
        b.new_var = bn.running_var.detach().double().cpu().numpy()
        if not (np.isfinite(b.new_mean).all() and np.isfinite(b.new_var).all()):
            raise UserError(f"BN {b.node!r}: its batch statistics have NaN or Inf values (an overflow in the model on "
                            "this data?); nothing written")
        _write_stats(work, b, b.new_mean, b.new_var)
    passes = [{"pass": 1, "bns": [b.node for b in bns], "nodes": len(work.proto.graph.node), "source": "data (torch)",
               "kept": [], "cached_mib": 0.0, "seconds": round(time.perf_counter() - started, 3)}]
    return passes, samples, dev.type


def _with_constant_parameters(model: onnx.ModelProto, bns: list[BNRecord]) -> onnx.ModelProto:
    """`model`, or a copy in which each selected BN's parameters that are not initializers (reached through
    Identity nodes, as torch's exporter writes a parameter equal to another, or Constant nodes) are, so that
    to_torch makes the BN a torch BatchNorm module. Only the module is built from the copy."""
    index = GraphIndex(model)
    slots = [(b.key, slot) for b in bns for slot in (1, 2, MEAN, VAR)
             if index.producers[b.key].input[slot] not in index.initializers]
    if not slots:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    index = GraphIndex(copy)
    for key, slot in slots:
        node = index.producers[key]
        value = _resolve(index, node.input[slot])
        if value is not None:
            node.input[slot] = index.add_initializer(numpy_helper.to_array(value), f"{node.input[slot]}/value")
    return copy


def _forward(module, x) -> None:
    try:
        module(x)
    except ValueError as exc:  # "Expected more than 1 value per channel when training"
        raise UserError(f"batch mode: {str(exc).splitlines()[0]}; use a larger --batch-size (a BN over (N, C) "
                        "needs at least 2 samples in every batch, the last one included)") from None


def _bn_modules(module, model: onnx.ModelProto, bns: list[BNRecord]) -> dict:
    """The torch BN module of each selected BN node, found through the running_mean initializer it owns."""
    index = GraphIndex(model)
    by_mean = {index.producers[b.key].input[MEAN]: b.key for b in bns}
    found = {}
    for state_key, init in module.onnx_tensors.items():
        if state_key.endswith(".running_mean") and init in by_mean:
            found[by_mean[init]] = module.get_submodule(state_key.rpartition(".")[0])
    missing = [b.node for b in bns if b.key not in found]
    if missing:
        raise UserError(f"batch mode: BN {missing[0]!r} was not imported as a torch BatchNorm module (its scale or B "
                        "is not a constant); use --mode exact")
    return found


# ----------------------------------------------------------------------------- the prior

def blend(old_mean: np.ndarray, old_var: np.ndarray, new_mean: np.ndarray, new_var: np.ndarray, prior: float,
          n: int) -> tuple[np.ndarray, np.ndarray]:
    """The old statistics counted as `prior` samples against `n` new ones: the mean and variance of the
    mixture, mu = (N mu_old + n mu_new)/(N+n), var = (N (var_old + (mu_old-mu)^2) + n (var_new + (mu_new-mu)^2))/(N+n)."""
    old_mean, old_var, new_mean, new_var = (np.asarray(a, np.float64) for a in (old_mean, old_var, new_mean, new_var))
    w_old, w_new = prior / (prior + n), n / (prior + n)
    mean = w_old * old_mean + w_new * new_mean
    var = w_old * (old_var + (old_mean - mean) ** 2) + w_new * (new_var + (new_mean - mean) ** 2)
    return mean, var


def _apply_prior(out: Model, bns: list[BNRecord], prior: float, samples: int,
                 var_floor: float = 0.0) -> tuple[list[str], dict[str, list[int]]]:
    """Blend each BN's measured statistics with its old ones (`blend`, n = the number of images), then floor
    the variance (a channel whose new variance is below var_floor * its old one keeps var_floor * old), and
    write them; applied once, after everything is measured (the measurement itself is that of prior 0).

    Why the floor: a channel constant on the new data (e.g. a ReLU that never fires there) gets variance 0,
    and any input that still varies in it (the old domain, an outlier) is then divided by sqrt(eps).
    Returns (the BNs whose old mean/var are computed at run time: no old value, neither blended nor
    floored; {BN: the indices of its floored channels})."""
    unblended, floored = [], {}
    for b in bns:
        if b.old_mean is None or b.old_var is None:
            unblended.append(b.node)
            continue
        if b.measured_mean is None:
            b.measured_mean, b.measured_var = b.new_mean, b.new_var
        mean, var = b.measured_mean, b.measured_var  # called again (--prior auto): always from the measurement
        if prior <= 0 and var_floor <= 0:
            if b.new_mean is not mean:
                b.new_mean, b.new_var = mean, var
                _write_stats(out, b, mean, var)
            continue
        if prior > 0:
            mean, var = blend(b.old_mean, b.old_var, mean, var, prior, samples)
        if var_floor > 0:
            floor = var_floor * b.old_var
            low = var < floor
            if low.any():
                var = np.where(low, floor, var)
                floored[b.node] = [int(c) for c in np.flatnonzero(low)]
        if prior > 0 or b.node in floored or b.new_mean is not b.measured_mean:
            b.new_mean, b.new_var = mean, var
            _write_stats(out, b, b.new_mean, b.new_var)
    return unblended, floored


# ----------------------------------------------------------------------------- the guard

def _parse_prior(prior, eval_data) -> tuple[float, bool] | str:
    """A number N >= 0 -> (N, False); "Kn" (K >= 0 times the number of new images, e.g. "2n") -> (K, True);
    "auto" (which needs labelled eval_data) -> "auto"."""
    relative = False
    if isinstance(prior, str):
        text = prior.strip().lower()
        if text == "auto":
            if eval_data is None:
                raise UserError("--prior auto picks the prior on labelled data: give --eval DATA (eval_data=)")
            return "auto"
        relative = text.endswith("n")
        try:
            prior = float(text[:-1] or 1) if relative else float(text)
        except ValueError:
            raise UserError(f"--prior: {prior!r} is neither a number, a multiple of n (such as 2n) nor auto") from None
    if not (isinstance(prior, (int, float)) and prior >= 0 and np.isfinite(prior)):
        raise UserError(f"--prior must be a finite number >= 0, a multiple of n (such as 2n) or auto (got {prior})")
    return float(prior), relative


def _choose_and_guard(out: Model, bns: list[BNRecord], samples: int, prior, var_floor: float, original: Model,
                      eval_data, max_drop: float, evaluate_options: dict) -> tuple:
    """Blend and floor the measured statistics into `out` (`_apply_prior`); with eval_data, score the original
    and the result on it (`training.evaluate`: top-1, loss). prior "auto": blend at each of AUTO_GRID x n
    (cheap: the measurement does not depend on the prior) and keep the best top-1, then the lowest loss.
    Returns (the prior used, the grid's scores, the guard's record or None, `_apply_prior`'s result)."""
    def score(p: float) -> dict:
        from onnxbn.training import evaluate

        applied = _apply_prior(out, bns, p, samples, var_floor)
        r = evaluate(out.copy().to_proto(), eval_data, **evaluate_options)
        return {"prior": p, "top1": r["top1"], "loss": r["loss"], "samples": r["samples"], "applied": applied}

    if prior != "auto":
        prior = prior[0] * samples if prior[1] else prior[0]
    if eval_data is None:
        return prior, [], None, _apply_prior(out, bns, prior, samples, var_floor)
    from onnxbn.training import evaluate

    r = evaluate(original.copy().to_proto(), eval_data, **evaluate_options)
    before = {"top1": r["top1"], "loss": r["loss"], "samples": r["samples"]}
    if prior == "auto":
        grid = [score(k * samples) for k in AUTO_GRID]
        after = max(grid, key=lambda g: (g["top1"], -g["loss"]))
        applied = _apply_prior(out, bns, after["prior"], samples, var_floor)  # the last grid point is in `out`
    else:
        grid, after = [], score(prior)
        applied = after["applied"]
    drop = 100 * (before["top1"] - after["top1"])
    data = str(eval_data) if isinstance(eval_data, (str, os.PathLike)) else type(eval_data).__name__
    guard = {"data": data, "before": before, "after": {k: after[k] for k in ("top1", "loss", "samples")},
             "drop": drop, "max_drop": max_drop, "refused": bool(drop > max_drop)}
    return after["prior"], [{k: g[k] for k in ("prior", "top1", "loss")} for g in grid], guard, applied


# ----------------------------------------------------------------------------- the API

def recalibrate(model, data, mode: str = "exact", nodes=None, **options) -> onnx.ModelProto:
    """A copy of `model` (path or ModelProto) whose selected BN nodes hold their recalibrated statistics:
    `recalibrate_model` on `Model.open(model)` (see there for the options), as a ModelProto."""
    return recalibrate_model(Model.open(model), data, mode, nodes, **options)[0].to_proto()


def recalibrate_with_report(model, data, mode: str = "exact", nodes=None,
                            **options) -> tuple[onnx.ModelProto, RecalibrationReport]:
    """(`recalibrate`'s result, the RecalibrationReport); see `recalibrate_model`."""
    result, report = recalibrate_model(Model.open(model), data, mode, nodes, **options)
    return result.to_proto(), report


def recalibrate_model(model: Model, data, mode: str = "exact", nodes=None, *, batch_size: int = 32,
                      limit: int | None = None, seed: int = 0, preset: str | None = None, workers: int | None = 0,
                      strict: bool = False, device: str = "auto", cache_mb: float = DEFAULT_CACHE_MB,
                      prior: float | str = DEFAULT_PRIOR, var_floor: float = DEFAULT_VAR_FLOOR, eval_data=None,
                      max_drop: float = DEFAULT_MAX_DROP) -> tuple[Model, RecalibrationReport]:
    """(`model` whose selected BN nodes (default: all) hold their recalibrated statistics, the report);
    `model` is left as it is. The weights recalibration leaves alone stay where they are (a Model opened
    from a path keeps them in its file; onnxruntime reads them from there), the new statistics are
    arrays of the result (see `onnxbn.io.model`).

    `data`: image folder, .npz, array or (x, y), as `collect_stats` takes; `mode`: "exact" or "batch";
    `nodes`: BN node names (list or comma separated); batch_size, limit, seed, preset, workers, strict
    and device as `collect_stats` takes them; cache_mb: exact mode's activation cache;
    prior: the old statistics count as this many samples against the n new images (`blend`), a number,
    a multiple of n ("2n", the default) or "auto" (needs eval_data: the best of AUTO_GRID x n on it);
    var_floor: a new variance below var_floor x the old one keeps that (default DEFAULT_VAR_FLOOR; 0 = off);
    eval_data: labelled data (as `evaluate` takes): top-1 and loss before and after go into the report,
    and `RecalibrationRefused` (holding the report) is raised when top-1 drops by more than max_drop
    points (default 0.5). See the module docstring (math, passes and cost, the insert + recalibrate recipe).
    """
    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r}: use exact or batch")
    if cache_mb < 0:
        raise UserError(f"--cache-mb must be 0 or more (got {cache_mb})")
    parsed = _parse_prior(prior, eval_data)
    requested = prior.strip().lower() if isinstance(prior, str) else float(prior)
    if not (0 <= var_floor <= 1):
        raise UserError(f"--var-floor must be between 0 and 1 (got {var_floor})")
    if not np.isfinite(max_drop):
        raise UserError(f"--max-drop must be a finite number of top-1 points (got {max_drop})")
    started = time.perf_counter()
    light, arrays = detach_weights(model.proto)  # a light copy: large inline weights reach onnxruntime as arrays
    result = Model(light, {**model.arrays, **arrays}, model.folder)
    out = result.proto
    require_opset(out)
    selected = _select(out, nodes)
    bns = _prepare(result, selected, value_types(out))
    dataset = open_model_data(out, data, preset=preset, limit=limit, seed=seed)
    batch_size = fit_batch_size(model_input(out)[2], batch_size, dataset.total)
    workers = default_workers() if workers is None else workers
    if mode == "exact":
        passes, samples, provider = _exact(result, bns, dataset, batch_size, workers=workers, strict=strict,
                                           device=device, cache_mb=cache_mb)
    else:
        passes, samples, provider = _batch(result, bns, dataset, batch_size, workers=workers, strict=strict,
                                           device=device)
    used, grid, guard, (unblended, floored) = _choose_and_guard(
        result, bns, samples, parsed, var_floor, model, eval_data, max_drop,
        {"batch_size": batch_size, "device": device, "preset": preset, "strict": strict})
    if used <= 0:
        unblended = []
    report = RecalibrationReport(mode=mode, bns=bns, passes=passes, samples=samples, batch_size=batch_size,
                                 data=dataset.description, provider=provider, seconds=time.perf_counter() - started,
                                 cache_mb=cache_mb if mode == "exact" else 0.0, prior=used, prior_requested=requested,
                                 prior_not_applied=unblended, var_floor=var_floor,
                                 floored={k: len(v) for k, v in floored.items()}, floored_channels=floored,
                                 prior_grid=grid, eval=guard)
    if guard is not None and guard["refused"]:
        raise RecalibrationRefused(report)
    set_metadata(out, {META_KEY: json.dumps({
        "mode": mode, "nodes": [b.node for b in bns], "passes": len(passes), "samples": samples,
        "batch_size": batch_size, "data": dataset.description, "data_source": dataset.source, "limit": limit,
        "seed": seed, "preset": dataset.preset if dataset.is_images else "array",
        "training_mode_converted": [b.node for b in bns if b.training_mode],
        "prior": used, "prior_requested": requested, "prior_not_applied": unblended, "var_floor": var_floor,
        "floored": {k: len(v) for k, v in floored.items()}, "floored_channels": floored,
        **({"prior_grid": grid} if grid else {}),
        **({"eval": {k: guard[k] for k in ("data", "before", "after", "drop", "max_drop")}} if guard else {}),
    }, separators=(",", ":"))})
    return result, report
