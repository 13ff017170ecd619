"""The demo's recalibration step: each model on clean and shifted images, before and after re-estimating its
BN statistics on unlabelled shifted images (exact and batch mode), and the sentences that describe the rows;
and the prior table: top-1 after recalibrating with prior N = k x n on n random images (issue 25).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("onnxbn")
PRIOR_MULTIPLES = (0, 1, 2, 16)  # the prior table's N = k x n (2n is recalibrate's default), fixed before any run
PRIOR_SIZES = (32, 128)  # the prior table's calibration sizes n
PRIOR_SEEDS = 3
PRIOR_EVAL_SAMPLES = 500  # the first 500 held-out clean and shifted images each (the table runs 2 x 49 evaluations)


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
                        "newly_dead_channels": rep.newly_dead_channels(),
                        "max_mean_change": max((b.to_dict()["mean_change"] or 0.0 for b in rep.bns), default=0.0),
                        "max_var_change": max((b.to_dict()["var_change"] or 0.0 for b in rep.bns), default=0.0)}
                info["seconds"] = round(time.perf_counter() - started, 3)
                row[f"shifted_{mode}"] = {**eval_row(new, shifted_eval), **info}
                row[f"clean_{mode}"] = eval_row(new, clean_val)
        rows[name] = row
    return rows


def prior_label(k: float) -> str:
    """N = k x n written as recalibrate's --prior takes it: 0, n, 2n, 16n."""
    return "0" if k == 0 else "n" if k == 1 else f"{k:g}n"


def calibration_draw(pool_size: int, n: int, seed: int, domain: int, index: int) -> np.ndarray:
    """The prior table's calibration subset: n of `pool_size` images, without replacement, sorted; seeded by
    (demo seed, domain 0 in-domain / 1 shifted, n, seed index) alone."""
    rng = np.random.default_rng([seed, domain, n, index])
    return np.sort(rng.choice(pool_size, size=n, replace=False))


def prior_table(model, pools: dict[str, Path], clean_val: Path, shifted_eval: Path, seed: int,
                sizes=PRIOR_SIZES, seeds: int = PRIOR_SEEDS, multiples=PRIOR_MULTIPLES,
                eval_samples: int = PRIOR_EVAL_SAMPLES) -> dict:
    """Top-1 on the first `eval_samples` held-out clean and shifted images after recalibrating `model` (exact
    mode, default variance floor) with prior N = k x n on n images drawn by `calibration_draw` from each pool
    ("in-domain": clean target training images, "shifted": the unlabelled shifted images); mean and std
    (ddof 1) over the seeds; and `model`'s own top-1 on them ("as_trained")."""
    from onnxbn.recalibration import recalibrate
    from onnxbn.training import evaluate

    started = time.perf_counter()
    held_out = {}
    for where, path in (("clean", clean_val), ("shifted", shifted_eval)):
        with np.load(path) as npz:
            held_out[where] = (npz["x"][:eval_samples], npz["y"][:eval_samples])
    as_trained = {where: evaluate(model, xy, batch_size=256)["top1"] for where, xy in held_out.items()}
    rows = []
    for domain, (calibration, pool_path) in enumerate(pools.items()):
        with np.load(pool_path) as npz:
            pool = npz["x"]
        for n in sizes:
            cells = {k: [] for k in multiples}
            for index in range(seeds):
                x = pool[calibration_draw(len(pool), n, seed, domain, index)]
                for k in multiples:
                    new = recalibrate(model, x, mode="exact", batch_size=64, prior=float(k * n))
                    cells[k].append({"seed_index": index, **{
                        where: evaluate(new, xy, batch_size=256)["top1"] for where, xy in held_out.items()}})
            for k, draws in cells.items():
                row = {"calibration": calibration, "n": n, "prior": prior_label(k), "prior_samples": k * n,
                       "draws": draws}
                for where in ("clean", "shifted"):
                    values = [d[where] for d in draws]
                    row[f"{where}_mean"] = float(np.mean(values))
                    row[f"{where}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
                rows.append(row)
    seconds = time.perf_counter() - started
    log.info("demo: prior table (%d cells x %d seeds) in %.1f s", len(rows), seeds, seconds)
    return {"calibration": {name: str(path.name) for name, path in pools.items()}, "sizes": list(sizes),
            "seeds": seeds, "priors": [prior_label(k) for k in multiples], "multiples": list(multiples),
            "mode": "exact", "eval_samples": {where: len(xy[1]) for where, xy in held_out.items()},
            "as_trained": as_trained, "rows": rows,
            "seconds": round(seconds, 3),
            "draw_rule": "numpy default_rng([demo seed, domain (0 in-domain, 1 shifted), n, seed index]).choice("
                         "pool size, n, replace=False), sorted"}


def prior_lines(table: dict) -> list[str]:
    """One sentence per calibration set of `prior_table`: each prior's change in mean top-1 from the model as
    trained, in points, on clean and shifted images, per n."""
    trained = table["as_trained"]
    lines = []
    for calibration in table["calibration"]:
        parts = []
        for prior in table["priors"]:
            rows = [r for r in table["rows"] if r["calibration"] == calibration and r["prior"] == prior]
            change = {where: "/".join(f"{100 * (r[f'{where}_mean'] - trained[where]):+.1f}" for r in rows)
                      for where in ("clean", "shifted")}
            parts.append(f"N = {prior}{' (default)' if prior == '2n' else ''}: clean {change['clean']}, "
                         f"shifted {change['shifted']}")
        sizes = "/".join(str(n) for n in table["sizes"])
        lines.append(f"{calibration} calibration (n = {sizes}), points of mean top-1 against the model as trained: "
                     + "; ".join(parts) + ".")
    return lines


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
