"""The end-to-end run on the bundled model: the 2017 notebook's procedure, done right.

models/demo_vgg.onnx (a small VGG trained without BN on the procedural `source`
task, see models/README.md) plays VGG16; the `target` task plays cats vs dogs.
Steps: statistics on source images -> identity BN after the dense layers ->
check -> new 2-way classifier -> fine-tune on cached features, original vs BN model,
at the notebook's learning rate (1e-5) and at 30x that -> write back -> fold -> check.
Everything the report says comes from this run; nothing is tuned to flatter BN.
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxbn import demo_data
from onnxbn.errors import UserError
from onnxbn.modelio import atomic_path, load_model, save_model

log = logging.getLogger("onnxbn")
BUNDLED = Path(str(importlib.resources.files("onnxbn.models") / "demo_vgg.onnx"))  # package data (models/ links to it)
NOTEBOOK_LR = 1e-5


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


def _plot_curves(path: Path, variants: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, result in variants.items():
        history = result["history"]
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


def _report_md(report: dict, pictures: bool) -> str:
    ident, fold = report["identity"], report["fold"]
    lines = [
        "# onnxbn demo report", "",
        f"Model: `{report['model']}` ({report['model_card']}). Source task: {report['data']['source_samples']} "
        f"calibration images; target task: {report['data']['train_samples']} training and "
        f"{report['data']['val_samples']} validation images. Run time {report['seconds']:.0f} s on "
        f"{report['device']}.", "",
        "## 1. Identity BN insertion", "",
        f"Statistics of {len(report['stats']['tensors'])} tensors (selector `{report['stats']['selector']}`) over "
        f"{report['stats']['samples']} source images; {report['stats']['dead_channels']} dead channels "
        "(zero variance, kept exact).", "",
        "| max abs error | max rel error | top-1 agreement | verdict |", "|---|---|---|---|",
        f"| {ident['max_abs_error']:.3g} | {ident['max_rel_error']:.3g} | {ident['top1_agreement']:.2%} | "
        f"{'PASS' if ident['passed'] else 'FAIL'} |", "",
        "The notebook's version of this step (BN scale set to the variance, not sqrt(var + eps)) "
        f"gives a max rel error of {report['notebook_mistake']['max_rel_error']:.3g} and "
        f"{report['notebook_mistake']['top1_agreement']:.2%} top-1 agreement on the same inputs.", "",
        "## 2. Fine-tuning on the target task", "",
        f"A new 2-way classifier, conv blocks frozen (features cached once), {report['budget']['epochs']} epochs, "
        f"batch {report['budget']['batch_size']}, Adam. Validation after the last epoch:", "",
        "| variant | lr | val loss (start → end) | val accuracy (start → end) |", "|---|---|---|---|",
    ]
    for name, v in report["finetune"].items():
        lines.append(f"| {name} | {v['lr']:g} | {v['val_loss_before']:.4f} → {v['val_loss']:.4f} | "
                     f"{v['val_accuracy_before']:.2%} → {v['val_accuracy']:.2%} |")
    lines += ["", report["finetune_summary"], ""]
    if pictures:
        lines += ["![validation curves](curves.png)", "", "![BN statistics](activations.png)", ""]
    lines += [
        "## 3. Fold for deployment", "",
        f"`{fold['model']}` folded: {fold['bn_before']} BN before, {fold['bn_remaining']} after; "
        f"max rel error vs the unfolded model {fold['max_rel_error']:.3g} "
        f"({'PASS' if fold['passed'] else 'FAIL'}).", "",
    ]
    return "\n".join(lines)


def _summary_line(variants: dict) -> str:
    parts = []
    for lr_name in sorted({k.split("_", 1)[1] for k in variants}):
        plain, bn = variants.get(f"nobn_{lr_name}"), variants.get(f"bn_{lr_name}")
        if plain and bn:
            better = "BN" if bn["val_loss"] < plain["val_loss"] else "no-BN"
            parts.append(f"at {lr_name.replace('lr', 'lr ')}: no-BN val loss {plain['val_loss']:.4f} "
                         f"(acc {plain['val_accuracy']:.2%}), BN {bn['val_loss']:.4f} (acc {bn['val_accuracy']:.2%}); "
                         f"lower loss: {better}")
    return "Same budget, same seed; " + "; ".join(parts) + "."


def run_demo(out: str | Path = "demo-out", *, model: str | Path | None = None, source_samples: int = 1000,
             train_samples: int = 2000, val_samples: int = 1000, epochs: int = 6, batch_size: int = 64,
             boost: float = 30.0, selector: str = "dense", seed: int = 0, pictures: bool = True) -> dict:
    """Run the whole procedure into `out` and return report.json's content."""
    import onnxbn
    from onnxbn.check import compare
    from onnxbn.fold import fold_with_decisions
    from onnxbn.insert import dead_channels

    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model_path = Path(model) if model else BUNDLED
    if not model_path.is_file():
        raise UserError(f"{model_path}: bundled demo model not found; run from a source checkout or pass --model")
    original = load_model(model_path)

    log.info("demo: generating data (source %d, target %d + %d)", source_samples, train_samples, val_samples)
    data_dir = out / "data"
    source = demo_data.write_npz(data_dir / "source_calibration.npz", "source", source_samples, 3000 + seed)
    train = demo_data.write_npz(data_dir / "target_train.npz", "target", train_samples, 2000 + seed)
    val = demo_data.write_npz(data_dir / "target_val.npz", "target", val_samples, 2001 + seed)

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

    classes = len(demo_data.CLASSES["target"])
    starts = {"nobn": new_classifier(original, classes, seed), "bn": new_classifier(with_bn, classes, seed)}
    variants, finetuned, torch_device = {}, {}, "cpu"
    for lr in (NOTEBOOK_LR, NOTEBOOK_LR * boost):
        for kind, start in starts.items():
            name = f"{kind}_lr{lr:g}"
            log.info("demo: fine-tuning %s", name)
            result = onnxbn.finetune(start, train, val, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                                     cache=out / "feature-cache")
            finetuned[name], torch_device = result.model, result.log["device"]
            last = result.log["history"][-1]
            variants[name] = {"lr": lr, "val_loss": last["val_loss"], "val_accuracy": last["val_accuracy"],
                              "val_loss_before": result.log["val_before"]["loss"],
                              "val_accuracy_before": result.log["val_before"]["accuracy"],
                              "history": result.log["history"], "val_before": result.log["val_before"],
                              "seconds": result.log["seconds"]}
    best_bn = min((n for n in variants if n.startswith("bn")), key=lambda n: variants[n]["val_loss"])
    save_model(finetuned[best_bn], out / "model_ft.onnx")

    log.info("demo: folding %s", best_bn)
    folded, decisions = fold_with_decisions(finetuned[best_bn])
    fold_check = compare(finetuned[best_bn], folded, val, batch_size=256)
    save_model(folded, out / "deploy.onnx")
    fold_out = fold_check.to_dict()["outputs"][folded.graph.output[0].name]

    report = {
        "model": str(model_path.name), "model_card": "models/README.md",
        "device": f"onnxruntime on {identity.provider}, torch on {torch_device}",
        "data": {"source_samples": source_samples, "train_samples": train_samples, "val_samples": val_samples,
                 "seed": seed},
        "stats": {"selector": selector, "tensors": stats.tensors, "samples": stats.meta["samples"],
                  "dead_channels": int(sum(dead_channels(stats).values()))},
        "identity": {"max_abs_error": ident_out["max_abs_error"], "max_rel_error": ident_out["max_rel_error"],
                     "top1_agreement": ident_out["top1_agreement"], "passed": identity.passed},
        "notebook_mistake": {"max_rel_error": mistake["max_rel_error"], "top1_agreement": mistake["top1_agreement"]},
        "budget": {"epochs": epochs, "batch_size": batch_size, "optimizer": "adam", "lrs": [NOTEBOOK_LR, NOTEBOOK_LR * boost]},
        "finetune": variants,
        "fold": {"model": best_bn, "bn_before": len(decisions),
                 "bn_remaining": sum(n.op_type == "BatchNormalization" for n in folded.graph.node),
                 "max_rel_error": fold_out["max_rel_error"], "passed": fold_check.passed, "decisions": decisions},
    }
    report["finetune_summary"] = _summary_line(variants)
    drawn = False
    if pictures:
        try:
            _plot_curves(out / "curves.png", variants)
            _plot_activations(out / "activations.png", stats)
            drawn = True
        except ImportError:
            log.warning("matplotlib is not installed: no pictures (pip install 'onnxbn[report]')")
    report["seconds"] = time.perf_counter() - started
    with atomic_path(out / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    with atomic_path(out / "report.md") as tmp:
        tmp.write_text(_report_md(report, drawn) + "\n")
    return report
