"""Fine-tuning an ONNX model in torch on cached features, and evaluation through onnxruntime.

The notebook's trick: everything up to the last convolution block is frozen, so it
runs once over the data and its outputs go to a memory-mapped feature cache; the
epochs then train only the rest (the dense layers and their new BN) on those
features. The model is cut after the freeze node (`split_model`): the frozen prefix runs in
onnxruntime on the ONNX graph itself (any operator onnxruntime runs), and only the suffix is
imported with `to_torch`, trained with Adam (by default) on cross-entropy, and its trained
tensors written back into the original ONNX graph, which is then checked through onnxruntime
against the prefix in onnxruntime + the torch suffix in eval mode (<= 1e-5 relative, else it fails).

Feature cache layout: `CACHE/<key>/{features.npy, labels.npy, meta.json}`, where the
key hashes the frozen part (its ONNX graph and weights, so models that differ only
after the cut share features; versioned by `_CACHE_FORMAT`), the data (file names, sizes
and times, or array bytes) and the preprocessing; a finished entry is renamed into
place atomically, so a killed run never leaves a half cache that a later run trusts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import numpy_helper

from onnxbn import distributed
from onnxbn.errors import UserError
from onnxbn.feeding import check_batch_shape, fixed_batch, model_input, open_model_data, progress, rel_error, run_batches
from onnxbn.graph import FLOAT_TYPES, GraphIndex, graph_inputs, pruned_copy, reads, require_opset, tensor_shape, value_types
from onnxbn.io.copies import empty_like, metadata, set_metadata
from onnxbn.io.load import load_structure
from onnxbn.io.model import Model
from onnxbn.points import ACTIVATIONS

if TYPE_CHECKING:
    import torch

log = logging.getLogger("onnxbn")
DENSE_OPS = {"Gemm", "MatMul"}
# Ops whose output has the rank of their first input (for models whose shapes onnx cannot infer).
_RANK_KEEPING = {"Conv", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "BatchNormalization",
                 "Dropout", "Identity", "LRN"} | ACTIVATIONS
_BROADCASTING = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum"}
# Ops between the last convolution block and the first dense layer (VGG: avgpool, Flatten).
_HEAD_PASSTHROUGH = {"Flatten", "Reshape", "Dropout", "Identity", "AveragePool", "GlobalAveragePool",
                     "MaxPool", "GlobalMaxPool", "BatchNormalization"} | ACTIVATIONS


# ----------------------------------------------------------------------------- the split

def default_freeze_node(model: onnx.ModelProto) -> str:
    """The node whose output is the last convolution block's: the last spatial (rank >= 3)
    tensor on the way from the first dense layer back to the convolutions."""
    index = GraphIndex(model)
    producers = index.producers
    first_dense = next((n for n in model.graph.node if n.op_type in DENSE_OPS
                        and any(index.constant(i) is not None for i in n.input[:2])), None)
    if first_dense is None:
        raise UserError("the model has no dense (Gemm/MatMul) layer to fine-tune; give --freeze-through NODE")
    types = value_types(model)

    def rank(tensor: str) -> int | None:
        """The tensor's rank from shape inference, else through ops that keep their input's rank, a
        Reshape to a shape of known length, or a broadcast (the largest known rank of its inputs)."""
        shape = tensor_shape(types.get(tensor))
        if shape is not None:
            return len(shape)
        node = producers.get(tensor)
        if node is None:
            return None
        if node.op_type in _RANK_KEEPING:
            return rank(node.input[0])
        if node.op_type == "Reshape":
            target = tensor_shape(types.get(node.input[1]))
            return target[0] if target and isinstance(target[0], int) else None
        if node.op_type in _BROADCASTING:
            known = [r for r in map(rank, node.input) if r is not None]
            return max(known) if known else None
        return None

    tensor = first_dense.input[0]
    while tensor in producers:
        node = producers[tensor]
        if (rank(tensor) or 0) >= 3:
            return node.name
        if node.op_type not in _HEAD_PASSTHROUGH:
            break
        tensor = node.input[0]
    raise UserError(f"no convolution block found before the first dense layer {first_dense.name!r}; "
                    "give --freeze-through NODE (an ONNX node name)")


# ----------------------------------------------------------------------------- feature cache

# Version of what a cache entry holds: the frozen prefix's outputs as onnxruntime computes them on the
# ONNX graph (entries of earlier releases, computed by the torch import, are never read: other keys).
_CACHE_FORMAT = "onnxruntime-prefix-1"


def split_model(model: onnx.ModelProto, node_name: str) -> tuple[onnx.ModelProto, onnx.ModelProto, str]:
    """(prefix, suffix, cut): `model` cut after the node `node_name`, at its first output `cut`.

    The prefix computes `cut` from the model's inputs (only the nodes and initializers it needs; its
    one output is `cut`); the suffix computes the model's outputs from `cut` (its one input) and
    the initializers and constants of the layers after the cut, float Constant nodes turned into
    initializers of their output's name (so weights exporters keep in Constant nodes train; write-back
    puts them back into their nodes). Refused: a cut that is not the
    only tensor the layers after it read from before it (a skip connection across the cut). The batch
    size read from the model's input (`Shape(input, start=0, end=1)`, as torch's dynamo exporter writes
    `x.size(0)`) is read from `cut` instead: one feature row per sample, the same batch size."""
    node = next(n for n in model.graph.node if n.name == node_name)
    cut = node.output[0]
    needed, suffix_nodes = {o.name for o in model.graph.output}, []
    inputs = {i.name for i in graph_inputs(model)}
    for n in reversed(model.graph.node):
        if cut not in n.output and any(o in needed for o in n.output):
            if n.op_type == "Shape" and n.input[0] in inputs and \
                    {(a.name, a.i) for a in n.attribute} in ({("end", 1)}, {("start", 0), ("end", 1)}):
                n = onnx.helper.make_node("Shape", [cut], list(n.output), name=n.name, start=0, end=1)
            suffix_nodes.append(n)
            needed.update(reads(n))
    crossing = sorted(needed & inputs)
    if crossing:
        raise UserError(f"--freeze-through {node_name!r}: the layers after it also read what comes before it (through "
                        f"{crossing[0]!r}, not only {cut!r}); choose a node that all later layers depend on alone")
    types = value_types(model)
    elem = model_input(model)[1]
    cut_info = onnx.ValueInfoProto(name=cut, type=types[cut]) if cut in types else \
        onnx.helper.make_tensor_value_info(cut, onnx.helper.np_dtype_to_tensor_dtype(elem), None)
    prefix = pruned_copy(model, {cut})
    prefix.graph.output.append(cut_info)
    suffix = empty_like(model)
    for n in suffix_nodes[::-1]:
        value = next((a.t for a in n.attribute if a.name == "value"), None) if n.op_type == "Constant" else None
        if value is not None and value.data_type in FLOAT_TYPES:  # a weight as exporters such as Paddle write it:
            weight = suffix.graph.initializer.add()  # an initializer of the suffix, so it trains like one
            weight.CopyFrom(value)
            weight.name = n.output[0]
        else:
            suffix.graph.node.append(n)
    suffix.graph.input.append(cut_info)
    suffix.graph.initializer.extend(t for t in model.graph.initializer if t.name in needed)
    suffix.graph.output.extend(model.graph.output)
    suffix.graph.value_info.extend(v for v in model.graph.value_info if v.name != cut)
    return prefix, suffix, cut


def _prefix_fingerprint(prefix: Model) -> str:
    """Hash of what the frozen part computes: its graph and every weight it reads (from where it lives)."""
    return hashlib.sha256(f"{_CACHE_FORMAT}\0{prefix.sha256()}".encode()).hexdigest()


@dataclass
class Features:
    """Cached prefix outputs (memory-mapped) and their labels; `seconds` it took to compute them (0 on a hit)."""

    x: np.ndarray
    y: np.ndarray
    hit: bool
    seconds: float = 0.0
    input_shape: list[int] | None = None  # one input sample's shape (None: an entry of an earlier release)


def _run_prefix(prefix, dataset, folder: Path, batch_size: int, workers: int, desc: str, shape,
                poll: Callable[[], None]):
    """Run the prefix (`(session, input name, cut)` of onnxruntime) over `dataset` into `folder`'s memory maps;
    `poll()` after each batch may raise to abandon the pass."""
    session, name, cut = prefix
    n = len(dataset)
    features = labels = None
    written = 0
    fixed = fixed_batch(shape)  # onnxruntime holds the model to its fixed batch size
    with progress(n, desc) as bar:
        for x, y in dataset.batches(fixed or batch_size, workers):
            check_batch_shape(x, shape, dataset.description)
            if fixed is not None and len(x) != fixed:
                raise UserError(f"{dataset.description}: {len(x)} samples left for a model whose batch size is fixed "
                                f"at {fixed}; give a multiple of {fixed} samples (--limit)")
            out = np.asarray(session.run([cut], {name: x})[0], dtype=np.float32)
            if features is None:
                features = np.lib.format.open_memmap(folder / "features.npy", mode="w+", dtype=np.float32,
                                                     shape=(n, *out.shape[1:]))
                labels = np.lib.format.open_memmap(folder / "labels.npy", mode="w+", dtype=np.int64, shape=(n,))
            features[written:written + len(out)] = out
            labels[written:written + len(out)] = y
            written += len(out)
            bar.update(len(x))
            poll()
    if features is None:
        raise UserError(f"{dataset.description}: no sample could be read")
    features.flush()
    labels.flush()
    (folder / "meta.json").write_text(json.dumps({"samples": written, "shape": list(features.shape[1:]),
                                                  "input_shape": list(x.shape[1:]),
                                                  "skipped": dataset.skipped[:20]}))
    return written


def cached_features(prefix, dataset, key: str, cache_dir: Path, batch_size: int, workers: int,
                    desc: str, shape, poll: Callable[[], None] = lambda: None) -> Features:
    """The prefix's outputs over `dataset` (`prefix`: onnxruntime's `(session, input name, cut tensor)`),
    from `cache_dir/key` or computed into it (`poll()` after each batch may raise to abandon the pass)."""
    entry = cache_dir / key
    started = time.perf_counter()
    if not (entry / "meta.json").is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key[:12]}.", dir=cache_dir))
        try:
            _run_prefix(prefix, dataset, staging, batch_size, workers, desc, shape, poll)
            try:
                os.replace(staging, entry)
            except OSError:  # another run finished the same entry first
                shutil.rmtree(staging, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        hit = False
    else:
        hit = True
        log.info("feature cache hit: %s", entry)
    meta = json.loads((entry / "meta.json").read_text())
    x = np.load(entry / "features.npy", mmap_mode="r")[:meta["samples"]]
    y = np.load(entry / "labels.npy", mmap_mode="r")[:meta["samples"]]
    return Features(x, np.asarray(y), hit, 0.0 if hit else round(time.perf_counter() - started, 3),
                    meta.get("input_shape"))


# ----------------------------------------------------------------------------- training

@dataclass
class FinetuneResult:
    """The fine-tuned ONNX model and the run's log (per-epoch metrics, cache use, timings)."""

    model: onnx.ModelProto
    log: dict = field(default_factory=dict)


