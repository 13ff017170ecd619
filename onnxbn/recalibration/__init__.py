"""Recalibrate: re-estimate the mean/var of a model's BatchNormalization nodes on new data.

An inference-mode BN computes y = scale * (x - mean) / sqrt(var + eps) + B per channel
(axis 1). `recalibrate` measures the statistics of every selected BN node's (default: all)
input x on the given data (below: exact or batch), keeps scale and B, and stores

    mean = (N mu_old + n mu_new)/(N+n),   var = (N (var_old + (mu_old-mu)^2) + n (var_new + (mu_new-mu)^2))/(N+n)

(`blend`: the old statistics count as N = `prior` samples against the n new images; default
N = 2n; N = 0 stores the measurement, AdaBN), with a variance floor: a channel whose var falls
below var_floor x var_old (default 0.01; 0 = off) keeps var_floor x var_old. With labelled
eval_data a guard scores the model before and after and refuses a drop of more than max_drop
top-1 points; prior "auto" picks N from AUTO_GRID x n on that data.
Nothing else changes: nodes, names, opset and metadata survive, and a metadata entry
`onnxbn.recalibrate` records the nodes, the data, the mode and the passes.

Modes: exact (the default; `exact`) and batch (`batch`). Which BNs and in what order: `plan`; the
prior, floor and guard: `prior`; the report: `report`.

Recipe, a model without BN (domain adaptation by feature alignment):

    stats = onnxbn.collect_stats(model, source_data, after="conv")   # source-domain statistics
    with_bn = onnxbn.insert_bn(model, stats)                          # identity BN
    adapted = onnxbn.recalibrate(with_bn, target_data, prior=0)       # unlabelled target data

Each inserted BN has scale = sqrt(var_s + eps) and B = mean_s; recalibrated, its mean/var
are the target statistics, so on the target data it maps each channel to mean mean_s and
variance (var_s + eps) * var_t / (var_t + eps) ~ var_s: the target features are aligned
to the source statistics that the rest of the network was trained on.
"""

from __future__ import annotations

import json
import time

import numpy as np
import onnx

from onnxbn.data.images import default_workers
from onnxbn.errors import UserError
from onnxbn.feeding import fit_batch_size, model_input, open_model_data
from onnxbn.graph import require_opset, value_types
from onnxbn.io.copies import set_metadata
from onnxbn.io.model import Model
from onnxbn.recalibration.batch import run_batch
from onnxbn.recalibration.exact import DEFAULT_CACHE_MB, run_exact
from onnxbn.recalibration.plan import prepare, select_bns
from onnxbn.recalibration.prior import DEFAULT_MAX_DROP, DEFAULT_PRIOR, DEFAULT_VAR_FLOOR, choose_and_guard, parse_prior
from onnxbn.recalibration.report import RecalibrationRefused, RecalibrationReport

__all__ = ["META_KEY", "MODES", "RecalibrationRefused", "RecalibrationReport", "recalibrate", "recalibrate_model",
           "recalibrate_with_report"]

MODES = ("exact", "batch")
META_KEY = "onnxbn.recalibrate"


def recalibrate(model, data, mode: str = "exact", nodes=None, **options) -> onnx.ModelProto:
    """A copy of `model` (path or ModelProto) whose selected BN nodes hold their recalibrated statistics:
    `recalibrate_model` on `Model.open(model)` (see there for the options), as a ModelProto."""
    return recalibrate_model(Model.open(model), data, mode, nodes, **options)[0].to_proto()


def recalibrate_with_report(model, data, mode: str = "exact", nodes=None,
                            **options) -> tuple[onnx.ModelProto, RecalibrationReport]:
    """(`recalibrate`'s result, the RecalibrationReport); see `recalibrate_model`."""
    result, report = recalibrate_model(Model.open(model), data, mode, nodes, **options)
    return result.to_proto(), report


