"""The demo's recalibration step: each model on clean and shifted images, before and after re-estimating its
BN statistics on unlabelled shifted images (exact and batch mode), and the sentences that describe the rows.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("onnxbn")




def recalibration_rows(models: dict, clean_val: Path, shifted_eval: Path, shifted_unlabelled: Path,
                       seed: int, full: tuple = ()) -> dict:
    """Each model on clean and shifted validation images, before and after recalibrating its BN statistics on
    unlabelled shifted images (exact and batch mode), with recalibrate's default prior and variance floor,
    except the models named in `full`: prior 0 (the insert + recalibrate recipe, whose identity BNs hold the
    clean statistics as the old ones). `models`: name -> (ModelProto, whether it has BN)."""
    from onnxbn.recalibration import recalibrate_with_report

    rows = {}
    for name, (model, has_bn) in models.items():
        row = {"clean": eval_row(model, clean_val), "shifted_before": eval_row(model, shifted_eval)}
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
                                                       for b in rep.bns if b.old_var is not None and b.new_var is not None)),
                        "max_mean_change": max((b.to_dict()["mean_change"] or 0.0 for b in rep.bns), default=0.0),
                        "max_var_change": max((b.to_dict()["var_change"] or 0.0 for b in rep.bns), default=0.0)}
                info["seconds"] = round(time.perf_counter() - started, 3)
                row[f"shifted_{mode}"] = {**eval_row(new, shifted_eval), **info}
                row[f"clean_{mode}"] = eval_row(new, clean_val)
        rows[name] = row
    return rows


def eval_row(model, data) -> dict:
    """`onnxbn.evaluate` of `model` on a labelled .npz: {loss (mean cross-entropy), accuracy (top-1), samples}."""
    from onnxbn.training import evaluate

    r = evaluate(model, str(data), batch_size=256)
    return {"loss": r["loss"], "accuracy": r["top1"], "samples": r["samples"]}


def recalibration_lines(models: dict, labels: dict) -> list[str]:
    """One sentence per row of `recalibration_rows`, every number and direction read from the row."""
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