def _torch_device(device: str):
    """cuda (this rank's GPU under torchrun) when asked for or available, else cpu."""
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"unknown device {device!r}: use auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: torch sees no CUDA device here; use --device cpu or auto")
    if device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


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


def _log_probs(output, kind: str):
    import torch

    if kind == "probs":
        return torch.log(output.clamp_min(1e-30))
    if kind == "logprobs":
        return output
    return torch.log_softmax(output, dim=1)


def _check_labels(y: np.ndarray, classes: int, source: str) -> None:
    if len(y) and (y.min() < 0 or y.max() >= classes):
        raise UserError(f"{source}: labels span {y.min()}..{y.max()} but the model has {classes} outputs; "
                        "the data's classes must map to the model's output units")


def _warn_unused_outputs(y: np.ndarray, classes: int, source: str) -> None:
    """Warn when the data uses far fewer classes than the model has outputs (a 1000-way head on 2 classes)."""
    used = int(y.max()) + 1 if len(y) else 0
    if classes >= 10 and used <= classes // 10:
        log.warning(
            "%s: labels use %d of the model's %d outputs; training keeps all %d (the others are pushed down): "
            "for a new task give the model a new classifier first (onnxbn.demo.sweep.new_classifier)",
            source, used, classes, classes)


def _evaluate_suffix(suffix, feats: Features, batch_size: int, device, kind: str) -> dict:
    import torch

    suffix.eval()
    loss = correct = correct5 = 0.0
    with torch.no_grad():
        for start in range(0, len(feats.y), batch_size):
            x = torch.from_numpy(np.array(feats.x[start:start + batch_size])).to(device)  # copy off the memmap
            y = torch.from_numpy(np.array(feats.y[start:start + batch_size])).to(device)
            lp = _log_probs(suffix(x), kind).float()
            loss += float(torch.nn.functional.nll_loss(lp, y, reduction="sum"))
            top = lp.topk(min(5, lp.shape[1]), dim=1).indices
            correct += float((top[:, 0] == y).sum())
            correct5 += float((top == y[:, None]).any(dim=1).sum())
    loss, correct, correct5, n = distributed.all_sum([loss, correct, correct5, float(len(feats.y))])
    n = max(n, 1.0)
    return {"loss": loss / n, "accuracy": correct / n, "top5": correct5 / n}


