"""`compare`: run a reference and a candidate on the same inputs, each on its runtime, and gather the
metrics of every output (onnxbn.check.metrics) into a Report; `save_outputs`: run the reference alone
and store its outputs as golden outputs (onnxbn.check.golden), to compare a candidate with later.

Tolerances left as None take the default for the precisions the two sides actually ran at, and for a
float16/bfloat16 model its own type's (runtimes.precision.tolerance_choice: 1e-5 at full precision);
the report says which applied and why (`tolerance`, `tolerance_reason`).
"""

from __future__ import annotations

import contextlib
import os

import numpy as np

from onnxbn.check.activations import LAYERWISE_SAMPLES, MAX_MARKED
from onnxbn.check.golden import GoldenOutputs, GoldenWriter, checked_batches, golden_meta, recorded_runtime
from onnxbn.check.inputs import open_inputs, require_samples
from onnxbn.check.layerwise import compare_layerwise
from onnxbn.check.metrics import OutputMetrics
from onnxbn.check.report import Report
from onnxbn.errors import UserError
from onnxbn.feeding import model_input, run_batches
from onnxbn.graph import graph_inputs
from onnxbn.io.load import load_model
from onnxbn.io.model import Model
from onnxbn.runtimes.base import check_runtime, parse_runtime
from onnxbn.runtimes.precision import TOLERANCES, tolerance_choice
from onnxbn.runtimes.sessions import open_session
from onnxbn.tolerances import INT8_WHY, holds_qdq, int8_rule, load_tolerances


def _side_model(model, side: dict) -> Model:
    """The Model of one side: a file for onnxruntime as its structure (the weights stay in the file, read
    by onnxruntime from there), a Model as it is; anything else loaded whole."""
    if isinstance(model, (str, os.PathLike, Model)) and parse_runtime(side["runtime"])[0] == "onnxruntime":
        return Model.open(model)
    return Model(model.whole() if isinstance(model, Model) else load_model(model))


