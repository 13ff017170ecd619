"""`onnxbn demo`: the stages in order, each writing into the output folder, then report.json and report.md.

run_demo calls one function per stage (data, insert, sweep, curves, fold, recalibrate, deploy, quantize,
pictures); each
returns its part of the report, so report.json's keys are the stages' outputs side by side. The deploy and
quantize stages start from the folded model.
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import numpy_helper

from onnxbn.demo.data import write_npz
from onnxbn.demo.deploy import deploy_rows, deploy_text
from onnxbn.demo.plots import plot_activations, plot_curves, plot_sweep
from onnxbn.demo.quantize import quantize_lines, quantize_rows
from onnxbn.demo.recalibration import (
    PRIOR_EVAL_SAMPLES,
    PRIOR_SEEDS,
    PRIOR_SIZES,
    prior_lines,
    prior_table,
    recalibration_lines,
    recalibration_rows,
)
from onnxbn.demo.report import report_md
from onnxbn.demo.shift import SHIFT, write_shifted_npz
from onnxbn.demo.sweep import TARGET_ACCURACY, lr_key, quiet_training, run_cell, run_sweep
from onnxbn.demo.verdict import summary_line, sweep_verdict
from onnxbn.errors import UserError
from onnxbn.io.load import load_model
from onnxbn.io.save import atomic_path, save_model

if TYPE_CHECKING:
    from onnxbn.stats import Stats

log = logging.getLogger("onnxbn")
BUNDLED = Path(str(importlib.resources.files("onnxbn.models") / "demo_vgg.onnx"))  # package data (models/ links to it)
NOTEBOOK_LR = 1e-5
SWEEP_LRS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # log-spaced, one per decade, fixed before any run
SWEEP_SEEDS = 3


class _Laps:
    """Seconds per stage: `lap(name)` records the time since the previous lap (or the start)."""

    def __init__(self) -> None:
        self.started = self.mark = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = now - self.mark
        self.mark = now


def _data(out: Path, seed: int, source_samples: int, train_samples: int, val_samples: int,
          shift_samples: int) -> dict[str, Path]:
    """The stage's .npz files under out/data: source calibration, target train/val, shifted unlabelled/val."""
    log.info("demo: generating data (source %d, target %d + %d, shifted %d + %d)", source_samples, train_samples,
             val_samples, shift_samples, shift_samples)
    data_dir = out / "data"
    return {"source": write_npz(data_dir / "source_calibration.npz", "source", source_samples, 3000 + seed),
            "train": write_npz(data_dir / "target_train.npz", "target", train_samples, 2000 + seed),
            "val": write_npz(data_dir / "target_val.npz", "target", val_samples, 2001 + seed),
            "shifted_unlabelled": write_shifted_npz(data_dir / "shifted_unlabelled.npz", shift_samples, 2002 + seed,
                                                    labels=False),
            "shifted_eval": write_shifted_npz(data_dir / "shifted_val.npz", shift_samples, 2003 + seed)}


def _insert(original: onnx.ModelProto, data: dict[str, Path], out: Path, selector: str,
            seed: int) -> tuple[onnx.ModelProto, Stats, dict]:
    """Statistics on the source images, identity BN after `selector`, checked against the original; and the
    notebook's BN (gamma = variance) checked the same way. Returns (the BN model, the statistics, report parts)."""
    from onnxbn.check import compare
    from onnxbn.insert import dead_channels, insert_bn
    from onnxbn.stats import collect_stats

    log.info("demo: statistics after %r on the source task", selector)
    stats = collect_stats(original, data["source"], after=selector, batch_size=128, seed=seed)
    stats.save(out / "stats.npz")
    with_bn = insert_bn(original, stats)
    save_model(with_bn, out / "model_bn.onnx")
    output = original.graph.output[0].name
    identity = compare(original, with_bn, data["val"], batch_size=256)
    ident_out = identity.to_dict()["outputs"][output]

    wrong = onnx.ModelProto()
    wrong.CopyFrom(with_bn)  # the notebook's BN: gamma = variance
    inits = {t.name: t for t in wrong.graph.initializer}
    for node in wrong.graph.node:
        if node.op_type == "BatchNormalization":
            var = numpy_helper.to_array(inits[node.input[4]])
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(var, node.input[1]))
    mistake = compare(original, wrong, data["val"], batch_size=256).to_dict()["outputs"][output]
    log.info("demo: identity max rel error %.3g (the notebook's BN: %.3g)", ident_out["max_rel_error"],
             mistake["max_rel_error"])
    return with_bn, stats, {
        "provider": identity.provider,
        "stats": {"selector": selector, "tensors": stats.tensors, "samples": stats.meta["samples"],
                  "dead_channels": int(sum(dead_channels(stats).values()))},
        "identity": {"max_abs_error": ident_out["max_abs_error"], "max_rel_error": ident_out["max_rel_error"],
                     "top1_agreement": ident_out["top1_agreement"], "passed": identity.passed},
        "notebook_mistake": {"max_rel_error": mistake["max_rel_error"], "top1_agreement": mistake["top1_agreement"]}}