def finetune(model, train, val=None, *, epochs: int = 1, lr: float = 1e-5, batch_size: int = 64,
             freeze_through: str = "auto", cache: str | os.PathLike | None = None, device: str = "auto",
             seed: int = 0, optimizer: str = "adam", bf16: bool = False, workers: int = 0,
             limit: int | None = None, dropout: float | None = None, sync_bn: bool = False) -> FinetuneResult:
    """Fine-tune `model` past its frozen convolution blocks on labelled `train` data.

    `model`: path or ModelProto; `train`/`val`: image folder with class folders, .npz
    with x and y, or an (x, y) tuple. Returns the model with the trained weights (and
    BN running statistics) written back, and a log with per-epoch train/val metrics.
    `dropout` overrides every Dropout rate while training; `sync_bn` normalises BN
    with the statistics of the global batch. Under torchrun: DistributedDataParallel,
    each rank caches and trains on its shard of the data (items rank::ranks) with
    batch_size / ranks samples per step, the same number of steps on every rank.
    """
    out, report = finetune_model(
        Model.open(model), train, val, epochs=epochs, lr=lr, batch_size=batch_size, freeze_through=freeze_through,
        cache=cache, device=device, seed=seed, optimizer=optimizer, bf16=bf16, workers=workers, limit=limit,
        dropout=dropout, sync_bn=sync_bn)
    written = out.to_proto()
    report.gate(written)
    return FinetuneResult(written, report.log)


