"""Per-channel mean and variance of chosen tensors, computed inside onnxruntime.

For each selected tensor x (N, C, ..., W) the model is augmented with a small
reduction subgraph, and only per-channel vectors leave the runtime. A "row" is
one run of W values along the last axis:

    m_r   = ReduceMean(x, last axis)                     float32 over W values only
    q_r   = ReduceSumSquare(x - m_r, last axis)          float32, centred: well conditioned
    mean  = mean over the rows of each channel of m_r    float64 from here on
    M2    = sum_r q_r + W * sum_r (m_r - mean)^2         (Chan's formula over equal rows)

with count n = N * prod(spatial). Float32 sums stay short (W values) and all long
sums are float64, so the result matches a float64 pass to ~1e-7 relative.
(N, C) tensors, and tensors of unknown rank, go to float64 before any sum. The model's own outputs
are pruned away, so a stats pass costs about one forward pass. On the host, batches (and shards, and resumed
runs) merge with Chan's parallel formula in float64:

    n = na + nb,  d = mean_b - mean_a,  mean = mean_a + d * nb / n,
    M2 = M2a + M2b + d^2 * na * nb / n,   var = M2 / n  (population variance).

Stats file (`.npz`, readable with numpy alone): `tensors` (names, in order), and for
the i-th tensor `count_i` (int64), `mean_i`, `var_i`, `m2_i` (float64, one value per
channel), plus `meta`, a JSON string with the provenance (format, model_sha256,
selector, samples, preset, shard, onnxbn version).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxbn.data.streams import parse_shard
from onnxbn.errors import UserError
from onnxbn.feeding import fit_batch_size, model_input, open_model_data, run_batches
from onnxbn.graph import GraphIndex, pruned_copy, require_opset, tensor_shape
from onnxbn.io.model import Model
from onnxbn.io.npzfile import read_rows, write_rows
from onnxbn.points import Point, select_points
from onnxbn.runtimes.ort_backend import make_session, session_provider

FORMAT = "onnxbn-stats/1"
STATS_PREFIX = "onnxbn_stats"


# ----------------------------------------------------------------------------- accumulation

@dataclass
class ChannelMoments:
    """Running (count, mean, M2) of one tensor's channels, merged with Chan's formula."""

    count: int = 0
    mean: np.ndarray | None = None
    m2: np.ndarray | None = None

    def merge(self, count: int, mean: np.ndarray | None, m2: np.ndarray | None) -> None:
        """Merge `count` samples of per-channel `mean` and `m2` (both None only with count 0: an empty
        ChannelMoments merged in)."""
        if count == 0:
            return
        assert mean is not None and m2 is not None, "samples have a mean and an m2"
        mean = np.asarray(mean, dtype=np.float64)
        m2 = np.asarray(m2, dtype=np.float64)
        if self.count == 0:
            self.count, self.mean, self.m2 = int(count), mean.copy(), m2.copy()
            return
        assert self.mean is not None and self.m2 is not None, "a ChannelMoments with samples has a mean and an m2"
        if mean.shape != self.mean.shape:
            raise UserError(f"channel count changed from {self.mean.size} to {mean.size} between batches")
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta * delta * (self.count * count / total)
        self.count = total

    @property
    def var(self) -> np.ndarray:
        assert self.m2 is not None, "the variance of no samples"
        return self.m2 / self.count


@dataclass
class Stats:
    """Per-channel statistics of named tensors, with provenance."""

    moments: dict[str, ChannelMoments]
    meta: dict = field(default_factory=dict)

    @property
    def tensors(self) -> list[str]:
        return list(self.moments)

    def mean(self, name: str) -> np.ndarray:
        mean = self.moments[name].mean
        assert mean is not None, f"no samples of {name!r}"
        return mean

    def var(self, name: str) -> np.ndarray:
        return self.moments[name].var

    def save(self, path: str | os.PathLike, inputs=(), force: bool = False) -> Path:
        """Write the stats file atomically (see the module docstring for its layout)."""
        rows = {name: {"count": np.array(m.count, dtype=np.int64), "mean": m.mean, "var": m.var, "m2": m.m2}
                for name, m in self.moments.items()}
        return write_rows(path, self.meta, rows, inputs, force)


def load_stats(stats: str | os.PathLike | Stats) -> Stats:
    """Read a stats file written by `onnxbn stats` (or pass a Stats through)."""
    if isinstance(stats, Stats):
        return stats
    moments, meta = read_rows(
        stats, FORMAT, "stats file", lambda npz, i: ChannelMoments(
            int(npz[f"count_{i}"]), npz[f"mean_{i}"].astype(np.float64), npz[f"m2_{i}"].astype(np.float64)),
        readable_hint="; write it with `onnxbn stats`")
    return Stats(moments, meta)


MERGE_KEYS = ("model_sha256", "selector", "preset", "data", "limit", "seed")


def merge_stats(parts: list[str | os.PathLike | Stats]) -> Stats:
    """One Stats from the shards of one run (Chan's formula in float64).

    The shards must come from the same model, selector, preset, data source, limit and seed,
    and each shard only once (a shard counted twice would weigh its samples double);
    an incomplete set (I/N with some I missing) is merged with a warning.
    """
    loaded = [load_stats(p) for p in parts]
    if not loaded:
        raise UserError("no stats files to merge")
    first = loaded[0]
    for other, source in zip(loaded[1:], parts[1:], strict=True):
        for key in MERGE_KEYS:
            if other.meta.get(key) != first.meta.get(key):
                raise UserError(f"{source}: its {key} ({other.meta.get(key)!r}) differs from {parts[0]}'s "
                                f"({first.meta.get(key)!r}); merge only shards of the same model, data and settings")
        if other.tensors != first.tensors:
            raise UserError(f"{source}: holds other tensors than {parts[0]}; merge only shards of one selector")
    seen: dict[str, object] = {}
    for part, source in zip(loaded, parts, strict=True):
        shard = str(part.meta.get("shard"))
        if shard in seen:
            raise UserError(f"{source} and {seen[shard]} are both shard {shard}; give each shard once")
        seen[shard] = source
    counts = {s.split("/")[1] for s in seen if "/" in s and not s.startswith(("merged", "torchrun"))}
    if len(counts) == 1:
        total = int(counts.pop())
        missing = sorted(set(range(total)) - {int(s.split("/")[0]) for s in seen if "/" in s})
        if missing:
            logging.getLogger("onnxbn").warning("merging %d of %d shards: shard(s) %s missing; the statistics cover "
                                                "only part of the data", total - len(missing), total,
                                                ", ".join(f"{i}/{total}" for i in missing))
    moments = {name: ChannelMoments() for name in first.tensors}
    for part in loaded:
        for name, m in part.moments.items():
            moments[name].merge(m.count, m.mean, m.m2)
    meta = dict(first.meta)
    meta["samples"] = sum(int(p.meta.get("samples", 0)) for p in loaded)
    meta["shard"] = "merged " + ",".join(str(p.meta.get("shard", "?")) for p in loaded)
    return Stats(moments, meta)


# ----------------------------------------------------------------------------- graph augmentation

def reduce_node(index: GraphIndex, op: str, x: str, axes: list[int], keepdims: int, out: str, opset: int) -> onnx.NodeProto:
    """A Reduce* node, with axes as attribute or input depending on the opset."""
    if opset >= 18 or (op == "ReduceSum" and opset >= 13):
        axes_name = index.add_initializer(np.array(axes, dtype=np.int64), f"{out}/axes")
        return helper.make_node(op, [x, axes_name], [out], name=out, keepdims=keepdims)
    return helper.make_node(op, [x], [out], name=out, axes=axes, keepdims=keepdims)


@dataclass
class StatsGraph:
    """`augment_for_stats`'s model and, per point tensor, the names of its (mean, m2, count) outputs:
    mean (1, C, 1) and m2 (C,) float64 per-batch moments over every axis but 1 (see the module
    docstring), count the number of elements of the tensor."""

    model: onnx.ModelProto
    outputs: dict[str, tuple[str, str, str]]

    @property
    def fetch(self) -> list[str]:
        """Every output name (the model's outputs, in order)."""
        return [name for names in self.outputs.values() for name in names]

    def batch_moments(self, values: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
        """{tensor: (mean (C,), m2 (C,), samples per channel)} of one batch, from the fetched outputs by name."""
        found = {}
        for tensor, (mean, m2, count) in self.outputs.items():
            mean_c = values[mean].reshape(-1)
            found[tensor] = (mean_c, values[m2].reshape(-1), int(values[count]) // mean_c.size)
        return found

    def merge(self, moments: dict[str, ChannelMoments], values: dict[str, np.ndarray], first: int, size: int) -> None:
        """Merge one batch (`values`: the fetched outputs by name; samples first..first+size-1) into `moments`
        (Chan, float64); NaN or Inf in a tensor's moments is a UserError naming the tensor and the samples."""
        for tensor, (mean, m2, count) in self.batch_moments(values).items():
            if not (np.isfinite(mean).all() and np.isfinite(m2).all()):
                raise UserError(f"tensor {tensor!r} has NaN or Inf values in the batch of samples {first}.."
                                f"{first + size - 1} (bad inputs, or an overflow in the model on this data?); "
                                "nothing written")
            moments[tensor].merge(count, mean, m2)


def tensor_points(types: dict, tensors: list[str]) -> list[Point]:
    """Points for the per-channel moments of named tensors (`types`: graph.value_types of their model)."""
    points = []
    for tensor in tensors:
        t = types.get(tensor)
        elem = t.tensor_type.elem_type if t is not None and t.HasField("tensor_type") else TensorProto.FLOAT
        points.append(Point(tensor, "", "", None, tensor_shape(t), TensorProto.DataType.Name(elem).lower()))
    return points


def augment_for_stats(model: onnx.ModelProto, points: list[Point], keep: list[str] | None = None) -> StatsGraph:
    """A copy of `model` whose only outputs are, per point, the reductions `StatsGraph` names (after the
    outputs named in `keep`, kept as they are: another pass's, sharing this one's forward pass).

    Nodes the stats do not need (the classifier head, the model outputs) are left out. Row
    reductions run in float32, or in float64 for a float64 tensor.
    """
    opset = require_opset(model)
    kept = [o for o in model.graph.output if o.name in set(keep or ())]
    out = pruned_copy(model, {p.tensor for p in points} | {o.name for o in kept})
    graph = out.graph
    index = GraphIndex(out)
    index.taken |= GraphIndex(model).taken  # the copy's new names must not collide with dropped ones
    nodes: list = []

    def name(base: str) -> str:
        return index.unique_name(f"{STATS_PREFIX}/{base}")

    def node(op: str, inputs: list[str], base: str, **attrs) -> str:
        output = name(base)
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def reduce(op: str, x: str, axes: list[int], keepdims: int, base: str) -> str:
        output = name(base)
        nodes.append(reduce_node(index, op, x, axes, keepdims, output, opset))
        return output

    shapes: dict[str, str] = {}

    def shape(base: str, values: list[int]) -> str:
        """A shared int64 shape initializer, added on first use."""
        if base not in shapes:
            shapes[base] = index.add_initializer(np.array(values, dtype=np.int64), f"{STATS_PREFIX}/{base}")
        return shapes[base]

    del graph.output[:]
    graph.output.extend(kept)
    outputs = {}
    for i, point in enumerate(points):
        p = f"{i}"
        x = point.tensor
        rank = len(point.shape) if point.shape is not None else None
        if rank is not None and rank >= 3:
            # rows along the last axis, reduced in float32 (a few hundred values each), float64 stays float64
            if point.dtype not in ("float", "double"):
                x = node("Cast", [x], f"{p}/float", to=TensorProto.FLOAT)
        else:
            # (N, C) or unknown rank: every value is its own row, all in float64
            x = node("Reshape", [node("Cast", [x], f"{p}/double", to=TensorProto.DOUBLE),
                                 shape("shape_rows", [0, 0, -1, 1])], f"{p}/rows")
            rank = 4
        last = rank - 1  # a positive axis: opsets before 11 take no negative axes
        row_mean = reduce("ReduceMean", x, [last], 1, f"{p}/row_mean")
        centred = node("Sub", [x, row_mean], f"{p}/centred")
        row_m2 = reduce("ReduceSumSquare", centred, [last], 1, f"{p}/row_m2")
        row_mean_nc, row_m2_nc = (
            node("Reshape", [node("Cast", [part], f"{p}/{label}64", to=TensorProto.DOUBLE), shape("shape_nc", [0, 0, -1])],
                 f"{p}/{label}_nc")
            for part, label in ((row_mean, "row_mean"), (row_m2, "row_m2")))
        mean = reduce("ReduceMean", row_mean_nc, [0, 2], 1, f"{p}/mean")
        spread = node("Sub", [row_mean_nc, mean], f"{p}/spread")
        within = reduce("ReduceSum", row_m2_nc, [0, 2], 0, f"{p}/within")
        between = reduce("ReduceSumSquare", spread, [0, 2], 0, f"{p}/between")
        # row length W = Size(x) / Size(row_mean), so M2 = within + W * between
        count = node("Size", [x], f"{p}/count")
        row_len = node("Cast", [node("Div", [count, node("Size", [row_mean], f"{p}/rows_count")], f"{p}/row_len")],
                       f"{p}/row_len64", to=TensorProto.DOUBLE)
        m2 = node("Add", [within, node("Mul", [between, row_len], f"{p}/between_w")], f"{p}/m2")
        outputs[point.tensor] = (mean, m2, count)
        graph.output.extend([helper.make_tensor_value_info(mean, TensorProto.DOUBLE, None),
                             helper.make_tensor_value_info(m2, TensorProto.DOUBLE, None),
                             helper.make_tensor_value_info(count, TensorProto.INT64, None)])
    graph.node.extend(nodes)
    return StatsGraph(out, outputs)


# ----------------------------------------------------------------------------- runner

@dataclass
class Checkpoint:
    """A run's saved state at `path`, written every `every` seconds, resumable only by a run whose
    `provenance()` (model hash, selector, tensors, data fingerprint, batch size, limit, seed, shard)
    is the same. `provenance` is a callable: the hash is computed in a thread while batches run."""

    path: Path | None
    provenance: Callable[[], dict]
    every: float = 60.0
    last_saved: float = field(default_factory=time.perf_counter)

    def resume(self) -> tuple[dict[str, ChannelMoments], int, int, list]:
        """(moments, items consumed, samples, skipped files) saved by this exact run."""
        if self.path is None or not self.path.is_file():
            return {}, 0, 0, []
        saved = load_stats(self.path)
        if saved.meta.get("checkpoint") != self.provenance():
            raise UserError(f"{self.path}: this checkpoint is from a run with other settings (model, data, selector, "
                            "batch size, limit or shard); delete it or drop --resume")
        return saved.moments, int(saved.meta["consumed"]), int(saved.meta["samples"]), list(saved.meta["skipped_all"])

    def save_if_due(self, moments: dict[str, ChannelMoments], consumed: int, samples: int, skipped: list) -> None:
        if self.path is None or time.perf_counter() - self.last_saved < self.every:
            return
        Stats(moments, {"format": FORMAT, "checkpoint": self.provenance(), "consumed": consumed, "samples": samples,
                        "skipped_all": skipped}).save(self.path)
        self.last_saved = time.perf_counter()


def accumulate(session, graph: StatsGraph, dataset, model: onnx.ModelProto, batch_size: int,
               moments: dict[str, ChannelMoments], *, workers: int, strict: bool = False, start: int = 0,
               seen: int = 0, checkpoint: Checkpoint | None = None) -> int:
    """Run the stats graph (`session` of `graph.model`) over `dataset` and merge each batch's moments into
    `moments`; return the number of samples seen."""
    fetch = graph.fetch
    for x, _, values in run_batches(session, dataset, fetch, model, batch_size, workers=workers, strict=strict,
                                    start=start, desc="stats"):
        graph.merge(moments, dict(zip(fetch, values, strict=True)), seen, len(x))
        seen += len(x)
        if checkpoint is not None:
            checkpoint.save_if_due(moments, dataset.consumed, seen, dataset.skipped)
    return seen


def merge_ranks(moments: dict[str, ChannelMoments], seen: int, skipped: list) -> tuple[dict, int, list]:
    """Under torchrun, every rank's (moments, samples, skipped files) merged; alone, the same values."""
    from onnxbn import distributed

    parts = distributed.gather((moments, seen, skipped))
    if len(parts) == 1:
        return moments, seen, skipped
    merged = {name: ChannelMoments() for name in moments}
    for part, _, _ in parts:
        for name, m in part.items():
            merged[name].merge(m.count, m.mean, m.m2)
    return merged, sum(p[1] for p in parts), [f for p in parts for f in p[2]]


def collect_stats(model, data, after="dense", batch_size: int = 32, limit: int | None = None, device: str = "auto",
                  workers: int | None = None, seed: int = 0, shard=None, preset: str | None = None,
                  strict: bool = False, checkpoint: str | os.PathLike | None = None, resume: bool = False,
                  checkpoint_every: float = 60.0) -> Stats:
    """Per-channel mean and population variance of the tensors `after` selects, over `data`.

    `model`: path or ModelProto; `data`: image folder, .npz, or numpy array (N, C, H, W);
    `limit`: a seeded class-balanced sample; `shard`: "I/N". With `checkpoint`, the
    accumulated state is saved there every `checkpoint_every` seconds, and `resume`
    continues from it with a bit-identical result. Under torchrun each rank takes a
    shard and the ranks' moments are merged (every rank returns the whole).
    See the module docstring.
    """
    from onnxbn import distributed
    from onnxbn.data.images import default_workers

    rank, ranks = distributed.world()
    if ranks > 1:
        if shard is not None:
            raise UserError("use either --shard or torchrun, not both: under torchrun each rank is a shard")
        shard = (rank, ranks)
    # A model file is read as structure only: onnxruntime reads its weights from the file itself.
    base = Model.open(model)
    proto = base.proto
    points: list[Point] = select_points(proto, after)
    dataset = open_model_data(proto, data, preset=preset, limit=limit, seed=seed, shard=shard)
    light = base.detached()  # in-memory weights reach onnxruntime as arrays, uncopied
    graph = augment_for_stats(light.proto, points)
    # No CPU arena: the reduction chains hold one more activation-sized tensor than plain
    # inference, and the arena kept what it grew to (VGG16 relu, 16 images: peak 1611 -> 1249 MB,
    # plain inference 1142 MB; the time did not change measurably)
    session = make_session(light.with_graph(graph.model), device, arena=False)
    batch_size = fit_batch_size(model_input(proto)[2], batch_size, dataset.total)
    index, count = parse_shard(shard)
    selector = after if isinstance(after, str) else ",".join(after)
    # The provenance hash (and the data fingerprint a checkpoint carries) are computed in a
    # thread while the batches run (hashlib releases the GIL): they are needed only at the end,
    # or when a checkpoint is written or resumed.
    hashing = concurrent.futures.ThreadPoolExecutor(1)
    provenance = hashing.submit(lambda: {
        "model_sha256": base.sha256(), "selector": selector, "tensors": [p.tensor for p in points],
        "data": dataset.fingerprint() if checkpoint else None, "batch_size": batch_size, "limit": limit,
        "seed": seed, "shard": f"{index}/{count}"})
    hashing.shutdown(wait=False)
    saving = Checkpoint(Path(checkpoint) if checkpoint is not None else None, provenance.result, checkpoint_every)
    moments, start, seen, skipped = saving.resume() if resume else ({}, 0, 0, [])
    moments = moments or {p.tensor: ChannelMoments() for p in points}
    dataset.skipped.extend(skipped)
    started = time.perf_counter()
    seen = accumulate(session, graph, dataset, proto, batch_size, moments,
                      workers=default_workers() if workers is None else workers, strict=strict, start=start,
                      seen=seen, checkpoint=saving)
    moments, seen, skipped_all = merge_ranks(moments, seen, dataset.skipped)
    if seen == 0:
        raise UserError(f"{dataset.description}: no image could be read; nothing to gather statistics from")
    meta = {
        "format": FORMAT,
        "model_sha256": provenance.result()["model_sha256"],
        "selector": selector,
        "samples": seen,
        "skipped": len(skipped_all),
        "preset": dataset.preset if dataset.is_images else "array",
        "data": dataset.source,
        "limit": limit,
        "seed": seed,
        "shard": f"{index}/{count}" if ranks == 1 else f"torchrun x{ranks}",
        "provider": session_provider(session),
        "seconds": round(time.perf_counter() - started, 3),
        "onnxbn": __import__("onnxbn").__version__,
        "skipped_files": skipped_all[:20],
    }
    return Stats(moments, meta)
