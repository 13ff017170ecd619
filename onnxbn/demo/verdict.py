"""What the sweep shows, in words computed from its numbers only.

A difference counts when it is larger than the larger of the two seed standard deviations; otherwise the words say
"within the spread". Nothing here runs a model.
"""

from __future__ import annotations

import math

from onnxbn.demo.sweep import VARIANT_LABEL, VARIANTS, best_lr, lr_key


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
        head = (f"Best final val loss: BN {pm(b['val_loss_mean'], b['val_loss_std'])} (lr {b['lr_key']}), "
                f"no BN {pm(n['val_loss_mean'], n['val_loss_std'])} (lr {n['lr_key']})")
        lines.append(head + {"bn": f": BN's is lower by {diff:.4f}, more than the larger seed std ({spread:.4f}).",
                             "nobn": f": no BN's is lower by {diff:.4f}, more than the larger seed std "
                                     f"({spread:.4f}); BN does not reach a lower loss here.",
                             "within": f": they differ by {diff:.4f}, within the larger seed std ({spread:.4f}): "
                                       "no difference shown."}[who])
    ba, na = best_acc["bn"], best_acc["nobn"]
    if ba and na:
        who, diff, spread = _versus(ba, na, "val_accuracy", lower_is_better=False)
        def pct(e):
            return pm(100 * e["val_accuracy_mean"], 100 * (e["val_accuracy_std"] or 0), ".1f") + "%"

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
        tops = ", ".join(f"{VARIANT_LABEL[v]} up to lr {'none' if lr is None else lr_key(lr)}"
                         for v, lr in t.items())
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


def pm(mean: float | None, std: float | None, fmt: str = ".4f") -> str:
    """"mean ± std" ("-" without a mean, the mean alone without a std)."""
    if mean is None:
        return "-"
    return f"{mean:{fmt}}" + ("" if std is None else f" ± {std:{fmt}}")


def summary_line(variants: dict) -> str:
    """The curves' one-seed comparison at each lr: both val losses and accuracies, and which loss is lower."""
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
