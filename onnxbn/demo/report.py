"""report.md from report.json's content: one section per stage, every number taken from the report dict."""

from __future__ import annotations

from onnxbn.demo.sweep import VARIANT_LABEL, VARIANTS, lr_key
from onnxbn.demo.verdict import pm


def report_md(report: dict, pictures: bool) -> str:
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
            return "diverged" if v["finished"] == 0 else pm(v["val_loss_mean"], v["val_loss_std"])

        def acc(v):
            return "diverged" if v["finished"] == 0 else pm(
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
    lines += _quantize_md(report["quantize"])
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
    return lines + _prior_md(rec["prior_table"])


def _prior_md(table: dict) -> list[str]:
    """The prior table: one row per (calibration set, n, evaluated on), one column per prior N."""
    seeds = table["seeds"]
    lines = [
        "### Recalibrate's prior: N x calibration size n", "",
        (f"`{table['model']}` recalibrated (exact mode, default variance floor) on n images drawn at random from the "
         f"clean target training images (in-domain) or from the unlabelled shifted images, with the old statistics "
         f"counted as N samples against the n new ones (`--prior N`; 2n is the default); top-1 on the held-out clean "
         f"and shifted validation images (the first {table['eval_samples']['clean']} and "
         f"{table['eval_samples']['shifted']}), mean ± std over {seeds} draws ({table['seconds']:.0f} s)."), "",
        "| calibration | n | evaluated on | as trained | " + " | ".join(
            f"N = {p}" + (" (default)" if p == "2n" else "") for p in table["priors"]) + " |",
        "|---|---|---|---|" + "---|" * len(table["priors"]),
    ]
    cells: dict = {}
    for row in table["rows"]:
        cells.setdefault((row["calibration"], row["n"]), {})[row["prior"]] = row
    for (calibration, n), by_prior in cells.items():
        for where in ("clean", "shifted"):
            lines.append(f"| {calibration} | {n} | {where} | {100 * table['as_trained'][where]:.1f}% | " + " | ".join(
                pm(100 * by_prior[p][f"{where}_mean"],
                   None if by_prior[p][f"{where}_std"] is None else 100 * by_prior[p][f"{where}_std"], ".1f") + "%"
                for p in table["priors"]) + " |")
    return lines + ["", *[f"- {line}" for line in table["lines"]], ""]


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


def _quantize_md(q: dict) -> list[str]:
    models = q["models"]
    int8 = [row for name, row in models.items() if name != "float"]
    runtimes = list(dict.fromkeys(r for row in int8 for r in row["checks"]))
    first = int8[0]
    lines = [
        "## 7. INT8 for deployment", "",
        (f"`onnxbn.quantize` of the folded model: QDQ, weights int8 "
         f"{'per channel' if first['per_channel'] else 'per tensor'}, activations {first['activations']} per tensor, "
         f"ranges {first['method']} from onnxbn's streaming pass over {q['samples']} {q['calibration']}; recovery "
         "none and the default. Loss / top-1 (`onnxbn.evaluate`) on the clean and the shifted validation images; "
         "each INT8 model checked against the float model (`onnxbn.compare`, clean validation images) on every "
         f"installed runtime, gate: cosine >= {first['min_cosine']:g} and top-1 agreement >= {first['min_top1']:.0%}."),
        "",
        "| model | clean | shifted | " + " | ".join(f"check on {r}" for r in runtimes) + " |",
        "|---|---|---|" + "---|" * len(runtimes),
    ]
    for name, row in models.items():
        label = "float (folded)" if name == "float" else f"INT8, recovery {','.join(row['recover']) or 'none'}"
        cells = [f"{row[w]['loss']:.4f} / {row[w]['accuracy']:.2%}" for w in ("clean", "shifted")]
        for r in runtimes:
            c = row.get("checks", {}).get(r)
            if c is None:
                cells.append("-")
                continue
            metrics = "; ".join(f"cosine {o['cosine_similarity']:.4f}, top-1 {o.get('top1_agreement', float('nan')):.2%}"
                                for o in c["outputs"].values())
            cells.append(f"{metrics} (runtime precision {c['precision']}): {'PASS' if c['passed'] else 'FAIL'}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "**What it shows:**", "", *[f"- {line}" for line in q["lines"]], ""]
    return lines
