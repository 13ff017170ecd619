"""The prior, the variance floor and the labelled guard (issue 25).

The old statistics count as N = `prior` samples against the n new images (Schneider et al. 2020):

    mu = (N mu_old + n mu_new)/(N+n)
    var = (N (var_old + (mu_old-mu)^2) + n (var_new + (mu_new-mu)^2))/(N+n)     (the mixture's)

applied to each BN once, after everything is measured (mu_new, var_new: what prior 0 measures).
The floor: a channel whose var falls below var_floor x var_old keeps var_floor x var_old. The guard:
with labelled eval_data, top-1 and loss before and after; refused when top-1 drops by more than
max_drop points. prior "auto" scores AUTO_GRID x n on eval_data and keeps the best.
"""

from __future__ import annotations

import os

import numpy as np

from onnxbn.errors import UserError
from onnxbn.io.model import Model
from onnxbn.recalibration.plan import write_stats
from onnxbn.recalibration.report import BNRecord

# The defaults, chosen from tools/bench_recalibrate.py prior (README "Recalibrating without hurting"; BN CNN,
# 3 seeds): a prior of 2n is the smallest tried that keeps every in-domain calibration set (a random sample or
# 2 of 10 classes, n = 32..500) within 1 point of the model as trained (worst -0.1; prior 0 costs up to 21.3,
# n up to 3.5, the fixed N = 16..256 up to 18.8 at n = 500); it keeps ~10% of what prior 0 gains on a strong
# shift (+3.3..3.8 of +37..39 points): no prior tried does both, so adapting to a shift is asked for
# (prior=0, or "auto" with labelled eval_data). The floor costs nothing there (no channel floored) and
# keeps the demo's clean top-1 after a prior-0 recalibration at 58.6% (50.1% without; 58.9% before).
DEFAULT_PRIOR = "2n"
DEFAULT_VAR_FLOOR = 0.01
DEFAULT_MAX_DROP = 0.5  # points of top-1, with eval_data
AUTO_GRID = (0.0, 0.25, 1.0, 2.0, 4.0, 16.0)  # prior "auto": these multiples of n


def blend(old_mean: np.ndarray, old_var: np.ndarray, new_mean: np.ndarray, new_var: np.ndarray, prior: float,
          n: int) -> tuple[np.ndarray, np.ndarray]:
    """The old statistics counted as `prior` samples against `n` new ones: the mean and variance of the
    mixture, mu = (N mu_old + n mu_new)/(N+n), var = (N (var_old + (mu_old-mu)^2) + n (var_new + (mu_new-mu)^2))/(N+n)."""
    old_mean, old_var, new_mean, new_var = (np.asarray(a, np.float64) for a in (old_mean, old_var, new_mean, new_var))
    w_old, w_new = prior / (prior + n), n / (prior + n)
    mean = w_old * old_mean + w_new * new_mean
    var = w_old * (old_var + (old_mean - mean) ** 2) + w_new * (new_var + (new_mean - mean) ** 2)
    return mean, var


def apply_prior(out: Model, bns: list[BNRecord], prior: float, samples: int,
                 var_floor: float = 0.0) -> tuple[list[str], dict[str, list[int]]]:
    """Blend each BN's measured statistics with its old ones (`blend`, n = the number of images), then floor
    the variance (a channel whose new variance is below var_floor * its old one keeps var_floor * old), and
    write them; applied once, after everything is measured (the measurement itself is that of prior 0).

    Why the floor: a channel constant on the new data (e.g. a ReLU that never fires there) gets variance 0,
    and any input that still varies in it (the old domain, an outlier) is then divided by sqrt(eps).
    Returns (the BNs whose old mean/var are computed at run time: no old value, neither blended nor
    floored; {BN: the indices of its floored channels})."""
    unblended, floored = [], {}
    for b in bns:
        old_mean, old_var = b.old_mean, b.old_var
        if old_mean is None or old_var is None:
            unblended.append(b.node)
            continue
        if b.measured_mean is None:
            b.measured_mean, b.measured_var = b.new_mean, b.new_var
        mean, var = b.measured_mean, b.measured_var  # called again (--prior auto): always from the measurement
        assert mean is not None and var is not None, "every BN is measured before the prior"
        if prior <= 0 and var_floor <= 0:
            if b.new_mean is not mean:
                b.new_mean, b.new_var = mean, var
                write_stats(out, b, mean, var)
            continue
        if prior > 0:
            mean, var = blend(old_mean, old_var, mean, var, prior, samples)
        if var_floor > 0:
            floor = var_floor * old_var
            low = var < floor
            if low.any():
                var = np.where(low, floor, var)
                floored[b.node] = [int(c) for c in np.flatnonzero(low)]
        if prior > 0 or b.node in floored or b.new_mean is not b.measured_mean:
            b.new_mean, b.new_var = mean, var
            write_stats(out, b, mean, var)
    return unblended, floored