def compare(reference, candidate, data=None, atol: float | None = None, rtol: float | None = None,
            batch_size: int = 32, device: str = "auto", layerwise: bool = False, random: int | None = None,
            seed: int = 0, limit: int | None = None, workers: int = 0, preset: str | None = None, strict: bool = False,
            min_samples: int = 1, *, runtime: str | None = None, reference_runtime: str | None = None,
            candidate_runtime: str | None = None, precision: str | None = None,
            reference_precision: str | None = "f32", tolerances=None, save_outputs=None,
            max_marked: int = MAX_MARKED) -> Report:
    """Run both models on the same inputs and report how far apart their outputs are.

    `reference`/`candidate`: paths or ModelProtos with the same input and outputs;
    `data`: image folder, .npz, array, or None with `random` = N seeded normal inputs (default 8;
    generated batch by batch, see random_inputs; `limit` applies to `data` only);
    `preset`: image preprocessing (default: the reference's metadata, else imagenet).
    Unreadable images are skipped and listed in the report (`strict` raises instead).
    Fewer than `min_samples` compared samples raises UserError: a check of nothing never passes.
    `runtime` runs both sides there; `reference_runtime` / `candidate_runtime` each side
    (default onnxruntime; NAME or NAME:DEVICE, see onnxbn.runtimes). `precision` is the
    candidate's (None = the runtime's own choice; f32, bf16, f16 for openvino),
    `reference_precision` the reference's (f32). `atol` and `rtol` both None: the defaults
    for the precisions the two sides ran at, or the model's own float type where that is
    float16/bfloat16 (1e-5 at full precision; at bf16/f16/tf32 looser,
    plus a term relative to each sample's scale, see runtimes.precision.TOLERANCES); giving either
    one applies the plain rule |a-b| <= atol + rtol*|a| (the other defaulting as above).
    `tolerances`: per-output rules and gates, a JSON/YAML file or a dict (onnxbn.tolerances); outputs
    no rule matches keep the rule above.
    `reference` may be golden outputs (`onnxbn.load_outputs`): the candidate alone runs on `data`
    (default: a test-data folder's own inputs; else as above), which must be the inputs the outputs
    were made from: a sample whose digest differs, or a different number of samples, is a UserError.
    The tolerance defaults then follow the runtime and precision the golden outputs record.
    `save_outputs`: also store the reference model's outputs there, as `save_outputs` does.
    `layerwise`: also compare every shared activation on the first LAYERWISE_SAMPLES inputs, at most
    `max_marked` exposed per runtime session (see onnxbn.check.layerwise).
    """
    golden = reference if isinstance(reference, GoldenOutputs) else None
    if runtime is not None and (reference_runtime is not None or candidate_runtime is not None):
        raise UserError("give --runtime (both sides) or --reference-runtime/--candidate-runtime, not both")
    ref_side = {"runtime": reference_runtime or runtime or "onnxruntime", "device": device,
                "precision": reference_precision}
    cand_side = {"runtime": candidate_runtime or runtime or "onnxruntime", "device": device, "precision": precision}
    for side in (cand_side,) if golden is not None else (cand_side, ref_side):  # fail before any work
        check_runtime(**side)
    if (atol is not None and atol < 0) or (rtol is not None and rtol < 0):
        raise UserError("--atol and --rtol must not be negative")
    if golden is not None:
        if layerwise or save_outputs is not None:
            raise UserError(f"{'--layerwise' if layerwise else '--save-outputs'} needs the reference model; golden "
                            "outputs hold only its outputs")
        ref_model = cand_model = _side_model(candidate, cand_side)
        ref = cand = cand_model.proto
        out_names = golden.output_names(cand)
        if data is None and golden.inputs is not None:
            data = golden.inputs
        if np.dtype(model_input(cand)[1]) != golden.input_dtype:
            raise UserError(f"the candidate takes {np.dtype(model_input(cand)[1]).name} inputs; the golden outputs "
                            f"{golden.path} were made from {golden.input_dtype.name} inputs")
    else:
        # onnxruntime reads a model file's weights itself: Python holds only the graph (Model.open)
        ref_model, cand_model = (_side_model(m, side) for m, side in ((reference, ref_side), (candidate, cand_side)))
        ref, cand = ref_model.proto, cand_model.proto
        out_names = [o.name for o in ref.graph.output]
        missing = [n for n in out_names if n not in {o.name for o in cand.graph.output}]
        if missing:
            raise UserError(f"the candidate has no output {missing[0]!r}; compare models with the same outputs")
    feed_name, dtype, shape = model_input(ref)
    if [i.name for i in graph_inputs(cand)] != [feed_name]:
        raise UserError(f"the candidate's inputs {[i.name for i in graph_inputs(cand)]} differ from the "
                        f"reference's [{feed_name!r}]")
    rules = load_tolerances(tolerances) if tolerances is not None else None
    if rules is not None:
        rules.check_covers(out_names)
    dataset, description, batch_size = open_inputs(ref, data, random, seed, limit, preset, batch_size)
    if golden is not None and data is golden.inputs:
        description = str(golden.path)
    if golden is None:
        s_ref = open_session(ref_model, **ref_side)
        ref_info = s_ref.info
    else:
        s_ref, ref_info = None, recorded_runtime(golden, cand)
    s_cand = open_session(cand_model, **cand_side)
    precision, why = tolerance_choice(ref_info, s_cand.info)
    d_atol, d_rtol, d_scaled = TOLERANCES.get(precision, TOLERANCES["f32"])
    if atol is None and rtol is None:
        tolerance, reason, scaled = precision, why, d_scaled
    else:
        given = [name for name, value in (("atol", atol), ("rtol", rtol)) if value is not None]
        tolerance, reason, scaled = "given", " and ".join(given) + " given", 0.0
        if len(given) == 1:
            reason += f"; {'rtol' if given == ['atol'] else 'atol'} the {precision} default ({why})"
    int8 = atol is None and rtol is None and holds_qdq(cand)  # an INT8 candidate: gates, not elements
    if int8:
        tolerance, reason = "int8", INT8_WHY
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    metrics = {}
    for n in out_names:
        rule = rules.rule_for(n, atol, rtol, scaled) if rules is not None else None
        if int8 and (rule is None or rule.key == "default"):
            rule = int8_rule(atol, rtol, scaled)
        metrics[n] = OutputMetrics(name=n, rule=rule, quantiles=rule.quantile_gates() if rule else {})
    samples, first_batch = 0, None
    if golden is not None:
        batches = checked_batches(golden, s_cand, dataset, out_names, cand, batch_size, workers, strict)
    else:
        batches = ((x, a_vals, s_cand.run(out_names, {feed_name: x})) for x, _, a_vals in run_batches(
            s_ref, dataset, out_names, ref, batch_size, workers=workers, strict=strict, desc="check"))
    inputs = [m for m in (reference, candidate, data) if isinstance(m, (str, os.PathLike))]
    with GoldenWriter(save_outputs, out_names, feed_name, inputs) if save_outputs is not None else \
            contextlib.nullcontext() as writer:
        for x, a_vals, b_vals in batches:
            first_batch = x if first_batch is None else first_batch
            if writer is not None:
                writer.add(x, a_vals)
            for name, a, b in zip(out_names, a_vals, b_vals, strict=True):
                m = metrics[name]
                m.update(a, b, *((m.rule.atol, m.rule.rtol, m.rule.scaled) if m.rule else (atol, rtol, scaled)))
            samples += len(x)
        if golden is not None and samples != golden.samples:
            raise UserError(f"{dataset.description}: {samples} samples compared, but the golden outputs {golden.path} "
                            f"hold {golden.samples}; give the data they were made from")
        require_samples(dataset, samples, min_samples)
        for m in metrics.values():
            m.finish()
        if writer is not None:
            writer.commit(golden_meta(reference, ref_model, ref_info, description, dataset))
    report = Report(metrics, atol, rtol, samples, description, s_cand.info.device,
                    reference=str(golden.path) if golden is not None else str(reference)
                    if isinstance(reference, (str, os.PathLike)) else "<model>",
                    candidate=str(candidate) if isinstance(candidate, (str, os.PathLike)) else "<model>",
                    skipped_inputs=dataset.skipped, reference_runtime=ref_info.to_dict(),
                    candidate_runtime=s_cand.info.to_dict(), tolerance=tolerance, scaled_atol=scaled,
                    tolerance_reason=reason,
                    tolerances=rules.source if rules is not None else "the int8 rule" if int8 else None,
                    golden=golden.summary() if golden is not None else None)
    if layerwise and first_batch is not None:
        report.layerwise = compare_layerwise(ref_model, cand_model, first_batch[:LAYERWISE_SAMPLES], feed_name, atol,
                                             rtol, ref_side, cand_side, scaled, max_marked)
    return report