@dataclass
class FinetuneReport:
    """A fine-tuning run's log (per-epoch metrics, cache use, timings) and its write-back gate, still to run
    on the model as written (`gate`)."""

    log: dict
    probe: WriteBackProbe

    def gate(self, written: onnx.ModelProto | str) -> None:
        """Run the write-back gate on `written` (the ModelProto, or the file it was staged to): a RuntimeError
        past 1e-5; the result goes to log["write_back_check"]."""
        from onnxbn.runtimes.ort_backend import make_session

        # a session that runs one probe: opened without repacking its weights for speed
        self.log["write_back_check"] = self.probe.check(lambda: make_session(written, "cpu", prepack=False))


@dataclass
class _Suffix:
    """The trained part in torch: the module on `device`, its parameters, and the seconds `to_torch` took."""

    module: torch.nn.Module
    device: torch.device
    trainable: list[torch.nn.Parameter]
    seconds: float


def _import_suffix(suffix: Model, node: str, device: str, dropout: float | None, sync_bn: bool) -> _Suffix:
    """`suffix` (the layers after `node`) imported into torch on the chosen device, ready to train."""
    import torch

    from onnxbn.torch_import import to_torch

    dev = _torch_device(device)
    started = time.perf_counter()
    try:
        module = to_torch(suffix).to(dev)  # only the trained part: the prefix runs in onnxruntime
    except UserError as exc:
        raise UserError(f"{exc}; the layers after --freeze-through {node!r} are trained in torch: freeze through "
                        "that node (--freeze-through NODE) to run it in onnxruntime instead") from None
    seconds = time.perf_counter() - started
    if dropout is not None:
        for m in module.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = dropout
    if sync_bn:
        distributed.convert_sync_batchnorm(module)
    trainable = list(module.parameters())
    if not trainable:
        raise UserError(f"no trainable weights after {node!r}: the layers there hold no weights "
                        "(Conv, Gemm, BN, ...); choose an earlier --freeze-through")
    return _Suffix(module, dev, trainable, seconds)


