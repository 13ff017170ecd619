"""Batch mode: one pass in training-mode semantics, the convention of torch's
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
"""

from __future__ import annotations

import time

import numpy as np
import onnx
from onnx import numpy_helper

from onnxbn.errors import UserError
from onnxbn.feeding import check_batch_shape, check_finite_input, model_input, progress
from onnxbn.graph import GraphIndex
from onnxbn.io.model import Model
from onnxbn.recalibration.plan import MEAN, VAR, resolve_constant, write_stats
from onnxbn.recalibration.report import BNRecord


def run_batch(work: Model, bns: list[BNRecord], dataset, batch_size: int, *, workers: int, strict: bool,
              device: str) -> tuple[list[dict], int, str]:
    """One training-mode pass in torch, update_bn's convention (module docstring); writes into `work`."""
    import torch

    from onnxbn.torch_import import to_torch
    from onnxbn.torch_import.precision import ieee_float32

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
    with torch.no_grad(), ieee_float32(), progress(dataset.total, "recalibrate (batch)") as bar:
        for x, _ in dataset.batches(batch_size, workers, strict=strict, dtype=dtype):
            check_batch_shape(x, shape, dataset.description)
            check_finite_input(x, samples)
            _forward(module, torch.from_numpy(np.ascontiguousarray(x)).to(dev))
            samples += len(x)
            bar.update(dataset.consumed - bar.n)
    if samples == 0:
        raise UserError(f"{dataset.description}: no sample could be read; nothing to recalibrate on")
    for b in bns:
        bn = modules[b.key]
        mean = bn.running_mean.detach().double().cpu().numpy()
        var = bn.running_var.detach().double().cpu().numpy()
        if not (np.isfinite(mean).all() and np.isfinite(var).all()):
            raise UserError(f"BN {b.node!r}: its batch statistics have NaN or Inf values (an overflow in the model on "
                            "this data?); nothing written")
        b.new_mean, b.new_var = mean, var
        write_stats(work, b, mean, var)
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
        value = resolve_constant(index, node.input[slot])
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