def _sweep_info(sweep: dict, verdict: dict, lrs: list[float], seeds: int, epochs: int, batch_size: int,
                target_accuracy: float, seconds: float) -> dict:
    """report['sweep_info']: the grid, the mean start, the feature cache's hits, the verdict's numbers and words."""
    cells = [c for per in sweep.values() for v in per.values() for c in v["cells"]]
    starts = [c["val_before"] for c in cells if c.get("val_before")]  # each cell's own new classifier
    start = {k: float(np.mean([b[k] for b in starts])) if starts else math.nan for k in ("loss", "accuracy")}
    hits = sum(c["cache_hits"] or 0 for c in cells)
    calls = sum(c["cache_hits"] is not None for c in cells)
    log.info("demo: sweep done in %.0f s; feature cache hits %d of %d look-ups (train + val per fine-tune)",
             seconds, hits, 2 * calls)
    return {
        "lrs": lrs, "seeds": seeds, "epochs": epochs, "batch_size": batch_size, "optimizer": "adam",
        "target_accuracy": target_accuracy, "start": start, "seconds": round(seconds, 3),
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
    }


def _curves(sweep: dict, bases: dict, finetuned: dict, lrs: tuple[float, float], data: dict[str, Path], *,
            epochs: int, batch_size: int, cache: Path, seed: int, target_accuracy: float) -> dict:
    """report['finetune']: the notebook's lr and 30x, seed index 0, per variant: the sweep's own cell where it
    has one, else one more cell (its model added to `finetuned`)."""
    variants = {}
    with quiet_training():
        for lr in lrs:
            for kind, base in bases.items():
                name = f"{kind}_lr{lr:g}"
                in_sweep = sweep.get(kind, {}).get(lr_key(lr))
                if in_sweep is not None:
                    record = in_sweep["cells"][0]
                else:
                    log.info("demo: fine-tuning %s (seed index 0)", name)
                    record, ft = run_cell(base, kind, lr, 0, data["train"], data["val"], epochs=epochs,
                                          batch_size=batch_size, cache=cache, base_seed=seed,
                                          target_accuracy=target_accuracy)
                    if ft is not None:
                        finetuned[(kind, lr_key(lr))] = ft
                before = record.get("val_before") or {"loss": None, "accuracy": None}
                variants[name] = {"lr": lr, "seed": record["seed"], "diverged": record["diverged"],
                                  "val_loss": record["val_loss"], "val_accuracy": record["val_accuracy"],
                                  "val_loss_before": before.get("loss"), "val_accuracy_before": before.get("accuracy"),
                                  "history": record.get("history", []), "val_before": before,
                                  "seconds": record["seconds"]}
    return variants


def _fold(model_ft: onnx.ModelProto, name: str, val: Path, out: Path) -> tuple[onnx.ModelProto, dict]:
    """Fold every BN of the fine-tuned model, check it against the unfolded one, write deploy.onnx."""
    from onnxbn.check import compare
    from onnxbn.fold import fold
    from onnxbn.io.model import Model

    save_model(model_ft, out / "model_ft.onnx")
    log.info("demo: folding %s", name)
    folded_model, fold_report = fold(Model.open(model_ft))
    folded, decisions = folded_model.to_proto(), fold_report.decisions
    fold_check = compare(model_ft, folded, val, batch_size=256)
    save_model(folded, out / "deploy.onnx")
    fold_out = fold_check.to_dict()["outputs"][folded.graph.output[0].name]
    return folded, {"model": name, "bn_before": len(decisions),
                    "bn_remaining": sum(n.op_type == "BatchNormalization" for n in folded.graph.node),
                    "max_rel_error": fold_out["max_rel_error"], "passed": fold_check.passed, "decisions": decisions}