def recalibrate_model(model: Model, data, mode: str = "exact", nodes=None, *, batch_size: int = 32,
                      limit: int | None = None, seed: int = 0, preset: str | None = None, workers: int | None = 0,
                      strict: bool = False, device: str = "auto", cache_mb: float = DEFAULT_CACHE_MB,
                      prior: float | str = DEFAULT_PRIOR, var_floor: float = DEFAULT_VAR_FLOOR, eval_data=None,
                      max_drop: float = DEFAULT_MAX_DROP) -> tuple[Model, RecalibrationReport]:
    """(`model` whose selected BN nodes (default: all) hold their recalibrated statistics, the report);
    `model` is left as it is. The weights recalibration leaves alone stay where they are (a Model opened
    from a path keeps them in its file; onnxruntime reads them from there), the new statistics are
    arrays of the result (see `onnxbn.io.model`).

    `data`: image folder, .npz, array or (x, y), as `collect_stats` takes; `mode`: "exact" or "batch";
    `nodes`: BN node names (list or comma separated); batch_size, limit, seed, preset, workers, strict
    and device as `collect_stats` takes them; cache_mb: exact mode's activation cache;
    prior: the old statistics count as this many samples against the n new images (`blend`), a number,
    a multiple of n ("2n", the default) or "auto" (needs eval_data: the best of AUTO_GRID x n on it);
    var_floor: a new variance below var_floor x the old one keeps that (default DEFAULT_VAR_FLOOR; 0 = off);
    eval_data: labelled data (as `evaluate` takes): top-1 and loss before and after go into the report,
    and `RecalibrationRefused` (holding the report) is raised when top-1 drops by more than max_drop
    points (default 0.5). See the module docstring (math, passes and cost, the insert + recalibrate recipe).
    """
    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r}: use exact or batch")
    if cache_mb < 0:
        raise UserError(f"--cache-mb must be 0 or more (got {cache_mb})")
    parsed = parse_prior(prior, eval_data)
    requested = prior.strip().lower() if isinstance(prior, str) else float(prior)
    if not (0 <= var_floor <= 1):
        raise UserError(f"--var-floor must be between 0 and 1 (got {var_floor})")
    if not np.isfinite(max_drop):
        raise UserError(f"--max-drop must be a finite number of top-1 points (got {max_drop})")
    started = time.perf_counter()
    result = model.detached()  # a light copy: large inline weights reach onnxruntime as arrays
    out = result.proto
    require_opset(out)
    selected = select_bns(out, nodes)
    bns = prepare(result, selected, value_types(out))
    dataset = open_model_data(out, data, preset=preset, limit=limit, seed=seed)
    batch_size = fit_batch_size(model_input(out)[2], batch_size, dataset.total)
    workers = default_workers() if workers is None else workers
    if mode == "exact":
        passes, samples, provider = run_exact(result, bns, dataset, batch_size, workers=workers, strict=strict,
                                           device=device, cache_mb=cache_mb)
    else:
        passes, samples, provider = run_batch(result, bns, dataset, batch_size, workers=workers, strict=strict,
                                           device=device)
    used, grid, guard, (unblended, floored) = choose_and_guard(
        result, bns, samples, parsed, var_floor, model, eval_data, max_drop,
        {"batch_size": batch_size, "device": device, "preset": preset, "strict": strict})
    if used <= 0:
        unblended = []
    report = RecalibrationReport(mode=mode, bns=bns, passes=passes, samples=samples, batch_size=batch_size,
                                 data=dataset.description, provider=provider, seconds=time.perf_counter() - started,
                                 cache_mb=cache_mb if mode == "exact" else 0.0, prior=used, prior_requested=requested,
                                 prior_not_applied=unblended, var_floor=var_floor,
                                 floored={k: len(v) for k, v in floored.items()}, floored_channels=floored,
                                 prior_grid=grid, eval=guard)
    if guard is not None and guard["refused"]:
        raise RecalibrationRefused(report)
    set_metadata(out, {META_KEY: json.dumps({
        "mode": mode, "nodes": [b.node for b in bns], "passes": len(passes), "samples": samples,
        "batch_size": batch_size, "data": dataset.description, "data_source": dataset.source, "limit": limit,
        "seed": seed, "preset": dataset.preset if dataset.is_images else "array",
        "training_mode_converted": [b.node for b in bns if b.training_mode],
        "prior": used, "prior_requested": requested, "prior_not_applied": unblended, "var_floor": var_floor,
        "floored": {k: len(v) for k, v in floored.items()}, "floored_channels": floored,
        **({"prior_grid": grid} if grid else {}),
        **({"eval": {k: guard[k] for k in ("data", "before", "after", "drop", "max_drop")}} if guard else {}),
    }, separators=(",", ":"))})
    return result, report
