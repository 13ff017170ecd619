"""The learning-rate sweep: one cell = a new 2-way classifier on the base model + one `onnxbn.finetune` call.

A cell (variant, lr, seed index) is seeded from those values alone (`cell_seed`), so its numbers do not depend on
which cells ran before it; a cell whose training loss stops being finite is recorded as diverged. Per (variant, lr)
the cells are summarised as mean and sample std (ddof 1) over the seeds that finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time

import numpy as np
import onnx
from onnx import numpy_helper

from onnxbn.demo.data import CLASSES
from onnxbn.errors import UserError

log = logging.getLogger("onnxbn")




TARGET_ACCURACY = 0.60  # "epochs to reach": the first epoch whose val accuracy is at least this
VARIANTS = ("nobn", "bn")
VARIANT_LABEL = {"nobn": "no BN", "bn": "BN"}
DIVERGED = "the training loss is not finite"  # onnxbn.finetune's UserError for a run that blew up


def new_classifier(model: onnx.ModelProto, classes: int, seed: int = 0) -> onnx.ModelProto:
    """A copy of `model` whose final Gemm is replaced by a fresh `classes`-way layer.

    The notebook's step: drop the 1000-way ImageNet layer, add a 2-way one. Weights
    follow torch's nn.Linear init (uniform +-1/sqrt(fan_in)); the output shape is updated.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    final = next((n for n in reversed(graph.node) if n.op_type == "Gemm"), None)
    if final is None or final.output[0] != graph.output[0].name:
        raise UserError("the model's output is not produced by a Gemm; cannot replace its classifier")
    trans_b = next((a.i for a in final.attribute if a.name == "transB"), 0)
    inits = {t.name: t for t in graph.initializer}
    weight = inits[final.input[1]]
    fan_in = weight.dims[1] if trans_b else weight.dims[0]
    rng = np.random.default_rng(seed)
    bound = 1.0 / np.sqrt(fan_in)
    w = rng.uniform(-bound, bound, (classes, fan_in)).astype(np.float32)
    weight.CopyFrom(numpy_helper.from_array(w if trans_b else w.T.copy(), weight.name))
    if len(final.input) > 2 and final.input[2] in inits:
        bias = inits[final.input[2]]
        bias.CopyFrom(numpy_helper.from_array(rng.uniform(-bound, bound, classes).astype(np.float32), bias.name))
    dims = graph.output[0].type.tensor_type.shape.dim
    if len(dims) == 2:
        dims[1].ClearField("dim_param")
        dims[1].dim_value = classes
    del graph.value_info[:]
    return out


def lr_key(lr: float) -> str:
    """The report's name of a learning rate: '1e-05', '0.001', ... (as in 'bn_lr1e-05')."""
    return f"{lr:g}"