def _recalibrate(model_ft: onnx.ModelProto, best_bn: str, nobn: tuple[str, onnx.ModelProto] | None,
                 data: dict[str, Path], seed: int, shift_samples: int, prior: dict) -> dict:
    """report['recalibrate']: the deployed BN model, the same with identity BN after every conv too (stats on the
    clean target training images, so it starts as the same function), and no BN at its best lr; and the prior
    table of the deployed BN model (calibration on clean training or unlabelled shifted images)."""
    from onnxbn.insert import insert_bn
    from onnxbn.stats import collect_stats

    log.info("demo: recalibration on shifted images")
    conv_stats = collect_stats(model_ft, data["train"], after="conv", batch_size=128, seed=seed)
    with_conv_bn = insert_bn(model_ft, conv_stats)
    models = {best_bn: (model_ft, True), f"{best_bn}+conv_bn": (with_conv_bn, True)}
    labels = {best_bn: f"BN after the dense layers (`{best_bn}`, the model folded above)",
              f"{best_bn}+conv_bn": f"the same + identity BN after each of its {len(conv_stats.tensors)} conv "
                                    "activations (stats on clean target training images)"}
    if nobn is not None:
        models[nobn[0]] = (nobn[1], False)
        labels[nobn[0]] = f"no BN (`{nobn[0]}`, its best lr)"
    rows = recalibration_rows(models, data["val"], data["shifted_eval"], data["shifted_unlabelled"], seed,
                              full=(f"{best_bn}+conv_bn",))
    shift_text = (f"contrast x{SHIFT['contrast']} around each image's mean, RGB gain {SHIFT['gain']}, "
                  f"brightness +{SHIFT['brightness']}, {SHIFT['blur']}x{SHIFT['blur']} box blur (target-task images "
                  "drawn with their own seeds)")
    lines = recalibration_lines(rows, labels)
    table = prior_table(model_ft, {"in-domain": data["train"], "shifted": data["shifted_unlabelled"]}, data["val"],
                        data["shifted_eval"], seed, **prior)
    table["model"] = best_bn
    table["lines"] = prior_lines(table)
    return {"prior_table": table, "shift": {k: list(v) if isinstance(v, tuple) else v for k, v in SHIFT.items()},
            "shift_text": shift_text, "unlabelled_samples": shift_samples, "eval_samples": shift_samples,
            "models": rows, "labels": labels, "lines": lines, "text": " ".join(lines)}


def _pictures(out: Path, sweep: dict, start: dict, target_accuracy: float, variants: dict, stats: Stats) -> bool:
    """sweep.png, curves.png, activations.png; False (and a warning) without matplotlib."""
    try:
        plot_sweep(out / "sweep.png", sweep, start, target_accuracy)
        plot_curves(out / "curves.png", variants)
        plot_activations(out / "activations.png", stats)
    except ImportError:
        log.warning("matplotlib is not installed: no pictures (pip install 'onnxbn[report]')")
        return False
    return True