def save_outputs(reference, path, data=None, *, random: int | None = None, seed: int = 0, limit: int | None = None,
                 batch_size: int = 32, device: str = "auto", runtime: str | None = None,
                 precision: str | None = "f32", preset: str | None = None, workers: int = 0, strict: bool = False,
                 min_samples: int = 1, force: bool = False) -> dict:
    """Run `reference` alone on `data` (or `random` seeded normal inputs, as `compare` makes them) and
    store its outputs at `path` as golden outputs (onnxbn.check.golden: a `.npz`, or any other path a new
    folder in ONNX's test-data layout), streamed batch by batch, with the inputs' digests, the model's
    sha256 and the runtime and precision that made them; returns that meta. `runtime` and `precision`
    are the reference side's (onnxruntime, f32). Later: `compare(load_outputs(path), candidate, data)`.
    """
    side = {"runtime": runtime or "onnxruntime", "device": device, "precision": precision}
    check_runtime(**side)
    model = _side_model(reference, side)
    proto = model.proto
    feed_name, _, _ = model_input(proto)
    names = [o.name for o in proto.graph.output]
    dataset, description, batch_size = open_inputs(proto, data, random, seed, limit, preset, batch_size)
    session = open_session(model, **side)
    inputs = [m for m in (reference, data) if isinstance(m, (str, os.PathLike))]
    with GoldenWriter(path, names, feed_name, inputs, force) as writer:
        samples = 0
        for x, _, outputs in run_batches(session, dataset, names, proto, batch_size, workers=workers, strict=strict,
                                         desc="golden"):
            writer.add(x, outputs)
            samples += len(x)
        require_samples(dataset, samples, min_samples)
        return writer.commit(golden_meta(reference, model, session.info, description, dataset))