def finetune_model(model: Model, train, val=None, *, epochs: int = 1, lr: float = 1e-5, batch_size: int = 64,
                   freeze_through: str = "auto", cache: str | os.PathLike | None = None, device: str = "auto",
                   seed: int = 0, optimizer: str = "adam", bf16: bool = False, workers: int = 0,
                   limit: int | None = None, dropout: float | None = None, sync_bn: bool = False,
                   ) -> tuple[Model, FinetuneReport]:
    """`finetune` as a Model transform (`model` left as it is), without its last step, the write-back gate
    (`report.gate(written)`, once the result is written where it will be read). Each weight goes from
    where it lives (the model's file, for one opened from a path) into its torch tensor once; the result's
    trained tensors are arrays that share the module's memory, and the others stay where they were."""
    from onnxbn.runtimes.ort_backend import make_session

    if epochs < 0 or batch_size < 1 or not lr > 0:
        raise UserError("--epochs must be >= 0, --batch-size >= 1 and --lr > 0")
    if optimizer not in ("adam", "sgd"):
        raise UserError(f"unknown optimizer {optimizer!r}: use adam or sgd")
    started = time.perf_counter()
    proto, folder = model.proto, model.folder
    require_opset(proto)
    input_type = model_input(proto)[1]
    if input_type != np.float32:
        raise UserError(f"the model computes in {input_type}; fine-tuning needs a float32 model (train in float32, "
                        "then convert, e.g. with onnxconverter-common's float16 converter)")
    rank, ranks = distributed.world()
    if batch_size % ranks:
        raise UserError(f"--batch-size {batch_size} (the global batch) must be a multiple of the {ranks} ranks")
    if dropout is not None and not 0 <= dropout < 1:
        raise UserError(f"--dropout must be in [0, 1) (got {dropout})")
    node = default_freeze_node(proto) if freeze_through == "auto" else freeze_through
    if node not in {n.name for n in proto.graph.node}:
        raise UserError(f"--freeze-through {node!r}: no ONNX node has that name")
    prefix_model, suffix_model, cut = split_model(proto, node)
    name = model_input(proto)[0]
    _, _, input_shape = model_input(proto)
    classes = tensor_shape(proto.graph.output[0].type)
    classes = classes[1] if classes and len(classes) == 2 and isinstance(classes[1], int) else None
    digest = _prefix_fingerprint(Model(prefix_model, model.arrays, folder))
    temp = None
    if cache is None:
        temp = tempfile.TemporaryDirectory(prefix="onnxbn-features-")
        cache_dir = Path(temp.name)
    else:
        cache_dir = Path(cache)
    # torch's import (~1.5 s on 2 cores) and the suffix's conversion run beside the caching pass, which is
    # onnxruntime's work; a conversion that fails stops the pass after its current batch.
    with ThreadPoolExecutor(1, thread_name_prefix="onnxbn-to-torch") as pool:
        pending: Future[_Suffix] = pool.submit(_import_suffix, Model(suffix_model, model.arrays, folder), node,
                                               device, dropout, sync_bn)

        def poll() -> None:
            if pending.done():
                pending.result()  # raises the conversion's error

        prefix = (make_session(prefix_model, device, weights=model.arrays, folder=folder, arena=False), name, cut)
        try:
            sets = {}
            for split, data in (("train", train), ("val", val)):
                if data is None:
                    continue
                dataset = open_model_data(proto, data, limit=limit if split == "train" else None, seed=seed,
                                          shard=(rank, ranks) if ranks > 1 else None)
                if not dataset.has_labels():
                    raise UserError(f"{dataset.description}: {split} data needs labels (class folders, y in the .npz, "
                                    "or (x, y) items)")
                key = hashlib.sha256(f"{digest}\0{node}\0{dataset.fingerprint()}".encode()).hexdigest()[:32]
                sets[split] = cached_features(prefix, dataset, key, cache_dir, batch_size, workers,
                                              f"features ({split})", input_shape, poll)
                if classes:
                    _check_labels(sets[split].y, classes, dataset.description)
                    if split == "train":
                        _warn_unused_outputs(sets[split].y, classes, dataset.description)
            suffix = pending.result()
            module, dev, trainable = suffix.module, suffix.device, suffix.trainable
            import torch  # loaded by now, in the conversion's thread

            torch.manual_seed(seed + rank)  # here, so that dropout's masks depend on the seed alone
            kind, how = _suffix_output_kind(proto, module, sets["train"], batch_size // ranks, dev)
            result_log = _train(module, trainable, sets, epochs=epochs, lr=lr, batch_size=batch_size // ranks,
                                seed=seed, device=dev, kind=kind, optimizer=optimizer, bf16=bf16)
        finally:
            if temp is not None:
                temp.cleanup()
    module.eval()
    written = _write_back_suffix(module, Model(suffix_model, model.arrays, folder), model)
    probe = _probe(prefix, module, dev, input_shape, proto, sets["train"].input_shape) if rank == 0 else \
        WriteBackProbe(reason="rank > 0")
    result_log.update({
        "freeze_through": node, "output": kind, "output_read_by": how,
        "import_seconds": round(suffix.seconds, 3),
        "trainable_parameters": int(sum(p.numel() for p in trainable)),
        "cache": {k: {"hit": f.hit, "samples": int(len(f.y)), "shape": list(f.x.shape[1:]), "seconds": f.seconds}
                  for k, f in sets.items()},
        "device": str(dev), "lr": lr, "epochs": epochs, "batch_size": batch_size, "optimizer": optimizer,
        "seed": seed, "ranks": ranks, "dropout": dropout, "sync_bn": sync_bn, "seconds": round(time.perf_counter() - started, 3),
    })
    return written, FinetuneReport(result_log, probe)


def _suffix_output_kind(proto: onnx.ModelProto, suffix, train: Features, batch_size: int, device) -> tuple[str, str]:
    """`output_kind` for fine-tuning, decided before the first step: where the graph does not say, from the
    rows the module gives (eval mode) on the first training batch of every rank."""
    import torch

    kind = output_kind(proto)
    if kind[0] != "logits":
        return kind
    suffix.eval()
    with torch.no_grad():
        rows = suffix(torch.from_numpy(np.array(train.x[:batch_size])).to(device)).float().cpu().numpy()
    agree = distributed.all_sum([float(are_probabilities(rows))])[0] == distributed.world()[1]
    return output_kind(proto, agree)


def _batch_bounds(samples: int, batch_size: int) -> list[int]:
    """Offsets of the training steps over `samples` shuffled rows: batches of `batch_size`, and a last
    batch of fewer than half of that (or of one row) merged into the one before it. A batch of one
    cannot train BatchNorm, and a tiny batch would move the running statistics that get written
    back with a noisy estimate."""
    if samples < 2:
        raise UserError(f"fine-tuning needs at least 2 training samples (got {samples}): BN cannot train on one")
    starts = list(range(0, samples, batch_size))
    if len(starts) > 1 and samples - starts[-1] < max(2, batch_size / 2):
        starts.pop()
    return starts + [samples]


def _train(suffix, trainable, sets, *, epochs, lr, batch_size, seed, device, kind, optimizer, bf16) -> dict:
    """Epochs over the cached features; `batch_size` is this rank's share of the global batch."""
    import torch

    train = sets["train"]
    rank, ranks = distributed.world()
    model = suffix
    if ranks > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(suffix, device_ids=[device.index] if device.type == "cuda" else None)
    # fused: one kernel per step instead of per-tensor temporaries (about 2x faster on
    # VGG16's 123M dense parameters on a CPU). None for --epochs 0 (building the torch
    # optimizer imports torch._dynamo: 1.3 s).
    opt = None if not epochs else (torch.optim.Adam(trainable, lr=lr, fused=True) if optimizer == "adam"
                                   else torch.optim.SGD(trainable, lr=lr, momentum=0.9, fused=True))
    generator = np.random.default_rng([seed, rank])
    bounds = _batch_bounds(len(train.y), batch_size)
    steps = min(distributed.gather(len(bounds) - 1))  # every rank takes the same number of steps
    history = []
    before = _evaluate_suffix(suffix, sets["val"], batch_size, device, kind) if "val" in sets else None
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16
                else contextlib.nullcontext())
    for epoch in range(1, epochs + 1):
        model.train()
        order = generator.permutation(len(train.y))
        total = correct = seen = 0.0
        started = time.perf_counter()
        with progress(bounds[steps], f"epoch {epoch}/{epochs}") as bar:
            for step in range(steps):
                rows = np.sort(order[bounds[step]:bounds[step + 1]])
                x = torch.from_numpy(train.x[rows]).to(device)  # fancy indexing copies off the memmap
                y = torch.from_numpy(train.y[rows]).to(device)
                with autocast:
                    lp = _log_probs(model(x), kind).float()
                    loss = torch.nn.functional.nll_loss(lp, y)
                if not torch.isfinite(loss):
                    raise UserError(f"the training loss is not finite ({float(loss.detach())}) at epoch {epoch}, step {step + 1}: "
                                    "the model's outputs overflow (inf logits) or --lr is too high; nothing written")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(rows)
                correct += float((lp.argmax(1) == y).sum())
                seen += len(rows)
                bar.update(len(rows))
                bar.set_postfix(loss=f"{total / seen:.4f}")
        total, correct, seen = distributed.all_sum([total, correct, seen])
        entry = {"epoch": epoch, "train_loss": total / seen, "train_accuracy": correct / seen,
                 "seconds": round(time.perf_counter() - started, 3)}
        if "val" in sets:
            v = _evaluate_suffix(suffix, sets["val"], batch_size, device, kind)
            entry.update(val_loss=v["loss"], val_accuracy=v["accuracy"], val_top5=v["top5"])
        history.append(entry)
        if rank == 0:
            log.info("epoch %d/%d: " + ", ".join(f"{k} {entry[k]:.4f}" for k in
                                                 ("train_loss", "train_accuracy", "val_loss", "val_accuracy") if k in entry),
                     epoch, epochs)
    after = _evaluate_suffix(suffix, sets["val"], batch_size, device, kind) if "val" in sets else None
    return {"history": history, "val_before": before, "val_after": after}