def cell_seed(variant: str, lr: float, index: int, base: int = 0) -> int:
    """The seed of one sweep cell, from (base seed, variant, lr, seed index) only.

    It seeds the new classifier's initialisation and everything `finetune` draws (batch
    order, Dropout masks), so a cell's result does not depend on which cells ran before it.
    """
    digest = hashlib.sha256(f"onnxbn-demo/{base}/{variant}/{lr_key(lr)}/{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@contextlib.contextmanager
def torch_threads(n: int):
    """Run torch on `n` intra-op threads, then restore the previous setting.

    The fine-tunes train a small dense head on cached features: a step is a few small
    matrix products, where a second thread gains nothing, and on a shared 2-core machine
    two spinning threads stall each other for whole scheduler slices (measured: an epoch
    of 0.12 s on one thread, 0.6-14 s on two while another process ran).
    """
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class _QuietTraining(logging.Filter):
    """Drops the training module's per-epoch and cache lines (the demo logs one line per cell instead)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.module != "training"


@contextlib.contextmanager
def quiet_training():
    """Within the block, the training module's log lines are dropped (see _QuietTraining)."""
    quiet = _QuietTraining()
    log.addFilter(quiet)
    try:
        yield
    finally:
        log.removeFilter(quiet)


def epochs_to(history: list[dict], accuracy: float) -> int | None:
    """The first epoch whose validation accuracy is >= `accuracy`, or None."""
    return next((e["epoch"] for e in history if e.get("val_accuracy", 0.0) >= accuracy), None)


def run_cell(base_model: onnx.ModelProto, variant: str, lr: float, index: int, train, val, *, epochs: int,
             batch_size: int, cache, base_seed: int = 0, target_accuracy: float = TARGET_ACCURACY,
             threads: int = 1) -> tuple[dict, onnx.ModelProto | None]:
    """One sweep cell: a fresh 2-way classifier on `base_model`, then `onnxbn.finetune` on the cached features.

    Returns (the cell's record, the fine-tuned model or None when the run diverged). Only
    (variant, lr, index, base_seed), the data and the budget decide the result.
    """
    from onnxbn.training import finetune

    seed = cell_seed(variant, lr, index, base_seed)
    start = new_classifier(base_model, len(CLASSES["target"]), seed)
    record = {"variant": variant, "lr": lr, "seed_index": index, "seed": seed, "diverged": False, "error": None,
              "val_loss": None, "val_accuracy": None, "epochs_to_target": None, "val_before": None, "history": []}
    started = time.perf_counter()
    try:
        with torch_threads(threads):
            result = finetune(start, train, val, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                                     cache=cache)
    except UserError as exc:
        if DIVERGED not in str(exc):
            raise
        record.update(diverged=True, error=str(exc), seconds=round(time.perf_counter() - started, 3), cache_hits=None)
        return record, None
    history = result.log["history"]
    last = history[-1] if history else {}
    val_loss, val_acc = last.get("val_loss"), last.get("val_accuracy")
    if val_loss is None or not math.isfinite(val_loss):
        record.update(diverged=val_loss is not None, error=None if val_loss is None else "validation loss not finite")
        val_loss = None
    record.update(val_loss=val_loss, val_accuracy=val_acc if val_loss is not None else None,
                  val_before=result.log["val_before"], history=history,
                  epochs_to_target=epochs_to(history, target_accuracy),
                  cache_hits=sum(bool(c["hit"]) for c in result.log["cache"].values()), device=result.log["device"],
                  seconds=round(time.perf_counter() - started, 3))
    return record, (None if record["diverged"] else result.model)


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof 1; None with fewer than 2 values)."""
    if not values:
        return None, None
    a = np.asarray(values, np.float64)
    return float(a.mean()), (float(a.std(ddof=1)) if len(a) > 1 else None)


def _median_epochs(epochs: list[int | None]) -> float | None:
    """Median epochs to the target over seeds, a seed that never got there counted as infinitely many
    (None when the median itself is "never")."""
    if not epochs:
        return None
    m = float(np.median([math.inf if e is None else e for e in epochs]))
    return None if math.isinf(m) else m


def summarize_cells(cells: list[dict], seeds: int) -> dict:
    """The per-(variant, lr) entry of report['sweep']: mean +- std over the seeds that finished, and what diverged."""
    done = [c for c in cells if not c["diverged"] and c["val_loss"] is not None]
    loss_mean, loss_std = _mean_std([c["val_loss"] for c in done])
    acc_mean, acc_std = _mean_std([c["val_accuracy"] for c in done])
    reached = [c["epochs_to_target"] for c in cells if c["epochs_to_target"] is not None]
    before = [c["val_before"]["loss"] for c in cells if c.get("val_before")]
    return {
        "lr": cells[0]["lr"], "seeds": seeds, "finished": len(done), "diverged": sum(c["diverged"] for c in cells),
        "val_loss_mean": loss_mean, "val_loss_std": loss_std,
        "val_accuracy_mean": acc_mean, "val_accuracy_std": acc_std,
        "val_loss_before_mean": float(np.mean(before)) if before else None,
        "below_start": sum(c["val_loss"] < c["val_before"]["loss"] for c in done),
        "reached_target": len(reached),
        "epochs_to_target_median": _median_epochs([c["epochs_to_target"] for c in cells]),
        "epochs_to_target": [c["epochs_to_target"] for c in cells],
        "cells": cells,
    }


def best_lr(per_lr: dict) -> str | None:
    """The lr (key) with the lowest mean final val loss among those where every seed finished."""
    ok = {k: v for k, v in per_lr.items() if v["diverged"] == 0 and v["val_loss_mean"] is not None}
    return min(ok, key=lambda k: ok[k]["val_loss_mean"]) if ok else None


def run_sweep(bases: dict, lrs, seeds: int, train, val, *, epochs: int, batch_size: int, cache, base_seed: int = 0,
              target_accuracy: float = TARGET_ACCURACY, keep_models: bool = True) -> tuple[dict, dict]:
    """Every (variant, lr, seed index) cell, variant-major. Returns (report['sweep'], models of seed index 0)."""
    total = len(bases) * len(lrs) * seeds
    done, cells, models = 0, {}, {}
    with quiet_training():
        for variant, base in bases.items():
            for lr in lrs:
                for index in range(seeds):
                    record, model = run_cell(base, variant, lr, index, train, val, epochs=epochs,
                                             batch_size=batch_size, cache=cache, base_seed=base_seed,
                                             target_accuracy=target_accuracy)
                    done += 1
                    cells.setdefault(variant, {}).setdefault(lr_key(lr), []).append(record)
                    if keep_models and index == 0 and model is not None:
                        models[(variant, lr_key(lr))] = model
                    outcome = ("diverged" if record["diverged"] else
                               f"val loss {record['val_loss']:.4f}, accuracy {record['val_accuracy']:.2%}")
                    log.info("sweep %d/%d: %-4s lr %-6s seed %d: %s (%.1f s%s)", done, total, variant, lr_key(lr),
                             index, outcome, record["seconds"],
                             "" if record["cache_hits"] is None else f", feature cache hits {record['cache_hits']}/2")
    sweep = {variant: {k: summarize_cells(v, seeds) for k, v in per_lr.items()} for variant, per_lr in cells.items()}
    return sweep, models
