"""Per-tensor ranges and histograms of activations, computed inside onnxruntime (for quantization).

For each float activation tensor x (every float graph input and node output, or those asked for)
the model is augmented so that per batch only these leave the runtime:

    lo, hi = min(ReduceMin(x, axes 1..)), max(ReduceMax(...))  in x's type (exact, every value; see below
                                                               for tensors known to be >= 0)
    k      = floor(log2(max(|lo|, |hi|, 2^-126))) + 2          so R = 2^k > max|x| always
    v      = every s-th value of each sample of x              Slice(Flatten(x, 1), step s); s = `sample_stride`
    j      = floor(v * (B/2) / R)                              in float64, then int16 in [-B/2, B/2)
    hist   = counts of j + B/2 over B bins                     np.bincount of j viewed as uint16, int64 [B]

B = BINS = 8192: bins of width R/4096 over [-R, R), symmetric around 0, R a power of two (the
"+2" keeps R above max|x| when log2 rounds down at an exact power of two; at least 1024 bins
cover [0, max|x|]; |x| < R puts j in range without a clip). j is exact: scale = (B/2) / R is a
power of two and float64 holds every float32/float16 value times it (no underflow to -0).

Histogram subsample: a tensor with P values per sample contributes every s-th of them (flat
C-order positions 0, s, 2s, ... within each sample), s the largest odd number keeping at least
HISTOGRAM_VALUES = 2048 of them (s = 1, every value, below 3 * 2048 values per sample or when P is
not known). The positions depend on the sample alone, not on the batch it is in, so the
histogram of a run is that of a fixed subsample of the data; odd s walks through every column,
row and channel of power-of-two planes. min, max and count stay over every value. Why: counting
costs ~2 ns per value outside the graph plus ~1.5 ns in it, as much as a small CNN spends per
activation value on inference (counting every value made `quantize --method percentile` 3.8-4.5x
plain inference; `tools/bench.py quantize` and the README's quantize section have the numbers),
while the ranges chosen from 2048 values per sample and tensor moved the INT8 models' cosine with
the float ones by under 1e-5 (percentile, mse) and 1e-4 (entropy) against exact counts.

Mergeable exactly (batches, shards, resumed runs): two histograms with exponents ka <= kb merge
on the coarser grid, bin j of the finer one going to floor(j / 2^(kb - ka)); since
floor(floor(x s) / f) = floor(x s / f) for integer f, this is the histogram a single pass would
have computed at R = 2^kb (and a single pass's R is the largest batch R: k grows with max|x|),
over the same subsample. min/max merge as min/max. Memory is flat in the data size: per tensor,
two scalars and B counts are kept; per batch, j holds 2 bytes per sampled value.

The session keeps onnxruntime's memory arena, which holds one batch's high-water mark whatever the
number of batches, except when it also gathers per-channel moments. On VGG16 (batch 8) a batch took
1.08x plain inference with the arena and 1.22x without (malloc and page faults for every whole
activation); minmax over 128 images 1.04x against 1.15x, for 290 MiB more peak memory (1.43 GiB,
the same at 32 and 128 images). With moments (quantize's bias correction) the arena saved no time
and added 870 MiB, so that pass runs without it; there the process's anonymous memory rises over
the first batches and then stays (glibc keeps freed buffers in its heap once its dynamic mmap
threshold has grown; the larger bench model: 210-246 MiB at 32 inputs, 271 at 128;
MALLOC_MMAP_THRESHOLD_=131072 in the environment removes the rise).

min and max leave the runtime per sample (one value per sample: the reduction over every axis but
the first, when x's rank is known and at least 2; else one value) and numpy takes their min/max:
exact in any order, and onnxruntime runs a reduction that keeps the batch axis on all its threads,
one to a scalar on one. On a 2-core CPU (the quick and larger models of `tools/bench.py quantize`,
batch 4 and 32) the reductions took half the time (profiler) and the min/max session 3-7% less,
paired medians over 15-21 alternated runs, than with ReduceMin/ReduceMax to a scalar.

Tensors the caller knows to be >= 0 (`nonnegative`: what `nonnegative_tensors` finds, e.g. ReLU outputs;
quantize passes them) skip the min: it is recorded as 0, the bound a quantization range takes anyway
(lo = min(min, 0)), so the INT8 model is the same byte for byte (test). Their max, when float32 of rank
>= 3, is GlobalMaxPool's per-channel max, which onnxruntime computes in its blocked (NCHWc) layout
where ReduceMax needs a reorder of the whole tensor out of it first; with a ReduceMin beside it the
reorder happens anyway, so tensors whose min is measured keep ReduceMin/ReduceMax. Per batch on a
2-core CPU against plain inference (paired medians, thread spinning off): the larger model of
`tools/bench.py quantize` at batch 32 1.147x -> 1.104x, VGG16 at 224, batch 8, 1.060x -> 1.054x.

Cost: min/max alone (`histograms=False`, what --method minmax uses) is two reductions per tensor
(one for a tensor known >= 0; plus, where a min is measured on a Conv+ReLU output, onnxruntime's
reorder out of its blocked layout); a histogram adds
a strided Slice of x and, per sampled value, a cast, a multiply, a floor and a cast in the graph
and np.bincount outside it. `onnxbn quantize` observes only the tensors whose ranges its Q/DQ
placement reads: a Conv output read by anything but its ReLU would keep onnxruntime from fusing
the two.

Ranges file (`.npz`, readable with numpy alone): `tensors` (names, in order), for the i-th
tensor `count_i`, `min_i`, `max_i`, `exp_i`, `hist_i` (int64, BINS), `stride_i` (1 when absent:
files written before the subsample), plus `meta` (JSON: format onnxbn-ranges/1, model_sha256,
samples, shard, data, outputs (the model's), histogram_values, ...).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxbn.errors import UserError
from onnxbn.feeding import check_finite_input, fit_batch_size, model_input, open_model_data, run_batches
from onnxbn.graph import GraphIndex, opset_version, tensor_shape, value_types
from onnxbn.io.model import Model
from onnxbn.io.npzfile import format_of, read_rows, write_rows
from onnxbn.runtimes.ort_backend import make_session, session_provider
from onnxbn.stats import ChannelMoments, augment_for_stats, reduce_node, tensor_points

FORMAT = "onnxbn-ranges/1"
PREFIX = "onnxbn_ranges"
BINS = 8192
HALF = BINS // 2
CALIBRATED_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16)  # what onnxruntime's quantizer quantizes


# ----------------------------------------------------------------------------- accumulation

@dataclass
class TensorRange:
    """Running min, max, count (of all values) and histogram (BINS bins over [-2^exp, 2^exp)) of one tensor,
    the histogram of every `stride`-th value of each sample (see `sample_stride`)."""

    count: int = 0
    min: float = np.inf
    max: float = -np.inf
    exp: int | None = None
    hist: np.ndarray = field(default_factory=lambda: np.zeros(BINS, np.int64))
    stride: int = 1

    @staticmethod
    def rebin(hist: np.ndarray, shift: int) -> np.ndarray:
        """`hist` on the grid 2^shift times coarser (exact: see the module docstring)."""
        if shift == 0:
            return hist
        j = np.arange(BINS, dtype=np.int64) - HALF
        return np.bincount(np.floor_divide(j, 1 << shift) + HALF, weights=hist, minlength=BINS).astype(np.int64)

    def merge(self, count: int, lo: float, hi: float, exp: int | None, hist: np.ndarray) -> None:
        if count == 0 or exp is None:
            return
        self.count += int(count)
        self.min, self.max = min(self.min, float(lo)), max(self.max, float(hi))
        hist = np.asarray(hist, np.int64)
        if self.exp is None:
            self.exp, self.hist = int(exp), hist.copy()
            return
        top = max(self.exp, int(exp))
        self.hist = self.rebin(self.hist, top - self.exp) + self.rebin(hist, top - int(exp))
        self.exp = top

    @property
    def width(self) -> float:
        return 2.0 ** (self.exp or 0) / HALF

    def abs_hist(self) -> np.ndarray:
        """Counts of |x| over HALF bins of `width` from 0."""
        return self.hist[HALF:] + self.hist[:HALF][::-1]


@dataclass
class Ranges:
    """Ranges and histograms of named tensors, with provenance; `moments`: per-channel moments gathered in
    the same pass (`collect_ranges(moments=...)`), not saved."""

    tensors: dict[str, TensorRange]
    meta: dict = field(default_factory=dict)
    moments: dict[str, ChannelMoments] = field(default_factory=dict)

    def save(self, path: str | os.PathLike, inputs=(), force: bool = False) -> Path:
        rows = {name: {"count": np.array(r.count, np.int64), "min": np.array(r.min), "max": np.array(r.max),
                       "exp": np.array(r.exp if r.exp is not None else 0), "hist": r.hist,
                       "stride": np.array(r.stride, np.int64)}
                for name, r in self.tensors.items()}
        return write_rows(path, self.meta, rows, inputs, force)


def is_ranges_file(path: str | os.PathLike) -> bool:
    return format_of(path) == FORMAT


def load_ranges(ranges: str | os.PathLike | Ranges) -> Ranges:
    """Read a ranges file written by `onnxbn stats --ranges` (or pass a Ranges through)."""
    if isinstance(ranges, Ranges):
        return ranges
    tensors, meta = read_rows(
        ranges, FORMAT, "ranges file", lambda npz, i: TensorRange(
            int(npz[f"count_{i}"]), float(npz[f"min_{i}"]), float(npz[f"max_{i}"]), int(npz[f"exp_{i}"]),
            npz[f"hist_{i}"].astype(np.int64), int(npz[f"stride_{i}"]) if f"stride_{i}" in npz else 1),
        format_hint="; write it with `onnxbn stats --ranges`")
    return Ranges(tensors, meta)


MERGE_KEYS = ("model_sha256", "data", "limit", "seed", "preset", "bins", "histogram_values")


def merge_ranges(parts: list) -> Ranges:
    """One Ranges from shards (or resumed parts) of one run: min/max, and histograms on the coarsest grid."""
    loaded = [load_ranges(p) for p in parts]
    if not loaded:
        raise UserError("no ranges files to merge")
    first = loaded[0]
    for other, source in zip(loaded[1:], parts[1:], strict=True):
        for key in MERGE_KEYS:
            if other.meta.get(key) != first.meta.get(key):
                raise UserError(f"{source}: its {key} ({other.meta.get(key)!r}) differs from {parts[0]}'s "
                                f"({first.meta.get(key)!r}); merge only shards of the same model, data and settings")
        if list(other.tensors) != list(first.tensors):
            raise UserError(f"{source}: holds other tensors than {parts[0]}")
    shards = [str(p.meta.get("shard")) for p in loaded]
    if len(set(shards)) != len(shards):
        raise UserError(f"a shard is given twice ({', '.join(shards)}); give each shard once")
    out = {name: TensorRange(stride=r.stride) for name, r in first.tensors.items()}
    for part in loaded:
        for name, r in part.tensors.items():
            out[name].merge(r.count, r.min, r.max, r.exp, r.hist)
    meta = dict(first.meta, samples=sum(int(p.meta.get("samples", 0)) for p in loaded),
                shard="merged " + ",".join(shards))
    return Ranges(out, meta)


# ----------------------------------------------------------------------------- graph augmentation

def activation_tensors(model: onnx.ModelProto, types: dict | None = None) -> list[str]:
    """Float (float32/float16) tensors onnxruntime's quantizer may quantize: run-time graph inputs and
    node outputs (Constant outputs and initializers excluded), in graph order."""
    types = value_types(model) if types is None else types
    index = GraphIndex(model)

    def is_float(name: str) -> bool:
        t = types.get(name)
        return t is not None and t.HasField("tensor_type") and t.tensor_type.elem_type in CALIBRATED_TYPES

    names = [i.name for i in model.graph.input if i.name not in index.initializers and is_float(i.name)]
    for node in model.graph.node:
        if node.op_type in ("Constant", "ConstantOfShape"):
            continue
        names += [o for o in node.output if o and is_float(o) and index.constant(o) is None]
    return list(dict.fromkeys(names))


NONNEGATIVE_OPS = {"Relu", "Sigmoid", "Softmax", "Abs", "Exp", "Softplus", "HardSigmoid"}  # >= 0 for any input
ORDER_OPS = {"MaxPool", "GlobalMaxPool", "AveragePool", "GlobalAveragePool", "Flatten", "Reshape", "Transpose",
             "Squeeze", "Unsqueeze", "Identity", "Slice", "Split", "Concat"}  # their outputs' values lie within
# their data inputs' [min, max] (moved, picked or averaged; AveragePool's padding adds zeros)


def nonnegative_tensors(model: onnx.ModelProto) -> set[str]:
    """Tensors that hold no negative value whatever the input: outputs of NONNEGATIVE_OPS and of Clip with a
    constant min >= 0, and outputs of ORDER_OPS whose float data inputs all are such tensors (Reshape's,
    Slice's, ... shape and index inputs aside; Concat reads every input)."""
    index = GraphIndex(model)
    found: set[str] = set()
    for node in model.graph.node:  # graph order is topological
        if node.op_type in NONNEGATIVE_OPS:
            positive = True
        elif node.op_type == "Clip":
            low = next((a.f for a in node.attribute if a.name == "min"), None)  # opset < 11
            if low is None and len(node.input) > 1 and node.input[1]:
                value = index.constant_array(node.input[1])
                low = None if value is None else float(np.min(value))
            positive = low is not None and low >= 0
        elif node.op_type in ORDER_OPS:
            data = node.input if node.op_type == "Concat" else node.input[:1]
            positive = bool(data) and all(name in found for name in data)
        else:
            positive = False
        if positive:
            found.update(o for o in node.output if o)
    return found


HISTOGRAM_VALUES = 2048  # per sample and tensor, at least this many values go into its histogram (all if fewer)


def sample_stride(per_sample: int | None) -> int:
    """The stride s of the histogram's subsample of a tensor with `per_sample` values per sample: the largest
    odd s <= max(1, per_sample / HISTOGRAM_VALUES), so that at least HISTOGRAM_VALUES values of each sample
    are counted (all of them when there are fewer than 3 times as many, or when the size is not known). Odd,
    so that on power-of-two rows and planes the sampled positions walk through every column, row and channel
    instead of repeating one column."""
    s = max(1, (per_sample or 0) // HISTOGRAM_VALUES)
    return s if s % 2 else s - 1


def per_sample_size(type_proto) -> int | None:
    """Values per sample (all dimensions after the first, each known), or None."""
    dims = tensor_shape(type_proto)
    sizes = [d for d in (dims or [])[1:] if isinstance(d, int) and d > 0]
    if not dims or len(sizes) != len(dims) - 1:
        return None
    return math.prod(sizes)


def augment_for_ranges(model: onnx.ModelProto, tensors: list[str], histograms: bool = True,
                       nonnegative: Collection[str] = ()) -> tuple[onnx.ModelProto, dict[str, int]]:
    """(a copy of `model` whose outputs are, per tensor i, `onnxbn_ranges/i/{min,max,exp,j,count}` (exp and
    j, the int16 bin index of each sampled value, only with `histograms`), {tensor: sample stride});
    see the module docstring. The min of a tensor of `nonnegative` is a constant 0."""
    opset = opset_version(model)
    if opset < 11:
        raise UserError(f"ranges need opset 11 or later (the model has {opset}); convert it with "
                        "onnx.version_converter.convert_version(model, 13)")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    index = GraphIndex(out)
    types = value_types(model)
    const: dict[str, str] = {}
    strides: dict[str, int] = {}

    def c(value, base: str) -> str:
        if base not in const:
            const[base] = index.add_initializer(np.asarray(value), f"{PREFIX}/{base}")
        return const[base]

    nodes: list = []

    def node(op: str, inputs: list[str], base: str, **attrs) -> str:
        name = index.unique_name(f"{PREFIX}/{base}")
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def node_reduce(op: str, x: str, axes: list[int], base: str) -> str:
        name = index.unique_name(f"{PREFIX}/{base}")
        nodes.append(reduce_node(index, op, x, axes, 0, name, opset))
        return name

    def per_sample(op: str, x: str, rank: int, base: str) -> str:
        """`op` over every axis but the batch (one value per sample), or to one value when the rank is < 2."""
        return node_reduce(op, x, list(range(1, rank)), base) if rank >= 2 else node(op, [x], base, keepdims=0)

    del graph.output[:]
    for i, x in enumerate(tensors):
        p = str(i)
        # min and max per sample, exact in the tensor's own type; Size counts its elements
        x_type = types[x].tensor_type.elem_type if x in types else TensorProto.UNDEFINED  # undefined: not declared
        rank = len(tensor_shape(types.get(x)) or [])
        if x in nonnegative:  # known >= 0: its min is not measured, 0 is the bound every range takes
            zero = c(np.zeros(1, helper.tensor_dtype_to_np_dtype(x_type or TensorProto.FLOAT)), f"zero{x_type}")
            lo = node("Identity", [zero], f"{p}/min")
            hi = (node("GlobalMaxPool", [x], f"{p}/max") if rank >= 3 and x_type == TensorProto.FLOAT  # per channel
                  else per_sample("ReduceMax", x, rank, f"{p}/max"))
        else:
            lo, hi = per_sample("ReduceMin", x, rank, f"{p}/min"), per_sample("ReduceMax", x, rank, f"{p}/max")
        count = node("Size", [x], f"{p}/count")
        outputs = [(lo, x_type), (hi, x_type)]
        if histograms:
            lo64 = node("Cast", [node("ReduceMin", [lo], f"{p}/min_all", keepdims=0)], f"{p}/min64", to=TensorProto.DOUBLE)
            hi64 = node("Cast", [node("ReduceMax", [hi], f"{p}/max_all", keepdims=0)], f"{p}/max64", to=TensorProto.DOUBLE)
            amax = node("Max", [node("Abs", [lo64], f"{p}/abs_min"), node("Abs", [hi64], f"{p}/abs_max"),
                                c(np.float64(2.0 ** -126), "tiny")], f"{p}/amax")
            exp = node("Add", [node("Floor", [node("Div", [node("Log", [amax], f"{p}/log"), c(np.log(2.0), "ln2")],
                                                   f"{p}/log2")], f"{p}/floor"), c(np.float64(2.0), "two")], f"{p}/exp")
            scale = node("Div", [c(np.float64(HALF), "half"), node("Pow", [c(np.float64(2.0), "two"), exp], f"{p}/r")],
                         f"{p}/scale")
            stride = strides[x] = sample_stride(per_sample_size(types.get(x)))
            sampled = x if stride == 1 else node(
                "Slice", [node("Flatten", [x], f"{p}/flat", axis=1), c(np.array([0], np.int64), "zero"),
                          c(np.array([np.iinfo(np.int64).max], np.int64), "end"), c(np.array([1], np.int64), "axis1"),
                          c(np.array([stride], np.int64), f"stride{stride}")], f"{p}/sampled")
            # j = floor(x * scale) in float64: exact (scale is a power of two), then int16
            j = node("Cast", [node("Floor", [node("Mul", [node("Cast", [sampled], f"{p}/x", to=TensorProto.DOUBLE),
                                                           scale], f"{p}/scaled")], f"{p}/floor_j")],
                     f"{p}/j", to=TensorProto.INT16)
            outputs += [(exp, TensorProto.DOUBLE), (j, TensorProto.INT16)]
        outputs.append((count, TensorProto.INT64))
        graph.output.extend(helper.make_tensor_value_info(n, t, None) if t else helper.make_empty_tensor_value_info(n)
                            for n, t in outputs)
    graph.node.extend(nodes)
    return out, strides


def bin_counts(j: np.ndarray) -> np.ndarray:
    """The BINS-bin histogram of int16 bin indices j in [-HALF, HALF) (bin j + HALF)."""
    counts = np.bincount(np.ascontiguousarray(j).reshape(-1).view(np.uint16), minlength=1 << 16)
    return np.concatenate([counts[-HALF:], counts[:HALF]]).astype(np.int64)


# ----------------------------------------------------------------------------- runner

def collect_ranges(model, data, batch_size: int = 32, limit: int | None = None, device: str = "auto",
                   workers: int | None = 0, seed: int = 0, shard=None, preset: str | None = None,
                   strict: bool = False, tensors: list[str] | None = None, histograms: bool = True,
                   checkpoint: str | os.PathLike | None = None, resume: bool = False,
                   checkpoint_every: float = 60.0, nonnegative: Collection[str] = (), fingerprint: bool = True,
                   moments: list[str] | None = None) -> Ranges:
    """min, max and histogram of every float activation tensor (or of `tensors`) over `data`.

    `histograms=False`: min and max only (the cost of two reductions per tensor; what `minmax` needs).
    `nonnegative`: tensors known to hold no negative value (`nonnegative_tensors`) whose min is not measured
    but recorded as 0, the bound every quantization range takes anyway (lo = min(min, 0)): for `quantize`,
    not for a ranges file, whose min is the data's.
    `fingerprint=False`: meta's model_sha256 is None (hashing VGG16's weights takes 0.7 s; for ranges kept in
    memory, never merged or resumed).
    `moments`: tensors whose per-channel mean and variance (`onnxbn.stats`, exact as `onnxbn stats` computes
    them) the same pass gathers into the result's `moments` (quantize's bias correction reads the float
    model's; no checkpoints then).
    `checkpoint`: the state so far is saved there every `checkpoint_every` seconds; `resume` continues
    from it (only a run with the same model, tensors, data, batch size, limit, seed and shard may), with
    the result of one uninterrupted pass (the merge is exact).

    `model`: path or ModelProto; `data`: image folder, .npz or array, as `collect_stats` takes;
    `shard`: "I/N" (merge the shards with `merge_ranges`). See the module docstring.
    """
    from onnxbn.data.images import default_workers
    from onnxbn.data.streams import parse_shard

    base = Model.open(model)  # a model file as its structure: onnxruntime reads its weights from the file
    proto = base.proto
    names = activation_tensors(proto) if tensors is None else list(tensors)
    if not names:
        raise UserError("the model has no float activation tensors to gather ranges of")
    dataset = open_model_data(proto, data, preset=preset, limit=limit, seed=seed, shard=shard)
    light = base.detached()
    augmented, strides = augment_for_ranges(light.proto, names, histograms, nonnegative)
    fetch = [o.name for o in augmented.graph.output]
    stats = None
    if moments:
        if checkpoint is not None:
            raise UserError("per-channel moments are not checkpointed; gather them without a checkpoint")
        stats = augment_for_stats(augmented, tensor_points(value_types(light.proto), moments), keep=fetch)
        augmented = stats.model
    session = make_session(light.with_graph(augmented), device, arena=not moments)  # see the module docstring
    channel_moments = {t: ChannelMoments() for t in moments or ()}
    batch_size = fit_batch_size(model_input(proto)[2], batch_size, dataset.total)
    out = {n: TensorRange(stride=strides.get(n, 1)) for n in names}
    seen, start, started = 0, 0, time.perf_counter()
    saved_at = started
    provenance = None
    digest = base.sha256() if fingerprint or checkpoint is not None else None
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        provenance = {"model_sha256": digest, "tensors": names,
                      "data": dataset.fingerprint(), "batch_size": batch_size, "limit": limit, "seed": seed,
                      "shard": str(shard), "histograms": histograms,
                      "histogram_values": HISTOGRAM_VALUES if histograms else 0}
        if nonnegative:
            provenance["nonnegative"] = sorted(set(nonnegative))
        if resume and checkpoint.is_file():
            state = load_ranges(checkpoint)
            if state.meta.get("checkpoint") != provenance:
                raise UserError(f"{checkpoint}: this checkpoint is from a run with other settings (model, data, "
                                "batch size, limit or shard); delete it or drop --resume")
            out, start, seen = state.tensors, int(state.meta["consumed"]), int(state.meta["samples"])
    for x, _, values in run_batches(session, dataset, fetch + (stats.fetch if stats else []), proto, batch_size,
                                    workers=default_workers() if workers is None else workers, strict=strict,
                                    start=start, desc="ranges"):
        check_finite_input(x, seen)  # onnxruntime's reductions would skip a NaN
        if stats is not None:
            stats.merge(channel_moments, dict(zip(stats.fetch, values[len(fetch):], strict=True)), seen, len(x))
        per = 5 if histograms else 3
        for i, name in enumerate(names):
            if histograms:
                lo, hi, exp, j, count = values[per * i: per * i + per]
            else:
                (lo, hi, count), exp, hist = values[per * i: per * i + per], 0, np.zeros(BINS, np.int64)
            lo, hi = np.min(lo), np.max(hi)  # per sample (see augment_for_ranges)
            if not (np.isfinite(lo) and np.isfinite(hi)):
                raise UserError(f"tensor {name!r} has NaN or Inf values in the batch of samples "
                                f"{seen}..{seen + len(x) - 1}; check the inputs; no ranges written")
            if histograms:
                hist = bin_counts(j)
            out[name].merge(int(count), float(lo), float(hi), int(exp), hist)
        seen += len(x)
        if checkpoint is not None and time.perf_counter() - saved_at >= checkpoint_every:
            Ranges(out, {"format": FORMAT, "checkpoint": provenance, "consumed": dataset.consumed,
                         "samples": seen}).save(checkpoint, force=True)
            saved_at = time.perf_counter()
    if seen == 0:
        raise UserError(f"{dataset.description}: no sample could be read; nothing to gather ranges from")
    index, total = parse_shard(shard)
    meta = {"format": FORMAT, "model_sha256": digest, "samples": seen,
            "data": dataset.source, "limit": limit, "seed": seed, "shard": f"{index}/{total}",
            "preset": dataset.preset if dataset.is_images else "array", "bins": BINS if histograms else 0,
            "histogram_values": HISTOGRAM_VALUES if histograms else 0,
            "outputs": [o.name for o in proto.graph.output],
            "provider": session_provider(session), "seconds": round(time.perf_counter() - started, 3),
            "onnxbn": __import__("onnxbn").__version__}
    return Ranges(out, meta, channel_moments)


# ----------------------------------------------------------------------------- ranges from histograms

METHODS = ("minmax", "percentile", "entropy", "mse")


def _levels(r: TensorRange) -> int:
    """Quantization steps over [0, t]: 255 for a non-negative tensor (all 8 bits on one side), else 127."""
    return 255 if r.min >= 0 else 127


def _clip(r: TensorRange, t: float) -> tuple[float, float]:
    return (max(r.min, -t) if r.min < 0 else r.min), min(r.max, t)


def percentile_range(r: TensorRange, percentile: float = 99.99) -> tuple[float, float]:
    """(lo, hi): the values below which (1 - p) and p of the samples lie (upper bin edges), within [min, max]."""
    if not 0 < percentile <= 100:
        raise UserError(f"--percentile must be in (0, 100] (got {percentile})")
    cum = np.cumsum(r.hist) / max(r.hist.sum(), 1)
    edges = (np.arange(BINS) - HALF + 1) * r.width  # upper edge of each bin
    q = percentile / 100.0
    hi = float(edges[min(np.searchsorted(cum, q, side="left"), BINS - 1)])
    lo = float(edges[min(np.searchsorted(cum, 1.0 - q, side="left"), BINS - 1)] - r.width)
    return (max(r.min, lo) if r.min < 0 else r.min), min(r.max, max(hi, 0.0) if r.max > 0 else r.max)


def _candidates(last: int, levels: int, most: int = 512) -> np.ndarray:
    start = min(levels, last)
    return np.unique(np.linspace(start, last, num=min(most, last - start + 1)).round().astype(np.int64))


def entropy_range(r: TensorRange) -> tuple[float, float]:
    """TensorRT's KL-divergence threshold over the |x| histogram (Migacz 2017), clipped to [min, max]."""
    a = r.abs_hist().astype(np.float64)
    nz = np.nonzero(a)[0]
    if nz.size == 0:
        return r.min, r.max
    last, levels = int(nz[-1]) + 1, _levels(r)
    if last <= levels:
        return r.min, r.max
    best, best_i = np.inf, last
    for i in _candidates(last, levels):
        p = a[:i].copy()
        p[-1] += a[i:].sum()
        ref = a[:i]
        group = (np.arange(i) * levels) // i  # which of the `levels` quantized bins each bin falls in
        sums = np.bincount(group, weights=ref, minlength=levels)
        nonzero = np.bincount(group, weights=(ref > 0).astype(np.float64), minlength=levels)
        q = np.where(ref > 0, sums[group] / np.maximum(nonzero[group], 1), 0.0)
        mask = p > 0
        if (q[mask] == 0).any():  # a bin P holds but Q cannot: smooth Q as TensorRT does
            q = q + 1e-4 * (q == 0)
        p, q = p / p.sum(), q / q.sum()
        kl = float(np.sum(p[mask] * np.log(p[mask] / q[mask])))
        if kl < best:
            best, best_i = kl, int(i)
    return _clip(r, best_i * r.width)


def mse_range(r: TensorRange) -> tuple[float, float]:
    """The threshold t minimising the expected quantization error over the histogram: values within
    t cost step^2/12 (step = t / levels), values beyond it cost (|x| - t)^2."""
    a = r.abs_hist().astype(np.float64)
    nz = np.nonzero(a)[0]
    if nz.size == 0:
        return r.min, r.max
    last, levels = int(nz[-1]) + 1, _levels(r)
    cand = _candidates(last, 1)
    centre = (np.arange(last) + 0.5)[None, :] * r.width
    cost = np.empty(len(cand))
    for start in range(0, len(cand), 64):  # 64 candidates at a time: memory stays small
        t = cand[start:start + 64, None].astype(np.float64) * r.width
        err = np.where(centre <= t, 0.0, (centre - t) ** 2) + (t / levels) ** 2 / 12.0
        cost[start:start + 64] = (err * a[None, :last]).sum(axis=1)
    return _clip(r, float(cand[int(np.argmin(cost))]) * r.width)


def tensor_range(r: TensorRange, method: str = "minmax", percentile: float = 99.99) -> tuple[float, float]:
    """(lo, hi) of one tensor by `method` (minmax, percentile, entropy, mse), always containing 0."""
    if method == "minmax":
        lo, hi = r.min, r.max
    elif r.exp is None or not r.hist.any():
        raise UserError(f"--method {method} needs histograms: these ranges hold min/max only (gather them with "
                        "`onnxbn stats --ranges`)")
    elif method == "percentile":
        lo, hi = percentile_range(r, percentile)
    elif method == "entropy":
        lo, hi = entropy_range(r)
    elif method == "mse":
        lo, hi = mse_range(r)
    else:
        raise UserError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    return min(lo, 0.0), max(hi, 0.0)


def choose_ranges(ranges: Ranges, names: list[str], method: str = "minmax", percentile: float = 99.99,
                  outputs=None) -> dict[str, tuple[float, float]]:
    """(lo, hi) of each of `names` by `method` (`tensor_range`); the model's outputs (`outputs`, by default
    the ones the ranges file records) keep their min/max: clipping logits would flatten the top classes."""
    keep = set(ranges.meta.get("outputs", []) if outputs is None else outputs)
    return {t: tensor_range(ranges.tensors[t], "minmax" if t in keep else method, percentile) for t in names}