@dataclass
class WriteBackProbe:
    """The write-back gate: onnxruntime on the written model must give the torch module's eval-mode
    outputs `expected` for the inputs `x` (fed as `name`) to 1e-5 relative; `reason`: why it cannot run."""

    name: str = ""
    x: np.ndarray | None = None
    expected: np.ndarray | None = None
    reason: str | None = None

    def check(self, open_session) -> dict:
        """Run the written model (`open_session()` makes its session); a RuntimeError past 1e-5."""
        if self.reason is not None:
            return {"checked": False, "reason": self.reason}
        got = open_session().run(None, {self.name: self.x})[0].astype(np.float32)
        error = rel_error(self.expected, got)
        if not error <= 1e-5:
            raise RuntimeError(f"write-back check failed: onnxruntime on the written model differs from torch by "
                               f"{error:.3g} relative (limit 1e-5)")
        return {"checked": True, "max_rel_error": error}


def _probe(prefix, module, device, input_shape, proto, seen: list[int] | None, samples: int = 1) -> WriteBackProbe:
    """The model's outputs on `samples` seeded random inputs as fine-tuning computes them (the prefix in
    onnxruntime, `prefix` = (session, input name, cut), then the trained torch `module`), for the
    write-back gate. A dimension the model leaves open (dynamic H and W) takes the size of the
    training inputs (`seen`: one sample's shape). One input: in eval mode no output depends on the batch,
    so a write-back error shows in one row as in many, and each more sample adds two forward passes to
    the gate (VGG16 on 2 cores: ~0.4 s each, against ~6 s for a caching pass over 16 inputs)."""
    import torch

    dims = [d if isinstance(d, int) and d > 0 else None for d in input_shape[1:]]
    if seen is not None and len(seen) == len(dims):
        dims = [s if d is None else d for d, s in zip(dims, seen)]
    if any(d is None for d in dims):
        return WriteBackProbe(reason="input shape is not fixed")
    session, name, cut = prefix
    dtype = model_input(proto)[1]
    if isinstance(input_shape[0], int) and input_shape[0] > 0:
        samples = input_shape[0]  # a fixed batch axis
    x = np.random.default_rng(0).standard_normal((samples, *dims)).astype(dtype)
    features = np.asarray(session.run([cut], {name: x})[0], dtype=np.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy(features).to(device))
        expected = (expected[0] if isinstance(expected, tuple) else expected).float().cpu().numpy()
    return WriteBackProbe(name, x, expected)


