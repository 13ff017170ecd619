"""INT8 quantization for deployment: `quantize`, the entry point (onnxbn's calibration, onnxruntime's Q/DQ placement,
accuracy recovery).

Steps (`quantize_with_report`):

1. BN: BatchNormalization nodes are folded first with `onnxbn.fold` (a BN fold cannot place
   keeps its float BN and is listed in the report). The BN parameters of the folded ones are
   kept for `recover="bn"` (`prepare`).
2. Opset: per-channel Q/DQ needs opset 13 (per tensor: 11, for the ranges pass); an older model
   is converted with onnx.version_converter (a UserError when that fails; `prepare`).
3. Ranges: the min/max and histogram of every float activation tensor whose range onnxruntime's
   Q/DQ placement reads (`placement.quantized_tensors`, found on the graph with stand-in weights)
   from one streaming in-graph pass (`onnxbn.ranges`, memory flat in the data size; the min of a
   tensor that cannot go below 0 is not measured), or a ranges file from `onnxbn stats --ranges`
   (of the BN-folded model). `method` turns them into each tensor's range: minmax, percentile
   (99.99 by default), entropy (TensorRT's KL threshold), mse (the threshold minimising the
   expected quantization error); see onnxbn.ranges. The model's own outputs always keep their
   min/max range (clipped logits lose their order). Float Constants take their values' range.
4. Q/DQ placement: onnxruntime's QDQ quantizer (what quantize_static runs), in memory, with those
   ranges, on stand-in weights; the weights' and biases' integers are computed in numpy with its
   formulas (`placement.place_qdq`, `weights.fill_weights`). Should it read a range the discovery
   did not name, that range is gathered too and the placement repeated.
5. Recovery, each selectable (`recover`; default cle,bias, the best of the combinations measured by
   `tools/bench.py quantize`): cle (cross-layer equalization, before the ranges are gathered),
   bias (bias correction) and bn (BN re-estimation through the Q/DQ nodes); the math is in `recovery`.
6. Verification: `onnxbn.check.compare` of the float (folded) model and the INT8 model on
   onnxruntime; the gate is top-1 agreement and cosine similarity, not element-wise atol (`report`).

A model file is read as its structure (`io.model.Model.open`): its large weights stay in the file,
read by onnxruntime for the ranges pass and by fill_weights for their integers, and BN-folded weights
are arrays; the whole model is loaded only where a step edits a whole ModelProto (an opset
conversion, recovery).

Refused with a UserError (one line): a model already quantized (QuantizeLinear,
DequantizeLinear, QLinear*, *Integer ops), no float input, no operator onnxruntime quantizes,
--exclude naming no node (`prepare`), onnxruntime's quantizer failing (`placement`), an unknown
method, activation type or recovery, --recover bn with per-tensor weights, --ranges with cle.
"""

from __future__ import annotations

import os
import time

import onnx

from onnxbn.errors import UserError
from onnxbn.graph import GraphIndex, opset_version
from onnxbn.quantization.placement import (
    STUB_ELEMENTS,
    UNREAD_RANGE,
    constant_ranges,
    place_qdq,
    quantized_tensors,
    read_ranges,
)
from onnxbn.quantization.prepare import fold_batchnorm, raise_opset, refuse_unquantizable
from onnxbn.quantization.recovery import ensure_bias, equalize, float_layer_outputs, recover_accuracy
from onnxbn.quantization.report import DEFAULT_MIN_COSINE, DEFAULT_MIN_TOP1, QuantizeReport
from onnxbn.ranges import (
    METHODS,
    Ranges,
    activation_tensors,
    choose_ranges,
    collect_ranges,
    load_ranges,
    nonnegative_tensors,
)

RECOVERIES = ("bias", "bn", "cle")
DEFAULT_RECOVER = ("cle", "bias")  # the best of none/bias/bn/bn,bias/cle/cle,bias measured: see tools/bench.py quantize