def run_demo(out: str | Path = "demo-out", *, model: str | Path | None = None, source_samples: int = 1000,
             train_samples: int = 2000, val_samples: int = 1000, epochs: int = 6, batch_size: int = 64,
             boost: float = 30.0, selector: str = "dense", seed: int = 0, pictures: bool = True,
             lrs=SWEEP_LRS, seeds: int = SWEEP_SEEDS, target_accuracy: float = TARGET_ACCURACY,
             shift_samples: int = 1000, deploy_samples: int = 256, latency_runs: int = 20,
             quantize_samples: int = 512, prior_sizes=PRIOR_SIZES, prior_seeds: int = PRIOR_SEEDS,
             prior_eval_samples: int = PRIOR_EVAL_SAMPLES) -> dict:
    """Run the whole procedure into `out` and return report.json's content.

    `lrs` x `seeds` x (no BN, BN) sweep cells of `epochs` each; `shift_samples` unlabelled and as many
    labelled shifted images for recalibration; `deploy_samples` validation images per runtime check and
    `latency_runs` timed runs per runtime; `quantize_samples` clean training images calibrate the INT8 models;
    the prior table recalibrates on `prior_sizes` images, `prior_seeds` draws each, and evaluates on the first
    `prior_eval_samples` clean and shifted validation images.
    """
    laps = _Laps()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model_path = Path(model) if model else BUNDLED
    if not model_path.is_file():
        raise UserError(f"{model_path}: bundled demo model not found; run from a source checkout or pass --model")
    if seeds < 1 or not lrs:
        raise UserError("the sweep needs at least one learning rate and one seed")
    if (prior_seeds < 1 or prior_eval_samples < 1 or not prior_sizes
            or not all(0 < n <= min(train_samples, shift_samples) for n in prior_sizes)):
        raise UserError(f"the prior table needs at least one seed, one evaluation image and sizes between 1 and "
                        f"{min(train_samples, shift_samples)} images (the training and shifted images; got "
                        f"{list(prior_sizes)})")
    original = load_model(model_path)
    lrs = sorted(float(lr) for lr in lrs)
    data = _data(out, seed, source_samples, train_samples, val_samples, shift_samples)
    laps.lap("data")

    with_bn, stats, inserted = _insert(original, data, out, selector, seed)
    laps.lap("stats_insert_check")

    bases, cache = {"nobn": original, "bn": with_bn}, out / "feature-cache"
    log.info("demo: learning-rate sweep: %d lrs x %d seeds x %d variants, %d epochs each", len(lrs), seeds,
             len(bases), epochs)
    budget = {"epochs": epochs, "batch_size": batch_size, "cache": cache, "base_seed": seed,
              "target_accuracy": target_accuracy}
    sweep, finetuned = run_sweep(bases, lrs, seeds, data["train"], data["val"], **budget)
    laps.lap("sweep")
    verdict = sweep_verdict(sweep, target_accuracy)
    sweep_info = _sweep_info(sweep, verdict, lrs, seeds, epochs, batch_size, target_accuracy, laps.seconds["sweep"])
    variants = _curves(sweep, bases, finetuned, (NOTEBOOK_LR, NOTEBOOK_LR * boost), data, epochs=epochs,
                       batch_size=batch_size, cache=cache, seed=seed, target_accuracy=target_accuracy)
    laps.lap("curves_extra_cells")

    best = {v: verdict["best"][v]["lr_key"] if verdict["best"].get(v) else None for v in ("bn", "nobn")}
    if best["bn"] is None or ("bn", best["bn"]) not in finetuned:
        raise UserError("every BN fine-tune diverged: nothing to fold; lower the learning rates")
    best_bn, model_ft = f"bn_lr{best['bn']}_seed0", finetuned[("bn", best["bn"])]
    folded, fold_part = _fold(model_ft, best_bn, data["val"], out)
    laps.lap("fold")

    nobn = ((f"nobn_lr{best['nobn']}_seed0", finetuned[("nobn", best["nobn"])])
            if ("nobn", best["nobn"]) in finetuned else None)
    recalibration = _recalibrate(model_ft, best_bn, nobn, data, seed, shift_samples,
                                 {"sizes": prior_sizes, "seeds": prior_seeds, "eval_samples": prior_eval_samples})
    laps.lap("recalibrate")

    log.info("demo: deploy check of %s on every installed runtime", best_bn)
    deploy, skipped = deploy_rows(model_ft, folded, data["val"], deploy_samples, latency_runs)
    laps.lap("deploy")
    deploy_info = {"reference": "unfolded model on onnxruntime, f32", "samples": min(deploy_samples, val_samples),
                   "latency_runs": latency_runs, "skipped": skipped, "text": deploy_text(deploy, skipped)}
    quantized = quantize_rows(folded, data["train"], data["val"], data["shifted_eval"], out, samples=quantize_samples,
                              seed=seed)
    laps.lap("quantize")
    lines = quantize_lines(quantized)
    quantize = {"calibration": "clean target training images", "samples": min(quantize_samples, train_samples),
                "models": quantized, "lines": lines, "text": " ".join(lines)}

    torch_device = next((c["device"] for per in sweep.values() for v in per.values() for c in v["cells"]
                         if c.get("device")), "cpu")
    report = {
        "model": str(model_path.name), "model_card": "models/README.md",
        "device": f"onnxruntime on {inserted['provider']}, torch on {torch_device}",
        "data": {"source_samples": source_samples, "train_samples": train_samples, "val_samples": val_samples,
                 "shift_samples": shift_samples, "seed": seed},
        **{k: inserted[k] for k in ("stats", "identity", "notebook_mistake")},
        "budget": {"epochs": epochs, "batch_size": batch_size, "optimizer": "adam",
                   "lrs": [NOTEBOOK_LR, NOTEBOOK_LR * boost], "sweep_lrs": lrs, "sweep_seeds": seeds},
        "finetune": variants, "sweep": sweep, "sweep_info": sweep_info, "fold": fold_part,
        "recalibrate": recalibration, "deploy": deploy, "deploy_info": deploy_info, "quantize": quantize,
        "finetune_summary": summary_line(variants),
    }
    drawn = pictures and _pictures(out, sweep, sweep_info["start"], target_accuracy, variants,
                                   stats)
    laps.lap("pictures")
    report["seconds"] = time.perf_counter() - laps.started
    report["timings"] = {k: round(v, 2) for k, v in laps.seconds.items()}
    with atomic_path(out / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(report_md(report, drawn) + "\n")
    log.info("demo: %s", verdict["text"])
    return report
