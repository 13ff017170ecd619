"""The end-to-end run on the bundled model: the 2017 notebook's procedure, done right, and its claim tested.

models/demo_vgg.onnx (a small VGG trained without BN on the procedural `source`
task, see models/README.md) plays VGG16; the `target` task plays cats vs dogs.
Steps: statistics on source images -> identity BN after the dense layers -> check ->
new 2-way classifier -> a learning-rate sweep, BN vs no-BN, several seeds per
(variant, lr), every fine-tune on one cache of the frozen conv features -> the
notebook's lr and 30x as per-epoch curves -> write back -> fold -> check ->
recalibration on domain-shifted images -> the folded model on every installed runtime.

The notebook's claim: BN after the dense layers lets them be fine-tuned faster and at
higher learning rates. The sweep tests it on a grid fixed up front (log-spaced lrs,
the same budget for every cell); the report's words are computed from its numbers,
whichever way they fall. Nothing is tuned to flatter BN.

Each sweep cell (variant, lr, seed index) is one `onnxbn.finetune` call whose seed is
derived from those three values only (`cell_seed`): a cell gives the same numbers
whichever other cells ran before it. A cell whose training loss stops being finite is
recorded as diverged (kept in every table and the plot, never dropped).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.resources
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxbn import demo_data
from onnxbn.errors import UserError
from onnxbn.io.load import load_model
from onnxbn.io.save import atomic_path, save_model

log = logging.getLogger("onnxbn")
BUNDLED = Path(str(importlib.resources.files("onnxbn.models") / "demo_vgg.onnx"))  # package data (models/ links to it)
NOTEBOOK_LR = 1e-5
SWEEP_LRS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # log-spaced, one per decade, fixed before any run
SWEEP_SEEDS = 3
TARGET_ACCURACY = 0.60  # "epochs to reach": the first epoch whose val accuracy is at least this
VARIANTS = ("nobn", "bn")
VARIANT_LABEL = {"nobn": "no BN", "bn": "BN"}
DEPLOY_RUNTIMES = (("onnxruntime", "f32"), ("openvino", "f32"), ("openvino", "default"), ("tract", "f32"),
                   ("reference", "f32"))
DIVERGED = "the training loss is not finite"  # onnxbn.finetune's UserError for a run that blew up
# The demo's domain shift ("another camera"), fixed before any run: contrast x0.6 around each
# image's mean, a warm colour cast, +0.05 brightness, a 3x3 box blur.
SHIFT = {"contrast": 0.6, "gain": (1.10, 0.95, 0.75), "brightness": 0.05, "blur": 3}


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


# ----------------------------------------------------------------------------- sweep cells

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
def _quiet_training():
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
    import onnxbn

    seed = cell_seed(variant, lr, index, base_seed)
    start = new_classifier(base_model, len(demo_data.CLASSES["target"]), seed)
    record = {"variant": variant, "lr": lr, "seed_index": index, "seed": seed, "diverged": False, "error": None,
              "val_loss": None, "val_accuracy": None, "epochs_to_target": None, "val_before": None, "history": []}
    started = time.perf_counter()
    try:
        with torch_threads(threads):
            result = onnxbn.finetune(start, train, val, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
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
    with _quiet_training():
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


def _versus(bn: dict, nobn: dict, field: str, lower_is_better: bool) -> tuple[str, float, float]:
    """('bn' | 'nobn' | 'within', |difference|, spread): which variant's mean `field` is better by more
    than the larger of the two seed stds (the spread)."""
    diff = bn[f"{field}_mean"] - nobn[f"{field}_mean"]
    spread = max(bn[f"{field}_std"] or 0.0, nobn[f"{field}_std"] or 0.0)
    if abs(diff) <= spread:
        return "within", abs(diff), spread
    return ("bn" if (diff < 0) == lower_is_better else "nobn"), abs(diff), spread


def _lrs(keys) -> str:
    return ", ".join(keys) if keys else "none"


def sweep_verdict(sweep: dict, target_accuracy: float) -> dict:
    """What the sweep shows, computed from its numbers only.

    * best lr of each variant (lowest mean final val loss, every seed finished) and whether BN's best
      loss is lower than no BN's by more than the larger seed std (else: within the spread); the same
      for the best mean accuracy;
    * per lr, which variant's loss and accuracy is better by more than the seed spread;
    * "trains at lr": every seed finished and ended below its own starting val loss (loss criterion),
      or reached `target_accuracy` (accuracy criterion); the highest such lr of each variant;
    * divergences; epochs to `target_accuracy` (median over seeds, never = infinity) per lr.
    """
    variants = {v: sweep.get(v, {}) for v in VARIANTS}
    common = [k for k in variants["bn"] if k in variants["nobn"]]
    finished = {v: {k: e for k, e in per.items() if e["diverged"] == 0 and e["val_loss_mean"] is not None}
                for v, per in variants.items()}
    fields = ("val_loss_mean", "val_loss_std", "val_accuracy_mean", "val_accuracy_std", "epochs_to_target_median")
    best, best_acc = {}, {}
    for v in VARIANTS:
        k = best_lr(variants[v])
        best[v] = None if k is None else {"lr": variants[v][k]["lr"], "lr_key": k,
                                          **{f: variants[v][k][f] for f in fields}}
        ka = max(finished[v], key=lambda k: finished[v][k]["val_accuracy_mean"], default=None)
        best_acc[v] = None if ka is None else {"lr": variants[v][ka]["lr"], "lr_key": ka,
                                               **{f: variants[v][ka][f] for f in fields}}
    lines, verdict = [], "undecided"
    b, n = best["bn"], best["nobn"]
    if b and n:
        who, diff, spread = _versus(b, n, "val_loss", lower_is_better=True)
        verdict = {"bn": "bn_lower", "nobn": "nobn_lower", "within": "within_spread"}[who]
        head = (f"Best final val loss: BN {_pm(b['val_loss_mean'], b['val_loss_std'])} (lr {b['lr_key']}), "
                f"no BN {_pm(n['val_loss_mean'], n['val_loss_std'])} (lr {n['lr_key']})")
        lines.append(head + {"bn": f": BN's is lower by {diff:.4f}, more than the larger seed std ({spread:.4f}).",
                             "nobn": f": no BN's is lower by {diff:.4f}, more than the larger seed std "
                                     f"({spread:.4f}); BN does not reach a lower loss here.",
                             "within": f": they differ by {diff:.4f}, within the larger seed std ({spread:.4f}): "
                                       "no difference shown."}[who])
    ba, na = best_acc["bn"], best_acc["nobn"]
    if ba and na:
        who, diff, spread = _versus(ba, na, "val_accuracy", lower_is_better=False)
        def pct(e):
            return _pm(100 * e["val_accuracy_mean"], 100 * (e["val_accuracy_std"] or 0), ".1f") + "%"

        head = (f"Best final accuracy: BN {pct(ba)} (lr {ba['lr_key']}), no BN {pct(na)} "
                f"(lr {na['lr_key']})")
        lines.append(head + {"bn": f": BN's is higher by {100 * diff:.1f} points, more than the seed std "
                                   f"({100 * spread:.1f}).",
                             "nobn": f": no BN's is higher by {100 * diff:.1f} points, more than the seed std "
                                     f"({100 * spread:.1f}).",
                             "within": f": they differ by {100 * diff:.1f} points, within the seed std "
                                       f"({100 * spread:.1f}): no difference shown."}[who])
    per_lr = {"val_loss": {"bn": [], "nobn": [], "within": []}, "val_accuracy": {"bn": [], "nobn": [], "within": []}}
    for k in common:
        if k in finished["bn"] and k in finished["nobn"]:
            for field, lower in (("val_loss", True), ("val_accuracy", False)):
                per_lr[field][_versus(finished["bn"][k], finished["nobn"][k], field, lower)[0]].append(k)
    lines.append(f"Per lr, by more than the seed std: BN's final loss is lower at lr {_lrs(per_lr['val_loss']['bn'])}, "
                 f"no BN's at lr {_lrs(per_lr['val_loss']['nobn'])} (within the spread: "
                 f"{_lrs(per_lr['val_loss']['within'])}); BN's accuracy is higher at lr "
                 f"{_lrs(per_lr['val_accuracy']['bn'])}, no BN's at lr {_lrs(per_lr['val_accuracy']['nobn'])} "
                 f"(within: {_lrs(per_lr['val_accuracy']['within'])}).")
    trains = {"loss": {}, "accuracy": {}}
    for v in VARIANTS:
        trains["loss"][v] = [k for k, e in finished[v].items() if e["below_start"] == e["seeds"]]
        trains["accuracy"][v] = [k for k, e in finished[v].items()
                                 if all(c["val_accuracy"] >= target_accuracy for c in e["cells"])]
    top = {c: {v: max((variants[v][k]["lr"] for k in trains[c][v]), default=None) for v in VARIANTS} for c in trains}
    higher = {}
    for criterion, what in (("loss", "ends below its own starting val loss"),
                            ("accuracy", f"ends at >= {target_accuracy:.0%} accuracy")):
        t = top[criterion]
        if t["bn"] == t["nobn"]:
            higher[criterion] = "same"
        elif t["nobn"] is None or (t["bn"] is not None and t["bn"] > t["nobn"]):
            higher[criterion] = "bn"
        else:
            higher[criterion] = "nobn"
        tops = ", ".join(f"{VARIANT_LABEL[v]} up to lr {lr_key(t[v]) if t[v] is not None else 'none'}"
                         for v in VARIANTS)
        lines.append(f"Every seed {what}: {tops}"
                     + {"bn": ": BN trains at a higher learning rate by this measure.",
                        "nobn": ": no BN trains at a higher learning rate by this measure.",
                        "same": ": the same range."}[higher[criterion]])
    diverged = {v: {k: e["diverged"] for k, e in variants[v].items() if e["diverged"]} for v in VARIANTS}
    words = [f"{VARIANT_LABEL[v]} at lr "
             + ", ".join(f"{k} ({c} of {variants[v][k]['seeds']} seeds)" for k, c in d.items())
             for v, d in diverged.items() if d]
    lines.append("Diverged (loss not finite): " + ("; ".join(words) if words else "no run") + ".")
    faster = {"bn": [], "nobn": []}
    for k in common:
        e = {v: variants[v][k]["epochs_to_target_median"] for v in VARIANTS}
        e = {v: (math.inf if x is None else x) for v, x in e.items()}
        if e["bn"] < e["nobn"]:
            faster["bn"].append(k)
        elif e["nobn"] < e["bn"]:
            faster["nobn"].append(k)
    lines.append(f"Epochs to {target_accuracy:.0%} val accuracy (median over seeds; never counts as infinite): "
                 f"BN needs fewer at lr {_lrs(faster['bn'])}, no BN at lr {_lrs(faster['nobn'])}, "
                 "the same at the others.")
    yes = {"bn": "yes", "nobn": "no, no BN goes higher", "same": "no difference"}
    short = [(f"faster: BN needs fewer epochs to {target_accuracy:.0%} at {len(faster['bn'])} of {len(common)} lrs, "
              f"no BN at {len(faster['nobn'])}"),
             (f"higher learning rates: by final accuracy {yes[higher['accuracy']]}, by final val loss "
              f"{yes[higher['loss']]}")]
    if b and n:
        short.append("lower best val loss: " + {"bn_lower": "yes", "nobn_lower": "no, no BN's is lower",
                                                "within_spread": "no difference beyond the seed spread"}[verdict])
    lines.insert(0, "In short, the notebook's claim on this task and budget: " + "; ".join(short) + ".")
    return {"best": best, "best_accuracy": best_acc, "verdict": verdict, "per_lr": per_lr,
            "trains_up_to": {c: {v: (lr_key(x) if x is not None else None) for v, x in t.items()}
                             for c, t in top.items()},
            "higher_lr": higher, "trains_at": trains, "diverged": diverged, "faster_to_target": faster,
            "lines": lines, "text": " ".join(lines)}


def _pm(mean: float | None, std: float | None, fmt: str = ".4f") -> str:
    if mean is None:
        return "-"
    return f"{mean:{fmt}}" + ("" if std is None else f" ± {std:{fmt}}")


# ----------------------------------------------------------------------------- domain shift

def shift_images(images: np.ndarray, shift: dict = SHIFT) -> np.ndarray:
    """The demo's domain shift of uint8 (N,H,W,3) images: lower contrast, a colour cast, brighter, blurred."""
    x = images.astype(np.float32) / np.float32(255.0)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    x = (x - mean) * np.float32(shift["contrast"]) + mean
    x = x * np.asarray(shift["gain"], np.float32) + np.float32(shift["brightness"])
    k = int(shift["blur"])
    if k > 1:
        pad = k // 2
        p = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
        h, w = x.shape[1:3]
        x = sum(p[:, i:i + h, j:j + w] for i in range(k) for j in range(k)) / np.float32(k * k)
    return np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8)