def parse_prior(prior, eval_data) -> tuple[float, bool] | str:
    """A number N >= 0 -> (N, False); "Kn" (K >= 0 times the number of new images, e.g. "2n") -> (K, True);
    "auto" (which needs labelled eval_data) -> "auto"."""
    relative = False
    if isinstance(prior, str):
        text = prior.strip().lower()
        if text == "auto":
            if eval_data is None:
                raise UserError("--prior auto picks the prior on labelled data: give --eval DATA (eval_data=)")
            return "auto"
        relative = text.endswith("n")
        try:
            prior = float(text[:-1] or 1) if relative else float(text)
        except ValueError:
            raise UserError(f"--prior: {prior!r} is neither a number, a multiple of n (such as 2n) nor auto") from None
    if not (isinstance(prior, (int, float)) and prior >= 0 and np.isfinite(prior)):
        raise UserError(f"--prior must be a finite number >= 0, a multiple of n (such as 2n) or auto (got {prior})")
    return float(prior), relative


def choose_and_guard(out: Model, bns: list[BNRecord], samples: int, prior: tuple[float, bool] | str, var_floor: float,
                     original: Model, eval_data, max_drop: float, evaluate_options: dict) -> tuple:
    """Blend and floor the measured statistics into `out` (`apply_prior`); with eval_data, score the original
    and the result on it (`training.evaluate`: top-1, loss). prior "auto": blend at each of AUTO_GRID x n
    (cheap: the measurement does not depend on the prior) and keep the best top-1, then the lowest loss.
    Returns (the prior used, the grid's scores, the guard's record or None, `apply_prior`'s result)."""
    def score(p: float) -> dict:
        from onnxbn.training import evaluate

        applied = apply_prior(out, bns, p, samples, var_floor)
        r = evaluate(out.copy().to_proto(), eval_data, **evaluate_options)
        return {"prior": p, "top1": r["top1"], "loss": r["loss"], "samples": r["samples"], "applied": applied}

    fixed = None if isinstance(prior, str) else prior[0] * samples if prior[1] else prior[0]  # str: "auto"
    if eval_data is None:
        assert fixed is not None, "parse_prior refuses auto without eval_data"
        return fixed, [], None, apply_prior(out, bns, fixed, samples, var_floor)
    from onnxbn.training import evaluate

    r = evaluate(original.copy().to_proto(), eval_data, **evaluate_options)
    before = {"top1": r["top1"], "loss": r["loss"], "samples": r["samples"]}
    if fixed is None:
        grid = [score(k * samples) for k in AUTO_GRID]
        after = max(grid, key=lambda g: (g["top1"], -g["loss"]))
        applied = apply_prior(out, bns, after["prior"], samples, var_floor)  # the last grid point is in `out`
    else:
        grid, after = [], score(fixed)
        applied = after["applied"]
    drop = 100 * (before["top1"] - after["top1"])
    data = str(eval_data) if isinstance(eval_data, (str, os.PathLike)) else type(eval_data).__name__
    guard = {"data": data, "before": before, "after": {k: after[k] for k in ("top1", "loss", "samples")},
             "drop": drop, "max_drop": max_drop, "refused": bool(drop > max_drop)}
    return after["prior"], [{k: g[k] for k in ("prior", "top1", "loss")} for g in grid], guard, applied
