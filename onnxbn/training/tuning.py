"""Fine-tuning's entry points, `finetune` and `finetune_model`: cut the model (`split`), cache the frozen
prefix's features (`cache`), train the suffix in torch (`loop`), write it back and gate it (`gate`).
See the package docstring for the method."""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnxbn import distributed
from onnxbn.errors import UserError
from onnxbn.feeding import model_input, open_model_data
from onnxbn.graph import require_opset, tensor_shape
from onnxbn.io.model import Model
from onnxbn.training.cache import cached_features, prefix_fingerprint
from onnxbn.training.gate import WriteBackProbe, make_probe, write_back_suffix
from onnxbn.training.loop import suffix_output_kind, torch_device, train_epochs
from onnxbn.training.outputs import check_labels, warn_unused_outputs
from onnxbn.training.split import default_freeze_node, split_model

if TYPE_CHECKING:
    import torch


@dataclass
class FinetuneResult:
    """The fine-tuned ONNX model and the run's log (per-epoch metrics, cache use, timings)."""

    model: onnx.ModelProto
    log: dict = field(default_factory=dict)


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


def finetune_to_file(model: str | os.PathLike, output: str | os.PathLike, train, val=None, *, force: bool = False,
                     **options) -> dict:
    """`finetune_model` of the model file `model`, its result written to `output` through a staged file that
    the write-back gate runs on first (onnxruntime reads the weights as written, from disk, once the torch
    module's memory is freed): when the gate fails nothing is left at `output`. `output` is refused, before
    any work, when it is one of the inputs (unless `force`). Under torchrun, rank 0 writes. Returns the
    run's log (`FinetuneReport.log`, with the gate's result)."""
    import gc

    from onnxbn.io.save import refuse_overwrite

    inputs = [model, train, val]
    refuse_overwrite(output, inputs, force)
    written, report = finetune_model(Model.open(model), train, val, **options)
    if distributed.is_main():
        with written.stage(output, inputs, force) as staged:
            del written
            gc.collect()  # frees the torch module (its fx graph holds reference cycles) before onnxruntime loads
            report.gate(staged.candidate)
            staged.commit()
    return report.log


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

    dev = torch_device(device)
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
    proto = model.proto
    require_opset(proto)
    name, input_type, input_shape = model_input(proto)
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
    classes = tensor_shape(proto.graph.output[0].type)
    classes = classes[1] if classes and len(classes) == 2 and isinstance(classes[1], int) else None
    digest = prefix_fingerprint(model.with_graph(prefix_model))
    temp = None
    if cache is None:
        temp = tempfile.TemporaryDirectory(prefix="onnxbn-features-")
        cache_dir = Path(temp.name)
    else:
        cache_dir = Path(cache)
    # torch's import (~1.5 s on 2 cores) and the suffix's conversion run beside the caching pass, which is
    # onnxruntime's work; a conversion that fails stops the pass after its current batch.
    with ThreadPoolExecutor(1, thread_name_prefix="onnxbn-to-torch") as pool:
        pending: Future[_Suffix] = pool.submit(_import_suffix, model.with_graph(suffix_model), node,
                                               device, dropout, sync_bn)

        def poll() -> None:
            if pending.done():
                pending.result()  # raises the conversion's error

        prefix = (make_session(model.with_graph(prefix_model), device), name, cut)
        try:
            sets = {}
            for split, data in (("train", train), ("val", val)):
                if data is None:
                    continue
                dataset = open_model_data(proto, data, limit=limit if split == "train" else None, seed=seed,
                                          shard=(rank, ranks) if ranks > 1 else None)
                if not dataset.has_labels():
                    raise UserError(f"{dataset.description}: {split} data needs labels (class folders, y in the "
                                    ".npz, or (x, y) items)")
                key = hashlib.sha256(f"{digest}\0{node}\0{dataset.fingerprint()}".encode()).hexdigest()[:32]
                sets[split] = cached_features(prefix, dataset, key, cache_dir, batch_size, workers,
                                              f"features ({split})", input_shape, poll)
                if classes:
                    check_labels(sets[split].y, classes, dataset.description)
                    if split == "train":
                        warn_unused_outputs(sets[split].y, classes, dataset.description)
            del prefix  # the session and its arena go before training and the gate
            suffix = pending.result()
            module, dev, trainable = suffix.module, suffix.device, suffix.trainable
            import torch  # loaded by now, in the conversion's thread

            from onnxbn.torch_import.precision import ieee_float32

            torch.manual_seed(seed + rank)  # here, so that dropout's masks depend on the seed alone
            with ieee_float32():
                kind, how = suffix_output_kind(proto, module, sets["train"], batch_size // ranks, dev)
                result_log = train_epochs(module, trainable, sets, epochs=epochs, lr=lr,
                                          batch_size=batch_size // ranks, seed=seed, device=dev, kind=kind,
                                          optimizer=optimizer, bf16=bf16)
                module.eval()
                # while the cache entry (a temporary folder without --cache) still holds the first rows
                probe = make_probe(module, dev, name, sets["train"]) if rank == 0 else WriteBackProbe(reason="rank > 0")
        finally:
            if temp is not None:
                temp.cleanup()
    written = write_back_suffix(module, model.with_graph(suffix_model), model)
    result_log.update({
        "freeze_through": node, "output": kind, "output_read_by": how,
        "import_seconds": round(suffix.seconds, 3),
        "trainable_parameters": int(sum(p.numel() for p in trainable)),
        "cache": {k: {"hit": f.hit, "samples": int(len(f.y)), "shape": list(f.x.shape[1:]), "seconds": f.seconds}
                  for k, f in sets.items()},
        "device": str(dev), "lr": lr, "epochs": epochs, "batch_size": batch_size, "optimizer": optimizer,
        "seed": seed, "ranks": ranks, "dropout": dropout, "sync_bn": sync_bn,
        "seconds": round(time.perf_counter() - started, 3),
    })
    return written, FinetuneReport(result_log, probe)