def write_shifted_npz(path: Path, n: int, seed: int, labels: bool = True) -> Path:
    """Shifted target-task images as a .npz (x, and y when `labels`); unlabelled for recalibration."""
    images, y = demo_data.make_task("target", n, seed)
    arrays = {"x": demo_data.to_model_input(shift_images(images))}
    if labels:
        arrays["y"] = y
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, ".npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return path


# ----------------------------------------------------------------------------- pictures

def _plot_curves(path: Path, variants: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, result in variants.items():
        history = result["history"]
        if not history:
            continue
        epochs = [0] + [e["epoch"] for e in history]
        style = "-" if name.startswith("bn") else "--"
        axes[0].plot(epochs, [result["val_before"]["loss"]] + [e["val_loss"] for e in history], style, marker="o", label=name)
        axes[1].plot(epochs, [result["val_before"]["accuracy"]] + [e["val_accuracy"] for e in history], style,
                     marker="o", label=name)
    axes[0].set(title="validation loss", xlabel="epoch", ylabel="cross-entropy")
    axes[1].set(title="validation accuracy", xlabel="epoch", ylabel="top-1")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _plot_sweep(path: Path, sweep: dict, start: dict, target_accuracy: float) -> None:
    """Final val loss and accuracy vs lr (log x): mean per variant, the seed spread shaded (min..max),
    every seed a dot, diverged runs an x at the top of the panel with their count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.transforms import blended_transform_factory

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"nobn": "tab:orange", "bn": "tab:blue"}
    offsets = {"nobn": 0.93, "bn": 1.07}  # nudge the variants apart on the log axis
    rows = {"nobn": 0.96, "bn": 0.89}  # the diverged markers' heights (axes fraction), one row per variant
    any_diverged = any(v["diverged"] for per in sweep.values() for v in per.values())
    for ax, field, title in ((axes[0], "val_loss", "final validation loss"),
                             (axes[1], "val_accuracy", "final validation accuracy")):
        trans = blended_transform_factory(ax.transData, ax.transAxes)
        for variant in VARIANTS:
            per = sweep.get(variant, {})
            if not per:
                continue
            lrs = [v["lr"] for v in per.values()]
            mean = [v[f"{field}_mean"] if v[f"{field}_mean"] is not None else np.nan for v in per.values()]
            lo = [min((c[field] for c in v["cells"] if c[field] is not None), default=np.nan) for v in per.values()]
            hi = [max((c[field] for c in v["cells"] if c[field] is not None), default=np.nan) for v in per.values()]
            c = colors[variant]
            ax.plot(lrs, mean, "-o", color=c, label=f"{VARIANT_LABEL[variant]} (mean of finished seeds)")
            ax.fill_between(lrs, lo, hi, color=c, alpha=0.2, label=f"{VARIANT_LABEL[variant]} seed range")
            for v in per.values():
                xs = [v["lr"] * offsets[variant]] * v["finished"]
                ys = [cell[field] for cell in v["cells"] if cell[field] is not None]
                ax.scatter(xs, ys, s=10, color=c, alpha=0.7, zorder=3)
                if v["diverged"]:
                    y = rows[variant]
                    ax.scatter([v["lr"] * offsets[variant]], [y], marker="x", s=60, color=c, transform=trans,
                               zorder=4, clip_on=False)
                    ax.annotate(f"{v['diverged']}/{v['seeds']}", (v["lr"] * offsets[variant], y), xycoords=trans,
                                textcoords="offset points", xytext=(-6, -3), ha="right", fontsize=7, color=c)
        if any_diverged:  # headroom: the x markers sit in a band above every finished run
            bottom, top = ax.get_ylim()
            ax.set_ylim(bottom, top + 0.25 * (top - bottom))
        ax.set_xscale("log")
        all_lrs = [v["lr"] for per in sweep.values() for v in per.values()]
        ax.set_xlim(min(all_lrs) / 2, max(all_lrs) * 2)  # also when no run at an lr finished
        ax.grid(alpha=0.3, which="both")
        ax.set(title=title, xlabel="learning rate (Adam)")
    axes[0].axhline(start["loss"], color="grey", ls=":", label="before fine-tuning (mean)")
    axes[1].axhline(start["accuracy"], color="grey", ls=":", label="before fine-tuning (mean)")
    axes[1].axhline(target_accuracy, color="tab:green", ls="--", lw=0.8, label=f"target {target_accuracy:.0%}")
    axes[0].set_ylabel("cross-entropy")
    axes[1].set_ylabel("top-1")
    handles, labels = axes[0].get_legend_handles_labels()
    if any_diverged:
        handles.append(plt.Line2D([], [], marker="x", ls="", color="black"))
        labels.append("diverged runs (loss not finite), count of seeds")
    axes[0].legend(handles, labels, fontsize=7)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _plot_activations(path: Path, stats) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    names = stats.tensors
    for i, name in enumerate(names):
        mean, std = stats.mean(name), np.sqrt(stats.var(name))
        dead = stats.var(name) == 0
        jitter = np.random.default_rng(i).uniform(-0.25, 0.25, mean.size)
        for ax, values in ((axes[0], mean), (axes[1], std)):
            ax.scatter(i + jitter[~dead], values[~dead], s=6, alpha=0.5, color="tab:blue")
            ax.scatter(i + jitter[dead], values[dead], s=14, marker="x", color="tab:red",
                       label="dead (zero variance)" if i == 0 else None)
    axes[0].set(title="per-channel statistics the inserted BN layers use", ylabel="channel mean")
    axes[1].set(ylabel="channel std", xticks=range(len(names)),
                xticklabels=[f"{n.split('/')[-2] if '/' in n else n}\n({int(np.sum(stats.var(n) == 0))} dead)"
                             for n in names])
    for ax in axes:
        ax.grid(alpha=0.3)
    if any(np.any(stats.var(n) == 0) for n in names):
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


# ----------------------------------------------------------------------------- recalibration and deployment

def _recalibration_story(models: dict, clean_val: Path, shifted_eval: Path, shifted_unlabelled: Path,
                         seed: int, full: tuple = ()) -> dict:
    """Each model on clean and shifted validation images, before and after recalibrating its BN statistics on
    unlabelled shifted images (exact and batch mode), with recalibrate's default prior and variance floor,
    except the models named in `full`: prior 0 (the insert + recalibrate recipe, whose identity BNs hold the
    clean statistics as the old ones). `models`: name -> (ModelProto, whether it has BN)."""
    from onnxbn.recalibration import recalibrate_with_report

    rows = {}
    for name, (model, has_bn) in models.items():
        row = {"clean": _eval(model, clean_val), "shifted_before": _eval(model, shifted_eval)}
        if has_bn:
            for mode in ("exact", "batch"):
                log.info("demo: recalibrating %s (%s) on %s", name, mode, shifted_unlabelled.name)
                started = time.perf_counter()
                new, rep = recalibrate_with_report(model, str(shifted_unlabelled), mode=mode, batch_size=64, seed=seed,
                                                   **({"prior": 0} if name in full else {}))
                info = {"bn_nodes": len(rep.bns), "passes": len(rep.passes), "samples": rep.samples,
                        "prior": rep.prior, "var_floor": rep.var_floor,
                        "floored_channels": int(sum(rep.floored.values())),
                        "newly_dead_channels": int(sum(np.count_nonzero((b.old_var > 0) & (b.new_var <= 0))
                                                       for b in rep.bns if b.old_var is not None)),
                        "max_mean_change": max((b.to_dict()["mean_change"] or 0.0 for b in rep.bns), default=0.0),
                        "max_var_change": max((b.to_dict()["var_change"] or 0.0 for b in rep.bns), default=0.0)}
                info["seconds"] = round(time.perf_counter() - started, 3)
                row[f"shifted_{mode}"] = {**_eval(new, shifted_eval), **info}
                row[f"clean_{mode}"] = _eval(new, clean_val)
        rows[name] = row
    return rows


def _eval(model, data) -> dict:
    import onnxbn

    r = onnxbn.evaluate(model, str(data), batch_size=256)
    return {"loss": r["loss"], "accuracy": r["top1"], "samples": r["samples"]}


def _latency_ms(session, x: np.ndarray, feed: str, runs: int) -> float:
    session.run(None, {feed: x})  # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        session.run(None, {feed: x})
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def _deploy_story(unfolded: onnx.ModelProto, folded: onnx.ModelProto, val: Path, samples: int,
                  latency_runs: int) -> tuple[dict, list[str]]:
    """The folded model on every installed runtime vs the unfolded one on onnxruntime (f32): max abs/rel error,
    top-1 agreement, the precision the runtime reports, and the folded model's median latency at batch 1 and 8."""
    from onnxbn.check import compare
    from onnxbn.feeding import model_input
    from onnxbn.runtimes.base import INSTALL, available
    from onnxbn.runtimes.sessions import open_session

    rows, skipped = {}, []
    feed = model_input(folded)[0]
    with np.load(val) as data:
        x = np.ascontiguousarray(data["x"][:8])
    for runtime, precision in DEPLOY_RUNTIMES:
        if not available(runtime):
            if runtime not in skipped:
                skipped.append(runtime)
                log.info("demo: deploy check: %s is not installed (%s)", runtime, INSTALL.get(runtime, ""))
            continue
        key = runtime if precision == "f32" else f"{runtime}_{precision}"
        log.info("demo: deploy check on %s (precision %s)", runtime, precision)
        report = compare(unfolded, folded, str(val), candidate_runtime=runtime, precision=precision, limit=samples,
                         batch_size=64)
        out = report.to_dict()["outputs"][folded.graph.output[0].name]
        cand = report.candidate_runtime
        session = open_session(folded, runtime, precision=precision)
        runs = max(1, latency_runs // 4) if runtime == "reference" else latency_runs  # numpy: slow, fewer runs
        rows[key] = {
            "runtime": runtime, "version": cand.get("version"), "requested": cand.get("requested"),
            "precision": cand.get("precision"), "note": cand.get("note", ""), "samples": report.samples,
            "max_abs_error": out["max_abs_error"], "max_rel_error": out["max_rel_error"],
            "top1_agreement": out["top1_agreement"], "passed": report.passed, "tolerance": report.tolerance,
            "violations": out["violations"], "elements": out["elements"],
            "latency_ms_b1": _latency_ms(session, x[:1], feed, runs),
            "latency_ms_b8": _latency_ms(session, x[:8], feed, max(1, runs // 2)),
            "latency_runs": {"b1": runs, "b8": max(1, runs // 2)},
        }
    return rows, skipped


# ----------------------------------------------------------------------------- report

def _report_md(report: dict, pictures: bool) -> str:
    ident, fold = report["identity"], report["fold"]
    info = report["sweep_info"]
    lines = [
        "# onnxbn demo report", "",
        (f"Model: `{report['model']}` ({report['model_card']}). Source task: {report['data']['source_samples']} "
         f"calibration images; target task: {report['data']['train_samples']} training and "
         f"{report['data']['val_samples']} validation images. Run time {report['seconds']:.0f} s on "
         f"{report['device']}."), "",
        "## 1. Identity BN insertion", "",
        (f"Statistics of {len(report['stats']['tensors'])} tensors (selector `{report['stats']['selector']}`) over "
         f"{report['stats']['samples']} source images; {report['stats']['dead_channels']} dead channels "
         "(zero variance, kept exact)."), "",
        "| max abs error | max rel error | top-1 agreement | verdict |", "|---|---|---|---|",
        (f"| {ident['max_abs_error']:.3g} | {ident['max_rel_error']:.3g} | {ident['top1_agreement']:.2%} | "
         f"{'PASS' if ident['passed'] else 'FAIL'} |"), "",
        ("The notebook's version of this step (BN scale set to the variance, not sqrt(var + eps)) "
         f"gives a max rel error of {report['notebook_mistake']['max_rel_error']:.3g} and "
         f"{report['notebook_mistake']['top1_agreement']:.2%} top-1 agreement on the same inputs."), "",
        "## 2. The claim: BN lets the dense layers train faster and at higher learning rates", "",
        (f"Learning-rate sweep: {len(info['lrs'])} learning rates ({', '.join(lr_key(lr) for lr in info['lrs'])}), "
         f"{info['seeds']} seeds each, BN vs no BN, the same budget for every cell: a new 2-way classifier, "
         f"{info['epochs']} epochs, batch {info['batch_size']}, Adam, conv blocks frozen. What ran: "
         f"{info['what_ran']}"), "",
        (f"Final val loss and accuracy (mean ± std over the seeds that finished); epochs to "
         f"{info['target_accuracy']:.0%} val accuracy (median over seeds, a seed that never got there counted as "
         "never; per seed in report.json). Before fine-tuning (mean over the cells' new classifiers): val loss "
         f"{info['start']['loss']:.4f}, accuracy {info['start']['accuracy']:.2%}."), "",
        ("| lr | no BN val loss | BN val loss | no BN accuracy | BN accuracy | no BN epochs to target | "
         "BN epochs to target | diverged (no BN / BN) |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    sweep = report["sweep"]
    for k in [lr_key(lr) for lr in info["lrs"]]:
        n, b = sweep.get("nobn", {}).get(k), sweep.get("bn", {}).get(k)

        def loss(v):
            return "diverged" if v["finished"] == 0 else _pm(v["val_loss_mean"], v["val_loss_std"])

        def acc(v):
            return "diverged" if v["finished"] == 0 else _pm(
                100 * v["val_accuracy_mean"], None if v["val_accuracy_std"] is None else 100 * v["val_accuracy_std"],
                ".1f") + "%"

        def ep(v):
            median = "never" if v["epochs_to_target_median"] is None else f"{v['epochs_to_target_median']:g}"
            if v["reached_target"] == v["seeds"]:
                return median
            return f"{median} ({v['reached_target']}/{v['seeds']} reached)"

        lines.append(f"| {k} | {loss(n)} | {loss(b)} | {acc(n)} | {acc(b)} | {ep(n)} | {ep(b)} | "
                     f"{n['diverged']}/{n['seeds']} / {b['diverged']}/{b['seeds']} |")
    best = info["best"]
    lines += ["", "Best lr (lowest mean final val loss, every seed finished): "
              + "; ".join(f"{VARIANT_LABEL[v]} {best[v]['lr_key']}" if best.get(v) else f"{VARIANT_LABEL[v]} none"
                          for v in VARIANTS) + ".", "",
              "**What the sweep shows** (each sentence computed from the table):", "",
              *[f"- {line}" for line in info["lines"]], ""]
    if pictures:
        lines += ["![learning-rate sweep](sweep.png)", ""]
    lines += [
        "## 3. Per-epoch curves at the notebook's learning rate and 30x", "",
        ("Seed index 0 of the sweep's cells at these learning rates (one seed each; the sweep above has the spread). "
         "Validation after the last epoch:"), "",
        "| variant | lr | val loss (start → end) | val accuracy (start → end) |", "|---|---|---|---|",
    ]
    for name, v in report["finetune"].items():
        end_loss = "diverged" if v["val_loss"] is None else f"{v['val_loss']:.4f}"
        end_acc = "diverged" if v["val_accuracy"] is None else f"{v['val_accuracy']:.2%}"
        start_loss = "-" if v["val_loss_before"] is None else f"{v['val_loss_before']:.4f}"
        start_acc = "-" if v["val_accuracy_before"] is None else f"{v['val_accuracy_before']:.2%}"
        lines.append(f"| {name} | {v['lr']:g} | {start_loss} → {end_loss} | {start_acc} → {end_acc} |")
    lines += ["", report["finetune_summary"], ""]
    if pictures:
        lines += ["![validation curves](curves.png)", "", "![BN statistics](activations.png)", ""]
    lines += [
        "## 4. Fold for deployment", "",
        (f"`{fold['model']}` (BN's best lr, seed index 0) folded: {fold['bn_before']} BN before, "
         f"{fold['bn_remaining']} after; max rel error vs the unfolded model {fold['max_rel_error']:.3g} "
         f"({'PASS' if fold['passed'] else 'FAIL'})."), "",
    ]
    lines += _recalibrate_md(report["recalibrate"])
    lines += _deploy_md(report["deploy"], report["deploy_info"])
    return "\n".join(lines)


def _recalibrate_md(rec: dict) -> list[str]:
    lines = [
        "## 5. Recalibration under a domain shift", "",
        (f"Shift: {rec['shift_text']}. BN statistics re-estimated on {rec['unlabelled_samples']} unlabelled shifted "
         f"images (`onnxbn.recalibrate`, a split of its own), evaluated on {rec['eval_samples']} other shifted "
         "images and on the clean validation images (`onnxbn.evaluate`; loss / top-1). Settings: "
         + "; ".join(f"{rec['labels'][name].split(' (')[0]}: prior {row['shifted_exact']['prior']:g}, variance "
                     f"floor {row['shifted_exact']['var_floor']:g} ({row['shifted_exact']['floored_channels']} "
                     "channels floored)" for name, row in rec["models"].items() if "shifted_exact" in row)
         + " (recalibrate's defaults: prior 2n, floor 0.01; the identity-BN model follows the insert + "
           "recalibrate recipe, prior 0)."), "",
        ("| model | clean | shifted, as is | shifted, recalibrated (exact) | shifted, recalibrated (batch) | "
         "clean, after exact recalibration |"),
        "|---|---|---|---|---|---|",
    ]

    def cell(row, key):
        v = row.get(key)
        return "n/a (no BN)" if v is None else f"{v['loss']:.4f} / {v['accuracy']:.2%}"

    for name, row in rec["models"].items():
        lines.append(f"| {rec['labels'][name]} | " + " | ".join(
            cell(row, key) for key in ("clean", "shifted_before", "shifted_exact", "shifted_batch", "clean_exact"))
            + " |")
    lines += ["", "**What it shows:**", "", *[f"- {line}" for line in rec["lines"]], ""]
    return lines


def _deploy_md(rows: dict, info: dict) -> list[str]:
    lines = [
        "## 6. The folded model on every installed runtime", "",
        (f"`onnxbn.compare`: the unfolded fine-tuned model on onnxruntime (f32) vs the folded model on each runtime, "
         f"{info['samples']} validation images, the default tolerance for the precision the runtime reports. "
         f"Latency: the folded model, median of {info['latency_runs']} runs at batch 1 and half as many at batch 8 "
         "(fewer on the numpy reference), after one warm-up run; one process, other work on the machine may show."),
        "",
        ("| runtime | version | precision (asked → ran) | max abs error | max rel error | top-1 agreement | check | "
         "latency b1 | latency b8 |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in rows.items():
        lines.append(f"| {key} | {r['version']} | {r['requested']} → {r['precision']} | {r['max_abs_error']:.3g} | "
                     f"{r['max_rel_error']:.3g} | {r['top1_agreement']:.2%} | {'PASS' if r['passed'] else 'FAIL'} "
                     f"({r['tolerance']} tolerance) | {r['latency_ms_b1']:.2f} ms | {r['latency_ms_b8']:.2f} ms |")
    if info["skipped"]:
        lines += ["", "Not installed, not checked: " + ", ".join(info["skipped"]) + "."]
    lines += ["", "**What it shows.** " + info["text"], ""]
    return lines


def _deploy_text(rows: dict, skipped: list[str]) -> str:
    if not rows:
        return "No runtime was checked."
    failed = [k for k, r in rows.items() if not r["passed"]]
    lowered = [k for k, r in rows.items() if r["precision"] not in ("f32", "f64")]
    parts = [f"{len(rows) - len(failed)} of {len(rows)} runtime configurations pass their default tolerance"
             + ("; FAIL: " + ", ".join(
                 f"{k} ({rows[k]['precision']}: {rows[k]['violations']} of {rows[k]['elements']} output values outside "
                 f"the {rows[k]['tolerance']} tolerance, {round((1 - rows[k]['top1_agreement']) * rows[k]['samples'])} "
                 f"of {rows[k]['samples']} predictions differ)" for k in failed) if failed else "") + "."]
    f32 = {k: r for k, r in rows.items() if r["precision"] == "f32"}
    if f32:
        worst = max(f32, key=lambda k: f32[k]["max_rel_error"])
        parts.append(f"At f32 the largest max rel error is {f32[worst]['max_rel_error']:.2g} ({worst}).")
    if lowered:
        parts.append("Below f32: " + "; ".join(
            f"{k} ran {rows[k]['precision']}: max abs error {rows[k]['max_abs_error']:.2g}, max rel "
            f"{rows[k]['max_rel_error']:.2g}, top-1 agreement {rows[k]['top1_agreement']:.2%}" for k in lowered) + ".")
    fastest = min(rows, key=lambda k: rows[k]["latency_ms_b8"])
    parts.append(f"Fastest at batch 8: {fastest} ({rows[fastest]['latency_ms_b8']:.2f} ms).")
    if skipped:
        parts.append(f"Not installed: {', '.join(skipped)}.")
    return " ".join(parts)


def _recalibrate_lines(models: dict, labels: dict) -> list[str]:
    parts = []
    for name, row in models.items():
        clean, before = row["clean"], row["shifted_before"]
        label = labels[name]
        head = (f"{label}: the shift moves accuracy from {clean['accuracy']:.2%} to {before['accuracy']:.2%} "
                f"(loss {clean['loss']:.4f} → {before['loss']:.4f})")
        if "shifted_exact" not in row:
            parts.append(head + "; it has no BN to recalibrate.")
            continue
        modes = []
        for mode in ("exact", "batch"):
            after = row[f"shifted_{mode}"]
            d_acc, d_loss = after["accuracy"] - before["accuracy"], after["loss"] - before["loss"]
            how = ("both better" if d_loss < 0 and d_acc >= 0 else "both worse" if d_loss > 0 and d_acc <= 0 else
                   "accuracy and loss move in opposite directions")
            modes.append(f"{mode} recalibration gives {after['accuracy']:.2%} (loss {after['loss']:.4f}; "
                         f"{d_acc * 100:+.1f} points, loss {d_loss:+.4f}: {how})")
        lost = clean["accuracy"] - before["accuracy"]
        gained = row["shifted_exact"]["accuracy"] - before["accuracy"]
        share = ""
        if lost > 0.005 and gained > 0:
            share = f"; exact recovers {gained / lost:.0%} of the {lost * 100:.1f} points the shift cost"
        elif lost > 0.005:
            share = f"; exact recovers none of the {lost * 100:.1f} points the shift cost"
        back = row.get("clean_exact")
        if back is not None:
            share += (f". Back on clean images the recalibrated model gets {back['accuracy']:.2%} "
                      f"(loss {back['loss']:.4f}, was {clean['loss']:.4f})")
            dead = row["shifted_exact"].get("newly_dead_channels")
            if dead:
                share += (f"; {dead} BN channels that vary on clean images are constant on the shifted ones, so "
                          "recalibration sets their variance to 0 and clean inputs in them are divided by sqrt(eps)")
        parts.append(head + "; " + ", ".join(modes) + share + ".")
    return parts


def _summary_line(variants: dict) -> str:
    parts = []
    for lr_name in sorted({k.split("_", 1)[1] for k in variants}):
        plain, bn = variants.get(f"nobn_{lr_name}"), variants.get(f"bn_{lr_name}")
        if plain and bn:
            if plain["val_loss"] is None or bn["val_loss"] is None:
                parts.append(f"at {lr_name.replace('lr', 'lr ')}: " + ", ".join(
                    f"{n} {'diverged' if v['val_loss'] is None else format(v['val_loss'], '.4f')}"
                    for n, v in (("no-BN", plain), ("BN", bn))))
                continue
            better = "BN" if bn["val_loss"] < plain["val_loss"] else "no-BN"
            parts.append(f"at {lr_name.replace('lr', 'lr ')}: no-BN val loss {plain['val_loss']:.4f} "
                         f"(acc {plain['val_accuracy']:.2%}), BN {bn['val_loss']:.4f} (acc {bn['val_accuracy']:.2%}); "
                         f"lower loss: {better}")
    return ("One seed per variant, so a single draw (the sweep's seed spread says how much one draw can differ); "
            + "; ".join(parts) + ".")


# ----------------------------------------------------------------------------- the run

def run_demo(out: str | Path = "demo-out", *, model: str | Path | None = None, source_samples: int = 1000,
             train_samples: int = 2000, val_samples: int = 1000, epochs: int = 6, batch_size: int = 64,
             boost: float = 30.0, selector: str = "dense", seed: int = 0, pictures: bool = True,
             lrs=SWEEP_LRS, seeds: int = SWEEP_SEEDS, target_accuracy: float = TARGET_ACCURACY,
             shift_samples: int = 1000, deploy_samples: int = 256, latency_runs: int = 20) -> dict:
    """Run the whole procedure into `out` and return report.json's content.

    `lrs` x `seeds` x (no BN, BN) sweep cells of `epochs` each; `shift_samples` unlabelled and as many
    labelled shifted images for recalibration; `deploy_samples` validation images per runtime check and
    `latency_runs` timed runs per runtime.
    """
    import onnxbn
    from onnxbn.check import compare
    from onnxbn.fold import fold
    from onnxbn.insert import dead_channels
    from onnxbn.io.model import Model

    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model_path = Path(model) if model else BUNDLED
    if not model_path.is_file():
        raise UserError(f"{model_path}: bundled demo model not found; run from a source checkout or pass --model")
    if seeds < 1 or not lrs:
        raise UserError("the sweep needs at least one learning rate and one seed")
    original = load_model(model_path)
    lrs = sorted(float(lr) for lr in lrs)

    log.info("demo: generating data (source %d, target %d + %d, shifted %d + %d)", source_samples, train_samples,
             val_samples, shift_samples, shift_samples)
    data_dir = out / "data"
    source = demo_data.write_npz(data_dir / "source_calibration.npz", "source", source_samples, 3000 + seed)
    train = demo_data.write_npz(data_dir / "target_train.npz", "target", train_samples, 2000 + seed)
    val = demo_data.write_npz(data_dir / "target_val.npz", "target", val_samples, 2001 + seed)
    shifted_unlabelled = write_shifted_npz(data_dir / "shifted_unlabelled.npz", shift_samples, 2002 + seed,
                                           labels=False)
    shifted_eval = write_shifted_npz(data_dir / "shifted_val.npz", shift_samples, 2003 + seed)

    timings = {"data": time.perf_counter() - started}
    log.info("demo: statistics after %r on the source task", selector)
    stats = onnxbn.collect_stats(original, source, after=selector, batch_size=128, seed=seed)
    stats.save(out / "stats.npz")
    with_bn = onnxbn.insert_bn(original, stats)
    save_model(with_bn, out / "model_bn.onnx")
    identity = compare(original, with_bn, val, batch_size=256)
    ident_out = identity.to_dict()["outputs"][original.graph.output[0].name]

    wrong = onnx.ModelProto()
    wrong.CopyFrom(with_bn)  # the notebook's BN: gamma = variance
    inits = {t.name: t for t in wrong.graph.initializer}
    for node in wrong.graph.node:
        if node.op_type == "BatchNormalization":
            var = numpy_helper.to_array(inits[node.input[4]])
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(var, node.input[1]))
    mistake = compare(original, wrong, val, batch_size=256).to_dict()["outputs"][original.graph.output[0].name]
    log.info("demo: identity max rel error %.3g (the notebook's BN: %.3g)", ident_out["max_rel_error"],
             mistake["max_rel_error"])

    bases = {"nobn": original, "bn": with_bn}
    cache = out / "feature-cache"
    sweep_started = time.perf_counter()
    timings["stats_insert_check"] = sweep_started - started - timings["data"]
    log.info("demo: learning-rate sweep: %d lrs x %d seeds x %d variants, %d epochs each", len(lrs), seeds,
             len(bases), epochs)
    sweep, models = run_sweep(bases, lrs, seeds, train, val, epochs=epochs, batch_size=batch_size, cache=cache,
                              base_seed=seed, target_accuracy=target_accuracy)
    sweep_seconds = time.perf_counter() - sweep_started
    cells = [c for per in sweep.values() for v in per.values() for c in v["cells"]]
    starts = [c["val_before"] for c in cells if c.get("val_before")]  # each cell's own new classifier
    start = {k: float(np.mean([b[k] for b in starts])) if starts else math.nan for k in ("loss", "accuracy")}
    torch_device = next((c["device"] for c in cells if c.get("device")), "cpu")
    hits = sum(c["cache_hits"] or 0 for c in cells)
    calls = sum(c["cache_hits"] is not None for c in cells)
    log.info("demo: sweep done in %.0f s; feature cache hits %d of %d look-ups (train + val per fine-tune)",
             sweep_seconds, hits, 2 * calls)

    # The notebook's lr and 30x, seed index 0: the same cells as the sweep's where it has them.
    variants, finetuned = {}, dict(models)
    with _quiet_training():
        for lr in (NOTEBOOK_LR, NOTEBOOK_LR * boost):
            for kind, base in bases.items():
                name = f"{kind}_lr{lr:g}"
                in_sweep = sweep.get(kind, {}).get(lr_key(lr))
                if in_sweep is not None:
                    record = in_sweep["cells"][0]
                else:
                    log.info("demo: fine-tuning %s (seed index 0)", name)
                    record, ft = run_cell(base, kind, lr, 0, train, val, epochs=epochs, batch_size=batch_size,
                                          cache=cache, base_seed=seed, target_accuracy=target_accuracy)
                    if ft is not None:
                        finetuned[(kind, lr_key(lr))] = ft
                before = record.get("val_before") or {"loss": None, "accuracy": None}
                variants[name] = {"lr": lr, "seed": record["seed"], "diverged": record["diverged"],
                                  "val_loss": record["val_loss"], "val_accuracy": record["val_accuracy"],
                                  "val_loss_before": before.get("loss"), "val_accuracy_before": before.get("accuracy"),
                                  "history": record.get("history", []), "val_before": before,
                                  "seconds": record["seconds"]}

    timings["sweep"] = sweep_seconds
    timings["curves_extra_cells"] = time.perf_counter() - sweep_started - sweep_seconds
    fold_started = time.perf_counter()
    verdict = sweep_verdict(sweep, target_accuracy)
    best_bn_key = verdict["best"]["bn"]["lr_key"] if verdict["best"].get("bn") else None
    if best_bn_key is None or ("bn", best_bn_key) not in finetuned:
        raise UserError("every BN fine-tune diverged: nothing to fold; lower the learning rates")
    best_bn = f"bn_lr{best_bn_key}_seed0"
    model_ft = finetuned[("bn", best_bn_key)]
    save_model(model_ft, out / "model_ft.onnx")

    log.info("demo: folding %s", best_bn)
    folded_model, fold_report = fold(Model.open(model_ft))
    folded, decisions = folded_model.to_proto(), fold_report.decisions
    fold_check = compare(model_ft, folded, val, batch_size=256)
    save_model(folded, out / "deploy.onnx")
    fold_out = fold_check.to_dict()["outputs"][folded.graph.output[0].name]

    # Recalibration: the deployed BN model, the same with identity BN after every conv too (stats on the
    # clean target training images, so it starts as the same function), and no BN at its best lr.
    mark = time.perf_counter()
    timings["fold"] = mark - fold_started
    log.info("demo: recalibration on shifted images")
    conv_stats = onnxbn.collect_stats(model_ft, train, after="conv", batch_size=128, seed=seed)
    with_conv_bn = onnxbn.insert_bn(model_ft, conv_stats)
    recal_models = {best_bn: (model_ft, True), f"{best_bn}+conv_bn": (with_conv_bn, True)}
    labels = {best_bn: f"BN after the dense layers (`{best_bn}`, the model folded above)",
              f"{best_bn}+conv_bn": f"the same + identity BN after each of its {len(conv_stats.tensors)} conv "
                                    "activations (stats on clean target training images)"}
    best_nobn_key = verdict["best"]["nobn"]["lr_key"] if verdict["best"].get("nobn") else None
    if best_nobn_key is not None and ("nobn", best_nobn_key) in finetuned:
        nobn_name = f"nobn_lr{best_nobn_key}_seed0"
        recal_models[nobn_name] = (finetuned[("nobn", best_nobn_key)], False)
        labels[nobn_name] = f"no BN (`{nobn_name}`, its best lr)"
    recal_rows = _recalibration_story(recal_models, val, shifted_eval, shifted_unlabelled, seed,
                                      full=(f"{best_bn}+conv_bn",))
    shift_text = (f"contrast x{SHIFT['contrast']} around each image's mean, RGB gain {SHIFT['gain']}, "
                  f"brightness +{SHIFT['brightness']}, {SHIFT['blur']}x{SHIFT['blur']} box blur (target-task images "
                  "drawn with their own seeds)")
    recalibration = {"shift": {k: list(v) if isinstance(v, tuple) else v for k, v in SHIFT.items()},
                     "shift_text": shift_text, "unlabelled_samples": shift_samples, "eval_samples": shift_samples,
                     "models": recal_rows, "labels": labels}
    recalibration["lines"] = _recalibrate_lines(recal_rows, labels)
    recalibration["text"] = " ".join(recalibration["lines"])

    timings["recalibrate"] = time.perf_counter() - mark
    mark = time.perf_counter()
    log.info("demo: deploy check of %s on every installed runtime", best_bn)
    deploy, skipped = _deploy_story(model_ft, folded, val, deploy_samples, latency_runs)
    timings["deploy"] = time.perf_counter() - mark
    deploy_info = {"reference": "unfolded model on onnxruntime, f32", "samples": min(deploy_samples, val_samples),
                   "latency_runs": latency_runs, "skipped": skipped, "text": _deploy_text(deploy, skipped)}

    report = {
        "model": str(model_path.name), "model_card": "models/README.md",
        "device": f"onnxruntime on {identity.provider}, torch on {torch_device}",
        "data": {"source_samples": source_samples, "train_samples": train_samples, "val_samples": val_samples,
                 "shift_samples": shift_samples, "seed": seed},
        "stats": {"selector": selector, "tensors": stats.tensors, "samples": stats.meta["samples"],
                  "dead_channels": int(sum(dead_channels(stats).values()))},
        "identity": {"max_abs_error": ident_out["max_abs_error"], "max_rel_error": ident_out["max_rel_error"],
                     "top1_agreement": ident_out["top1_agreement"], "passed": identity.passed},
        "notebook_mistake": {"max_rel_error": mistake["max_rel_error"], "top1_agreement": mistake["top1_agreement"]},
        "budget": {"epochs": epochs, "batch_size": batch_size, "optimizer": "adam",
                   "lrs": [NOTEBOOK_LR, NOTEBOOK_LR * boost], "sweep_lrs": lrs, "sweep_seeds": seeds},
        "finetune": variants,
        "sweep": sweep,
        "sweep_info": {
            "lrs": lrs, "seeds": seeds, "epochs": epochs, "batch_size": batch_size, "optimizer": "adam",
            "target_accuracy": target_accuracy, "start": start, "seconds": round(sweep_seconds, 3),
            "feature_cache": {"hits": hits, "lookups": 2 * calls},
            "seed_rule": "cell seed = first 31 bits of sha256('onnxbn-demo/<seed>/<variant>/<lr>/<index>'); it "
                         "seeds the new classifier and onnxbn.finetune",
            "what_ran": (f"{len(cells)} calls of `onnxbn.finetune` (torch import, split after the last conv block, "
                         "cached features, Adam, write-back into the ONNX graph and its onnxruntime check), one per "
                         "cell, all on one feature cache of the frozen conv part, which is the same for both variants "
                         f"(BN sits after the dense layers): {hits} of {2 * calls} cache look-ups were hits; torch on "
                         "one thread; each cell seeded from (variant, lr, seed index) alone."),
            **{k: verdict[k] for k in ("best", "best_accuracy", "verdict", "per_lr", "trains_up_to", "higher_lr",
                                       "trains_at", "diverged", "faster_to_target", "lines", "text")},
        },
        "fold": {"model": best_bn, "bn_before": len(decisions),
                 "bn_remaining": sum(n.op_type == "BatchNormalization" for n in folded.graph.node),
                 "max_rel_error": fold_out["max_rel_error"], "passed": fold_check.passed, "decisions": decisions},
        "recalibrate": recalibration,
        "deploy": deploy,
        "deploy_info": deploy_info,
    }
    report["finetune_summary"] = _summary_line(variants)
    drawn = False
    mark = time.perf_counter()
    if pictures:
        try:
            _plot_sweep(out / "sweep.png", sweep, start, target_accuracy)
            _plot_curves(out / "curves.png", variants)
            _plot_activations(out / "activations.png", stats)
            drawn = True
        except ImportError:
            log.warning("matplotlib is not installed: no pictures (pip install 'onnxbn[report]')")
    timings["pictures"] = time.perf_counter() - mark
    report["seconds"] = time.perf_counter() - started
    report["timings"] = {k: round(v, 2) for k, v in timings.items()}
    with atomic_path(out / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(_report_md(report, drawn) + "\n")
    log.info("demo: %s", verdict["text"])
    return report