def _as_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value)


def parse_recover(value) -> list[str]:
    modes = _as_list(value)
    if modes == ["none"]:
        return []
    bad = [m for m in modes if m not in RECOVERIES]
    if bad:
        raise UserError(f"--recover: unknown recovery {bad[0]!r}: use {', '.join(RECOVERIES)} (comma separated) or none")
    return list(dict.fromkeys(modes))


def quantize_with_report(model, data, *, method: str = "minmax", percentile: float = 99.99, per_channel: bool = True,
                         activations: str = "uint8", exclude=None, recover=DEFAULT_RECOVER, ranges=None,
                         verify_data=None, min_cosine: float = DEFAULT_MIN_COSINE, min_top1: float = DEFAULT_MIN_TOP1,
                         batch_size: int = 32, limit: int | None = None, seed: int = 0, preset: str | None = None,
                         workers: int | None = 0, strict: bool = False, device: str = "auto", verify: bool = True
                         ) -> tuple[onnx.ModelProto, QuantizeReport]:
    """(INT8 QDQ model, QuantizeReport); see `quantize`. `verify=False` skips the check against the
    float model (the report's `check` stays empty and `passed` is False)."""
    from onnxbn.check import compare
    from onnxbn.feeding import open_model_data
    from onnxbn.io.model import Model
    from onnxbn.io.tensors import materialize

    started = time.perf_counter()
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    if activations not in ("uint8", "int8"):
        raise UserError(f"--activations must be uint8 or int8 (got {activations!r})")
    modes, exclude = parse_recover(recover), _as_list(exclude)
    if "bn" in modes and not per_channel:
        raise UserError("--recover bn rescales each output channel's weight scale: it needs per-channel weights "
                        "(drop --per-tensor, or use --recover bias)")
    if ranges is not None and "cle" in modes:
        raise UserError("--ranges with --recover cle: equalization rescales activations after the ranges were "
                        "gathered; drop cle from --recover (e.g. --recover bias) or let quantize gather the ranges")
    # a model file as its structure: its large weights stay in the file (or arrays once folded), read by
    # onnxruntime for the ranges pass and by fill_weights for their integers
    work = Model.open(model) if isinstance(model, (str, os.PathLike)) else Model.open(model).copy()
    proto = work.proto
    refuse_unquantizable(proto, exclude)
    index = GraphIndex(proto)
    for node in proto.graph.node:  # recovery finds layers by name in the float and the INT8 graphs
        if not node.name:
            node.name = index.unique_name(f"{node.op_type}_{node.output[0]}")
    before = opset_version(proto)
    report = QuantizeReport(method, per_channel, activations, modes, (before, before), excluded=exclude,
                            min_cosine=min_cosine, min_top1=min_top1)
    work, bn_into = fold_batchnorm(work, report)
    needed = 13 if per_channel else 11  # per-channel DequantizeLinear: 13; the ranges pass: 11
    if opset_version(work.proto) < needed or modes:  # conversion and recovery edit a whole ModelProto
        whole = work.whole()
        work = Model(raise_opset(whole, needed) if opset_version(whole) < needed else whole)
    proto = materialize(work.proto, work.arrays, work.folder, largest=STUB_ELEMENTS)  # the placement reads these
    report.opset = (before, opset_version(proto))
    if "cle" in modes:
        scales = equalize(proto)
        report.equalized = {name: [float(v.min()), float(v.max())] for name, v in scales.items()}
        for name, scale in scales.items():  # the layer's output is divided by scale: so is its BN's target
            if name in bn_into:
                bn = bn_into[name]
                bn_into[name] = dict(bn, gamma=bn["gamma"] / scale, beta=bn["beta"] / scale, a2=bn["a2"] / scale ** 2)
    if modes:
        ensure_bias(proto)
    floats = activation_tensors(proto)
    fixed = constant_ranges(proto)
    placement = {"per_channel": per_channel, "activations": activations, "exclude": exclude}
    wanted = quantized_tensors(proto, floats, fixed, **placement)

    def gather(tensors: list[str], moments: list[str] | None = None) -> Ranges:
        if ranges is None:
            return collect_ranges(work, data, tensors=tensors, histograms=method != "minmax",
                                  nonnegative=nonnegative_tensors(proto), fingerprint=False, moments=moments,
                                  batch_size=batch_size, limit=limit, seed=seed, preset=preset, workers=workers,
                                  strict=strict, device=device)
        found = load_ranges(ranges)
        missing = [t for t in tensors if t not in found.tensors]
        if missing:
            raise UserError(f"the ranges file has no tensor {missing[0]!r} of this model; gather the ranges of the "
                            "model as quantized (BN folded: `onnxbn fold`, then `onnxbn stats --ranges`)")
        return found

    found = gather(wanted, float_layer_outputs(proto) if "bias" in modes else None)  # bias: the float means too
    report.ranges = {"samples": found.meta.get("samples"), "seconds": found.meta.get("seconds"),
                     "tensors": len(wanted), "bins": found.meta.get("bins"),
                     "histogram_values": found.meta.get("histogram_values")}
    outputs = [o.name for o in proto.graph.output]
    chosen = choose_ranges(found, wanted, method, percentile, outputs=outputs)
    qdq = place_qdq(work, {**fixed, **{t: chosen.get(t, UNREAD_RANGE) for t in floats}}, **placement)
    unread = [t for t in read_ranges(qdq, floats, fixed) if t not in chosen]
    if unread:  # the placement read a range the discovery did not name: gather those too, and place again
        chosen |= choose_ranges(gather(unread), unread, method, percentile, outputs=outputs)
        qdq = place_qdq(work, {**fixed, **{t: chosen.get(t, UNREAD_RANGE) for t in floats}}, **placement)
    if modes:
        if data is None:
            raise UserError("--recover needs --data (calibration data)")

        def open_dataset():
            return open_model_data(proto, data, preset=preset, limit=limit, seed=seed)

        report.layers, report.passes = recover_accuracy(qdq, proto, bn_into, [m for m in modes if m != "cle"],
                                                        open_dataset, batch_size=batch_size,
                                                        workers=workers if workers is not None else 0, strict=strict,
                                                        device=device, float_stats=found.moments or None)
    if not verify:
        report.seconds = time.perf_counter() - started
        return qdq, report
    check_data = verify_data if verify_data is not None else data
    result = compare(work, qdq, data=check_data, atol=float("inf"), rtol=0.0, batch_size=batch_size,
                     device=device, limit=limit, seed=seed, preset=preset, strict=strict, workers=workers or 0)
    check = result.to_dict()
    report.check = {"samples": check.get("samples"), "data": "verify" if verify_data is not None else "calibration",
                    "outputs": {k: {m: v[m] for m in ("cosine_similarity", "top1_agreement", "top5_agreement",
                                                      "max_rel_error", "mean_abs_error") if m in v}
                                for k, v in check["outputs"].items()}}
    report.seconds = time.perf_counter() - started
    return qdq, report


def quantize(model, data, **options) -> onnx.ModelProto:
    """An INT8 QDQ copy of `model` (path or ModelProto) calibrated on `data` (image folder, .npz, array).

    Keyword options: method ("minmax", "percentile", "entropy", "mse"), percentile (99.99),
    per_channel (True), activations ("uint8" or "int8"), exclude (node names kept in float),
    recover ("cle,bias" default; any of "bias", "bn", "cle", comma separated, or "none"), ranges (a ranges file or Ranges
    instead of the calibration pass), verify_data, min_cosine, min_top1, batch_size, limit, seed,
    preset, workers, strict, device. See the module docstring; `quantize_with_report` also
    returns the report (ranges, per-layer corrections, the int8 check against the float model).
    """
    return quantize_with_report(model, data, **options)[0]