def _write_back_suffix(module, suffix: Model, model: Model) -> Model:
    """`write_into` of the trained suffix `module` into the whole `model`: its initializers of the same
    names take the suffix's written values, the Constant nodes `split_model` turned into initializers
    get the trained values in place, and the write-back metadata is the suffix's."""
    from onnxbn.torch_import.writeback import write_into

    written_suffix = write_into(suffix, module)
    trained = {name: written_suffix.arrays[name] for name in module.onnx_tensors.values()}
    out = model.copy()
    initializers = {t.name for t in out.proto.graph.initializer}
    for name in [n for n in trained if n in initializers]:
        out.set_array(name, trained.pop(name))
    for node in out.proto.graph.node:  # the rest were Constant nodes: their values, names and types kept
        if node.op_type == "Constant" and node.output[0] in trained:
            value = next(a.t for a in node.attribute if a.name == "value")
            array = trained.pop(node.output[0])
            value.CopyFrom(numpy_helper.from_array(array.astype(onnx.helper.tensor_dtype_to_np_dtype(value.data_type)),
                                                   value.name))
    set_metadata(out.proto, {"onnxbn.write_back": metadata(written_suffix.proto)["onnxbn.write_back"]})
    return out


# ----------------------------------------------------------------------------- evaluation

def evaluate(model, data, batch_size: int = 32, device: str = "auto", limit: int | None = None, seed: int = 0,
             workers: int = 0, preset: str | None = None, strict: bool = False) -> dict:
    """Cross-entropy loss and top-1/top-5 accuracy of `model` on labelled `data`, through onnxruntime.

    The loss is the negative log-likelihood of the labels under the output read by `output_kind`:
    probabilities (-log p), log-probabilities, or logits (log_softmax first); `output` in the result
    says which, `output_read_by` how (the graph, or every row of the data being probabilities).
    """
    from onnxbn.runtimes.ort_backend import make_session, session_provider

    # a model file is read as structure only: onnxruntime reads its weights from the file itself
    proto, folder = load_structure(model) if isinstance(model, (str, os.PathLike)) else (model, None)
    dataset = open_model_data(proto, data, preset=preset, limit=limit, seed=seed)
    if not dataset.has_labels():
        raise UserError(f"{dataset.description}: evaluation needs labels (class folders, y in the .npz, or (x, y) items)")
    session = make_session(proto, device, folder=folder)
    out_name = proto.graph.output[0].name
    graph_kind = output_kind(proto)[0]
    nll = {"probs": 0.0, "logprobs": 0.0, "logits": 0.0}  # summed -log p of the labels under each reading
    top1 = top5 = n = 0.0
    rows_are_probs = True  # every row so far non-negative and summing to 1 (are_probabilities)
    for x, y, (out,) in run_batches(session, dataset, [out_name], proto, batch_size, workers=workers, strict=strict,
                                    desc="eval"):
        out = out.astype(np.float64)
        _check_labels(y, out.shape[1], dataset.description)
        picked = np.arange(len(y)), y
        if graph_kind == "logprobs":
            nll["logprobs"] -= float(out[picked].sum())
        if graph_kind == "probs" or rows_are_probs:
            rows_are_probs = rows_are_probs and are_probabilities(out)
            nll["probs"] -= float(np.log(np.clip(out[picked], 1e-30, None)).sum())
        if graph_kind == "logits":
            shifted = out - out.max(axis=1, keepdims=True)
            nll["logits"] -= float((shifted[picked] - np.log(np.exp(shifted).sum(axis=1))).sum())
        order = np.argsort(-out, axis=1, kind="stable")[:, :5]  # every reading ranks the classes as the output does
        top1 += float((order[:, 0] == y).sum())
        top5 += float((order == y[:, None]).any(axis=1).sum())
        n += len(y)
    if n == 0:
        raise UserError(f"{dataset.description}: no sample could be read ({len(dataset.skipped)} unreadable); "
                        "nothing was evaluated")
    kind, how = output_kind(proto, rows_are_probs)
    return {"samples": int(n), "skipped": len(dataset.skipped), "loss": nll[kind] / n, "top1": top1 / n, "top5": top5 / n,
            "provider": session_provider(session), "output": kind, "output_read_by": how}
